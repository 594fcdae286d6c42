"""The key_auth plugin: keys of `consumers:` from a header or the query, held only as digests."""

from __future__ import annotations

import hashlib
from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.plugins.key_auth import KeyAuthPlugin
from tests.unit.test_plugin_fakes import body, build, header, make_ctx, make_env, resolve

CONSUMERS: list[dict[str, Any]] = [
    {"name": "alice", "api_keys": ["alice-key-1", "alice-key-2"], "groups": ["admins"]},
    {"name": "bob", "api_keys": ["bob-key"]},
    {"name": "carol"},
]


@pytest.fixture
def plugin() -> KeyAuthPlugin:
    built: KeyAuthPlugin = build(
        "key_auth",
        {"header_names": ["apikey", "X-API-Key"], "query_param": "api_key"},
        make_env(CONSUMERS),
    )
    return built


def test_keys_are_stored_only_as_sha256_digests(plugin: KeyAuthPlugin) -> None:
    assert set(plugin.keys) == {
        hashlib.sha256(k).digest() for k in (b"alice-key-1", b"alice-key-2", b"bob-key")
    }


@pytest.mark.parametrize("name", ["apikey", "X-API-Key", "x-api-key"])
def test_a_key_in_a_header_names_its_consumer(plugin: KeyAuthPlugin, name: str) -> None:
    ctx = make_ctx(headers=[(name, "alice-key-2"), ("Accept", "*/*")])
    assert resolve(plugin.on_request(ctx)) is None
    assert ctx.consumer.name == "alice"
    assert ctx.request.headers == [(b"Accept", b"*/*")]  # hidden from the upstream


def test_a_key_in_the_query(plugin: KeyAuthPlugin) -> None:
    ctx = make_ctx(query=b"a=1&api_key=bob-key&b=2")
    assert resolve(plugin.on_request(ctx)) is None
    assert ctx.consumer.name == "bob"
    assert ctx.request.query == b"a=1&b=2"
    encoded = make_ctx(query=b"api%5Fkey=bob%2Dkey")
    assert resolve(plugin.on_request(encoded)) is None


def test_missing_and_wrong_keys_are_401(plugin: KeyAuthPlugin) -> None:
    for ctx, message in [
        (make_ctx(), "missing API key"),
        (make_ctx(headers=[("apikey", "")]), "missing API key"),
        (make_ctx(headers=[("apikey", "nope")]), "invalid API key"),
        (make_ctx(headers=[("apikey", "alice-key-1x")]), "invalid API key"),
        (make_ctx(query=b"api_key=ALICE-KEY-1"), "invalid API key"),
        (
            make_ctx(headers=[("apikey", "alice-key-1"), ("x-api-key", "bob-key")]),
            "several different API keys",
        ),
        (
            make_ctx(headers=[("apikey", "alice-key-1")], query=b"api_key=bob-key"),
            "several different API keys",
        ),
    ]:
        outcome = resolve(plugin.on_request(ctx))
        assert outcome is not None and outcome.status == 401
        assert header(outcome, "WWW-Authenticate") == 'ApiKey realm="apigate"'
        assert body(outcome)["message"] == message
        assert ctx.consumer is None


def test_credentials_can_be_kept_for_the_upstream() -> None:
    plugin = build("key_auth", {"hide_credentials": False}, make_env(CONSUMERS))
    ctx = make_ctx(headers=[("apikey", "bob-key")])
    assert resolve(plugin.on_request(ctx)) is None
    assert ctx.request.header("apikey") == "bob-key"


def test_default_header_is_apikey_only() -> None:
    plugin = build("key_auth", {}, make_env(CONSUMERS))
    assert resolve(plugin.on_request(make_ctx(headers=[("apikey", "bob-key")]))) is None
    outcome = resolve(plugin.on_request(make_ctx(headers=[("x-api-key", "bob-key")])))
    assert outcome is not None and outcome.status == 401


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="the key has to come from somewhere"):
        build("key_auth", {"header_names": []})
    with pytest.raises(ConfigError, match="invalid header name"):
        build("key_auth", {"header_names": ["bad header"]})
    with pytest.raises(ConfigError, match="did you mean 'query_param'"):
        build("key_auth", {"query_parm": "k"})
