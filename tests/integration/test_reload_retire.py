"""Retiring replaced snapshots: a burst of config changes costs one full collection once
their drains end, not one each, and the snapshots are still freed."""

from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import pytest

import apigate.server
from apigate.config.loader import parse_config
from tests.support.gateway import base_config, running_gateway


def _config(version: int) -> dict[str, object]:
    return base_config(
        limits={"drain_timeout": "50ms"},
        services={"up": {"targets": ["http://127.0.0.1:9"]}},
        routes=[{"name": f"r{version}", "match": {"paths": ["/"]}, "service": "up"}],
        # a plugin each snapshot makes its own: freed with the snapshot, and unlike the
        # snapshot (compiled by mypyc in the compiled build) it can be watched with a weakref
        plugins={"request_size": {"max_bytes": "1MiB"}},
    )


async def test_a_burst_of_changes_is_settled_by_one_collection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """300 admin changes in 0.4 s each scheduled a full collection after its drain: the
    proxy stalled for 12 s once they ran back to back."""
    collections = []
    settle = apigate.server.settle_heap
    monkeypatch.setattr(apigate.server, "settle_heap", lambda: collections.append(settle()))
    async with running_gateway(_config(0), tmp_path) as gw:
        collections.clear()  # (start-up's)
        replaced = []
        for version in range(1, 21):
            replaced.append(weakref.ref(gw.runtime.plugins[0]))
            await gw.apply_config(parse_config(_config(version)))
        assert all(ref() is not None for ref in replaced)  # (draining: still alive)
        await asyncio.sleep(1.5)  # the drains (50 ms), then SETTLE_DELAY (1 s)
        assert len(collections) == 1
        gc.collect()  # (the test's own frames may hold a cycle of the last one a moment)
        assert [ref for ref in replaced if ref() is not None] == []


CLOSING_PLUGIN = """\
from apigate.plugins import Plugin, PluginConfig

CLOSED = []


class AuditConfig(PluginConfig):
    generation: int = 0


class Audit(Plugin):
    name = "audit"
    Config = AuditConfig

    async def close(self):
        CLOSED.append(self.config.generation)
        if self.config.generation == 1:
            raise RuntimeError("flush failed: 42 audit records lost")
"""


async def test_shutdown_closes_the_plugins_of_snapshots_still_to_retire(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Reloads within the drain timeout, then SIGTERM: only the last snapshot's plugins were
    closed, and a close() that raised was swallowed (plugin-author audit)."""
    (tmp_path / "closing_audit.py").write_text(CLOSING_PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))

    def config(generation: int) -> dict[str, object]:
        return base_config(
            limits={"drain_timeout": "30s"},
            services={"up": {"targets": ["http://127.0.0.1:9"]}},
            routes=[{"name": "r", "match": {"paths": ["/"]}, "service": "up"}],
            plugins={"closing_audit:Audit": {"generation": generation}},
        )

    import closing_audit  # type: ignore[import-not-found]

    async with running_gateway(config(0), tmp_path) as gw:
        for generation in (1, 2):
            await gw.apply_config(parse_config(config(generation)))
        assert closing_audit.CLOSED == []  # (the replaced ones wait out the drain timeout)
    assert sorted(closing_audit.CLOSED) == [0, 1, 2]
    assert any("failed to close" in r.getMessage() for r in caplog.records)
