"""Serialising the two heads a proxied exchange writes: upstream request and client response.

Both are built as one bytes object (one write per head). The forwarding headers follow the usual
gateway convention (nginx, Kong, Envoy): the client's X-Forwarded-* are replaced unless the peer
is a trusted proxy, in which case X-Forwarded-For is extended. RFC 7239 `Forwarded` is emitted
alongside for upstreams that read the standard header. An identified consumer is named as
Kong's auth plugins name it (`consumer_lines`).
"""

from __future__ import annotations

from typing import Any, Final

from apigate.http.date import DATE
from apigate.http.headers import VIA_LINE, content_length_line, forwarding_lines, is_name
from apigate.http.request import Request
from apigate.http.response_head import ResponseHead
from apigate.http.status import status_line

_CHUNKED: Final = b"Transfer-Encoding: chunked\r\n"
_CONN_CLOSE: Final = b"Connection: close\r\n"
_CONN_KEEP_ALIVE: Final = b"Connection: keep-alive\r\n"


def request_head(
    req: Request,
    method: bytes,
    path: str,
    host_header: bytes,
    *,
    chunked: bool,
    content_length: int | None,
    extra: bytes = b"",
) -> bytes:
    """The head of the request sent upstream (HTTP/1.1, keep-alive). `extra`: the trace
    context and whatever else the exchange adds, as ready header lines.

    One build of its pieces (compiled: lengths added, one allocation, copies), where a list
    of them joined cost an append each and a buffer request per piece in the join."""
    target = path.encode("ascii")
    if len(req.query):  # (len(): compiled, a bytes object's truth is a generic call)
        target += b"?" + req.query
    if chunked:
        framing = _CHUNKED
    elif content_length is not None:
        framing = content_length_line(content_length)
    else:
        framing = b""
    if req.upgrade is not None:
        framing += b"Connection: upgrade\r\nUpgrade: %s\r\n" % (req.upgrade,)
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%s%s%s%s%s\r\n" % (
        method,
        target,
        host_header,
        field_lines(req.headers),
        req.forwarding
        if len(req.forwarding)
        else forwarding_lines(req.client_ip, req.forwarded_for, req.scheme, req.host),
        req.id_and_via(),
        extra,
        framing,
    )


def field_lines(fields: list[tuple[bytes, bytes]]) -> bytes:
    """`fields` as header field lines."""
    if not fields:
        return b""
    return b"".join([b"%s: %s\r\n" % (name, value) for name, value in fields])


def consumer_lines(consumer: Any) -> bytes:
    """The identity of the consumer an auth plugin found, for the upstream request head, in
    Kong's names: X-Consumer-ID and X-Consumer-Username (both its `name`: apigate's consumers
    have no separate id, and the name is what is unique in the file), X-Consumer-Custom-ID
    (when it has one), X-Consumer-Groups (comma-separated, when it has some). A client's own
    were dropped (headers.IDENTITY). A value no field may carry (a control character) is left
    out rather than sent. The built-in auth plugins make these lines once per consumer, when
    they are built (apigate.plugins.identity.Identity); this is also the fallback for a
    plugin of one's own that only sets `ctx.consumer`."""
    lines = b""
    name = getattr(consumer, "name", None)
    if isinstance(name, str) and field_safe(name):
        value = name.encode()
        lines += b"X-Consumer-ID: " + value + b"\r\n"
        lines += b"X-Consumer-Username: " + value + b"\r\n"
    custom_id = getattr(consumer, "custom_id", None)
    if isinstance(custom_id, str) and custom_id and field_safe(custom_id):
        lines += b"X-Consumer-Custom-ID: " + custom_id.encode() + b"\r\n"
    groups = getattr(consumer, "groups", None)
    if groups:
        joined = ", ".join(str(group) for group in groups)
        if field_safe(joined):
            lines += b"X-Consumer-Groups: " + joined.encode() + b"\r\n"
    return lines


def field_safe(value: str) -> bool:
    """Whether `value` may be a header field value as it is (printable ASCII)."""
    return value.isascii() and value.isprintable()


def response_head(
    head: ResponseHead,
    req: Request,
    *,
    chunk_out: bool,
    keep_alive: bool,
) -> bytes:
    """The head of the response sent to the client; framing decided by the caller. One build
    of its pieces, as request_head's."""
    fields = head.field_lines
    if fields is not None:  # the upstream's lines, as it wrote them (see read_head)
        date = b"" if head.has_date else DATE.value
    else:
        date = DATE.value
        lines = []
        for name, value in head.headers:
            lines.append(b"%s: %s\r\n" % (name, value))
            if len(name) == 4 and is_name(name, b"date"):
                date = b""  # the upstream's own
        fields = b"".join(lines)
    status = head.status
    if status == 101:
        framing = b"Connection: upgrade\r\nUpgrade: %s\r\n" % (head.upgrade or b"",)
    else:
        if chunk_out:
            framing = _CHUNKED
        elif (
            head.content_length is not None
            and status != 204
            and not (status == 304 and head.content_length == 0)
        ):
            framing = content_length_line(head.content_length)
        else:
            framing = b""
        if not keep_alive:
            framing += _CONN_CLOSE
        elif req.version == "1.0":
            framing += _CONN_KEEP_ALIVE
    # Via in responses too, after the upstream's own Via lines
    return b"%s%s%s%s%s\r\n" % (
        status_line(status, head.reason),
        fields,
        date,
        req.id_and_via(),
        framing,
    )


def interim_head(head: ResponseHead) -> bytes:
    """A 1xx response forwarded to the client as the upstream sent it, less its hop-by-hop
    fields (no framing: a 1xx has no body)."""
    return b"%s%s%s\r\n" % (
        status_line(head.status, head.reason),
        field_lines(head.headers),
        VIA_LINE,
    )
