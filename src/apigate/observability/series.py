"""Per-route request counters: what `GatewayMetrics` (apigate.observability.metrics) counts
on every request, kept apart so that it is compiled with the data plane (apigate.buildinfo).

`SeriesRecorder.observe(ctx)` is the gateway's per-request observer: dictionary and list
arithmetic on one `RouteSeries` per route; no `prometheus_client` call happens per request.

Besides the traffic itself, it counts what the finished exchange already holds, so that no
plugin has to call into the metrics: the cache's word (`ctx.cache_status`), retries
(`ctx.retries`), a rate limiter's 429 and, for an aggregate route, its part calls' latencies.
A plain proxied request pays two attribute reads and two comparisons for them.
"""

from __future__ import annotations

from typing import Any, Final

from apigate.plugins.rate_limit_local import REJECTED as RATE_LIMITED
from apigate.proxy.exchange import ProxyExchange

# Upper bounds (ms) of the latency buckets; one more bucket holds everything above (+Inf).
BUCKETS_MS: Final[tuple[float, ...]] = (
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    25,
    50,
    100,
    250,
    500,
    1000,
    2500,
    5000,
    10000,
    30000,
)
NB: Final = len(BUCKETS_MS) + 1
CLASSES: Final = 10  # status // 100 (0: no status, e.g. the client left before an answer)
METHODS: Final = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT"})
# `ctx.vars` key of an aggregate's part calls that got a response head: [(service name, ms from
# sending the request to the head)], appended by apigate.proxy.aggregate
PART_LATENCIES: Final = "part_upstream_ms"


class RouteSeries:
    """Counters of one route: mutated in place by `observe`.

    Counts and 5xx are not kept apart: they are the sums of `total` and of `methods[*][5]`,
    computed at scrape time rather than paid for per request."""

    __slots__ = (
        "bytes_in",
        "bytes_out",
        "cache_hits",
        "cache_misses",
        "cache_stale",
        "methods",
        "parts",
        "ratelimit_rejected",
        "retries",
        "total",
        "total_sum",
        "upstream",
        "upstream_sum",
    )

    def __init__(self) -> None:
        self.methods: dict[str, list[int]] = {}  # method -> count per status class (index 2: 2xx)
        self.total = [0] * NB  # non-cumulative bucket counts of total_ms
        self.total_sum = 0.0
        self.upstream = [0] * NB  # of upstream_ms, for requests that reached an upstream
        self.upstream_sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.cache_hits = 0  # ctx.cache_status HIT: answered from the cache
        self.cache_misses = 0  # MISS: looked up, not found fresh, asked upstream
        self.cache_stale = 0  # STALE: a stale entry in place of an upstream error
        self.retries = 0  # upstream attempts beyond the first
        self.ratelimit_rejected = 0  # 429s of the route's rate limiter
        # an aggregate route's calls, by part service: only `upstream` and `upstream_sum` used
        self.parts: dict[str, RouteSeries] | None = None

    @property
    def count(self) -> int:
        return sum(self.total)

    @property
    def errors(self) -> int:
        return sum(row[5] for row in self.methods.values())

    def merge(self, other: RouteSeries) -> None:
        for method, row in other.methods.items():
            mine = self.methods.setdefault(method, [0] * CLASSES)
            for i, n in enumerate(row):
                mine[i] += n
        for i in range(NB):
            self.total[i] += other.total[i]
            self.upstream[i] += other.upstream[i]
        self.total_sum += other.total_sum
        self.upstream_sum += other.upstream_sum
        self.bytes_in += other.bytes_in
        self.bytes_out += other.bytes_out
        self.cache_hits += other.cache_hits
        self.cache_misses += other.cache_misses
        self.cache_stale += other.cache_stale
        self.retries += other.retries
        self.ratelimit_rejected += other.ratelimit_rejected
        if other.parts:
            mine_parts = self.parts
            if mine_parts is None:
                mine_parts = self.parts = {}
            for service, theirs in other.parts.items():
                part = mine_parts.get(service)
                if part is None:
                    part = mine_parts[service] = RouteSeries()
                part.merge(theirs)

    def count_upstream(self, ms: float) -> None:
        self.upstream[_bucket(ms)] += 1
        self.upstream_sum += ms


def _bucket(ms: float) -> int:
    """bisect_left(BUCKETS_MS, ms): the index of the first bound at or above `ms`, the bounds
    written out as literals (test_metrics checks every one against BUCKETS_MS). Compiled, each
    test is one float comparison, where a loop over the tuple unboxed every bound it passed (a
    1 ms request read four per histogram: a bisect call is a generic call, no better)."""
    if ms <= 1.0:
        if ms <= 0.25:
            return 0 if ms <= 0.1 else 1
        return 2 if ms <= 0.5 else 3
    if ms <= 50.0:
        if ms <= 5.0:
            return 4 if ms <= 2.5 else 5
        if ms <= 10.0:
            return 6
        return 7 if ms <= 25.0 else 8
    if ms <= 1000.0:
        if ms <= 100.0:
            return 9
        if ms <= 250.0:
            return 10
        return 11 if ms <= 500.0 else 12
    if ms <= 5000.0:
        return 13 if ms <= 2500.0 else 14
    if ms <= 10000.0:
        return 15
    return 16 if ms <= 30000.0 else 17


def _count_cache(s: RouteSeries, word: str) -> None:
    if word == "HIT":
        s.cache_hits += 1
    elif word == "MISS":
        s.cache_misses += 1
    elif word == "STALE":
        s.cache_stale += 1
    # BYPASS: the request was not one the cache could answer (a POST, `no-store`)


def _count_parts(s: RouteSeries, parts: list[tuple[str, float]]) -> None:
    """An aggregate's part calls: each its service's upstream latency under the route."""
    by_service = s.parts
    if by_service is None:
        by_service = s.parts = {}
    for service, ms in parts:
        part = by_service.get(service)
        if part is None:
            part = by_service[service] = RouteSeries()
        part.count_upstream(ms)


def _count_unproxied(s: RouteSeries, ctx: Any, status: int) -> None:
    """A request that got no upstream response head of its own (`upstream_ms` None): a
    plugin's answer (401, 429, a cache hit), an error, or an aggregate's."""
    if status == 429 and ctx.vars.get(RATE_LIMITED):  # (set by the limiter's refusal)
        s.ratelimit_rejected += 1
    route = ctx.route
    if route is not None and route.service is None:  # an aggregate route: its parts' calls
        parts = ctx.vars.get(PART_LATENCIES)
        if parts:
            _count_parts(s, parts)


def _count_new(methods: dict[str, list[int]], method: str, status: int) -> None:
    if method not in METHODS:
        method = "OTHER"
    row = methods.get(method)
    if row is None:
        row = methods[method] = [0] * CLASSES
    row[min(status // 100, CLASSES - 1)] += 1


class SeriesRecorder:
    """The series of every route, keyed by the CompiledRoute object itself (None: no route
    matched). Hashing an object by identity is cheaper than building and hashing a (route,
    service) tuple of names (measured: ~0.15 µs of what was ~0.85 µs per call)."""

    def __init__(self) -> None:
        self.series: dict[Any, RouteSeries] = {}

    def observe(self, ctx: Any) -> None:
        """Count one finished exchange (called once, from the exchange's completion, once
        `ctx.total_ms` is set). `ctx` is Any, not the exchange's class, because tests count
        fakes; the gateway's own exchanges are read as what they are: compiled, a typed read is
        a load where an untyped one is a lookup by name (~10 of them per request)."""
        if isinstance(ctx, ProxyExchange):
            req = ctx.request
            status = ctx.status
            upstream_ms = ctx.upstream_ms
            s = self.count(
                ctx.route,
                req.method,
                status,
                ctx.total_ms or 0.0,
                upstream_ms,
                ctx.bytes_sent,
                req.body_received,
            )
            cache_status = ctx.cache_status
            retries = ctx.retries
        else:  # (other names: compiled, a local keeps the type of its first binding)
            fake: Any = ctx.request
            status = ctx.status
            upstream_ms = ctx.upstream_ms
            s = self.count(
                ctx.route,
                fake.method,
                status,
                ctx.total_ms,
                upstream_ms,
                ctx.bytes_sent,
                fake.body_received,
            )
            cache_status = ctx.cache_status
            retries = ctx.retries
        if cache_status is not None:
            _count_cache(s, cache_status)
        if retries:
            s.retries += retries
        if upstream_ms is None:
            _count_unproxied(s, ctx, status)

    def count(
        self,
        route: object,
        method: str,
        status: int,
        total_ms: float,
        upstream_ms: float | None,
        sent: int,
        received: int | None,
    ) -> RouteSeries:
        s = self.series.get(route)
        if s is None:
            s = self.series[route] = RouteSeries()
        # (each count as `a[i] = a[i] + 1`: compiled, `a[i] += 1` is a generic in-place add)
        row = s.methods.get(method)
        if row is not None and 0 <= status < 1000:
            i = status // 100
            row[i] = row[i] + 1
        else:  # first of its kind: a non-standard method counts as OTHER
            _count_new(s.methods, method, status)
        i = _bucket(total_ms)
        s.total[i] = s.total[i] + 1
        s.total_sum += total_ms
        if upstream_ms is not None:
            i = _bucket(upstream_ms)
            s.upstream[i] = s.upstream[i] + 1
            s.upstream_sum += upstream_ms
        s.bytes_out += sent
        if received:
            s.bytes_in += received
        return s
