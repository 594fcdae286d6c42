"""The cache plugin's flows with a fake exchange: no sockets, a clock the test moves."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.http.response_head import ResponseHead
from apigate.plugins.base import Response
from apigate.plugins.cache import CachePlugin, live_plugins, purge_all
from apigate.plugins.cache_store import MemoryStore, RedisCacheStore, target_of
from apigate.plugins.chain import PluginChain
from tests.unit.test_cache_store import FakeRedis
from tests.unit.test_plugin_fakes import build, make_env, make_request

T0 = 1_700_000_000.0


class Ctx:
    """What the cache reads and writes on `ProxyExchange`."""

    def __init__(self, method: str = "GET", path: str = "/items", route: str = "r", **kw: Any):
        self.request = make_request(method, path, **kw)
        self.request.host = "example.com"
        self.route = SimpleNamespace(name=route)
        self.consumer: Any = None
        self.vars: dict[str, Any] = {}
        self.params: dict[str, str] = {}
        self.upstream_path = path  # what the route (and request_transform) send upstream
        self.cache_status: str | None = None
        self.error: str | None = None
        self.status = 0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def cache(**config: Any) -> tuple[CachePlugin, Clock]:
    plugin: CachePlugin = build("cache", config)
    clock = Clock()
    plugin.clock = clock
    return plugin, clock


def upstream(
    plugin: CachePlugin,
    ctx: Ctx,
    *,
    status: int = 200,
    headers: Iterable[tuple[bytes, bytes]] = ((b"Cache-Control", b"max-age=60"),),
    chunks: Iterable[bytes] = (b'{"n":', b"1}"),
    error: str | None = None,
) -> ResponseHead:
    """What the exchange does for a proxied response: on_response, chunks, end, log."""
    head = answer_head(plugin, ctx, status, [(b"Content-Type", b"application/json"), *headers])
    for chunk in chunks:
        plugin.on_response_chunk(ctx, chunk)
    ctx.error = error
    plugin.on_response_end(ctx)
    plugin.on_log(ctx)
    return head


def answer_head(
    plugin: CachePlugin,
    ctx: Ctx,
    status: int = 200,
    headers: Iterable[tuple[bytes, bytes]] = ((b"Cache-Control", b"max-age=60"),),
) -> ResponseHead:
    """The upstream's head reaches the plugin (on_response); the body is still to come."""
    head = ResponseHead()
    head.status = status
    head.headers = list(headers)
    plugin.on_response(ctx, head)
    return head


def missed(plugin: CachePlugin, ctx: Ctx) -> bool:
    """Did `ctx` go upstream at once? (Its request then ends without an answer, so that it
    leaves no leader for the next request of the test to wait on.)"""
    outcome = plugin.on_request(ctx)
    if inspect.iscoroutine(outcome):
        outcome.close()
    plugin.on_log(ctx)
    return outcome is None


def hit(outcome: Any) -> Response:
    assert isinstance(outcome, Response), outcome
    return outcome


def header(response: Response | ResponseHead, name: bytes) -> bytes | None:
    for n, v in response.headers:
        if n.lower() == name.lower():
            return v
    return None


# ------------------------------------------------------------------------------ basic flow


def test_miss_then_store_then_hit_with_age() -> None:
    plugin, clock = cache()
    first = Ctx()
    assert plugin.on_request(first) is None
    assert first.cache_status == "MISS"
    head = upstream(
        plugin,
        first,
        headers=[
            (b"Cache-Control", b"max-age=60"),
            (b"Date", b"x"),
            (b"Server", b"up"),
            (b"ETag", b'"v1"'),
        ],
    )
    assert header(head, b"x-cache") == b"MISS"
    clock.now += 7
    second = Ctx()
    response = hit(plugin.on_request(second))
    assert second.cache_status == "HIT"
    assert response.status == 200 and response.body == b'{"n":1}'
    assert response.content_type == b"application/json"
    assert header(response, b"age") == b"7"
    assert header(response, b"x-cache") == b"HIT"
    assert header(response, b"etag") == b'"v1"'
    assert header(response, b"date") is None and header(response, b"server") is None


def test_head_is_answered_from_the_get_entry_but_never_stored() -> None:
    plugin, _ = cache()
    head_ctx = Ctx("HEAD")
    assert plugin.on_request(head_ctx) is None
    upstream(plugin, head_ctx, chunks=())
    get_ctx = Ctx()
    assert plugin.on_request(get_ctx) is None  # the HEAD response was not stored
    upstream(plugin, get_ctx)
    assert hit(plugin.on_request(Ctx("HEAD"))).body == b'{"n":1}'  # the exchange drops it


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
def test_unsafe_methods_bypass(method: str) -> None:
    plugin, _ = cache()
    ctx = Ctx(method)
    assert plugin.on_request(ctx) is None
    assert ctx.cache_status == "BYPASS"
    assert header(upstream(plugin, ctx), b"x-cache") == b"BYPASS"
    assert plugin.on_request(Ctx()) is None  # nothing stored for GET


def test_upstream_x_cache_is_replaced() -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    head = upstream(
        plugin, ctx, headers=[(b"X-Cache", b"HIT from cdn"), (b"Cache-Control", b"max-age=5")]
    )
    assert [v for n, v in head.headers if n.lower() == b"x-cache"] == [b"MISS"]


def test_expired_entry_is_a_miss() -> None:
    plugin, clock = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx)
    clock.now += 60
    assert plugin.on_request(Ctx()) is None


def test_request_no_cache_bypasses_and_refreshes() -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[b"old"])
    refresh = Ctx(headers=[("Cache-Control", "no-cache")])
    assert plugin.on_request(refresh) is None
    assert refresh.cache_status == "BYPASS"
    upstream(plugin, refresh, chunks=[b"new"])
    assert hit(plugin.on_request(Ctx())).body == b"new"


def test_request_no_store_neither_serves_nor_stores() -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[b"old"])
    nostore = Ctx(headers=[("Cache-Control", "no-store")])
    assert plugin.on_request(nostore) is None and nostore.cache_status == "BYPASS"
    upstream(plugin, nostore, chunks=[b"new"])
    assert hit(plugin.on_request(Ctx())).body == b"old"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Cache-Control", b"no-store")],
        [(b"Cache-Control", b"private, max-age=60")],
        [(b"Cache-Control", b"no-cache, max-age=60")],
        [(b"Cache-Control", b"max-age=60"), (b"Vary", b"*")],
        [(b"Cache-Control", b"max-age=60"), (b"Set-Cookie", b"sid=1")],
        [],  # no freshness information and no ttl
    ],
)
def test_responses_that_are_not_stored(headers: list[tuple[bytes, bytes]]) -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, headers=headers)
    assert plugin.on_request(Ctx()) is None


def test_route_ttl_for_silent_responses() -> None:
    plugin, clock = cache(ttl="30s")
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, headers=[])
    clock.now += 29
    assert hit(plugin.on_request(Ctx())).status == 200
    clock.now += 2
    assert plugin.on_request(Ctx()) is None


def test_s_maxage_and_status_404_are_cached() -> None:
    plugin, clock = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, status=404, headers=[(b"Cache-Control", b"max-age=1, s-maxage=100")])
    clock.now += 50
    assert hit(plugin.on_request(Ctx())).status == 404


def test_500_is_not_cached() -> None:
    plugin, _ = cache(ttl="30s")
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, status=500)
    assert plugin.on_request(Ctx()) is None


def test_key_covers_query_host_and_route() -> None:
    plugin, _ = cache()
    ctx = Ctx(query=b"page=1")
    plugin.on_request(ctx)
    upstream(plugin, ctx)
    assert hit(plugin.on_request(Ctx(query=b"page=1"))).status == 200
    assert plugin.on_request(Ctx(query=b"page=2")) is None
    assert plugin.on_request(Ctx(route="other", query=b"page=1")) is None
    other_host = Ctx(query=b"page=1")
    other_host.request.host = "other.example.com"
    assert plugin.on_request(other_host) is None


def test_qualified_private_field_is_not_stored() -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(
        plugin,
        ctx,
        headers=[
            (b"Cache-Control", b'max-age=60, private="X-User"'),
            (b"X-User", b"alice"),
            (b"X-Public", b"yes"),
        ],
    )
    response = hit(plugin.on_request(Ctx()))
    assert header(response, b"x-user") is None and header(response, b"x-public") == b"yes"


def test_stores_the_head_as_later_hooks_left_it() -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    head = answer_head(plugin, ctx)
    head.headers = [*head.headers, (b"X-Transformed", b"1")]  # response_transform runs later
    plugin.on_response_chunk(ctx, b"body")
    plugin.on_response_end(ctx)
    response = hit(plugin.on_request(Ctx()))
    assert header(response, b"x-transformed") == b"1"


# ------------------------------------------------------------------------------ integrity


def test_a_truncated_body_is_never_stored() -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[b"partial"], error="upstream closed mid-response")
    assert plugin.on_request(Ctx()) is None


def test_without_on_response_end_nothing_is_stored() -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    answer_head(plugin, ctx)
    plugin.on_response_chunk(ctx, b"partial")
    plugin.on_log(ctx)  # the client went away: the exchange ended without on_response_end
    assert plugin.on_request(Ctx()) is None


def test_an_entry_over_max_entry_bytes_is_not_stored() -> None:
    plugin, _ = cache(max_entry_bytes=10)
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[b"123456", b"789012"])
    assert plugin.on_request(Ctx()) is None


# ------------------------------------------------------------------------------ Vary


def test_vary_keeps_one_entry_per_header_value() -> None:
    plugin, _ = cache()
    vary = [(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept-Language")]

    def lang(value: str) -> Ctx:
        return Ctx(headers=[("Accept-Language", value)])

    en = lang("en")
    plugin.on_request(en)
    upstream(plugin, en, headers=vary, chunks=[b"hello"])
    assert hit(plugin.on_request(lang("en"))).body == b"hello"
    fr = lang("fr")
    assert plugin.on_request(fr) is None
    upstream(plugin, fr, headers=vary, chunks=[b"bonjour"])
    assert hit(plugin.on_request(lang("fr"))).body == b"bonjour"
    assert hit(plugin.on_request(lang("en"))).body == b"hello"
    assert plugin.on_request(Ctx()) is None  # no Accept-Language is a third variant


def test_a_variant_stored_under_another_vary_is_not_served() -> None:
    """RFC 9111 §4.1: a stored response matches only on the fields its own Vary names. The
    origin moved from `Vary: X-Lang` to `Vary: X-Other` (the marker now names X-Other): the
    X-Lang=en response must not answer a request whose X-Other happens to be "en"."""
    plugin, clock = cache()
    en = Ctx(headers=[("X-Lang", "en")])
    plugin.on_request(en)
    upstream(plugin, en, headers=[(b"Cache-Control", b"max-age=60"), (b"Vary", b"X-Lang")])
    clock.now += 1
    other = Ctx(headers=[("X-Lang", "de"), ("X-Other", "q")])
    assert plugin.on_request(other) is None
    upstream(plugin, other, headers=[(b"Cache-Control", b"max-age=60"), (b"Vary", b"X-Other")])
    assert hit(plugin.on_request(Ctx(headers=[("X-Other", "q")]))).status == 200
    assert missed(plugin, Ctx(headers=[("X-Lang", "fr"), ("X-Other", "en")]))


async def test_a_variant_stored_under_another_vary_is_not_served_from_redis() -> None:
    plugin, clock = cache()
    plugin.store = RedisCacheStore(FakeRedis())  # type: ignore[arg-type]

    async def lookup(ctx: Ctx) -> Response | None:
        outcome = plugin.on_request(ctx)
        return await outcome if inspect.isawaitable(outcome) else outcome

    for headers, vary in [([("X-Lang", "en")], b"X-Lang"), ([("X-Other", "q")], b"X-Other")]:
        ctx = Ctx(headers=headers)
        assert await lookup(ctx) is None
        upstream(plugin, ctx, headers=[(b"Cache-Control", b"max-age=60"), (b"Vary", vary)])
        await plugin.close()  # waits for the background SET
        clock.now += 1
    assert hit(await lookup(Ctx(headers=[("X-Other", "q")]))).status == 200
    stray = Ctx(headers=[("X-Lang", "fr"), ("X-Other", "en")])
    assert await lookup(stray) is None and stray.cache_status == "MISS"


@pytest.mark.parametrize(
    ("stored_with", "asked_with"),
    [([], [("X-Lang", "")]), ([("X-Lang", "")], [])],
    ids=["absent-then-empty", "empty-then-absent"],
)
def test_an_absent_vary_field_does_not_match_an_empty_one(
    stored_with: list[tuple[str, str]], asked_with: list[tuple[str, str]]
) -> None:
    """RFC 9111 §4.1: a field absent from the original request matches only its absence."""
    plugin, _ = cache()
    first = Ctx(headers=stored_with)
    plugin.on_request(first)
    upstream(plugin, first, headers=[(b"Cache-Control", b"max-age=60"), (b"Vary", b"X-Lang")])
    assert hit(plugin.on_request(Ctx(headers=stored_with))).status == 200
    assert missed(plugin, Ctx(headers=asked_with))


# ------------------------------------------------------------------------------ Authorization


def test_authorized_requests_are_not_shared_by_default() -> None:
    plugin, _ = cache()
    ctx = Ctx(headers=[("Authorization", "Bearer a")])
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[b"alice's"])
    assert plugin.on_request(Ctx()) is None


def test_public_response_to_an_authorized_request_is_shared() -> None:
    plugin, _ = cache()
    ctx = Ctx(headers=[("Authorization", "Bearer a")])
    plugin.on_request(ctx)
    upstream(plugin, ctx, headers=[(b"Cache-Control", b"public, max-age=60")])
    assert hit(plugin.on_request(Ctx(headers=[("Authorization", "Bearer b")]))).status == 200
    assert hit(plugin.on_request(Ctx())).status == 200


def test_an_anonymous_entry_is_not_served_to_an_authorized_request() -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx)
    authorized = Ctx(headers=[("Authorization", "Bearer a")])
    assert plugin.on_request(authorized) is None and authorized.cache_status == "MISS"


def as_consumer(name: str, *headers: tuple[str, str]) -> Ctx:
    """A request a key_auth-like plugin authenticated (the key is not in Authorization)."""
    ctx = Ctx(headers=[("apikey", name + "-key"), *headers])
    ctx.consumer = SimpleNamespace(name=name)
    return ctx


def test_consumers_get_their_own_entries_by_default() -> None:
    plugin, _ = cache(ttl="30s")
    alice = as_consumer("alice")
    plugin.on_request(alice)
    upstream(plugin, alice, headers=[], chunks=[b"alice's"])
    assert hit(plugin.on_request(as_consumer("alice"))).body == b"alice's"
    bob = as_consumer("bob")
    assert plugin.on_request(bob) is None and bob.cache_status == "MISS"
    assert plugin.on_request(Ctx()) is None  # nor is it an anonymous request's entry


def as_token_user(claims: dict[str, Any]) -> Ctx:
    """A request the jwt plugin verified (token in a cookie) whose claims name no consumer."""
    ctx = Ctx(headers=[("cookie", "session=t")])
    ctx.vars["jwt_claims"] = claims
    return ctx


def test_token_users_without_a_consumer_get_their_own_entries() -> None:
    """An outside identity provider's users: the issuer and subject are who asks. A token
    without a subject shares nothing with another token; no consumer name passes for one."""
    plugin, _ = cache(ttl="30s")
    a = {"iss": "idp", "sub": "a"}
    first = as_token_user(a)
    plugin.on_request(first)
    upstream(plugin, first, headers=[], chunks=[b"a's"])
    assert hit(plugin.on_request(as_token_user({**a, "exp": 1}))).body == b"a's"
    others = [
        as_token_user({"iss": "idp", "sub": "b"}),
        as_token_user({"iss": "other", "sub": "a"}),
        as_token_user({"iss": "idp"}),
        as_consumer('jwt ["idp", "a"]'),
        Ctx(),
    ]
    for ctx in others:
        assert missed(plugin, ctx), ctx.vars
    subjectless = as_token_user({"iss": "idp", "client": 1})
    plugin.on_request(subjectless)
    upstream(plugin, subjectless, headers=[], chunks=[b"client 1's"])
    assert missed(plugin, as_token_user({"iss": "idp", "client": 2}))


def test_key_include_consumer_false_shares_entries_across_consumers() -> None:
    plugin, _ = cache(ttl="30s", key_include_consumer=False)
    alice = as_consumer("alice")
    plugin.on_request(alice)
    upstream(plugin, alice, headers=[], chunks=[b"for everyone"])
    assert hit(plugin.on_request(as_consumer("bob"))).body == b"for everyone"


@pytest.mark.parametrize("include", [True, False])
def test_the_authorization_rule_holds_when_the_consumer_is_in_the_key(include: bool) -> None:
    """A consumer may stand for many users (one app's key, its users' tokens in
    Authorization): a response to a request with Authorization is stored only when it says
    it may be shared (RFC 9111 §3.5), whether or not the consumer is in the key."""
    plugin, _ = cache(key_include_consumer=include)
    token = ("Authorization", "Bearer user-1")
    alice = as_consumer("alice", token)
    plugin.on_request(alice)
    upstream(plugin, alice, chunks=[b"user-1's"])
    assert missed(plugin, as_consumer("alice", ("Authorization", "Bearer user-2")))
    public = as_consumer("alice", token)
    plugin.on_request(public)
    upstream(plugin, public, headers=[(b"Cache-Control", b"public, max-age=60")])
    assert hit(plugin.on_request(as_consumer("alice", token))).status == 200


# ------------------------------------------------------------------------------ conditionals


def test_conditional_hit_answers_304() -> None:
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(
        plugin,
        ctx,
        headers=[(b"Cache-Control", b"max-age=60"), (b"ETag", b'"v1"'), (b"X-Other", b"1")],
    )
    response = hit(plugin.on_request(Ctx(headers=[("If-None-Match", '"v1"')])))
    assert response.status == 304 and response.body == b""
    assert header(response, b"etag") == b'"v1"' and header(response, b"x-other") is None
    assert hit(plugin.on_request(Ctx(headers=[("If-None-Match", '"v0"')]))).status == 200


@pytest.mark.parametrize("status", [404, 410, 301])
@pytest.mark.parametrize(
    "condition",
    [("If-None-Match", '"v1"'), ("If-Modified-Since", "Tue, 14 Nov 2023 22:13:20 GMT")],
    ids=["inm", "ims"],
)
def test_preconditions_are_ignored_for_a_hit_that_is_not_2xx(
    status: int, condition: tuple[str, str]
) -> None:
    """RFC 9110 §13.2.1: preconditions apply only when the response would be 2xx (or 412); a
    cached 404 with a matching ETag is still the 404, never a 304."""
    plugin, _ = cache()
    ctx = Ctx()
    plugin.on_request(ctx)
    validators = [(b"ETag", b'"v1"'), (b"Last-Modified", b"Tue, 14 Nov 2023 22:00:00 GMT")]
    upstream(plugin, ctx, status=status, headers=[(b"Cache-Control", b"max-age=60"), *validators])
    response = hit(plugin.on_request(Ctx(headers=[condition])))
    assert response.status == status and response.body == b'{"n":1}'


# ------------------------------------------------------------------------------ stale-if-error


def test_stale_entry_replaces_an_upstream_5xx_within_the_window() -> None:
    plugin, clock = cache(stale_if_error="1m")
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[b"good"])
    clock.now += 90  # stale for 30 s, within the 60 s window
    failing = Ctx()
    assert plugin.on_request(failing) is None and failing.cache_status == "MISS"
    upstream(plugin, failing, status=503, headers=[], chunks=[b"down"])
    replacement = failing.vars["replace_response"]
    assert isinstance(replacement, Response) and replacement.body == b"good"
    assert header(replacement, b"x-cache") == b"STALE" and header(replacement, b"age") == b"90"
    assert failing.cache_status == "STALE"


def test_stale_response_callable_for_gateway_errors() -> None:
    plugin, clock = cache(stale_if_error="1m")
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[b"good"])
    clock.now += 70
    failing = Ctx()
    plugin.on_request(failing)
    stale = failing.vars["stale_response"]
    assert hit(stale()).body == b"good" and failing.cache_status == "STALE"
    clock.now += 60  # the window has passed while the upstream hung
    assert stale() is None


def test_no_stale_beyond_the_window_or_without_configuration() -> None:
    plugin, clock = cache(stale_if_error="10s")
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx)
    clock.now += 71
    late = Ctx()
    plugin.on_request(late)
    upstream(plugin, late, status=503, headers=[])
    assert "replace_response" not in late.vars and "stale_response" not in late.vars
    plain, clock2 = cache()
    ctx = Ctx()
    plain.on_request(ctx)
    upstream(plain, ctx)
    clock2.now += 61
    assert plain.on_request(Ctx()) is None


def test_must_revalidate_forbids_stale_if_error() -> None:
    plugin, clock = cache(stale_if_error="1m")
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, headers=[(b"Cache-Control", b"max-age=60, must-revalidate")])
    clock.now += 61
    failing = Ctx()
    plugin.on_request(failing)
    assert "stale_response" not in failing.vars


@pytest.mark.parametrize(
    "demand",
    [
        [("Cache-Control", "no-cache")],
        [("Cache-Control", "max-age=0")],
        [("Pragma", "no-cache")],
        [("Cache-Control", "max-age=30")],  # the stale entry is 70 s old
        [("Cache-Control", "min-fresh=5")],
    ],
)
def test_no_stale_answer_for_a_request_that_demands_a_fresh_one(
    demand: list[tuple[str, str]],
) -> None:
    """RFC 9111 §4.2.4 / §5.2.1: these request directives forbid a stale response."""
    plugin, clock = cache(stale_if_error="1m")
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[b"good"])
    clock.now += 70
    failing = Ctx(headers=demand)
    assert plugin.on_request(failing) is None
    assert "stale_response" not in failing.vars  # not for a connect error either
    upstream(plugin, failing, status=503, headers=[], chunks=[b"down"])
    assert "replace_response" not in failing.vars and failing.cache_status != "STALE"


def test_no_stale_answer_for_no_cache_even_while_the_entry_is_fresh() -> None:
    plugin, _ = cache(stale_if_error="1m")
    ctx = Ctx()
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[b"good"])
    failing = Ctx(headers=[("Cache-Control", "no-cache")])
    plugin.on_request(failing)
    upstream(plugin, failing, status=500, headers=[], chunks=[b"down"])
    assert "replace_response" not in failing.vars and failing.cache_status == "BYPASS"


# ------------------------------------------------------------------------------ coalescing


async def test_100_concurrent_misses_make_one_upstream_request() -> None:
    plugin, _ = cache()
    contexts = [Ctx() for _ in range(100)]
    outcomes = [plugin.on_request(ctx) for ctx in contexts]
    leaders = [ctx for ctx, outcome in zip(contexts, outcomes, strict=True) if outcome is None]
    assert len(leaders) == 1
    waiting = [asyncio.ensure_future(o) for o in outcomes if inspect.isawaitable(o)]
    assert len(waiting) == 99
    await asyncio.sleep(0)
    upstream(plugin, leaders[0], chunks=[b"shared"])
    answers = await asyncio.gather(*waiting)
    assert all(isinstance(a, Response) and a.body == b"shared" for a in answers)
    assert sum(1 for ctx in contexts if ctx.cache_status == "HIT") == 99
    assert repr(plugin).endswith("0 in flight>")


@pytest.mark.parametrize(
    "leader_ends",
    [
        pytest.param({"headers": [(b"Cache-Control", b"no-store")]}, id="uncacheable"),
        pytest.param({"error": "upstream closed mid-response"}, id="truncated"),
        pytest.param({"status": 502, "headers": []}, id="failed"),
    ],
)
async def test_waiters_go_upstream_themselves_when_the_leader_stores_nothing(
    leader_ends: dict[str, Any],
) -> None:
    plugin, _ = cache()
    leader, follower = Ctx(), Ctx()
    assert plugin.on_request(leader) is None
    waiting = asyncio.ensure_future(plugin.on_request(follower))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    upstream(plugin, leader, **leader_ends)
    assert await waiting is None
    assert follower.cache_status == "MISS"


@pytest.mark.parametrize("stored", [True, False])
async def test_a_wait_that_starts_after_the_leader_is_over_ends_at_once(stored: bool) -> None:
    """The exchange runs a hook's awaitable later, in a task, and the leader's whole response
    may come in between: the waiter then found its flight over with no future to wait on,
    made one nobody would ever resolve, and hung for coalesce_timeout (30 s; its client's
    own timeout first: 1 in 8 runs of 40 concurrent misses through a real gateway)."""
    plugin, _ = cache()
    leader, follower = Ctx(), Ctx()
    assert plugin.on_request(leader) is None
    waiting = plugin.on_request(follower)
    assert inspect.isawaitable(waiting)
    ends: dict[str, Any] = {"chunks": [b"shared"]} if stored else {"status": 502, "headers": []}
    upstream(plugin, leader, **ends)  # before the waiter's coroutine has run at all
    answer = await asyncio.wait_for(waiting, 1)
    if stored:
        assert isinstance(answer, Response) and answer.body == b"shared"
        assert follower.cache_status == "HIT"
    else:
        assert answer is None and follower.cache_status == "MISS"  # it goes upstream itself


async def test_waiters_are_released_when_the_leader_never_got_a_response() -> None:
    plugin, _ = cache()
    leader, follower = Ctx(), Ctx()
    plugin.on_request(leader)
    waiting = asyncio.ensure_future(plugin.on_request(follower))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    plugin.on_log(leader)  # e.g. connect error: the exchange only logs
    assert await waiting is None


async def test_coalescing_wait_is_bounded() -> None:
    plugin, _ = cache(coalesce_timeout="50ms")
    plugin.on_request(Ctx())
    outcome = plugin.on_request(Ctx())
    assert inspect.isawaitable(outcome)
    assert await outcome is None


async def test_a_waiter_with_a_different_vary_value_proceeds() -> None:
    plugin, _ = cache()
    en = Ctx(headers=[("Accept-Language", "en")])
    fr = Ctx(headers=[("Accept-Language", "fr")])
    plugin.on_request(en)
    waiting = asyncio.ensure_future(plugin.on_request(fr))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    upstream(plugin, en, headers=[(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept-Language")])
    assert await waiting is None


async def settled(task: asyncio.Future[Any]) -> bool:
    """Has `task` finished once the loop ran the callbacks that were ready?"""
    for _ in range(3):
        await asyncio.sleep(0)
    return task.done()


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        pytest.param(200, [(b"Cache-Control", b"private, max-age=60")], id="private"),
        pytest.param(500, [(b"Cache-Control", b"max-age=60")], id="500"),
        pytest.param(
            200, [(b"Cache-Control", b"max-age=60"), (b"Set-Cookie", b"s=1")], id="cookie"
        ),
    ],
)
async def test_waiters_are_released_by_a_head_that_will_not_be_stored(
    status: int, headers: list[tuple[bytes, bytes]]
) -> None:
    plugin, _ = cache()
    leader, follower = Ctx(), Ctx()
    plugin.on_request(leader)
    waiting = asyncio.ensure_future(plugin.on_request(follower))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    answer_head(plugin, leader, status, headers)  # the body is still on its way
    assert await settled(waiting), "the waiter waits for a body that will not be stored"
    assert waiting.result() is None and follower.cache_status == "MISS"
    plugin.on_response_chunk(leader, b"body")
    plugin.on_response_end(leader)
    plugin.on_log(leader)
    assert plugin.on_request(Ctx()) is None  # still nothing stored


async def test_waiters_are_released_once_the_body_passes_max_entry_bytes() -> None:
    plugin, _ = cache(max_entry_bytes=10)
    leader, follower = Ctx(), Ctx()
    plugin.on_request(leader)
    waiting = asyncio.ensure_future(plugin.on_request(follower))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    answer_head(plugin, leader)
    plugin.on_response_chunk(leader, b"123456")
    assert not await settled(waiting)  # it may still fit
    plugin.on_response_chunk(leader, b"789012")
    assert await settled(waiting), "the waiter waits for the end of a body too large to store"
    assert waiting.result() is None
    plugin.on_response_chunk(leader, b"more")
    plugin.on_response_end(leader)
    plugin.on_log(leader)
    assert plugin.on_request(Ctx()) is None


async def test_a_released_key_gets_a_new_leader_while_the_old_body_streams() -> None:
    plugin, _ = cache()
    first = Ctx()
    plugin.on_request(first)
    answer_head(plugin, first, headers=[(b"Cache-Control", b"private")])
    second = Ctx()
    assert plugin.on_request(second) is None  # leads its own request, waits for nobody
    upstream(plugin, second, chunks=[b"second"])
    plugin.on_response_chunk(first, b"first")
    plugin.on_response_end(first)
    plugin.on_log(first)  # the first leader's end must not disturb the second's entry
    assert hit(plugin.on_request(Ctx())).body == b"second"
    assert repr(plugin).endswith("0 in flight>")


def waiter(plugin: CachePlugin, ctx: Ctx) -> asyncio.Future[Any]:
    """`ctx`'s lookup coalesced behind a leader, running (as the exchange's task would)."""
    outcome = plugin.on_request(ctx)
    assert inspect.isawaitable(outcome), outcome
    return asyncio.ensure_future(outcome)


def client_leaves(plugin: CachePlugin, ctx: Ctx) -> None:
    """What the exchange does when a request's client goes away: `on_client_lost` (if a
    plugin set one), then the end of the exchange with the error set."""
    stop = getattr(ctx, "on_client_lost", None)
    if stop is not None:
        stop()
    ctx.error = "client closed the connection"
    plugin.on_response_end(ctx)
    plugin.on_log(ctx)


@pytest.mark.parametrize("when", ["before-the-head", "mid-body"])
async def test_when_the_leaders_client_leaves_one_waiter_leads_and_the_others_wait(
    when: str,
) -> None:
    """One impatient client must not undo coalescing (nginx's proxy_cache_lock hands the
    lock on): one waiter goes upstream as the new leader, the others wait for its entry."""
    plugin, _ = cache()
    leader = Ctx()
    assert plugin.on_request(leader) is None
    followers = [Ctx() for _ in range(4)]
    waiting = [waiter(plugin, f) for f in followers]
    await asyncio.sleep(0)
    if when == "mid-body":
        answer_head(plugin, leader)
        plugin.on_response_chunk(leader, b"part")
    client_leaves(plugin, leader)
    await settled(waiting[0])
    done = [task for task in waiting if task.done()]
    assert len(done) == 1, "every waiter went upstream"
    assert done[0] is waiting[0] and done[0].result() is None  # the oldest waiter leads
    upstream(plugin, followers[0], chunks=[b"the new leader's"])
    answers = await asyncio.gather(*waiting[1:])
    assert all(hit(a).body == b"the new leader's" for a in answers)
    assert [f.cache_status for f in followers] == ["MISS", "HIT", "HIT", "HIT"]
    assert repr(plugin).endswith("0 in flight>")


async def test_the_new_leaders_client_may_leave_too() -> None:
    plugin, _ = cache()
    leader, second, third = Ctx(), Ctx(), Ctx()
    plugin.on_request(leader)
    waiting = [waiter(plugin, f) for f in (second, third)]
    await asyncio.sleep(0)
    client_leaves(plugin, leader)
    assert await waiting[0] is None and not waiting[1].done()
    client_leaves(plugin, second)
    assert await waiting[1] is None  # the last waiter leads in its turn
    upstream(plugin, third, chunks=[b"third's"])
    assert hit(plugin.on_request(Ctx())).body == b"third's"


async def test_a_waiter_that_left_or_asks_head_does_not_take_the_lead() -> None:
    plugin, _ = cache()
    leader, gone, head, get = Ctx(), Ctx(), Ctx("HEAD"), Ctx()
    plugin.on_request(leader)
    waiting = [waiter(plugin, f) for f in (gone, head, get)]
    await asyncio.sleep(0)
    client_leaves(plugin, gone)  # left while it waited (its exchange is over)
    client_leaves(plugin, leader)
    assert await waiting[2] is None  # the GET leads: a HEAD has no body to store
    assert not waiting[1].done()
    upstream(plugin, get, chunks=[b"get's"])
    assert hit(await waiting[1]).body == b"get's" and head.cache_status == "HIT"


async def test_a_waiter_that_stopped_waiting_is_not_handed_the_flight() -> None:
    plugin, _ = cache(coalesce_timeout="50ms")
    leader, impatient, patient = Ctx(), Ctx(), Ctx()
    plugin.on_request(leader)
    assert await waiter(plugin, impatient) is None  # timed out: it went upstream alone
    waiting = waiter(plugin, patient)
    await asyncio.sleep(0)
    client_leaves(plugin, leader)
    assert await waiting is None and patient.vars["cache"].flight is not None
    assert impatient.vars["cache"].flight is None
    upstream(plugin, patient, chunks=[b"patient's"])
    assert hit(plugin.on_request(Ctx())).body == b"patient's"


async def test_with_no_waiter_able_to_lead_every_waiter_is_released() -> None:
    plugin, _ = cache()
    leader, head = Ctx(), Ctx("HEAD")
    plugin.on_request(leader)
    waiting = waiter(plugin, head)
    await asyncio.sleep(0)
    client_leaves(plugin, leader)
    assert await waiting is None
    assert repr(plugin).endswith("0 in flight>")


async def test_a_leader_that_fails_still_releases_every_waiter() -> None:
    """Only a leader whose client left hands over: an upstream failure releases them all
    (each may meet its own stale entry or error at once, not one timeout after another)."""
    plugin, _ = cache()
    leader = Ctx()
    plugin.on_request(leader)
    waiting = [waiter(plugin, Ctx()) for _ in range(3)]
    await asyncio.sleep(0)
    upstream(plugin, leader, chunks=[b"partial"], error="upstream closed mid-response")
    assert await asyncio.gather(*waiting) == [None, None, None]


def test_head_does_not_lead() -> None:
    plugin, _ = cache()
    plugin.on_request(Ctx("HEAD"))
    assert plugin.on_request(Ctx()) is None  # a GET arriving next leads its own request


# ------------------------------------------------------------------------------ request_transform


def through_chain(chain: PluginChain, ctx: Ctx) -> Any:
    """The request hooks in chain order, as the exchange runs them, until one answers."""
    for hook in chain.request_hooks:
        outcome = hook(ctx)
        if outcome is not None:
            return outcome
    return None


def test_request_transform_runs_before_the_cache_and_response_transform_after() -> None:
    """As in Kong (request-transformer 801, proxy-cache 100): the cache sees the request as it
    goes upstream; the response side is unchanged: the cache stores the head as
    response_transform left it."""
    chain = PluginChain(
        [build("response_transform", {}), cache()[0], build("request_transform", {})]
    )
    names = [p.name for p in chain.plugins]
    assert names == ["request_transform", "cache", "response_transform"]


@pytest.mark.parametrize(
    ("transform", "vary"),
    [
        pytest.param({"path": "/data/{header.X-Tenant}"}, None, id="path"),
        pytest.param({"query": {"set": {"tenant": "{header.X-Tenant}"}}}, None, id="query"),
        pytest.param(
            {"headers": {"set": {"X-Tenant-Id": "{header.X-Tenant}"}}}, b"X-Tenant-Id", id="header"
        ),
    ],
)
def test_the_key_is_the_request_request_transform_sends(
    transform: dict[str, Any], vary: bytes | None
) -> None:
    """RFC 9111 §2: the key is the request that produced the response. A tenant's data must
    not reach another tenant because the gateway, not the client, put the tenant in it."""
    plugin, _ = cache()
    chain = PluginChain([plugin, build("request_transform", transform)])
    headers = [(b"Cache-Control", b"max-age=60")] + ([(b"Vary", vary)] if vary else [])

    def tenant(name: str) -> Ctx:
        return Ctx(path="/tenant/x", headers=[("X-Tenant", name)])

    acme = tenant("acme")
    assert through_chain(chain, acme) is None
    upstream(plugin, acme, headers=headers, chunks=[b"acme's"])
    assert hit(through_chain(chain, tenant("acme"))).body == b"acme's"
    globex = tenant("globex")
    assert through_chain(chain, globex) is None and globex.cache_status == "MISS"
    plugin.on_log(globex)


def test_the_key_holds_the_upstream_path_and_purge_the_client_one() -> None:
    """Two client paths routed to one upstream path stay apart (a route may add what the
    client path said elsewhere); an upstream path changed by a rewrite is in the key; purge
    and invalidation keep to the path the client asked for."""
    plugin, _ = cache()
    first = Ctx(path="/api/users")
    first.upstream_path = "/users"
    plugin.on_request(first)
    upstream(plugin, first, chunks=[b"users"])
    again = Ctx(path="/api/users")
    again.upstream_path = "/users"
    assert hit(plugin.on_request(again)).body == b"users"
    elsewhere = Ctx(path="/api/users")
    elsewhere.upstream_path = "/v2/users"
    assert missed(plugin, elsewhere)
    assert asyncio.run(plugin.purge(route="r", prefix="/api/")) == 1


# ------------------------------------------------------------------------------ invalidation


def stored(plugin: CachePlugin, ctx: Ctx, body: bytes = b"old") -> None:
    """Make `ctx`'s GET the stored entry."""
    plugin.on_request(ctx)
    upstream(plugin, ctx, chunks=[body])
    assert hit(plugin.on_request(ctx_like(ctx))).body == body


def ctx_like(ctx: Ctx, method: str = "GET") -> Ctx:
    """Another request for the same target, host, headers and consumer."""
    other = Ctx(method, ctx.request.path, ctx.route.name, query=ctx.request.query)
    other.request.headers = list(ctx.request.headers)
    other.request.host = ctx.request.host
    other.consumer = ctx.consumer
    return other


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("status", [200, 201, 204, 303])
def test_a_successful_unsafe_request_invalidates_the_target(method: str, status: int) -> None:
    """RFC 9111 §4.4."""
    plugin, _ = cache()
    get = Ctx(query=b"id=1")
    stored(plugin, get)
    unsafe = ctx_like(get, method)
    assert plugin.on_request(unsafe) is None and unsafe.cache_status == "BYPASS"
    upstream(plugin, unsafe, status=status, headers=[], chunks=[])
    assert plugin.on_request(ctx_like(get)) is None


@pytest.mark.parametrize("status", [400, 404, 409, 500, 502])
def test_an_error_response_to_an_unsafe_request_invalidates_nothing(status: int) -> None:
    plugin, _ = cache()
    get = Ctx(query=b"id=1")
    stored(plugin, get)
    post = ctx_like(get, "POST")
    plugin.on_request(post)
    upstream(plugin, post, status=status, headers=[])
    assert hit(plugin.on_request(ctx_like(get))).body == b"old"


def test_safe_methods_invalidate_nothing() -> None:
    plugin, _ = cache()
    get = Ctx()
    stored(plugin, get)
    for method in ("OPTIONS", "TRACE", "HEAD"):
        safe = ctx_like(get, method)
        plugin.on_request(safe)
        upstream(plugin, safe, headers=[])
    assert hit(plugin.on_request(ctx_like(get))).body == b"old"


def test_invalidation_removes_every_variant_and_only_the_target() -> None:
    plugin, _ = cache()
    vary = [(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept-Language")]
    for lang in ("en", "fr"):
        ctx = Ctx(headers=[("Accept-Language", lang)])
        plugin.on_request(ctx)
        upstream(plugin, ctx, headers=vary, chunks=[lang.encode()])
    neighbours = [Ctx(query=b"id=2"), Ctx(route="other"), Ctx(path="/items/1")]
    for ctx in neighbours:
        stored(plugin, ctx)
    put = Ctx("PUT", headers=[("Accept-Language", "de")])  # its own variant does not matter
    plugin.on_request(put)
    upstream(plugin, put, status=204, headers=[], chunks=[])
    for lang in ("en", "fr"):
        assert missed(plugin, Ctx(headers=[("Accept-Language", lang)])), lang
    for ctx in neighbours:
        assert hit(plugin.on_request(ctx_like(ctx))).body == b"old"
    assert len(plugin.store) == len(neighbours)  # the variants and their marker are gone


def test_invalidation_covers_the_consumer_in_the_key() -> None:
    plugin, _ = cache()
    alice = as_consumer("alice")
    stored(plugin, alice)
    post = as_consumer("alice")
    post.request.method = "POST"
    plugin.on_request(post)
    upstream(plugin, post, status=201, headers=[])
    assert plugin.on_request(as_consumer("alice")) is None


VARY_LANG = [(b"Vary", b"Accept-Language")]  # fresh for the route's ttl


def as_consumer_at(name: str | None, path: str = "/items", **kw: Any) -> Ctx:
    """A request for `path` by consumer `name` (None: anonymous); `lang` sets
    Accept-Language, `method`, `route`, `host` and `query` what they say."""
    lang = kw.pop("lang", None)
    host = kw.pop("host", None)
    headers = [("Accept-Language", lang)] if lang else []
    ctx = Ctx(kw.pop("method", "GET"), path, kw.pop("route", "r"), headers=headers, **kw)
    if host is not None:
        ctx.request.host = host
    ctx.consumer = SimpleNamespace(name=name) if name else None
    return ctx


def store_as(plugin: CachePlugin, name: str | None, body: bytes, **kw: Any) -> None:
    """`name`'s GET stores `body` (varying on Accept-Language when `lang` is given)."""
    ctx = as_consumer_at(name, **kw)
    assert plugin.on_request(ctx) is None
    upstream(plugin, ctx, headers=VARY_LANG if "lang" in kw else [], chunks=[body])


def unsafe_as(plugin: CachePlugin, name: str, method: str, status: int, **kw: Any) -> None:
    ctx = as_consumer_at(name, method=method, **kw)
    assert plugin.on_request(ctx) is None and ctx.cache_status == "BYPASS"
    upstream(plugin, ctx, status=status, headers=[], chunks=[])


def readers() -> list[dict[str, Any]]:
    """Every consumer's view of GET /items?id=1: alice's, bob's in two languages, anyone's."""
    return [
        {"name": "alice", "query": b"id=1"},
        {"name": "bob", "query": b"id=1", "lang": "en"},
        {"name": "bob", "query": b"id=1", "lang": "fr"},
        {"name": None, "query": b"id=1"},
    ]


def neighbours() -> list[dict[str, Any]]:
    """What bob stored that is not /items?id=1 on route r and example.com."""
    return [
        {"name": "bob", "query": b"id=2"},
        {"name": "bob", "query": b"id=1", "route": "other"},
        {"name": "bob", "query": b"id=1", "host": "other.example.com"},
        {"name": "bob", "path": "/items/1"},
    ]


@pytest.mark.parametrize("method", ["PUT", "POST", "DELETE", "PATCH"])
def test_an_unsafe_request_invalidates_every_consumers_entries(method: str) -> None:
    """RFC 9111 §4.4: the target URI's stored responses, whatever the secondary key: alice's
    PUT /items?id=1 must not leave bob (or anyone) reading the old item, in any variant."""
    plugin, _ = cache(ttl="30s")
    for who in readers() + neighbours():
        store_as(plugin, body=b"old", **who)
        assert hit(plugin.on_request(as_consumer_at(**who))).body == b"old"
    unsafe_as(plugin, "alice", method, 204, query=b"id=1")
    for who in readers():
        assert missed(plugin, as_consumer_at(**who)), who
    for who in neighbours():
        assert hit(plugin.on_request(as_consumer_at(**who))).body == b"old"
    assert len(plugin.store) == len(neighbours())  # bob's variants and marker are gone too
    assert isinstance(plugin.store, MemoryStore) and plugin.store.indexed == len(plugin.store)


def test_an_error_answer_invalidates_no_consumers_entries_a_success_all() -> None:
    plugin, _ = cache(ttl="30s")
    for who in readers():
        store_as(plugin, body=b"old", **who)
    for status in (400, 404, 409, 500, 503):
        unsafe_as(plugin, "alice", "PUT", status, query=b"id=1")
        for who in readers():
            assert hit(plugin.on_request(as_consumer_at(**who))).body == b"old"
    unsafe_as(plugin, "alice", "PUT", 200, query=b"id=1")
    for who in readers():
        assert missed(plugin, as_consumer_at(**who)), who


def test_the_index_stays_bounded_by_the_entries() -> None:
    """Consumers come and go, entries expire: what the invalidation index holds is what the
    store holds (bounded by max_bytes), never a trace of what left it."""
    plugin, clock = cache(ttl="1s", max_bytes="4KiB")
    store = plugin.store
    assert isinstance(store, MemoryStore)
    for i in range(300):
        clock.now += 0.5
        store_as(plugin, f"consumer-{i:03}", b"x" * 50, lang=("en", "fr", "de")[i % 3])
        assert store.indexed == len(store) and store.bytes <= store.max_bytes
    assert len(store) < 10
    clock.now += 10  # everything expired: the next lookups drop what they meet
    for i in range(297, 300):
        assert missed(plugin, as_consumer_at(f"consumer-{i:03}", lang=("en", "fr", "de")[i % 3]))
    store_as(plugin, "another", b"x")
    assert store.indexed == len(store)
    unsafe_as(plugin, "alice", "PUT", 204)
    assert len(store) == store.indexed == 0 and store.bytes == 0


async def test_invalidation_in_the_redis_store() -> None:
    plugin, _ = cache()
    fake = FakeRedis()
    plugin.store = RedisCacheStore(fake)  # type: ignore[arg-type]

    async def lookup(ctx: Ctx) -> Response | None:
        outcome = plugin.on_request(ctx)
        return await outcome if inspect.isawaitable(outcome) else outcome

    vary = [(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept-Language")]
    for lang in ("en", "fr"):
        ctx = Ctx(headers=[("Accept-Language", lang)])
        assert await lookup(ctx) is None
        upstream(plugin, ctx, headers=vary, chunks=[lang.encode()])
        await plugin.close()  # waits for the background SET
    other = Ctx(query=b"id=2")
    assert await lookup(other) is None
    upstream(plugin, other)
    await plugin.close()
    assert len(fake.data) == 4  # the marker, two variants, the other target
    delete = Ctx("DELETE")
    assert plugin.on_request(delete) is None
    upstream(plugin, delete, status=204, headers=[], chunks=[])
    await plugin.close()  # waits for the background invalidation
    assert len(fake.data) == 1
    assert await lookup(Ctx(headers=[("Accept-Language", "en")])) is None
    assert hit(await lookup(Ctx(query=b"id=2"))).status == 200


async def test_invalidation_of_every_consumer_in_the_redis_store() -> None:
    plugin, _ = cache(ttl="30s")
    fake = FakeRedis()
    store = plugin.store = RedisCacheStore(fake)  # type: ignore[arg-type]

    async def outcome(ctx: Ctx) -> Response | None:
        result = plugin.on_request(ctx)
        return await result if inspect.isawaitable(result) else result

    for who in readers() + neighbours():
        ctx = as_consumer_at(**who)
        assert await outcome(ctx) is None
        upstream(plugin, ctx, headers=VARY_LANG if "lang" in who else [], chunks=[b"old"])
        await plugin.close()  # waits for the background SET
    assert len(fake.data) == len(readers()) + 1 + len(neighbours())  # and bob's marker
    for status in (409, 204):  # an error answer invalidates nothing
        put = as_consumer_at("alice", method="PUT", query=b"id=1")
        assert await outcome(put) is None
        upstream(plugin, put, status=status, headers=[], chunks=[])
        await plugin.close()  # waits for the background invalidation
        for who in readers():
            get = as_consumer_at(**who)
            assert (await outcome(get) is None) == (status == 204), (status, who)
            plugin.on_log(get)  # (a miss ends without an answer)
    assert len(fake.data) == len(neighbours())
    assert store.target_index(target_of(plugin._base_key(put))).encode() not in fake.zsets
    for who in neighbours():
        assert hit(await outcome(as_consumer_at(**who))).body == b"old"


# ------------------------------------------------------------------------------ purge, config


async def test_purge_counts_responses_not_vary_markers() -> None:
    plugin, _ = cache(ttl="30s")
    for lang in ("en", "fr"):
        store_as(plugin, "bob", b"old", lang=lang)
    store_as(plugin, "alice", b"old")
    assert len(plugin.store) == 4  # alice's, bob's two variants and their marker
    assert await plugin.purge(route="r") == 3
    assert len(plugin.store) == 0


async def test_purge_by_route_and_prefix() -> None:
    plugin, _ = cache()
    for route, path in [("a", "/users/1"), ("a", "/users/2"), ("a", "/orders"), ("b", "/users/1")]:
        ctx = Ctx(path=path, route=route)
        plugin.on_request(ctx)
        upstream(plugin, ctx)
    assert await plugin.purge(route="a", prefix="/users/") == 2
    assert plugin.on_request(Ctx(path="/users/1", route="a")) is None
    assert hit(plugin.on_request(Ctx(path="/users/1", route="b"))).status == 200
    assert plugin in live_plugins()
    assert await purge_all(route="b") == 1
    assert hit(plugin.on_request(Ctx(path="/orders", route="a"))).status == 200


def test_memory_store_is_shared_across_rebuilds_with_one_env() -> None:
    env = make_env()
    first: CachePlugin = build("cache", {}, env)
    second: CachePlugin = build("cache", {}, env)
    assert first.store is second.store


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"store": "memcached"}, "invalid cache store"),
        ({"tll": "1s"}, "did you mean 'ttl'"),
        ({"store": "redis"}, "needs a top-level"),
    ],
)
def test_config_errors(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build("cache", raw)
    assert message in str(err.value.errors)


async def test_redis_store_flow() -> None:
    plugin, clock = cache()
    fake = FakeRedis()
    plugin.store = RedisCacheStore(fake)  # type: ignore[arg-type]
    ctx = Ctx()
    lookup = plugin.on_request(ctx)
    assert inspect.isawaitable(lookup) and await lookup is None
    upstream(plugin, ctx, headers=[(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept")])
    await plugin.close()  # waits for the background SET
    assert len(fake.data) == 2  # the Vary marker and the variant
    clock.now += 3
    second = Ctx()
    outcome = plugin.on_request(second)
    assert inspect.isawaitable(outcome)
    response = hit(await outcome)
    assert header(response, b"age") == b"3" and second.cache_status == "HIT"
    fake.down = True
    outage = plugin.on_request(Ctx())
    assert inspect.isawaitable(outage) and await outage is None  # fail open: a miss
