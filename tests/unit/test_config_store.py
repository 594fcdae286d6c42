"""The SQLite config store's file: where it is, and a clean error when it cannot be opened."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import yaml

from apigate.cli import main
from apigate.store.config_store import SqliteConfigStore, open_config_store


def test_a_relative_path_is_the_working_directory_s_and_shown_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    store = open_config_store("sqlite:///state/admin.db")
    assert isinstance(store, SqliteConfigStore)
    assert store.describe()["path"] == str(tmp_path / "state" / "admin.db")
    absolute = open_config_store(f"sqlite:///{tmp_path}/abs.db")  # sqlite:////tmp/...
    assert isinstance(absolute, SqliteConfigStore) and absolute.path == tmp_path / "abs.db"


@pytest.mark.parametrize("kind", ["not a database", "a directory"])
def test_a_file_that_cannot_be_opened_is_an_os_error_naming_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "state.db"
    if kind == "a directory":
        path.mkdir()
    else:
        path.write_bytes(b"this is not SQLite" * 100)
    store = SqliteConfigStore(path)
    with pytest.raises(OSError, match=f"store {path}: "):  # `apigate run`: "cannot start: ..."
        asyncio.run(store.open())


def _file(tmp_path: Path, services: dict[str, object]) -> Path:
    path = tmp_path / "apigate.yaml"
    config = {
        "version": 1,
        "store": f"sqlite:///{tmp_path}/state.db",
        "services": services,
        "routes": [{"name": "a", "match": {"paths": ["/a"]}, "service": "up"}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _stored_route_to_other(tmp_path: Path) -> None:
    """What a `PUT /routes/b` to service `other` left in the store (the admin API's write)."""

    async def put() -> None:
        store = SqliteConfigStore(tmp_path / "state.db")
        await store.open()
        route = {"match": {"paths": ["/b"]}, "service": "other"}
        await store.put("routes", "b", route)
        await store.close()

    asyncio.run(put())


TARGET = {"targets": ["http://127.0.0.1:9"]}


def test_validate_checks_the_stored_admin_changes_as_run_would(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`apigate run` refuses to start when the stored changes no longer fit the file (a route
    the admin API added names a service the file dropped); validate said "ok" to that."""
    _stored_route_to_other(tmp_path)
    dropped = _file(tmp_path, {"up": TARGET})
    assert main(["validate", "-c", str(dropped)]) == 2
    assert "routes[1] (b).service: unknown service 'other'" in capsys.readouterr().err
    assert main(["check", "-c", str(dropped)]) == 2  # (before probing anything)
    assert "unknown service 'other'" in capsys.readouterr().err
    kept = _file(tmp_path, {"up": TARGET, "other": TARGET})
    assert main(["validate", "-c", str(kept)]) == 0
    assert f"with 1 of the admin changes kept in {tmp_path / 'state.db'}" in capsys.readouterr().out


def test_validate_creates_no_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", "-c", str(_file(tmp_path, {"up": TARGET}))]) == 0
    assert "admin changes" not in capsys.readouterr().out
    assert not (tmp_path / "state.db").exists()
