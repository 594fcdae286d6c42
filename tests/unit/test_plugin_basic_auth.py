"""The basic_auth plugin: sha256 and pbkdf2 hashes, constant-time checks, slow hashes off-loop."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import importlib
import os
from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.plugins.basic_auth import BasicAuthPlugin, make_verifier, parse_basic
from tests.unit.test_plugin_fakes import body, build, header, make_ctx, make_env, resolve, settle


def sha256_hash(password: str) -> str:
    return "sha256:" + hashlib.sha256(password.encode()).hexdigest()


def pbkdf2_hash(password: str, iterations: int = 1000) -> str:
    salt = os.urandom(8).hex()
    derived = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(derived).decode()}"


CONSUMERS: list[dict[str, Any]] = [
    {"name": "alice", "basic_auth": {"username": "alice", "password": sha256_hash("wonder")}},
    {"name": "bob", "basic_auth": {"username": "bob", "password": pbkdf2_hash("builder")}},
    {"name": "carol", "api_keys": ["k"]},
]


def basic(user: str, password: str) -> list[tuple[str, str]]:
    return [("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())]


@pytest.fixture
def plugin() -> BasicAuthPlugin:
    built: BasicAuthPlugin = build("basic_auth", {}, make_env(CONSUMERS))
    return built


def test_sha256_password(plugin: BasicAuthPlugin) -> None:
    ctx = make_ctx(headers=basic("alice", "wonder"))
    assert resolve(plugin.on_request(ctx)) is None
    assert ctx.consumer.name == "alice"
    assert ctx.request.header("authorization") is None  # hidden from the upstream


async def test_pbkdf2_password_is_checked_off_the_event_loop(plugin: BasicAuthPlugin) -> None:
    ctx = make_ctx(headers=basic("bob", "builder"))
    outcome = plugin.on_request(ctx)
    assert asyncio.iscoroutine(outcome)
    assert await settle(outcome) is None
    assert ctx.consumer.name == "bob"
    again = make_ctx(headers=basic("bob", "builder"))
    assert plugin.on_request(again) is None  # remembered: no slow hash this time
    assert again.consumer.name == "bob"
    wrong = plugin.on_request(make_ctx(headers=basic("bob", "nope")))
    denied = await settle(wrong)
    assert denied is not None and denied.status == 401


def test_bad_credentials_are_401_with_a_basic_challenge(plugin: BasicAuthPlugin) -> None:
    cases = [
        (make_ctx(), "missing credentials"),
        (make_ctx(headers=basic("alice", "Wonder")), "invalid credentials"),
        (make_ctx(headers=basic("mallory", "wonder")), "invalid credentials"),
        (make_ctx(headers=[("Authorization", "Basic !!!")]), "malformed Basic credentials"),
        (make_ctx(headers=[("Authorization", "Bearer abc")]), "malformed Basic credentials"),
        (
            make_ctx(headers=[*basic("alice", "wonder"), *basic("alice", "wonder")]),
            "several Authorization headers",
        ),
    ]
    for ctx, message in cases:
        outcome = resolve(plugin.on_request(ctx))
        assert outcome is not None and outcome.status == 401
        assert header(outcome, "WWW-Authenticate") == 'Basic realm="apigate", charset="UTF-8"'
        assert body(outcome)["message"] == message


def test_password_with_colons(plugin: BasicAuthPlugin) -> None:
    env = make_env([{"name": "d", "basic_auth": {"username": "d", "password": sha256_hash("a:b")}}])
    plugin = build("basic_auth", {"hide_credentials": False}, env)
    ctx = make_ctx(headers=basic("d", "a:b"))
    assert resolve(plugin.on_request(ctx)) is None
    assert ctx.request.header("authorization") is not None


def test_parse_basic() -> None:
    assert parse_basic(b"Basic " + base64.b64encode(b"u:p")) == (b"u", b"p")
    assert parse_basic(b"basic " + base64.b64encode(b"u:")) == (b"u", b"")
    assert parse_basic(b"Basic " + base64.b64encode(b"no-colon")) is None
    assert parse_basic(b"Digest x") is None


def test_unusable_hashes_are_config_errors() -> None:
    env = make_env([{"name": "a", "basic_auth": {"username": "a", "password": "plaintext"}}])
    with pytest.raises(ConfigError) as info:
        build("basic_auth", {}, env)
    assert "consumers[0].basic_auth.password: unknown hash format" in str(info.value)
    for stored, problem in [
        ("sha256:abc", "64 hex digits"),
        ("pbkdf2_sha256$x$salt$aGFzaA==", "iterations"),
        ("pbkdf2_sha256$10$salt$!!", "not base64"),
    ]:
        with pytest.raises(ValueError, match=problem):
            make_verifier(stored)


def test_bcrypt_needs_the_package() -> None:
    try:
        importlib.import_module("bcrypt")
    except ImportError:
        with pytest.raises(ValueError, match="needs the 'bcrypt' package"):
            make_verifier("$2b$12$" + "a" * 53)
    else:  # pragma: no cover - depends on the environment
        pytest.skip("bcrypt is installed")
