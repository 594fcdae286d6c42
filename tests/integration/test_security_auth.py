"""Authentication and edge security through a real gateway process and a real upstream.

One gateway serves every case (routes per plugin), so the file costs one process start.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import statistics
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import rsa

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


def pbkdf2_hash(password: str, iterations: int) -> str:
    salt = os.urandom(8).hex()
    derived = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(derived).decode()}"


JWKS_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def canned_jwks() -> bytes:
    """The JWKS the upstream serves: one key, published without a `kid`."""
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(JWKS_KEY.public_key()))
    doc = json.dumps({"keys": [{**jwk, "use": "sig", "alg": "RS256"}]}).encode()
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (
        len(doc),
        doc,
    )


def _config(upstream_url: str) -> dict[str, Any]:
    return base_config(
        services={"up": {"targets": [upstream_url]}},
        consumers=[
            {
                "name": "alice",
                "groups": ["admins", "ops"],
                "api_keys": ["${ALICE_KEY}"],
                "custom_id": "A-1",
            },
            {"name": "bob", "groups": ["users"]},
            {
                "name": "carol",
                "basic_auth": {"username": "carol", "password": pbkdf2_hash("pw", 100_000)},
            },
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
                "name": "jwks",
                "match": {"paths": ["/jwks-route"]},
                "service": "up",
                "plugins": {
                    "jwt": {"jwks_url": f"{upstream_url}/jwks.json", "algorithms": ["RS256"]}
                },
            },
            {
                "name": "basic",
                "match": {"paths": ["/basic"]},
                "service": "up",
                "plugins": {"basic_auth": {}},
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
                "name": "cors",
                "match": {"paths": ["/respond"]},  # the upstream answers with the asked headers
                "service": "up",
                "plugins": {"cors": {"origins": ["https://app.example.com"]}},
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
    async with Upstream() as up:
        up.state.canned["/jwks.json"] = canned_jwks()  # fetched as the gateway starts
        async with GatewayProcess(_config(up.url), env=env) as gw:
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


async def test_jwt_exp_must_be_a_number(setup: Setup) -> None:
    # PyJWT accepts "exp": "<digits>"; such a token used to be cached for 5 minutes past it.
    count = len(setup.up.received)
    for exp in (str(int(time.time()) + 3), str(int(time.time()) + 3600)):
        text = token(sub="alice", iss="apigate-tests", exp=exp)
        status, headers, body = await setup.get("/jwt/echo", f"Authorization: Bearer {text}")
        assert status == 401, body
        assert headers["www-authenticate"] == 'Bearer realm="apigate", error="invalid_token"'
        assert json.loads(body)["message"] == "token's 'exp' claim is not a number"
    assert len(setup.up.received) == count


async def test_jwt_forward_claims_remove_underscore_variants(setup: Setup) -> None:
    good = token(sub="alice", iss="apigate-tests", exp=time.time() + 3600)
    for _ in range(2):  # verified, then from the cache
        status, _, body = await setup.get(
            "/jwt/echo",
            f"Authorization: Bearer {good}",
            "X_User_Id: root",
            "x_user-id: root2",
            "X_Tenant: evil",
        )
        assert status == 200, body
        got = setup.up.received[-1]
        names = {name.lower().replace("_", "-") for name, _ in got.headers}
        assert got.header_values("x-user-id") == ["alice"]
        assert got.header_values("x_user_id") == got.header_values("x_user-id") == []
        assert "x-tenant" not in names


async def test_jwks_key_without_kid_verifies_a_token_with_kid(setup: Setup) -> None:
    fetches = sum(r.path == "/jwks.json" for r in setup.up.received)
    for kid in ("k1", None):
        headers = {"kid": kid} if kid else None
        text = jwt.encode({"sub": "alice"}, JWKS_KEY, "RS256", headers=headers)
        status, _, body = await setup.get("/jwks-route/echo", f"Authorization: Bearer {text}")
        assert status == 200, body
    assert sum(r.path == "/jwks.json" for r in setup.up.received) == fetches  # no refetch


async def test_basic_auth_unknown_user_is_as_slow_as_a_known_one(setup: Setup) -> None:
    # carol's hash is pbkdf2_sha256 with 100k iterations (~30 ms); an unknown user used to be
    # answered in ~1 ms, which told an attacker which usernames exist.
    def creds(user: str) -> str:
        return "Authorization: Basic " + base64.b64encode(f"{user}:wrong".encode()).decode()

    async def timed(user: str) -> float:
        started = time.perf_counter()
        status, _, _ = await setup.get("/basic/echo", creds(user))
        assert status == 401
        return time.perf_counter() - started

    known, unknown = [], []
    for _ in range(5):  # interleaved, medians: a hiccup of the machine moves neither much
        known.append(await timed("carol"))
        unknown.append(await timed("mallory"))
    assert statistics.median(unknown) > 0.5 * statistics.median(known), (known, unknown)


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


SPOOFED_IDENTITY = (
    "X-Consumer-Username: mallory",
    "X-Consumer-Groups: root",
    "X-Consumer-ID: 7",
    "X_Consumer_Custom_ID: M-1",
    "X-Credential-Identifier: stolen",
    "X-Anonymous-Consumer: false",
)
IDENTITY_FIELDS = (
    "x-consumer-username",
    "x-consumer-custom-id",
    "x-consumer-groups",
    "x-consumer-id",
    "x_consumer_custom_id",
    "x-credential-identifier",
    "x-anonymous-consumer",
)


async def test_the_upstream_learns_the_consumer_and_no_client_made_identity(
    setup: Setup,
) -> None:
    """A client's X-Consumer-* reached the upstream as sent, and the gateway named no consumer:
    an upstream migrated from Kong, which believes those fields, took mallory for alice
    (Kong-migration audit)."""
    status, _, _ = await setup.get("/keys/echo", f"X-API-Key: {API_KEY}", *SPOOFED_IDENTITY)
    assert status == 200
    got = setup.up.received[-1]
    assert got.header_values("x-consumer-username") == ["alice"]
    assert got.header_values("x-consumer-custom-id") == ["A-1"]
    assert got.header_values("x-consumer-groups") == ["admins, ops"]
    assert got.header_values("x-consumer-id") == ["alice"]  # the name: no other id here
    for name in IDENTITY_FIELDS[4:]:  # an API key has no name; not anonymous
        assert got.header(name) is None, name
    status, _, _ = await setup.get("/edge/echo", *SPOOFED_IDENTITY)  # a route without auth
    assert status == 200
    got = setup.up.received[-1]
    for name in IDENTITY_FIELDS:
        assert got.header(name) is None, name


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


async def test_request_size_cuts_a_chunked_body_that_grows_past_max_bytes(setup: Setup) -> None:
    """As the README says: a chunked body is streamed, so its head and first chunk may be
    upstream already; past max_bytes the client gets a 413 and the upstream never a whole
    request."""
    before, bytes_before = len(setup.up.received), setup.up.state.bytes_received
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.gw.port)
    try:
        writer.write(
            b"POST /edge/echo HTTP/1.1\r\nHost: gw.test\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3c\r\n" + b"a" * 60 + b"\r\n"
        )
        await asyncio.sleep(0.2)  # the first chunk goes upstream on its own
        writer.write(b"3c\r\n" + b"b" * 60 + b"\r\n0\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)  # the gateway closes after it
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 413 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"] == "payload_too_large"
    await asyncio.sleep(0.2)
    assert len(setup.up.received) == before  # no complete request reached the upstream
    assert setup.up.state.bytes_received > bytes_before  # (its beginning did: streamed)


async def test_cors_policy_is_authoritative_over_the_upstreams(setup: Setup) -> None:
    upstream_cors = "&".join(
        "h=" + quote(field)
        for field in (
            "Access-Control-Allow-Origin:*",
            "Access-Control-Allow-Credentials:true",
            "Access-Control-Expose-Headers:X-Secret",
            "Access-Control-Max-Age:86400",
            "Vary:Accept-Encoding",
        )
    )
    path = f"/respond?{upstream_cors}"
    for origin in ("Origin: https://evil.com", None):
        status, headers, _ = await setup.get(path, *([origin] if origin else []))
        assert status == 200
        assert [n for n in headers if n.startswith("access-control-")] == [], headers
        assert headers["vary"] == "Accept-Encoding, Origin"
    status, headers, _ = await setup.get(path, "Origin: https://app.example.com")
    assert headers["access-control-allow-origin"] == "https://app.example.com"
    assert "access-control-allow-credentials" not in headers  # not configured on the route
    assert headers["vary"] == "Accept-Encoding, Origin"
