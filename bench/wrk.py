"""Running wrk and reading its report."""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass

from procs import BenchError, Tools, pinned

TIMEOUT = "5s"  # wrk counts a response slower than this as a timeout error
_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_ERRORS = ("connect", "read", "write", "timeout")


@dataclass(frozen=True)
class WrkResult:
    requests: int  # completed requests ("N requests in ...")
    seconds: float  # the run's length as wrk measured it
    rps: float  # "Requests/sec"
    latency_ms: dict[str, float]  # percentile ("50", "75", "90", "99") -> ms
    socket_errors: dict[str, int]  # connect, read, write, timeout
    non_2xx: int  # wrk's "Non-2xx or 3xx responses"
    cpu_seconds: float  # wrk's own CPU time


def to_ms(number: str, unit: str) -> float:
    return float(number) * _UNIT_MS[unit]


def parse(output: str, cpu_seconds: float = 0.0) -> WrkResult:
    total = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m|h)", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not total or not rps:
        raise BenchError(f"cannot parse wrk's output:\n{output}")
    percentiles = re.finditer(r"^\s+(\d+)%\s+([\d.]+)(us|ms|s|m|h)\s*$", output, re.MULTILINE)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    counts = [int(n) for n in errors.groups()] if errors else [0] * len(_ERRORS)
    return WrkResult(
        requests=int(total.group(1)),
        seconds=to_ms(total.group(2), total.group(3)) / 1000,
        rps=float(rps.group(1)),
        latency_ms={m.group(1): to_ms(m.group(2), m.group(3)) for m in percentiles},
        socket_errors=dict(zip(_ERRORS, counts, strict=True)),
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        cpu_seconds=cpu_seconds,
    )


def run(
    tools: Tools, cpu: int, url: str, connections: int, seconds: int, headers: Iterable[str] = ()
) -> WrkResult:
    """One wrk run with one thread (pinned to `cpu`); BenchError if wrk fails."""
    argv = [tools.wrk, "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "--timeout"]
    argv += [TIMEOUT, *(arg for header in headers for arg in ("-H", header)), url]
    before = os.times()
    done = subprocess.run(
        pinned(tools, cpu, argv), capture_output=True, text=True, timeout=seconds + 60
    )
    after = os.times()  # wrk is the only child reaped in between: its CPU time
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}):\n{done.stdout}{done.stderr}")
    cpu_seconds = (after.children_user + after.children_system) - (
        before.children_user + before.children_system
    )
    return parse(done.stdout, cpu_seconds)
