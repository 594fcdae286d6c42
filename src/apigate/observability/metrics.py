"""Gateway metrics: plain counters on the hot path, Prometheus objects only at scrape time.

Per request, `SeriesRecorder.observe(ctx)` (apigate.observability.series, compiled with the
data plane) does dictionary and list arithmetic on a `RouteSeries` per route: a request
counter by (method, status class), two fixed-bucket latency histograms (bucket index by
`bisect`), bytes in and out. No `prometheus_client` call happens per request:
its labelled metrics take a lock and a dict lookup per label set (measured with thread CPU time
on the 2-core test machine: `Counter.labels(...).inc()` 1.8 µs and `Histogram.labels(...)
.observe()` 2.2 µs, against 0.63 µs for the whole of `observe`). The `_Collector` turns the
counters, plus gauges read from the gateway (open connections, pools, instance health and
in-flight, reloads), into metric families when Prometheus scrapes `GET /metrics`.

The built-in by-name counters (KNOWN_COUNTERS) are counted without any call from the plugins:
cache hits, misses and stale answers, retries and rate-limit rejections are read from the
finished exchange into its route's series (see apigate.observability.series), breaker
transitions from the counts each of the gateway's services keeps for its breakers
(`Service.breaker_counts`, apigate.registry.service). `inc()` is the
API of other plugins (`inc("jobs_queued", route=...)`); a plugin's `inc` of a built-in name
adds to that family's samples, so each name is one family.

Label cardinality is bounded: route and service names come from the config, methods outside
the standard set count as OTHER, status is a class (2 for 2xx), and the by-name counters of
other plugins are capped. No paths or client IPs.

For the dashboard, a 1 s timer keeps a ring of per-second snapshots of each route's totals;
`GET /stats` derives requests/s, 5xx share and p50/p99 over the last minute from them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from apigate import __version__
from apigate.observability.series import (
    BUCKETS_MS,
    NB,
    RouteSeries,
    SeriesRecorder,
)
from apigate.periodic import Periodic

if TYPE_CHECKING:
    from apigate.admin.http import AdminRequest, AdminResponse
    from apigate.server import Gateway

log = logging.getLogger("apigate.metrics")

_LE = [f"{b / 1000:g}" for b in BUCKETS_MS] + ["+Inf"]  # exposed in seconds, as is customary
_COUNTER_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")
MAX_NAMED_SERIES = 10_000  # distinct (name, route, service) triples accepted by `inc`
RING_SECONDS = 61  # per-second snapshots kept for /stats (one minute of deltas)

# (time, {route name: (requests, 5xx, total_ms buckets)}): one per second in the /stats ring
Snapshot = tuple[float, dict[str, tuple[int, int, tuple[int, ...]]]]

# Help text of the by-name counters the gateway counts itself (always exposed, as
# `apigate_<name>_total{route, service}`); other names `inc()` bumps get a generic one.
KNOWN_COUNTERS = {
    "ratelimit_rejected": "Requests rejected by a rate limit.",
    "cache_hits": "Responses served from the cache.",
    "cache_misses": "Cacheable requests the cache could not answer.",
    "cache_stale": "Stale cached responses served in place of an upstream error.",
    "breaker_opened": "Circuit breaker transitions to open.",
    "breaker_half_opened": "Circuit breaker transitions to half-open.",
    "breaker_closed": "Circuit breaker transitions to closed.",
    "retries": "Upstream attempts beyond the first.",
}
# The gateway's other families (without `apigate_`): a plugin's `inc` of one of these names made
# a second family of the same name, and Prometheus refuses the whole scrape then.
RESERVED_NAMES = frozenset(
    {
        "info",
        "requests",
        "request_duration_seconds",
        "upstream_duration_seconds",
        "response_bytes",
        "request_bytes",
        "connections_open",
        "config_reloads",
        "cluster_connected",
        "cluster_unshared_changes",
        "pool_connections",
        "pool_reuse_ratio",
        "pool_connections_created",
        "pool_connections_reused",
        "instance_healthy",
        "instance_available",
        "instance_in_flight",
        "breaker_state",
    }
)
# the breaker state a transition enters -> its counter's name
_BREAKER_COUNTERS = {
    "open": "breaker_opened",
    "half_open": "breaker_half_opened",
    "closed": "breaker_closed",
}


class GatewayMetrics:
    """The process's counters, the Prometheus registry that exposes them, the /stats ring."""

    def __init__(self, gateway: Gateway | None = None) -> None:
        self.gateway = gateway
        # per route object (see SeriesRecorder); `fold` retires old snapshots' route objects
        # so that a reload does not keep them alive
        self.recorder = SeriesRecorder()
        self.series: dict[Any, RouteSeries] = self.recorder.series
        self.retired: dict[tuple[str, str], RouteSeries] = {}
        self.counters: dict[tuple[str, str, str], float] = {}
        self.dropped_counters = 0
        self._refused_names: set[str] = set()  # names `inc` refused (each logged once)
        self.started = time.time()
        # (time, {route: (count, errors, total buckets)}) once a second, oldest first
        self.ring: deque[Snapshot] = deque(maxlen=RING_SECONDS)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(self))
        ProcessCollector(registry=self.registry)
        self._ticker = Periodic(self._tick)

    # ------------------------------------------------------------------ hot path
    def observe(self, ctx: Any) -> None:
        """Count one finished exchange (see SeriesRecorder.observe, the hot-path version the
        gateway calls directly)."""
        self.recorder.observe(ctx)

    def inc(self, name: str, route: str = "", service: str = "", value: float = 1.0) -> None:
        """Bump the counter `apigate_<name>_total{route, service}`: the API of third-party
        plugins (`env.shared["metrics"]`). The built-in plugins do not call it (their counts
        are read from the finished exchange); a name of KNOWN_COUNTERS adds to the gateway's
        own count in the same family."""
        key = (name, route, service)
        try:
            self.counters[key] += value
        except KeyError:
            self._new_counter(key, value)

    def _new_counter(self, key: tuple[str, str, str], value: float) -> None:
        name = key[0]
        if not _COUNTER_NAME.match(name) or name in RESERVED_NAMES:
            # (logged once a name, never raised: a plugin's counter must not fail requests)
            if name not in self._refused_names and len(self._refused_names) < 100:
                self._refused_names.add(name)
                why = "the gateway's own" if name in RESERVED_NAMES else "not [a-z][a-z0-9_]*"
                log.warning("metric name %r refused (%s): not counted", name, why)
            self.dropped_counters += 1
            return
        if len(self.counters) >= MAX_NAMED_SERIES:
            self.dropped_counters += 1  # cardinality guard: never grow without bound
            return
        self.counters[key] = value

    # ------------------------------------------------------------------ by name
    def by_name(self) -> dict[tuple[str, str], RouteSeries]:
        """The series keyed by (route name, service name), old snapshots' routes merged in."""
        out: dict[tuple[str, str], RouteSeries] = {}
        merged: set[tuple[str, str]] = set()
        entries = [*self.retired.items(), *((_names(r), s) for r, s in list(self.series.items()))]
        # an aggregate route's calls: their own (route, part service) series, upstream only
        entries += [
            ((key[0], service), part)
            for key, s in entries
            if s.parts
            for service, part in list(s.parts.items())
        ]
        for key, s in entries:
            have = out.get(key)
            if have is None:
                out[key] = s
                continue
            if key not in merged:  # copy before adding, never mutate a live series
                copy = RouteSeries()
                copy.merge(have)
                out[key] = have = copy
                merged.add(key)
            have.merge(s)
        return out

    def fold(self) -> None:
        """Move the series of routes no longer in the current snapshot into `retired`, so that a
        reload does not keep old route objects (and their plugin chains) alive."""
        gw = self.gateway
        if gw is None:
            return
        current = {id(r) for r in gw.runtime.routes.values()}
        for route in [r for r in self.series if r is not None and id(r) not in current]:
            s = self.series.pop(route)
            key = _names(route)
            retired = self.retired.get(key)
            if retired is None:
                self.retired[key] = s
            else:
                retired.merge(s)

    # ------------------------------------------------------------------ per-second ring
    def snapshot(self, now: float | None = None) -> None:
        """Record every route's running totals (the 1 s timer calls this)."""
        by_route: dict[str, tuple[int, int, tuple[int, ...]]] = {}
        for (route, _service), s in self.by_name().items():
            prev = by_route.get(route)
            if prev is None:
                by_route[route] = (s.count, s.errors, tuple(s.total))
            else:  # a route name that moved to another service in a newer snapshot
                merged = tuple(a + b for a, b in zip(prev[2], s.total, strict=True))
                by_route[route] = (prev[0] + s.count, prev[1] + s.errors, merged)
        self.ring.append((time.time() if now is None else now, by_route))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.snapshot()
        self._ticker.start(loop)

    def _tick(self) -> None:
        self.fold()
        self.snapshot()

    def stop(self) -> None:
        self._ticker.stop()

    def stats(
        self,
        window: int = 60,
        point_window: int = 5,
        *,
        ring: list[Snapshot] | None = None,
        connections: int | None = None,
    ) -> dict[str, Any]:
        """Per route: totals, rate, 5xx share and p50/p99 over the last `window` seconds, and a
        per-second series where each point covers the trailing `point_window` seconds. `ring`
        and `connections`: the whole node's under `--workers N` (default: this process's)."""
        ring = list(self.ring) if ring is None else ring
        routes: dict[str, Any] = {}
        names = ring[-1][1] if ring else {}
        for name in names:
            routes[name] = _route_stats(ring, name, window, point_window)
        gw = self.gateway
        return {
            "time": time.time(),
            "interval_s": 1,
            "window_s": window,
            "point_window_s": point_window,
            "uptime_s": round(time.time() - self.started, 1),
            "connections": (
                connections if connections is not None else len(gw.connections) if gw else 0
            ),
            "routes": routes,
        }

    # ------------------------------------------------------------------ admin endpoints
    async def handle_metrics(self, req: AdminRequest) -> AdminResponse:
        from apigate.admin.http import AdminResponse

        encode, content_type = choose_encoder(req.headers.get("accept", ""))
        return AdminResponse(200, encode(self.registry), content_type)

    async def handle_stats(self, req: AdminRequest) -> AdminResponse:
        from apigate.admin.http import json_response

        return json_response(self.stats())

    def __repr__(self) -> str:
        total = sum(s.count for s in self.by_name().values())
        return f"<GatewayMetrics {len(self.series)} series, {total} requests>"


def _names(route: Any) -> tuple[str, str]:
    if route is None:
        return ("", "")
    service = route.service
    return (route.name, service.name if service is not None else "")


# ---------------------------------------------------------------------- /stats arithmetic
def quantile_ms(buckets: list[int] | tuple[int, ...], q: float) -> float | None:
    """The q-quantile of a non-cumulative bucket histogram, interpolated inside its bucket
    (as Prometheus' histogram_quantile); None when empty."""
    total = sum(buckets)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i >= len(BUCKETS_MS):
                return float(BUCKETS_MS[-1])  # beyond the last bound: the bound is all we know
            lower = BUCKETS_MS[i - 1] if i > 0 else 0.0
            return lower + (BUCKETS_MS[i] - lower) * (rank - seen) / n
        seen += n
    return float(BUCKETS_MS[-1])


_EMPTY: tuple[int, int, tuple[int, ...]] = (0, 0, (0,) * NB)


def _delta(ring: list[Snapshot], name: str, end: int, span: int) -> dict[str, Any]:
    start = max(0, end - span)
    t1, now = ring[end]
    t0, then = ring[start]
    c1, e1, b1 = now.get(name, _EMPTY)
    c0, e0, b0 = then.get(name, _EMPTY)
    dt = t1 - t0
    n = c1 - c0
    diff = [a - b for a, b in zip(b1, b0, strict=True)]
    p50, p99 = quantile_ms(diff, 0.5), quantile_ms(diff, 0.99)
    return {
        "time": round(t1, 3),
        "requests": n,
        "rps": round(n / dt, 3) if dt > 0 else 0.0,
        "error_rate": round((e1 - e0) / n, 4) if n else 0.0,
        "p50_ms": round(p50, 3) if p50 is not None else None,
        "p99_ms": round(p99, 3) if p99 is not None else None,
    }


def _route_stats(ring: list[Snapshot], name: str, window: int, point_window: int) -> dict[str, Any]:
    last = len(ring) - 1
    summary = _delta(ring, name, last, window)
    summary["total"] = ring[last][1][name][0]
    summary["series"] = [
        _delta(ring, name, i, point_window) for i in range(max(1, last - window + 1), last + 1)
    ]
    return summary


# ---------------------------------------------------------------------- scrape time
class _Collector(Collector):
    """Builds the metric families from `GatewayMetrics` and the live gateway at scrape time."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        series = m.by_name()
        yield from self._traffic(series)
        yield from self._named(m, series)
        info = GaugeMetricFamily("apigate_info", "apigate version.", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        if m.gateway is not None:
            yield from _gateway_gauges(m.gateway)

    @staticmethod
    def _traffic(series: dict[tuple[str, str], RouteSeries]) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "apigate_requests",
            "Requests by route, service, method and status class.",
            labels=["route", "service", "method", "status_class"],
        )
        total = HistogramMetricFamily(
            "apigate_request_duration_seconds",
            "Time from the request head to the end of the response.",
            labels=["route", "service"],
        )
        upstream = HistogramMetricFamily(
            "apigate_upstream_duration_seconds",
            "Time from sending the request upstream to the upstream's response head.",
            labels=["route", "service"],
        )
        bytes_out = CounterMetricFamily(
            "apigate_response_bytes",
            "Response body bytes sent to clients.",
            labels=["route", "service"],
        )
        bytes_in = CounterMetricFamily(
            "apigate_request_bytes",
            "Request body bytes read from clients.",
            labels=["route", "service"],
        )
        for (route, service), s in series.items():
            labels = [route, service]
            for method, row in list(s.methods.items()):
                for cls, n in enumerate(row):
                    if n:
                        requests.add_metric([route, service, method, f"{cls}xx"], n)
            upstream.add_metric(labels, _cumulative(s.upstream), s.upstream_sum / 1000)
            if not s.count:  # an aggregate's calls to a part service: no requests of its own
                continue
            total.add_metric(labels, _cumulative(s.total), s.total_sum / 1000)
            bytes_out.add_metric(labels, s.bytes_out)
            bytes_in.add_metric(labels, s.bytes_in)
        yield from (requests, total, upstream, bytes_out, bytes_in)

    @staticmethod
    def _named(m: GatewayMetrics, series: dict[tuple[str, str], RouteSeries]) -> Iterator[Metric]:
        """The by-name counters: the gateway's own (always, one family each) with what plugins
        added to the same names through `inc`, then the plugins' other names."""
        values = _builtin_counts(series, m.gateway)
        for (name, route, service), value in list(m.counters.items()):
            by_labels = values.setdefault(name, {})
            by_labels[(route, service)] = by_labels.get((route, service), 0.0) + value
        for name, by_labels in sorted(values.items()):
            doc = KNOWN_COUNTERS.get(name, f"Count of {name.replace('_', ' ')}.")
            family = CounterMetricFamily(f"apigate_{name}", doc, labels=["route", "service"])
            for (route, service), value in sorted(by_labels.items()):
                family.add_metric([route, service], value)
            yield family


def _builtin_counts(
    series: dict[tuple[str, str], RouteSeries], gw: Gateway | None
) -> dict[str, dict[tuple[str, str], float]]:
    """{counter name: {(route, service): value}} of the counters the gateway keeps itself.
    A route's three cache counters go together once it has any (a hit ratio needs both
    sides); breakers' by service (route ""), the three together likewise."""
    values: dict[str, dict[tuple[str, str], float]] = {name: {} for name in KNOWN_COUNTERS}
    for key, s in series.items():
        if s.cache_hits or s.cache_misses or s.cache_stale:
            values["cache_hits"][key] = s.cache_hits
            values["cache_misses"][key] = s.cache_misses
            values["cache_stale"][key] = s.cache_stale
        if s.retries:
            values["retries"][key] = s.retries
        if s.ratelimit_rejected:
            values["ratelimit_rejected"][key] = s.ratelimit_rejected
    services = list(gw.services.services.items()) if gw is not None else []
    for service, svc in services:
        counts: dict[str, int] = getattr(svc, "breaker_counts", None) or {}
        for state, n in list(counts.items()):
            name = _BREAKER_COUNTERS.get(state)
            if name is None:
                continue
            for other in _BREAKER_COUNTERS.values():
                values[other].setdefault(("", service), 0)
            values[name][("", service)] = n
    return values


def _cumulative(buckets: list[int]) -> list[tuple[str, float]]:
    out: list[tuple[str, float]] = []
    running = 0
    for le, n in zip(_LE, buckets, strict=True):
        running += n
        out.append((le, running))
    return out


def _gateway_gauges(gw: Gateway) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        "apigate_connections_open", "Client connections open now.", value=len(gw.connections)
    )
    reloads = CounterMetricFamily(
        "apigate_config_reloads", "Config reloads by result.", labels=["result"]
    )
    reloads.add_metric(["ok"], gw.reloads_ok)
    reloads.add_metric(["failed"], gw.reloads_failed)
    yield reloads
    cluster = gw.extensions.get("cluster")
    if cluster is not None:  # store: redis://
        yield GaugeMetricFamily(
            "apigate_cluster_connected",
            "1 while this node follows the other nodes' changes through Redis.",
            value=int(cluster.connected),
        )
        yield GaugeMetricFamily(
            "apigate_cluster_unshared_changes",
            "Registry changes made on this node that Redis has not taken yet.",
            value=len(cluster.unshared),
        )
    yield from _pool_gauges(gw)
    yield from _instance_gauges(gw)


_POOL_LABELS = ["service", "instance", "pool"]


def _pool_gauges(gw: Gateway) -> Iterator[Metric]:
    conns = GaugeMetricFamily(
        "apigate_pool_connections",
        "Upstream connections by pool (one per service instance) and state.",
        labels=["service", "instance", "pool", "state"],
    )
    ratio = GaugeMetricFamily(
        "apigate_pool_reuse_ratio",
        "Share of upstream requests sent on a reused connection.",
        labels=_POOL_LABELS,
    )
    created = CounterMetricFamily(
        "apigate_pool_connections_created", "Upstream connections opened.", labels=_POOL_LABELS
    )
    reused = CounterMetricFamily(
        "apigate_pool_connections_reused",
        "Idle upstream connections reused.",
        labels=_POOL_LABELS,
    )
    for pool in list(gw.pools.pools.values()):
        idle = len(pool.idle)
        labels = [pool.service, pool.instance, pool.key]
        conns.add_metric([*labels, "active"], max(0, pool.total - idle))
        conns.add_metric([*labels, "idle"], idle)
        ratio.add_metric(labels, pool.reuse_ratio)
        created.add_metric(labels, pool.created)
        reused.add_metric(labels, pool.reused)
    yield from (conns, ratio, created, reused)


_BREAKER_STATES = ("closed", "open", "half_open")


def _instance_gauges(gw: Gateway) -> Iterator[Metric]:
    labels = ["service", "instance"]
    healthy = GaugeMetricFamily(
        "apigate_instance_healthy", "1 when the instance is healthy, 0 otherwise.", labels=labels
    )
    available = GaugeMetricFamily(
        "apigate_instance_available",
        "1 when the balancer may pick the instance (healthy, not draining, weight > 0).",
        labels=labels,
    )
    in_flight = GaugeMetricFamily(
        "apigate_instance_in_flight", "Requests in flight to the instance.", labels=labels
    )
    breaker = GaugeMetricFamily(
        "apigate_breaker_state",
        "1 for the circuit breaker's current state.",
        labels=["service", "state"],
    )
    for name, svc in list(gw.services.services.items()):
        for inst in svc.listed_instances():
            healthy.add_metric([name, inst.id], 1 if inst.healthy else 0)
            available.add_metric([name, inst.id], 1 if inst.available else 0)
            in_flight.add_metric([name, inst.id], inst.in_flight)
        state = _breaker_state(svc)
        if state is not None:
            for candidate in _BREAKER_STATES:
                breaker.add_metric([name, candidate], 1 if state == candidate else 0)
    yield from (healthy, available, in_flight, breaker)


def _breaker_state(svc: Any) -> str | None:
    """The service's breaker state when a breaker exists (resilience/ adds `svc.breaker`)."""
    state = getattr(getattr(svc, "breaker", None), "state", None)
    if state is None:
        return None
    text = str(getattr(state, "value", state)).lower().replace("-", "_")
    return text if text in _BREAKER_STATES else None


# ---------------------------------------------------------------------- wiring
async def attach_metrics(gateway: Gateway) -> None:
    """Create the process's metrics, serve `GET /metrics` and `GET /stats` on the admin API.

    Must run after `attach_admin` (it adds routes to `gateway.extensions["admin_api"]`).
    Plugins reach the object as `env.shared["metrics"]` (e.g. to call `inc`; the built-in
    plugins call nothing: what they did is read from the finished exchange).
    """
    if "metrics" in gateway.extensions:
        return
    metrics = GatewayMetrics(gateway)
    gateway.extensions["metrics"] = metrics
    gateway.observers.append(metrics.recorder.observe)  # compiled: no interpreted hop
    gateway.env.shared["metrics"] = metrics
    api = gateway.extensions.get("admin_api")
    if api is not None:
        api.add_route("GET", "/metrics", metrics.handle_metrics)
        api.add_route("GET", "/stats", metrics.handle_stats)

    async def on_start(gw: Gateway) -> None:
        metrics.start(gw.loop)

    async def on_drained(gw: Gateway) -> None:
        metrics.stop()  # (the drain's requests are counted: /metrics is served meanwhile)

    gateway.on_start.append(on_start)
    gateway.on_drained.append(on_drained)
