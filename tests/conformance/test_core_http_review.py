"""Findings of the second HTTP/1.1 data-plane review (raw bytes against a real gateway and the
recording upstream, plus reads fed to ClientConnection where the exact reads matter).
"""

from __future__ import annotations

import asyncio

import pytest

from tests.conformance.conftest import Env, assert_error, assert_rejected, proxied
from tests.support.client import RawClient
from tests.unit.test_protocol import FakeExchange, Harness

conformance = pytest.mark.asyncio(loop_scope="module")


# ------------------------------------------------ no request after the gateway decided to close
@conformance
async def test_request_pipelined_after_an_early_413_never_reaches_the_upstream(env: Env) -> None:
    """RFC 9112 §9.6: after `Connection: close` no further request is processed. The 413 came
    before the body was read, so the gateway closes; llhttp went on parsing the same read, and
    the DELETE behind it ran at the upstream while the client never saw its answer."""
    data = (
        b"POST /small-upload HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n" + b"x" * 20
    ) + b"DELETE /echo/account/42 HTTP/1.1\r\nHost: x\r\n\r\n"
    async with RawClient(env.port) as c:
        await c.send(data)
        resp = await asyncio.wait_for(c.response(), 2.0)
        assert_error(resp, 413, "payload_too_large")
        assert resp.header("connection") == "close"
        assert await c.closed()
        assert c.pending() == b""
        # (the client stays: a request sent upstream has time to arrive there; leaving would
        # cancel it)
        await asyncio.sleep(0.5)
    assert env.up.received == [], env.up.received


class _AnswersAtOnce(FakeExchange):
    """Answers and closes as soon as it starts, before its body is read: what a 413 from a
    plugin does (and any answer to a chunked body)."""

    def start(self) -> None:
        super().start()
        self.answer(b"no", keep_alive=False)


class _AnswersAtOnceKeepingAlive(FakeExchange):
    """Answers as soon as it starts, before its body is read, and keeps the connection: what
    a 401/403/429 from a plugin or a 404 does (the body is read and dropped)."""

    def start(self) -> None:
        super().start()
        self.answer(b"no", keep_alive=True)


def test_no_exchange_begins_after_an_answer_that_left_the_body_unread() -> None:
    h = Harness()
    h.host.exchange_class = _AnswersAtOnce
    h.feed(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert [ex.request.path for ex in h.exchanges] == ["/a"]
    assert h.transport.eof_written


def test_a_body_dropped_after_an_early_answer_is_never_read_as_requests() -> None:
    body = b"GET /inside-the-body HTTP/1.1\r\nHost: x\r\n\r\n" * 2
    h = Harness()
    h.host.exchange_class = _AnswersAtOnceKeepingAlive
    h.feed(
        b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
        + b"GET /b HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert [ex.request.path for ex in h.exchanges] == ["/a", "/b"]
    assert h.exchanges[0].body == body  # read as its body (ProxyExchange drops it)
    assert not h.transport.eof_written


# ------------------------------------------------ upgrades that are not tunnelled
def _assert_plain(raw_head: bytes) -> None:
    head = raw_head.partition(b"\r\n\r\n")[0].lower()
    assert b"upgrade" not in head and b"http2-settings" not in head, raw_head


@conformance
@pytest.mark.parametrize(
    "first",
    [
        # h2c: past a 101 the client would speak HTTP/2 straight to the upstream, beyond
        # routing and plugins ("h2c smuggling"); Envoy and nginx do not pass it on
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        # RFC 9110 §7.8: a server MUST ignore Upgrade in an HTTP/1.0 request
        b"GET /echo HTTP/1.0\r\nConnection: Upgrade, keep-alive\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        # an Upgrade naming no protocol asks for none (it went upstream as "Upgrade: ", and
        # the pipelined request after it was never answered)
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade:  \r\n\r\n",
    ],
    ids=["h2c", "http10", "empty"],
)
async def test_refused_upgrade_goes_as_a_plain_request(env: Env, first: bytes) -> None:
    version = first.split(b"\r\n", 1)[0].rsplit(b" ", 1)[1]
    nxt = b"GET /echo?next " + version + b"\r\nHost: x\r\nConnection: close\r\n\r\n"
    async with RawClient(env.port) as c:
        await c.send(first + nxt)  # one read: what follows the refused upgrade is a request
        resp = await asyncio.wait_for(c.response(), 2.0)
        assert resp.status == 200, resp.status
        assert (await asyncio.wait_for(c.response(), 2.0)).json()["query"] == "next"
    got, second = env.up.received
    _assert_plain(got.raw)
    assert got.header("sec-websocket-key") is not None or version == b"HTTP/1.1"
    assert second.query == "next"


# ------------------------------------------------ fields and authorities
@conformance
async def test_underscore_spellings_of_gateway_owned_fields_are_dropped(env: Env) -> None:
    """WSGI, CGI, PHP and Rails read X_Forwarded_For as X-Forwarded-For (HTTP_X_FORWARDED_FOR):
    a client set its own address through it. Other names with underscores pass."""
    _, got = await proxied(
        env,
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX_Forwarded_For: 6.6.6.6\r\nX_Real_IP: 6.6.6.6\r\n"
        b"X-Forwarded_Host: evil.example\r\nTransfer_Encoding: chunked\r\nX_Request_Id: a1\r\n"
        b"My_Field: kept\r\n\r\n",
    )
    assert b"6.6.6.6" not in got.raw and b"evil.example" not in got.raw, got.raw
    assert b"_encoding" not in got.raw.lower() and b"x_request_id" not in got.raw.lower()
    assert got.header("x-forwarded-for") == "127.0.0.1"
    assert got.header("my_field") == "kept"


@conformance
async def test_absolute_form_ipv6_authority_keeps_its_brackets(env: Env) -> None:
    """httptools gives an IPv6 host without brackets: "::1:8080" went upstream as the host."""
    _, got = await proxied(env, b"GET http://[::1]:8080/echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.header("x-forwarded-host") == "[::1]"  # (without the port, as Kong)
    assert 'host="[::1]:8080"' in (got.header("forwarded") or "")


@conformance
async def test_empty_host_is_refused(env: Env) -> None:
    """RFC 9110 §4.2.1: an http URI with an empty host is invalid (nginx: 400). It passed,
    as the connection's "previous Host" starts out empty, and went on as X-Forwarded-Host."""
    doc = await assert_rejected(env, b"GET /echo HTTP/1.1\r\nHost: \r\n\r\n", 400, "bad_request")
    assert "Host" in doc["message"]
