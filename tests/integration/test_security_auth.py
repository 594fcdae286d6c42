"""Authentication and edge security through a real gateway process and a real upstream.

One gateway serves every case (routes per plugin), so the file costs one process start.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from tests.support.gateway import GatewayProcess, base_config, raw_request
from tests.support.upstream import Upstream

SECRET = "integration-secret-0123456789abcdef"
API_KEY = "k-3f9a2c51d7e84b06"


def token(**claims: Any) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    signing_input = f"{head}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def _config(upstream_url: str) -> dict[str, Any]:
    return base_config(
        services={"up": {"targets": [upstream_url]}},
        consumers=[
            {"name": "alice", "groups": ["admins"], "api_keys": ["${ALICE_KEY}"]},
            {"name": "bob", "groups": ["users"]},
        ],
        routes=[
            {
                "name": "jwt",
                "match": {"paths": ["/jwt"]},
                "service": "up",
                "plugins": {
                    "jwt": {
                        "secret": "${JWT_SECRET}",
                        "algorithms": ["HS256"],
                        "issuer": "apigate-tests",
                        "forward_claims": {"sub": "X-User-Id", "tenant": "X-Tenant"},
                    },
                    "acl": {"allow": ["admins"]},
                },
            },
            {
                "name": "keys",
                "match": {"paths": ["/keys"]},
                "service": "up",
                "plugins": {"key_auth": {"header_names": ["apikey", "x-api-key"]}},
            },
            {
                "name": "edge",
                "match": {"paths": ["/edge"]},
                "service": "up",
                "plugins": {
                    "cors": {"origins": ["https://app.example.com"], "max_age": "1h"},
                    "request_size": {"max_bytes": 100},
                    "ip_filter": {"deny": ["192.0.2.0/24"]},
                },
            },
            {
                "name": "blocked",
                "match": {"paths": ["/blocked"]},
                "service": "up",
                "plugins": {"ip_filter": {"allow": ["10.0.0.0/8"]}},
            },
        ],
    )


class Setup:
    def __init__(self, up: Upstream, gw: GatewayProcess) -> None:
        self.up = up
        self.gw = gw

    async def get(
        self, path: str, *headers: str, method: str = "GET", body: bytes = b""
    ) -> tuple[int, dict[str, str], bytes]:
        lines = [f"{method} {path} HTTP/1.1", "Host: gw.test", "Connection: close", *headers]
        if body:
            lines.append(f"Content-Length: {len(body)}")
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode() + body
        resp = await raw_request(self.gw.port, raw, until_close=True)
        head, _, payload = resp.partition(b"\r\n\r\n")
        status_line, *fields = head.decode("latin-1").split("\r\n")
        parsed = {}
        for line in fields:
            name, _, value = line.partition(":")
            parsed[name.strip().lower()] = value.strip()
        return int(status_line.split()[1]), parsed, payload


pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup() -> AsyncIterator[Setup]:
    env = {"JWT_SECRET": SECRET, "ALICE_KEY": API_KEY}
    async with Upstream() as up, GatewayProcess(_config(up.url), env=env) as gw:
        yield Setup(up, gw)
        logs = "\n".join(gw.stderr_lines + gw.stdout_lines)
        assert SECRET not in logs and API_KEY not in logs  # secrets never reach a log


async def test_jwt_401_then_200_with_forwarded_claims(setup: Setup) -> None:
    status, headers, body = await setup.get("/jwt/echo")
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="apigate"'
    assert json.loads(body)["error"] == "unauthorized"

    expired = token(sub="alice", iss="apigate-tests", exp=time.time() - 3600)
    status, headers, body = await setup.get("/jwt/echo", f"Authorization: Bearer {expired}")
    assert status == 401
    assert headers["www-authenticate"] == 'Bearer realm="apigate", error="invalid_token"'
    assert json.loads(body)["message"] == "token expired"

    good = token(sub="alice", iss="apigate-tests", exp=time.time() + 3600)
    for _ in range(2):  # the second one is served from the verified-token cache
        status, _, body = await setup.get(
            "/jwt/echo", f"Authorization: Bearer {good}", "X-User-Id: root", "X-Tenant: evil"
        )
        assert status == 200, body
        got = setup.up.received[-1]
        assert got.header_values("x-user-id") == ["alice"]
        assert got.header_values("x-tenant") == []  # no such claim: the client's copy is gone


async def test_jwt_then_acl_403_for_a_consumer_outside_the_group(setup: Setup) -> None:
    bob = token(sub="bob", iss="apigate-tests")
    status, _, body = await setup.get("/jwt/echo", f"Authorization: Bearer {bob}")
    assert status == 403 and json.loads(body)["error"] == "forbidden"
    stranger = token(sub="nobody", iss="apigate-tests")
    status, _, _ = await setup.get("/jwt/echo", f"Authorization: Bearer {stranger}")
    assert status == 403


async def test_key_auth(setup: Setup) -> None:
    status, headers, _ = await setup.get("/keys/echo")
    assert status == 401 and headers["www-authenticate"] == 'ApiKey realm="apigate"'
    status, _, _ = await setup.get("/keys/echo", "apikey: wrong")
    assert status == 401
    count = len(setup.up.received)
    status, _, _ = await setup.get("/keys/echo", f"X-API-Key: {API_KEY}")
    assert status == 200
    assert len(setup.up.received) == count + 1
    assert setup.up.received[-1].header("x-api-key") is None  # hidden from the upstream


async def test_cors_preflight_never_reaches_the_upstream(setup: Setup) -> None:
    count = len(setup.up.received)
    status, headers, _ = await setup.get(
        "/edge/echo",
        "Origin: https://app.example.com",
        "Access-Control-Request-Method: POST",
        method="OPTIONS",
    )
    assert status == 204
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert headers["access-control-max-age"] == "3600"
    status, _, _ = await setup.get(
        "/edge/echo",
        "Origin: https://evil.example.com",
        "Access-Control-Request-Method: POST",
        method="OPTIONS",
    )
    assert status == 403
    assert len(setup.up.received) == count
    status, headers, _ = await setup.get("/edge/echo", "Origin: https://app.example.com")
    assert status == 200
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert "Origin" in headers["vary"]


async def test_request_size_and_ip_filter(setup: Setup) -> None:
    status, _, _ = await setup.get("/edge/echo", method="POST", body=b"x" * 100)
    assert status == 200
    status, _, body = await setup.get("/edge/echo", method="POST", body=b"x" * 101)
    assert status == 413 and json.loads(body)["error"] == "payload_too_large"
    status, _, body = await setup.get("/blocked/echo")
    assert status == 403 and json.loads(body)["error"] == "ip_forbidden"
