"""Aggregation routes through a real gateway and three real upstream services: concurrency,
templates from path parameters, query and JWT claims, the merged document, optional and
required parts failing (5xx, refused, hanging past their timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import jwt as pyjwt
import pytest
import pytest_asyncio

from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import Reply, request
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

SECRET = "an-aggregate-secret-of-32-bytes-or-more!"
PROFILE = b'{"id": 42, "name": "Ann"}'
ORDERS = b'[{"order": 1}, {"order": 2}]'
PREFS = b'{"theme": "dark"}'


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _canned(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )


def _canned_chunked(body: bytes) -> bytes:
    half = len(body) // 2
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:]))
    return (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % chunks
    )


def _config(users: Upstream, orders: Upstream, prefs: Upstream) -> dict[str, Any]:
    def service(up: Upstream | str) -> dict[str, Any]:
        url = up if isinstance(up, str) else up.url
        return {"targets": [url], "health": {"passive": None}}

    return base_config(
        services={
            "users": service(users),
            "orders": service(orders),
            "prefs": service(prefs),
            "based": service(f"{users.url}/base"),  # a target with a base path
            "dead": service(f"http://127.0.0.1:{_closed_port()}"),
            "flaky": {
                **service(orders),
                "circuit_breaker": {
                    "consecutive_failures": 2,
                    "min_requests": 1000,
                    "open_for": "30s",
                },
            },
        },
        routes=[
            {
                "name": "dashboard",
                "match": {"paths": ["/dashboard/{user_id}"]},
                "plugins": {"jwt": {"secret": SECRET, "algorithms": ["HS256"]}},
                "aggregate": {
                    "profile": {"service": "users", "path": "/slow/users/{user_id}?ms=300"},
                    "orders": {
                        "service": "orders",
                        "path": "/slow/orders?ms=300&user={user_id}&limit={query.limit}",
                        "optional": True,
                    },
                    "prefs": {"service": "prefs", "path": "/slow/prefs/{claim.sub}?ms=300"},
                },
            },
            {
                "name": "optional",
                "match": {"paths": ["/optional/{user_id}"]},
                "aggregate": {
                    "profile": {"service": "users", "path": "/users/{user_id}"},
                    "orders": {"service": "orders", "path": "/status/503", "optional": True},
                    "prefs": {
                        "service": "prefs",
                        "path": "/slow/prefs?ms=3000",
                        "optional": True,
                        "timeout": "200ms",
                    },
                    "gone": {"service": "dead", "path": "/x", "optional": True},
                    "text": {"service": "orders", "path": "/chunked", "optional": True},
                },
            },
            {
                "name": "required",
                "match": {"paths": ["/required/{user_id}"]},
                "aggregate": {
                    "profile": {"service": "users", "path": "/status/500"},
                    "orders": {"service": "orders", "path": "/slow/orders?ms=2000"},
                },
            },
            {
                "name": "required-timeout",
                "match": {"paths": ["/required-timeout"]},
                "aggregate": {
                    "profile": {"service": "users", "path": "/users/42"},
                    "prefs": {"service": "prefs", "path": "/slow/p?ms=3000", "timeout": "200ms"},
                },
            },
            {
                "name": "guarded",
                "match": {"paths": ["/guarded"]},
                "aggregate": {
                    "profile": {"service": "users", "path": "/users/42"},
                    "flaky": {"service": "flaky", "path": "/status/500", "optional": True},
                },
            },
            {"name": "flaky-direct", "match": {"paths": ["/flaky"]}, "service": "flaky"},
            {
                "name": "needs-query",
                "match": {"paths": ["/needs-query"]},
                "aggregate": {"profile": {"service": "users", "path": "/users/{query.id}"}},
            },
            {
                "name": "slow-part",
                "match": {"paths": ["/slow-part"]},
                "aggregate": {
                    "profile": {"service": "users", "path": "/slow/leave?ms=5000", "timeout": "9s"}
                },
            },
            {
                "name": "required-refused",
                "match": {"paths": ["/required-refused"]},
                "aggregate": {
                    "profile": {"service": "users", "path": "/users/42"},
                    "gone": {"service": "dead", "path": "/x"},
                },
            },
            {
                "name": "based",
                "match": {"paths": ["/based/{user_id}"]},
                "aggregate": {"profile": {"service": "based", "path": "/users/{user_id}"}},
            },
        ],
    )


@dataclass
class Setup:
    gw: GatewayProcess
    users: Upstream
    orders: Upstream
    prefs: Upstream

    async def get(self, path: str, headers: dict[str, str] | None = None) -> Reply:
        return await request(self.gw.port, "GET", path, headers=headers)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup() -> AsyncIterator[Setup]:
    async with contextlib.AsyncExitStack() as stack:
        users, orders, prefs = [
            await stack.enter_async_context(Upstream(name)) for name in ("users", "orders", "prefs")
        ]
        gw = await stack.enter_async_context(GatewayProcess(_config(users, orders, prefs)))
        users.state.canned["/slow/users/42"] = _canned(PROFILE)
        users.state.canned["/users/42"] = _canned(PROFILE)
        orders.state.canned["/slow/orders"] = _canned(ORDERS)
        prefs.state.canned["/slow/prefs/u-7"] = _canned_chunked(PREFS)  # chunked: the same
        yield Setup(gw, users, orders, prefs)
        assert gw.proc is not None and gw.proc.returncode is None, "died:\n" + gw.logs()


def _token(sub: str) -> str:
    return pyjwt.encode({"sub": sub, "exp": int(time.time()) + 300}, SECRET, algorithm="HS256")


async def test_three_services_concurrently_merged_as_documented(setup: Setup) -> None:
    auth = {"Authorization": f"Bearer {_token('u-7')}"}
    await setup.get("/dashboard/42?limit=5", auth)  # warm the pools
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    traced = {**auth, "traceparent": f"00-{trace}-00f067aa0ba902b7-01", "tracestate": "k=v"}
    started = time.monotonic()
    reply = await setup.get("/dashboard/42?limit=5", traced)
    elapsed = time.monotonic() - started
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "application/json"
    # the parts' bodies spliced under their names, in the order of the config (which the test
    # harness writes with sorted keys)
    assert reply.body == b'{"orders":%s,"prefs":%s,"profile":%s}' % (ORDERS, PREFS, PROFILE)
    assert reply.json() == {
        "profile": {"id": 42, "name": "Ann"},
        "orders": [{"order": 1}, {"order": 2}],
        "prefs": {"theme": "dark"},
    }
    # three calls of 300 ms each: concurrent means ~300 ms, sequential would be 900 ms
    assert 0.3 <= elapsed < 0.6, elapsed

    user = setup.users.received[-1]
    order = setup.orders.received[-1]
    pref = setup.prefs.received[-1]
    assert (user.path, user.query) == ("/slow/users/42", "ms=300")
    assert (order.path, order.query) == ("/slow/orders", "ms=300&user=42&limit=5")
    assert (pref.path, pref.query) == ("/slow/prefs/u-7", "ms=300")
    request_id = reply.headers["x-request-id"]
    spans = set()
    for rec in (user, order, pref):
        assert rec.method == "GET"
        assert rec.header("x-request-id") == request_id
        assert rec.header("authorization") is None  # the client's credentials stay here
        host = f"127.0.0.1:{setup.gw.port}"
        assert rec.header("forwarded") == f'for=127.0.0.1;host="{host}";proto=http'
        assert rec.header_values("x-forwarded-for") == ["127.0.0.1"]
        assert rec.header("x-forwarded-proto") == "http"
        assert rec.header("x-forwarded-host") == "127.0.0.1"  # (the port: X-Forwarded-Port)
        assert rec.header("x-forwarded-port") == str(setup.gw.port)
        assert rec.header("accept") == "application/json" and rec.header("via") == "1.1 apigate"
        assert rec.header_values("tracestate") == ["k=v"]
        assert rec.raw.count(b"\r\n\r\n") == 1 and rec.raw.endswith(b"\r\n\r\n")  # one head
        sent = rec.header("traceparent") or ""
        assert sent.startswith(f"00-{trace}-") and sent.endswith("-01")  # the client's trace
        spans.add(sent[36:52])
    assert len(spans) == 3  # a span of its own per part


async def test_template_values_are_encoded_where_they_stand(setup: Setup) -> None:
    auth = {"Authorization": f"Bearer {_token('a/b c')}"}
    reply = await setup.get("/dashboard/4%202?limit=a%26b%3Dc", auth)
    assert reply.status == 200, reply.body  # nothing canned: the upstreams' echo documents
    paths = {
        (r.path, r.query)
        for up in (setup.users, setup.orders, setup.prefs)
        for r in up.received
        if "4%202" in r.path + r.query or "a%2Fb" in r.path
    }
    assert ("/slow/users/4%202", "ms=300") in paths
    assert ("/slow/orders", "ms=300&user=4%202&limit=a%26b%3Dc") in paths
    assert ("/slow/prefs/a%2Fb%20c", "ms=300") in paths


async def test_a_target_base_path_comes_before_the_part_path(setup: Setup) -> None:
    """README: a target's path is put before every request path. A part went to `/users/7`
    of `http://host/base` (a proxied request goes to `/base/...`)."""
    reply = await setup.get("/based/7")
    assert reply.status == 200, reply.body
    assert ("/base/users/7", "") in {(r.path, r.query) for r in setup.users.received}


async def test_missing_inputs(setup: Setup) -> None:
    # no token: the jwt plugin answers first
    assert (await setup.get("/dashboard/42?limit=5")).status == 401
    # no `limit` query parameter: the optional part fails, the others answer
    auth = {"Authorization": f"Bearer {_token('u-7')}"}
    reply = await setup.get("/dashboard/42", auth)
    assert reply.status == 200, reply.body
    doc = reply.json()
    assert doc["orders"] is None and doc["profile"] == {"id": 42, "name": "Ann"}
    assert doc["_errors"] == [{"part": "orders", "error": "missing query.limit"}]


async def test_optional_parts_failing_become_null_with_errors(setup: Setup) -> None:
    started = time.monotonic()
    reply = await setup.get("/optional/42")
    elapsed = time.monotonic() - started
    assert reply.status == 200, reply.body
    assert reply.json() == {
        "gone": None,
        "orders": None,
        "prefs": None,
        "profile": {"id": 42, "name": "Ann"},
        "text": None,
        "_errors": [
            {"part": "gone", "error": "connect error"},
            {"part": "orders", "error": "HTTP 503"},
            {"part": "prefs", "error": "timeout"},
            {"part": "text", "error": "invalid JSON"},
        ],
    }
    assert list(reply.json()) == ["gone", "orders", "prefs", "profile", "text", "_errors"]
    assert elapsed < 1.0, "the hanging optional part must be cut at its 200 ms timeout"
    assert json.loads(reply.body)  # one JSON document


async def test_required_part_failing_is_502_naming_it(setup: Setup) -> None:
    started = time.monotonic()
    reply = await setup.get("/required/42")
    elapsed = time.monotonic() - started
    assert reply.status == 502
    doc = reply.json()
    assert doc["error"] == "aggregate_failed"
    assert doc["message"] == "part 'profile' failed: HTTP 500"
    assert elapsed < 1.0, "the other part (2 s) must be cancelled, not awaited"


async def test_required_part_timeout_and_refusal(setup: Setup) -> None:
    started = time.monotonic()
    reply = await setup.get("/required-timeout")
    assert reply.status == 502
    assert reply.json()["message"] == "part 'prefs' failed: timeout"
    assert 0.2 <= time.monotonic() - started < 1.0
    refused = await setup.get("/required-refused")
    assert refused.status == 502
    assert refused.json()["message"] == "part 'gone' failed: connect error"


async def test_parts_respect_the_service_circuit_breaker(setup: Setup) -> None:
    """A part's service has a breaker: failed calls open it like proxied requests do, and an
    open breaker fails the part at once, without a call to the upstream."""
    errors = []
    for _ in range(4):
        reply = await setup.get("/guarded")
        assert reply.status == 200, reply.body
        doc = reply.json()
        assert doc["flaky"] is None and doc["profile"] == {"id": 42, "name": "Ann"}
        errors += [e["error"] for e in doc["_errors"]]
    assert errors == ["HTTP 500", "HTTP 500", "circuit open", "circuit open"]
    assert [r.path for r in setup.orders.received].count("/status/500") == 2
    direct = await setup.get("/flaky/anything")  # the same breaker guards the proxied route
    assert direct.status == 503 and direct.json()["error"] == "circuit_open"


async def test_required_part_missing_its_input_is_400(setup: Setup) -> None:
    reply = await setup.get("/needs-query")
    assert reply.status == 400
    assert reply.json()["message"] == "part 'profile': missing query.id"
    ok = await setup.get("/needs-query?id=42")
    assert ok.status == 200 and ok.body == b'{"profile":%s}' % PROFILE


async def test_a_client_leaving_mid_aggregate_cuts_the_part_calls(setup: Setup) -> None:
    """As for a proxied request (nginx's default, Envoy's reset): nobody wants the answer, so
    the part's upstream connection is closed at once, not held for the slow answer."""
    before = len(setup.users.state.open)
    _reader, writer = await asyncio.open_connection("127.0.0.1", setup.gw.port)
    writer.write(b"GET /slow-part HTTP/1.1\r\nHost: gw\r\n\r\n")
    await writer.drain()
    for _ in range(200):
        if any(r.path == "/slow/leave" for r in setup.users.received):
            break
        await asyncio.sleep(0.01)
    else:
        raise AssertionError("the part never reached the upstream")
    during = len(setup.users.state.open)
    assert during >= max(before, 1)
    # gone, not half-closed (a half-closed client may still wait for its answer): a reset
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()
    for _ in range(200):
        if len(setup.users.state.open) < during:
            break
        await asyncio.sleep(0.01)
    assert len(setup.users.state.open) == during - 1, "the part's connection stayed open"
