"""An upstream response's head, read from the bytes llhttp has validated.

The upstream connection's parser reports no header fields one by one: httptools calls a Python
callback per field with two new bytes objects (~2,000 instructions a field in all, with the
tuple kept for it and the line rebuilt for the client: five fields were ~15% of a proxied
request's instructions). Once llhttp has accepted a whole head (strictly: CRLF line ends, no
obs-fold, no whitespace before a colon, no control bytes in values, no bare CR or LF; see
tests/unit/test_response_head.py), `read_head` takes what the connection needs straight from
its bytes, and keeps the end-to-end field lines as they came, when they are written as the
gateway writes fields ("Name: value"), to be forwarded in one piece.

`ResponseHead.headers`, the (name, value) list plugins read and edit, is made from those lines
the first time something asks for it, and from then on is what the client is sent.

Whatever does not read as llhttp has said it is, is refused (502): this reader never guesses.
"""

from __future__ import annotations

from typing import Final

from mypy_extensions import i64

from apigate.http.headers import (
    HOP_BY_HOP,
    FieldKinds,
    HeaderList,
    parse_length,
)

# A head's fields are counted as well as its bytes (upstream.MAX_RESPONSE_HEAD): 10,000 of them
# fit in 50 KB, each one a field the client was sent and every plugin scanned (Envoy's upstream
# max_headers_count is 100). Twice the client side's default (limits.max_headers), as the bytes
# are; fixed, so set where no sane upstream comes.
MAX_RESPONSE_FIELDS: Final = 200

_CR: Final = 13
_LF: Final = 10
_SP: Final = 32
_HT: Final = 9
_COLON: Final = 58

_R_KEEP: Final = 0  # an end-to-end field, forwarded
_R_CONTENT_LENGTH: Final = 1
_R_TRANSFER_ENCODING: Final = 2
_R_CONNECTION: Final = 3
_R_UPGRADE: Final = 4
_R_DROP: Final = 5
_R_DATE: Final = 6  # forwarded, and the gateway then writes no Date of its own
# Every hop-by-hop name (headers.HOP_BY_HOP, the one list) is dropped; the ones the connection
# interprets override that below.
_RESPONSE_SPECIAL_NAMES: Final[dict[bytes, int]] = {
    **dict.fromkeys(HOP_BY_HOP, _R_DROP),
    b"content-length": _R_CONTENT_LENGTH,
    b"transfer-encoding": _R_TRANSFER_ENCODING,
    b"connection": _R_CONNECTION,
    b"upgrade": _R_UPGRADE,
    # the gateway writes its own X-Request-Id (the one it sent upstream); an upstream that
    # echoes it back would otherwise give the client two
    b"x-request-id": _R_DROP,
    b"date": _R_DATE,
}
_RESPONSE_SPECIAL: Final = FieldKinds(_RESPONSE_SPECIAL_NAMES)


class InvalidResponse(Exception):
    """The upstream's response cannot be proxied faithfully (the exchange answers 502).

    (An Exception, not a ConnectionError: mypyc cannot compile subclasses of OSError.)"""


class ResponseHead(HeaderList):
    """A parsed upstream response head; plugins may edit `headers` before it is written."""

    __slots__ = (
        "_headers",
        "chunked",
        "content_length",
        "field_lines",
        "has_date",
        "keep_alive",
        "reason",
        "status",
        "until_eof",
        "upgrade",
        "version",
    )

    def __init__(self) -> None:
        self.status = 0
        self.reason = b""
        self.version = "1.1"
        # The end-to-end fields: either this list, or (`_headers` None) `field_lines`, the
        # upstream's own lines, "Name: value\r\n" each, until `headers` is asked for.
        self._headers: list[tuple[bytes, bytes]] | None = []
        self.field_lines: bytes | None = None
        self.has_date = False  # field_lines hold a Date field
        self.content_length: int | None = None
        self.chunked = False
        self.until_eof = False  # no length: the body ends when the upstream closes
        self.keep_alive = True
        self.upgrade: bytes | None = None

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        """The end-to-end fields in the upstream's order (made from `field_lines` once)."""
        headers = self._headers
        if headers is None:
            headers = self._headers = _fields_of_lines(self.field_lines or b"")
            self.field_lines = None
        return headers

    @headers.setter
    def headers(self, value: list[tuple[bytes, bytes]]) -> None:
        self._headers = value
        self.field_lines = None

    def keep_lines(self, lines: bytes) -> None:
        """The end-to-end fields are `lines`, each "Name: value\r\n" (see read_head)."""
        self._headers = None
        self.field_lines = lines

    def _field_list(self) -> list[tuple[bytes, bytes]]:
        return self.headers


def _fields_of_lines(lines: bytes) -> list[tuple[bytes, bytes]]:
    """Field lines (each ending in CRLF, as read_head has read them) as (name, value) pairs,
    without the whitespace around each value."""
    fields = []
    for line in lines.split(b"\r\n")[:-1]:
        name, _, value = line.partition(b":")
        fields.append((name, value.strip(b" \t")))
    return fields


def read_head(
    head: ResponseHead, buf: bytes, start: i64, status: int, connection_values: list[bytes]
) -> i64:
    """Read the response head that begins at `buf[start:]` (CR and LF bytes ahead of it
    aside, which llhttp skips too), whose end llhttp has just reported, into `head`: version,
    reason, fields, framing; the values of its Connection fields go to `connection_values`.
    `status` is the code llhttp read. Returns the index just past the head's end.

    Byte by byte, with unboxed indices (~10 instructions a byte, compiled): a bytes.find call
    costs ~1,300 instructions (its arguments are parsed as a tuple), more than a whole line's
    loop."""
    n: i64 = len(buf)
    while start < n and (buf[start] == _CR or buf[start] == _LF):
        start += 1
    if n - start < 16:  # "HTTP/1.1 200\r\n\r\n", the shortest head
        raise _not_understood()
    version = _status_line_version(buf, start, status)
    head.version = version
    # "HTTP/1.1 200" is 12 bytes; a reason phrase follows a space, and may be empty
    line_end = start + 12
    while line_end < n and buf[line_end] != _CR:
        line_end += 1
    head.reason = buf[start + 13 : line_end] if line_end > start + 13 else b""
    return _read_fields(head, buf, line_end + 2, version == "1.0", connection_values)


def _not_understood() -> InvalidResponse:
    """What is said of a head that does not read as llhttp has said it is (never seen)."""
    return InvalidResponse("response head not understood")


def _status_line_version(buf: bytes, start: i64, status: int) -> str:
    """The version of the status line at `buf[start:]` ("1.1" or "1.0"), which must say
    `status`: llhttp also takes "RTSP/" and "ICE/" lines, and any digit for a version."""
    if not (
        buf[start] == 72  # H
        and buf[start + 1] == 84  # T
        and buf[start + 2] == 84  # T
        and buf[start + 3] == 80  # P
        and buf[start + 4] == 47  # /
    ):
        raise InvalidResponse(f"not an HTTP response: {buf[start : start + 12]!r}")
    major = buf[start + 5]
    minor = buf[start + 7]
    if major != 49 or (minor != 49 and minor != 48):
        # llhttp takes any one-digit version ("HTTP/2.0 200", "HTTP/0.9 200"), which went to
        # the client as an HTTP/1.1 200: an HTTP/1.x connection speaks 1.x
        raise InvalidResponse(f"HTTP/{chr(major)}.{chr(minor)} response on an HTTP/1.1 connection")
    code = (buf[start + 9] - 48) * 100 + (buf[start + 10] - 48) * 10 + (buf[start + 11] - 48)
    if buf[start + 8] != _SP or code != status:
        raise _not_understood()
    return "1.1" if minor == 49 else "1.0"


def _read_fields(
    head: ResponseHead,
    buf: bytes,
    pos: i64,
    http10: bool,
    connection_values: list[bytes],
) -> i64:
    """The field lines from `buf[pos:]` to the empty line that ends the head, into `head`;
    returns the index past that line. The end-to-end fields are kept as runs of their lines
    (one run for most responses, whose framing fields come last), unless one is written
    otherwise than "Name: value" (no space after the colon, or more, or whitespace after the
    value): then as the `headers` list, so that the client gets what it always got."""
    n: i64 = len(buf)
    runs: list[bytes] = []
    run_start = pos
    kept = 0
    as_written = True
    while pos < n and buf[pos] != _CR:
        colon = pos
        while colon < n and buf[colon] != _COLON and buf[colon] != _CR:
            colon += 1
        line_end = colon
        while line_end < n and buf[line_end] != _CR:
            line_end += 1
        if colon == pos or line_end >= n or buf[colon] != _COLON:
            raise _not_understood()
        kind = _RESPONSE_SPECIAL.kind_at(buf, pos, colon)
        if kind in (_R_KEEP, _R_DATE):
            kept += 1
            if kind == _R_DATE:
                head.has_date = True
            if as_written and not _as_written(buf, colon, line_end):
                as_written = False
        else:
            if run_start < pos:
                runs.append(buf[run_start:pos])
            run_start = line_end + 2
            _special(head, kind, _value(buf, colon + 1, line_end), http10, connection_values)
        pos = line_end + 2  # (llhttp has seen the LF after each CR)
    if pos + 1 >= n:
        raise _not_understood()
    if kept > MAX_RESPONSE_FIELDS:
        # (counted once per head, not per field: the fields the head keeps; those dropped
        # as they come, hop-by-hop and framing, cost no more than the byte limit allows)
        raise InvalidResponse(f"response head with more than {MAX_RESPONSE_FIELDS} header fields")
    if run_start < pos:
        runs.append(buf[run_start:pos])
    lines = runs[0] if len(runs) == 1 else b"".join(runs)
    if as_written:
        head.keep_lines(lines)
    else:
        head.headers = _fields_of_lines(lines)  # (rare)
    return pos + 2


def _as_written(buf: bytes, colon: i64, line_end: i64) -> bool:
    """Whether the field whose colon and line end are at these indices reads "Name: value":
    one space after the colon, none after the value (an empty value: "Name: ")."""
    if buf[colon + 1] != _SP:
        return False
    if colon + 2 == line_end:
        return True
    first = buf[colon + 2]
    last = buf[line_end - 1]
    return first != _SP and first != _HT and last != _SP and last != _HT


def _value(buf: bytes, at: i64, line_end: i64) -> bytes:
    """The value between `at` and `line_end`, without the whitespace around it (llhttp has
    skipped it before the value, but reports it after)."""
    while at < line_end and (buf[at] == _SP or buf[at] == _HT):
        at += 1
    while line_end > at and (buf[line_end - 1] == _SP or buf[line_end - 1] == _HT):
        line_end -= 1
    return buf[at:line_end]


def _special(
    head: ResponseHead, kind: int, value: bytes, http10: bool, connection_values: list[bytes]
) -> None:
    """What a field the connection interprets says (a hop-by-hop one, dropped: nothing)."""
    if kind == _R_CONTENT_LENGTH:
        head.content_length = parse_length(value)
    elif kind == _R_TRANSFER_ENCODING:
        # Only "chunked" can be proxied: we decode it and re-frame the body. Any other
        # coding ("gzip, chunked") would reach the client decoded of its chunking but still
        # compressed, with nothing saying so (it once did); "identity" is obsolete.
        if head.chunked or value.lower() != b"chunked":
            raise InvalidResponse(f"unsupported Transfer-Encoding {value[:40]!r}")
        head.chunked = True
        if http10:
            # RFC 9112 §6.1: Transfer-Encoding in an HTTP/1.0 message means its framing is
            # faulty: the message is still read (as chunked), but the connection must close
            # after it. Said as a "close" token, the one keep-alive decision weighs it.
            connection_values.append(b"close")
    elif kind == _R_CONNECTION:
        connection_values.append(value)
    elif kind == _R_UPGRADE:
        head.upgrade = value
