"""Consumers' JWT credentials (the jwt plugin's `key_claim_name`, Kong's model) through a real
gateway process and a real upstream: the token's `iss` picks the credential, the upstream
learns the consumer, and a credential changed through the admin API or removed by a reload
stops a token the gateway had already verified (and cached)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.gateway import GatewayProcess, base_config, raw_request
from tests.support.http import request
from tests.support.upstream import Upstream

ALICE_SECRET = "alice-integration-secret-0123456789"
ROTATED_SECRET = "alice-rotated-secret-9876543210-abcdef"
BOB_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _config(up: Upstream, bob_pem: Path, *, with_bob: bool = True) -> dict[str, Any]:
    people: list[dict[str, Any]] = [
        {
            "name": "alice",
            "groups": ["admins"],
            "jwt_credentials": [{"key": "alice-iss", "secret": "${ALICE_JWT_SECRET}"}],
        }
    ]
    if with_bob:
        credential = {"key": "bob-iss", "algorithm": "RS256", "public_key_file": str(bob_pem)}
        people.append({"name": "bob", "jwt_credentials": [credential]})
    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={"up": {"targets": [up.url]}},
        consumers=people,
        routes=[
            {
                "name": "api",
                "match": {"paths": ["/api"]},
                "service": "up",
                "plugins": {"jwt": {"key_claim_name": "iss"}},
            }
        ],
    )


async def _get(gw: GatewayProcess, token: str | None) -> tuple[int, dict[str, Any]]:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    raw = f"GET /api/echo HTTP/1.1\r\nHost: gw.test\r\n{auth}Connection: close\r\n\r\n"
    answer = await raw_request(gw.port, raw.encode(), until_close=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if status != 200 else {}


async def test_consumer_credentials_through_a_gateway(tmp_path: Path) -> None:
    bob_pem = tmp_path / "bob.pem"
    bob_pem.write_bytes(
        BOB_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    exp = time.time() + 3600
    alice = jwt.encode({"iss": "alice-iss", "sub": "bob", "exp": exp}, ALICE_SECRET, "HS256")
    bob = jwt.encode({"iss": "bob-iss", "exp": exp}, BOB_KEY, "RS256")
    env = {"ALICE_JWT_SECRET": ALICE_SECRET}
    async with Upstream() as up, GatewayProcess(_config(up, bob_pem), env=env) as gw:
        assert (await _get(gw, None))[0] == 401
        stranger = jwt.encode({"iss": "nobody"}, ALICE_SECRET, "HS256")
        status, doc = await _get(gw, stranger)
        assert (status, doc["message"]) == (401, "no credentials found for given 'iss'")
        forged = jwt.encode({"iss": "bob-iss"}, ALICE_SECRET, "HS256")  # HS256 for an RS256 key
        assert (await _get(gw, forged))[1]["message"] == "algorithm not allowed"

        for _ in range(2):  # verified, then from the cache
            assert (await _get(gw, alice))[0] == 200
            got = up.received[-1]
            assert got.header_values("x-consumer-username") == ["alice"]  # not `sub`'s bob
            assert got.header_values("x-consumer-groups") == ["admins"]
        assert (await _get(gw, bob))[0] == 200
        assert up.received[-1].header_values("x-consumer-username") == ["bob"]

        shown = await request(gw.admin_port, "GET", "/consumers/alice")
        assert shown.json()["jwt_credentials"][0]["secret"] == "[redacted]"

        # an admin PUT rotates alice's secret: her cached token is refused at once
        rotated = {"key": "alice-iss", "secret": ROTATED_SECRET}
        put = await request(
            gw.admin_port,
            "PUT",
            "/consumers/alice",
            json_body={"groups": ["admins"], "jwt_credentials": [rotated]},
        )
        assert put.status == 200, put.body
        assert ROTATED_SECRET.encode() not in put.body
        status, doc = await _get(gw, alice)
        assert (status, doc["message"]) == (401, "invalid signature")
        renewed = jwt.encode({"iss": "alice-iss"}, ROTATED_SECRET, "HS256")
        assert (await _get(gw, renewed))[0] == 200

        # a reload of a file without bob: his cached token is refused
        gw.write_config(_config(up, bob_pem, with_bob=False))
        gw.signal(signal.SIGHUP)
        await gw.wait_for_log("config reloaded")
        status, doc = await _get(gw, bob)
        assert (status, doc["message"]) == (401, "no credentials found for given 'iss'")
        assert (await _get(gw, renewed))[0] == 200  # the admin's alice is kept over the file

        logs = gw.logs()
        assert ALICE_SECRET not in logs and ROTATED_SECRET not in logs
