"""The data plane's HTTP features end to end: keep-alive and connection reuse, pipelining,
HTTP/1.0 clients, chunked bodies both ways, length-less responses, HEAD, 204/304,
Expect: 100-continue, WebSocket-style upgrades, upstream failures and gateway errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import socket
import time
from typing import Any

import pytest

from tests.support.client import RawClient, Truncated, request
from tests.support.env import Env, env_fixture, shared_env_fixture
from tests.support.gateway import base_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

UP_PATHS = [
    "/echo",
    "/chunked",
    "/eof",
    "/eof-reset",
    "/slow",
    "/reset",
    "/reset-mid",
    "/ws",
    "/ws-half",
    "/status",
    "/drain",
    "/c",
]


def _closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(up: Upstream) -> dict[str, Any]:
    return base_config(
        services={
            "up": {"targets": [up.url], "timeouts": {"response": "1s"}},
            "dead": {
                "targets": [f"http://127.0.0.1:{_closed_port()}"],
                "health": {"passive": None},
            },
            "empty": {"targets": []},
        },
        routes=[
            {"name": "up", "match": {"paths": UP_PATHS}, "service": "up"},
            {
                "name": "get-only",
                "match": {"paths": ["/get-only"], "methods": ["GET", "HEAD"]},
                "service": "up",
            },
            {"name": "dead", "match": {"paths": ["/dead"]}, "service": "dead"},
            {"name": "empty", "match": {"paths": ["/empty"]}, "service": "empty"},
        ],
    )


shared_env = shared_env_fixture(_config)
env = env_fixture()

GET = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n"


# ------------------------------------------------------------------ keep-alive and reuse
async def test_keep_alive_many_requests_on_one_connection(env: Env) -> None:
    before = env.up.state.connections
    async with RawClient(env.port) as c:
        for i in range(20):
            await c.send(GET % b"/echo?n=%d" % i)
            resp = await c.response()
            assert resp.status == 200 and resp.json()["query"] == f"n={i}"
            assert resp.header("connection") is None
    assert len(env.up.received) == 20
    assert env.up.state.connections - before <= 1, "upstream connections were not reused"


async def test_upstream_connections_are_reused_across_clients(env: Env) -> None:
    async with RawClient(env.port) as c:  # make sure one pooled connection exists
        await c.send(GET % b"/echo")
        await c.response()
    before = env.up.state.connections
    for _ in range(5):
        resp, _ = await request(env.port, GET % b"/echo", close_wait=0.01)
        assert resp.status == 200
    assert env.up.state.connections == before


async def test_pipelined_requests_are_answered_in_order(env: Env) -> None:
    body = b"pipelined-body"
    data = (
        GET % b"/slow?ms=200&n=1"
        + b"POST /echo?n=2 HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        + GET % b"/echo?n=3"
    )
    async with RawClient(env.port) as c:
        await c.send(data)  # one write
        answers = [await c.response() for _ in range(3)]
    assert [r.json()["query"] for r in answers] == ["ms=200&n=1", "n=2", "n=3"]
    assert answers[1].json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    ids = [r.header("x-request-id") for r in answers]
    assert len(set(ids)) == 3


async def test_many_pipelined_requests(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(b"".join(GET % b"/echo?n=%d" % i for i in range(50)))
        queries = [(await c.response()).json()["query"] for _ in range(50)]
    assert queries == [f"n={i}" for i in range(50)]


# ------------------------------------------------------------------ HTTP/1.0 clients
async def test_http10_client_gets_no_chunked_and_a_close(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(b"GET /chunked?n=4 HTTP/1.0\r\nHost: x\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200 and not resp.chunked
        assert resp.header("transfer-encoding") is None
        assert resp.body == b"chunk-0;chunk-1;chunk-2;chunk-3;"
        assert resp.until_close


async def test_http10_keep_alive_is_honoured(env: Env) -> None:
    async with RawClient(env.port) as c:
        for i in range(3):
            await c.send(b"GET /echo?n=%d HTTP/1.0\r\nConnection: keep-alive\r\n\r\n" % i)
            resp = await c.response()
            assert resp.status == 200 and resp.json()["query"] == f"n={i}"
            assert resp.header("connection") == "keep-alive"
        assert env.up.received[0].header("connection") is None


async def test_http10_keep_alive_with_a_chunked_upstream_ends_by_close(env: Env) -> None:
    """A chunked upstream body cannot be framed for an HTTP/1.0 client except by closing:
    the gateway must say Connection: close (it once kept the connection and the client
    could not find the end of the body)."""
    async with RawClient(env.port) as c:
        await c.send(b"GET /chunked?n=2 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = await c.response()
        assert resp.header("connection") == "close"
        assert resp.until_close and resp.body == b"chunk-0;chunk-1;"


async def test_http10_without_keep_alive_is_closed(env: Env) -> None:
    resp, closed = await request(env.port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert resp.status == 200 and resp.header("connection") == "close" and closed


# ------------------------------------------------------------------ chunked bodies
async def test_chunked_request_body_is_forwarded_exactly(env: Env) -> None:
    rng = random.Random(7)
    body = rng.randbytes(300_000)
    pieces, at = [], 0
    while at < len(body):
        n = rng.randint(1, 40_000)
        pieces.append(b"%x\r\n%s\r\n" % (len(body[at : at + n]), body[at : at + n]))
        at += n
    async with RawClient(env.port) as c:
        await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in pieces:
            await c.send(piece)
        await c.send(b"0\r\n\r\n")
        resp = await c.response()
    doc = resp.json()
    assert doc["body_len"] == len(body)
    assert doc["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert env.up.received[0].header("transfer-encoding") == "chunked"
    assert env.up.received[0].header("content-length") is None


async def test_content_length_body_is_forwarded_with_its_length(env: Env) -> None:
    body = os.urandom(70_000)
    data = b"PUT /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    resp, _ = await request(env.port, data, close_wait=0.01)
    assert resp.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    got = env.up.received[0]
    assert got.header_values("content-length") == [str(len(body))]
    assert got.header("transfer-encoding") is None


async def test_chunked_response_is_rechunked(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(GET % b"/chunked?n=5")
        resp = await c.response()
        assert resp.chunked and resp.header("content-length") is None
        assert resp.body == b"".join(b"chunk-%d;" % i for i in range(5))
        await c.send(GET % b"/echo")  # framing intact: the connection carries on
        assert (await c.response()).status == 200


async def test_response_without_length_to_http11_is_chunked(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(GET % b"/eof")
        resp = await c.response()
        assert resp.chunked and resp.body == b"body-until-eof"
        assert resp.header("connection") is None
        await c.send(GET % b"/echo")  # the client connection stays usable
        assert (await c.response()).status == 200


async def test_response_without_length_to_http10_ends_by_close(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(b"GET /eof HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        resp = await c.response()
        assert resp.until_close and resp.body == b"body-until-eof"
        assert resp.header("connection") == "close"


async def test_response_without_length_cut_by_a_reset_is_not_a_clean_end(env: Env) -> None:
    """EOF ends a length-less body; a reset does not: the client must see a truncated
    chunked body (no last chunk), never a complete-looking one."""
    async with RawClient(env.port) as c:
        await c.send(GET % b"/eof-reset")
        with pytest.raises(Truncated):
            await c.response()


# ------------------------------------------------------------------ HEAD, 204, 304
async def test_head_then_get_on_one_connection(env: Env) -> None:
    env.up.state.canned["/c/doc"] = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n"  # for HEAD
    async with RawClient(env.port) as c:
        await c.send(b"HEAD /c/doc HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await c.response(method="HEAD")
        assert head.status == 200 and head.body == b""
        assert head.header("content-length") == "11"
        await c.send(GET % b"/echo?after-head")
        after = await c.response()
        assert after.status == 200 and after.json()["query"] == "after-head"
        assert not c.pending()
    assert [r.method for r in env.up.received] == ["HEAD", "GET"]


async def test_head_of_a_chunked_resource(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(b"HEAD /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        head = await c.response(method="HEAD")
        assert head.status == 200 and head.body == b""
        await c.send(GET % b"/echo")
        assert (await c.response()).status == 200


async def test_pipelined_head_and_get(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(b"HEAD /echo HTTP/1.1\r\nHost: x\r\n\r\n" + GET % b"/echo?second")
        assert (await c.response(method="HEAD")).body == b""
        assert (await c.response()).json()["query"] == "second"


@pytest.mark.parametrize("status", [204, 304])
async def test_bodiless_statuses(env: Env, status: int) -> None:
    async with RawClient(env.port) as c:
        await c.send(GET % b"/status/%d" % status)
        resp = await c.response()
        assert resp.status == status
        assert resp.header("content-length") is None and resp.header("transfer-encoding") is None
        await c.send(GET % b"/echo")
        after = await c.response()
        assert after.status == 200, "bytes after a bodiless response broke the framing"


async def test_304_keeps_its_content_length_out(env: Env) -> None:
    env.up.state.canned["/c/304"] = b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n'
    async with RawClient(env.port) as c:
        await c.send(GET % b"/c/304")
        resp = await c.response()
        assert resp.status == 304 and resp.header("etag") == '"v1"'
        await c.send(GET % b"/echo")
        assert (await c.response()).status == 200


# ------------------------------------------------------------------ Expect: 100-continue
async def test_expect_100_continue(env: Env) -> None:
    body = b"x" * 5000
    async with RawClient(env.port) as c:
        await c.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        interim = await c.response(interim=True)
        assert interim.status == 100
        await c.send(body)
        final = await c.response()
        assert final.status == 200
        assert final.json()["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert env.up.received[0].header("expect") is None


async def test_expect_100_continue_when_the_body_comes_anyway(env: Env) -> None:
    # a client may send the body without waiting for 100 (RFC 9110 §10.1.1)
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\nabc"
    async with RawClient(env.port) as c:
        await c.send(data)
        resp = await c.response()  # any 100 is skipped
        assert resp.status == 200 and resp.json()["body_len"] == 3


async def test_expect_in_http10_is_ignored(env: Env) -> None:
    data = b"POST /echo HTTP/1.0\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n"
    async with RawClient(env.port) as c:
        await c.send(data)
        await asyncio.sleep(0.3)
        assert not c.pending(), "no 100 Continue to an HTTP/1.0 client"
        await c.send(b"abc")
        assert (await c.response(interim=True)).status == 200


# ------------------------------------------------------------------ upgrades
async def test_websocket_upgrade_tunnels_both_ways(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        resp = await c.response()
        assert resp.status == 101
        assert resp.header("upgrade") == "websocket"
        assert (resp.header("connection") or "").lower() == "upgrade"
        for message in (b"hello", b"\x00\x01\x02binary\xff", os.urandom(300_000)):
            await c.send(message)
            assert await c.read_exact(len(message)) == message
    got = env.up.received[0]
    assert got.header("upgrade") == "websocket" and got.header("connection") == "upgrade"
    assert got.header("sec-websocket-version") == "13"


async def test_websocket_upgrade_pipelined_behind_a_request(env: Env) -> None:
    """The upgrade waits for the GET before it; the bytes sent after its head, in the same
    read, are the tunnel's and reach the upstream once it has switched."""
    async with RawClient(env.port) as c:
        await c.send(
            GET % b"/echo" + b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
            b"Upgrade: websocket\r\n\r\nearly"
        )
        assert (await c.response()).status == 200
        assert (await c.response()).status == 101
        assert await c.read_exact(5) == b"early"
        await c.send(b"later")
        assert await c.read_exact(5) == b"later"
    echo, ws = env.up.received
    assert b"early" not in echo.raw and ws.header("upgrade") == "websocket"


async def test_a_tunnel_half_closed_by_the_upstream_still_carries_the_client_bytes(
    env: Env,
) -> None:
    """TCP half-close both ways (nginx and HAProxy pass it on in a tunnel): the upstream's EOF
    reaches the client as EOF, what the client sends after it still reaches the upstream, and
    the client's own EOF then ends the tunnel. (The upstream's EOF once closed the whole
    tunnel: the client's last bytes were lost.)"""
    env.up.state.tunnel_bytes.clear()
    env.up.state.tunnel_eof = False
    async with RawClient(env.port) as c:
        await c.send(
            b"GET /ws-half HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert (await c.response()).status == 101
        assert await c.read_exact(3) == b"bye"
        assert await c.closed(), "the upstream's half-close reaches the client"
        await c.send(b"last words")
        assert c.writer is not None
        c.writer.write_eof()
        for _ in range(100):
            if env.up.state.tunnel_eof:
                break
            await asyncio.sleep(0.02)
    assert bytes(env.up.state.tunnel_bytes) == b"last words"
    assert env.up.state.tunnel_eof, "the client's half-close reaches the upstream"


async def test_a_tunnel_half_closed_by_the_client_still_carries_the_upstream_bytes(
    env: Env,
) -> None:
    """The other order: the client's EOF reaches the upstream, whose answer to it still
    reaches the client, and the upstream's close then ends the tunnel."""
    async with RawClient(env.port) as c:
        await c.send(
            b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
        )
        assert (await c.response()).status == 101
        await c.send(b"ping")
        assert c.writer is not None
        c.writer.write_eof()
        assert await c.read_exact(4) == b"ping"
        assert await c.closed()


async def test_upgrade_refused_by_the_upstream_closes_the_connection(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(
            b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\n"
            b"Upgrade: websocket\r\n\r\nnot-http-anymore"
        )
        resp = await c.response()
        assert resp.status == 200 and resp.header("connection") == "close"
        assert await c.closed()
    assert len(env.up.received) == 1
    assert b"not-http-anymore" not in env.up.received[0].raw


# ------------------------------------------------------------------ upstream failures
async def test_upstream_reset_before_the_response_is_502(env: Env) -> None:
    resp, _ = await request(env.port, GET % b"/reset", close_wait=0.01)
    assert resp.status == 502
    doc = resp.json()
    assert doc["error"] == "upstream_reset" and doc["request_id"]


async def test_upstream_reset_mid_body_truncates_the_client_response(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(GET % b"/reset-mid")
        with pytest.raises(Truncated) as info:
            await c.response()
        assert info.value.partial == b"0123456789"
    async with RawClient(env.port) as c:  # the gateway is fine
        await c.send(GET % b"/echo")
        assert (await c.response()).status == 200


async def test_upstream_slower_than_the_response_timeout_is_504(env: Env) -> None:
    t0 = time.monotonic()
    resp, _ = await request(env.port, GET % b"/slow?ms=3000", close_wait=0.01)
    assert resp.status == 504 and resp.json()["error"] == "upstream_timeout"
    assert 0.9 <= time.monotonic() - t0 < 2.5


async def test_connection_refused_is_502(env: Env) -> None:
    resp, _ = await request(env.port, GET % b"/dead", close_wait=0.01)
    assert resp.status == 502 and resp.json()["error"] == "upstream_connect_error"


async def test_no_instance_is_503(env: Env) -> None:
    resp, _ = await request(env.port, GET % b"/empty", close_wait=0.01)
    assert resp.status == 503 and resp.json()["error"] == "no_healthy_instance"


async def test_method_not_allowed_is_405_with_allow(env: Env) -> None:
    resp, closed = await request(
        env.port, b"POST /get-only HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", close_wait=0.2
    )
    assert resp.status == 405 and resp.header("allow") == "GET, HEAD"
    assert resp.json()["error"] == "method_not_allowed"
    assert not closed  # a gateway error with the request fully read keeps the connection
    assert env.up.received == []


async def test_no_route_is_404(env: Env) -> None:
    resp, _ = await request(env.port, GET % b"/nowhere", close_wait=0.01)
    assert resp.status == 404
    assert set(json.loads(resp.body)) == {"error", "message", "request_id"}


async def test_head_error_has_no_body(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(b"HEAD /nowhere HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await c.response(method="HEAD")
        assert resp.status == 404 and int(resp.header("content-length") or 0) > 0
        await c.send(GET % b"/echo")
        assert (await c.response()).status == 200
