"""`--workers N` without sockets: the option, the refusal rules, the role a worker is given,
its log field, and how worker 0 merges the others' metrics and dashboard rings."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from apigate import supervisor as supervisor_module
from apigate.admin.workers import NodeView
from apigate.cli import build_parser
from apigate.config.schema import GatewayConfig
from apigate.observability.logs import JsonFormatter, WorkerField
from apigate.observability.metrics import GatewayMetrics
from apigate.observability.metrics_merge import (
    WorkerMetrics,
    merge_families,
    merge_rings,
    parse_exposition,
)
from apigate.supervisor import Supervisor
from apigate.worker import WorkerRole
from apigate.worker_rules import multi_worker_problems, parse_workers, usable_cpus

REDIS = "redis://127.0.0.1:6379/0"


# ---------------------------------------------------------------------- the option
def test_workers_is_a_count_or_auto() -> None:
    assert parse_workers("3") == 3
    assert parse_workers("auto") == parse_workers("AUTO") == usable_cpus() >= 1
    for bad in ("0", "-2", "two", ""):
        with pytest.raises(ValueError):
            parse_workers(bad)


def test_run_takes_workers_and_defaults_to_one() -> None:
    parser = build_parser()
    assert parser.parse_args(["run", "-c", "f.yaml"]).workers == 1
    assert parser.parse_args(["run", "-c", "f.yaml", "--workers", "4"]).workers == 4
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "-c", "f.yaml", "--workers", "0"])


# ---------------------------------------------------------------------- refusal rules
def _config(store: str = REDIS, **fields: Any) -> GatewayConfig:
    doc: dict[str, Any] = {
        "version": 1,
        "store": store,
        "listeners": {"proxy": {"address": "127.0.0.1:0"}},
        "services": {"s": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [{"name": "r", "match": {"paths": ["/"]}, "service": "s"}],
    }
    doc.update(fields)
    return GatewayConfig.model_validate(doc)


LOCAL = {"rate_limit": {"requests": 5, "per": "1s", "store": "local"}}
SHARED = {"rate_limit": {"requests": 5, "per": "1s"}}


def test_one_worker_is_never_refused() -> None:
    assert multi_worker_problems(_config("memory", plugins=LOCAL), 1) == []


def test_the_memory_store_is_refused_with_why_and_what_to_do() -> None:
    (problem,) = multi_worker_problems(_config("memory"), 4)
    assert "store: redis://" in problem  # what to do
    assert "4 times its requests" in problem and "registrations" in problem  # why
    assert "--workers 1" in problem


def test_rate_limits_counted_in_process_are_refused_wherever_they_are() -> None:
    route = {"name": "r", "match": {"paths": ["/"]}, "service": "s", "plugins": LOCAL}
    consumer = {"name": "alice", "api_keys": ["k" * 16], "plugins": LOCAL}
    config = _config(plugins=LOCAL, routes=[route], consumers=[consumer])
    problems = multi_worker_problems(config, 2)
    assert [p.split(":")[0] for p in problems] == [
        "plugins.rate_limit",
        "routes[0] (r).rate_limit",
        "consumers.alice.rate_limit",
    ]
    assert all("2 times its requests" in p for p in problems)


def test_rate_limits_kept_in_redis_are_allowed() -> None:
    route = {"name": "r", "match": {"paths": ["/"]}, "service": "s", "plugins": SHARED}
    redis_named = {"rate_limit": {"requests": 5, "per": "1s", "store": "redis"}}
    assert multi_worker_problems(_config(plugins=redis_named, routes=[route]), 8) == []


def test_a_worker_role_survives_its_command_line_and_checks_changes() -> None:
    role = WorkerRole(1, 3, 8000, 8001, "/run/x", 7, 8, 30.0, restarts=2)
    assert WorkerRole.from_arg(role.to_arg()) == role
    assert role.socket_path() == "/run/x/worker-1.sock" and role.peers() == [0, 2]
    assert not role.serves_admin and WorkerRole(0, 3, 1, 2, "/r", 3, 4, 30.0).serves_admin
    assert role.config_problems(_config()) == []
    assert role.config_problems(_config(plugins=LOCAL))  # a reload that adds one: refused


def test_each_log_line_names_its_worker() -> None:
    record = logging.makeLogRecord({"name": "apigate.server", "msg": "hi", "levelno": 20})
    assert WorkerField(3).filter(record)
    assert json.loads(JsonFormatter().format(record))["worker"] == 3


# ---------------------------------------------------------------------- metrics merge
def _worker_families(requests: float, healthy: int, connections: int) -> list[Any]:
    counter = CounterMetricFamily("apigate_requests", "r", labels=["route"])
    counter.add_metric(["r"], requests)
    hist = HistogramMetricFamily("apigate_request_duration_seconds", "d", labels=["route"])
    hist.add_metric(["r"], [("0.1", requests - 1), ("+Inf", requests)], requests / 10)
    health = GaugeMetricFamily("apigate_instance_healthy", "h", labels=["instance"])
    health.add_metric(["a"], healthy)
    conns = GaugeMetricFamily("apigate_connections_open", "c", value=connections)
    info = GaugeMetricFamily("apigate_info", "i", labels=["version"])
    info.add_metric(["1"], 1)
    return [counter, hist, health, conns, info]


def _samples(families: list[Any]) -> dict[str, float]:
    return {
        s.name + json.dumps(s.labels, sort_keys=True): s.value for f in families for s in f.samples
    }


def test_counters_histograms_and_amounts_are_summed_states_keep_their_worker() -> None:
    merged = _samples(
        merge_families(
            [
                WorkerMetrics("0", _worker_families(10, 1, 2)),
                WorkerMetrics("1", _worker_families(5, 0, 3)),
            ]
        )
    )
    assert merged['apigate_requests_total{"route": "r"}'] == 15
    assert merged['apigate_request_duration_seconds_bucket{"le": "0.1", "route": "r"}'] == 13
    assert merged['apigate_request_duration_seconds_count{"route": "r"}'] == 15
    assert merged["apigate_connections_open{}"] == 5
    assert merged['apigate_info{"version": "1"}'] == 1
    assert merged['apigate_instance_healthy{"instance": "a", "worker": "0"}'] == 1
    assert merged['apigate_instance_healthy{"instance": "a", "worker": "1"}'] == 0


def test_a_stale_worker_adds_its_counters_only() -> None:
    merged = _samples(
        merge_families(
            [
                WorkerMetrics("0", _worker_families(10, 1, 2)),
                WorkerMetrics("1", _worker_families(5, 0, 3), fresh=False),
            ]
        )
    )
    assert merged['apigate_requests_total{"route": "r"}'] == 15
    assert merged["apigate_connections_open{}"] == 2
    assert 'apigate_instance_healthy{"instance": "a", "worker": "1"}' not in merged


def _peer(pid: int, requests: float) -> dict[str, Any]:
    from prometheus_client import CollectorRegistry, generate_latest

    from apigate.observability.metrics_merge import FixedCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(FixedCollector(_worker_families(requests, 1, 0)))
    return {"pid": pid, "metrics": generate_latest(registry).decode()}


def test_the_node_total_never_goes_down_when_a_worker_restarts_or_is_silent() -> None:
    role = WorkerRole(0, 2, 1, 2, "/nowhere", 3, 4, 30.0)
    view = NodeView(None, GatewayMetrics(None), role)  # type: ignore[arg-type]

    def total(peers: dict[int, dict[str, Any] | None]) -> float:
        merged = _samples(merge_families(view.metric_parts(peers)))
        return merged.get('apigate_requests_total{"route": "r"}', 0.0)

    assert total({1: _peer(100, 40)}) == 40
    assert total({1: None}) == 40  # silent: its last counts
    assert total({1: _peer(101, 3)}) == 43  # restarted: the old process's counts stay
    assert total({1: _peer(101, 5)}) == 45


def test_rings_are_summed_by_distance_from_their_newest() -> None:
    zero = (0,) * 3
    own = [(10.0, {"r": (1, 0, zero)}), (11.0, {"r": (4, 1, (4, 0, 0))})]
    other = [(9.5, {"r": (0, 0, zero)}), (10.5, {"r": (2, 0, zero)}), (11.5, {"r": (7, 0, zero)})]
    short = [(11.2, {"q": (3, 3, (0, 0, 3))})]  # a restarted worker: one snapshot
    merged = merge_rings([own, other, short])
    assert [when for when, _ in merged] == [10.0, 11.0]
    assert merged[0][1] == {"r": (3, 0, zero), "q": (3, 3, (0, 0, 3))}
    assert merged[1][1] == {"r": (11, 1, (4, 0, 0)), "q": (3, 3, (0, 0, 3))}


def test_an_exposition_round_trips_through_the_parser() -> None:
    families = parse_exposition(_peer(1, 2)["metrics"])
    assert {f.name for f in families} >= {"apigate_requests", "apigate_instance_healthy"}


# ---------------------------------------------------------------------- stopping
# A process that watches a lifeline as a worker does; argv[2] says how it takes SIGTERM:
# "drain" stops (a worker's drain), "stuck" ignores it (a stop hook that never returns).
_WATCHER = """
import signal, sys, threading, time
from apigate.worker import watch_lifeline
if sys.argv[2] == "stuck":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
threading.Thread(target=watch_lifeline, args=(int(sys.argv[1]), 0.3), daemon=True).start()
print("watching", flush=True)
time.sleep(30)
"""


@pytest.mark.parametrize(("how", "status"), [("drain", 0), ("stuck", 1)])
def test_a_worker_stops_when_its_supervisor_is_gone_and_is_ended_if_it_does_not(
    how: str, status: int
) -> None:
    """The supervisor's end of the lifeline closes (as when it dies, by SIGKILL too): the
    worker is asked to drain, and a worker that does not stop is ended after its deadline."""
    read_end, write_end = os.pipe()
    child = subprocess.Popen(
        [sys.executable, "-c", _WATCHER, str(read_end), how],
        pass_fds=(read_end,),
        stdout=subprocess.PIPE,
    )
    os.close(read_end)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"watching\n"
        time.sleep(0.5)
        assert child.poll() is None  # a lifeline held open: nothing happens
        os.close(write_end)
        assert child.wait(timeout=5) == status
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()  # type: ignore[union-attr]
        with contextlib.suppress(OSError):
            os.close(write_end)


async def test_a_worker_that_does_not_stop_in_time_is_killed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(supervisor_module, "STOP_GRACE", 0.2)
    sup = Supervisor(["unused"], 1, socket.socket(), None, drain_timeout=0.1)
    stuck = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(30)",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert stuck.stdout is not None and await stuck.stdout.readline() == b"up\n"
        sup.slots[0].proc = stuck
        sup._stop(signal.SIGTERM)
        assert await asyncio.wait_for(stuck.wait(), 5) == -signal.SIGKILL
    finally:
        if stuck.returncode is None:
            stuck.kill()
            await stuck.wait()
        sup.proxy.close()
        os.close(sup.lifeline_read)
        os.close(sup._lifeline_write)
