"""bench/results.py: each scenario is held to the target its issue sets, and only to that."""

from __future__ import annotations

from types import ModuleType
from typing import Any

import pytest

from tests.support.bench import bench_module


@pytest.fixture(scope="module")
def results() -> ModuleType:
    return bench_module("results")


def row(results: ModuleType, scenario: str, target: str, cpu: float, rps: float) -> Any:
    return results.Measurement(
        scenario=scenario, path="/", target=target, round=0, requests=1000, seconds=1.0,
        rps=rps, p50_ms=1.0, p99_ms=2.0, latency_ms={}, cpu_us_per_req=cpu, sys_us_per_req=cpu / 2,
        cpu_util=1.0,
        load_cpu_util=0.5, other_cpu_util=0.0, upstream_cpu_us_per_req=5.0,
        upstream_conns_opened=0, upstream_requests=1000, socket_errors={}, non_2xx=0,
    )  # fmt: skip


def compared(results: ModuleType, scenario: str, cpu: float, rps: float) -> Any:
    nginx = row(results, scenario, "nginx", 20.0, 40_000)
    rows = [nginx, row(results, scenario, "apigate", cpu, rps)]
    (comparison,) = results.compare(rows)
    return comparison


def test_plain_is_held_to_the_core_targets(results: ModuleType) -> None:
    ok = compared(results, "plain", cpu=26.0, rps=32_000)  # 1.3x, 0.8x
    assert ok.cpu_pass and ok.rps_pass
    slow = compared(results, "plain", cpu=26.2, rps=31_900)
    assert not slow.cpu_pass and not slow.rps_pass
    line = results.comparison_row(slow, results.WIDTHS)
    assert "(target <= 1.3x) FAIL" in line and "(target >= 0.8x) FAIL" in line


def test_plugins_is_held_to_its_own_cpu_target_and_no_throughput_target(
    results: ModuleType,
) -> None:
    ok = compared(results, "plugins", cpu=32.0, rps=10_000)  # 1.6x CPU; throughput not asked
    assert ok.cpu_pass and ok.rps_pass
    line = results.comparison_row(ok, results.WIDTHS)
    assert "CPU/req 1.60x (target <= 1.6x) PASS" in line
    assert "req/s 0.25x" in line and "target >=" not in line
    assert not compared(results, "plugins", cpu=32.2, rps=40_000).cpu_pass


def test_logged_is_held_to_the_core_cpu_target_only(results: ModuleType) -> None:
    ok = compared(results, "logged", cpu=26.0, rps=10_000)  # 1.3x CPU; throughput not asked
    assert ok.cpu_pass and ok.rps_pass
    assert "CPU/req 1.30x (target <= 1.3x) PASS" in results.comparison_row(ok, results.WIDTHS)
    assert not compared(results, "logged", cpu=26.2, rps=40_000).cpu_pass


def test_scenarios_without_a_target_print_their_ratios_only(results: ModuleType) -> None:
    c = compared(results, "aggregate3", cpu=100.0, rps=8_000)
    assert c.cpu_pass and c.rps_pass  # nothing asked, so --check does not fail on it
    line = results.comparison_row(c, results.WIDTHS)
    assert "CPU/req 5.00x;  req/s 0.20x" in line and "target" not in line
