"""Process lifecycle: graceful shutdown on SIGTERM/SIGINT and hot reload on SIGHUP and --watch."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

import pytest

from tests.support.client import RawClient, request
from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Upstream


def _config(up: Upstream, path: str, **extra: Any) -> dict[str, Any]:
    return base_config(
        services={"up": {"targets": [up.url]}},
        routes=[{"name": "r", "match": {"paths": [path]}, "service": "up", "strip_prefix": True}],
        **extra,
    )


async def _status(port: int, path: str) -> int:
    resp, _ = await request(
        port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode(), close_wait=0.01
    )
    return resp.status


async def _until(predicate: Any, within: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ graceful shutdown
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_shutdown_finishes_in_flight_requests_and_refuses_new_ones(sig: int) -> None:
    async with Upstream() as up, GatewayProcess(_config(up, "/")) as gw:
        async with RawClient(gw.port) as idle, RawClient(gw.port) as busy:
            await idle.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await idle.response()).status == 200  # now an idle keep-alive connection
            await busy.send(b"GET /slow?ms=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.3)
            gw.signal(sig)
            await gw.wait_for_log("draining")
            assert await idle.closed(2.0), "an idle connection is closed at once"
            with pytest.raises(ConnectionRefusedError):
                await asyncio.open_connection("127.0.0.1", gw.port)
            resp = await busy.response()
            assert resp.status == 200 and resp.json()["path"] == "/slow"
            assert resp.header("connection") == "close"
            assert await busy.closed(2.0)
        assert await gw.wait(10) == 0


async def test_the_admin_api_answers_while_the_proxy_drains() -> None:
    """Load balancers and scrapers ask the admin listener during a drain: /readyz's
    "draining" could never be seen (the listener closed as the drain began), and the
    drain's own requests never reached /metrics."""
    admin = {"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}}
    async with (
        Upstream() as up,
        GatewayProcess(_config(up, "/", listeners=admin)) as gw,
        RawClient(gw.port) as busy,
    ):
        await busy.send(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)
        gw.signal(signal.SIGTERM)
        await gw.wait_for_log("draining")
        ready, _ = await request(gw.admin_port, b"GET /readyz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        assert ready.status == 503 and ready.json()["draining"] is True
        scraped, _ = await request(
            gw.admin_port, b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"
        )
        assert scraped.status == 200
        assert (await busy.response()).status == 200
        assert await gw.wait(5) == 0


async def test_shutdown_gives_up_after_drain_timeout() -> None:
    async with (
        Upstream() as up,
        GatewayProcess(_config(up, "/", limits={"drain_timeout": "300ms"})) as gw,
        RawClient(gw.port) as busy,
    ):
        await busy.send(b"GET /slow?ms=5000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        gw.signal(signal.SIGTERM)
        assert await gw.wait(5) == 0
        assert loop.time() - t0 < 3
        assert await busy.closed(1.0)


async def test_a_second_stop_signal_stops_at_once_and_a_reload_meanwhile_is_ignored() -> None:
    """Ctrl-C twice: the second one cut the drain short nowhere (it was ignored, and the
    process waited for drain_timeout); a SIGHUP while stopping reloaded the config."""
    async with (
        Upstream() as up,
        GatewayProcess(_config(up, "/", limits={"drain_timeout": "20s"})) as gw,
        RawClient(gw.port) as busy,
    ):
        await busy.send(b"GET /slow?ms=10000 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        gw.signal(signal.SIGINT)
        await gw.wait_for_log("draining")
        gw.signal(signal.SIGHUP)
        await gw.wait_for_log("reload ignored")
        gw.signal(signal.SIGINT)
        assert await gw.wait(5) == 0
        assert loop.time() - t0 < 3
        assert await busy.closed(1.0)
        assert "config reloaded" not in gw.logs()


# ------------------------------------------------------------------ hot reload
async def test_sighup_reload_serves_the_new_route() -> None:
    async with Upstream() as up, GatewayProcess(_config(up, "/old")) as gw:
        assert await _status(gw.port, "/old/echo") == 200
        assert await _status(gw.port, "/new/echo") == 404
        gw.write_config(_config(up, "/new"))
        gw.signal(signal.SIGHUP)
        await gw.wait_for_log("config reloaded")
        assert await _status(gw.port, "/new/echo") == 200
        assert await _status(gw.port, "/old/echo") == 404


async def test_watch_reload_serves_the_new_route() -> None:
    async with Upstream() as up, GatewayProcess(_config(up, "/old"), args=("--watch",)) as gw:
        assert await _status(gw.port, "/old/echo") == 200
        gw.write_config(_config(up, "/new"))

        async def new_route_served() -> bool:
            return await _status(gw.port, "/new/echo") == 200

        await _until(new_route_served, 5.0)
        assert await _status(gw.port, "/old/echo") == 404


async def test_a_reload_that_moves_a_listener_is_refused_with_the_reason() -> None:
    """The gateway cannot move its sockets on a reload: the file asking for it is refused (it
    was reported as reloaded while the old ports went on serving and the new ones refused)."""
    async with Upstream() as up, GatewayProcess(_config(up, "/old")) as gw:
        moved = _config(up, "/new")
        moved["listeners"] = dict(moved["listeners"], proxy={"address": "127.0.0.1:1"})
        gw.write_config(moved)
        gw.signal(signal.SIGHUP)
        line = await gw.wait_for_log("reload rejected")
        assert "listeners.proxy.address: 127.0.0.1:0 -> 127.0.0.1:1 needs a restart" in line
        assert await _status(gw.port, "/old/echo") == 200
        assert await _status(gw.port, "/new/echo") == 404


async def test_invalid_file_is_rejected_and_the_old_config_keeps_serving() -> None:
    async with Upstream() as up, GatewayProcess(_config(up, "/old")) as gw:
        bad = _config(up, "/new")
        bad["routes"][0]["servce"] = "up"  # a typo: unknown key
        gw.write_config(bad)
        gw.signal(signal.SIGHUP)
        line = await gw.wait_for_log("reload rejected")
        assert "servce" in line
        assert await _status(gw.port, "/old/echo") == 200
        assert await _status(gw.port, "/new/echo") == 404
        gw.config_path.write_text("routes: [unclosed\n")  # not even YAML
        gw.signal(signal.SIGHUP)

        async def second_rejection() -> bool:
            return sum("reload rejected" in x for x in gw.stderr_lines) >= 2

        await _until(second_rejection, 5.0)
        assert await _status(gw.port, "/old/echo") == 200
        assert gw.proc is not None and gw.proc.returncode is None


async def test_in_flight_request_finishes_on_its_snapshot() -> None:
    async with (
        Upstream() as up,
        GatewayProcess(_config(up, "/old")) as gw,
        RawClient(gw.port) as c,
    ):
        await c.send(b"GET /old/slow?ms=800 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.2)
        gw.write_config(_config(up, "/new"))
        gw.signal(signal.SIGHUP)
        await gw.wait_for_log("config reloaded")
        resp = await c.response()
        assert resp.status == 200 and resp.json()["path"] == "/slow"
        # the next request on the same connection uses the new snapshot
        await c.send(b"GET /old/echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await c.response()).status == 404


async def test_snapshots_are_frozen_out_of_the_collector_and_a_replaced_one_is_freed() -> None:
    """A full garbage collection walking a big config stalled every request for ~100 ms
    (bench routes10k p99): the gateway freezes what is alive once it is ready and after each
    reload has drained; the replaced snapshot's plugins must still be freed then. Young
    collections are made rarer (they walked every in-flight aggregate's tasks every ~15
    requests)."""
    import gc
    import weakref

    from apigate.config.schema import GatewayConfig
    from apigate.server import YOUNG_GC_THRESHOLD, Gateway

    def config(with_cors: bool) -> GatewayConfig:
        route: dict[str, Any] = {"name": "r", "match": {"paths": ["/"]}, "service": "up"}
        if with_cors:
            route["plugins"] = {"cors": {"origins": ["https://a.example"]}}
        raw = base_config(
            services={"up": {"targets": ["http://127.0.0.1:9"]}},
            routes=[route],
            limits={"drain_timeout": "0s"},
        )
        return GatewayConfig.model_validate(raw)

    gc.unfreeze()  # (an earlier test's gateway in this process may have frozen the heap)
    assert gc.get_freeze_count() == 0
    thresholds = gc.get_threshold()
    gc.set_threshold(700, *thresholds[1:])
    gw = Gateway(config(with_cors=True))
    await gw.start()
    try:
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (YOUNG_GC_THRESHOLD, *thresholds[1:])
        [plugin] = [p for p in gw.runtime.plugins if type(p).__name__ == "CorsPlugin"]
        plugin.cycle = plugin  # type: ignore[attr-defined]  # only a collection can free it
        old_plugin = weakref.ref(plugin)
        del plugin
        await gw.apply_config(config(with_cors=False))
        for _ in range(100):  # the drain (0 s), closing the plugins, then the collection
            if not gw._retiring and old_plugin() is None:
                break
            await asyncio.sleep(0.05)
        assert old_plugin() is None and not gw._retiring
        assert gc.get_freeze_count() > 0
    finally:
        await gw.shutdown(0)
        gc.set_threshold(*thresholds)
