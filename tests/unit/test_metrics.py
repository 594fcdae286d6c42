"""GatewayMetrics without sockets: fake exchanges in, Prometheus text and /stats out."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from apigate.observability.metrics import (
    BUCKETS_MS,
    MAX_NAMED_SERIES,
    GatewayMetrics,
    quantile_ms,
)


class FakeRoute:
    """Hashable by identity, like the runtime's CompiledRoute."""

    def __init__(self, name: str, service: str | None) -> None:
        self.name = name
        self.service = SimpleNamespace(name=service) if service else None


@dataclass
class FakeRequest:
    method: str = "GET"
    content_length: int | None = None


@dataclass
class FakeCtx:
    route: FakeRoute | None
    status: int = 200
    total_ms: float = 1.0
    upstream_ms: float | None = 0.5
    bytes_sent: int = 100
    request: FakeRequest = field(default_factory=FakeRequest)

    @property
    def service(self) -> Any:
        return self.route.service if self.route else None


API = FakeRoute("api", "users")


def scrape(metrics: GatewayMetrics) -> dict[str, Any]:
    """{sample name: {frozenset(labels): value}} from the exposition text."""
    from prometheus_client import generate_latest

    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[frozenset(sample.labels.items())] = sample.value
    return out


def labels(**kw: str) -> frozenset[tuple[str, str]]:
    return frozenset(kw.items())


def test_requests_counted_by_route_service_method_and_class() -> None:
    m = GatewayMetrics()
    for _ in range(3):
        m.observe(FakeCtx(API))
    m.observe(FakeCtx(API, status=503))
    m.observe(FakeCtx(API, status=201, request=FakeRequest("POST", 50)))
    m.observe(FakeCtx(None, status=404, upstream_ms=None))
    got = scrape(m)["apigate_requests_total"]
    base = {"route": "api", "service": "users"}
    assert got[labels(**base, method="GET", status_class="2xx")] == 3
    assert got[labels(**base, method="GET", status_class="5xx")] == 1
    assert got[labels(**base, method="POST", status_class="2xx")] == 1
    assert got[labels(route="", service="", method="GET", status_class="4xx")] == 1
    assert len(got) == 4


def test_non_standard_methods_share_one_label() -> None:
    m = GatewayMetrics()
    for i in range(50):
        m.observe(FakeCtx(API, request=FakeRequest(f"X{i}")))
    got = scrape(m)["apigate_requests_total"]
    assert got == {labels(route="api", service="users", method="OTHER", status_class="2xx"): 50}


def test_histograms_bucket_by_le_and_sum_in_seconds() -> None:
    m = GatewayMetrics()
    for total in (0.05, 1.0, 1.5, 7.0, 99_999.0):  # 1.0 is "le 1 ms" exactly
        m.observe(FakeCtx(API, total_ms=total, upstream_ms=None if total > 10 else total / 2))
    got = scrape(m)
    buckets = got["apigate_request_duration_seconds_bucket"]
    key = {"route": "api", "service": "users"}
    assert buckets[labels(**key, le="0.0001")] == 1
    assert buckets[labels(**key, le="0.001")] == 2
    assert buckets[labels(**key, le="0.0025")] == 3
    assert buckets[labels(**key, le="0.01")] == 4
    assert buckets[labels(**key, le="30")] == 4
    assert buckets[labels(**key, le="+Inf")] == 5
    assert got["apigate_request_duration_seconds_count"][labels(**key)] == 5
    total_s = got["apigate_request_duration_seconds_sum"][labels(**key)]
    assert total_s == pytest.approx((0.05 + 1.0 + 1.5 + 7.0 + 99_999.0) / 1000)
    assert got["apigate_upstream_duration_seconds_count"][labels(**key)] == 4


def test_bytes_in_and_out() -> None:
    m = GatewayMetrics()
    m.observe(FakeCtx(API, bytes_sent=1000, request=FakeRequest("PUT", 300)))
    m.observe(FakeCtx(API, bytes_sent=24))
    got = scrape(m)
    key = labels(route="api", service="users")
    assert got["apigate_response_bytes_total"][key] == 1024
    assert got["apigate_request_bytes_total"][key] == 300


def test_named_counters_for_plugins() -> None:
    m = GatewayMetrics()
    m.inc("ratelimit_rejected", route="api", service="users")
    m.inc("ratelimit_rejected", route="api", service="users")
    m.inc("cache_hits", route="api")
    m.inc("cache_misses", route="api", value=3)
    got = scrape(m)
    assert got["apigate_ratelimit_rejected_total"] == {labels(route="api", service="users"): 2}
    assert got["apigate_cache_hits_total"] == {labels(route="api", service=""): 1}
    assert got["apigate_cache_misses_total"] == {labels(route="api", service=""): 3}
    with pytest.raises(ValueError, match="metric name"):
        m.inc("Bad-Name")


def test_named_counters_are_capped() -> None:
    m = GatewayMetrics()
    for i in range(MAX_NAMED_SERIES + 5):
        m.inc("cache_hits", route=f"r{i}")
    assert len(m.counters) == MAX_NAMED_SERIES
    assert m.dropped_counters == 5


def test_info_and_process_metrics_without_a_gateway() -> None:
    got = scrape(GatewayMetrics())
    assert list(got["apigate_info"]) == [labels(version=__import__("apigate").__version__)]
    assert "process_cpu_seconds_total" in got


def test_quantiles_interpolate_inside_buckets() -> None:
    buckets = [0] * (len(BUCKETS_MS) + 1)
    assert quantile_ms(buckets, 0.5) is None
    i10 = BUCKETS_MS.index(10)
    buckets[i10] = 100  # everything in (5, 10] ms
    assert quantile_ms(buckets, 0.5) == pytest.approx(7.5)
    assert quantile_ms(buckets, 0.99) == pytest.approx(9.95)
    buckets[-1] = 1000  # mostly beyond the last bound: the bound is the answer
    assert quantile_ms(buckets, 0.99) == BUCKETS_MS[-1]


def test_stats_from_per_second_snapshots() -> None:
    m = GatewayMetrics()
    m.snapshot(now=100.0)
    for second in range(1, 4):
        for _ in range(10):
            m.observe(FakeCtx(API, total_ms=4.0))
        m.observe(FakeCtx(API, status=500, total_ms=4.0))
        m.observe(FakeCtx(API, status=502, total_ms=4.0))
        m.snapshot(now=100.0 + second)
    stats = m.stats()
    api = stats["routes"]["api"]
    assert api["total"] == 36
    assert api["requests"] == 36
    assert api["rps"] == pytest.approx(12.0)
    assert api["error_rate"] == pytest.approx(6 / 36, abs=1e-3)
    assert 2.5 < api["p50_ms"] <= 5.0 and 2.5 < api["p99_ms"] <= 5.0
    assert [round(p["time"]) for p in api["series"]] == [101, 102, 103]
    assert api["series"][0]["rps"] == pytest.approx(12.0)


def test_fold_retires_routes_of_old_snapshots() -> None:
    """A reload makes new route objects: the old ones' counts survive under the same names
    and the old objects are no longer referenced."""
    old, new = FakeRoute("api", "users"), FakeRoute("api", "users")
    gateway = SimpleNamespace(
        runtime=SimpleNamespace(routes={"api": new}),
        connections=set(),
        reloads_ok=0,
        reloads_failed=0,
        pools=SimpleNamespace(pools={}),
        services=SimpleNamespace(services={}),
        extensions={},
    )
    m = GatewayMetrics(gateway)  # type: ignore[arg-type]
    m.observe(FakeCtx(old))
    m.observe(FakeCtx(new))
    m.fold()
    assert old not in m.series and new in m.series
    m.observe(FakeCtx(new, status=500))
    got = scrape(m)["apigate_requests_total"]
    assert got[labels(route="api", service="users", method="GET", status_class="2xx")] == 2
    assert got[labels(route="api", service="users", method="GET", status_class="5xx")] == 1


def test_log_levels_per_component() -> None:
    import pytest

    from apigate.observability.logs import parse_log_levels

    assert parse_log_levels("info") == ("info", {})
    assert parse_log_levels("warning,apigate.registry=debug, apigate.proxy=error") == (
        "warning",
        {"apigate.registry": "debug", "apigate.proxy": "error"},
    )
    with pytest.raises(ValueError, match="loud"):
        parse_log_levels("info,apigate.proxy=loud")


@pytest.mark.parametrize("ms", [0.0, 0.05, 0.1, 0.11, 1.0, 7.3, 250.0, BUCKETS_MS[-1], 1e9, -1.0])
def test_bucket_index_is_bisect_left(ms: float) -> None:
    from bisect import bisect_left

    from apigate.observability.series import _bucket

    assert _bucket(ms) == bisect_left(BUCKETS_MS, ms)
