"""Admin API review fixes against a real gateway: registration metadata nested too deeply,
credentials in request_transform headers and queries, and `apigate status` on hostile
registered strings."""

from __future__ import annotations

import asyncio
import io
from typing import Any

from apigate.ops import cmd_status
from apigate.redaction import REDACTED
from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import request

ADMIN = {"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}}
UPSTREAM = "http://127.0.0.1:9002"


def _config(**extra: Any) -> dict[str, Any]:
    return base_config(listeners=ADMIN, services={"users": {}}, **extra)


def _nested_body(depth: int) -> bytes:
    """A registration whose metadata nests `depth` levels, as the finding sent it."""
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    return b'{"url": "%s", "ttl": "1h", "metadata": {"m": %s}}' % (UPSTREAM.encode(), inner)


async def test_deep_metadata_is_refused_and_services_keep_answering() -> None:
    """Metadata ~980 levels deep was taken (201), and GET /services answered 500 for the
    instance's TTL. (The last level json.loads takes here depends on the stack: 978 did, 980
    was already refused as a body nested too deeply; both are 400 now, whatever the message.)"""
    async with GatewayProcess(_config()) as gw:
        json_type = {"Content-Type": "application/json"}
        for depth in (33, 500, 978):
            path = f"/services/users/instances/deep-{depth}"
            body = _nested_body(depth)
            reply = await request(gw.admin_port, "PUT", path, body=body, headers=json_type)
            assert reply.status == 400, reply.body
            if depth < 978:
                assert "nested more than 32 levels" in reply.json()["message"]
        for listing in ("/services", "/services/users"):
            assert (await request(gw.admin_port, "GET", listing)).status == 200


SECRET_HEADERS = {"apikey": "key-123", "X-Upstream-Token": "tok-456"}
SECRET_QUERY = {"api_key": "key-789", "access_token": "tok-012"}


def _transform_route(headers: dict[str, str], query: dict[str, str]) -> dict[str, Any]:
    transform = {"headers": {"set": headers, "add": headers}, "query": {"set": query}}
    return {
        "name": "users",
        "match": {"paths": ["/users"]},
        "service": "users",
        "plugins": {"request_transform": transform},
    }


async def test_transform_credentials_are_redacted_everywhere_the_api_shows_them() -> None:
    cfg = _config(routes=[_transform_route(SECRET_HEADERS, SECRET_QUERY)])
    async with GatewayProcess(cfg) as gw:
        config = (await request(gw.admin_port, "GET", "/config")).json()["config"]
        listed = (await request(gw.admin_port, "GET", "/routes")).json()["routes"]
        single = (await request(gw.admin_port, "GET", "/routes/users")).json()
        for route in (config["routes"][0], listed[0], single):
            transform = route["plugins"]["request_transform"]
            assert transform["headers"]["set"] == dict.fromkeys(SECRET_HEADERS, REDACTED)
            assert transform["headers"]["add"] == dict.fromkeys(SECRET_HEADERS, REDACTED)
            assert transform["query"]["set"] == dict.fromkeys(SECRET_QUERY, REDACTED)
        # sent back as shown: refused, not stored as the upstream's credential
        refused = await request(gw.admin_port, "POST", "/config", json_body=config)
        assert (refused.status, refused.json()["error"]) == (400, "redacted_value")
        put = await request(gw.admin_port, "PUT", "/routes/users", json_body=single)
        assert (put.status, put.json()["error"]) == (400, "redacted_value")


async def test_a_config_without_credentials_goes_round_trip() -> None:
    plain = {"X-Tenant": "acme", "X-Request-Source": "gateway"}
    cfg = _config(routes=[_transform_route(plain, {"page": "1", "key": "k"})])
    async with GatewayProcess(cfg) as gw:
        shown = await request(gw.admin_port, "GET", "/config")
        doc = shown.json()["config"]
        assert doc["routes"][0]["plugins"]["request_transform"]["headers"]["set"] == plain
        doc["routes"][0]["match"]["paths"] = ["/people"]
        headers = {"If-Match": shown.headers["etag"]}
        posted = await request(gw.admin_port, "POST", "/config", json_body=doc, headers=headers)
        assert posted.status == 200, posted.body
        route = (await request(gw.admin_port, "GET", "/routes/users")).json()
        assert route["match"]["paths"] == ["/people"]


async def test_key_named_headers_go_round_trip_and_api_keys_stay_redacted() -> None:
    """Names ending in "-key" are not credentials (Idempotency-Key, X-Cache-Key, a match on
    x-routing-key): GET then PUT of the route was refused 400 redacted_value. X-Api-Key and
    X-Upstream-Token values are still redacted."""
    plain = {"Idempotency-Key": "{request_id}", "X-Cache-Key": "{path}"}
    keyed = _transform_route(plain, {"page": "1"})
    keyed["match"]["headers"] = {"x-routing-key": "eu"}
    secret = {"X-Api-Key": "key-123", "X-Upstream-Token": "tok-456"}
    guarded = {**_transform_route(secret, {}), "name": "admin", "match": {"paths": ["/admin"]}}
    async with GatewayProcess(_config(routes=[keyed, guarded])) as gw:
        shown = (await request(gw.admin_port, "GET", "/routes/users")).json()
        assert shown["match"]["headers"] == {"x-routing-key": "eu"}
        assert shown["plugins"]["request_transform"]["headers"]["set"] == plain
        put = await request(gw.admin_port, "PUT", "/routes/users", json_body=shown)
        assert put.status == 200, put.body
        guarded_shown = (await request(gw.admin_port, "GET", "/routes/admin")).json()
        transform = guarded_shown["plugins"]["request_transform"]["headers"]
        assert transform["set"] == transform["add"] == dict.fromkeys(secret, REDACTED)


async def test_status_prints_hostile_registered_strings_escaped() -> None:
    """C1 controls in a URL are accepted at registration (ESC and CR are not): `apigate
    status` wrote them to the terminal as they were."""
    async with GatewayProcess(_config()) as gw:
        url = UPSTREAM + "/\u009b2J\u009b31mRED\u202e"
        reg = {"url": url, "ttl": "1h"}
        reply = await request(gw.admin_port, "PUT", "/services/users/instances/i1", json_body=reg)
        assert reply.status == 201, reply.body
        out = io.StringIO()
        assert await asyncio.to_thread(cmd_status, gw.admin_url, "", out) == 0
        printed = out.getvalue()
        assert "/\\u009b2J\\u009b31mRED\\u202e" in printed
        assert all(ch.isprintable() or ch == "\n" for ch in printed), repr(printed)
