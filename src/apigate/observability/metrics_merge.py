"""The node's metrics under `--workers N`: every worker's families, merged into one set.

Each worker counts its own traffic (apigate.observability.metrics). Worker 0, which serves the
node's admin listener, reads the others' at scrape time and merges them here:

- counters and histograms (and summaries) are summed per label set: the node's request count
  is the sum of its workers';
- gauges that are amounts are summed (open connections, requests in flight to an instance,
  upstream connections, the processes' memory and file descriptors);
- `apigate_info` is the same in every worker: one copy;
- every other gauge is a worker's own view (an instance's health as its checks saw it, its
  breaker's state, its Redis link, its pools' reuse ratio, its process start time): each
  worker's sample is kept, with a `worker` label naming it.

A worker's families that are not fresh (it did not answer this scrape, or it exited and a new
process took its place) contribute their counters only, at the last values read, so that the
node's counters never go down while one of its workers is slow or restarting: Prometheus
would take a lower total for a reset and count the whole total again as new.

`merge_rings` does the same for the dashboard's per-second ring (`GET /stats`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

WORKER_LABEL = "worker"
SUMMED_TYPES = frozenset({"counter", "histogram", "summary", "gaugehistogram"})
SUMMED_GAUGES = frozenset(
    {
        "apigate_connections_open",
        "apigate_instance_in_flight",
        "apigate_pool_connections",
        "process_resident_memory_bytes",
        "process_virtual_memory_bytes",
        "process_open_fds",
    }
)
SHARED_GAUGES = frozenset({"apigate_info"})

# (time, {route: (requests, 5xx, total_ms buckets)}): apigate.observability.metrics.Snapshot
RouteTotals = dict[str, tuple[int, int, tuple[int, ...]]]
Snapshot = tuple[float, RouteTotals]
_Key = tuple[str, tuple[tuple[str, str], ...]]  # (sample name, sorted labels)


@dataclass
class WorkerMetrics:
    worker: str  # the `worker` label's value: the worker's index
    families: list[Metric]
    fresh: bool = True  # False: last values read of a worker that is gone or did not answer


def parse_exposition(text: str) -> list[Metric]:
    """Prometheus text format (what `GET /metrics` answers) as metric families."""
    return list(text_string_to_metric_families(text))


def merge_rule(family: Metric) -> str:
    """`sum`, `first` (one copy) or `worker` (each worker's own, labelled)."""
    if family.type in SUMMED_TYPES or family.name in SUMMED_GAUGES:
        return "sum"
    if family.name in SHARED_GAUGES:
        return "first"
    return "worker"


def merge_families(parts: Sequence[WorkerMetrics]) -> list[Metric]:
    """One family per name, in the order the names first appear."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[_Key, float]] = {}
    for part in parts:
        for family in part.families:
            if not part.fresh and family.type not in SUMMED_TYPES:
                continue  # a gauge: a state or an amount nobody vouches for now
            rule = merge_rule(family)
            if family.name not in merged:
                merged[family.name] = Metric(
                    family.name, family.documentation, family.type, family.unit
                )
            into = values.setdefault(family.name, {})
            for sample in family.samples:
                named = dict(sample.labels)
                if rule == "worker":
                    named[WORKER_LABEL] = part.worker
                key = (sample.name, tuple(sorted(named.items())))
                if rule == "first":
                    into.setdefault(key, sample.value)
                else:
                    into[key] = into.get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


def counters_only(families: Sequence[Metric]) -> list[Metric]:
    """The families that are summed (what an exited worker leaves to the node's totals)."""
    return [f for f in families if f.type in SUMMED_TYPES]


class FixedCollector(Collector):
    """Exposes families made beforehand (a registry wants a collector)."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge_rings(rings: Sequence[Sequence[Snapshot]]) -> list[Snapshot]:
    """The node's per-second ring: the first ring's times; at each position, the sum of every
    ring's snapshot as far from its newest. The workers tick once a second each, not in step,
    so a point mixes snapshots up to a second apart: near enough for a dashboard's rates and
    percentiles. A ring shorter than the first (a restarted worker) repeats its oldest
    snapshot further back: its requests before that are not in its totals anyway."""
    if not rings:
        return []
    base = rings[0]
    out: list[Snapshot] = []
    for position, (when, routes) in enumerate(base):
        back = len(base) - position  # 1: the newest
        summed: RouteTotals = dict(routes)
        for ring in rings[1:]:
            if not ring:
                continue
            for name, (count, errors, buckets) in ring[max(0, len(ring) - back)][1].items():
                have = summed.get(name)
                if have is None:
                    summed[name] = (count, errors, tuple(buckets))
                else:
                    added = tuple(a + b for a, b in zip(have[2], buckets, strict=True))
                    summed[name] = (have[0] + count, have[1] + errors, added)
        out.append((when, summed))
    return out
