"""apigate.buildinfo: which build runs, and stale compiled modules in a source checkout."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from apigate import buildinfo


def test_every_hot_path_module_exists_as_source() -> None:
    for module in buildinfo.HOT_PATH_MODULES:
        assert importlib.util.find_spec(module) is not None, module


def test_build_name_follows_the_compiled_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    every = list(buildinfo.HOT_PATH_MODULES)
    monkeypatch.setattr(buildinfo, "compiled_modules", lambda: every)
    assert buildinfo.build_name() == "compiled (mypyc)"
    monkeypatch.setattr(buildinfo, "compiled_modules", lambda: every[:3])
    assert buildinfo.build_name() == f"partly compiled (3 of {len(every)} modules)"
    monkeypatch.setattr(buildinfo, "compiled_modules", lambda: [])
    assert buildinfo.build_name() == "pure Python"


def test_a_source_edited_after_the_build_is_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = tmp_path / "protocol.cpython-311-x86_64-linux-gnu.so"
    source = tmp_path / "protocol.py"
    built.write_bytes(b"")
    source.write_text("")
    monkeypatch.setattr(buildinfo, "compiled_modules", lambda: ["apigate.http.protocol"])
    monkeypatch.setattr(buildinfo, "_origin", lambda module: str(built))
    os.utime(source, (1000, 1000))
    os.utime(built, (2000, 2000))
    assert buildinfo.stale_modules() == []
    os.utime(source, (3000, 3000))  # edited after the build
    assert buildinfo.stale_modules() == ["apigate.http.protocol"]
