"""The bytes of the two heads a proxied exchange writes: upstream request and client response."""

from __future__ import annotations

import pytest

from apigate.http.date import DATE
from apigate.http.request import Request
from apigate.http.response_head import ResponseHead
from apigate.proxy.heads import interim_head, request_head, response_head


def _request(**fields: object) -> Request:
    req = Request()
    req.method = "GET"
    req.path = "/p"
    req.host = "api.example.com"
    req.client_ip = "203.0.113.9"
    req.request_id = "rid-1"
    for name, value in fields.items():
        setattr(req, name, value)
    return req


def _response(status: int = 200, **fields: object) -> ResponseHead:
    head = ResponseHead()
    head.status = status
    head.reason = b"OK"
    for name, value in fields.items():
        setattr(head, name, value)
    return head


# ------------------------------------------------------------------ request_head
def test_request_head_exact_bytes() -> None:
    req = _request(query=b"a=1&b", headers=[(b"Accept", b"*/*"), (b"x-Custom", b"v")])
    got = request_head(req, b"GET", "/up/p", b"10.0.0.5:8080", chunked=False, content_length=None)
    assert got == (
        b"GET /up/p?a=1&b HTTP/1.1\r\n"
        b"Host: 10.0.0.5:8080\r\n"
        b"Accept: */*\r\n"
        b"x-Custom: v\r\n"
        b"X-Forwarded-For: 203.0.113.9\r\n"
        b"X-Forwarded-Proto: http\r\n"
        b"X-Forwarded-Host: api.example.com\r\n"
        b'Forwarded: for=203.0.113.9;host="api.example.com";proto=http\r\n'
        b"X-Request-Id: rid-1\r\n"
        b"Via: 1.1 apigate\r\n"
        b"\r\n"
    )


def test_request_head_framing() -> None:
    req = _request(method="POST")
    with_length = request_head(req, b"POST", "/p", b"h", chunked=False, content_length=12)
    assert with_length.endswith(b"Via: 1.1 apigate\r\nContent-Length: 12\r\n\r\n")
    chunked = request_head(req, b"POST", "/p", b"h", chunked=True, content_length=None)
    assert chunked.endswith(b"Transfer-Encoding: chunked\r\n\r\n")
    assert b"Content-Length" not in chunked
    empty = request_head(req, b"POST", "/p", b"h", chunked=False, content_length=0)
    assert b"\r\nContent-Length: 0\r\n" in empty


def test_request_head_trusted_chain_and_https() -> None:
    req = _request(forwarded_for=b"198.51.100.1, 10.1.1.1", scheme="https")
    got = request_head(req, b"GET", "/p", b"h", chunked=False, content_length=None)
    assert b"\r\nX-Forwarded-For: 198.51.100.1, 10.1.1.1, 203.0.113.9\r\n" in got
    assert b"\r\nX-Forwarded-Proto: https\r\n" in got
    assert b";proto=https\r\n" in got


def test_request_head_ipv6_client_in_forwarded() -> None:
    got = request_head(
        _request(client_ip="2001:db8::1"), b"GET", "/p", b"h", chunked=False, content_length=None
    )
    assert b'\r\nForwarded: for="[2001:db8::1]";' in got
    assert b"\r\nX-Forwarded-For: 2001:db8::1\r\n" in got


def test_request_head_upgrade() -> None:
    got = request_head(
        _request(upgrade=b"websocket"), b"GET", "/ws", b"h", chunked=False, content_length=None
    )
    assert got.endswith(b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")


def test_request_head_has_one_host_and_no_hop_by_hop() -> None:
    got = request_head(_request(), b"GET", "/p", b"h", chunked=False, content_length=None)
    names = [line.split(b":")[0].lower() for line in got.split(b"\r\n")[1:] if line]
    assert names.count(b"host") == 1
    assert not {b"connection", b"keep-alive", b"te", b"transfer-encoding"} & set(names)


# ------------------------------------------------------------------ response_head
def test_response_head_exact_bytes() -> None:
    head = _response(
        headers=[(b"Content-Type", b"text/plain"), (b"date", b"Mon, 01 Jan 2024")], content_length=5
    )
    got = response_head(head, _request(), chunk_out=False, keep_alive=True)
    assert got == (
        b"HTTP/1.1 200 OK\r\n"
        b"Content-Type: text/plain\r\n"
        b"date: Mon, 01 Jan 2024\r\n"
        b"X-Request-Id: rid-1\r\n"
        b"Via: 1.1 apigate\r\n"
        b"Content-Length: 5\r\n"
        b"\r\n"
    )


def test_both_heads_carry_the_request_id_as_it_is_when_each_is_made() -> None:
    """The X-Request-Id line is made once for both heads, and again if the id changed in
    between (a plugin may set its own)."""
    req = _request()
    up = request_head(req, b"GET", "/p", b"h", chunked=False, content_length=None)
    down = response_head(_response(), req, chunk_out=False, keep_alive=True)
    assert b"X-Request-Id: rid-1\r\n" in up and b"X-Request-Id: rid-1\r\n" in down
    req.request_id = "rid-2"
    down = response_head(_response(), req, chunk_out=False, keep_alive=True)
    assert b"X-Request-Id: rid-2\r\n" in down and b"rid-1" not in down


def test_response_head_via_comes_after_the_upstreams() -> None:
    """RFC 9110 §7.6.3: each proxy adds itself to the list, so ours follows the Via lines of
    the proxies behind it (two field lines are one list, in order)."""
    head = _response(headers=[(b"Via", b"1.1 varnish")], content_length=0)
    got = response_head(head, _request(), chunk_out=False, keep_alive=True)
    vias = [line for line in got.split(b"\r\n") if line.lower().startswith(b"via:")]
    assert vias == [b"Via: 1.1 varnish", b"Via: 1.1 apigate"]


def test_interim_head_carries_via() -> None:
    got = interim_head(_response(103, headers=[(b"Link", b"</a.css>; rel=preload")]))
    assert got == (
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nVia: 1.1 apigate\r\n\r\n"
    )


def test_response_head_adds_date_when_missing() -> None:
    got = response_head(_response(content_length=0), _request(), chunk_out=False, keep_alive=True)
    assert DATE.value in got and got.count(b"Date: ") == 1


def test_response_head_standard_reason_and_unknown_status() -> None:
    assert response_head(
        _response(404, reason=b"Nope"), _request(), chunk_out=False, keep_alive=True
    ).startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert response_head(
        _response(599, reason=b"Odd"), _request(), chunk_out=False, keep_alive=True
    ).startswith(b"HTTP/1.1 599 Odd\r\n")


def test_response_head_chunked_and_close() -> None:
    got = response_head(_response(chunked=True), _request(), chunk_out=True, keep_alive=False)
    assert got.endswith(b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    assert b"Content-Length" not in got


def test_response_head_http10_keep_alive_is_explicit() -> None:
    got = response_head(
        _response(content_length=1), _request(version="1.0"), chunk_out=False, keep_alive=True
    )
    assert got.endswith(b"Content-Length: 1\r\nConnection: keep-alive\r\n\r\n")


@pytest.mark.parametrize(
    ("status", "length", "expected"),
    [(204, 0, None), (204, 10, None), (304, 0, None), (304, 100, b"100"), (200, 0, b"0")],
)
def test_response_head_content_length_rules(
    status: int, length: int, expected: bytes | None
) -> None:
    got = response_head(
        _response(status, content_length=length), _request(), chunk_out=False, keep_alive=True
    )
    if expected is None:
        assert b"Content-Length" not in got
    else:
        assert b"\r\nContent-Length: " + expected + b"\r\n" in got


def test_response_head_switching_protocols() -> None:
    got = response_head(
        _response(101, upgrade=b"websocket"), _request(), chunk_out=False, keep_alive=True
    )
    assert got.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert got.endswith(b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n")
    assert b"Content-Length" not in got and b"close" not in got


@pytest.mark.parametrize("length", [0, 1, 13, 1023, 1024, 65536, 10**12])
def test_content_length_lines_made_in_advance_or_not_are_the_same(length: int) -> None:
    from apigate.http.headers import content_length_line

    assert content_length_line(length) == b"Content-Length: %d\r\n" % length
