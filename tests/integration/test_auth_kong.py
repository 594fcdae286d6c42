"""The auth plugins' Kong behaviours through a real gateway process and a real upstream: the
consumer headers the upstream gets (and never a client's forged copies), `anonymous` on
key_auth and jwt together (either credential works, none is the anonymous consumer, whose
own plugins and rate limit apply and whom `acl` can refuse), jwt's `maximum_expiration`, and
`run_on_preflight: false`."""

from __future__ import annotations

import json
import time
from typing import Any

import jwt

from tests.support.gateway import GatewayProcess, base_config, raw_request
from tests.support.upstream import Received, Upstream

ALICE_SECRET = "alice-integration-secret-0123456789"
ALICE_KEY = "alice-api-key-0123456789"
CREDENTIALS = [{"key": "alice-iss", "secret": ALICE_SECRET}]
EITHER = {
    "jwt": {"key_claim_name": "iss", "anonymous": "guest"},
    "key_auth": {"anonymous": "guest"},
}
FORGED = (
    "X-Consumer-ID: mallory",
    "X-Consumer-Username: mallory",
    "X_Consumer_Custom_ID: M-1",
    "X-Consumer-Groups: members",
    "X-Credential-Identifier: stolen",
    "X-Anonymous-Consumer: false",
)
IDENTITY = (
    "x-consumer-id",
    "x-consumer-username",
    "x-consumer-custom-id",
    "x_consumer_custom_id",
    "x-consumer-groups",
    "x-credential-identifier",
    "x-anonymous-consumer",
)


def _config(up: Upstream) -> dict[str, Any]:
    def route(name: str, plugins: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "match": {"paths": [f"/{name}"]}, "service": "up", "plugins": plugins}

    return base_config(
        services={"up": {"targets": [up.url]}},
        consumers=[
            {
                "name": "alice",
                "custom_id": "A-1",
                "groups": ["members"],
                "api_keys": [ALICE_KEY],
                "jwt_credentials": CREDENTIALS,
            },
            {
                "name": "guest",
                "groups": ["visitors"],
                "plugins": {
                    "request_transform": {"headers": {"add": {"X-Guest-Plugin": "ran"}}},
                    "rate_limit": {"requests": 3, "per": "1m", "burst": 2},
                },
            },
        ],
        routes=[
            route("either", EITHER),
            route("members", {**EITHER, "acl": {"allow": ["members"]}}),
            route(
                "short",
                {
                    "jwt": {
                        "key_claim_name": "iss",
                        "required_claims": ["exp"],
                        "maximum_expiration": "1h",
                    }
                },
            ),
            route("cors", {"key_auth": {"run_on_preflight": False}}),
        ],
    )


async def _call(
    gw: GatewayProcess, path: str, *headers: str, method: str = "GET"
) -> tuple[int, dict[str, Any]]:
    lines = "".join(f"{h}\r\n" for h in headers)
    raw = f"{method} {path} HTTP/1.1\r\nHost: gw.test\r\n{lines}Connection: close\r\n\r\n"
    answer = await raw_request(gw.port, raw.encode(), until_close=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if status >= 400 and body else {}


def _token(**claims: Any) -> str:
    return "Authorization: Bearer " + jwt.encode({"iss": "alice-iss", **claims}, ALICE_SECRET)


def _identity(got: Received) -> dict[str, list[str]]:
    return {name: got.header_values(name) for name in IDENTITY if got.header_values(name)}


ALICE_LINES = {
    "x-consumer-id": ["alice"],
    "x-consumer-username": ["alice"],
    "x-consumer-custom-id": ["A-1"],
    "x-consumer-groups": ["members"],
}
GUEST_LINES = {
    "x-consumer-id": ["guest"],
    "x-consumer-username": ["guest"],
    "x-consumer-groups": ["visitors"],
    "x-anonymous-consumer": ["true"],
}


async def test_kong_auth_behaviours_through_a_gateway() -> None:
    async with Upstream() as up, GatewayProcess(_config(up)) as gw:
        # either credential works, each naming alice (and, for the JWT, its credential's key)
        assert (await _call(gw, "/either/echo", _token(), *FORGED))[0] == 200
        got = up.received[-1]
        assert _identity(got) == {**ALICE_LINES, "x-credential-identifier": ["alice-iss"]}
        assert got.header("x-guest-plugin") is None
        assert (await _call(gw, "/either/echo", f"apikey: {ALICE_KEY}", *FORGED))[0] == 200
        got = up.received[-1]
        assert _identity(got) == ALICE_LINES  # an API key has no name to send
        assert got.header("apikey") is None  # hide_credentials

        # none, or a wrong one: the anonymous consumer, with its own plugins
        for credential in ("X-Nothing: 1", "apikey: wrong", _token(exp=1)):  # (an expired JWT)
            assert (await _call(gw, "/either/echo", credential, *FORGED))[0] == 200
            got = up.received[-1]
            assert _identity(got) == GUEST_LINES
            assert got.header("x-guest-plugin") == "ran"
        # ... whose rate limit is its own: 3 at once, then one every 20 s
        status, doc = await _call(gw, "/either/echo")
        assert status == 429, doc
        assert (await _call(gw, "/either/echo", f"apikey: {ALICE_KEY}"))[0] == 200

        # acl judges the anonymous consumer as any other
        status, doc = await _call(gw, "/members/echo", "apikey: wrong")
        assert (status, doc["error"]) == (403, "forbidden")
        assert (await _call(gw, "/members/echo", _token()))[0] == 200

        # maximum_expiration: a token that lives longer than an hour is refused
        soon, late = int(time.time()) + 1800, int(time.time()) + 7200
        for _ in range(2):  # verified, then from the cache
            assert (await _call(gw, "/short/echo", _token(exp=soon)))[0] == 200
        status, doc = await _call(gw, "/short/echo", _token(exp=late))
        assert (status, doc["message"]) == (
            401,
            "token's exp exceeds the maximum allowed expiration",
        )
        status, doc = await _call(gw, "/short/echo", _token())
        assert (status, doc["message"]) == (401, "token lacks the 'exp' claim")

        # run_on_preflight: false lets a CORS preflight through, and only a preflight
        count = len(up.received)
        preflight = ("Origin: https://app.example.com", "Access-Control-Request-Method: POST")
        status, _ = await _call(gw, "/cors/echo", *preflight, *FORGED, method="OPTIONS")
        assert status == 200 and len(up.received) == count + 1
        assert _identity(up.received[-1]) == {}  # no consumer, and no forged one
        assert (await _call(gw, "/cors/echo", method="OPTIONS"))[0] == 401
        assert (await _call(gw, "/cors/echo", preflight[0]))[0] == 401


async def _admin(gw: GatewayProcess, method: str, path: str) -> tuple[int, Any]:
    raw = f"{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    answer = await raw_request(gw.admin_port, raw.encode(), until_close=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


async def test_the_anonymous_consumer_cannot_be_deleted_while_a_plugin_names_it() -> None:
    async with Upstream() as up:
        cfg = _config(up)
        cfg["listeners"]["admin"] = {"address": "127.0.0.1:0"}
        async with GatewayProcess(cfg) as gw:
            status, doc = await _admin(gw, "DELETE", "/consumers/guest")
            assert (status, doc["error"]) == (400, "invalid_config"), doc
            assert "anonymous: no consumer named 'guest'" in doc["message"]
            status, doc = await _admin(gw, "GET", "/consumers")
            assert "guest" in [c["name"] for c in doc["consumers"]]
            # and it still serves the requests without a credential
            assert (await _call(gw, "/either/echo"))[0] == 200
            assert _identity(up.received[-1]) == GUEST_LINES
