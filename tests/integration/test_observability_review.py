"""Review fixes of the observability layer against a real gateway: the built-in counters in
`/metrics` after known traffic, an aggregate's part latencies, the trace flags an upstream
receives, the component loggers and redacted log lines of an `apigate run` process."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.test_observability_metrics import (
    admin,
    gateway_config,
    key,
    proxy,
    samples,
)
from tests.support.gateway import GatewayProcess, base_config, raw_request, running_gateway
from tests.support.upstream import Upstream

CACHEABLE = "/c/respond?h=Cache-Control:max-age=60"
BREAKER = "review-int-cb"  # breaker counts are per process: a name no other test uses


def review_config(up: Upstream, other: Upstream) -> dict[str, Any]:
    def route(name: str, service: str, **extra: Any) -> dict[str, Any]:
        return {"name": name, "match": {"paths": [f"/{name[0]}"]}, "service": service,
                "strip_prefix": True, **extra}  # fmt: skip

    no_passive = {"passive": None}  # its 5xx must reach the breaker, not eject the instance
    return gateway_config(
        up.url,
        services={
            "up": {"targets": [up.url]},
            "other": {"targets": [other.url]},
            "flaky": {  # a retry goes to another instance: two, so one retry at most
                "targets": [up.url, other.url],
                "health": no_passive,
                "retries": {"attempts": 1, "on": [503], "budget": "100%", "backoff": "1ms"},
            },
            BREAKER: {
                "targets": [up.url],
                "health": no_passive,
                "circuit_breaker": {
                    "consecutive_failures": 2,
                    "open_for": "300ms",
                    "half_open_requests": 1,
                },
            },
        },
        routes=[
            route("cached", "up", plugins={"cache": {"ttl": "30s"}}),
            route("k-limited", "up", plugins={"rate_limit": {"requests": 1, "per": "1m"}}),
            route("retried", "flaky"),
            route("breaker", BREAKER),
            {
                "name": "agg",
                "match": {"paths": ["/agg/{id}"]},
                "aggregate": {
                    "one": {"service": "up", "path": "/x/{id}"},
                    "two": {"service": "other", "path": "/y/{id}"},
                },
            },
        ],
    )


async def scrape(gw: Any) -> tuple[str, dict[str, dict[frozenset[tuple[str, str]], float]]]:
    status, _headers, body = await admin(gw, "GET", "/metrics")
    assert status == 200
    text = body.decode()
    return text, samples(text)


async def test_built_in_counters_after_known_traffic(tmp_path: Path) -> None:
    async with (
        Upstream() as up,
        Upstream("other") as other,
        running_gateway(review_config(up, other), tmp_path) as gw,
    ):
        # the cache: a MISS, then HITs
        assert [await proxy(gw, "GET", CACHEABLE) for _ in range(4)] == [200] * 4
        assert sum(1 for r in up.received if r.path.startswith("/respond")) == 1
        # the rate limit: one request a minute, the rest are 429s
        assert [await proxy(gw, "GET", "/k/echo") for _ in range(4)] == [200, 429, 429, 429]
        # retries: a 503 tried on both instances (one retry) twice, a 200 at once
        assert [await proxy(gw, "GET", "/r/status/503") for _ in range(2)] == [503, 503]
        assert await proxy(gw, "GET", "/r/echo") == 200
        # the breaker: closed -> open -> half_open -> closed
        assert [await proxy(gw, "GET", "/b/status/500") for _ in range(2)] == [500, 500]
        assert await proxy(gw, "GET", "/b/echo") == 503  # open: refused by the gateway
        await asyncio.sleep(0.35)
        assert await proxy(gw, "GET", "/b/echo") == 200  # the probe, which closes it
        # an aggregate: two part calls, one to each service
        assert await proxy(gw, "GET", "/agg/7") == 200

        text, got = await scrape(gw)

    names = [family.name for family in text_string_to_metric_families(text)]
    assert len(names) == len(set(names)), "one family per name"
    cached = key(route="cached", service="up")
    assert got["apigate_cache_hits_total"] == {cached: 3}
    assert got["apigate_cache_misses_total"] == {cached: 1}
    assert got["apigate_cache_stale_total"] == {cached: 0}
    assert got["apigate_ratelimit_rejected_total"] == {key(route="k-limited", service="up"): 3}
    assert got["apigate_retries_total"] == {key(route="retried", service="flaky"): 2}
    where = key(route="", service=BREAKER)
    assert got["apigate_breaker_opened_total"][where] == 1
    assert got["apigate_breaker_half_opened_total"][where] == 1
    assert got["apigate_breaker_closed_total"][where] == 1
    assert got["apigate_breaker_state"][key(service=BREAKER, state="closed")] == 1
    upstream = got["apigate_upstream_duration_seconds_count"]
    assert upstream[key(route="agg", service="up")] == 1
    assert upstream[key(route="agg", service="other")] == 1
    assert got["apigate_request_duration_seconds_count"][key(route="agg", service="")] == 1
    assert key(route="agg", service="up") not in got["apigate_request_duration_seconds_count"]
    # the requests themselves, as before
    requests = got["apigate_requests_total"]
    assert requests[key(route="k-limited", service="up", method="GET", status_class="4xx")] == 3
    assert requests[key(route="cached", service="up", method="GET", status_class="2xx")] == 4


async def test_stats_and_the_dashboard_still_answer(tmp_path: Path) -> None:
    async with (
        Upstream() as up,
        Upstream("other") as other,
        running_gateway(review_config(up, other), tmp_path) as gw,
    ):
        assert await proxy(gw, "GET", CACHEABLE) == 200
        assert await proxy(gw, "GET", "/agg/1") == 200
        gw.extensions["metrics"].snapshot()
        status, _headers, body = await admin(gw, "GET", "/stats")
        assert status == 200
        routes = json.loads(body)["routes"]
        assert routes["cached"]["total"] == 1 and routes["agg"]["total"] == 1
        status, _headers, _body = await admin(gw, "GET", "/")
        assert status == 200


async def test_reserved_flag_bits_do_not_reach_the_upstream(tmp_path: Path) -> None:
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    async with Upstream() as up, running_gateway(gateway_config(up.url), tmp_path) as gw:
        for flags, kept in (("09", "01"), ("ff", "01"), ("fe", "00"), ("01", "01")):
            for version in ("00", "02"):
                parent = f"{version}-{trace}-00f067aa0ba902b7-{flags}"
                head = f"GET /api/echo HTTP/1.1\r\nHost: t\r\ntraceparent: {parent}\r\n\r\n"
                answer = await raw_request(gw.proxy_port, head.encode())
                assert answer.startswith(b"HTTP/1.1 200 ")
                sent = up.received[-1].header("traceparent")
                assert sent is not None and sent.startswith(f"00-{trace}-"), (parent, sent)
                assert sent.endswith(f"-{kept}"), (parent, sent)


# ---------------------------------------------------------------------- apigate run's logs
def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def register(gw: GatewayProcess, service: str, instance: str, url: str) -> int:
    body = json.dumps({"url": url, "ttl": "30s"}).encode()
    head = (
        f"PUT /services/{service}/instances/{instance} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    answer = await raw_request(gw.admin_port, head.encode() + body)
    return int(answer.split(b" ", 2)[1])


def logged(gw: GatewayProcess) -> list[dict[str, Any]]:
    lines = []
    for line in gw.stderr_lines:
        try:
            lines.append(json.loads(line))
        except ValueError:
            continue
    return lines


async def test_per_component_levels_reach_registrations() -> None:
    """README's example: `--log-level warning,apigate.registry=debug` shows registrations;
    `info,apigate.registry=error` hides them."""
    config = base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={"a": {"targets": [f"http://127.0.0.1:{closed_port()}"]}},
    )
    url = f"http://127.0.0.1:{closed_port()}"
    async with GatewayProcess(config, args=("--log-level", "warning,apigate.registry=debug")) as gw:
        assert await register(gw, "a", "L1", url) in (200, 201)
        line = await gw.wait_for_log('"registration"')
        doc = json.loads(line)
        assert doc["logger"] == "apigate.registry" and doc["event"] == "registration"
    async with GatewayProcess(config, args=("--log-level", "info,apigate.registry=error")) as gw:
        assert await register(gw, "a", "L1", url) in (200, 201)
        await asyncio.sleep(0.3)
        assert not [d for d in logged(gw) if d.get("event") == "registration"]
        assert [d for d in logged(gw) if d.get("logger") == "apigate.server"]  # info is on


async def test_otlp_endpoint_credentials_stay_out_of_the_logs() -> None:
    port = closed_port()
    endpoint = f"http://user:OTLP-PW-SECRET@127.0.0.1:{port}/v1/traces?api_key=OTLP-Q-SECRET"
    async with Upstream() as up:
        config = base_config(
            services={"up": {"targets": [up.url]}},
            routes=[{"name": "api", "match": {"paths": ["/api"]}, "service": "up"}],
            plugins={"tracing": {"otlp_endpoint": endpoint}},
        )
        async with GatewayProcess(config) as gw:
            answer = await raw_request(gw.port, b"GET /api HTTP/1.1\r\nHost: t\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 ")
            line = await gw.wait_for_log("opentelemetry", within=15)
            assert "[redacted]" in line
            logs = gw.logs()
    assert "SECRET" not in logs
