"""The SQLite config store's file: where it is, and a clean error when it cannot be opened."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

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
