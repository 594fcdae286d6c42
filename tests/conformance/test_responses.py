"""The response direction: the upstream is untrusted too. A response that cannot be proxied
faithfully becomes a 502 (`upstream_invalid_response`) before anything reaches the client, or a
truncated response once the head has gone out; its connection is never reused."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.conformance.conftest import assert_error
from tests.support.client import RawClient, Truncated, request
from tests.support.env import Env, env_fixture, shared_env_fixture
from tests.support.gateway import base_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _config(up: Upstream) -> dict[str, Any]:
    return base_config(
        services={
            "up": {"targets": [up.url], "timeouts": {"response": "2s"}, "health": {"passive": None}}
        },  # these failures must not eject it
        routes=[{"name": "all", "match": {"paths": ["/"]}, "service": "up"}],
    )


shared_env = shared_env_fixture(_config)
env = env_fixture()


async def _get(env: Env, path: str, method: str = "GET") -> Any:
    data = b"%s %s HTTP/1.1\r\nHost: x\r\n\r\n" % (method.encode(), path.encode())
    resp, _ = await request(env.port, data, method=method, close_wait=0.01)
    return resp


OUT_OF_RANGE = (b"099", b"000", b"600", b"999")
_FORGED = b"HTTP/1.1 200 OK\r\nSet-Cookie: session=attacker\r\nContent-Length: 4\r\n\r\nEVIL"
_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok!",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nX-A: a\r\n folded\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 99 Odd\r\nContent-Length: 2\r\n\r\nok",
        # RFC 9110 §15: 100-599 (llhttp takes any three digits; "099" once reached the client
        # as "HTTP/1.1 99 Weird")
        *(b"HTTP/1.1 %s Weird\r\nContent-Length: 2\r\n\r\nok" % s for s in OUT_OF_RANGE),
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\nConnection: close\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n",
        # a head that has not ended after 64 KiB (one read may hold a larger complete head)
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 1_000_000 + b"\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nraw",
        b"garbage\r\n\r\n",
        # an interim status with a body: a response of the upstream's making went to the
        # client unframed, ahead of the real one (and so answered the client's next request)
        b"HTTP/1.1 150 Odd\r\nContent-Length: %d\r\n\r\n%s" % (len(_FORGED), _FORGED) + _OK,
        b"HTTP/1.1 199 Odd\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(_FORGED), _FORGED)
        + _OK,
        b"HTTP/2.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/0.9 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ],
    ids=[
        "cl-te",
        "dup-cl",
        "plus-cl",
        "bare-lf",
        "nul",
        "obs-fold",
        "status-99",
        *(f"status-{s.decode()}" for s in OUT_OF_RANGE),
        "te-gzip",
        "te-identity",
        "te-chunked-gzip",
        "te-twice",
        "head-1m",
        "unasked-101",
        "garbage",
        "1xx-with-length",
        "1xx-chunked",
        "http-2.0",
        "http-0.9",
    ],
)
async def test_unproxyable_response_is_502(env: Env, raw: bytes) -> None:
    env.up.state.canned["/bad"] = raw
    doc = assert_error(await _get(env, "/bad"), 502, "upstream_invalid_response")
    assert "invalid response" in doc["message"]
    assert (await _get(env, "/echo")).status == 200
    bad, good = env.up.received
    assert good.connection != bad.connection, "the bad connection must not be reused"


_UPGRADE = (
    b"GET /up HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket, foo/2\r\n\r\n"
)


@pytest.mark.parametrize(
    "answer",
    [b"Upgrade: h2c\r\n", b"Upgrade: websocket, h2c\r\n", b"Upgrade: \r\n", b""],
    ids=["other", "one-other", "empty", "none"],
)
async def test_a_101_to_a_protocol_not_offered_is_502(env: Env, answer: bytes) -> None:
    """RFC 9110 §7.8: a 101 names the protocols it switches to, each one the client offered.
    A switch to another (or to none named) was tunnelled: the client, expecting WebSocket
    frames, got bytes of another protocol on its connection."""
    env.up.state.canned["/up"] = (
        b"HTTP/1.1 101 Switching Protocols\r\n%sConnection: upgrade\r\n\r\nraw" % answer
    )
    async with RawClient(env.port) as c:
        await c.send(_UPGRADE)
        assert_error(await c.response(), 502, "upstream_invalid_response")


@pytest.mark.parametrize("answer", [b"WebSocket", b"foo/2", b"websocket, foo/2"])
async def test_a_101_to_an_offered_protocol_is_a_tunnel(env: Env, answer: bytes) -> None:
    env.up.state.canned["/up"] = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: %s\r\nConnection: upgrade\r\n\r\nraw"
        % answer
    )
    async with RawClient(env.port) as c:
        await c.send(_UPGRADE)
        resp = await c.response()
        assert resp.status == 101 and resp.header("upgrade") == answer.decode()
        assert await c.read_exact(3) == b"raw"


async def test_interim_responses_are_forwarded_except_100(env: Env) -> None:
    """RFC 9110 §15.2: a proxy forwards 1xx responses. A 100 answers an Expect, which the
    gateway handles itself (and never forwards): an upstream's own 100 is dropped."""
    env.up.state.canned["/hints"] = (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n"
        b"Connection: X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\r\n"
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    async with RawClient(env.port) as c:
        await c.send(b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n")
        hints = await c.response(interim=True)
        assert (hints.status, hints.reason) == (103, "Early Hints")
        assert hints.header("link") == "</a.css>; rel=preload"
        assert hints.header("x-hop") is None and hints.header("keep-alive") is None
        assert hints.header("connection") is None
        assert (await c.response(interim=True)).status == 102
        final = await c.response(interim=True)
        assert (final.status, final.body) == (200, b"ok")
        await c.send(b"GET /hints HTTP/1.0\r\n\r\n")  # a 1.0 client cannot take a 1xx
        final = await c.response(interim=True)
        assert (final.status, final.body) == (200, b"ok")


async def test_http10_upstream_response_is_sent_as_http11(env: Env) -> None:
    env.up.state.canned["/old"] = b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    resp = await _get(env, "/old")
    assert resp.version == "HTTP/1.1" and resp.body == b"ok"
    assert (await _get(env, "/echo")).status == 200
    old, nxt = env.up.received
    assert nxt.connection != old.connection  # HTTP/1.0 without keep-alive: not reused


async def test_body_sent_with_a_head_response_is_dropped_and_the_connection_closed(
    env: Env,
) -> None:
    env.up.state.canned["/head-body"] = b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\nhello world"
    async with RawClient(env.port) as c:
        await c.send(b"HEAD /head-body HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await c.response(method="HEAD")
        assert resp.header("content-length") == "11"
        await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        after = await c.response()
        assert after.status == 200 and not c.pending()
    head, nxt = env.up.received
    assert nxt.connection != head.connection


async def test_malformed_chunk_mid_body_truncates_the_client_response(env: Env) -> None:
    env.up.state.canned["/bad-chunk"] = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\nzz\r\nmore\r\n0\r\n\r\n"
    )
    async with RawClient(env.port) as c:
        await c.send(b"GET /bad-chunk HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(Truncated):
            await c.response()


async def test_an_endless_trailer_section_is_cut_at_the_head_limit(env: Env) -> None:
    """Trailer fields had no limit: one endless field grew with every read (quadratic CPU
    in httptools, the event loop at 100%). Past the head's limit the response is cut."""
    env.up.state.canned["/trailer-bomb"] = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
        b"X-T: " + b"a" * 4_000_000 + b"\r\n\r\n"
    )
    async with RawClient(env.port) as c:
        await c.send(b"GET /trailer-bomb HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(Truncated):
            await c.response()
    assert (await _get(env, "/echo")).status == 200


async def test_a_chunked_response_with_a_head_near_the_limit_is_not_cut(env: Env) -> None:
    """The trailer bound counted the head's bytes and the read that completed it: a valid
    response whose head was just under 64 KiB, a chunk header after it and the data in
    a later read, was cut (diff review)."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Pad: "
    head += b"p" * (65_500 - len(head) - 4) + b"\r\n\r\n"
    env.up.state.canned_parts["/big-head"] = [
        head + b"a;ext=" + b"y" * 60 + b"\r\n",
        b"0123456789\r\n0\r\n\r\n",
    ]
    resp = await _get(env, "/big-head")
    assert (resp.status, resp.body) == (200, b"0123456789")


async def test_a_body_cut_off_reaches_an_http10_client_as_a_reset(env: Env) -> None:
    """A 1.0 client reads a length-less body to the close: a FIN after a cut body made it
    look whole (to a cache in front too). The cut is a reset."""
    reader, writer = await asyncio.open_connection("127.0.0.1", env.port)
    try:
        writer.write(b"GET /eof-reset HTTP/1.0\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            while await asyncio.wait_for(reader.read(65536), 5):
                pass
    finally:
        writer.close()


async def test_response_longer_than_its_content_length(env: Env) -> None:
    """Bytes past Content-Length are not part of the response (nor a second one)."""
    env.up.state.canned["/long"] = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 5\r\n"
        b"\r\nforge"
    )
    async with RawClient(env.port) as c:
        await c.send(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await c.response()).body == b"ok"
        await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        nxt = await c.response()
        assert nxt.status == 200 and nxt.body != b"forge"
