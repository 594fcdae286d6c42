"""GatewayMetrics without sockets: fake exchanges in, Prometheus text and /stats out."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from apigate.observability.metrics import (
    BUCKETS_MS,
    MAX_NAMED_SERIES,
    GatewayMetrics,
    quantile_ms,
)
from apigate.plugins.rate_limit_local import REJECTED as RATE_LIMITED


class FakeRoute:
    """Hashable by identity, like the runtime's CompiledRoute."""

    def __init__(self, name: str, service: str | None) -> None:
        self.name = name
        self.service = SimpleNamespace(name=service) if service else None


@dataclass
class FakeRequest:
    method: str = "GET"
    body_received: int = 0


@dataclass
class FakeCtx:
    route: FakeRoute | None
    status: int = 200
    total_ms: float = 1.0
    upstream_ms: float | None = 0.5
    bytes_sent: int = 100
    request: FakeRequest = field(default_factory=FakeRequest)
    # what else the exchange holds when it is over: the cache's word, retries, plugins' vars
    cache_status: str | None = None
    retries: int = 0
    vars: dict[str, Any] = field(default_factory=dict)

    @property
    def service(self) -> Any:
        return self.route.service if self.route else None


API = FakeRoute("api", "users")


def fake_gateway(
    routes: dict[str, Any] | None = None, services: dict[str, Any] | None = None
) -> Any:
    """What the collector reads of a gateway: the current routes (`fold` keeps their series),
    the services (breaker counts, instances), no connections, pools or reloads."""
    return SimpleNamespace(
        runtime=SimpleNamespace(routes=routes or {}),
        connections=set(),
        reloads_ok=0,
        reloads_failed=0,
        pools=SimpleNamespace(pools={}),
        services=SimpleNamespace(services=services or {}),
        extensions={},
    )


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


def test_a_plugins_bad_or_reserved_counter_name_is_refused_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """`inc("tenant-refused")` raised inside a hook (the request got a 500), and
    `inc("requests")` made a second apigate_requests family: Prometheus refuses the whole
    scrape then (plugin-author audit)."""
    m = GatewayMetrics()
    m.inc("cache_hits", route="api")
    for _ in range(3):
        m.inc("Bad-Name")
        m.inc("requests", route="api")
    text = generate_latest(m.registry).decode()
    assert text.count("# TYPE apigate_requests ") <= 1  # (none here: no traffic yet)
    assert m.counters == {("cache_hits", "api", ""): 1.0} and m.dropped_counters == 6
    refused = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(refused) == 2  # once a name


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
    m = GatewayMetrics(fake_gateway(routes={"api": new}))
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


# every bound, just below and just above it, and values between and beyond them all
_AROUND_BOUNDS = sorted(
    {x for b in BUCKETS_MS for x in (float(b), b * 0.999, b * 1.001)}
    | {0.0, 0.05, 0.11, 7.3, 1e9, -1.0}
)


@pytest.mark.parametrize("ms", _AROUND_BOUNDS)
def test_bucket_index_is_bisect_left(ms: float) -> None:
    from bisect import bisect_left

    from apigate.observability.series import _bucket

    assert _bucket(ms) == bisect_left(BUCKETS_MS, ms)


# ---------------------------------------------------------------------- review: built-in counters
def families(metrics: GatewayMetrics) -> list[str]:
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    return [f.name for f in text_string_to_metric_families(text)]


def test_cache_words_and_retries_are_counted_per_route() -> None:
    m = GatewayMetrics()
    catalog = FakeRoute("catalog", "items")
    for word, times in (("HIT", 3), ("MISS", 2), ("STALE", 1), ("BYPASS", 4), (None, 1)):
        for _ in range(times):
            m.observe(FakeCtx(catalog, upstream_ms=None, cache_status=word))
    m.observe(FakeCtx(API, retries=2))
    m.observe(FakeCtx(API, status=503, retries=1))
    m.observe(FakeCtx(API))
    got = scrape(m)
    where = labels(route="catalog", service="items")
    assert got["apigate_cache_hits_total"] == {where: 3}
    assert got["apigate_cache_misses_total"] == {where: 2}
    assert got["apigate_cache_stale_total"] == {where: 1}
    assert got["apigate_retries_total"] == {labels(route="api", service="users"): 3}


def test_rate_limit_rejections_are_the_limiters_own_429s() -> None:
    """A 429 the rate limiter answered (it marks the request it refuses). An upstream's 429,
    or another plugin's, is not one."""
    m = GatewayMetrics()
    route = FakeRoute("search", "idx")
    for _ in range(3):
        m.observe(FakeCtx(route, status=429, upstream_ms=None, vars={RATE_LIMITED: True}))
    m.observe(FakeCtx(route, vars={"rate_limit": 10}))
    m.observe(FakeCtx(route, status=429, upstream_ms=2.0, vars={"rate_limit": 10}))
    m.observe(FakeCtx(API, status=429, upstream_ms=2.0))
    m.observe(FakeCtx(FakeRoute("quota", "s"), status=429, upstream_ms=None))  # a plugin's
    m.observe(FakeCtx(None, status=404, upstream_ms=None))
    assert scrape(m)["apigate_ratelimit_rejected_total"] == {
        labels(route="search", service="idx"): 3
    }


def test_a_plugins_counter_of_a_built_in_name_joins_its_family() -> None:
    """`inc()` stays the plugins' API; a name the gateway counts itself is one family, whose
    samples add both up (two families of one name are invalid exposition)."""
    m = GatewayMetrics()
    catalog = FakeRoute("catalog", "items")
    m.observe(FakeCtx(catalog, cache_status="HIT"))
    m.inc("cache_hits", route="catalog", service="items", value=2)
    m.inc("cache_hits", route="other", service="items")
    m.inc("retries", route="api", service="users")
    m.observe(FakeCtx(API, retries=1))
    names = families(m)
    assert len(names) == len(set(names))
    got = scrape(m)
    assert got["apigate_cache_hits_total"] == {
        labels(route="catalog", service="items"): 3,
        labels(route="other", service="items"): 1,
    }
    assert got["apigate_retries_total"] == {labels(route="api", service="users"): 2}


def test_built_in_counters_survive_a_reload() -> None:
    old, new = FakeRoute("api", "users"), FakeRoute("api", "users")
    m = GatewayMetrics(fake_gateway(routes={"api": new}))
    for route in (old, new):
        m.observe(FakeCtx(route, cache_status="HIT", retries=1))
        m.observe(FakeCtx(route, status=429, upstream_ms=None, vars={RATE_LIMITED: True}))
    m.fold()
    m.observe(FakeCtx(new, cache_status="MISS"))
    got = scrape(m)
    where = labels(route="api", service="users")
    assert got["apigate_cache_hits_total"][where] == 2
    assert got["apigate_cache_misses_total"][where] == 1
    assert got["apigate_retries_total"][where] == 2
    assert got["apigate_ratelimit_rejected_total"][where] == 2


def test_breaker_transitions_are_exposed_per_service() -> None:
    from apigate.config.schema import CircuitBreakerConfig
    from apigate.resilience.circuit_breaker import CircuitBreaker

    now = [0.0]
    config = CircuitBreakerConfig(consecutive_failures=1, open_for=1.0, half_open_requests=1)
    counts: dict[str, int] = {}
    breaker = CircuitBreaker("metrics-unit-cb", config, clock=lambda: now[0], counts=counts)
    breaker.record(False)
    now[0] = 2.0
    assert breaker.allow()
    breaker.record(True)
    svc = SimpleNamespace(breaker=breaker, breaker_counts=counts, listed_instances=list)
    got = scrape(GatewayMetrics(fake_gateway(services={"metrics-unit-cb": svc})))
    where = labels(route="", service="metrics-unit-cb")
    assert got["apigate_breaker_opened_total"][where] == 1
    assert got["apigate_breaker_half_opened_total"][where] == 1
    assert got["apigate_breaker_closed_total"][where] == 1


def test_breaker_transitions_of_one_gateway_are_not_in_anothers_metrics() -> None:
    from apigate.config.schema import CircuitBreakerConfig
    from apigate.resilience.circuit_breaker import CircuitBreaker

    config = CircuitBreakerConfig(consecutive_failures=1)
    gateways, metrics = [], []
    for _ in range(2):
        counts: dict[str, int] = {}
        breaker = CircuitBreaker("api", config, counts=counts)
        svc = SimpleNamespace(breaker=breaker, breaker_counts=counts, listed_instances=list)
        gateways.append(svc)
        metrics.append(GatewayMetrics(fake_gateway(services={"api": svc})))
    gateways[0].breaker.record(False)  # only gateway A's breaker opens
    where = labels(route="", service="api")
    assert scrape(metrics[0])["apigate_breaker_opened_total"][where] == 1
    assert scrape(metrics[1]).get("apigate_breaker_opened_total", {}).get(where, 0) == 0
    assert "apigate_breaker_opened_total" not in scrape(GatewayMetrics())


def test_an_aggregates_part_calls_are_upstream_latencies_of_their_services() -> None:
    """The route's calls to each part's service, as for a proxied request: the time to the
    part's response head, under the aggregate route and the part's service."""
    m = GatewayMetrics()
    agg = FakeRoute("agg", None)
    parts = [("users", 3.0), ("orders", 30.0)]
    m.observe(FakeCtx(agg, upstream_ms=None, total_ms=31.0, vars={"part_upstream_ms": parts}))
    m.observe(FakeCtx(agg, upstream_ms=None, vars={"part_upstream_ms": [("users", 4.0)]}))
    got = scrape(m)
    count = got["apigate_upstream_duration_seconds_count"]
    assert count[labels(route="agg", service="users")] == 2
    assert count[labels(route="agg", service="orders")] == 1
    assert got["apigate_upstream_duration_seconds_sum"][
        labels(route="agg", service="orders")
    ] == pytest.approx(0.03)
    assert count[labels(route="agg", service="")] == 0  # the route itself calls nobody
    # the client's requests are the route's, once each
    assert got["apigate_request_duration_seconds_count"] == {labels(route="agg", service=""): 2}
