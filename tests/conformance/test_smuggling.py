"""Request smuggling vectors: ambiguous or malformed body framing.

Each is refused with a JSON error and the connection closed, and not one byte reaches the
upstream: in particular the "smuggled" second request hidden in the body never becomes a request.
"""

from __future__ import annotations

import pytest

from tests.conformance.conftest import Env, assert_rejected, proxied

pytestmark = pytest.mark.asyncio(loop_scope="module")

SMUGGLED = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"


def _post(*headers: bytes, body: bytes = b"", version: bytes = b"1.1") -> bytes:
    head = (
        b"POST /echo HTTP/" + version + b"\r\nHost: x\r\n" + b"".join(h + b"\r\n" for h in headers)
    )
    return head + b"\r\n" + body


# ------------------------------------------------------------------ Content-Length
async def test_cl_and_te_together(env: Env) -> None:
    data = _post(b"Content-Length: 4", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n" + SMUGGLED)
    await assert_rejected(env, data, 400, "bad_request")


async def test_te_before_cl(env: Env) -> None:
    data = _post(b"Transfer-Encoding: chunked", b"Content-Length: 40", body=b"0\r\n\r\n" + SMUGGLED)
    await assert_rejected(env, data, 400, "bad_request")


async def test_duplicate_content_length_same_value(env: Env) -> None:
    await assert_rejected(env, _post(b"Content-Length: 3", b"Content-Length: 3", body=b"abc"), 400)


async def test_duplicate_content_length_different_values(env: Env) -> None:
    data = _post(b"Content-Length: 3", b"Content-Length: 40", body=b"abc" + SMUGGLED)
    await assert_rejected(env, data, 400, "bad_request")


async def test_content_length_list_value(env: Env) -> None:
    await assert_rejected(env, _post(b"Content-Length: 3, 3", body=b"abc"), 400)


@pytest.mark.parametrize(
    "value",
    [b"+3", b"3a", b"-3", b"0x3", b"3 3", b"3.0", b"", b"99999999999999999999999999"],
    ids=["plus", "trailing-letter", "negative", "hex", "inner-space", "decimal", "empty", "huge"],
)
async def test_malformed_content_length(env: Env, value: bytes) -> None:
    doc = await assert_rejected(env, _post(b"Content-Length: " + value, body=b"abc"), 400)
    assert doc["error"] == "bad_request"


async def test_content_length_with_whitespace_is_accepted(env: Env) -> None:
    # OWS around a field value is not part of it (RFC 9110 §5.5): this one is valid.
    _, got = await proxied(env, _post(b"Content-Length:  3 ", body=b"abc"))
    assert got.body == b"abc"
    assert got.header("content-length") == "3"


# ------------------------------------------------------------------ chunked bodies
@pytest.mark.parametrize(
    "chunks",
    [
        b"zz\r\nabc\r\n0\r\n\r\n",  # not hex
        b"-3\r\nabc\r\n0\r\n\r\n",  # negative
        b"+3\r\nabc\r\n0\r\n\r\n",  # sign
        b"0x3\r\nabc\r\n0\r\n\r\n",  # 0x prefix
        b"3\nabc\r\n0\r\n\r\n",  # bare LF after the size
        b"3\r\nabcX0\r\n\r\n",  # data longer than its size
        b"3\r\nab\r\n0\r\n\r\n",  # data shorter than its size
        b"\r\nabc\r\n0\r\n\r\n",  # empty size
        b"3 \r\nabc\r\n0\r\n\r\n",  # space after the size
    ],
    ids=["not-hex", "negative", "plus", "0x", "bare-lf", "too-long", "too-short", "empty", "space"],
)
async def test_bad_chunk_size_or_framing(env: Env, chunks: bytes) -> None:
    data = _post(b"Transfer-Encoding: chunked", body=chunks + SMUGGLED)
    await assert_rejected(env, data, 400, "bad_request")


async def test_chunk_size_overflow(env: Env) -> None:
    # 2**64 + 3 would wrap to 3 in a 64-bit accumulator
    data = _post(b"Transfer-Encoding: chunked", body=b"10000000000000003\r\nabc\r\n0\r\n\r\n")
    doc = await assert_rejected(env, data, 400, "bad_request")
    assert "overflow" in doc["message"].lower()


async def test_chunk_extensions_and_trailers_are_accepted_but_not_forwarded(env: Env) -> None:
    body = b"3;name=value\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\nHost: evil\r\n\r\n"
    _, got = await proxied(env, _post(b"Transfer-Encoding: chunked", body=body))
    assert got.body == b"abcde"
    assert b"name=value" not in got.raw
    assert got.header("x-trailer") is None and b"evil" not in got.raw
    assert got.header("transfer-encoding") == "chunked"  # re-framed by the gateway


# ------------------------------------------------------------------ Transfer-Encoding values
@pytest.mark.parametrize(
    ("value", "status"),
    [
        (b"gzip, chunked", 501),  # a coding we do not implement (RFC 9112 §6.1: 501)
        (b"identity", 501),
        (b"xchunked", 501),
        (b"chunked, gzip", 400),  # chunked not last: the length cannot be determined
        (b"chunked, chunked", 400),
        (b"", 400),
    ],
    ids=["gzip-chunked", "identity", "xchunked", "chunked-gzip", "chunked-chunked", "empty"],
)
async def test_transfer_encoding_other_than_chunked(env: Env, value: bytes, status: int) -> None:
    data = _post(b"Transfer-Encoding: " + value, body=b"0\r\n\r\n" + SMUGGLED)
    await assert_rejected(env, data, status)


async def test_transfer_encoding_chunked_twice(env: Env) -> None:
    data = _post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=b"0\r\n\r\n")
    await assert_rejected(env, data, 400)


async def test_transfer_encoding_in_http10(env: Env) -> None:
    data = _post(b"Transfer-Encoding: chunked", body=b"3\r\nabc\r\n0\r\n\r\n", version=b"1.0")
    await assert_rejected(env, data, 400, "bad_request")


async def test_transfer_encoding_with_whitespace_is_chunked(env: Env) -> None:
    _, got = await proxied(env, _post(b"Transfer-Encoding:  chunked ", body=b"1\r\na\r\n0\r\n\r\n"))
    assert got.body == b"a"


async def test_framing_error_after_a_good_request_on_the_same_connection(env: Env) -> None:
    """The first request is answered; the malformed second one closes the connection and
    nothing of it is forwarded."""
    from tests.support.client import RawClient

    good = b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n"
    bad = _post(b"Content-Length: 3", b"Content-Length: 4", body=b"abcd")
    async with RawClient(env.port) as c:
        await c.send(good + bad)
        first = await c.response()
        assert first.status == 200
        second = await c.response()
        assert second.status == 400
        assert await c.closed()
    assert [r.path for r in env.up.received] == ["/echo"]
