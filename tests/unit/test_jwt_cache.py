"""The compiled half of the jwt plugin: where a token is found, what the cache answers by
itself, and what it hands back to the plugin (`miss`). The plugin's behaviour as a whole is in
test_plugin_jwt.py."""

from __future__ import annotations

import time
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from apigate.plugins.chain import PluginChain
from apigate.plugins.jwt_cache import CONFLICT, REPEATED, TokenCache, Verified
from tests.unit.test_plugin_fakes import build, make_ctx, make_request, sent_header

SECRET = "s" * 32


def token_cache(**overrides: Any) -> tuple[TokenCache, list[tuple[Any, bytes | None]]]:
    misses: list[tuple[Any, bytes | None]] = []

    def miss(ctx: Any, token: bytes | None) -> str:
        misses.append((ctx, token))
        return "miss"

    settings: dict[str, Any] = {
        "header": b"authorization",
        "bearer_only": True,
        "cookie": None,
        "query": None,
        "size": 10,
        "forward_headers": frozenset(),
        "miss": miss,
        **overrides,
    }
    return TokenCache(**settings), misses


def verified(consumer: Any = None, forward: list[tuple[bytes, bytes]] | None = None) -> Verified:
    return Verified({"sub": "alice"}, time.time() + 60, consumer, forward or [])


def test_the_bearer_scheme_is_case_insensitive_and_other_schemes_are_not_tokens() -> None:
    cache, _ = token_cache()
    for value in ("Bearer abc", "bearer abc", "BEARER  abc "):
        assert cache.find(make_request(headers=[("Authorization", value)])) == b"abc"
    assert cache.find(make_request(headers=[("Authorization", "Basic abc")])) is None
    assert cache.find(make_request(headers=[("X-Authorization", "Bearer abc")])) is None
    assert cache.find(make_request()) is None


def test_a_custom_header_takes_the_token_with_or_without_the_scheme() -> None:
    cache, _ = token_cache(header=b"x-token", bearer_only=False)
    assert cache.find(make_request(headers=[("X-Token", " abc ")])) == b"abc"
    assert cache.find(make_request(headers=[("x-token", "Bearer abc")])) == b"abc"


def test_two_different_tokens_are_a_conflict_and_the_same_one_twice_is_not() -> None:
    cache, _ = token_cache(cookie=b"session", query=b"access_token")
    twice = [("Authorization", "Bearer a"), ("Cookie", "session=a")]
    assert cache.find(make_request(headers=twice, query=b"access_token=a")) == b"a"
    differ = [("Authorization", "Bearer a"), ("authorization", "Bearer b")]
    assert cache.find(make_request(headers=differ)) is CONFLICT
    cookie = [("Authorization", "Bearer a"), ("Cookie", 'x=1; session="b"')]
    assert cache.find(make_request(headers=cookie)) is CONFLICT
    query = make_request(headers=[("Authorization", "Bearer a")], query=b"access_token=b")
    assert cache.find(query) is CONFLICT
    assert cache.find(make_request(query=b"x=1&access_token=a%2Bb+c")) == b"a+b c"
    assert cache.find(make_request(headers=[("Cookie", "session=a")])) == b"a"


def test_a_cached_token_is_answered_without_the_plugin() -> None:
    cache, misses = token_cache(forward_headers=frozenset({b"x-user"}))
    consumer = object()
    cache.add(b"abc", verified(consumer, [(b"X-User", b"alice")]))
    ctx = make_ctx(headers=[("Authorization", "Bearer abc"), ("X-USER", "spoofed")])
    assert cache.on_request(ctx) is None
    assert misses == []
    assert ctx.vars["jwt_claims"] == {"sub": "alice"}
    assert ctx.consumer is consumer
    assert sent_header(ctx.request, "X-User") == ["alice"]


def test_claim_headers_are_matched_with_underscore_and_dash_alike() -> None:
    # WSGI/CGI/PHP turn X_User_Id and X-User-Id into the same HTTP_X_USER_ID.
    cache, _ = token_cache(forward_headers=frozenset({b"X-User_Id"}))
    cache.add(b"abc", verified(forward=[(b"X-User_Id", b"alice")]))
    spoofed = [("X_User_Id", "a"), ("x-user-id", "b"), ("X_USER-ID", "c"), ("X-UserId", "kept")]
    ctx = make_ctx(headers=[("Authorization", "Bearer abc"), *spoofed])
    assert cache.on_request(ctx) is None
    assert ctx.request.headers[1:] == [(b"X-UserId", b"kept"), (b"X-User_Id", b"alice")]


def test_missing_conflicting_unknown_and_expired_tokens_go_to_the_plugin() -> None:
    cache, misses = token_cache()
    expired = verified()
    expired.expires = time.time() - 1
    cache.add(b"old", expired)
    cases = [
        ([], None),
        ([("Authorization", "Bearer a"), ("Authorization", "Bearer b")], CONFLICT),
        ([("Authorization", "Bearer new")], b"new"),
        ([("Authorization", "Bearer old")], b"old"),
    ]
    for headers, token in cases:
        ctx = make_ctx(headers=headers)
        assert cache.on_request(ctx) == "miss"
        assert misses[-1] == (ctx, token)
        assert "jwt_claims" not in ctx.vars


def test_the_cache_drops_its_oldest_entry_and_size_zero_keeps_none() -> None:
    cache, _ = token_cache(size=2)
    for token in (b"a", b"b", b"c"):
        cache.add(token, verified())
    assert list(cache.entries) == [b"b", b"c"]
    nothing, _ = token_cache(size=0)
    nothing.add(b"a", verified())
    assert nothing.entries == {}


def test_the_chain_calls_the_compiled_hook_directly() -> None:
    plugin = build("jwt", {"secret": SECRET, "algorithms": ["HS256"]})
    assert PluginChain([plugin]).request_hooks == [plugin.tokens.on_request]
    assert plugin.cache is plugin.tokens.entries


# ============================================================================ security review
def test_several_authorization_lines_are_repeated_whatever_their_schemes() -> None:
    cache, misses = token_cache()
    for first in ("forged", "Bearer\tforged", "Basic YTpi", "Bearer good"):
        request = make_request(headers=[("Authorization", first), ("authorization", "Bearer good")])
        assert cache.find(request) is REPEATED
    cache.add(b"good", verified())
    ctx = make_ctx(headers=[("Authorization", "Bearer good"), ("Authorization", "Basic YTpi")])
    assert cache.on_request(ctx) == "miss"
    assert misses == [(ctx, REPEATED)] and "jwt_claims" not in ctx.vars
    # two different Bearer tokens stay a conflict; a custom header may repeat one token
    differ = [("Authorization", "Bearer a"), ("Authorization", "Bearer b")]
    assert cache.find(make_request(headers=differ)) is CONFLICT
    custom, _ = token_cache(header=b"x-token", bearer_only=False)
    assert cache.find(make_request(headers=[("Authorization", "Bearer a")])) == b"a"
    assert custom.find(make_request(headers=[("X-Token", "a"), ("x-token", "Bearer a")])) == b"a"


def test_a_name_php_folds_to_the_token_parameter_or_cookie_is_a_conflict() -> None:
    cache, _ = token_cache(cookie=b"session_id", query=b"access_token")
    for query in (b"access.token=a", b"access_token=a&access%2Etoken=a", b"+access[token=a"):
        assert cache.find(make_request(query=query)) is CONFLICT
    cookie = [("Cookie", "session_id=a; session.id=a")]
    assert cache.find(make_request(headers=cookie)) is CONFLICT
    assert cache.find(make_request(headers=[("Cookie", "session id=a")])) is CONFLICT
    # exact spellings, and names that fold to something else, are what they were
    fine = make_request(
        query=b"access_token=a&access_tokens=b&x.y=c", headers=[("Cookie", "a.b=1")]
    )
    assert cache.find(fine) == b"a"
    assert cache.find(make_request(query=b"access.token")) is None  # no value: no token


@given(st.binary(max_size=12))
def test_trimmed_is_strip(value: bytes) -> None:
    from apigate.plugins.jwt_cache import _trimmed

    assert _trimmed(value) == value.strip()
    assert _trimmed(b" \t" + value + b"\r\n\x0b\x0c") == value.strip()
