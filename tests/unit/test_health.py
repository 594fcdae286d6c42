"""Health without sockets: active thresholds, jitter, bookkeeping, passive interplay and the
passive ejection cap."""

from __future__ import annotations

import asyncio
import itertools
import logging
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


# --- passive ejection cap (max_ejection_percent) --------------------------------------------


def passive_service(
    n: int, active: dict[str, Any] | None = None, weights: tuple[int, ...] = (), **passive: Any
) -> Service:
    """`n` static instances ("i0", "i1", ... by port order), of `weights` (default 1 each);
    two failures eject."""
    targets = [
        {"url": f"http://127.0.0.1:{9001 + i}", "weight": weights[i] if weights else 1}
        for i in range(n)
    ]
    health: dict[str, Any] = {"passive": {"failures": 2, "eject_for": "30s", **passive}}
    if active is not None:
        health["active"] = {"interval": "10s", "healthy_after": 1, "unhealthy_after": 1, **active}
    cfg = ServiceConfig.model_validate({"targets": targets, "health": health})
    return Service("capped", cfg, PoolManager(asyncio.get_running_loop()))


def nth(svc: Service, i: int) -> Instance:
    return svc.instances[f"127.0.0.1:{9001 + i}"]


def fail(svc: Service, inst: Instance, times: int) -> None:
    for _ in range(times):
        svc.report(inst, ok=False, status=500)


def cap_events(seq: int) -> list[dict[str, Any]]:
    return [e for e in health_events(seq) if e.get("reason") == "max_ejection_percent"]


async def test_a_lone_instance_is_never_ejected_at_the_default_cap() -> None:
    svc = passive_service(1)
    assert svc.config.health.passive is not None
    assert svc.config.health.passive.max_ejection_percent == 0.5
    inst = nth(svc, 0)
    fail(svc, inst, 10)
    assert inst.healthy and svc.balancer.available == [inst]
    assert inst.failures == 10  # still counted: a freed slot would eject it at once


async def test_of_two_instances_one_is_ejected_and_the_other_keeps_serving() -> None:
    svc = passive_service(2)
    a, b = nth(svc, 0), nth(svc, 1)
    fail(svc, a, 2)
    assert not a.healthy
    fail(svc, b, 5)
    assert b.healthy and svc.balancer.available == [b]
    assert svc.balancer.pick() is b


@pytest.mark.parametrize("cap", ["100%", 1, 1.0])
async def test_at_100_percent_every_instance_may_be_ejected(cap: object) -> None:
    svc = passive_service(2, max_ejection_percent=cap)
    for inst in svc.instances.values():
        fail(svc, inst, 2)
        assert not inst.healthy
    assert svc.balancer.available == [] and svc.balancer.pick() is None


@pytest.mark.parametrize(
    ("n", "cap", "out"),
    [
        (1, "50%", 0),
        (2, "50%", 1),
        (3, "50%", 1),
        (10, "50%", 5),
        (10, 0.5, 5),
        (4, "0%", 0),  # passive detection only counts failures
        (100, "29%", 29),  # 0.29 * 100 is 28.999999999999996 in floats
        (3, "100%", 3),
    ],
)
async def test_the_cap_is_a_share_of_the_instances_rounded_down(
    n: int, cap: object, out: int
) -> None:
    svc = passive_service(n, max_ejection_percent=cap)
    for inst in svc.instances.values():
        fail(svc, inst, 3)
    assert sum(not i.healthy for i in svc.instances.values()) == out
    assert len(svc.balancer.available) == n - out


async def test_a_readmission_frees_a_slot_for_the_next_failure() -> None:
    svc = passive_service(2, eject_for="50ms")
    a, b = nth(svc, 0), nth(svc, 1)
    fail(svc, a, 2)
    fail(svc, b, 3)
    assert not a.healthy and b.healthy
    await asyncio.sleep(0.1)
    assert a.healthy  # readmitted by its timer: the slot is free
    fail(svc, b, 1)  # b never stopped failing: its next failure ejects it
    assert not b.healthy and svc.balancer.available == [a]
    fail(svc, a, 5)  # and now b holds the one slot
    assert a.healthy


async def test_a_removed_instance_no_longer_holds_a_slot() -> None:
    svc = passive_service(3, eject_for="60s")
    a, b = nth(svc, 0), nth(svc, 1)
    fail(svc, a, 2)
    fail(svc, b, 2)
    assert not a.healthy and b.healthy  # 3 instances at 50%: one may be out
    svc.remove_instance(a.id)  # its timer is still pending
    fail(svc, b, 1)  # 2 instances at 50%, none out: b goes
    assert not b.healthy


async def test_instances_held_out_by_active_checks_do_not_count_nor_are_capped() -> None:
    """Like Envoy, only passive (outlier) ejections use up the cap; active checks are the
    authority and take out whatever fails them, cap or not."""
    svc = passive_service(3, active={})
    a, b, c = nth(svc, 0), nth(svc, 1), nth(svc, 2)
    checker = checker_for(svc)
    states = {inst: ProbeState(svc, inst) for inst in (a, b)}
    for state in states.values():
        checker.record(state, False, "HTTP 500")
    assert not a.healthy and a.held_out and not b.healthy  # 2 of 3 out, over 50%: not capped
    checker.record(states[b], True, "HTTP 200")
    assert b.healthy
    fail(svc, b, 2)  # a held out: b and c could serve, 50% of them (1) may be out: b goes
    assert not b.healthy
    fail(svc, c, 4)  # and now it is taken
    assert c.healthy and svc.balancer.available == [c]


async def test_a_weight_zero_instance_does_not_make_room_to_eject_the_serving_one() -> None:
    svc = passive_service(2, weights=(1, 0))
    serving = nth(svc, 0)
    fail(svc, serving, 6)
    assert serving.healthy and svc.balancer.pick() is serving


async def test_an_instance_held_out_by_active_checks_does_not_make_room_either() -> None:
    svc = passive_service(2, active={})
    a, b = nth(svc, 0), nth(svc, 1)
    checker_for(svc).record(ProbeState(svc, a), False, "HTTP 503")
    assert a.held_out and not a.healthy
    seq = last_seq()
    fail(svc, b, 6)  # b answers 500s: its answers beat 503 no_healthy_instance
    assert b.healthy and svc.balancer.pick() is b
    [event] = cap_events(seq)
    assert (event["ejected"], event["instances"]) == (0, 1)  # counted: those that could serve


async def test_the_last_serving_instance_stays_whatever_the_cap_below_100_percent() -> None:
    svc = passive_service(3, weights=(1, 0, 1), max_ejection_percent="99%")
    a, c = nth(svc, 0), nth(svc, 2)
    fail(svc, a, 2)  # 99% of the 2 that could serve is 1
    assert not a.healthy
    fail(svc, c, 6)
    assert c.healthy and svc.balancer.available == [c]


async def test_a_passively_ejected_instance_later_held_out_frees_its_slot() -> None:
    """Once active checks hold it out it is theirs, and counts as neither ejected nor able to
    serve: the others share the cap among themselves."""
    svc = passive_service(3, active={})
    a, b, c = nth(svc, 0), nth(svc, 1), nth(svc, 2)
    fail(svc, a, 2)
    assert not a.healthy
    checker_for(svc).record(ProbeState(svc, a), False, "HTTP 503")
    assert a.held_out
    fail(svc, b, 2)  # b and c could serve: one of them may be out
    assert not b.healthy
    fail(svc, c, 6)
    assert c.healthy and svc.balancer.available == [c]


async def test_an_active_readmission_ends_the_passive_ejection_and_its_timer() -> None:
    svc = passive_service(2, active={}, eject_for="200ms")
    a, b = nth(svc, 0), nth(svc, 1)
    checker = checker_for(svc)
    fail(svc, a, 2)  # t=0: passively ejected until 0.2
    await asyncio.sleep(0.1)
    state = ProbeState(svc, a)
    checker.record(state, False, "HTTP 500")
    checker.record(state, True, "HTTP 200")  # active checks bring it back at 0.1
    assert a.healthy
    fail(svc, b, 2)  # a no longer counts: b may go
    assert not b.healthy
    fail(svc, a, 2)  # b holds the slot now
    assert a.healthy
    await asyncio.sleep(0.15)  # past 0.2: b's own timer (0.3) has not fired yet
    assert not b.healthy
    await asyncio.sleep(0.12)
    assert b.healthy


async def test_a_capped_ejection_is_told_once_per_streak(caplog: pytest.LogCaptureFixture) -> None:
    svc = passive_service(1, eject_for="50ms")
    inst = nth(svc, 0)
    seq = last_seq()
    with caplog.at_level(logging.WARNING, logger="apigate.events"):
        fail(svc, inst, 20)
    [event] = cap_events(seq)
    assert event["healthy"] is True and event["check"] == "passive"
    assert event["service"] == "capped" and event["instance"] == inst.id
    assert (event["ejected"], event["instances"]) == (0, 1)
    assert event["message"] == (
        f"capped/{inst.id} not ejected after 2 consecutive failures: "
        "max_ejection_percent 50% allows 0 of 1 instances out, 0 already are"
    )
    logged = [r for r in caplog.records if "not ejected" in r.getMessage()]
    assert len(logged) == 1 and logged[0].levelno == logging.WARNING
    assert health_events(seq) == [event]  # no ejection, no readmission

    svc.report(inst, ok=True)  # the streak ends...
    fail(svc, inst, 5)  # ...a new one right away is not told again before eject_for
    assert len(cap_events(seq)) == 1
    await asyncio.sleep(0.06)
    svc.report(inst, ok=True)
    fail(svc, inst, 5)
    assert len(cap_events(seq)) == 2


async def test_an_ejection_after_a_capped_streak_is_told_as_usual() -> None:
    svc = passive_service(2, eject_for="50ms")
    a, b = nth(svc, 0), nth(svc, 1)
    fail(svc, a, 2)
    seq = last_seq()
    fail(svc, b, 3)
    await asyncio.sleep(0.08)
    fail(svc, b, 1)
    told = [(e["instance"], e["healthy"], e.get("reason")) for e in health_events(seq)]
    assert told == [
        (b.id, True, "max_ejection_percent"),
        (a.id, True, None),  # readmitted
        (b.id, False, None),  # ejected
    ]


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
