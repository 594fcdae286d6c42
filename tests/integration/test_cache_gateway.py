"""The response cache through a real gateway: each RFC 9111 rule of issue 5, coalescing,
truncated bodies, stale-if-error, purge through the admin API, and CORS on answers the gateway
makes itself (a HIT, a 401).

The upstream's `/respond` behaviour sends whatever headers a test asks for and a body that
counts the requests it had received (`n`), so an identical `n` means "served from the cache".
Every test uses its own query tag (`t=...`) and so its own cache keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import jwt
import pytest
import pytest_asyncio

from apigate.plugins.cache_store import RedisCacheStore, target_of
from apigate.store.redis import RedisStore
from tests.support.client import RawClient, Truncated
from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import Reply, request
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream
from tests.unit.test_cache_store import entry, key

pytestmark = pytest.mark.asyncio(loop_scope="module")

ORIGIN = "https://app.example.com"
JWT_SECRET = "a-secret-of-at-least-32-bytes-for-hs256!"


class HeldBodyUpstream:
    """An upstream whose first answer to each target sends the head and part of the body at
    once and holds the rest until another request arrives (or `HOLD` seconds pass).

    A request coalesced behind such an answer reaches this upstream while the body is held
    only if the cache let it go before the end of that body; `arrivals` records, for every
    request, whether another answer's body was held when it arrived.

        /private           Cache-Control: private (never stored), 10 bytes, 5 held
        /large             Cache-Control: max-age=60, 3000 bytes, 1000 held (over 1 KiB)
    """

    HOLD = 2.0
    ANSWERS = {  # path: (Cache-Control, body size, bytes sent before the hold)
        "/private": ("private, max-age=60", 10, 5),
        "/large": ("max-age=60", 3000, 2000),
    }

    def __init__(self) -> None:
        self.arrivals: list[tuple[str, bool]] = []
        self.arrived = asyncio.Event()
        self._release: asyncio.Event | None = None
        self._answered: set[str] = set()
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> HeldBodyUpstream:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                await self._answer(head.split(b" ", 2)[1].decode(), writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(self, target: str, writer: asyncio.StreamWriter) -> None:
        holding = self._release is not None and not self._release.is_set()
        self.arrivals.append((target, holding))
        self.arrived.set()
        if self._release is not None:
            self._release.set()  # another request came in: let the held body go
        cache_control, size, before_hold = self.ANSWERS[target.partition("?")[0]]
        body = b"x" * size
        writer.write(
            b"HTTP/1.1 200 OK\r\nCache-Control: %s\r\nContent-Length: %d\r\n\r\n"
            % (cache_control.encode(), size)
        )
        if target in self._answered:
            writer.write(body)
            return
        self._answered.add(target)
        writer.write(body[:before_hold])
        await writer.drain()
        self._release = release = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(release.wait(), self.HOLD)
        release.set()
        writer.write(body[before_hold:])
        await writer.drain()


def _config(up: Upstream, doomed: Upstream, held: HeldBodyUpstream) -> dict[str, Any]:
    def route(name: str, cache: dict[str, Any], service: str = "up", **extra: Any) -> Any:
        plugins = {"cache": cache, **extra.pop("plugins", {})}
        return {
            "name": name,
            "match": {"paths": [f"/{name}"]},
            "service": service,
            "strip_prefix": True,
            "plugins": plugins,
            **extra,
        }

    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={
            "up": {"targets": [up.url], "health": {"passive": None}},
            "doomed": {"targets": [doomed.url], "health": {"passive": None}},
            "held": {"targets": [held.url], "health": {"passive": None}},
        },
        consumers=[
            {"name": "alice", "api_keys": ["alice-key"]},
            {"name": "bob", "api_keys": ["bob-key"]},
        ],
        routes=[
            route("c", {}),
            route("ttl", {"ttl": "30s"}),
            route("stale", {"stale_if_error": "30s"}),
            route("down", {"stale_if_error": "30s"}, service="doomed"),
            route("purge", {}),
            route(
                "keyed",
                {"ttl": "30s", "key_include_consumer": True},
                plugins={"key_auth": {}},
            ),
            route("ck", {"ttl": "30s"}, plugins={"key_auth": {}}),  # the consumer by default
            route("small", {"ttl": "30s", "max_entry_bytes": "1KiB"}),
            route("held", {"ttl": "30s", "max_entry_bytes": "1KiB"}, service="held"),
            route(
                "shaped",
                {"ttl": "30s"},
                plugins={
                    "response_transform": {
                        "headers": {"add": {"X-Shaped": "yes"}},
                        "json": {"remove": ["headers"], "add": {"shaped": True}},
                    }
                },
            ),
            route(
                "jwt",
                {"ttl": "30s"},
                plugins={"jwt": {"secret": JWT_SECRET, "algorithms": ["HS256"]}},
            ),
            route(  # the tenant and the user go upstream in the path and the query
                "tenant",
                {"ttl": "30s"},
                plugins={
                    "request_transform": {
                        "path": "/respond/{header.X-Tenant}",
                        "query": {"set": {"user": "{header.X-User}"}},
                    }
                },
            ),
            route(  # users of an identity provider: their tokens name no consumer
                "idp",
                {"ttl": "30s"},
                plugins={
                    "jwt": {"secret": JWT_SECRET, "algorithms": ["HS256"], "cookie": "session"}
                },
            ),
        ],
        plugins={"cors": {"origins": [ORIGIN]}},
    )


@dataclass
class Setup:
    gw: GatewayProcess
    up: Upstream
    doomed: Upstream
    held: HeldBodyUpstream

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return await request(self.gw.port, "GET", path, headers=headers)

    def count(self, tag: str, up: Upstream | None = None) -> int:
        """Requests of the test tagged `tag` that reached the upstream."""
        return sum(f"t={tag}&" in r.query + "&" for r in (up or self.up).received)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup() -> AsyncIterator[Setup]:
    async with contextlib.AsyncExitStack() as stack:
        up = await stack.enter_async_context(Upstream("up"))
        doomed = await stack.enter_async_context(Upstream("doomed"))
        held = await stack.enter_async_context(HeldBodyUpstream())
        gw = await stack.enter_async_context(GatewayProcess(_config(up, doomed, held)))
        yield Setup(gw, up, doomed, held)
        assert gw.proc is not None and gw.proc.returncode is None, "died:\n" + gw.logs()


def _target(route: str, tag: str, *headers: str, **params: str) -> str:
    """`/route/respond?t=tag&h=...`: the upstream answers with these header fields."""
    query = [f"t={tag}", *(f"h={quote(h)}" for h in headers)]
    query += [f"{k}={v}" for k, v in params.items()]
    return f"/{route}/respond?" + "&".join(query)


# ------------------------------------------------------------------------------ freshness


async def test_max_age_is_a_hit_with_age_and_the_same_body(setup: Setup) -> None:
    path = _target("c", "maxage", "Cache-Control: max-age=60", "Age: 30", "X-Custom: kept")
    first = await setup.get(path)
    assert first.status == 200 and first.headers["x-cache"] == "MISS"
    second = await setup.get(path)
    assert second.status == 200 and second.headers["x-cache"] == "HIT"
    assert second.body == first.body and second.json()["n"] == first.json()["n"]
    assert second.headers["age"] == "30"  # the upstream's Age, plus ~0 s in our store
    assert second.headers["x-custom"] == "kept"
    assert second.headers["content-type"] == "application/json"
    assert second.headers["content-length"] == str(len(first.body))
    assert setup.count("maxage") == 1
    # HEAD is answered from GET's entry
    head = await request(setup.gw.port, "HEAD", path)
    assert head.status == 200 and head.headers["x-cache"] == "HIT" and head.body == b""
    assert setup.count("maxage") == 1


async def test_entries_age_and_expire(setup: Setup) -> None:
    path = _target("c", "expire", "Cache-Control: max-age=2", "Age: 1")
    first = await setup.get(path)
    assert first.headers["x-cache"] == "MISS"
    assert (await setup.get(path)).headers["age"] == "1"
    await asyncio.sleep(1.05)
    late = await setup.get(path)
    assert late.headers["x-cache"] == "MISS", "an expired entry was served"
    assert late.json()["n"] != first.json()["n"]
    assert setup.count("expire") == 2


async def test_s_maxage_wins_over_max_age_for_a_shared_cache(setup: Setup) -> None:
    path = _target("c", "smaxage", "Cache-Control: max-age=0, s-maxage=60")
    assert (await setup.get(path)).headers["x-cache"] == "MISS"
    assert (await setup.get(path)).headers["x-cache"] == "HIT"
    assert setup.count("smaxage") == 1


@pytest.mark.parametrize(
    ("tag", "headers"),
    [
        ("nostore", ["Cache-Control: no-store, max-age=60"]),
        ("private", ["Cache-Control: private, max-age=60"]),
        ("nocache", ["Cache-Control: no-cache, max-age=60"]),
        ("varystar", ["Cache-Control: max-age=60", "Vary: *"]),
        ("cookie", ["Cache-Control: max-age=60", "Set-Cookie: session=1"]),
        ("silent", []),  # says nothing, and route `c` has no ttl
    ],
)
async def test_responses_that_must_not_be_stored(
    setup: Setup, tag: str, headers: list[str]
) -> None:
    path = _target("c", tag, *headers)
    replies = [await setup.get(path) for _ in range(3)]
    assert [r.headers["x-cache"] for r in replies] == ["MISS"] * 3
    assert len({r.json()["n"] for r in replies}) == 3
    assert setup.count(tag) == 3


async def test_uncacheable_status_is_not_stored(setup: Setup) -> None:
    path = _target("c", "status", "Cache-Control: max-age=60", status="500")
    replies = [await setup.get(path) for _ in range(2)]
    assert [r.status for r in replies] == [500, 500]
    assert setup.count("status") == 2
    cacheable = _target("c", "status404", "Cache-Control: max-age=60", status="404")
    assert [(await setup.get(cacheable)).headers["x-cache"] for _ in range(2)] == ["MISS", "HIT"]


async def test_route_ttl_applies_to_silent_responses_only(setup: Setup) -> None:
    path = _target("ttl", "ttl")
    assert [(await setup.get(path)).headers["x-cache"] for _ in range(3)] == [
        "MISS",
        "HIT",
        "HIT",
    ]
    assert setup.count("ttl") == 1
    told = _target("ttl", "ttl-nostore", "Cache-Control: no-store")  # the response's word wins
    assert [(await setup.get(told)).headers["x-cache"] for _ in range(2)] == ["MISS", "MISS"]


# ------------------------------------------------------------------------------ keys


async def test_vary_makes_separate_entries(setup: Setup) -> None:
    path = _target("c", "vary", "Cache-Control: max-age=60", "Vary: Accept-Language")
    en1 = await setup.get(path, {"Accept-Language": "en"})
    fr1 = await setup.get(path, {"Accept-Language": "fr"})
    en2 = await setup.get(path, {"Accept-Language": "en"})
    fr2 = await setup.get(path, {"Accept-Language": "fr"})
    none = await setup.get(path)
    assert [r.headers["x-cache"] for r in (en1, fr1, en2, fr2, none)] == [
        "MISS",
        "MISS",
        "HIT",
        "HIT",
        "MISS",
    ]
    assert en2.json()["n"] == en1.json()["n"] != fr1.json()["n"] == fr2.json()["n"]
    assert ["Accept-Language", "en"] in en2.json()["headers"]
    assert ["Accept-Language", "fr"] in fr2.json()["headers"]
    assert setup.count("vary") == 3


async def test_authorization_is_not_shared_unless_public(setup: Setup) -> None:
    auth = {"Authorization": "Bearer one"}
    plain = _target("c", "auth-plain", "Cache-Control: max-age=60")
    assert [(await setup.get(plain, auth)).headers["x-cache"] for _ in range(2)] == [
        "MISS",
        "MISS",
    ]
    # an entry stored for an anonymous request is not served to one with credentials
    assert (await setup.get(plain)).headers["x-cache"] == "MISS"
    assert (await setup.get(plain)).headers["x-cache"] == "HIT"
    assert (await setup.get(plain, auth)).headers["x-cache"] == "MISS"
    assert setup.count("auth-plain") == 4

    public = _target("c", "auth-public", "Cache-Control: public, max-age=60")
    first = await setup.get(public, auth)
    other = await setup.get(public, {"Authorization": "Bearer two"})
    assert (first.headers["x-cache"], other.headers["x-cache"]) == ("MISS", "HIT")
    assert setup.count("auth-public") == 1
    shared = _target("c", "auth-smaxage", "Cache-Control: s-maxage=60")
    assert [(await setup.get(shared, auth)).headers["x-cache"] for _ in range(2)] == [
        "MISS",
        "HIT",
    ]


@pytest.mark.parametrize("route", ["keyed", "ck"], ids=["configured", "by-default"])
async def test_consumers_do_not_share_entries(setup: Setup, route: str) -> None:
    """key_auth + cache, with key_include_consumer set or left to its default: alice's entry
    is never bob's."""
    path = _target(route, route, "Cache-Control: max-age=60")
    alice = {"apikey": "alice-key"}
    bob = {"apikey": "bob-key"}
    replies = [await setup.get(path, h) for h in (alice, bob, alice, bob)]
    assert [r.headers["x-cache"] for r in replies] == ["MISS", "MISS", "HIT", "HIT"]
    assert replies[2].json()["n"] == replies[0].json()["n"] != replies[1].json()["n"]
    assert replies[3].json()["n"] == replies[1].json()["n"]
    assert setup.count(route) == 2


async def test_users_of_tokens_that_name_no_consumer_do_not_share_entries(setup: Setup) -> None:
    """The reviewer's case: a JWT in a cookie (so no §3.5 Authorization rule) whose subject
    names no configured consumer. User B was answered user A's cached response."""

    def session(sub: str, iss: str = "idp") -> dict[str, str]:
        claims = {"sub": sub, "iss": iss, "exp": int(time.time()) + 600}
        return {"cookie": "session=" + jwt.encode(claims, JWT_SECRET, algorithm="HS256")}

    path = _target("idp", "idp", "Cache-Control: max-age=60")
    users = [session("user-a"), session("user-b"), session("user-a", iss="other-idp")]
    replies = [await setup.get(path, h) for h in (*users, *users)]
    assert [r.status for r in replies] == [200] * 6
    assert [r.headers["x-cache"] for r in replies] == ["MISS"] * 3 + ["HIT"] * 3
    served = [r.json()["n"] for r in replies]
    assert len(set(served[:3])) == 3 and served[3:] == served[:3]
    assert setup.count("idp") == 3


async def test_x_cache_bypass(setup: Setup) -> None:
    path = _target("c", "bypass", "Cache-Control: max-age=60")
    post = await request(setup.gw.port, "POST", path, body=b"x")
    assert post.status == 200 and post.headers["x-cache"] == "BYPASS"
    assert (await setup.get(path)).headers["x-cache"] == "MISS"
    assert (await setup.get(path)).headers["x-cache"] == "HIT"
    # the client asks for a fresh answer: not served from the cache, but the answer is stored
    fresh = await setup.get(path, {"Cache-Control": "no-cache"})
    assert fresh.headers["x-cache"] == "BYPASS"
    again = await setup.get(path)
    assert again.headers["x-cache"] == "HIT" and again.json()["n"] == fresh.json()["n"]
    nostore = await setup.get(path, {"Cache-Control": "no-store"})
    assert nostore.headers["x-cache"] == "BYPASS"
    assert setup.count("bypass") == 4


async def test_a_successful_unsafe_request_invalidates_the_target(setup: Setup) -> None:
    """RFC 9111 §4.4: every variant of the target URI; not after an error response."""
    path = _target("c", "invalidate", "Cache-Control: max-age=60", "Vary: Accept-Language")
    langs = [{"Accept-Language": "en"}, {"Accept-Language": "fr"}]
    for lang in langs:
        assert (await setup.get(path, lang)).headers["x-cache"] == "MISS"
        assert (await setup.get(path, lang)).headers["x-cache"] == "HIT"
    neighbour = path.replace("t=invalidate", "t=invalidate-neighbour")
    await setup.get(neighbour)
    try:
        setup.up.state.override = "/status/503"
        failed = await request(setup.gw.port, "PUT", path, body=b"x")
        assert failed.status == 503
    finally:
        setup.up.state.override = None
    assert [(await setup.get(path, lang)).headers["x-cache"] for lang in langs] == ["HIT"] * 2
    for method in ("POST", "DELETE"):
        changed = await request(setup.gw.port, method, path, body=b"x")
        assert changed.status == 200 and changed.headers["x-cache"] == "BYPASS"
        assert [(await setup.get(path, lang)).headers["x-cache"] for lang in langs] == ["MISS"] * 2
    assert (await setup.get(neighbour)).headers["x-cache"] == "HIT"


async def test_an_unsafe_request_invalidates_every_consumers_entries(setup: Setup) -> None:
    """RFC 9111 §4.4 with the consumer in the key (key_auth; the default): alice's PUT removes
    bob's entries too, each Vary variant (CORS says Vary: Origin); an error answer nothing."""
    path = _target("ck", "consumers", "Cache-Control: max-age=60")
    alice, bob = {"apikey": "alice-key"}, {"apikey": "bob-key"}
    readers = [alice, bob, {**bob, "Origin": ORIGIN}]
    for headers in readers:
        assert (await setup.get(path, headers)).headers["x-cache"] == "MISS"
        assert (await setup.get(path, headers)).headers["x-cache"] == "HIT"
    neighbour = path.replace("t=consumers", "t=consumers-neighbour")
    assert (await setup.get(neighbour, bob)).headers["x-cache"] == "MISS"
    try:
        setup.up.state.override = "/status/503"
        failed = await request(setup.gw.port, "PUT", path, headers=alice, body=b"x")
        assert failed.status == 503
    finally:
        setup.up.state.override = None
    assert [(await setup.get(path, h)).headers["x-cache"] for h in readers] == ["HIT"] * 3
    changed = await request(setup.gw.port, "PUT", path, headers=alice, body=b"x")
    assert changed.status == 200 and changed.headers["x-cache"] == "BYPASS"
    replies = [await setup.get(path, h) for h in readers]
    assert [r.headers["x-cache"] for r in replies] == ["MISS"] * 3
    assert (await setup.get(neighbour, bob)).headers["x-cache"] == "HIT"


# ------------------------------------------------------------------------------ coalescing


async def test_100_concurrent_misses_make_one_upstream_request(setup: Setup) -> None:
    path = _target("c", "herd", "Cache-Control: max-age=60", ms="500")
    replies = await asyncio.gather(*(setup.get(path) for _ in range(100)))
    assert [r.status for r in replies] == [200] * 100
    assert setup.count("herd") == 1
    assert len({r.body for r in replies}) == 1
    words = sorted(r.headers["x-cache"] for r in replies)
    assert words == ["HIT"] * 99 + ["MISS"]


@pytest.mark.parametrize("what", ["private", "large"])
async def test_waiters_do_not_wait_for_a_body_that_will_not_be_stored(
    setup: Setup, what: str
) -> None:
    """A request coalesced behind an answer that is not stored (uncacheable head, or a body
    past max_entry_bytes) goes upstream at once, not after the end of that answer's body."""
    held = setup.held
    path = f"/held/{what}?t=held-{what}"
    held.arrived.clear()
    first = asyncio.create_task(setup.get(path))
    await asyncio.wait_for(held.arrived.wait(), 5)  # the first one leads: it is upstream
    second = await setup.get(path)
    assert (await first).body == second.body == b"x" * held.ANSWERS[f"/{what}"][1]
    assert [holding for target, holding in held.arrivals if f"t=held-{what}" in target] == [
        False,
        True,
    ], "the second request waited for the end of the first one's body"


async def test_a_body_cut_off_mid_way_is_never_stored(setup: Setup) -> None:
    path = _target("c", "cut", "Cache-Control: max-age=60", cut="1")
    for expected in (1, 2):
        async with RawClient(setup.gw.port) as client:
            await client.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            with pytest.raises(Truncated):
                await client.response()
        assert setup.count("cut") == expected  # the second one went upstream again
    # concurrent waiters on a leader whose body is cut go upstream themselves
    path = _target("c", "cut-herd", "Cache-Control: max-age=60", cut="1", ms="200")

    async def one() -> str:
        async with RawClient(setup.gw.port) as client:
            await client.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            try:
                resp = await client.response()
            except Truncated:
                return "truncated"
            return f"complete {resp.status}"

    outcomes = await asyncio.gather(*(one() for _ in range(5)))
    assert outcomes == ["truncated"] * 5
    assert setup.count("cut-herd") == 5


def _reset(client: RawClient) -> None:
    """Leave with a TCP reset (RST), as an impatient client's process does when killed."""
    assert client.writer is not None
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()


async def test_when_the_leaders_client_leaves_one_waiter_leads_the_others(setup: Setup) -> None:
    """One impatient client must not undo coalescing: its waiters do not all go upstream."""
    path = _target("c", "leader-gone", "Cache-Control: max-age=60", ms="800")
    leader = RawClient(setup.gw.port)
    await leader.connect()
    host = f"127.0.0.1:{setup.gw.port}"  # the followers' Host: the same key
    await leader.send(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    await asyncio.sleep(0.1)  # it leads: its request is upstream
    followers = [asyncio.create_task(setup.get(path)) for _ in range(6)]
    await asyncio.sleep(0.3)  # they wait for it
    _reset(leader)
    await leader.close()
    replies = await asyncio.gather(*followers)
    assert [r.status for r in replies] == [200] * 6
    assert sorted(r.headers["x-cache"] for r in replies) == ["HIT"] * 5 + ["MISS"]
    assert len({r.body for r in replies}) == 1
    assert setup.count("leader-gone") == 2  # the leader's (cut) and its successor's


# ------------------------------------------------------------------------------ stale-if-error


async def test_stale_entry_replaces_a_5xx_and_a_reset(setup: Setup) -> None:
    path = _target("stale", "stale", "Cache-Control: max-age=1")
    first = await setup.get(path)
    assert first.headers["x-cache"] == "MISS"
    await asyncio.sleep(1.05)  # expired, within stale_if_error (30 s)
    try:
        setup.up.state.override = "/status/503"
        stale = await setup.get(path)
        assert stale.status == 200 and stale.headers["x-cache"] == "STALE"
        assert stale.body == first.body and int(stale.headers["age"]) >= 1
        setup.up.state.override = "/reset"
        reset = await setup.get(path)
        assert reset.status == 200 and reset.headers["x-cache"] == "STALE"
        assert reset.body == first.body
    finally:
        setup.up.state.override = None
    assert setup.count("stale") == 3
    fresh = await setup.get(path)  # the upstream is back: a fresh answer replaces the entry
    assert fresh.headers["x-cache"] == "MISS" and fresh.json()["n"] != first.json()["n"]
    # a route without stale_if_error passes the error through
    plain = _target("c", "nostale", "Cache-Control: max-age=1")
    await setup.get(plain)
    await asyncio.sleep(1.05)
    try:
        setup.up.state.override = "/status/503"
        assert (await setup.get(plain)).status == 503
    finally:
        setup.up.state.override = None


async def test_no_stale_answer_for_a_request_that_demands_a_fresh_one(setup: Setup) -> None:
    path = _target("stale", "stale-demand", "Cache-Control: max-age=60")
    assert (await setup.get(path)).headers["x-cache"] == "MISS"
    try:
        setup.up.state.override = "/status/500"
        for demand in ("no-cache", "max-age=0"):
            reply = await setup.get(path, {"Cache-Control": demand})
            assert (reply.status, reply.headers["x-cache"]) == (500, "BYPASS"), demand
    finally:
        setup.up.state.override = None


async def test_stale_entry_is_served_when_the_upstream_is_down(setup: Setup) -> None:
    path = _target("down", "down", "Cache-Control: max-age=1")
    first = await setup.get(path)
    assert first.status == 200 and first.headers["x-cache"] == "MISS"
    await setup.doomed.__aexit__(None, None, None)  # the server goes away: connect refused
    await asyncio.sleep(1.05)
    stale = await setup.get(path)
    assert stale.status == 200 and stale.headers["x-cache"] == "STALE"
    assert stale.body == first.body
    other = await setup.get(_target("down", "down-other"))  # nothing stale for this one
    assert other.status == 502 and other.json()["error"] == "upstream_connect_error"


# ------------------------------------------------------------------------------ purge


async def test_purge_by_route_and_prefix(setup: Setup) -> None:
    a = _target("purge", "purge-a", "Cache-Control: max-age=60")
    b = _target("purge", "purge-b", "Cache-Control: max-age=60")
    other = _target("c", "purge-other", "Cache-Control: max-age=60")
    for path in (a, b, other):
        assert (await setup.get(path)).headers["x-cache"] == "MISS"
        assert (await setup.get(path)).headers["x-cache"] == "HIT"
    admin = setup.gw.admin_port
    prefix = quote("/purge/respond?t=purge-a", safe="")
    reply = await request(admin, "DELETE", f"/cache?route=purge&prefix={prefix}")
    # (the route has cors, which says Vary: Origin: an entry and its Vary marker, which is
    # bookkeeping, not a response, and is not counted)
    assert reply.status == 200 and reply.json()["purged"] == 1
    assert (await setup.get(a)).headers["x-cache"] == "MISS"
    assert (await setup.get(b)).headers["x-cache"] == "HIT"
    reply = await request(admin, "DELETE", "/cache?route=purge")
    assert reply.status == 200 and reply.json()["purged"] == 2
    assert (await setup.get(a)).headers["x-cache"] == "MISS"
    assert (await setup.get(b)).headers["x-cache"] == "MISS"
    assert (await setup.get(other)).headers["x-cache"] == "HIT"  # another route: untouched
    missing = await request(admin, "DELETE", "/cache?route=nope")
    assert missing.status == 404


# ------------------------------------------------------------------------------ request_transform


async def test_the_key_is_the_request_request_transform_sends(setup: Setup) -> None:
    """RFC 9111 §2 (and Kong's order): request_transform runs before the cache, which keys
    the request as it goes upstream. One tenant's data never reaches another."""
    path = "/tenant/x?t=tenant&h=" + quote("Cache-Control: max-age=60")
    acme = {"X-Tenant": "acme", "X-User": "alice"}
    first = await setup.get(path, acme)
    other = await setup.get(path, {"X-Tenant": "globex", "X-User": "bob"})
    assert (first.headers["x-cache"], other.headers["x-cache"]) == ("MISS", "MISS")
    assert first.json()["path"] == "/respond/acme" and "user=alice" in first.json()["query"]
    assert other.json()["path"] == "/respond/globex" and "user=bob" in other.json()["query"]
    again = await setup.get(path, acme)
    assert again.headers["x-cache"] == "HIT" and again.body == first.body
    assert setup.count("tenant") == 2


# ------------------------------------------------------------------------------ CORS


async def test_cors_headers_on_a_cache_hit(setup: Setup) -> None:
    path = _target("c", "cors", "Cache-Control: max-age=60")
    origin = {"Origin": ORIGIN}
    miss = await setup.get(path, origin)
    hit = await setup.get(path, origin)
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    for reply in (miss, hit):
        assert reply.headers["access-control-allow-origin"] == ORIGIN
        assert "origin" in reply.headers["vary"].lower()
    # a request without Origin gets neither that entry nor a CORS header
    bare = await setup.get(path)
    assert bare.headers["x-cache"] == "MISS" and "access-control-allow-origin" not in bare.headers
    hit_bare = await setup.get(path)
    assert hit_bare.headers["x-cache"] == "HIT"
    assert "access-control-allow-origin" not in hit_bare.headers
    assert setup.count("cors") == 2


async def test_cors_headers_on_a_401_from_key_auth_and_jwt(setup: Setup) -> None:
    origin = {"Origin": ORIGIN}
    for path in ("/keyed/echo", "/jwt/echo"):
        reply = await setup.get(path, origin)
        assert reply.status == 401, (path, reply.body)
        assert reply.headers["access-control-allow-origin"] == ORIGIN, path
        assert "x-cache" not in reply.headers or reply.headers["x-cache"] != "HIT"
    assert not [r for r in setup.up.received if r.path == "/echo"]


async def test_cors_headers_on_a_stale_answer(setup: Setup) -> None:
    """An entry stored from a cross-origin request, served STALE to the next one from that
    origin (in place of a 5xx, and of a reset): the CORS plugin's headers must be on it, as on
    a HIT. (cors says Vary: Origin, so the entry is that origin's.)"""
    path = _target("stale", "stale-cors", "Cache-Control: max-age=1")
    assert (await setup.get(path, {"Origin": ORIGIN})).headers["x-cache"] == "MISS"
    hit = await setup.get(path, {"Origin": ORIGIN})
    assert hit.headers["x-cache"] == "HIT"
    assert hit.headers["access-control-allow-origin"] == ORIGIN
    await asyncio.sleep(1.05)
    try:
        for failure in ("/status/503", "/reset"):
            setup.up.state.override = failure
            stale = await setup.get(path, {"Origin": ORIGIN})
            assert stale.headers["x-cache"] == "STALE", failure
            assert stale.headers.get("access-control-allow-origin") == ORIGIN, failure
    finally:
        setup.up.state.override = None


async def test_conditional_hit_is_a_304(setup: Setup) -> None:
    path = _target("c", "etag", "Cache-Control: max-age=60", 'ETag: "v1"')
    first = await setup.get(path)
    assert first.headers["etag"] == '"v1"'
    not_modified = await setup.get(path, {"If-None-Match": '"v0", "v1"'})
    assert not_modified.status == 304 and not_modified.body == b""
    assert not_modified.headers["x-cache"] == "HIT" and not_modified.headers["etag"] == '"v1"'
    other = await setup.get(path, {"If-None-Match": '"v2"'})
    assert other.status == 200 and other.body == first.body
    assert setup.count("etag") == 1


async def test_chunked_and_close_delimited_responses_are_stored_whole(setup: Setup) -> None:
    for path, body in (
        ("/ttl/chunked?n=4", b"chunk-0;chunk-1;chunk-2;chunk-3;"),
        ("/ttl/eof", b"body-until-eof"),
    ):
        miss = await setup.get(path)
        hit = await setup.get(path)
        assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
        assert miss.body == hit.body == body
        assert hit.headers["content-length"] == str(len(body))
        assert [r.path for r in setup.up.received].count(path[4:].partition("?")[0]) == 1


async def test_a_hit_has_no_content_type_when_the_upstream_sent_none(setup: Setup) -> None:
    miss = await setup.get("/ttl/eof?t=no-type")
    hit = await setup.get("/ttl/eof?t=no-type")
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    assert "content-type" not in miss.headers
    assert "content-type" not in hit.headers


async def test_entry_over_max_entry_bytes_is_not_stored(setup: Setup) -> None:
    small = await setup.get("/small/big?bytes=1000")
    assert [
        small.headers["x-cache"],
        (await setup.get("/small/big?bytes=1000")).headers["x-cache"],
    ] == ["MISS", "HIT"]
    big = [await setup.get("/small/big?bytes=5000") for _ in range(2)]
    assert [r.headers["x-cache"] for r in big] == ["MISS", "MISS"]
    assert all(len(r.body) == 5000 for r in big)


async def test_transformed_response_is_what_is_stored(setup: Setup) -> None:
    path = _target("shaped", "shaped")
    miss = await setup.get(path)
    hit = await setup.get(path)
    assert (miss.headers["x-cache"], hit.headers["x-cache"]) == ("MISS", "HIT")
    assert miss.body == hit.body
    doc = hit.json()
    assert doc["shaped"] is True and "headers" not in doc
    assert hit.headers["x-shaped"] == "yes"
    assert hit.headers["content-length"] == str(len(hit.body))
    assert setup.count("shaped") == 1


async def test_coalesced_waiters_only_share_a_matching_variant(setup: Setup) -> None:
    path = _target("c", "vary-herd", "Cache-Control: max-age=60", "Vary: Accept-Language", ms="300")
    langs = ["en"] * 6 + ["fr"] * 4
    leader = asyncio.create_task(setup.get(path, {"Accept-Language": "en"}))
    await asyncio.sleep(0.05)
    replies = await asyncio.gather(*(setup.get(path, {"Accept-Language": la}) for la in langs))
    first = await leader
    for lang, reply in zip(langs, replies, strict=True):
        assert ["Accept-Language", lang] in reply.json()["headers"], "another variant's body"
        if lang == "en":
            assert reply.body == first.body and reply.headers["x-cache"] == "HIT"
    en_upstream = [
        r
        for r in setup.up.received
        if "t=vary-herd" in r.query and r.header("accept-language") == "en"
    ]
    assert len(en_upstream) == 1


async def test_ok(setup: Setup) -> None:
    """The gateway survived the module (a crash would show as connection errors above)."""
    assert setup.gw.proc is not None and setup.gw.proc.returncode is None
    started = time.monotonic()
    assert (await setup.get("/c/echo")).status == 200
    assert time.monotonic() - started < 1


# ------------------------------------------------------------------------------ Redis store


async def _two_gateways_on_one_redis(
    stack: contextlib.AsyncExitStack, **extra: Any
) -> tuple[RedisServer, Upstream, GatewayProcess, GatewayProcess]:
    """A real Redis and two gateways whose route `r` caches in it (`extra`: `plugins` to put
    before the cache, `consumers`)."""
    redis = await stack.enter_async_context(RedisServer())
    up = await stack.enter_async_context(Upstream("up"))
    plugins = {**extra.pop("plugins", {}), "cache": {"store": redis.url, "redis_timeout": "1s"}}
    config = base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={"up": {"targets": [up.url], "health": {"passive": None}}},
        routes=[
            {
                "name": "r",
                "match": {"paths": ["/r"]},
                "service": "up",
                "strip_prefix": True,
                "plugins": plugins,
            }
        ],
        **extra,
    )
    one = await stack.enter_async_context(GatewayProcess(config))
    two = await stack.enter_async_context(GatewayProcess(config))
    return redis, up, one, two


async def test_redis_store_is_shared_by_two_gateways_and_purged() -> None:
    async with contextlib.AsyncExitStack() as stack:
        _, up, one, two = await _two_gateways_on_one_redis(stack)
        host = {"Host": "api.example.com"}  # as behind a load balancer: the key has the host
        path = _target("r", "redis", "Cache-Control: max-age=60", "Age: 3", ms="300")
        herd = await asyncio.gather(
            *(request(one.port, "GET", path, headers=host) for _ in range(30))
        )
        assert sorted(r.headers["x-cache"] for r in herd) == ["HIT"] * 29 + ["MISS"]
        assert len({r.body for r in herd}) == 1
        await asyncio.sleep(0.1)  # the entry is written to Redis in the background
        other = await request(two.port, "GET", path, headers=host)
        assert other.headers["x-cache"] == "HIT" and other.body == herd[0].body
        assert other.headers["age"] == "3"
        assert len(up.received) == 1
        purged = await request(two.admin_port, "DELETE", "/cache?route=r")
        assert purged.status == 200 and purged.json()["purged"] == 1
        again = await request(one.port, "GET", path, headers=host)
        assert again.headers["x-cache"] == "MISS" and len(up.received) == 2

        # a DELETE through one node invalidates every variant the other stored (RFC 9111 §4.4)
        varied = _target("r", "redis-vary", "Cache-Control: max-age=60", "Vary: Accept-Language")
        langs = [{**host, "Accept-Language": lang} for lang in ("en", "fr")]
        for headers in langs:
            assert (await request(two.port, "GET", varied, headers=headers)).headers[
                "x-cache"
            ] == "MISS"
        await asyncio.sleep(0.1)
        for headers in langs:
            assert (await request(one.port, "GET", varied, headers=headers)).headers[
                "x-cache"
            ] == "HIT"
        deleted = await request(one.port, "DELETE", varied, headers=host)
        assert deleted.status == 200 and deleted.headers["x-cache"] == "BYPASS"
        await asyncio.sleep(0.1)  # the invalidation runs in the background too
        for headers in langs:
            reply = await request(two.port, "GET", varied, headers=headers)
            assert reply.headers["x-cache"] == "MISS", headers
        await asyncio.sleep(0.1)
        purged = await request(two.admin_port, "DELETE", "/cache?route=r")
        assert purged.json()["purged"] == 3  # 2 variants (not their marker), the first entry


async def test_redis_store_invalidates_every_consumers_entries_across_gateways() -> None:
    """RFC 9111 §4.4 through Redis: alice's PUT through one gateway removes what bob stored
    through another (each Vary variant), and the target index is one expiring sorted set."""
    async with contextlib.AsyncExitStack() as stack:
        redis, up, one, two = await _two_gateways_on_one_redis(
            stack,
            plugins={"key_auth": {}},
            consumers=[
                {"name": "alice", "api_keys": ["alice-key"]},
                {"name": "bob", "api_keys": ["bob-key"]},
            ],
        )
        client = RedisStore(redis.url, timeout=1.0)
        stack.push_async_callback(client.close)
        path = _target("r", "consumers", "Cache-Control: max-age=60", "Vary: Accept-Language")
        host = {"Host": "api.example.com"}  # as behind a load balancer: the key has the host
        alice = {**host, "apikey": "alice-key"}
        bob = {**host, "apikey": "bob-key"}
        readers = [alice, *({**bob, "Accept-Language": lang} for lang in ("en", "fr"))]

        async def seen(port: int) -> list[str]:
            return [
                (await request(port, "GET", path, headers=h)).headers["x-cache"] for h in readers
            ]

        assert await seen(two.port) == ["MISS"] * 3
        await asyncio.sleep(0.1)  # the entries are written to Redis in the background
        assert await seen(one.port) == ["HIT"] * 3
        indexes = await client.call("KEYS", "apigate:cache-targets:*")
        assert len(indexes) == 1  # one target: alice's and bob's markers and 3 variants
        assert await client.call("ZCARD", indexes[0]) == 5
        assert 50_000 < await client.call("PTTL", indexes[0]) <= 60_000

        try:
            up.state.override = "/status/503"
            failed = await request(one.port, "PUT", path, headers=alice, body=b"x")
            assert failed.status == 503
        finally:
            up.state.override = None
        await asyncio.sleep(0.1)
        assert await seen(two.port) == ["HIT"] * 3  # an error answer invalidates nothing
        changed = await request(one.port, "PUT", path, headers=alice, body=b"x")
        assert changed.status == 200 and changed.headers["x-cache"] == "BYPASS"
        await asyncio.sleep(0.1)  # the invalidation runs in the background too
        assert await client.call("KEYS", "apigate:cache*") == []  # entries, markers, index
        assert await seen(two.port) == ["MISS"] * 3
        await asyncio.sleep(0.1)
        assert await seen(one.port) == ["HIT"] * 3  # stored again, shared again


async def test_redis_target_index_drops_expired_members_and_expires() -> None:
    """The Lua of the Redis store against a real Redis: a target stored again and again, one
    consumer after another, keeps in its index only the entries still alive; the index
    expires with its longest-kept entry."""
    async with RedisServer() as redis:
        client = RedisStore(redis.url, timeout=1.0)
        try:
            store = RedisCacheStore(client, timeout=1.0)
            index = store.target_index(target_of(key("r", "/a")))
            for i in range(8):
                now = time.time()
                stored = entry(key("r", "/a", f"c{i}"), at=now, lifetime=0.05)
                assert await store.put(stored, now)
                assert await client.call("ZCARD", index) == 1
                assert 0 < await client.call("PTTL", index) <= 50
                await asyncio.sleep(0.07)
            assert await client.call("EXISTS", index) == 0
            assert await client.call("KEYS", "*") == []  # (the entries expired too)
        finally:
            await client.close()
