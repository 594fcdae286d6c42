"""Request-side findings of the HTTP/1.1 review: the trailer section and every header field count
against the header limits, Host must be uri-host [":" port], and an upgrade request with a body
is proxied as a plain request instead of hanging.

Raw bytes through a real gateway (conftest.LIMITS: max_header_bytes 2048, max_headers 20), plus
a few cases fed to ClientConnection without sockets (tests.unit.test_protocol's Harness), where
the exact reads matter.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conformance.conftest import Env, assert_error, assert_rejected, proxied
from tests.support.client import RawClient, request
from tests.unit.test_protocol import Harness

conformance = pytest.mark.asyncio(loop_scope="module")

CHUNKED_HEAD = b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"


# ------------------------------------------------------------------ trailer section (finding 1)
@conformance
async def test_trailer_line_that_never_ends_is_refused(env: Env) -> None:
    """It was buffered without limit (64 MiB of one trailer line grew memory by as much)."""
    async with RawClient(env.port) as c:
        await c.send(CHUNKED_HEAD + b"2\r\nok\r\n0\r\nX-Trailer: ")
        for _ in range(8):  # 8000 > 2048 + slack, sent well within the 600 ms body timeout
            await asyncio.sleep(0.02)
            await c.send(b"a" * 1000)
        doc = assert_error(await c.response(), 431, "header_fields_too_large")
        assert "trailer" in doc["message"]
        assert await c.closed()
    assert env.up.received == []  # the request never completed upstream


@conformance
async def test_trailer_fields_count_against_max_headers(env: Env) -> None:
    fine = b"".join(b"X-T%d: 1\r\n" % i for i in range(10))  # + Host, TE = 12 fields
    _, got = await proxied(env, CHUNKED_HEAD + b"2\r\nok\r\n0\r\n" + fine + b"\r\n")
    assert got.body == b"ok" and got.header("x-t1") is None
    env.reset()
    many = b"".join(b"X-T%d: 1\r\n" % i for i in range(19))  # 21 fields with the head's two
    resp, closed = await request(env.port, CHUNKED_HEAD + b"2\r\nok\r\n0\r\n" + many + b"\r\n")
    assert_error(resp, 431, "header_fields_too_large")
    assert closed and env.up.received == []


@conformance
async def test_trailer_fields_count_against_max_header_bytes(env: Env) -> None:
    trailer = b"".join(b"X-T%d: %s\r\n" % (i, b"v" * 300) for i in range(7))  # ~2150 bytes
    resp, closed = await request(env.port, CHUNKED_HEAD + b"2\r\nok\r\n0\r\n" + trailer + b"\r\n")
    doc = assert_error(resp, 431, "header_fields_too_large")
    assert "trailer" in doc["message"]
    assert closed and env.up.received == []


def test_unfinished_trailer_line_is_bounded_and_body_reads_do_not_count() -> None:
    h = Harness(max_body_bytes=100_000)
    # the last body bytes and the start of the trailer in one read: it counts as 0
    h.feed(CHUNKED_HEAD + b"2710\r\n" + b"b" * 10_000 + b"\r\n0\r\nX-Sum: ")
    for _ in range(3):
        h.feed(b"a" * 1000)
    assert h.transport.written == b""  # 3000 < 2048 + 1024: still waiting, nothing buffered
    h.feed(b"a" * 1000)
    status, doc, _ = h.error()
    assert status == 431 and "trailer" in doc["message"]
    (ex,) = h.exchanges
    assert ex.body == b"b" * 10_000 and ex.events == ["start", "refused 431"]
    h.feed(b"a" * 100_000)  # read and discarded while lingering
    assert h.transport.written == b""


def test_oversized_trailer_after_the_response_began_closes_the_connection() -> None:
    """An upstream may answer before the body ends: a 431 cannot follow a started response."""
    h = Harness()
    h.feed(CHUNKED_HEAD + b"2\r\nok\r\n0\r\nX-Sum: ")
    (ex,) = h.exchanges
    ex.response_started = True
    h.feed(*[b"a" * 1000] * 4)
    assert h.transport.aborted and h.transport.written == b""
    assert ex.events == ["start", "client_lost"]


# ------------------------------------------------------------------ whole header section (2)
@conformance
@pytest.mark.parametrize(
    "field",
    [
        b"Host: " + b"h" * 2100,
        b"traceparent: " + b"0" * 2100,
        b"tracestate: " + b"s" * 2100,
        b"Keep-Alive: " + b"k" * 2100,
        b"Upgrade: " + b"u" * 2100,
        b"TE: " + b"t" * 2100,
        b"X-Forwarded-Host: " + b"f" * 2100,
        b"X-Request-Id: " + b"r" * 2100,
    ],
    ids=lambda f: f.split(b":")[0].decode(),
)
async def test_every_field_counts_against_max_header_bytes(env: Env, field: bytes) -> None:
    """Host, the trace context, hop-by-hop and forwarding fields were not counted: a 20 KB Host
    went upstream twice (X-Forwarded-Host, Forwarded) past a 2 KiB limit. (Under the bound on
    head bytes, 2048 + 512 + 1024, so only the complete head's check can refuse it.)"""
    host = b"" if field.startswith(b"Host") else b"Host: x\r\n"
    data = b"GET /echo HTTP/1.1\r\n" + host + field + b"\r\n\r\n"
    await assert_rejected(env, data, 431, "header_fields_too_large")


@conformance
async def test_special_fields_add_up_with_the_others(env: Env) -> None:
    data = (
        b"GET /echo HTTP/1.1\r\nHost: " + b"h" * 700 + b"\r\ntracestate: " + b"s" * 700
        + b"\r\nX-A: " + b"a" * 700 + b"\r\n\r\n"
    )  # fmt: skip
    await assert_rejected(env, data, 431, "header_fields_too_large")


# ------------------------------------------------------------------ Host grammar (finding 3)
@conformance
@pytest.mark.parametrize(
    ("valid", "invalid"),
    [
        (b"t:80", b"t:abc"),  # port: digits only
        (b"t:8080", b"t:80:90"),
        (b"t:65535", b"t:65536"),  # a port fits 16 bits
        (b"t:", b"t:99999999999"),  # (an empty port is allowed by the grammar)
        (b"[::1]", b"[::1"),  # IP-literal: closed, and an IPv6 address or IPvFuture
        (b"[::1]:8443", b"[::1]x"),
        (b"[::ffff:10.0.0.1]", b"[:::::]"),
        (b"[v1.fe]", b"a]b["),
        (b"%C3%A9.example", b"t%00"),  # percent-encoding: UTF-8 octets, not control bytes
        (b"a-b_c~d.example", b"t%2"),
    ],
)
async def test_host_must_be_uri_host_and_port(env: Env, valid: bytes, invalid: bytes) -> None:
    """RFC 9112 §3.2: 400 for a Host with an invalid value; it was routed on and copied into
    X-Forwarded-Host and Forwarded."""
    _, got = await proxied(env, b"GET /echo HTTP/1.1\r\nHost: %s\r\n\r\n" % valid)
    assert f'host="{valid.decode().lower()}"' in (got.header("forwarded") or "")
    env.reset()
    data = b"GET /echo HTTP/1.1\r\nHost: %s\r\n\r\n" % invalid
    doc = await assert_rejected(env, data, 400, "bad_request")
    assert "Host" in doc["message"]


@conformance
async def test_invalid_host_after_a_valid_one_on_the_same_connection(env: Env) -> None:
    """The check is skipped for a Host equal to the previous request's, not for a new one."""
    async with RawClient(env.port) as c:
        await c.send(b"GET /echo HTTP/1.1\r\nHost: t:80\r\n\r\n")
        assert (await c.response()).status == 200
        await c.send(b"GET /echo HTTP/1.1\r\nHost: t:80:90\r\n\r\n")
        assert_error(await c.response(), 400, "bad_request")
        assert await c.closed()
    assert len(env.up.received) == 1


# ------------------------------------------------------------------ upgrade with a body (4)
H2C_WITH_BODY = (
    b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n"
    b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nContent-Length: 3\r\n\r\nabc"
)  # what `curl --http2 -d abc` sends


def _assert_plain(got_raw: bytes) -> None:
    head = got_raw.partition(b"\r\n\r\n")[0].lower()
    assert b"upgrade" not in head and b"http2-settings" not in head, got_raw


@conformance
async def test_upgrade_request_with_a_body_is_proxied_without_the_upgrade(env: Env) -> None:
    """llhttp skips the body of an upgrade request: the upstream got Content-Length: 3 and never
    the body, and the client a 504 after the response timeout. RFC 9110 §7.8 lets a server
    ignore Upgrade: the request goes as a plain one, and the connection stays HTTP/1.1."""
    async with RawClient(env.port) as c:
        await c.send(H2C_WITH_BODY)
        resp = await asyncio.wait_for(c.response(), 2.0)
        assert resp.status == 200 and resp.json()["method"] == "POST"
        await c.send(b"GET /echo?again HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(c.response(), 2.0)).json()["query"] == "again"
    first, second = env.up.received
    assert first.body == b"abc" and first.header("content-length") == "3"
    _assert_plain(first.raw)
    assert second.path == "/echo" and second.body == b""


@conformance
async def test_websocket_upgrade_with_a_chunked_body_and_a_pipelined_request(env: Env) -> None:
    data = (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 1\r\n\r\n"
        b"GET /echo?next HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    async with RawClient(env.port) as c:
        await c.send(data)
        first = await asyncio.wait_for(c.response(), 2.0)
        second = await asyncio.wait_for(c.response(), 2.0)
    assert first.status == 200 and second.json()["query"] == "next"
    got, nxt = env.up.received
    assert got.body == b"abcde" and got.header("x-sum") is None
    _assert_plain(got.raw)
    assert nxt.query == "next"


def test_upgrade_requests_with_bodies_pipelined_in_one_read() -> None:
    """One read may hold many: each is read by a new parser, in a loop (no recursion)."""
    h = Harness()
    one = (
        b"POST /u HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 2\r\n\r\nab"
    )
    h.feed(one * 1500 + b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
    assert len(h.exchanges) == 1501 and h.conn.tunnel is None
    assert all(ex.body == b"ab" and ex.request.upgrade is None for ex in h.exchanges[:-1])
    assert h.exchanges[0].events == ["start", "body_done"]
    for ex in h.exchanges:
        if "start" not in ex.events:  # (after a burst, the next waits for a turn of the loop)
            h.loop.turn()
        if ex is not h.exchanges[-1]:
            ex.answer()
    assert h.exchanges[-1].request.path == "/last"
    assert h.exchanges[-1].events == ["start"]


def test_upgrade_request_body_spanning_reads_and_its_limit() -> None:
    h = Harness()
    h.feed(
        b"POST /u HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Content-Length: 10\r\n\r\nabc"
    )
    (ex,) = h.exchanges
    assert ex.body == b"abc" and ex.events == ["start"]
    h.feed(b"defghij")
    assert ex.body == b"abcdefghij" and ex.events == ["start", "body_done"]
    h2 = Harness()
    h2.feed(
        b"POST /u HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n3e9\r\n" + b"a" * 1001 + b"\r\n0\r\n\r\n"
    )
    assert h2.error()[0] == 413  # the body limit holds for it as for any request
