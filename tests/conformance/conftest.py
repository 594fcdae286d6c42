"""One gateway and one recording upstream per conformance module (starting a process costs
~0.35 s; the cases are many). Each test gets them with the upstream's record cleared, so that
`env.up.received == []` means "nothing of this test's request reached the upstream"."""

from __future__ import annotations

import json
from typing import Any

from tests.support.client import Response, request
from tests.support.env import Env, env_fixture, shared_env_fixture
from tests.support.gateway import base_config

__all__ = ["Env", "assert_error", "assert_rejected", "env", "proxied", "shared_env"]

# Small limits so that each can be crossed with a few bytes.
LIMITS: dict[str, Any] = {
    "max_header_bytes": 2048,
    "max_headers": 20,
    "max_url_bytes": 512,
    "max_body_bytes": 1000,
    "header_timeout": "600ms",
    "body_timeout": "600ms",
    "idle_timeout": "600ms",
    "max_connections": 20,
}


def conformance_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    return base_config(
        limits=dict(LIMITS),
        services={"up": {"targets": [upstream_url], "timeouts": {"response": "3s"}}},
        routes=[
            {"name": "all", "match": {"paths": ["/"]}, "service": "up"},
            {
                "name": "other-host",
                "match": {"hosts": ["other.example"], "paths": ["/"]},
                "service": "up",
                "rewrite": "/routed-by-host",
            },
            {
                "name": "admin",
                "match": {"paths": ["/admin"]},
                "service": "up",
                "rewrite": "/admin-route",
            },
            # a route may raise the edge body limit, or lower it
            {
                "name": "upload",
                "match": {"paths": ["/upload"]},
                "service": "up",
                "limits": {"max_body_bytes": 5000},
            },
            {
                "name": "small-upload",
                "match": {"paths": ["/small-upload"]},
                "service": "up",
                "limits": {"max_body_bytes": 10},
            },
            {
                "name": "keep-host",
                "match": {"paths": ["/keep-host"]},
                "service": "up",
                "preserve_host": True,
            },
            {
                "name": "stripped",
                "match": {"paths": ["/stripped"]},
                "service": "up",
                "strip_prefix": True,
            },
        ],
        **overrides,
    )


shared_env = shared_env_fixture(lambda up: conformance_config(up.url))
env = env_fixture()


def assert_error(resp: Response, status: int, code: str | None = None) -> dict[str, Any]:
    """A gateway error: the status, a JSON body with exactly error/message/request_id, and the
    same request id in the X-Request-Id header."""
    assert resp.status == status, (resp.status, resp.body)
    assert resp.header("content-type") == "application/json"
    doc: dict[str, Any] = json.loads(resp.body)
    assert set(doc) == {"error", "message", "request_id"}, doc
    assert doc["message"] and doc["request_id"]
    assert resp.header("x-request-id") == doc["request_id"]
    if code is not None:
        assert doc["error"] == code, doc
    return doc


async def assert_rejected(
    env: Env, data: bytes, status: int, code: str | None = None, *, closed: bool = True
) -> dict[str, Any]:
    """Send `data`; the gateway answers `status` itself and (by default) closes, and not one
    byte reaches the upstream."""
    resp, was_closed = await request(env.port, data, close_wait=2.0 if closed else 0.3)
    doc = assert_error(resp, status, code)
    assert resp.header("connection") == ("close" if closed else None)
    assert was_closed is closed
    assert env.up.received == []
    assert env.up.state.bytes_received == 0
    return doc


async def proxied(env: Env, data: bytes) -> tuple[Response, Any]:
    """Send `data`; it must be proxied (200 from the echo upstream): the response and the one
    request the upstream received."""
    resp, _ = await request(env.port, data, close_wait=0.05)
    assert resp.status == 200, (resp.status, resp.body)
    assert len(env.up.received) == 1, env.up.received
    return resp, env.up.received[0]
