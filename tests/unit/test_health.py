"""Active health checks without sockets: thresholds, jitter, bookkeeping, passive interplay."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import defaultdict
from typing import Any

import pytest

from apigate.balancing.base import Instance
from apigate.config.schema import ActiveHealthConfig, ServiceConfig
from apigate.http.pool import PoolManager
from apigate.registry.events import EVENTS
from apigate.registry.health import (
    ActiveHealthChecker,
    ProbeState,
    attach_health,
    health_checker,
    parse_status_line,
)
from apigate.registry.service import Service

TARGETS = ["http://127.0.0.1:9001", "http://127.0.0.1:9002"]


def make_service(active: dict[str, Any] | None = None, **health: Any) -> Service:
    active_cfg = {"interval": "20ms", "timeout": "10ms", "healthy_after": 2, "unhealthy_after": 3}
    active_cfg.update(active or {})
    cfg = ServiceConfig.model_validate(
        {"targets": TARGETS, "health": {"active": active_cfg, **health}}
    )
    return Service("svc", cfg, PoolManager(asyncio.get_running_loop()))


class FakeProbe:
    """Answers per instance id from `results` (default healthy) and records every call."""

    def __init__(self) -> None:
        self.results: dict[str, tuple[bool, str]] = {}
        self.calls: dict[str, list[float]] = defaultdict(list)

    async def __call__(self, inst: Instance, config: ActiveHealthConfig) -> tuple[bool, str]:
        self.calls[inst.id].append(asyncio.get_running_loop().time())
        return self.results.get(inst.id, (True, "HTTP 200"))


def checker_for(*services: Service, probe: Any = None, seed: int = 1) -> ActiveHealthChecker:
    table = {s.name: s for s in services}
    return ActiveHealthChecker(lambda: table, probe=probe or FakeProbe(), rng=random.Random(seed))


def health_events(seq: int) -> list[dict[str, Any]]:
    return [e for e in EVENTS.recent(since=seq, limit=1000) if e["kind"] == "health"]


def last_seq() -> int:
    recent = EVENTS.recent(limit=1)
    return int(recent[-1]["seq"]) if recent else 0


# --- the status line ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"HTTP/1.1 200 OK\r\n", 200),
        (b"HTTP/1.0 503 Service Unavailable\r\n", 503),
        (b"HTTP/1.1 204\r\n", 204),
        (b"HTTP/1.1 200 OK\n", 200),
        (b"HTTP/2 200\r\n", None),
        (b"HTTP/1.1 20 OK\r\n", None),
        (b"HTTP/1.1 600 X\r\n", None),
        (b"SSH-2.0-OpenSSH\r\n", None),
        (b"HTTP/1.1 200 OK", None),  # no line end: the peer closed mid-line
        (b"", None),
    ],
)
def test_parse_status_line(line: bytes, code: int | None) -> None:
    assert parse_status_line(line) == code


# --- thresholds -----------------------------------------------------------------------------


async def test_unhealthy_after_consecutive_failures_then_healthy_after_successes() -> None:
    svc = make_service()
    inst = svc.instances["127.0.0.1:9002"]
    checker = checker_for(svc)
    state = ProbeState(svc, inst)
    seq = last_seq()

    checker.record(state, False, "HTTP 500")
    checker.record(state, False, "HTTP 500")
    assert inst.healthy and state.failures == 2
    checker.record(state, False, "HTTP 500")
    assert not inst.healthy and not state.healthy
    assert inst not in svc.balancer.available and len(svc.balancer.available) == 1
    [down] = health_events(seq)
    assert down["healthy"] is False and down["reason"] == "HTTP 500"
    assert down["service"] == "svc" and down["instance"] == "127.0.0.1:9002"
    assert down["check"] == "active" and "after 3 failed checks" in down["message"]

    checker.record(state, False, "timeout")  # already down: no second event
    checker.record(state, True, "HTTP 200")
    assert not inst.healthy and state.successes == 1
    checker.record(state, True, "HTTP 200")
    assert inst.healthy and inst in svc.balancer.available
    up = health_events(seq)[-1]
    assert up["healthy"] is True and up["reason"] == "HTTP 200"
    assert len(health_events(seq)) == 2
    assert state.as_dict() == {
        "healthy": True,
        "last_check": state.last_check,
        "last_error": "timeout",
        "successes": 2,
        "failures": 0,
    }


async def test_a_success_resets_the_failure_count() -> None:
    svc = make_service()
    inst = svc.instances["127.0.0.1:9001"]
    checker = checker_for(svc)
    state = ProbeState(svc, inst)
    for ok in (False, False, True, False, False, True, False, False):
        checker.record(state, ok, "x")
    assert inst.healthy and state.healthy


async def test_thresholds_of_one() -> None:
    svc = make_service({"healthy_after": 1, "unhealthy_after": 1})
    inst = svc.instances["127.0.0.1:9001"]
    checker = checker_for(svc)
    state = ProbeState(svc, inst)
    checker.record(state, False, "connection refused")
    assert not inst.healthy
    checker.record(state, True, "HTTP 200")
    assert inst.healthy


# --- jitter ---------------------------------------------------------------------------------


def test_jitter_bounds_and_spread() -> None:
    checker = ActiveHealthChecker(dict, rng=random.Random(7))
    firsts = [checker.first_delay(5.0) for _ in range(2000)]
    nexts = [checker.next_delay(5.0) for _ in range(2000)]
    assert all(0 <= d < 5.0 for d in firsts)
    assert all(4.5 <= d < 5.5 for d in nexts)
    # spread over the whole range, not a constant
    assert min(firsts) < 0.1 and max(firsts) > 4.9
    assert min(nexts) < 4.55 and max(nexts) > 5.45


async def test_instances_are_not_probed_in_lockstep() -> None:
    targets = [f"http://127.0.0.1:{9000 + i}" for i in range(6)]
    cfg = ServiceConfig.model_validate(
        {"targets": targets, "health": {"active": {"interval": "100ms"}}}
    )
    svc = Service("svc", cfg, PoolManager(asyncio.get_running_loop()))
    probe = FakeProbe()
    checker = checker_for(svc, probe=probe)
    checker.start()
    try:
        await asyncio.sleep(0.25)
    finally:
        await checker.close()
    firsts = sorted(calls[0] for calls in probe.calls.values())
    assert len(firsts) == 6
    assert firsts[-1] - firsts[0] > 0.02  # spread over the first interval
    for calls in probe.calls.values():  # and each one keeps roughly its interval
        gaps = [b - a for a, b in itertools.pairwise(calls)]
        assert all(0.085 < g < 0.2 for g in gaps), gaps


# --- which instances are probed -------------------------------------------------------------


async def test_new_instances_are_probed_and_removed_ones_are_not() -> None:
    svc = make_service()
    plain = Service(
        "plain", ServiceConfig.model_validate({"targets": ["http://127.0.0.1:9"]}), svc.pools
    )
    probe = FakeProbe()
    checker = checker_for(svc, plain, probe=probe)
    checker.sync()
    assert set(checker.status("svc")) == {"127.0.0.1:9001", "127.0.0.1:9002"}
    assert checker.status("plain") == {}  # no health.active: never probed

    svc.add_instance("reg", "http://127.0.0.1:9003", "127.0.0.1", 9003, origin="registered")
    checker.sync()
    await asyncio.sleep(0.06)
    assert probe.calls["reg"]

    svc.remove_instance("reg")
    checker.sync()
    count = len(probe.calls["reg"])
    await asyncio.sleep(0.06)
    assert len(probe.calls["reg"]) == count and "reg" not in checker.status("svc")
    assert "127.0.0.1:9" not in probe.calls
    await checker.close()
    assert checker.states == {}


async def test_a_replaced_instance_gets_a_fresh_state() -> None:
    svc = make_service()
    checker = checker_for(svc)
    svc.add_instance("reg", "http://127.0.0.1:9003", "127.0.0.1", 9003)
    checker.sync()
    old = checker.states[("svc", "reg")]
    checker.record(old, False, "x")
    svc.add_instance("reg", "http://127.0.0.1:9004", "127.0.0.1", 9004)  # moved: a new Instance
    checker.sync()
    new = checker.states[("svc", "reg")]
    assert new is not old and new.failures == 0 and new.instance.port == 9004
    assert old.task is not None and old.task.cancelling()
    await checker.close()


async def test_the_probe_loop_applies_results_and_survives_a_probe_bug() -> None:
    svc = make_service({"unhealthy_after": 2})
    calls = 0

    async def broken(inst: Instance, config: ActiveHealthConfig) -> tuple[bool, str]:
        nonlocal calls
        calls += 1
        raise RuntimeError("probe bug")

    checker = checker_for(svc, probe=broken)
    checker.start()
    try:
        await asyncio.sleep(0.1)
    finally:
        await checker.close()
    assert calls >= 4
    assert not any(i.healthy for i in svc.instances.values())


async def test_status_reports_every_probed_instance() -> None:
    svc = make_service({"unhealthy_after": 1})
    probe = FakeProbe()
    probe.results["127.0.0.1:9002"] = (False, "HTTP 503")
    checker = checker_for(svc, probe=probe)
    checker.start()
    try:
        await asyncio.sleep(0.08)
        status = checker.status("svc")
    finally:
        await checker.close()
    good, bad = status["127.0.0.1:9001"], status["127.0.0.1:9002"]
    assert good["healthy"] and good["last_error"] is None and good["successes"] >= 1
    assert not bad["healthy"] and bad["last_error"] == "HTTP 503" and bad["failures"] >= 1
    assert isinstance(bad["last_check"], float)
    assert checker.status("other") == {}


async def test_turning_active_checks_off_readmits_what_they_held_out() -> None:
    svc = make_service({"unhealthy_after": 1})
    inst = svc.instances["127.0.0.1:9001"]
    checker = checker_for(svc)
    checker.sync()
    checker.record(checker.states[("svc", inst.id)], False, "HTTP 500")
    assert not inst.healthy
    seq = last_seq()
    svc.apply_config(ServiceConfig.model_validate({"targets": TARGETS}))
    checker.sync()
    assert inst.healthy and inst in svc.balancer.available and checker.states == {}
    assert health_events(seq)[-1]["reason"] == "active checks disabled"
    await checker.close()


# --- passive and active together ------------------------------------------------------------


async def test_passive_ejection_is_readmitted_by_its_timer_not_by_probes() -> None:
    svc = make_service(passive={"failures": 1, "eject_for": "60ms"})
    inst = svc.instances["127.0.0.1:9001"]
    checker = checker_for(svc)
    state = ProbeState(svc, inst)
    svc.report(inst, ok=False, status=502)
    assert not inst.healthy
    checker.record(state, True, "HTTP 200")
    checker.record(state, True, "HTTP 200")
    checker.record(state, True, "HTTP 200")
    assert not inst.healthy  # passing probes do not cut the ejection short
    await asyncio.sleep(0.1)
    assert inst.healthy  # the passive timer did


async def test_active_unhealthy_stays_out_after_the_passive_timer() -> None:
    # a long interval: only this test's record() calls count, the probe loop stays asleep
    svc = make_service(
        {"unhealthy_after": 2, "healthy_after": 2, "interval": "10s"},
        passive={"failures": 1, "eject_for": "40ms"},
    )
    inst = svc.instances["127.0.0.1:9001"]
    checker = checker_for(svc)
    checker.sync()
    state = checker.states[("svc", inst.id)]
    svc.report(inst, ok=False, status=502)  # ejected passively first
    checker.record(state, False, "HTTP 500")
    checker.record(state, False, "HTTP 500")  # then active checks fail too
    assert not state.healthy
    await asyncio.sleep(0.08)  # the passive timer readmits...
    checker.sync()  # ...and the checker's next tick puts it back out
    assert not inst.healthy and inst not in svc.balancer.available
    checker.record(state, True, "HTTP 200")
    assert not inst.healthy
    checker.record(state, True, "HTTP 200")
    assert inst.healthy and inst in svc.balancer.available
    await checker.close()


async def test_an_active_down_instance_is_not_ejected_again_passively() -> None:
    svc = make_service({"unhealthy_after": 1}, passive={"failures": 1, "eject_for": "20ms"})
    inst = svc.instances["127.0.0.1:9001"]
    checker = checker_for(svc)
    state = ProbeState(svc, inst)
    checker.record(state, False, "timeout")
    svc.report(inst, ok=False)  # e.g. a request already in flight fails
    await asyncio.sleep(0.05)
    assert not inst.healthy  # no passive timer was started to readmit it


def test_repr() -> None:
    assert repr(ActiveHealthChecker(dict)) == "<ActiveHealthChecker 0 probed, 0 unhealthy>"


class FakeGateway:
    def __init__(self, *services: Service) -> None:
        self.services = type("Table", (), {})()
        self.services.services = {s.name: s for s in services}
        self.on_start: list[Any] = []
        self.on_stop: list[Any] = []
        self.on_runtime: list[Any] = []


async def test_attach_health_hooks_start_reload_and_stop() -> None:
    svc = make_service()
    gw = FakeGateway(svc)
    probe = FakeProbe()
    await attach_health(gw, probe=probe, poll_interval=0.01)  # type: ignore[arg-type]
    await attach_health(gw, probe=probe)  # type: ignore[arg-type]  # twice: a no-op
    checker = health_checker(gw)  # type: ignore[arg-type]
    assert checker is not None and len(gw.on_start) == len(gw.on_runtime) == 1
    gw.on_runtime[0](None)  # before start: ignored
    assert checker.states == {}
    await gw.on_start[0](gw)
    assert set(checker.status("svc")) == {"127.0.0.1:9001", "127.0.0.1:9002"}
    svc.add_instance("reg", "http://127.0.0.1:9003", "127.0.0.1", 9003)
    await asyncio.sleep(0.05)  # the poller notices without a reload
    assert "reg" in checker.status("svc")
    await gw.on_stop[0](gw)
    assert checker.states == {}
