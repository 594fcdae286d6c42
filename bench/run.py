"""Side-by-side benchmark: the upstream direct, nginx and apigate in front of it, in one run.

    python bench/run.py [--duration 10] [--connections 50] [--scenarios plain,routes10k]
                        [--json out.json] [--repeat 1] [--no-pin]

Standard library only. What is measured, the caveats and how to add a scenario: bench/README.md.
Scenarios live in bench/scenarios.py.
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import json
import os
import platform
import re
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import wrk
from procs import (
    CLK_TCK,
    BenchError,
    Processes,
    ProcTable,
    Server,
    Tools,
    capture,
    ensure_tools,
    foreign_seconds,
    free_port,
    pinned,
    proc_table,
    tail,
    tree_seconds,
)
from results import (
    RATIO_TARGETS,
    Comparison,
    Measurement,
    compare,
    summaries,
    table_lines,
    warning_lines,
)
from scenarios import SCENARIOS, Env, Spec, default_scenarios, missing_env

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
BODY = b"Hello, World!"  # what the upstream answers, and so what every proxy must answer
WARMUP_SECONDS = 2
STATUS_PATH = "/__bench_status"  # the upstream's stub_status page
LOAD_CPU, PROXY_CPU = 0, 1  # wrk and the upstream share CPU 0; the proxy under test has CPU 1
DEFAULT_APIGATE_CMD = "{python} -m apigate run -c {config}"
TARGETS = ("upstream", "nginx", "apigate")


@dataclass
class Bench:
    """The state of one run."""

    args: argparse.Namespace
    tools: Tools
    procs: Processes
    workdir: Path
    upstream: Server | None = None
    results: list[Measurement] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# HTTP probes and the upstream's counters
# --------------------------------------------------------------------------------------------


def http_get(port: int, path: str, headers: Iterable[str] = ()) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers=dict(h.split(": ", 1) for h in headers))
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def wait_ready(server: Server, headers: Iterable[str], timeout: float) -> None:
    """Until the port accepts connections and GET / answers 200, else BenchError."""
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BenchError(
                f"{server.name} exited with status {server.proc.returncode} before it was "
                f"ready; its output:\n{tail(server.log)}"
            )
        try:
            status, _ = http_get(server.port, "/", headers)
            if status == 200:
                return
            last = f"GET / answered {status}"
        except (OSError, http.client.HTTPException) as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.1)
    raise BenchError(
        f"{server.name} not ready on 127.0.0.1:{server.port} after {timeout:.0f} s "
        f"(last: {last}); its output:\n{tail(server.log)}"
    )


def check_response(
    server: Server, path: str, headers: Iterable[str], expected: bytes = BODY
) -> None:
    """The proxy must answer `path` with 200 and the expected body before it is measured."""
    status, body = http_get(server.port, path, headers)
    if status != 200 or body != expected:
        raise BenchError(
            f"{server.name}: GET {path} answered {status} {body[:200]!r}, expected 200 {expected!r}"
        )


def upstream_counters(bench: Bench) -> tuple[int, int] | None:
    """(connections accepted, requests served) so far by the upstream, from stub_status."""
    if not bench.tools.stub_status or bench.upstream is None:
        return None
    _, body = http_get(bench.upstream.port, STATUS_PATH)
    found = re.search(rb"accepts handled requests\s+(\d+)\s+\d+\s+(\d+)", body)
    return (int(found.group(1)), int(found.group(2))) if found else None


def counters_delta(
    before: tuple[int, int] | None, after: tuple[int, int] | None
) -> tuple[int | None, int | None]:
    """Upstream (connections, requests) in between, less our own second status request."""
    if before is None or after is None:
        return None, None
    return after[0] - before[0] - 1, after[1] - before[1] - 1


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """Everything read just before and just after the counted wrk run."""

    wall: float
    procs: ProcTable
    counters: tuple[int, int] | None


def snapshot(bench: Bench) -> Snapshot:
    counters = upstream_counters(bench)  # first: its own request must not fall in the window
    return Snapshot(time.monotonic(), proc_table(), counters)


@dataclass(frozen=True)
class Case:
    """One thing to measure: a server, the request, and the labels of the row."""

    scenario: str
    target: str
    server: Server
    path: str
    headers: tuple[str, ...] = ()
    round: int = 0


def measure(bench: Bench, case: Case) -> Measurement:
    """A warm-up wrk run that is not counted, then the counted run between two snapshots."""
    assert bench.upstream is not None
    args = bench.args
    url = f"http://127.0.0.1:{case.server.port}{case.path}"
    label = f"{case.scenario} {case.target} {case.path}"
    print(f"bench: {label} (round {case.round + 1} of {args.repeat})", file=sys.stderr)
    wrk.run(bench.tools, LOAD_CPU, url, args.connections, WARMUP_SECONDS, case.headers)
    before = snapshot(bench)
    result = wrk.run(bench.tools, LOAD_CPU, url, args.connections, args.duration, case.headers)
    after = snapshot(bench)
    return to_measurement(bench, case, result, before, after)


def to_measurement(
    bench: Bench, case: Case, result: wrk.WrkResult, before: Snapshot, after: Snapshot
) -> Measurement:
    assert bench.upstream is not None
    wall, requests = after.wall - before.wall, max(result.requests, 1)

    def used(pid: int, system_only: bool = False) -> float:
        return tree_seconds(after.procs, pid, system_only) - tree_seconds(
            before.procs, pid, system_only
        )

    proxy, upstream = used(case.server.pid), used(bench.upstream.pid)
    proxy_system = used(case.server.pid, system_only=True)
    if case.server is bench.upstream:  # measuring the upstream directly: it is the "proxy"
        upstream = 0.0
    conns, served = counters_delta(before.counters, after.counters)
    return Measurement(
        scenario=case.scenario,
        path=case.path,
        target=case.target,
        round=case.round,
        requests=result.requests,
        seconds=result.seconds,
        rps=result.rps,
        p50_ms=result.latency_ms.get("50", float("nan")),
        p99_ms=result.latency_ms.get("99", float("nan")),
        latency_ms=result.latency_ms,
        cpu_us_per_req=proxy * 1e6 / requests,
        sys_us_per_req=proxy_system * 1e6 / requests,
        cpu_util=proxy / wall,
        load_cpu_util=(result.cpu_seconds + upstream) / wall,
        other_cpu_util=foreign_seconds(before.procs, after.procs, os.getpid()) / wall,
        upstream_cpu_us_per_req=upstream * 1e6 / requests,
        upstream_conns_opened=conns,
        upstream_requests=served,
        socket_errors=result.socket_errors,
        non_2xx=result.non_2xx,
    )


# --------------------------------------------------------------------------------------------
# Starting servers
# --------------------------------------------------------------------------------------------


def render(template: str, **values: object) -> str:
    """A template from bench/ with its {{name}} placeholders filled (nginx's $vars untouched)."""
    text = (BENCH_DIR / template).read_text()
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", str(value))
    if "{{" in text:
        raise BenchError(f"{template}: unfilled placeholder near {text[text.index('{{') :][:40]!r}")
    return text


def nginx_argv(tools: Tools, prefix: Path, conf: Path) -> list[str]:
    argv = [tools.nginx, "-p", f"{prefix}/", "-c", str(conf)]
    version = tuple(int(n) for n in re.findall(r"\d+", tools.nginx_version)[:3])
    if version >= (1, 19, 5):  # -e: never touch the compiled-in error log, even at start-up
        argv += ["-e", str(prefix / "error.log")]
    return argv


def start_nginx(
    bench: Bench, name: str, template: str, cpu: int, port: int, **values: object
) -> Server:
    """nginx from a template in bench/, with its own prefix dir in the run's temp dir."""
    prefix = bench.workdir / name
    (prefix / "tmp").mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(render(template, prefix=prefix, port=port, **values))
    argv = pinned(bench.tools, cpu, nginx_argv(bench.tools, prefix, conf))
    log = prefix / "output.log"
    return Server(name, bench.procs.start(argv, log), port, log)


def start_upstream(bench: Bench) -> Server:
    status = ""
    if bench.tools.stub_status:
        status = f"        location = {STATUS_PATH} {{ stub_status; }}"
    template, port = "nginx_upstream.conf.tmpl", free_port()
    upstream = start_nginx(bench, "upstream", template, LOAD_CPU, port, status_location=status)
    wait_ready(upstream, (), bench.args.start_timeout)
    check_response(upstream, "/", ())
    return upstream


def start_nginx_proxy(bench: Bench, name: str, spec: Spec, port: int) -> Server:
    assert bench.upstream is not None
    values = {"http_extra": spec.nginx_http, "server": spec.nginx_server}
    template, upstream_port = "nginx_proxy.conf.tmpl", bench.upstream.port
    return start_nginx(
        bench, name, template, PROXY_CPU, port, upstream_port=upstream_port, **values
    )


def apigate_argv(bench: Bench, config: Path, port: int) -> list[str]:
    values = {"python": bench.args.python, "config": str(config), "port": str(port)}
    return [part.format(**values) for part in shlex.split(bench.args.apigate_cmd)]


def start_apigate(bench: Bench, name: str, spec: Spec, port: int) -> Server:
    if bench.args.apigate_cmd == "nginx":  # the harness's self-test: nginx in apigate's slot
        return start_nginx_proxy(bench, name, spec, port)
    config = bench.workdir / name / "apigate.yaml"
    config.write_text(spec.apigate_yaml)
    log = bench.workdir / name / "output.log"
    argv = pinned(bench.tools, PROXY_CPU, apigate_argv(bench, config, port))
    return Server(name, bench.procs.start(argv, log), port, log)


def start_target(bench: Bench, target: str, scenario_name: str) -> tuple[Server, Spec]:
    """Build the scenario for this proxy (its own port and dir) and start the proxy."""
    assert bench.upstream is not None
    port, count = free_port(), len(list(bench.workdir.iterdir()))
    name = f"{count:02d}-{target}-{scenario_name}"  # unique: a scenario runs once per round
    workdir = bench.workdir / name / "scenario"
    workdir.mkdir(parents=True)
    spec = SCENARIOS[scenario_name](Env(port, bench.upstream.port, workdir))
    start = start_apigate if target == "apigate" else start_nginx_proxy
    return start(bench, name, spec, port), spec


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def proxy_order(bench: Bench, round_index: int) -> list[str]:
    """nginx then apigate, reversed every other round so that order effects cancel out."""
    order = [t for t in ("nginx", "apigate") if t in bench.args.targets]
    return order[::-1] if round_index % 2 else order


def run_target(bench: Bench, scenario_name: str, target: str, round_index: int) -> None:
    started = time.monotonic()
    server, spec = start_target(bench, target, scenario_name)
    try:
        wait_ready(server, spec.headers, bench.args.start_timeout)
        ready = time.monotonic() - started
        print(f"bench: {server.name} answered GET / {ready:.1f} s after start", file=sys.stderr)
        for path in spec.paths:
            expected = spec.apigate_body if target == "apigate" and spec.apigate_body else BODY
            check_response(server, path, spec.headers, expected)
            case = Case(scenario_name, target, server, path, spec.headers, round_index)
            bench.results.append(measure(bench, case))
            if server.proc.poll() is not None:
                raise BenchError(
                    f"{server.name} died during the run (status {server.proc.returncode}); "
                    f"its output:\n{tail(server.log)}"
                )
    finally:
        bench.procs.stop(server.proc)


def run_all(bench: Bench) -> None:
    bench.upstream = start_upstream(bench)
    for round_index in range(bench.args.repeat):
        if "upstream" in bench.args.targets:
            case = Case("(direct)", "upstream", bench.upstream, "/", round=round_index)
            bench.results.append(measure(bench, case))
        for name in bench.args.scenarios:
            for target in proxy_order(bench, round_index):
                run_target(bench, name, target, round_index)


# --------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------


def header_lines(bench: Bench, apigate_version: str) -> Iterator[str]:
    tools, args = bench.tools, bench.args
    pin = "none (--no-pin, fewer than 2 CPUs or no taskset)"
    if tools.taskset:
        pin = f"proxy under test on CPU {PROXY_CPU}; wrk and upstream on CPU {LOAD_CPU} (taskset)"
    versions = (
        f"nginx {tools.nginx_version}, wrk {tools.wrk_version}, "
        f"Python {platform.python_version()}, apigate {apigate_version}"
    )
    rounds = f", median of {args.repeat} rounds" if args.repeat > 1 else ""
    yield "apigate side-by-side benchmark"
    yield f"  machine   {os.cpu_count()} CPUs (os.cpu_count), Linux {platform.release()}"
    yield f"  pinning   {pin}"
    yield f"  versions  {versions}"
    yield f"  apigate   {args.apigate_cmd}  (python: {args.python})"
    if args.apigate_cmd == "nginx":
        yield "  !!! the apigate slot runs NGINX (--apigate-cmd nginx): a harness self-test"
    yield (
        f"  load      wrk -t1 -c{args.connections} -d{args.duration}s --latency, "
        f"after a {WARMUP_SECONDS} s warm-up{rounds}"
    )


def write_json(
    bench: Bench, rows: list[Measurement], comparisons: list[Comparison], apigate_version: str
) -> None:
    tools, args = bench.tools, bench.args
    meta = {
        "cpu_count": os.cpu_count(), "kernel": platform.release(),
        "nginx_version": tools.nginx_version, "wrk_version": tools.wrk_version,
        "python_version": platform.python_version(), "apigate_version": apigate_version,
        "apigate_cmd": args.apigate_cmd, "pinned": tools.taskset is not None,
        "duration_s": args.duration, "warmup_s": WARMUP_SECONDS, "rounds": args.repeat,
        "connections": args.connections, "wrk_threads": 1, "clk_tck": CLK_TCK,
        "targets": {
            scenario: {"cpu_ratio_max": t.cpu_max, "rps_ratio_min": t.rps_min}
            for scenario, t in RATIO_TARGETS.items()
        },
    }  # fmt: skip
    document = {
        "meta": meta,
        "summary": [asdict(m) for m in rows],
        "comparisons": [
            {**asdict(c), "cpu_pass": c.cpu_pass, "rps_pass": c.rps_pass} for c in comparisons
        ],
        "runs": [asdict(m) for m in bench.results],
    }
    args.json.write_text(json.dumps(document, indent=2) + "\n")


def exit_status(bench: Bench, comparisons: list[Comparison]) -> int:
    if any(m.errors for m in bench.results):
        return 3
    if bench.args.check and not all(c.cpu_pass and c.rps_pass for c in comparisons):
        return 4
    return 0


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def default_python() -> str:
    venv = REPO_DIR / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def csv_list(choices: Iterable[str]) -> Callable[[str], list[str]]:
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        items = list(dict.fromkeys(item.strip() for item in text.split(",") if item.strip()))
        if not items or any(item not in allowed for item in items):
            raise argparse.ArgumentTypeError(f"choose from {', '.join(allowed)}")
        return items

    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add = parser.add_argument
    add("--duration", type=positive, default=10, help="seconds of each counted run (10)")
    add("--connections", type=positive, default=50, help="wrk connections (50)")
    add(
        "--scenarios",
        type=csv_list(SCENARIOS),
        default=default_scenarios(),
        help=f"comma-separated, from: {', '.join(SCENARIOS)} (all that can run)",
    )
    add(
        "--targets",
        type=csv_list(TARGETS),
        default=list(TARGETS),
        help="comma-separated subset of upstream,nginx,apigate (all)",
    )
    add("--repeat", type=positive, default=1, help="rounds; the table shows medians (1)")
    add("--json", type=Path, help="also write every figure to this JSON file")
    add("--no-pin", dest="pin", action="store_false", help="do not pin to CPUs with taskset")
    add("--python", default=default_python(), help="the python that runs apigate (.venv's)")
    add(
        "--start-timeout",
        type=float,
        default=60.0,
        help="seconds a server may take to answer GET / (60)",
    )
    add("--keep", action="store_true", help="keep the temp dir (configs, logs) for a look")
    add("--check", action="store_true", help="exit 4 when apigate misses a target")
    # Hidden: another command in apigate's slot ({python}, {config}, {port} are filled in), e.g.
    # "{python} -m apigate run -c {config} --workers 2", or the word "nginx" for a second nginx
    # there: the harness's self-test, which must show ratios of about 1.0.
    add("--apigate-cmd", default=DEFAULT_APIGATE_CMD, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    missing = missing_env(args.scenarios)
    if missing:  # now, not after the scenarios before it have run for minutes
        parser.error("; ".join(missing))
    return args


def apigate_version(bench: Bench) -> str:
    """`--version` of the default apigate command; BenchError when apigate is not installed."""
    args = bench.args
    if args.apigate_cmd == "nginx":
        return "(not run: nginx in its slot)"
    if args.apigate_cmd != DEFAULT_APIGATE_CMD or "apigate" not in args.targets:
        return "unknown"
    output = capture([args.python, "-m", "apigate", "--version"]).strip()
    if "No module named" in output:
        raise BenchError(f"apigate cannot run with {args.python}: {output}")
    return output.splitlines()[-1].removeprefix("apigate ") if output else "unknown"


def run(bench: Bench) -> int:
    version = apigate_version(bench)
    print("\n".join(header_lines(bench, version)), flush=True)
    run_all(bench)
    rows = summaries(bench.results)
    comparisons = compare(rows)
    print()
    print("\n".join([*table_lines(rows, comparisons), *warning_lines(rows)]))
    if bench.args.json:
        write_json(bench, rows, comparisons, version)
    return exit_status(bench, comparisons)


def raise_on_signal(signum: int, _frame: object) -> None:
    print(f"bench: stopped by {signal.Signals(signum).name}", file=sys.stderr)
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that clean up


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    procs = Processes()
    workdir = Path(tempfile.mkdtemp(prefix="apigate-bench-"))

    def cleanup() -> None:
        procs.stop_all()
        if args.keep and workdir.exists():
            print(f"bench: kept {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    atexit.register(cleanup)  # also covers an exit that skips the finally below
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_on_signal)
    try:
        return run(Bench(args, ensure_tools(args.pin), procs, workdir))
    except BenchError as exc:
        print(f"bench: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        cleanup()
        atexit.unregister(cleanup)


if __name__ == "__main__":
    sys.exit(main())
