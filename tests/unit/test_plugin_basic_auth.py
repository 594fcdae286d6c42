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
from apigate.plugins import basic_auth
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


def record_pbkdf2(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int | None]]:
    """(iterations, length) of every pbkdf2 the plugin computes."""
    calls: list[tuple[int, int | None]] = []
    real = hashlib.pbkdf2_hmac

    def recording(
        name: str, password: bytes, salt: bytes, iterations: int, dklen: int | None = None
    ) -> bytes:
        calls.append((iterations, dklen))
        return real(name, password, salt, iterations, dklen)

    monkeypatch.setattr(basic_auth.hashlib, "pbkdf2_hmac", recording)
    return calls


async def test_an_unknown_user_costs_the_slowest_configured_hash(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # An unknown user must not answer faster than a known one (that would tell which
    # usernames exist): it pays a dummy hash of the slowest configured scheme and cost, off
    # the event loop like a real slow check.
    consumers = [
        {"name": "a", "basic_auth": {"username": "a", "password": sha256_hash("pw")}},
        {"name": "b", "basic_auth": {"username": "b", "password": pbkdf2_hash("pw", 2000)}},
        {"name": "c", "basic_auth": {"username": "c", "password": pbkdf2_hash("pw", 3000)}},
    ]
    plugin: BasicAuthPlugin = build("basic_auth", {}, make_env(consumers))
    calls = record_pbkdf2(monkeypatch)
    outcome = plugin.on_request(make_ctx(headers=basic("c", "wrong")))
    assert asyncio.iscoroutine(outcome)
    known = await settle(outcome)
    outcome = plugin.on_request(make_ctx(headers=basic("mallory", "wrong")))
    assert asyncio.iscoroutine(outcome)  # the same path as a known user's slow check
    unknown = await settle(outcome)
    assert calls == [(3000, 32), (3000, 32)]
    for denied in (known, unknown):
        assert denied is not None and denied.status == 401
        assert body(denied)["message"] == "invalid credentials"


def test_an_unknown_user_with_only_fast_hashes_is_answered_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fast = [{"name": "a", "basic_auth": {"username": "a", "password": sha256_hash("pw")}}]
    only_fast: BasicAuthPlugin = build("basic_auth", {}, make_env(fast))
    calls = record_pbkdf2(monkeypatch)
    denied = only_fast.on_request(make_ctx(headers=basic("mallory", "pw")))
    assert denied is not None and denied.status == 401
    assert calls == []
    no_users: BasicAuthPlugin = build("basic_auth", {}, make_env())
    denied = no_users.on_request(make_ctx(headers=basic("mallory", "pw")))
    assert denied is not None and denied.status == 401


def test_the_dummy_hash_copies_scheme_and_cost_but_matches_nothing() -> None:
    stored = pbkdf2_hash("pw", 1500)
    dummy = basic_auth.lookalike_hash(stored)
    digest = dummy.split("$")[3]
    assert dummy.startswith("pbkdf2_sha256$1500$") and dummy != stored
    assert len(base64.b64decode(digest)) == len(base64.b64decode(stored.split("$")[3]))
    check, slow = make_verifier(dummy)
    assert slow and not check(b"pw") and not check(b"")
    fast = basic_auth.lookalike_hash(sha256_hash("pw"))
    check, slow = make_verifier(fast)
    assert not slow and fast.startswith("sha256:") and not check(b"pw")
    bcrypt_like = basic_auth.lookalike_hash("$2b$11$" + "a" * 53)
    assert bcrypt_like.startswith("$2b$11$" + "a" * 22) and len(bcrypt_like) == 60
    assert bcrypt_like != "$2b$11$" + "a" * 53


def test_hash_costs_rank_schemes() -> None:
    cost = basic_auth.hash_cost
    assert cost(sha256_hash("x")) < cost(pbkdf2_hash("x", 1000)) < cost(pbkdf2_hash("x", 2000))
    assert cost(pbkdf2_hash("x", 100_000)) < cost("$2b$12$" + "a" * 53)
    assert cost("$2b$04$" + "a" * 53) < cost(pbkdf2_hash("x", 100_000))


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
        ("pbkdf2_sha256$10$salt$", "the hash is empty"),
        ("$2b$12$short", "a bcrypt hash is"),
        ("$2b$xx$" + "a" * 53, "a bcrypt hash is"),
    ]:
        with pytest.raises(ValueError, match=problem):
            make_verifier(stored)


def test_bcrypt_needs_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """(The test extra installs bcrypt: its absence is simulated.)"""
    real_import = importlib.import_module

    def without_bcrypt(name: str, package: str | None = None) -> Any:
        if name == "bcrypt":
            raise ImportError(name)
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", without_bcrypt)
    with pytest.raises(ValueError, match="needs the 'bcrypt' package"):
        make_verifier("$2b$12$" + "a" * 53)


async def test_an_unknown_user_costs_a_bcrypt_check_when_bcrypt_is_configured() -> None:
    bcrypt: Any = pytest.importorskip("bcrypt")
    stored = bcrypt.hashpw(b"pw", bcrypt.gensalt(rounds=4)).decode()
    dummy = basic_auth.lookalike_hash(stored)
    assert dummy[:29] == stored[:29] and dummy != stored
    assert bcrypt.checkpw(b"pw", stored.encode()) and not bcrypt.checkpw(b"pw", dummy.encode())
    env = make_env([{"name": "a", "basic_auth": {"username": "a", "password": stored}}])
    plugin: BasicAuthPlugin = build("basic_auth", {}, env)
    outcome = plugin.on_request(make_ctx(headers=basic("mallory", "pw")))
    assert asyncio.iscoroutine(outcome)
    denied = await settle(outcome)
    assert denied is not None and denied.status == 401
