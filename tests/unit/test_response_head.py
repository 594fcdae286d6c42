"""Reading an upstream response head from its bytes (apigate.http.response_head).

The upstream connection's parser reports no fields: `read_head` reads them from the bytes
llhttp has validated. So the first tests pin what llhttp refuses (what read_head relies on), and
the property test compares what the connection makes of generated heads, split over reads
anywhere, with what a parser that reports each field (httptools' own callbacks) makes of them.
"""

from __future__ import annotations

import itertools

import httptools
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.http.response_head import (
    MAX_RESPONSE_FIELDS,
    InvalidResponse,
    ResponseHead,
    read_head,
)
from tests.unit.test_upstream_head import client_head, connection, exchange

# --------------------------------------------------------------------- what llhttp refuses


class _NoFields:
    """A parser protocol like the connection's: no on_header."""

    def on_headers_complete(self) -> None:
        pass


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nA: b\n\r\n",  # bare LF ending a field line
        b"HTTP/1.1 200 OK\nA: b\r\n\r\n",  # ... the status line
        b"HTTP/1.1 200 OK\r\nA: b\r\n\n",  # ... the head
        b"HTTP/1.1 200 OK\r\nA: b\rX: y\r\n\r\n",  # bare CR
        b"HTTP/1.1 200 O\rK\r\nA: b\r\n\r\n",  # CR in the reason phrase
        b"HTTP/1.1 200 OK\r\nA: b\r\n c\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\r\nA: b\r\n\tc\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nA : b\r\n\r\n",  # whitespace before the colon
        b"HTTP/1.1 200 OK\r\n A: b\r\n\r\n",  # ... before the first field
        b"HTTP/1.1 200 OK\r\n: b\r\n\r\n",  # no name
        b"HTTP/1.1 200 OK\r\nA B: b\r\n\r\n",  # no token
        b"HTTP/1.1 200 OK\r\nA: b\x00c\r\n\r\n",  # control bytes in a value
        b"HTTP/1.1 200 OK\r\nA: b\x7fc\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",  # two spaces
        b"HTTP/1.1 20 OK\r\n\r\n",  # not three digits
        b"HTTP/1.1 2000 OK\r\n\r\n",
    ],
)
def test_llhttp_refuses_what_read_head_relies_on_it_refusing(head: bytes) -> None:
    """read_head splits lines at CR, names at the first colon, and takes a status line's code
    from three fixed places: true of every head llhttp accepts, and of none of these."""
    with pytest.raises(httptools.HttpParserError):
        httptools.HttpResponseParser(_NoFields()).feed_data(head)


# --------------------------------------------------------------------- read_head itself


def _read(head_bytes: bytes, status: int = 200) -> tuple[ResponseHead, list[bytes], int]:
    head = ResponseHead()
    values: list[bytes] = []
    end = read_head(head, head_bytes, 0, status, values)
    return head, values, end


def test_the_end_to_end_lines_are_kept_as_one_piece_when_the_framing_comes_last() -> None:
    fields = b"Server: nginx\r\nDate: Sun, 22 Nov 2026 12:00:00 GMT\r\nContent-Type: text/plain\r\n"
    data = b"HTTP/1.1 200 OK\r\n" + fields + b"Content-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    head, values, end = _read(data + b"Hello, World!")
    assert end == len(data)
    assert head.field_lines == fields and head.has_date
    assert (head.version, head.reason, head.content_length, values) == (
        "1.1",
        b"OK",
        13,
        [b"keep-alive"],
    )
    assert head.headers == [
        (b"Server", b"nginx"),
        (b"Date", b"Sun, 22 Nov 2026 12:00:00 GMT"),
        (b"Content-Type", b"text/plain"),
    ]
    assert head.field_lines is None  # made into the list once asked for


def test_framing_fields_between_others_are_cut_out() -> None:
    head, values, _ = _read(
        b"HTTP/1.1 200 OK\r\ndate: x\r\nCONTENT-LENGTH:\t 2 \r\nServer: s\r\n"
        b"Keep-Alive: timeout=5\r\nconnection:close\r\nX-Request-Id: theirs\r\nVary: a\r\n\r\nok"
    )
    assert head.field_lines == b"date: x\r\nServer: s\r\nVary: a\r\n"
    assert (head.content_length, values, head.has_date) == (2, [b"close"], True)


def test_fields_written_otherwise_are_listed_without_their_whitespace() -> None:
    head, _, _ = _read(
        b"HTTP/1.1 200 OK\r\nA:b\r\nB:  c \t\r\nC: d\t\r\nD:\r\nE: \r\nF: f:g \r\n\r\n"
    )
    assert head.field_lines is None
    assert head.headers == [
        (b"A", b"b"),
        (b"B", b"c"),
        (b"C", b"d"),
        (b"D", b""),
        (b"E", b""),
        (b"F", b"f:g"),
    ]


@pytest.mark.parametrize(
    ("line", "reason"),
    [(b"HTTP/1.1 200", b""), (b"HTTP/1.1 200 ", b""), (b"HTTP/1.1 200 All \tgood", b"All \tgood")],
)
def test_the_reason_phrase_is_what_follows_the_code(line: bytes, reason: bytes) -> None:
    head, _, _ = _read(line + b"\r\n\r\n")
    assert (head.reason, head.field_lines) == (reason, b"")


def test_cr_and_lf_ahead_of_a_response_are_skipped_as_llhttp_skips_them() -> None:
    data = b"\r\n\n\rHTTP/1.0 204 No Content\r\nX: 1\r\n\r\n"
    head, _, end = _read(data, 204)
    assert (head.version, head.field_lines, end) == ("1.0", b"X: 1\r\n", len(data))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"RTSP/1.0 200 OK\r\n\r\n", "not an HTTP response"),  # llhttp takes these two
        (b"ICE/1.0 200 OK\r\n\r\n", "not an HTTP response"),
        (b"HTTP/2.0 200 OK\r\n\r\n", "HTTP/2.0 response"),
        (b"HTTP/0.9 200 OK\r\n\r\n", "HTTP/0.9 response"),
        (b"HTTP/1.1 201 OK\r\n\r\n", "not understood"),  # not the code llhttp read
        (b"HTTP/1.1 200 OK\r\nA: b\r\n", "not understood"),  # no end
    ],
)
def test_what_does_not_read_as_llhttp_said_is_refused(data: bytes, message: str) -> None:
    with pytest.raises(InvalidResponse, match=message):
        _read(data)


def test_a_head_with_too_many_fields_is_refused() -> None:
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_RESPONSE_FIELDS + 1))
    with pytest.raises(InvalidResponse, match="more than"):
        _read(b"HTTP/1.1 200 OK\r\n" + lines + b"Connection: close\r\n\r\n")
    # hop-by-hop and framing fields are not counted: they are dropped
    lines = b"".join(b"X-%d: v\r\n" % i for i in range(MAX_RESPONSE_FIELDS))
    head, _, _ = _read(b"HTTP/1.1 200 OK\r\n" + lines + b"Keep-Alive: 1\r\n" * 5 + b"\r\n")
    assert len(head.headers) == MAX_RESPONSE_FIELDS


def test_a_plugin_edits_a_head_kept_as_lines_like_any_other() -> None:
    head, _, _ = _read(b"HTTP/1.1 200 OK\r\nServer: s\r\nVary: a\r\n\r\n")
    assert head.header("server") == "s"  # (the list is made here)
    head.set_header("X-New", "1")
    head.remove_header("vary")
    assert head.headers == [(b"Server", b"s"), (b"X-New", b"1")]
    other, _, _ = _read(b"HTTP/1.1 200 OK\r\nServer: s\r\n\r\n")
    other.headers = [(b"A", b"b")]
    assert (other.field_lines, other.header("a"), other.header("server")) == (None, "b", None)


# --------------------------------------------------------------------- against llhttp's fields

_TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# names the connection treats apart (any letter case), and common ones
_NAMES = [
    "Date",
    "Server",
    "Content-Type",
    "Set-Cookie",
    "Keep-Alive",
    "Connection",
    "Upgrade",
    "X-Request-Id",
    "Trailer",
    "TE",
    "Proxy-Authenticate",
    "X-Hop",
]
_VALUE_BYTES = st.sampled_from([*b"abcXYZ019 \t:;,=/\"'()<>@[]{}?", 0x80, 0xE9, 0xFF])
_OWS = st.sampled_from([b"", b" ", b"\t", b"  ", b" \t "])


@st.composite
def _fields(draw: st.DrawFn) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """(name, before, value, after): a field line as `name:` + before + value + after."""
    n = draw(st.integers(0, 8))
    fields = []
    for _ in range(n):
        if draw(st.booleans()):
            name = draw(st.sampled_from(_NAMES))
            name = "".join(c.upper() if draw(st.booleans()) else c.lower() for c in name)
        else:
            name = draw(st.text(_TOKEN_CHARS, min_size=1, max_size=12))
        value = bytes(draw(st.lists(_VALUE_BYTES, max_size=20))).strip(b" \t")
        if name.lower() == "connection":
            value = draw(st.sampled_from([b"keep-alive", b"close", b"X-Hop", b"Keep-Alive, x-hop"]))
        elif name.lower() == "upgrade":
            value = b"websocket"
        fields.append((name.encode(), draw(_OWS), value, draw(_OWS)))
    return fields


class _Recorder:
    """httptools with every callback: the fields as llhttp reports them."""

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, bytes]] = []
        self.reason = b""

    def on_status(self, status: bytes) -> None:
        self.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name, value.rstrip(b" \t")))


_DROPPED = {
    b"connection",
    b"keep-alive",
    b"upgrade",
    b"x-request-id",
    b"trailer",
    b"te",
    b"proxy-authenticate",
    b"content-length",
}


@settings(max_examples=300, deadline=None)
@given(
    fields=_fields(),
    version=st.sampled_from([b"1.1", b"1.0"]),
    reason=st.sampled_from([b"", b" ", b" OK", b" Not \tFound \x80"]),
    leading=st.sampled_from([b"", b"\r\n", b"\n\r\n"]),
    interim=st.booleans(),
    cuts=st.lists(st.integers(0, 400), max_size=4),
)
async def test_a_head_reads_as_llhttps_own_fields_say_however_the_reads_fall(
    fields: list[tuple[bytes, bytes, bytes, bytes]],
    version: bytes,
    reason: bytes,
    leading: bytes,
    interim: bool,
    cuts: list[int],
) -> None:
    head_bytes = (
        leading
        + b"HTTP/%s 200%s\r\n" % (version, reason)
        + b"".join(b"%s:%s%s%s\r\n" % field for field in fields)
        + b"Content-Length: 2\r\n\r\n"
    )
    recorder = _Recorder()  # (every generated head is one llhttp accepts)
    httptools.HttpResponseParser(recorder).feed_data(head_bytes + b"ok")
    data = (b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" if interim else b"") + head_bytes
    data += b"ok"
    bounds = sorted({0, len(data), *(cut for cut in cuts if cut < len(data))})
    conn, _ = connection()
    listener = exchange(conn, *[data[a:b] for a, b in itertools.pairwise(bounds)])

    assert listener.lost == []
    [head] = listener.heads
    named = {
        token.strip().lower()
        for name, value in recorder.fields
        if name.lower() == b"connection"
        for token in value.split(b",")
    }
    expected = [
        (name, value)
        for name, value in recorder.fields
        if name.lower() not in _DROPPED and name.lower() not in named
    ]
    reference = ResponseHead()
    reference.status = 200
    reference.reason = recorder.reason
    reference.content_length = 2
    reference.headers = expected
    # what the client is sent, whether the fields were kept as lines or as a list
    assert client_head(head) == client_head(reference)
    assert head.headers == expected
    assert (head.reason, head.version, head.content_length) == (
        recorder.reason,
        version.decode(),
        2,
    )
    assert (listener.body, listener.done) == (b"ok", 1)
