"""End-to-end basics: a real gateway process in front of a real upstream."""

from __future__ import annotations

import json

from tests.support.gateway import GatewayProcess, base_config, raw_request
from tests.support.upstream import Upstream


def _config(upstream_url: str) -> dict:
    return base_config(
        services={"up": {"targets": [upstream_url]}},
        routes=[
            {"name": "api", "match": {"paths": ["/api"]}, "service": "up", "strip_prefix": True},
            {"name": "all", "match": {"paths": ["/"]}, "service": "up"},
        ],
    )


async def test_get_is_proxied_with_forwarding_headers() -> None:
    async with Upstream() as up, GatewayProcess(_config(up.url)) as gw:
        resp = await raw_request(
            gw.port, b"GET /api/echo?x=1 HTTP/1.1\r\nHost: example.com\r\n\r\n"
        )
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        doc = json.loads(body)
        assert doc["path"] == "/echo" and doc["query"] == "x=1"
        got = up.received[-1]
        assert got.header("x-forwarded-for") == "127.0.0.1"
        assert got.header("x-forwarded-host") == "example.com"
        assert got.header("host") == f"127.0.0.1:{up.port}"
        assert got.header("via") == "1.1 apigate"
        assert got.header("x-request-id")


async def test_no_route_is_404_json() -> None:
    cfg = base_config(
        services={"up": {"targets": ["http://127.0.0.1:9"]}},
        routes=[{"name": "a", "match": {"paths": ["/a"]}, "service": "up"}],
    )
    async with GatewayProcess(cfg) as gw:
        resp = await raw_request(gw.port, b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 404")
        doc = json.loads(body)
        assert doc["error"] == "no_route" and doc["request_id"]


async def test_connection_refused_is_502() -> None:
    cfg = base_config(
        services={"up": {"targets": ["http://127.0.0.1:9"]}},
        routes=[{"name": "a", "match": {"paths": ["/"]}, "service": "up"}],
    )
    async with GatewayProcess(cfg) as gw:
        resp = await raw_request(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 502"), resp
