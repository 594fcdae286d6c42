"""Operator commands: `apigate status` (the dashboard's picture in a terminal) and
`apigate check` (validate a config file and probe every static target once).

`status` reads the admin API (/healthz, /services, /routes and, when metrics are on, /stats)
with the standard library's HTTP client. `check` compiles the config like `apigate validate`,
then opens a TCP connection to every static target and sends one `GET` (the path the
gateway's active health checks probe, or else the target's root), all targets in parallel
with a 2 s limit each, and prints a table.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TextIO

from apigate import __version__
from apigate.config.errors import ConfigError, invalid_report

if TYPE_CHECKING:
    from apigate.config.schema import GatewayConfig, ServiceConfig, TargetConfig

DEFAULT_ADMIN = "http://127.0.0.1:8001"
PROBE_TIMEOUT = 2.0


def format_table(columns: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, upper-case headings."""
    widths = [len(c) for c in columns]
    for row in rows:
        widths = [max(w, len(v)) for w, v in zip(widths, row, strict=True)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(line.rstrip() for line in lines)


# ---------------------------------------------------------------------- status
class AdminApiError(Exception):
    pass


def fetch_json(base: str, path: str, token: str, *, optional: bool = False) -> Any:
    """GET base+path as JSON; None for a 404 when `optional`; AdminApiError with the reason."""
    request = urllib.request.Request(
        base.rstrip("/") + path, headers={"Accept": "application/json"}
    )
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 404 and optional:
            return None
        if exc.code == 401 and token:
            raise AdminApiError("the admin API refused the token given") from None
        if exc.code == 401:
            raise AdminApiError(
                "the admin API needs a token: pass --token or set APIGATE_ADMIN_TOKEN"
            ) from None
        raise AdminApiError(f"{path}: HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise AdminApiError(f"cannot reach the admin API at {base}: {reason}") from None


def terminal_safe(value: object) -> str:
    """`value` as text, with each character a terminal could act on written as a Python escape
    (`\\u009b`): C0 and C1 controls (CSI, OSC 8 links), bidi overrides and other format
    characters. Registered ids, URLs and names reach `status` as anyone sent them."""
    text = str(value)
    if text.isprintable():  # (the common case: one C-level scan)
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def _num(value: Any, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _health(inst: dict[str, Any]) -> str:
    if inst.get("draining"):
        return "draining"
    return "healthy" if inst.get("healthy") else "UNHEALTHY"


def _breaker(svc: dict[str, Any]) -> str:
    breaker = svc.get("breaker")
    if breaker is None:
        return "n/a"
    return str(breaker.get("state", breaker)) if isinstance(breaker, dict) else str(breaker)


def render_status(base: str, health: Any, services: Any, routes: Any, stats: Any) -> str:
    """The terminal picture of a running gateway. Every cell and value the admin API gave
    goes through `terminal_safe`, since anyone who can register an instance chose some."""
    version = terminal_safe(health.get("version", "?"))
    connections = f" · {terminal_safe(stats['connections'])} connections" if stats else ""
    out = [f"apigate {version} at {base} · up {health.get('uptime_s', 0):.0f} s{connections}"]
    svc_rows = [_safe_row(row) for row in _service_rows(services)]
    columns = ["service", "instance", "url", "origin", "health", "weight", "in-flight", "breaker"]
    out += ["", format_table(columns, svc_rows) if svc_rows else "no services"]
    route_rows = [_safe_row(row) for row in _route_rows(routes, stats)]
    columns = ["route", "match", "service", "req/s", "5xx", "p50 ms", "p99 ms"]
    out += ["", format_table(columns, route_rows) if route_rows else "no routes"]
    return "\n".join(out)


def _safe_row(row: list[Any]) -> list[str]:
    return [terminal_safe(cell) for cell in row]


def _service_rows(services: Any) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for svc in services.get("services", []):
        instances = svc.get("instances") or []
        if not instances:
            rows.append([svc["name"], "(none)", "", "", "", "", "", _breaker(svc)])
        for inst in instances:
            ttl = inst.get("ttl_remaining_s")
            rows.append(
                [
                    svc["name"],
                    inst["id"],
                    inst.get("url", ""),
                    inst.get("origin", ""),
                    _health(inst),
                    inst.get("weight", ""),
                    inst.get("in_flight", ""),
                    _breaker(svc) if ttl is None else f"{_breaker(svc)} (ttl {ttl:.0f}s)",
                ]
            )
    return rows


def _route_rows(routes: Any, stats: Any) -> list[list[Any]]:
    route_stats = (stats or {}).get("routes", {})
    rows: list[list[Any]] = []
    for route in routes.get("routes", []):
        match = route.get("match") or {}
        text = " ".join([",".join(match.get("methods") or []), *(match.get("paths") or [])])
        s = route_stats.get(route["name"]) or {}
        rows.append(
            [
                route["name"],
                text.strip(),
                route.get("service") or "(aggregate)",
                _num(s.get("rps"), 2),
                _num(100 * s["error_rate"]) + "%" if "error_rate" in s else "-",
                _num(s.get("p50_ms"), 2),
                _num(s.get("p99_ms"), 2),
            ]
        )
    return rows


def cmd_status(admin: str | None, token: str | None, out: TextIO = sys.stdout) -> int:
    base = admin or os.environ.get("APIGATE_ADMIN_URL") or DEFAULT_ADMIN
    token = token if token is not None else os.environ.get("APIGATE_ADMIN_TOKEN", "")
    try:
        health = fetch_json(base, "/healthz", token)
        services = fetch_json(base, "/services", token)
        routes = fetch_json(base, "/routes", token)
        stats = fetch_json(base, "/stats", token, optional=True)
    except AdminApiError as exc:
        print(f"apigate status: {exc}", file=sys.stderr)
        return 1
    print(render_status(base, health, services, routes, stats), file=out)
    return 0


# ---------------------------------------------------------------------- check
@dataclass
class Probe:
    service: str
    target: str
    request: str
    up: bool | None  # None: not probed
    detail: str
    ms: float | None = None


def probe_path(service: ServiceConfig, target: TargetConfig) -> str:
    """What `check` asks a target for: the path the gateway's active health checks probe,
    which is the instance's own (`health.active.path` as written: a target's base path is
    where the service's API lives, not put before the health path, as in Kong); without
    active checks, what a request for `/` would reach (`/base` for a target with a base,
    as the exchange sends the root of a service)."""
    active = service.health.active
    if active is not None:
        return active.path
    return target.base_path or "/"


async def probe_target(service: ServiceConfig, name: str, target: TargetConfig) -> Probe:
    """One TCP connect + `GET` of `probe_path` within PROBE_TIMEOUT."""
    active = service.health.active
    path = probe_path(service, target)
    line = f"GET {path}"
    host_header = target.host if ":" not in target.host else f"[{target.host}]"
    if target.port not in (80, 443):
        host_header += f":{target.port}"
    head = (
        f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nUser-Agent: apigate-check/{__version__}"
        "\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    ).encode()
    tls = ssl.create_default_context() if target.scheme == "https" else None
    t0 = time.perf_counter()

    async def exchange() -> int:
        reader, writer = await asyncio.open_connection(
            target.host, target.port, ssl=tls, server_hostname=target.host if tls else None
        )
        try:
            writer.write(head)
            status_line = await reader.readline()
        finally:
            writer.close()
        parts = status_line.split()
        if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
            raise ValueError(f"not an HTTP response: {status_line[:40]!r}")
        return int(parts[1])

    try:
        status = await asyncio.wait_for(exchange(), PROBE_TIMEOUT)
    except TimeoutError:
        return Probe(name, target.url, line, False, f"no answer within {PROBE_TIMEOUT:g}s")
    except (OSError, ValueError) as exc:
        return Probe(name, target.url, line, False, _reason(exc))
    ms = (time.perf_counter() - t0) * 1000
    if active is not None and not active.is_healthy_status(status):
        return Probe(name, target.url, line, False, f"status {status} (unhealthy)", ms)
    return Probe(name, target.url, line, True, f"status {status}", ms)


def _reason(exc: Exception) -> str:
    """'connection refused' rather than asyncio's "Connect call failed ('127.0.0.1', 9)"."""
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve: {exc.strerror}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, OSError) and exc.errno and exc.errno > 0:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


async def probe_all(config: GatewayConfig) -> list[Probe]:
    jobs = []
    skipped: list[Probe] = []
    for name, service in config.services.items():
        for target in service.targets:
            jobs.append(probe_target(service, name, target))
        if service.discovery is not None:
            where = f"dns {service.discovery.dns}"
            skipped.append(Probe(name, where, "-", None, "discovered at run time: not probed"))
    return [*await asyncio.gather(*jobs), *skipped]


def render_check(probes: list[Probe]) -> str:
    rows = [
        [
            p.service,
            p.target,
            p.request,
            "skipped" if p.up is None else "up" if p.up else "DOWN",
            p.detail,
            "-" if p.ms is None else f"{p.ms:.1f} ms",
        ]
        for p in probes
    ]
    return format_table(["service", "target", "probe", "result", "detail", "time"], rows)


def cmd_check(config_path: str, out: TextIO = sys.stdout) -> int:
    """Exit 0: valid and every target answered; 1: a target is down; 2: invalid config."""
    from apigate.store.config_store import served_config

    async def run() -> tuple[GatewayConfig, str, list[Probe]]:
        config, stored = served_config(config_path)
        _compile(config)
        return config, stored, await probe_all(config)

    try:
        config, stored, probes = asyncio.run(run())
    except ConfigError as exc:
        print(invalid_report(config_path, exc), file=sys.stderr)
        return 2
    except OSError as exc:  # the store file cannot be read: the config cannot be judged
        print(f"{config_path}: {exc}", file=sys.stderr)
        return 2
    counts = f"{len(config.routes)} routes, {len(config.services)} services"
    print(f"{config_path}: config ok ({counts}{'; ' + stored if stored else ''})", file=out)
    if probes:
        print(render_check(probes), file=out)
    down = [p for p in probes if p.up is False]
    if down:
        print(f"{len(down)} of {len(probes)} targets down", file=out)
        return 1
    return 0


def _compile(config: GatewayConfig) -> None:
    """Everything `apigate run` would refuse (routes, plugin configs, TLS files)."""
    from apigate.runtime import dry_compile

    dry_compile(config, asyncio.get_running_loop())
