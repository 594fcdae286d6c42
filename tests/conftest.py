"""Session-wide checks: which build of apigate the tests exercise (see apigate.buildinfo)."""

from __future__ import annotations

import os

import pytest

from apigate.buildinfo import build_name, stale_modules


def pytest_report_header() -> str:
    return f"apigate build: {build_name()}"


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = stale_modules()
    if stale:
        # the compiled modules would run instead of the edited sources: the results would lie
        pytest.exit(
            f"compiled modules are older than their sources ({', '.join(stale)}): "
            "run `make build` to recompile or `make pure` to remove them",
            returncode=2,
        )
    expected = os.environ.get("APIGATE_EXPECT_BUILD")  # set by the Makefile's test target
    if expected and not build_name().startswith(expected):
        pytest.exit(f"expected the {expected} build of apigate, found {build_name()}", returncode=2)
