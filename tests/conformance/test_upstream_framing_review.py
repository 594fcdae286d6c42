"""Response framing the upstream gets wrong, found in review: bytes after a bodiless response,
Transfer-Encoding in HTTP/1.0, status lines the client must not see, and a response head over
its limit that arrives in one read. Each canned response is written in one send, so that what
follows a response's end comes in the read that ended it."""

from __future__ import annotations

import pytest

from tests.conformance.conftest import assert_error
from tests.conformance.test_responses import _config  # (the same gateway and upstream)
from tests.support.client import RawClient, Response, request
from tests.support.env import Env, env_fixture, shared_env_fixture

pytestmark = pytest.mark.asyncio(loop_scope="module")


shared_env = shared_env_fixture(_config)
env = env_fixture()


async def _get(env: Env, path: str) -> Response:
    resp, _ = await request(env.port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    return resp


# A whole response, as the stray bytes after a bodiless one: the next request must never get it.
FORGED = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nEVIL"
NEXT_REQUESTS = {
    "GET": b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n",
    "POST": b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
}


@pytest.mark.parametrize("follow_up", ["GET", "POST"])
@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(FORGED), FORGED)),
        ("HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nEVIL\r\n0\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n" + FORGED),
        ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n" + FORGED),
    ],
    ids=["head-length", "head-chunked", "204", "304"],
)
async def test_bytes_after_a_bodiless_response_reach_no_client(
    env: Env, method: str, raw: bytes, follow_up: str
) -> None:
    """The client pipelines a second request: it must be answered by the upstream, on a fresh
    connection, never with the bytes that followed the bodiless response (the connection was
    once handed to it while they were still being parsed, and they became its response)."""
    env.up.state.canned["/bodiless"] = raw
    async with RawClient(env.port) as c:
        first = b"%s /bodiless HTTP/1.1\r\nHost: x\r\n\r\n" % method.encode()
        await c.send(first + NEXT_REQUESTS[follow_up])
        resp = await c.response(method=method)
        assert resp.status == int(raw[9:12])
        nxt = await c.response()
        assert nxt.status == 200 and b"EVIL" not in nxt.body + c.pending(), nxt.body
        assert nxt.json()["method"] == follow_up
    # sent upstream once, and not first on the connection that carried the stray bytes
    assert [r.method for r in env.up.received] == [method, follow_up]
    bodiless, answered = env.up.received
    assert answered.connection != bodiless.connection, "the connection must not be reused"


async def test_http10_response_with_transfer_encoding_closes_its_connection(env: Env) -> None:
    """RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message is faulty framing: the message
    is processed, and the connection closed after it, whatever Connection says."""
    env.up.state.canned["/te10"] = (
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    )
    resp = await _get(env, "/te10")
    assert (resp.status, resp.body) == (200, b"ok")
    assert (await _get(env, "/echo")).status == 200
    te10, nxt = env.up.received
    assert nxt.connection != te10.connection, "the connection must not be reused"


async def test_reason_phrase_with_control_bytes_is_not_forwarded(env: Env) -> None:
    """RFC 9112 §4: reason-phrase = 1*( HTAB / SP / VCHAR / obs-text ). The gateway writes its
    own status line for every status it knows; for another (599) it forwards the upstream's
    phrase only if it is one."""
    env.up.state.canned["/ctl"] = b"HTTP/1.1 599 A\x01B\x7fC\r\nContent-Length: 2\r\n\r\nok"
    env.up.state.canned["/tab"] = b"HTTP/1.1 599 Still\tOdd\r\nContent-Length: 2\r\n\r\nok"
    ctl = await _get(env, "/ctl")
    assert ctl.raw_head.startswith(b"HTTP/1.1 599 Unknown\r\n") and ctl.body == b"ok"
    tab = await _get(env, "/tab")
    assert tab.raw_head.startswith(b"HTTP/1.1 599 Still\tOdd\r\n")


# 100 KB of head, then a 2-byte body: written in one send, it arrives in one read
BIG_HEAD = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100_000 + b"\r\nContent-Length: 2\r\n\r\nok"


async def test_response_head_limit_holds_when_the_head_comes_in_one_read(env: Env) -> None:
    """MAX_RESPONSE_HEAD (64 KiB) was once measured only on a head still incomplete at the end
    of a read; a larger one that came whole in one read went through."""
    env.up.state.canned["/big-head"] = BIG_HEAD
    doc = assert_error(await _get(env, "/big-head"), 502, "upstream_invalid_response")
    assert "larger than 65536" in doc["message"]
    # a small head with a large body in the same read is not a large head
    body = bytes(range(256)) * 1200
    env.up.state.canned["/big-body"] = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    resp = await _get(env, "/big-body")
    assert resp.status == 200 and resp.body == body
    bad, good = env.up.received
    assert good.connection != bad.connection, "the bad connection must not be reused"


def _fields(count: int, line: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + line * count + b"Content-Length: 2\r\n\r\nok"


async def test_a_response_head_with_too_many_fields_is_a_502(env: Env) -> None:
    """10,000 fields in 50 KB, within the byte limit, went to the client one by one (a tuple
    each, in every plugin's scans). Envoy refuses more than 100 (max_headers_count, upstream
    too); nginx's whole head must fit proxy_buffer_size. The limit is twice the client side's
    default, as the byte limit is."""
    env.up.state.canned["/many"] = _fields(10_000, b"a:b\r\n")
    doc = assert_error(await _get(env, "/many"), 502, "upstream_invalid_response")
    assert "more than 200 header fields" in doc["message"]
    assert (await _get(env, "/echo")).status == 200
    many, nxt = env.up.received
    assert nxt.connection != many.connection, "the connection must not be reused"


async def test_a_response_head_of_200_fields_is_forwarded(env: Env) -> None:
    env.up.state.canned["/enough"] = _fields(200, b"X-F: 1\r\n")
    resp = await _get(env, "/enough")
    assert (resp.status, resp.body) == (200, b"ok")
    assert resp.header_values("x-f") == ["1"] * 200


async def test_an_interim_head_with_too_many_fields_is_a_502(env: Env) -> None:
    early = b"HTTP/1.1 103 Early Hints\r\n" + b"Link: </a>\r\n" * 201 + b"\r\n"
    env.up.state.canned["/hints"] = early + _fields(1, b"X-F: 1\r\n")
    resp, _ = await request(env.port, b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n", close_wait=0.2)
    assert_error(resp, 502, "upstream_invalid_response")


async def test_a_one_mebibyte_field_arriving_in_reads_is_a_502(env: Env) -> None:
    """nginx: "upstream sent too big header" (502). The head is measured across reads (it
    comes in three writes, PART_PAUSE apart), not only when a read completes it."""
    field = b"X-Pad: " + b"a" * (1 << 20) + b"\r\n"
    end = b"Content-Length: 0\r\n\r\n"
    env.up.state.canned_parts["/mib"] = [b"HTTP/1.1 200 OK\r\n", field, end]
    doc = assert_error(await _get(env, "/mib"), 502, "upstream_invalid_response")
    assert "larger than 65536" in doc["message"]
    assert (await _get(env, "/echo")).status == 200
    mib, nxt = env.up.received
    assert nxt.connection != mib.connection, "the connection must not be reused"
