"""A security review's findings, reproduced through a real gateway process and upstream.

1. jwt: a second Authorization line (any scheme), or a query parameter PHP reads as the token
   parameter (`access.token`), reached the upstream next to the token the gateway verified.
2. rate_limit `key: ip` behind a proxy the listener trusts: every client shared the proxy's
   bucket. The key is the client the proxy names (the right-most untrusted X-Forwarded-For).
3. rate_limit with its Redis store down and `on_store_error: allow`: the upstream's own
   RateLimit-* headers reached the client.

One gateway serves every case (a route per finding); the listener trusts 127.0.0.1 only, so a
connection from 127.0.0.2 is an untrusted client on the same machine.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import pytest_asyncio

from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Upstream

SECRET = "review-secret-0123456789abcdef0123"

pytestmark = pytest.mark.asyncio(loop_scope="module")


def token(key: str = SECRET, **claims: Any) -> str:
    return jwt.encode(claims, key, algorithm="HS256")


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released): a Redis that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _config(upstream_url: str) -> dict[str, Any]:
    def route(name: str, plugins: dict[str, Any]) -> dict[str, Any]:
        match = {"paths": [f"/{name}"]}
        return {"name": name, "match": match, "strip_prefix": True, "service": "up", **plugins}

    per_minute = {"requests": 1, "per": "1m", "store": "local"}
    redis_down = f"redis://127.0.0.1:{unused_port()}/0"
    return base_config(
        listeners={
            "proxy": {"address": "127.0.0.1:0", "trusted_proxies": ["127.0.0.1/32"]},
            "admin": None,
        },
        services={"up": {"targets": [upstream_url]}},
        routes=[
            route(
                "jwt",
                {
                    "plugins": {
                        "jwt": {
                            "secret": SECRET,
                            "algorithms": ["HS256"],
                            "query_param": "access_token",
                        }
                    }
                },
            ),
            route("rl-ip", {"plugins": {"rate_limit": {**per_minute, "key": "ip"}}}),
            route("rl-consumer", {"plugins": {"rate_limit": {**per_minute, "key": "consumer"}}}),
            route(
                "rl-down",
                {
                    "plugins": {
                        "rate_limit": {
                            "requests": 1,
                            "per": "1m",
                            "store": redis_down,
                            "store_timeout": "50ms",
                            "on_store_error": "allow",
                        }
                    }
                },
            ),
        ],
    )


class Setup:
    def __init__(self, up: Upstream, gw: GatewayProcess) -> None:
        self.up = up
        self.gw = gw

    async def get(
        self, target: str, *headers: str, source: str = "127.0.0.1"
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        """One request on its own connection from `source`; status, header lines, body."""
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.gw.port, local_addr=(source, 0)
        )
        try:
            lines = [f"GET {target} HTTP/1.1", "Host: gw.test", "Connection: close", *headers]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            raw = await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()
        head, _, payload = raw.partition(b"\r\n\r\n")
        status_line, *fields = head.decode("latin-1").split("\r\n")
        parsed = [(n.strip().lower(), v.strip()) for n, _, v in (f.partition(":") for f in fields)]
        return int(status_line.split()[1]), parsed, payload


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup() -> AsyncIterator[Setup]:
    async with Upstream() as up, GatewayProcess(_config(up.url)) as gw:
        yield Setup(up, gw)


# ============================================================================ 1. jwt
async def test_a_second_authorization_line_is_401_and_never_reaches_the_upstream(
    setup: Setup,
) -> None:
    good = token(sub="alice", exp=time.time() + 3600)
    forged = token("attacker-key-0123456789abcdef01234", sub="root")
    before = len(setup.up.received)
    for first in (forged, f"Bearer\t{forged}", f"Basic {forged}", f"Bearer {good}"):
        status, headers, body = await setup.get(
            "/jwt/echo", f"Authorization: {first}", f"Authorization: Bearer {good}"
        )
        assert status == 401, body
        assert ("www-authenticate", 'Bearer realm="apigate", error="invalid_token"') in headers
        assert json.loads(body)["message"] == "several Authorization headers"
    assert len(setup.up.received) == before
    status, _, body = await setup.get("/jwt/echo", f"Authorization: Bearer {good}")
    assert status == 200, body
    assert setup.up.received[-1].header_values("authorization") == [f"Bearer {good}"]


async def test_a_query_parameter_php_reads_as_the_token_is_a_second_token(setup: Setup) -> None:
    good = token(sub="alice", exp=time.time() + 3600)
    forged = token("attacker-key-0123456789abcdef01234", sub="root")
    before = len(setup.up.received)
    for query in (
        f"access_token={good}&access.token={forged}",
        f"access.token={forged}&access_token={good}",
        f"access_token={good}&access+token={forged}",
        f"access_token={good}&access[token={forged}",
    ):
        status, headers, body = await setup.get(f"/jwt/echo?{query}")
        assert status == 401, (query, body)
        assert json.loads(body)["message"] == "several different tokens in one request"
        assert any(name == "www-authenticate" for name, _ in headers)
    assert len(setup.up.received) == before
    status, _, body = await setup.get(f"/jwt/echo?access_token={good}&access_tokens=1")
    assert status == 200, body


# ============================================================================ 2. rate_limit key
async def test_clients_behind_a_trusted_proxy_get_a_bucket_each(setup: Setup) -> None:
    clients = ("198.51.100.1", "198.51.100.2", "198.51.100.3")
    for client in clients:
        status, _, body = await setup.get("/rl-ip/echo", f"X-Forwarded-For: {client}")
        assert status == 200, (client, body)
    # the same client again, with a forged address left of the one the proxy wrote
    status, _, _ = await setup.get("/rl-ip/echo", "X-Forwarded-For: 203.0.113.9, 198.51.100.1")
    assert status == 429
    # a peer the listener does not trust is its own client, whatever it forwards
    status, _, _ = await setup.get("/rl-ip/echo", "X-Forwarded-For: 10.1.1.1", source="127.0.0.2")
    assert status == 200
    status, _, _ = await setup.get("/rl-ip/echo", "X-Forwarded-For: 10.1.1.2", source="127.0.0.2")
    assert status == 429


async def test_the_consumer_key_falls_back_to_the_client_a_trusted_proxy_names(
    setup: Setup,
) -> None:
    for client in ("198.51.100.1", "198.51.100.2"):
        status, _, body = await setup.get("/rl-consumer/echo", f"X-Forwarded-For: {client}")
        assert status == 200, (client, body)
    status, _, _ = await setup.get("/rl-consumer/echo", "X-Forwarded-For: 198.51.100.2")
    assert status == 429


# ============================================================================ 3. rate_limit headers
async def test_the_upstreams_ratelimit_headers_never_pass_with_the_store_down(
    setup: Setup,
) -> None:
    target = "/rl-down/respond?h=RateLimit-Remaining:999&h=RateLimit-Limit:1000&h=X-Kept:1"
    for _ in range(3):  # on_store_error: allow admits them all, with no decision to report
        status, headers, body = await setup.get(target)
        assert status == 200, body
        assert ("x-kept", "1") in headers
        assert [name for name, _ in headers if name.startswith("ratelimit")] == []
