"""Every limit and timeout of the `limits:` section, with the small values of conftest.LIMITS:
max_header_bytes 2048, max_headers 20, max_url_bytes 512, max_body_bytes 1000, header, body and
idle timeouts 600 ms."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from tests.conformance.conftest import Env, assert_error, assert_rejected, proxied
from tests.support.client import RawClient
from tests.support.gateway import GatewayProcess, base_config

pytestmark = pytest.mark.asyncio(loop_scope="module")


# ------------------------------------------------------------------ head size
async def test_header_section_too_large(env: Env) -> None:
    data = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2100 + b"\r\n\r\n"
    await assert_rejected(env, data, 431, "header_fields_too_large")


async def test_header_section_within_the_limit(env: Env) -> None:
    _, got = await proxied(
        env, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1900 + b"\r\n\r\n"
    )
    assert got.header("x-big") == "a" * 1900


async def test_many_small_headers_add_up(env: Env) -> None:
    headers = b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 150) for i in range(15))
    await assert_rejected(env, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n", 431)


async def test_too_many_headers(env: Env) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(21))
    doc = await assert_rejected(env, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n", 431)
    assert "many" in doc["message"]


async def test_twenty_headers_are_fine(env: Env) -> None:
    headers = b"".join(b"X-H%d: 1\r\n" % i for i in range(19))  # + Host = 20
    _, got = await proxied(env, b"GET /echo HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
    assert got.header("x-h18") == "1"


async def test_request_target_too_long(env: Env) -> None:
    data = b"GET /" + b"a" * 600 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    await assert_rejected(env, data, 414, "uri_too_long")


async def test_long_query_counts_towards_the_target(env: Env) -> None:
    data = b"GET /echo?" + b"q" * 600 + b" HTTP/1.1\r\nHost: x\r\n\r\n"
    await assert_rejected(env, data, 414)


async def test_unfinished_header_line_is_bounded(env: Env) -> None:
    """A header line that never ends, sent in pieces: refused once it passes the bound on
    head bytes, before the header timeout and without buffering it all."""
    async with RawClient(env.port) as c:
        await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        for _ in range(8):
            await asyncio.sleep(0.02)
            await c.send(b"a" * 1000)  # read and discarded after the refusal: no reset
        resp = await c.response()
        assert_error(resp, 431)
        assert await c.closed()
    assert env.up.received == [] and env.up.state.bytes_received == 0


async def test_body_sharing_a_read_with_its_head_is_not_counted_as_head(env: Env) -> None:
    # regression: the whole read was once counted as head bytes, so this got a 431
    body = b"b" * 4500
    data = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 4500\r\n\r\n" + body
    _, got = await proxied(env, data)
    assert got.body == body


# ------------------------------------------------------------------ body size
async def test_content_length_over_the_limit_is_refused_before_the_body(env: Env) -> None:
    """413 as soon as the head is read: the client has not sent a byte of the body."""
    async with RawClient(env.port) as c:
        await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n")
        resp = await c.response()
        doc = assert_error(resp, 413, "payload_too_large")
        assert "1000" in doc["message"]
        assert await c.closed()
    assert env.up.received == [] and env.up.state.bytes_received == 0


async def test_client_sending_a_refused_body_anyway_still_reads_the_413(env: Env) -> None:
    """The client sends 4 MB without waiting: the gateway refuses at the head and keeps
    reading (and discarding) for a while, so the client is not reset before it reads the 413
    (it was: the close with unread input made the kernel send RST)."""
    size = 4 << 20
    async with RawClient(env.port) as c:
        assert c.writer is not None
        c.writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)

        async def upload() -> None:
            assert c.writer is not None
            with contextlib.suppress(ConnectionError):
                for _ in range(size >> 16):
                    c.writer.write(b"b" * 65536)
                    await c.writer.drain()

        sending = asyncio.create_task(upload())
        try:
            resp = await c.response()
        finally:
            await sending
        assert_error(resp, 413)
    assert env.up.state.bytes_received == 0


async def test_content_length_over_the_limit_with_expect_gets_no_100(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        resp = await c.response(interim=True)
        assert_error(resp, 413)
        assert await c.closed()
    assert env.up.state.bytes_received == 0


async def test_content_length_at_the_limit(env: Env) -> None:
    _, got = await proxied(
        env, b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"z" * 1000
    )
    assert got.body_len == 1000


async def test_route_limit_overrides_the_edge(env: Env) -> None:
    _, got = await proxied(
        env, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n" + b"z" * 3000
    )
    assert got.body_len == 3000
    env.reset()
    await assert_rejected(
        env, b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 5001\r\n\r\n", 413
    )


async def test_chunked_body_over_the_limit(env: Env) -> None:
    chunks = b"".join(b"100\r\n" + b"c" * 256 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n"
    data = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
    await assert_rejected(env, data, 413, "payload_too_large")


async def test_chunked_body_over_the_limit_across_reads(env: Env) -> None:
    """The body streams, so the upstream may see the head and the first chunks, but never a
    complete request, and its connection is not reused."""
    async with RawClient(env.port) as c:
        await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        await c.send(b"258\r\n" + b"c" * 600 + b"\r\n")
        await asyncio.sleep(0.1)
        await c.send(b"258\r\n" + b"c" * 600 + b"\r\n")
        resp = await c.response()
        assert_error(resp, 413)
        assert await c.closed()
    await asyncio.sleep(0.1)
    assert env.up.received == []
    assert not env.up.state.open, "the upstream connection of a refused body must be closed"


# ------------------------------------------------------------------ timeouts
async def test_header_timeout_slowloris(env: Env) -> None:
    """A head dripping in one byte every 100 ms never completes: 408 once header_timeout has
    passed since it began (the deadline does not move with each byte)."""

    async def drip(c: RawClient) -> None:
        for byte in b"X-Slow: abcdefghijklmnopqrstuvwxyz":
            await asyncio.sleep(0.1)
            try:
                await c.send(bytes([byte]))
            except ConnectionError:
                return

    async with RawClient(env.port) as c:
        t0 = time.monotonic()
        await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        dripping = asyncio.create_task(drip(c))
        try:
            resp = await c.response()
        finally:
            dripping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dripping
        elapsed = time.monotonic() - t0
        assert_error(resp, 408, "request_timeout")
        assert 0.5 <= elapsed < 2.5, elapsed
        assert await c.closed()
    assert env.up.state.bytes_received == 0


async def test_header_timeout_partial_head(env: Env) -> None:
    async with RawClient(env.port) as c:
        t0 = time.monotonic()
        await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n")
        resp = await c.response()
        assert_error(resp, 408)
        assert 0.5 <= time.monotonic() - t0 < 2.5
        assert await c.closed()
    assert env.up.state.bytes_received == 0


async def test_silent_connection_is_closed_without_a_response(env: Env) -> None:
    async with RawClient(env.port) as c:
        t0 = time.monotonic()
        assert await c.closed(3.0)  # no bytes: nothing to answer
        assert 0.5 <= time.monotonic() - t0 < 2.5


async def test_body_timeout(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        t0 = time.monotonic()
        resp = await c.response()
        doc = assert_error(resp, 408, "request_timeout")
        assert "body" in doc["message"]
        assert 0.5 <= time.monotonic() - t0 < 2.5
        assert await c.closed()
    await asyncio.sleep(0.1)
    assert env.up.received == []
    assert not env.up.state.open


async def test_body_timeout_restarts_with_each_read(env: Env) -> None:
    """body_timeout is the longest silence, not the whole upload: 4 reads 200 ms apart take
    longer than 600 ms and still succeed."""
    async with RawClient(env.port) as c:
        await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\n")
        for byte in b"abcd":
            await asyncio.sleep(0.2)
            await c.send(bytes([byte]))
        resp = await c.response()
        assert resp.status == 200
        assert resp.json()["body_len"] == 4


async def test_idle_keep_alive_connection_closes_silently(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200 and resp.header("connection") is None
        t0 = time.monotonic()
        assert await c.closed(3.0)
        assert 0.4 <= time.monotonic() - t0 < 2.5
    assert len(env.up.received) == 1


async def test_pipelined_request_waiting_behind_a_slow_one_is_not_timed_out(env: Env) -> None:
    """A queued request is held back by us, not the client: the header timeout (600 ms) must
    not fire while it waits 0.9 s behind a slow response (it once did: 408 and the queued
    request was dropped)."""
    async with RawClient(env.port) as c:
        await c.send(
            b"GET /slow?ms=900 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /echo?second HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        first = await c.response()
        second = await c.response()
        assert (first.status, second.status) == (200, 200)
        assert second.json()["query"] == "second"


async def test_a_routes_lower_body_limit_holds_for_a_body_read_while_queued(env: Env) -> None:
    """A pipelined chunked upload waits behind a slow request; its body (100 bytes, under the
    edge's 1000) is read meanwhile. Its route allows 10: 413 when it starts, and the upstream
    never sees it. (The limit was applied to the connection after the body was read, so the
    upload went through.)"""
    chunked = b"64\r\n" + b"a" * 100 + b"\r\n0\r\n\r\n"
    async with RawClient(env.port) as c:
        await c.send(
            b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /small-upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunked
        )
        first = await c.response()
        second = await c.response()
    assert first.status == 200
    assert_error(second, 413)
    assert [r.path for r in env.up.received] == ["/slow"]


async def test_a_routes_higher_body_limit_holds_for_a_body_read_while_queued(env: Env) -> None:
    """The other way round: a pipelined upload of 3000 bytes (over the edge's 1000, under its
    route's 5000) arrives in the same read as the request it waits behind. It goes through
    whole: its route's limit is the one that counts. (It was refused with 413: the edge limit
    was applied to the body read while it was queued, before its route was known.)"""
    body = bytes(range(256)) * 11 + b"x" * 184  # 3000 bytes
    async with RawClient(env.port) as c:
        await c.send(
            b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n" + body
        )
        first = await c.response()
        second = await c.response()
    assert (first.status, second.status) == (200, 200)
    assert [r.path for r in env.up.received] == ["/slow", "/upload"]
    assert env.up.received[1].body == body


async def test_the_edge_body_limit_holds_for_a_body_read_while_queued(env: Env) -> None:
    """The same upload to a route without a limit of its own: the edge's 1000 bytes hold (413
    when it starts), and the upstream never sees it."""
    async with RawClient(env.port) as c:
        await c.send(
            b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n"
            b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"bb8\r\n" + b"a" * 3000 + b"\r\n0\r\n\r\n"
        )
        first = await c.response()
        second = await c.response()
    assert first.status == 200
    assert_error(second, 413)
    assert [r.path for r in env.up.received] == ["/slow"]


# ------------------------------------------------------------------ max_connections
async def test_max_connections() -> None:
    cfg = base_config(
        limits={"max_connections": 2, "header_timeout": "5s", "idle_timeout": "5s"},
        services={"up": {"targets": ["http://127.0.0.1:9"]}},
        routes=[{"name": "a", "match": {"paths": ["/nothing"]}, "service": "up"}],
    )
    async with GatewayProcess(cfg) as gw:
        async with RawClient(gw.port) as a, RawClient(gw.port) as b:
            for held in (a, b):  # each in the middle of a request: not idle
                await held.send(b"GET /x HTTP/1.1\r\n")
            await asyncio.sleep(0.1)
            async with RawClient(gw.port) as c:
                resp = await c.response()  # answered without a request, then closed
                assert_error(resp, 503, "too_many_connections")
                assert await c.closed()
            for held in (a, b):  # the two admitted connections still work
                await held.send(b"Host: x\r\n\r\n")
                assert (await held.response()).status == 404
            # now both are idle keep-alive connections: a new client takes one's slot
            async with RawClient(gw.port) as d:
                await d.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
                assert (await d.response()).status == 404
            assert [await held.closed(0.5) for held in (a, b)].count(True) == 1
        await asyncio.sleep(0.2)
        async with RawClient(gw.port) as e:  # slots are freed when connections close
            await e.send(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert (await e.response()).status == 404
