"""DNS discovery without sockets: TTL clamping, reconciliation, serve-stale, the manager."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from apigate.config.schema import DiscoveryConfig, GatewayConfig, ServiceConfig
from apigate.http.pool import PoolManager
from apigate.registry.dns import (
    MIN_INTERVAL,
    RETRY_CEILING,
    DnsDiscovery,
    DnsLookupError,
    DnsManager,
    Endpoint,
    Resolution,
    attach_dns,
    clamp_ttl,
    dns_manager,
    nameservers_from_env,
    parse_nameservers,
    retry_delay,
    srv_weights,
)
from apigate.registry.events import EVENTS
from apigate.registry.service import Service


def discovery(**kw: Any) -> DiscoveryConfig:
    return DiscoveryConfig.model_validate({"dns": "users.test", "port": 8080, **kw})


def service_config(**kw: Any) -> ServiceConfig:
    data: dict[str, Any] = {"discovery": {"dns": "users.test", "port": 8080}}
    data.update(kw)
    return ServiceConfig.model_validate(data)


def make_service(**kw: Any) -> Service:
    return Service("users", service_config(**kw), PoolManager(asyncio.get_running_loop()))


def answer(*hosts: str, ttl: float = 5.0, port: int = 8080) -> Resolution:
    return Resolution(tuple(Endpoint(h, port) for h in hosts), ttl)


class FakeResolver:
    """Answers (or raises) whatever `result` holds; `gate` can hold a lookup open."""

    def __init__(self, result: Resolution | Exception) -> None:
        self.result = result
        self.calls: list[DiscoveryConfig] = []
        self.gate: asyncio.Event | None = None

    async def lookup(self, config: DiscoveryConfig) -> Resolution:
        self.calls.append(config)
        if self.gate is not None:
            await self.gate.wait()
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def dns_ids(svc: Service) -> list[str]:
    return sorted(iid for iid, inst in svc.instances.items() if inst.origin == "dns")


def events_since(seq: int, kind: str = "dns") -> list[dict[str, Any]]:
    return [e for e in EVENTS.recent(since=seq, limit=1000) if e["kind"] == kind]


def last_seq() -> int:
    recent = EVENTS.recent(limit=1)
    return int(recent[-1]["seq"]) if recent else 0


# --- timing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttl", "min_ttl", "max_ttl", "expected"),
    [
        (30, 1, 300, 30),  # inside the bounds: the TTL itself
        (0, 1, 300, 1),  # below min_ttl
        (86400, 1, 300, 300),  # above max_ttl
        (0, 0, 300, MIN_INTERVAL),  # TTL 0 and min_ttl 0: the floor, not a busy loop
        (5, 5, 5, 5),
    ],
)
def test_clamp_ttl(ttl: float, min_ttl: float, max_ttl: float, expected: float) -> None:
    assert clamp_ttl(ttl, discovery(min_ttl=min_ttl, max_ttl=max_ttl)) == expected


def test_retry_delay_doubles_from_min_ttl_and_stays_bounded() -> None:
    config = discovery(min_ttl=1, max_ttl=300)
    delays = [retry_delay(n, config) for n in range(1, 9)]
    assert delays[:5] == [1, 2, 4, 8, 16]
    assert max(delays) == RETRY_CEILING  # a recovery is noticed within RETRY_CEILING
    assert retry_delay(1000, config) == RETRY_CEILING
    small = discovery(min_ttl=1, max_ttl=3)
    assert [retry_delay(n, small) for n in (1, 2, 3)] == [1, 2, 3]
    slow = discovery(min_ttl=60, max_ttl=600)  # min_ttl above the ceiling wins
    assert retry_delay(1, slow) == 60 and retry_delay(5, slow) == 60
    assert retry_delay(1, discovery(min_ttl=0)) == MIN_INTERVAL


# --- configuration of the resolver ----------------------------------------------------------


def test_parse_nameservers() -> None:
    assert parse_nameservers("127.0.0.1:5353") == [("127.0.0.1", 5353)]
    assert parse_nameservers("10.0.0.2, [::1]:53,[fe80::1]") == [
        ("10.0.0.2", 53),
        ("::1", 53),
        ("fe80::1", 53),
    ]
    for bad in ("dns.example:53", "127.0.0.1:x", "127.0.0.1:70000", "[::1]x"):
        with pytest.raises(ValueError, match="invalid nameserver"):
            parse_nameservers(bad)


def test_nameservers_from_env() -> None:
    assert nameservers_from_env({}) is None
    assert nameservers_from_env({"APIGATE_DNS_NAMESERVER": " "}) is None
    env = {"APIGATE_DNS_NAMESERVER": "127.0.0.1:5353"}
    assert nameservers_from_env(env) == [("127.0.0.1", 5353)]
    with pytest.raises(ValueError, match="APIGATE_DNS_NAMESERVER"):
        nameservers_from_env({"APIGATE_DNS_NAMESERVER": "nope"})


def test_srv_weights_keep_proportions_within_instance_limits() -> None:
    assert srv_weights([0, 5, 10]) == [1, 5, 10]  # 0 would mean "no traffic" for an Instance
    assert srv_weights([65535, 32768, 0]) == [1000, 500, 1]
    assert srv_weights([]) == []


# --- reconciliation -------------------------------------------------------------------------


async def test_reconcile_adds_new_and_drains_vanished_dns_instances() -> None:
    svc = make_service(targets=["http://127.0.0.1:9001"])
    svc.add_instance("mine", "http://127.0.0.1:9002", "127.0.0.1", 9002, origin="registered")
    disc = DnsDiscovery(svc, svc.config.discovery or discovery(), FakeResolver(answer()))

    added, removed = disc.reconcile(answer("10.0.0.5", "10.0.0.6").endpoints)
    assert added == ["dns:10.0.0.5:8080", "dns:10.0.0.6:8080"] and removed == []
    inst = svc.instances["dns:10.0.0.5:8080"]
    assert (inst.origin, inst.host, inst.port, inst.url) == (
        "dns",
        "10.0.0.5",
        8080,
        "http://10.0.0.5:8080",
    )
    assert inst.metadata == {"dns": "users.test"}
    inst.healthy = False  # health must survive a re-resolve that keeps the address
    vanished = svc.instances["dns:10.0.0.6:8080"]

    added, removed = disc.reconcile(answer("10.0.0.5", "10.0.0.7").endpoints)
    assert added == ["dns:10.0.0.7:8080"] and removed == ["dns:10.0.0.6:8080"]
    assert vanished.draining and "dns:10.0.0.6:8080" not in svc.instances
    assert svc.instances["dns:10.0.0.5:8080"] is inst and not inst.healthy
    # static and registered instances are never touched
    assert {"127.0.0.1:9001", "mine"} <= set(svc.instances)
    assert vanished not in svc.balancer.instances


async def test_reconcile_updates_weights_in_place_and_uses_service_scheme() -> None:
    svc = make_service(scheme="https")
    disc = DnsDiscovery(svc, discovery(), FakeResolver(answer()))
    disc.reconcile([Endpoint("::1", 8443, 3)])
    inst = svc.instances["dns:[::1]:8443"]
    assert inst.url == "https://[::1]:8443" and inst.scheme == "https" and inst.weight == 3
    assert disc.reconcile([Endpoint("::1", 8443, 1)]) == ([], [])
    assert svc.instances["dns:[::1]:8443"] is inst and inst.weight == 1


async def test_reconcile_leaves_a_hand_registered_dns_id_alone() -> None:
    svc = make_service()
    svc.add_instance("dns:10.0.0.5:8080", "http://10.0.0.9:1", "10.0.0.9", 1, origin="registered")
    disc = DnsDiscovery(svc, discovery(), FakeResolver(answer()))
    assert disc.reconcile(answer("10.0.0.5").endpoints) == ([], [])
    assert svc.instances["dns:10.0.0.5:8080"].origin == "registered"


# --- one lookup: success, serve-stale, recovery ---------------------------------------------


async def test_serve_stale_keeps_the_last_answer_and_warns_once_per_outage() -> None:
    svc = make_service(discovery={"dns": "users.test", "port": 8080, "min_ttl": "1s"})
    resolver = FakeResolver(answer("10.0.0.5", "10.0.0.6", ttl=20))
    disc = DnsDiscovery(svc, svc.config.discovery or discovery(), resolver)
    seq = last_seq()
    assert await disc.resolve_once() == 20
    assert dns_ids(svc) == ["dns:10.0.0.5:8080", "dns:10.0.0.6:8080"]

    resolver.result = DnsLookupError("timeout")
    delays = [await disc.resolve_once() for _ in range(4)]
    assert delays == [1, 2, 4, 8]  # backoff from min_ttl
    assert dns_ids(svc) == ["dns:10.0.0.5:8080", "dns:10.0.0.6:8080"]  # stale, still serving
    assert disc.failures == 4 and disc.last_error == "timeout"
    warnings = [e for e in events_since(seq) if "error" in e]
    assert len(warnings) == 1
    assert warnings[0]["error"] == "timeout" and warnings[0]["stale"] == 2

    resolver.result = answer("10.0.0.6", ttl=20)
    assert await disc.resolve_once() == 20
    assert dns_ids(svc) == ["dns:10.0.0.6:8080"]
    assert disc.failures == 0 and disc.last_error is None
    messages = [e["message"] for e in events_since(seq)]
    assert any("works again after 4 failed attempts" in m for m in messages)
    assert any("(+0 -1)" in m for m in messages)

    resolver.result = DnsLookupError("timeout")  # a second outage warns again
    await disc.resolve_once()
    assert len([e for e in events_since(seq) if "error" in e]) == 2


async def test_failure_event_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    svc = make_service()
    disc = DnsDiscovery(svc, discovery(), FakeResolver(DnsLookupError("SERVFAIL")))
    with caplog.at_level(logging.DEBUG, logger="apigate"):
        await disc.resolve_once()
        await disc.resolve_once()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "SERVFAIL" in warnings[0].getMessage()


async def test_an_empty_answer_counts_as_a_failure() -> None:
    svc = make_service()
    resolver = FakeResolver(answer("10.0.0.5"))
    disc = DnsDiscovery(svc, discovery(), resolver)
    await disc.resolve_once()
    resolver.result = answer()
    await disc.resolve_once()
    assert dns_ids(svc) == ["dns:10.0.0.5:8080"] and disc.failures == 1


async def test_a_resolver_bug_is_contained() -> None:
    svc = make_service()
    disc = DnsDiscovery(svc, discovery(), FakeResolver(RuntimeError("boom")))
    assert await disc.resolve_once() == 1
    assert disc.last_error == "RuntimeError: boom"


async def test_first_lookup_failing_leaves_the_service_empty_and_retries() -> None:
    svc = make_service()
    disc = DnsDiscovery(svc, discovery(min_ttl=0.5), FakeResolver(DnsLookupError("timeout")))
    assert await disc.resolve_once() == 0.5
    assert dns_ids(svc) == [] and disc.last_good is None


async def test_an_answer_for_a_replaced_config_is_dropped() -> None:
    svc = make_service()
    resolver = FakeResolver(answer("10.0.0.5"))
    resolver.gate = asyncio.Event()
    disc = DnsDiscovery(svc, discovery(), resolver)
    pending = asyncio.create_task(disc.resolve_once())
    await asyncio.sleep(0)
    disc.reconfigure(discovery(dns="orders.test"))
    resolver.gate.set()
    assert await pending == 0.0  # look up the new name at once
    assert dns_ids(svc) == []


# --- the background loop --------------------------------------------------------------------


async def test_the_loop_re_resolves_when_the_ttl_expires() -> None:
    svc = make_service()
    resolver = FakeResolver(answer("10.0.0.5", ttl=0))
    disc = DnsDiscovery(svc, discovery(min_ttl=0), resolver)
    disc.start()
    try:
        await asyncio.wait_for(disc.first_done.wait(), 1)
        assert dns_ids(svc) == ["dns:10.0.0.5:8080"]
        resolver.result = answer("10.0.0.6", ttl=0)
        await asyncio.sleep(MIN_INTERVAL * 2.5)
        assert dns_ids(svc) == ["dns:10.0.0.6:8080"]
        assert 2 <= len(resolver.calls) <= 4  # every MIN_INTERVAL, not a busy loop
    finally:
        task = disc.cancel(remove_instances=False)
        assert task is not None
        await asyncio.gather(task, return_exceptions=True)


async def test_reconfigure_wakes_a_long_sleep() -> None:
    svc = make_service()
    resolver = FakeResolver(answer("10.0.0.5", ttl=300))
    disc = DnsDiscovery(svc, discovery(), resolver)
    disc.start()
    try:
        await asyncio.wait_for(disc.first_done.wait(), 1)
        disc.reconfigure(discovery())  # same settings: no extra lookup
        await asyncio.sleep(0.02)
        assert len(resolver.calls) == 1
        disc.reconfigure(discovery(port=9090))
        await asyncio.sleep(0.02)
        assert len(resolver.calls) == 2 and resolver.calls[-1].port == 9090
        status = disc.status()
        assert status["addresses"] == ["10.0.0.5:8080"] and status["failures"] == 0
        assert 299 < status["next_lookup_in"] <= 300
    finally:
        task = disc.cancel(remove_instances=True)
        await asyncio.gather(*(t for t in [task] if t), return_exceptions=True)
    assert dns_ids(svc) == []


# --- the manager and attach_dns -------------------------------------------------------------


def gateway_config(services: dict[str, Any]) -> GatewayConfig:
    return GatewayConfig.model_validate({"services": services})


async def test_manager_follows_services_coming_and_going() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    resolver = FakeResolver(answer("10.0.0.5", ttl=300))
    manager = DnsManager(resolver)
    cfg = gateway_config(
        {
            "users": {"discovery": {"dns": "users.test", "port": 8080}},
            "static": {"targets": ["http://127.0.0.1:9001"]},
        }
    )
    users = Service("users", cfg.services["users"], pools)
    table = {"users": users, "static": Service("static", cfg.services["static"], pools)}
    manager.running = True
    manager.sync(cfg.services, table)
    await manager.wait_first_answers(1)
    assert list(manager.discoveries) == ["users"] and dns_ids(users) == ["dns:10.0.0.5:8080"]
    assert manager.status()["users"]["addresses"] == ["10.0.0.5:8080"]

    changed = gateway_config({"users": {"discovery": {"dns": "users2.test", "port": 8080}}})
    manager.sync(changed.services, table)
    await asyncio.sleep(0.02)
    assert resolver.calls[-1].dns == "users2.test"

    seq = last_seq()
    dropped = gateway_config({"users": {"targets": ["http://127.0.0.1:9002"]}})
    manager.sync(dropped.services, table)  # discovery removed: its instances drain now
    assert manager.discoveries == {} and dns_ids(users) == []
    assert any("discovery stopped" in e["message"] for e in events_since(seq))

    manager.sync(cfg.services, table)
    replacement = Service("users", cfg.services["users"], pools)
    manager.sync(cfg.services, {"users": replacement})  # a new object: the old one is left
    await manager.wait_first_answers(1)
    assert dns_ids(replacement) == ["dns:10.0.0.5:8080"]
    assert repr(manager).startswith("<DnsManager 1 services, 0 failing")
    await manager.close()
    assert manager.discoveries == {} and not manager.running


class FakeGateway:
    """What attach_dns touches on a `Gateway`."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.services = type("Table", (), {})()
        pools = PoolManager(asyncio.get_running_loop())
        self.services.services = {n: Service(n, c, pools) for n, c in config.services.items()}
        self.on_start: list[Any] = []
        self.on_stop: list[Any] = []
        self.on_runtime: list[Any] = []


async def test_attach_dns_hooks_start_reload_and_stop() -> None:
    cfg = gateway_config({"users": {"discovery": {"dns": "users.test", "port": 8080}}})
    gw = FakeGateway(cfg)
    resolver = FakeResolver(answer("10.0.0.5", ttl=300))
    await attach_dns(gw, resolver=resolver)  # type: ignore[arg-type]
    manager = dns_manager(gw)  # type: ignore[arg-type]
    assert manager is not None
    assert len(gw.on_start) == len(gw.on_stop) == len(gw.on_runtime) == 1
    await attach_dns(gw, resolver=resolver)  # type: ignore[arg-type]
    assert len(gw.on_start) == 1 and dns_manager(gw) is manager  # attaching twice: a no-op
    gw.on_runtime[0](type("Runtime", (), {"config": cfg})())  # before start: ignored
    assert manager.discoveries == {}

    await gw.on_start[0](gw)  # waits for the first answers
    users = gw.services.services["users"]
    assert dns_ids(users) == ["dns:10.0.0.5:8080"]
    gw.on_runtime[0](type("Runtime", (), {"config": gateway_config({"users": {}})})())
    assert dns_ids(users) == []
    await gw.on_stop[0](gw)
    assert not manager.running


async def test_attach_dns_rejects_a_bad_nameserver_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("APIGATE_DNS_NAMESERVER", "not-an-ip:53")
    gw = FakeGateway(gateway_config({}))
    with pytest.raises(ValueError, match="APIGATE_DNS_NAMESERVER"):
        await attach_dns(gw)  # type: ignore[arg-type]
