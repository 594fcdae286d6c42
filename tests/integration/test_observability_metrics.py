"""`GET /metrics` and `GET /stats` of a real gateway after known traffic.

The gateway runs in-process (`running_gateway`) with every extension attached, as
`apigate run` does; the exchange feeds each finished request to the metrics itself.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from apigate.observability.metrics import KNOWN_COUNTERS, RESERVED_NAMES, GatewayMetrics
from apigate.server import Gateway
from tests.support.gateway import raw_request, running_gateway
from tests.support.upstream import Upstream

TOKEN = "s3cret-admin-token"


def gateway_config(upstream_url: str, *, token: str = TOKEN, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "version": 1,
        "listeners": {
            "proxy": {"address": "127.0.0.1:0"},
            "admin": {"address": "127.0.0.1:0", "token": token},
        },
        "services": {"up": {"targets": [upstream_url]}},
        "routes": [
            {"name": "api", "match": {"paths": ["/api"]}, "service": "up", "strip_prefix": True}
        ],
    }
    cfg.update(extra)
    return cfg


def admin_port(gw: Gateway) -> int:
    assert gw.admin_server is not None
    return int(gw.admin_server.sockets[0].getsockname()[1])


async def admin(
    gw: Gateway, method: str, path: str, body: Any = None, token: str | None = TOKEN
) -> tuple[int, dict[str, str], bytes]:
    """One admin API request: (status, lower-cased headers, body)."""
    payload = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: admin\r\nContent-Length: {len(payload)}\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    raw = await raw_request(admin_port(gw), head.encode() + b"\r\n" + payload)
    head_bytes, _, data = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, data


async def proxy(gw: Gateway, method: str, target: str, body: bytes = b"") -> int:
    head = f"{method} {target} HTTP/1.1\r\nHost: test\r\nContent-Length: {len(body)}\r\n\r\n"
    raw = await raw_request(gw.proxy_port, head.encode() + body)
    return int(raw.split(b" ", 2)[1])


def samples(text: str) -> dict[str, dict[frozenset[tuple[str, str]], float]]:
    out: dict[str, dict[frozenset[tuple[str, str]], float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def key(**labels: str) -> frozenset[tuple[str, str]]:
    return frozenset(labels.items())


async def test_metrics_count_known_traffic(tmp_path: Path) -> None:
    async with Upstream() as up, running_gateway(gateway_config(up.url), tmp_path) as gw:
        assert [await proxy(gw, "GET", "/api/echo") for _ in range(4)] == [200] * 4
        assert [await proxy(gw, "GET", "/api/status/503") for _ in range(2)] == [503] * 2
        assert await proxy(gw, "POST", "/api/echo", b"0123456789") == 200
        not_found = await raw_request(gw.proxy_port, b"GET /nowhere HTTP/1.1\r\nHost: t\r\n\r\n")
        assert not_found.startswith(b"HTTP/1.1 404 ")

        status, headers, body = await admin(gw, "GET", "/metrics")
        assert status == 200
        assert headers["content-type"].startswith("text/plain; version=0.0.4")
        got = samples(body.decode())

        route = {"route": "api", "service": "up"}
        requests = got["apigate_requests_total"]
        assert requests[key(**route, method="GET", status_class="2xx")] == 4
        assert requests[key(**route, method="GET", status_class="5xx")] == 2
        assert requests[key(**route, method="POST", status_class="2xx")] == 1
        assert requests[key(route="", service="", method="GET", status_class="4xx")] == 1
        assert got["apigate_request_duration_seconds_count"][key(**route)] == 7
        assert got["apigate_upstream_duration_seconds_count"][key(**route)] == 7
        assert got["apigate_request_bytes_total"][key(**route)] == 10
        assert got["apigate_response_bytes_total"][key(**route)] > 0
        # the gateway's own answers count too: the 404's JSON body
        no_route = key(route="", service="")
        assert got["apigate_response_bytes_total"][no_route] == len(not_found.split(b"\r\n\r\n")[1])

        instance = f"127.0.0.1:{up.port}"
        assert got["apigate_instance_healthy"] == {key(service="up", instance=instance): 1}
        assert got["apigate_instance_in_flight"] == {key(service="up", instance=instance): 0}
        pool = {"service": "up", "instance": instance, "pool": f"http://127.0.0.1:{up.port}"}
        assert got["apigate_pool_connections_created_total"][key(**pool)] >= 1
        assert got["apigate_pool_reuse_ratio"][key(**pool)] > 0.5  # 7 requests, keep-alive
        assert key(**pool, state="idle") in got["apigate_pool_connections"]
        assert "apigate_connections_open" in got
        assert got["apigate_config_reloads_total"] == {key(result="ok"): 0, key(result="failed"): 0}
        assert list(got["apigate_info"].values()) == [1]


async def test_every_family_of_the_gateways_is_a_name_plugins_may_not_take(
    tmp_path: Path,
) -> None:
    """`inc()` refuses the names of the gateway's own families (RESERVED_NAMES, a list kept by
    hand): a plugin's family of the same name breaks the whole scrape. Every family a scrape
    shows is one of those, a by-name counter (KNOWN_COUNTERS) or the process's."""
    services = {"up": {"targets": ["http://127.0.0.1:9"], "circuit_breaker": {}}}
    async with running_gateway(
        gateway_config("http://127.0.0.1:9", services=services), tmp_path
    ) as gw:
        await proxy(gw, "GET", "/api/x")  # a 502: traffic, a pool, an instance
        _, _, text = await admin(gw, "GET", "/metrics")
    names = {family.name for family in text_string_to_metric_families(text.decode())}
    ours = {name.removeprefix("apigate_") for name in names if name.startswith("apigate_")}
    assert "breaker_state" in ours and "requests" in ours
    assert ours - set(KNOWN_COUNTERS) <= RESERVED_NAMES, ours - set(KNOWN_COUNTERS)


async def test_metrics_need_the_admin_token(tmp_path: Path) -> None:
    async with Upstream() as up, running_gateway(gateway_config(up.url), tmp_path) as gw:
        status, _, _ = await admin(gw, "GET", "/metrics", token=None)
        assert status == 401


async def test_instances_reloads_and_named_counters_appear(tmp_path: Path) -> None:
    cfg = gateway_config("http://127.0.0.1:9")
    async with Upstream() as up, running_gateway(cfg, tmp_path) as gw:
        body = {"url": up.url, "ttl": "30s"}
        status, _, _ = await admin(gw, "PUT", "/services/up/instances/live-1", body)
        assert status == 201
        metrics: GatewayMetrics = gw.extensions["metrics"]
        metrics.inc("ratelimit_rejected", route="api", service="up")

        cfg["routes"].append({"name": "other", "match": {"paths": ["/other"]}, "service": "up"})
        assert gw.config_path is not None
        gw.config_path.write_text(yaml.safe_dump(cfg))
        assert await gw.reload()
        bad = {**cfg, "routes": [{"name": "x", "match": {"paths": ["/"]}, "service": "nope"}]}
        gw.config_path.write_text(yaml.safe_dump(bad))
        assert not await gw.reload()

        _, _, text = await admin(gw, "GET", "/metrics")
        got = samples(text.decode())
        assert got["apigate_instance_healthy"][key(service="up", instance="live-1")] == 1
        assert got["apigate_config_reloads_total"] == {key(result="ok"): 1, key(result="failed"): 1}
        assert got["apigate_ratelimit_rejected_total"] == {key(route="api", service="up"): 1}


async def test_stats_for_the_dashboard(tmp_path: Path) -> None:
    async with Upstream() as up, running_gateway(gateway_config(up.url), tmp_path) as gw:
        metrics: GatewayMetrics = gw.extensions["metrics"]
        for _ in range(9):
            await proxy(gw, "GET", "/api/echo")
        await proxy(gw, "GET", "/api/status/500")
        metrics.snapshot()  # what the 1 s timer does
        status, _, body = await admin(gw, "GET", "/stats")
        assert status == 200
        stats = json.loads(body)
        api = stats["routes"]["api"]
        assert api["total"] == 10 and api["requests"] == 10
        assert api["error_rate"] == 0.1
        assert api["rps"] > 0 and 0 < api["p50_ms"] <= api["p99_ms"]
        assert api["series"] and api["series"][-1]["requests"] == 10


async def test_request_bytes_are_the_body_bytes_read(tmp_path: Path) -> None:
    """Not the declared Content-Length: a chunked upload (no length) counted 0, a body the
    client cut after 3 of 100 declared bytes counted 100, a 413 refused unread counted all.
    (The cut one also held its exchange, and the instance's in-flight count, until the body
    timeout: counted nowhere meanwhile.)"""
    async with Upstream() as up:
        config = gateway_config(up.url, limits={"max_body_bytes": 1000})
        async with running_gateway(config, tmp_path) as gw:
            chunked = b"POST /api/echo HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            body = b"4\r\n0123\r\n6\r\n456789\r\n0\r\n\r\n"
            assert (await raw_request(gw.proxy_port, chunked + body)).startswith(b"HTTP/1.1 200 ")
            too_big = b"POST /api/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 2000\r\n\r\n"
            assert (await raw_request(gw.proxy_port, too_big)).startswith(b"HTTP/1.1 413 ")
            cut = b"POST /api/echo HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc"
            _, writer = await asyncio.open_connection("127.0.0.1", gw.proxy_port)
            writer.write(cut)
            await writer.drain()
            await asyncio.sleep(0.2)
            writer.transport.abort()  # (a FIN: the client sends nothing more)
            await asyncio.sleep(0.2)
            got = samples((await admin(gw, "GET", "/metrics"))[2].decode())
            assert got["apigate_request_bytes_total"][key(route="api", service="up")] == 10 + 3
            posts = got["apigate_requests_total"]
            assert posts[key(route="api", service="up", method="POST", status_class="4xx")] == 2
            instance = key(service="up", instance=f"127.0.0.1:{up.port}")
            assert got["apigate_instance_in_flight"] == {instance: 0}
