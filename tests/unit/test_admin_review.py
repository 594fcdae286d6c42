"""Admin API review fixes, without sockets: registration metadata nested too deeply, credentials
in request_transform headers and queries shown in clear, and `apigate status` writing
registered strings raw to the terminal."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import BaseModel

from apigate.admin.api import AdminApi, parse_registration, redact_secrets, refuse_redacted
from apigate.admin.http import AdminError, AdminRequest
from apigate.config.schema import GatewayConfig
from apigate.ops import render_status
from apigate.plugins.chain import BUILTIN, resolve
from apigate.redaction import REDACTED
from tests.unit.test_review_fixes_admin import admin_api

URL = "http://127.0.0.1:9002"
DEPTH_BOUND = 32  # levels of objects and arrays a registration's metadata may nest


def _nested(depth: int) -> dict[str, Any]:
    """Metadata `depth` levels of objects and arrays deep, the metadata object included."""
    value: Any = []
    for _ in range(depth - 2):
        value = [value]
    return {"m": value}


def _doc() -> dict[str, Any]:
    return {
        "version": 1,
        "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
        "services": {"users": {}},
        "routes": [{"name": "users", "match": {"paths": ["/users"]}, "service": "users"}],
    }


@pytest.fixture
async def admin() -> AsyncIterator[AdminApi]:
    async for api in admin_api(_doc()):
        yield api


async def _call(api: AdminApi, method: str, path: str, body: bytes = b"") -> tuple[int, Any]:
    req = AdminRequest(method, path, {}, {}, body, "127.0.0.1")
    try:
        reply = await api.handle(req)
    except AdminError as exc:
        return exc.status, {"error": exc.code, "message": exc.message}
    return reply.status, json.loads(reply.body)


# ---------------------------------------------------------------------- 1. metadata depth


def test_metadata_nested_980_levels_deep_is_refused() -> None:
    body = {"url": URL, "ttl": "1h", "metadata": _nested(980)}
    with pytest.raises(AdminError) as caught:
        parse_registration("users", "evil", body)
    assert (caught.value.status, caught.value.code) == (400, "invalid_body")
    assert f"nested more than {DEPTH_BOUND} levels" in caught.value.message


def test_metadata_depth_bound_counts_objects_and_arrays() -> None:
    within = {"url": URL, "metadata": _nested(DEPTH_BOUND)}
    assert parse_registration("users", "ok", within).metadata == within["metadata"]
    beyond = {"url": URL, "metadata": {"a": {"b": _nested(DEPTH_BOUND - 1)}}}
    with pytest.raises(AdminError, match="metadata: nested more than 32 levels"):
        parse_registration("users", "deep", beyond)


def test_metadata_size_is_still_bounded() -> None:
    body = {"url": URL, "metadata": {"blob": "x" * 20_000}}
    with pytest.raises(AdminError, match="bytes as JSON, at most 16384"):
        parse_registration("users", "big", body)


def test_a_misspelt_registration_key_is_explained_as_in_the_file() -> None:
    # a registration script's typo reads like a config file's: the key and a suggestion
    with pytest.raises(AdminError) as caught:
        parse_registration("users", "typo", {"url": URL, "wieght": 2})
    assert (caught.value.status, caught.value.code) == (400, "invalid_body")
    assert caught.value.message == "wieght: unknown key; did you mean 'weight'?"


def _nested_body(depth: int) -> bytes:
    """A registration body whose metadata nests `depth` levels, written out rather than
    dumped: json.dumps itself recurses per level."""
    inner = b"[" * (depth - 1) + b"]" * (depth - 1)
    return b'{"url": "%s", "ttl": "1h", "metadata": {"m": %s}}' % (URL.encode(), inner)


async def test_a_deep_registration_is_refused_and_get_services_keeps_answering(
    admin: AdminApi,
) -> None:
    """900 levels were taken (201). In the gateway, ~978 levels were taken too, and then the
    reply to GET /services, dumped with indent=2 from a deeper stack, hit the recursion limit:
    a 500 for the instance's TTL."""
    status, doc = await _call(admin, "PUT", "/services/users/instances/evil", _nested_body(900))
    assert status == 400 and doc["error"] == "invalid_body", (status, doc)
    deepest = _nested_body(DEPTH_BOUND)
    assert (await _call(admin, "PUT", "/services/users/instances/ok", deepest))[0] == 201
    for path in ("/services", "/services/users"):
        assert (await _call(admin, "GET", path))[0] == 200


# ---------------------------------------------------------------------- 2. credentials in clear


def _transform(headers: dict[str, str], query: dict[str, str]) -> dict[str, Any]:
    return {
        "request_transform": {
            "headers": {"set": headers, "add": headers},
            "query": {"set": query, "add": query},
        }
    }


SECRET_HEADERS = {"apikey": "k-1", "X-Upstream-Token": "t-1", "X-Client-Secret": "s-1"}
SECRET_QUERY = {"api_key": "k-2", "access_token": "t-2", "Token": "t-3"}


def test_transform_headers_and_query_credentials_are_redacted() -> None:
    shown = redact_secrets(_transform(SECRET_HEADERS, SECRET_QUERY))["request_transform"]
    for op in ("set", "add"):
        assert shown["headers"][op] == dict.fromkeys(SECRET_HEADERS, REDACTED)
        assert shown["query"][op] == dict.fromkeys(SECRET_QUERY, REDACTED)


def test_ordinary_headers_and_names_are_shown() -> None:
    plain = _transform({"X-Tenant": "acme", "X-Request-Source": "gw"}, {"page": "1", "key": "k"})
    # maps of names to names: a rename's target, the header a claim is forwarded in
    plain["request_transform"]["headers"]["rename"] = {"apikey": "x-upstream-token"}
    plain["jwt"] = {"forward_claims": {"token": "X-User-Token", "sub": "X-Consumer-Key"}}
    assert redact_secrets(plain) == plain
    # a map keyed by a user's names (a service called "auth") is walked, not hidden whole
    services = {"services": {"auth": {"targets": ["http://127.0.0.1:9001"]}}}
    assert redact_secrets(services) == services


def test_a_redacted_transform_credential_sent_back_is_refused() -> None:
    shown = redact_secrets(_transform(SECRET_HEADERS, SECRET_QUERY))
    with pytest.raises(AdminError) as caught:
        refuse_redacted(shown)
    assert (caught.value.status, caught.value.code) == (400, "redacted_value")


# names ending in "-key" whose values are not secrets: a request id, a path, a region
KEY_NAMED_HEADERS = {"Idempotency-Key": "{request_id}", "X-Cache-Key": "{path}"}
KEYED_ROUTE = {
    "name": "users",
    "match": {"paths": ["/users"], "headers": {"x-routing-key": "eu"}},
    "service": "users",
    "plugins": {"request_transform": {"headers": {"set": KEY_NAMED_HEADERS}}},
}


def test_headers_ending_in_key_are_shown_but_api_keys_stay_redacted() -> None:
    assert redact_secrets(KEYED_ROUTE) == KEYED_ROUTE
    credentials = {"X-Api-Key": "k-1", "X-Upstream-Token": "t-1", "api-key": "k-2"}
    shown = redact_secrets(_transform(credentials, {"apikey": "k-3", "api_key": "k-4"}))
    assert shown["request_transform"]["headers"]["set"] == dict.fromkeys(credentials, REDACTED)
    assert shown["request_transform"]["query"]["set"] == {"apikey": REDACTED, "api_key": REDACTED}


async def test_a_route_with_key_named_headers_goes_round_trip() -> None:
    """Idempotency-Key set by a transform and an x-routing-key match were shown redacted, and
    a PUT of the route as GET showed it was refused 400 redacted_value."""
    doc = {**_doc(), "routes": [KEYED_ROUTE]}
    async for api in admin_api(doc):
        status, shown = await _call(api, "GET", "/routes/users")
        assert status == 200, shown
        status, stored = await _call(api, "PUT", "/routes/users", json.dumps(shown).encode())
        assert status == 200, stored
        for route in (shown, stored):
            assert route["match"]["headers"] == {"x-routing-key": "eu"}
            assert route["plugins"]["request_transform"]["headers"]["set"] == KEY_NAMED_HEADERS


def _field_names(model: type[BaseModel], seen: set[type[BaseModel]]) -> set[str]:
    """Every field name (and alias) of `model` and of the models its fields hold."""
    if model in seen:
        return set()
    seen.add(model)
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names |= {name, field.alias or name}
        for nested in _models_in(field.annotation):
            names |= _field_names(nested, seen)
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def test_no_setting_name_is_taken_for_a_credential_but_the_secret_ones() -> None:
    seen: set[type[BaseModel]] = set()
    names = _field_names(GatewayConfig, seen)
    for plugin in BUILTIN:
        names |= _field_names(resolve(plugin).Config, seen)
    assert {"key", "header", "query_param", "token", "password", "secret"} <= names
    caught = {name for name in names if redact_secrets({name: "x"}) == {name: REDACTED}}
    # (jwt's `cookie`, the name of the cookie holding the token, was caught before this review:
    # a header named Cookie is a credential's and a key alone cannot tell the two apart)
    assert caught == {"token", "password", "secret", "api_keys", "cookie"}


# ---------------------------------------------------------------------- 3. terminal escapes

HEALTH = {"version": "1.0", "uptime_s": 5}
HOSTILE = [
    "http://127.0.0.1:9001/\u009b2J\u009b31mRED",
    "\u009d8;;http://evil.example\u009c",
    "a\u202eb",
    "tab\there\nnewline\x07",
]


def _status_of(text: str) -> str:
    inst = {"id": text, "url": text, "origin": text, "healthy": True, "weight": 1}
    services = {"services": [{"name": text, "instances": [inst], "breaker": {"state": text}}]}
    route = {"name": text, "match": {"methods": [text], "paths": [text]}, "service": text}
    health = dict(HEALTH, version=text)
    return render_status("http://127.0.0.1:8001", health, services, {"routes": [route]}, None)


@pytest.mark.parametrize("text", HOSTILE)
def test_status_escapes_what_a_terminal_would_act_on(text: str) -> None:
    printed = _status_of(text)
    assert all(ch.isprintable() or ch == "\n" for ch in printed), repr(printed)
    assert printed.count("\n") == _status_of("plain").count("\n")


def test_status_shows_escapes_as_python_writes_them() -> None:
    printed = _status_of(HOSTILE[0])
    assert "http://127.0.0.1:9001/\\u009b2J\\u009b31mRED" in printed
    assert "a\\u202eb" in _status_of(HOSTILE[2])
    assert "a\\U000e0001b" in _status_of("a\U000e0001b")  # (a tag character: format, astral)
    assert "naïve-日本" in _status_of("naïve-日本")  # printable text stays as it is
