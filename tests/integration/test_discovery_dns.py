"""DNS discovery end to end: a real resolver (tests/support/dns_server.py), real upstreams.

Most tests run a `Gateway` in the test's loop with `attach_dns`; the last one starts a real
`apigate run` process. A records need two addresses on one port, so those upstreams listen on
127.0.0.2 and 127.0.0.3 (loopback, like 127.0.0.1); SRV tests use 127.0.0.1 and the SRV ports.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from apigate.config.schema import GatewayConfig
from apigate.registry.dns import DnsManager, attach_dns, dns_manager
from apigate.registry.events import EVENTS
from apigate.registry.health import attach_health, health_checker
from apigate.server import Gateway
from tests.support.dns_server import DnsServer
from tests.support.gateway import GatewayProcess, base_config
from tests.support.traffic import eventually, last_seq, spread, who
from tests.support.upstream import Upstream, _Conn

ROUTES = [{"name": "all", "match": {"paths": ["/"]}, "service": "users"}]


class UpstreamOn(Upstream):
    """An `Upstream` on a chosen loopback address (and port, to share one with another)."""

    def __init__(self, name: str, host: str, port: int = 0) -> None:
        super().__init__(name)
        self.host, self.port = host, port

    async def __aenter__(self) -> UpstreamOn:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self.state), self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self


@contextlib.asynccontextmanager
async def gateway(
    config: dict[str, Any], dns: DnsServer, *, health: bool = False, timeout: float = 0.3
) -> AsyncIterator[Gateway]:
    gw = Gateway(GatewayConfig.model_validate(config))
    await attach_dns(gw, nameservers=[("127.0.0.1", dns.port)], timeout=timeout)
    if health:
        await attach_health(gw)
    await gw.start()
    try:
        yield gw
    finally:
        await gw.shutdown(0)


def users_config(discovery: dict[str, Any], **service: Any) -> dict[str, Any]:
    return base_config(services={"users": {"discovery": discovery, **service}}, routes=ROUTES)


def manager(gw: Gateway) -> DnsManager:
    found = dns_manager(gw)
    assert found is not None
    return found


async def test_traffic_follows_a_changing_a_record_within_its_ttl() -> None:
    async with (
        DnsServer() as dns,
        UpstreamOn("old", "127.0.0.2") as old,
        UpstreamOn("new", "127.0.0.3", old.port) as new,
    ):
        dns.set_a("users.test", "127.0.0.2", ttl=1)
        config = users_config({"dns": "users.test", "port": old.port, "min_ttl": 0})
        async with gateway(config, dns) as gw:
            assert await spread(gw.proxy_port, 5, "users") == {"old": 5}  # resolved before serving
            dns.set_a("users.test", "127.0.0.3", ttl=1)

            async def moved() -> bool:
                return await who(gw.proxy_port, "users") == "new"

            assert await eventually(moved, timeout=2.0) <= 1.3  # the TTL, plus a lookup
            assert await spread(gw.proxy_port, 10, "users") == {"new": 10}
            users = gw.services.services["users"]
            assert list(users.instances) == [f"dns:127.0.0.3:{new.port}"]
            assert manager(gw).status()["users"]["addresses"] == [f"127.0.0.3:{new.port}"]


@pytest.mark.parametrize("outage", ["drop", "servfail"])
async def test_serve_stale_keeps_traffic_flowing_while_the_resolver_is_down(outage: str) -> None:
    async with (
        DnsServer() as dns,
        UpstreamOn("old", "127.0.0.2") as old,
        UpstreamOn("new", "127.0.0.3", old.port),
    ):
        dns.set_a("users.test", "127.0.0.2", ttl=0)
        discovery = {"dns": "users.test", "port": old.port, "min_ttl": "100ms", "max_ttl": "400ms"}
        async with gateway(users_config(discovery), dns, timeout=0.15) as gw:
            seq = last_seq()
            dns.mode = outage  # type: ignore[assignment]
            queries = len(dns.queries)
            for _ in range(8):  # ~1 s of outage: several lookups fail, no request does
                assert await spread(gw.proxy_port, 3, "users") == {"old": 3}
                await asyncio.sleep(0.1)
            assert len(dns.queries) > queries + 2  # it kept retrying
            warnings = [e for e in EVENTS.recent(since=seq) if e["kind"] == "dns" and "error" in e]
            assert len(warnings) == 1 and warnings[0]["service"] == "users"
            assert manager(gw).status()["users"]["failures"] >= 2

            dns.mode = "answer"
            dns.set_a("users.test", "127.0.0.3", ttl=0)

            async def moved() -> bool:
                return await who(gw.proxy_port, "users") == "new"

            assert await eventually(moved, timeout=2.0) < 1.0  # backoff is capped by max_ttl
            recovered = [e for e in EVENTS.recent(since=seq) if "works again" in e["message"]]
            assert len(recovered) == 1


async def test_srv_targets_give_ports_and_weights() -> None:
    async with (
        DnsServer() as dns,
        Upstream("a") as a,
        Upstream("b") as b,
        Upstream("backup") as backup,
    ):
        dns.set_a("a.users.test", "127.0.0.1")
        dns.set_a("b.users.test", "127.0.0.1")
        name = "_http._tcp.users.test"
        dns.set_srv(
            name,
            (10, 3, a.port, "a.users.test"),
            (10, 1, b.port, "b.users.test"),
            (20, 1, backup.port, "a.users.test"),
            ttl=0,
        )
        discovery = {"dns": name, "port": 80, "srv": True, "min_ttl": "100ms"}
        async with gateway(users_config(discovery), dns) as gw:
            assert await spread(gw.proxy_port, 40, "users") == {
                "a": 30,
                "b": 10,
            }  # priority 20 unused
            dns.set_srv(name, (20, 1, backup.port, "a.users.test"), ttl=0)

            async def moved() -> bool:
                return await who(gw.proxy_port, "users") == "backup"

            await eventually(moved, timeout=2.0)
            assert await spread(gw.proxy_port, 5, "users") == {"backup": 5}


async def test_reload_starts_and_stops_discovery() -> None:
    async with DnsServer() as dns, Upstream("a") as a, Upstream("static") as static:
        dns.set_a("users.test", "127.0.0.1", ttl=60)
        async with gateway(
            base_config(services={"users": {"targets": [static.url]}}, routes=ROUTES), dns
        ) as gw:
            assert await spread(gw.proxy_port, 2, "users") == {"static": 2}
            with_dns = users_config({"dns": "users.test", "port": a.port})
            await gw.apply_config(GatewayConfig.model_validate(with_dns))

            async def resolved() -> bool:
                return await who(gw.proxy_port, "users") == "a"

            await eventually(resolved, timeout=2.0)
            without = base_config(services={"users": {"targets": [static.url]}}, routes=ROUTES)
            await gw.apply_config(GatewayConfig.model_validate(without))
            # the DNS instance is removed synchronously with the reload
            assert await spread(gw.proxy_port, 4, "users") == {"static": 4}
            assert manager(gw).discoveries == {}


async def test_discovered_instances_are_health_checked() -> None:
    async with (
        DnsServer() as dns,
        UpstreamOn("good", "127.0.0.2") as good,
        UpstreamOn("sick", "127.0.0.3", good.port) as sick,
    ):
        dns.set_a("users.test", "127.0.0.2", "127.0.0.3", ttl=60)
        sick.state.canned["/healthcheck"] = b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n"
        health = {"active": {"path": "/healthcheck", "interval": "100ms", "unhealthy_after": 2}}
        config = users_config({"dns": "users.test", "port": good.port}, health=health)
        async with gateway(config, dns, health=True) as gw:
            checker = health_checker(gw)
            assert checker is not None
            sick_id = f"dns:127.0.0.3:{good.port}"

            async def marked() -> bool:
                return not checker.status("users").get(sick_id, {"healthy": True})["healthy"]

            await eventually(marked, timeout=2.0)
            assert await spread(gw.proxy_port, 6, "users") == {"good": 6}
            assert checker.status("users")[sick_id]["last_error"] == "HTTP 503"


# --- a real `apigate run` process -----------------------------------------------------------


def extension_env(shim: Path, *attachers: str) -> dict[str, str]:
    """Until `apigate.extensions` lists our attach functions, inject them with a sitecustomize.

    Returns the environment for `GatewayProcess`; empty once the gateway wires them itself.
    """
    from apigate import extensions, registry

    wired = {getattr(fn, "__name__", "") for fn in getattr(extensions, "_ATTACHERS", [])}
    missing = [name for name in attachers if name not in wired]
    if not missing:
        return {}
    lines = ["from apigate import extensions"]
    for name in missing:
        module = "dns" if name == "attach_dns" else "health"
        lines.append(f"from apigate.registry.{module} import {name}")
        lines.append(f"extensions._ATTACHERS.append({name})")
    (shim / "sitecustomize.py").write_text(textwrap.dedent("\n".join(lines)) + "\n")
    roots = [str(shim), str(Path(registry.__file__).parents[2])]
    return {"PYTHONPATH": os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX process test")
async def test_a_gateway_process_follows_dns(tmp_path: Path) -> None:
    async with (
        DnsServer() as dns,
        UpstreamOn("old", "127.0.0.2") as old,
        UpstreamOn("new", "127.0.0.3", old.port),
    ):
        dns.set_a("users.test", "127.0.0.2", ttl=0)
        config = users_config({"dns": "users.test", "port": old.port, "min_ttl": "100ms"})
        env = {**extension_env(tmp_path, "attach_dns"), "APIGATE_DNS_NAMESERVER": dns.nameserver}
        async with GatewayProcess(config, env=env) as gw:
            assert await spread(gw.port, 3, "users") == {"old": 3}
            dns.set_a("users.test", "127.0.0.3", ttl=0)

            async def moved() -> bool:
                return await who(gw.port, "users") == "new"

            await eventually(moved, timeout=3.0)
            assert await spread(gw.port, 5, "users") == {"new": 5}
