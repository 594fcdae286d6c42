"""Measurements, their medians over rounds, the apigate/nginx ratios, and the printed table."""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class Target:
    """What the issues ask of a scenario, as apigate/nginx ratios (None: nothing asked)."""

    cpu_max: float | None  # CPU per request at most this times nginx's
    rps_min: float | None  # requests/s at least this times nginx's


# Issue #2: the plain route within 1.3x nginx's CPU and 0.8x its throughput. Issue #4: JWT
# (cached) + local rate limit + access log within 1.6x nginx's plain-route CPU. The other
# scenarios say what a feature costs; they have no target, so only their ratios are printed.
RATIO_TARGETS = {
    "plain": Target(1.3, 0.8),
    "logged": Target(1.3, None),
    "plugins": Target(1.6, None),
}
NO_TARGET = Target(None, None)
NOISY = 0.10  # other processes using more than 10% of a core make a run suspect


@dataclass(frozen=True)
class Measurement:
    scenario: str
    path: str
    target: str  # upstream (measured directly), nginx or apigate
    round: int  # 0-based; a summary over several rounds has rounds > 1
    requests: int  # completed by wrk in the counted run
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    latency_ms: dict[str, float]
    cpu_us_per_req: float  # the measured process tree's utime+stime / requests
    sys_us_per_req: float  # the stime part: the kernel's work for it (syscalls, loopback TCP)
    cpu_util: float  # its CPU seconds / wall seconds (1.0 = one core busy all the time)
    load_cpu_util: float  # wrk's + the upstream's CPU seconds / wall seconds
    other_cpu_util: float  # every other process's CPU seconds / wall seconds
    upstream_cpu_us_per_req: float
    upstream_conns_opened: int | None  # new upstream connections during the counted run
    upstream_requests: int | None  # requests the upstream served during the counted run
    socket_errors: dict[str, int]
    non_2xx: int
    rounds: int = 1
    errors: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "errors", self.non_2xx + sum(self.socket_errors.values()))

    @property
    def key(self) -> tuple[str, str, str]:
        return self.scenario, self.path, self.target


MEDIAN_FIELDS = (
    "seconds", "rps", "p50_ms", "p99_ms", "cpu_us_per_req", "sys_us_per_req", "cpu_util",
    "load_cpu_util", "other_cpu_util", "upstream_cpu_us_per_req",
)  # fmt: skip


def summarize(runs: list[Measurement]) -> Measurement:
    """One row for several rounds of the same measurement: the median of each figure."""
    if len(runs) == 1:
        return runs[0]
    medians = {name: statistics.median(getattr(m, name) for m in runs) for name in MEDIAN_FIELDS}
    percentiles = {
        p: statistics.median(m.latency_ms.get(p, 0.0) for m in runs) for p in runs[0].latency_ms
    }
    conns = [m.upstream_conns_opened for m in runs if m.upstream_conns_opened is not None]
    return replace(
        runs[0],
        **medians,
        round=-1,
        rounds=len(runs),
        requests=int(statistics.median(m.requests for m in runs)),
        latency_ms=percentiles,
        upstream_conns_opened=max(conns) if conns else None,
        socket_errors={k: sum(m.socket_errors[k] for m in runs) for k in runs[0].socket_errors},
        non_2xx=sum(m.non_2xx for m in runs),
    )


def summaries(results: Iterable[Measurement]) -> list[Measurement]:
    groups: dict[tuple[str, str, str], list[Measurement]] = {}
    for m in results:
        groups.setdefault(m.key, []).append(m)
    return [summarize(runs) for runs in groups.values()]


@dataclass(frozen=True)
class Comparison:
    scenario: str
    path: str
    cpu_ratio: float  # apigate CPU µs/req / nginx CPU µs/req
    rps_ratio: float  # apigate req/s / nginx req/s
    target: Target

    @property
    def cpu_pass(self) -> bool:
        return self.target.cpu_max is None or self.cpu_ratio <= self.target.cpu_max

    @property
    def rps_pass(self) -> bool:
        return self.target.rps_min is None or self.rps_ratio >= self.target.rps_min


def compare(rows: list[Measurement]) -> list[Comparison]:
    by_key = {m.key: m for m in rows}
    comparisons = []
    for m in rows:
        nginx = by_key.get((m.scenario, m.path, "nginx"))
        if m.target != "apigate" or nginx is None:
            continue
        cpu = m.cpu_us_per_req / nginx.cpu_us_per_req if nginx.cpu_us_per_req else float("inf")
        rps = m.rps / nginx.rps if nginx.rps else 0.0
        target = RATIO_TARGETS.get(m.scenario, NO_TARGET)
        comparisons.append(Comparison(m.scenario, m.path, cpu, rps, target))
    return comparisons


COLUMNS = (
    "scenario", "path", "target", "req/s", "p50 ms", "p99 ms", "CPU µs/req", "sys µs", "CPU%",
    "load%", "other%", "up-conns", "errors",
)  # fmt: skip
WIDTHS = (10, 10, 8, 8, 7, 7, 10, 6, 5, 5, 6, 8, 6)
LEFT_ALIGNED = 3  # scenario, path and target


def table_row(cells: Iterable[object], widths: tuple[int, ...] = WIDTHS) -> str:
    parts = []
    for i, (cell, width) in enumerate(zip(cells, widths, strict=True)):
        parts.append(f"{cell!s:<{width}}" if i < LEFT_ALIGNED else f"{cell!s:>{width}}")
    return "  ".join(parts).rstrip()


def measurement_row(m: Measurement, widths: tuple[int, ...]) -> str:
    conns = "-" if m.upstream_conns_opened is None else m.upstream_conns_opened
    return table_row(
        (
            m.scenario, m.path, m.target, f"{m.rps:,.0f}", f"{m.p50_ms:.2f}", f"{m.p99_ms:.2f}",
            f"{m.cpu_us_per_req:.1f}", f"{m.sys_us_per_req:.1f}", f"{m.cpu_util:.0%}",
            f"{m.load_cpu_util:.0%}", f"{m.other_cpu_util:.0%}", conns,
            f"{m.errors} !!!" if m.errors else "0",
        ),
        widths,
    )  # fmt: skip


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def comparison_row(c: Comparison, widths: tuple[int, ...]) -> str:
    cpu = f"CPU/req {c.cpu_ratio:.2f}x"
    if c.target.cpu_max is not None:
        cpu += f" (target <= {c.target.cpu_max:.1f}x) {verdict(c.cpu_pass)}"
    rps = f"req/s {c.rps_ratio:.2f}x"
    if c.target.rps_min is not None:
        rps += f" (target >= {c.target.rps_min:.1f}x) {verdict(c.rps_pass)}"
    return f"{'':{widths[0] + widths[1] + 4}}apigate/nginx: {cpu};  {rps}"


LEGEND = (
    "CPU µs/req: utime+stime of the measured process (and children) / requests wrk completed.",
    "sys µs: the stime part of it: the kernel's work (syscalls, loopback TCP, waking the peers).",
    "CPU%: that process's CPU time / wall time (100% = one core). load%: wrk + upstream.",
    "other%: every other process on the machine. up-conns: new upstream connections in the run.",
)


def table_lines(rows: list[Measurement], comparisons: list[Comparison]) -> Iterator[str]:
    first = max([WIDTHS[0], *(len(m.scenario) for m in rows)])
    second = max([WIDTHS[1], *(len(m.path) for m in rows)])
    widths = (first, second, *WIDTHS[2:])
    yield table_row(COLUMNS, widths)
    yield table_row(("-" * width for width in widths), widths)
    for m in rows:
        yield measurement_row(m, widths)
        for c in comparisons:
            if (c.scenario, c.path, "apigate") == m.key:
                yield comparison_row(c, widths)
    yield ""
    yield from LEGEND


def warning_lines(rows: list[Measurement]) -> Iterator[str]:
    """Loud lines for runs with errors and for runs disturbed by other processes."""
    for m in rows:
        if m.errors:
            sockets = ", ".join(f"{k} {v}" for k, v in m.socket_errors.items() if v) or "none"
            yield (
                f"!!! ERRORS in {m.scenario} {m.target} {m.path}: {m.non_2xx} non-2xx/3xx "
                f"responses; socket errors: {sockets}. Its figures are not comparable."
            )
    noisy = [m for m in rows if m.other_cpu_util > NOISY]
    if noisy:
        worst = max(m.other_cpu_util for m in noisy)
        yield (
            f"!!! NOISY: other processes used up to {worst:.0%} of a core during {len(noisy)} "
            f"of {len(rows)} runs; rerun on an idle machine (or with --repeat) to trust ratios."
        )
