"""Active health checks end to end: real upstreams, a gateway in the test's loop or a process.

An upstream's health answer is switched with `state.canned["/healthcheck"]` (raw bytes) and
switched back by deleting the entry (the echo answer, 200).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from apigate.balancing.base import Instance
from apigate.config.schema import ActiveHealthConfig, GatewayConfig
from apigate.http.resolver import Resolver
from apigate.registry.events import EVENTS
from apigate.registry.health import ActiveHealthChecker, attach_health, health_checker, http_probe
from apigate.server import Gateway
from tests.integration.test_discovery_dns import UpstreamOn, extension_env
from tests.support.gateway import GatewayProcess, base_config
from tests.support.traffic import eventually, last_seq, spread
from tests.support.upstream import Upstream

ROUTES = [{"name": "all", "match": {"paths": ["/"]}, "service": "svc"}]
ACTIVE = {
    "path": "/healthcheck",
    "interval": "100ms",
    "timeout": "200ms",
    "healthy_after": 2,
    "unhealthy_after": 2,
}
SICK = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"


def config(*urls: str, active: dict[str, Any] | None = None) -> dict[str, Any]:
    health = {"active": {**ACTIVE, **(active or {})}, "passive": None}
    return base_config(services={"svc": {"targets": list(urls), "health": health}}, routes=ROUTES)


@contextlib.asynccontextmanager
async def gateway(cfg: dict[str, Any]) -> AsyncIterator[tuple[Gateway, ActiveHealthChecker]]:
    gw = Gateway(GatewayConfig.model_validate(cfg))
    await attach_health(gw)
    checker = health_checker(gw)
    assert checker is not None
    await gw.start()
    try:
        yield gw, checker
    finally:
        await gw.shutdown(0)


def healthy(checker: ActiveHealthChecker, iid: str) -> bool:
    return bool(checker.status("svc").get(iid, {"healthy": None})["healthy"])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def instance(port: int) -> Instance:
    return Instance("i", f"http://127.0.0.1:{port}", "127.0.0.1", port)


# --- one probe ------------------------------------------------------------------------------


async def test_probe_of_a_named_instance_goes_through_the_pools_resolver() -> None:
    """Probes looked every name up themselves, on libuv's four lookup threads (which a slow
    resolver fills, stalling the data plane's connects too); they use the pools' cache now,
    and the Host header and TLS name stay the instance's name."""
    lookups: list[str] = []

    async def lookup(host: str, port: int) -> list[Any]:
        lookups.append(host)
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port))]

    loop = asyncio.get_running_loop()
    resolver = Resolver(loop, lookup=lookup)
    async with Upstream() as up:
        named = Instance("i", f"http://svc.invalid:{up.port}", "svc.invalid", up.port)
        cfg = ActiveHealthConfig(path="/status/200", timeout=1.0)
        for _ in range(3):
            assert await http_probe(named, cfg, resolver) == (True, "HTTP 200")
        assert lookups == ["svc.invalid"]  # once, then from the cache
        assert up.received[0].header("host") == f"svc.invalid:{up.port}"


async def test_probe_reports_the_reason() -> None:
    async with Upstream() as up:
        cfg = ActiveHealthConfig(path="/status/200", timeout=0.2)
        assert await http_probe(instance(up.port), cfg) == (True, "HTTP 200")
        cfg = ActiveHealthConfig(path="/status/500", timeout=0.2)
        assert await http_probe(instance(up.port), cfg) == (False, "HTTP 500")
        only_200 = ActiveHealthConfig(path="/status/204", statuses=["200"])
        assert await http_probe(instance(up.port), only_200) == (False, "HTTP 204")
        cfg = ActiveHealthConfig(path="/slow?ms=500", timeout=0.1)
        assert await http_probe(instance(up.port), cfg) == (False, "timeout")
        up.state.canned["/garbage"] = b"SSH-2.0-OpenSSH_9.6\r\n"
        cfg = ActiveHealthConfig(path="/garbage", timeout=0.2)
        assert await http_probe(instance(up.port), cfg) == (False, "bad status line")
        cfg = ActiveHealthConfig(path="/reset", timeout=0.2)
        ok, reason = await http_probe(instance(up.port), cfg)
        assert not ok and reason in ("connection closed without a response", "connection reset")
        got = up.received[0]
        assert got.method == "GET" and got.header("connection") == "close"
        assert got.header("host") == f"127.0.0.1:{up.port}"
    cfg = ActiveHealthConfig(path="/", timeout=0.2)
    assert await http_probe(instance(free_port()), cfg) == (False, "connection refused")


# --- through a gateway ----------------------------------------------------------------------


async def test_failing_instance_is_taken_out_and_brought_back() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        b_id = f"127.0.0.1:{b.port}"
        async with gateway(config(a.url, b.url)) as (gw, checker):
            assert await spread(gw.proxy_port, 4) == {"a": 2, "b": 2}
            seq = last_seq()
            b.state.canned["/healthcheck"] = SICK
            # first jitter < 100 ms, then 2 failures ~100 ms apart
            assert await eventually(lambda: not healthy(checker, b_id), 1.0) < 0.5
            assert await spread(gw.proxy_port, 10) == {"a": 10}
            [down] = [e for e in EVENTS.recent(since=seq) if e["kind"] == "health"]
            assert down["reason"] == "HTTP 500" and down["healthy"] is False
            assert down["service"] == "svc" and down["instance"] == b_id

            del b.state.canned["/healthcheck"]
            await eventually(lambda: healthy(checker, b_id), 1.0)
            assert await spread(gw.proxy_port, 4) == {"a": 2, "b": 2}
            status = checker.status("svc")[b_id]
            assert status["successes"] >= 2 and status["last_error"] == "HTTP 500"


async def test_a_dead_instance_is_found_and_a_restarted_one_readmitted() -> None:
    async with Upstream("a") as a:
        b = Upstream("b")
        await b.__aenter__()
        port = b.port
        b_id = f"127.0.0.1:{port}"
        async with gateway(config(a.url, b.url)) as (gw, checker):
            await b.__aexit__()  # killed
            await eventually(lambda: not healthy(checker, b_id), 1.0)
            assert checker.status("svc")[b_id]["last_error"] == "connection refused"
            assert await spread(gw.proxy_port, 6) == {"a": 6}  # no failed request now
            async with UpstreamOn("b2", "127.0.0.1", port):  # restarted on the same port
                await eventually(lambda: healthy(checker, b_id), 1.0)
                assert await spread(gw.proxy_port, 4) == {"a": 2, "b2": 2}


async def test_registered_instances_are_probed_and_removed_ones_are_not() -> None:
    async with Upstream("a") as a, Upstream("reg") as reg, gateway(config(a.url)) as (gw, checker):
        svc = gw.services.services["svc"]
        svc.add_instance("reg-1", reg.url, "127.0.0.1", reg.port, origin="registered")

        def probed() -> bool:
            return any(r.path == "/healthcheck" for r in reg.received)

        await eventually(probed, 1.0)  # poll tick (0.5 s) + first jitter (< 0.1 s)
        assert checker.status("svc")["reg-1"]["healthy"]
        svc.remove_instance("reg-1")
        await eventually(lambda: "reg-1" not in checker.status("svc"), 1.0)
        count = len(reg.received)
        await asyncio.sleep(0.25)
        assert len(reg.received) == count  # no probe after removal


async def test_a_reload_changes_what_is_healthy() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        b_id = f"127.0.0.1:{b.port}"
        b.state.canned["/healthcheck"] = SICK
        async with gateway(config(a.url, b.url)) as (gw, checker):
            await eventually(lambda: not healthy(checker, b_id), 1.0)
            # a wider `statuses` makes b's 500 a healthy answer
            await gw.apply_config(
                GatewayConfig.model_validate(
                    config(a.url, b.url, active={"statuses": ["2xx", "500"]})
                )
            )
            await eventually(lambda: healthy(checker, b_id), 1.0)
            # turning active checks off readmits nothing more is holding out, and stops probes
            b.state.canned["/healthcheck"] = b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n"
            plain = base_config(services={"svc": {"targets": [a.url, b.url]}}, routes=ROUTES)
            await gw.apply_config(GatewayConfig.model_validate(plain))
            assert checker.status("svc") == {}
            assert await spread(gw.proxy_port, 4) == {"a": 2, "b": 2}


async def test_a_gateway_process_routes_around_a_failing_health_check(tmp_path: Path) -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        b.state.canned["/healthcheck"] = SICK
        env = extension_env(tmp_path, "attach_health")
        async with GatewayProcess(config(a.url, b.url), env=env) as gw:

            async def only_a() -> bool:
                return await spread(gw.port, 4) == {"a": 4}

            await eventually(only_a, 2.0)
            assert await spread(gw.port, 10) == {"a": 10}
            del b.state.canned["/healthcheck"]

            async def both() -> bool:
                return set(await spread(gw.port, 4)) == {"a", "b"}

            await eventually(both, 2.0)
