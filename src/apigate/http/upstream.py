"""The upstream (service-facing) HTTP/1.1 client connection.

One `UpstreamConnection` carries one exchange at a time (HTTP/1.1 has no multiplexing). It parses
responses with httptools and hands the exchange a filtered head and the decoded body. Whether the
connection may go back to the pool is decided here, from what the response actually did: a
response that ended cleanly, said nothing against keep-alive, and whose request was fully sent.

Interim 1xx responses (102, 103) are handed to the exchange, which forwards them (RFC 9110
§15.2); a 100 is dropped (the gateway answers Expect itself and never forwards it); 101 switches
the connection to a byte tunnel.
A HEAD response's body length cannot be told to httptools (it has no "skip body" hook), so after
one we start a fresh parser for the next response instead of trusting the old one's state.

A response that ends is reported to the exchange (`on_response_done`, which may hand the
connection to the next request at once) only when the whole read it ended in has been parsed:
bytes after its end in that read (a "body" sent with a HEAD, 204 or 304 response, a second
response nobody asked for) then close the connection before anyone can reuse it, and never reach
the next exchange.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

import httptools
from mypy_extensions import mypyc_attr

from apigate.http.headers import connection_tokens, is_name
from apigate.http.output import Sender
from apigate.http.response_head import InvalidResponse, ResponseHead, read_head

if TYPE_CHECKING:
    from apigate.http.pool import Pool


# (a Final alias: compiled, a call reads a static, where the imported name was looked up in
# the module's dict at every call, ~130 instructions)
monotonic: Final = time.monotonic

# An upstream is untrusted too: its head is bounded like a client's (nginx: "upstream sent too
# big header"). httptools would otherwise accumulate an endless header line in memory.
MAX_RESPONSE_HEAD: Final = 64 * 1024  # the head, and (its own count) a trailer section
_BODY_IN_READ: Final = -1  # a read that is no trailer: see UpstreamConnection._bound_trailer


@mypyc_attr(allow_interpreted_subclasses=True)
class UpstreamListener:
    """The exchange side of an upstream connection: the proxy exchange and the aggregator's
    parts subclass it (so may tests). A base class, not a Protocol: compiled, the connection's
    calls on it (four per response) are then native calls, where calls on a Protocol-typed
    object are lookups by name."""

    def on_response_head(self, head: ResponseHead) -> None:
        raise NotImplementedError

    def on_response_body(self, chunk: bytes) -> None:
        raise NotImplementedError

    def on_response_done(self) -> None:
        raise NotImplementedError

    def on_interim_head(self, head: ResponseHead) -> None:
        """A 1xx response other than 100 and 101 (its head is filtered like a final one's).
        Dropped unless a subclass forwards it."""

    def on_upstream_lost(self, exc: Exception | None) -> None:
        raise NotImplementedError

    def on_upstream_timeout(self) -> None:
        raise NotImplementedError

    def on_upgraded(self, extra: bytes) -> None:
        raise NotImplementedError

    def on_tunnel_data(self, data: bytes) -> None:
        """Bytes from the upstream once the connection is a tunnel."""
        self.on_response_body(data)

    def on_tunnel_eof(self) -> bool:
        """The upstream half-closed a tunnel: True keeps the connection open for what the
        client still sends; False closes it (and the tunnel with it)."""
        return False

    def flush_head(self) -> None:
        raise NotImplementedError

    def upstream_write_paused(self) -> None:
        raise NotImplementedError

    def upstream_write_resumed(self) -> None:
        raise NotImplementedError


def _head_too_large() -> InvalidResponse:
    return InvalidResponse(f"response head larger than {MAX_RESPONSE_HEAD} bytes")


def _without_named(
    headers: list[tuple[bytes, bytes]], tokens: set[bytes]
) -> list[tuple[bytes, bytes]]:
    """`headers` without the hop-by-hop fields a Connection header named (RFC 9110 §7.6.1)."""
    named = tokens - {b"close", b"keep-alive", b"upgrade"}
    if not named:
        return headers
    return [(n, v) for n, v in headers if n.lower() not in named]


class UpstreamConnection(Sender):
    """A pooled keep-alive connection to one upstream instance. Its writes wait for the end
    of the loop's turn (Sender)."""

    def __init__(self, pool: Pool) -> None:
        super().__init__(pool.writes)
        self.pool = pool
        self.loop = pool.loop
        self.parser = httptools.HttpResponseParser(self)
        self._use_parser_methods()
        self.listener: UpstreamListener | None = None
        self.head: ResponseHead | None = None
        self.closed = False
        self.reusable = False
        self.requests = 0  # how many exchanges this connection has carried
        self.head_only = False  # the current request is HEAD: the response has no body
        self.got_bytes = False  # any byte of the current response arrived
        self._request_sent = False  # the whole request (head + body) was written
        self._write_blocked = False  # the upstream is not reading what we write (pause_writing)
        self._reading_paused = False  # we paused the transport's reading (client backpressure)
        self.tunnel = False
        self.upgrade: bytes | None = None
        self._head_bytes = 0
        self._connection_values: list[bytes] = []
        # A response ended in the read being parsed; its end is reported once the read is
        # parsed (see data_received), and any byte the parser meets until then is not asked for.
        self._ended_in_read = False
        # The parser reports no fields (the connection has no on_header): once it has
        # validated a head, read_head reads it from the bytes. Those are the read being
        # parsed, from `_cursor` (where the next response begins: 0, or the end of an interim
        # one), after `_head_parts`, the earlier reads of a head that spans reads.
        self._data = b""
        self._cursor = 0
        self._head_parts: list[bytes] = []
        self.read_at = 0.0  # monotonic time of the latest read (the exchange times itself by it)
        self._deadline = 0.0
        self._timeout = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._idle_deadline = 0.0

    # ------------------------------------------------------------------ transport events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:  # (the pool may have called it for a loop that never will: give_up)
            return
        self.closed = True
        self.reusable = False
        self.drop_held()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.pool.forget(self)
        listener, self.listener = self.listener, None
        if listener is None:
            return
        head = self.head
        self.read_at = monotonic()  # the end of the response, when EOF ends its body
        if head is not None and head.until_eof and not self.tunnel and exc is None:
            # EOF is how a length-less body ends; a reset (exc set) is not: the body may be
            # cut, and the client must see a truncated response, not a complete one.
            listener.on_response_done()
        else:
            listener.on_upstream_lost(exc)

    def data_received(self, data: bytes) -> None:
        listener = self.listener
        if self.tunnel:
            if listener is not None:
                listener.on_tunnel_data(data)
            return
        if listener is None:
            # Bytes on an idle connection: the upstream is confused; never reuse it.
            self.close()
            return
        self.got_bytes = True
        now = self.read_at = monotonic()
        if self._timeout:
            self._deadline = now + self._timeout
        self._ended_in_read = False
        self._data = data
        self._cursor = 0
        try:
            head = self.head
            big = len(data) + self._head_bytes > MAX_RESPONSE_HEAD
            if big and (head is None or not head.status):
                self._feed_bounded(data)  # (rare: a read that could complete too large a head)
            else:
                self._feed_data(data)
            self._data = b""  # (not kept alive by an idle connection)
            if not self._ended_in_read:
                head = self.head
                if head is None or not head.status:  # the head is still incomplete
                    self._head_bytes += len(data)
                    if self._head_bytes > MAX_RESPONSE_HEAD:
                        raise _head_too_large()
                    self._head_parts.append(data[self._cursor :] if self._cursor else data)
                elif head.chunked:
                    self._bound_trailer(len(data))
        # (each clause names its exception differently: compiled by mypyc, a name keeps the
        # type of its first binding)
        except InvalidResponse as invalid:
            self._invalid(invalid)
        except httptools.HttpParserUpgrade as upg:
            self._data = b""  # (the connection lives on as a tunnel)
            extra = data[upg.args[0] :]
            if self.head is not None and self.head.status == 101:
                self.tunnel = True
                self._deadline = 0.0
                listener.on_upgraded(extra)
            else:
                self.close()
        except httptools.HttpParserCallbackError as callback_error:
            cause = callback_error.__context__
            if isinstance(cause, InvalidResponse):
                self._invalid(cause)
                return
            if cause is not None:
                raise cause from None
            raise
        except httptools.HttpParserError as parse_error:
            self._invalid(InvalidResponse(f"malformed response: {parse_error}"))
        else:
            if self._ended_in_read:
                # Only now, with nothing of the read left to parse, may the exchange release
                # the connection (and the next request take it).
                self._finish(True)
            else:
                listener.flush_head()  # a head whose body has not arrived yet goes out now

    def _bound_trailer(self, size: int) -> None:
        """A read of a chunked body with no body bytes in it counts against the head's limit
        (`_head_bytes`, which on_body resets): after the last chunk, a trailer section. An
        upstream streaming one endless trailer field grew it without bound, at a cost
        quadratic in its length (httptools joins a field's pieces), every read renewing the
        response timeout: the event loop went to 100% and other services' requests took
        seconds."""
        if self._head_bytes < 0:  # body bytes came in this read
            self._head_bytes = 0
            return
        self._head_bytes += size
        if self._head_bytes > MAX_RESPONSE_HEAD:
            raise InvalidResponse(f"response trailer section larger than {MAX_RESPONSE_HEAD} bytes")

    def _feed_bounded(self, data: bytes) -> None:
        """Feed a read that may complete a head beyond MAX_RESPONSE_HEAD (a head that ends in
        the read it began in was once never measured): first the bytes the head may still
        take, then, once it is whole, the rest. (A 101 head is whole in the first part, where
        httptools stops at once, so HttpParserUpgrade offsets stay offsets into `data`.)

        Memoryviews, not slices: the rest is often the start of a large body, not worth a
        copy. (Only a read that could hold an oversized head comes here: never a plain
        response's, at most the first read of a large one.)"""
        room = MAX_RESPONSE_HEAD - self._head_bytes
        parser = self.parser  # (a HEAD response swaps in a new one; the rest goes to the old)
        view = memoryview(data)
        parser.feed_data(view[:room])
        head = self.head
        if not self._ended_in_read and (head is None or not head.status):
            raise _head_too_large()
        parser.feed_data(view[room:])

    def _invalid(self, exc: InvalidResponse) -> None:
        """Close; the exchange learns why. When its response had already ended in this read,
        the bytes at fault came after it: the response stands, the connection does not."""
        if self._ended_in_read:
            self.close()
            self._finish(False)
            return
        listener, self.listener = self.listener, None
        self.reusable = False
        self.close()
        if listener is not None:
            listener.on_upstream_lost(exc)

    def eof_received(self) -> bool | None:
        listener = self.listener
        if self.tunnel and listener is not None and listener.on_tunnel_eof():
            return True  # a half-closed tunnel: the client may still be sending
        return None  # close our side too; connection_lost decides what the EOF meant

    def pause_writing(self) -> None:
        self._write_blocked = True
        if self._timeout:  # the upstream stopped reading our request: time the stall from now
            self._deadline = monotonic() + self._timeout
        if self.listener is not None:
            self.listener.upstream_write_paused()

    def resume_writing(self) -> None:
        self._write_blocked = False
        if self.listener is not None:
            self.listener.upstream_write_resumed()

    @property
    def request_sent(self) -> bool:
        return self._request_sent

    @request_sent.setter
    def request_sent(self, value: bool) -> None:
        if value:
            self.mark_sent(monotonic() if self._timeout else 0.0)
        else:
            self._request_sent = False

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        if self._ended_in_read:
            # More bytes after a whole response, unasked for: whatever they are, they must not
            # become the answer to the next request sent on this connection (which would take
            # it as soon as the response's end is reported): the connection closes instead.
            raise InvalidResponse("bytes after the end of a response")
        self.head = ResponseHead()
        if self._connection_values:  # (emptied, not replaced: nothing keeps it)
            self._connection_values.clear()

    def on_headers_complete(self) -> None:
        head = self.head
        assert head is not None
        status = self._status_code()
        data = self._data
        parts = self._head_parts
        if parts:  # (rare: a head that spans reads)
            parts.append(data)
            buf = b"".join(parts)
            parts.clear()
            end = read_head(head, buf, 0, status, self._connection_values)
            self._cursor = end - (len(buf) - len(data))
        else:
            self._cursor = read_head(head, data, self._cursor, status, self._connection_values)
        if status < 200 or status > 599:  # (one test for the usual statuses)
            if status < 100 or status > 599:
                # RFC 9110 §15: a status code is 100-599. llhttp takes any 3 digits ("099",
                # "000", "999"), which the client would get as an invalid status line.
                raise InvalidResponse(f"status code {status} outside 100-599")
            if status != 101:
                if head.content_length or head.chunked:
                    # RFC 9110 §15.2: a 1xx ends with its head. llhttp reads a body for one
                    # that frames one (a 150 with a Content-Length), which went to the client
                    # unframed: a whole response of the upstream's making ahead of the real
                    # one, answering the client's next request (another service's).
                    raise InvalidResponse(f"interim response {status} with a body")
                listener = self.listener
                if status != 100 and listener is not None:
                    head.status = status
                    if self._connection_values:
                        tokens = connection_tokens(self._connection_values)
                        head.headers = _without_named(head.headers, tokens)
                    listener.on_interim_head(head)
                self.head = None  # interim response: wait for the final one
                return
            if self.upgrade is None:
                # a tunnel the client did not ask for would desynchronise its connection
                raise InvalidResponse("101 Switching Protocols without an upgrade request")
            if not _switches_to_offered(self.upgrade, head.upgrade):
                raise InvalidResponse(
                    f"101 Switching Protocols to {head.upgrade!r}, not offered "
                    f"(Upgrade: {self.upgrade[:80]!r})"
                )
        head.status = status
        keep_alive = head.version == "1.1"
        values = self._connection_values
        # (is_name: a token compares as a field name does, and values[0].lower() was a
        # generic call, ~350 instructions)
        if values and len(values) == 1 and is_name(values[0], b"keep-alive"):
            keep_alive = True  # what most upstreams send on every response: skip the parsing
        elif values:
            tokens = connection_tokens(values)
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
            head.headers = _without_named(head.headers, tokens)
        no_body = self.head_only or status in (204, 304) or status == 101
        if not no_body and head.content_length is None and not head.chunked:
            head.until_eof = True
            keep_alive = False
        head.keep_alive = keep_alive
        # the head is measured: from here on the count is a trailer section's, and this read
        # (the head's own bytes) is none (see _bound_trailer)
        self._head_bytes = _BODY_IN_READ
        if status != 101:
            head.upgrade = None
        listener = self.listener
        if listener is not None:
            listener.on_response_head(head)
        if self.head_only and status != 101:
            # httptools cannot be told that a HEAD response has no body: the response ends
            # here, and the next one gets a fresh parser. The old one goes on parsing this
            # read: a "body" it finds there is not one (on_body).
            self.parser = httptools.HttpResponseParser(self)
            self._use_parser_methods()
            self._ended_in_read = True

    def _use_parser_methods(self) -> None:
        """Bind the parser's per-response methods once: called on a parser (a Cython object)
        from compiled code, a method is looked up by name at every call."""
        self._feed_data: Callable[[bytes], None] = self.parser.feed_data
        self._status_code: Callable[[], int] = self.parser.get_status_code

    def on_body(self, body: bytes) -> None:
        if self._ended_in_read or self.head is None:
            # Bytes after a HEAD response, in the read its head came in, or in an interim
            # response: the framing is not what we think. They must reach no client, and the
            # connection no next request.
            raise InvalidResponse("body bytes after a response that has none")
        self._head_bytes = _BODY_IN_READ  # (a read with body bytes: no trailer, _bound_trailer)
        listener = self.listener
        if listener is not None:
            listener.on_response_body(body)

    def on_message_complete(self) -> None:
        head = self.head
        if head is None:  # end of an interim 1xx response
            return
        if head.status == 101:
            return
        self._ended_in_read = True  # reported at the end of the read (data_received)

    def _finish(self, clean: bool) -> None:
        """The response ended: the exchange is done with the connection, which may be reused
        if it was `clean` (nothing unasked for came after), kept alive and the request sent."""
        head = self.head
        self.reusable = (
            clean and bool(head and head.keep_alive and self.request_sent) and not self.closed
        )
        self._deadline = 0.0
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.on_response_done()

    # ------------------------------------------------------------------ used by the exchange
    def begin(
        self,
        listener: UpstreamListener,
        head_only: bool,
        response_timeout: float,
        upgrade: bytes | None = None,
        now: float = 0.0,
    ) -> None:
        """Attach an exchange before its request head is written. `response_timeout` 0: no
        timer of the connection's own (the caller keeps a deadline of its own)."""
        self.listener = listener
        self.head = None
        self.head_only = head_only
        self.upgrade = upgrade  # the request's Upgrade offer: a 101 may switch to one of it
        self._head_bytes = 0
        self._head_parts.clear()
        self.got_bytes = False
        self.request_sent = False
        self.reusable = False
        self.requests += 1
        self._timeout = response_timeout
        self._set_deadline(response_timeout, now)

    def mark_sent(self, now: float) -> None:
        """The whole request is written (`now`: the monotonic time, which the caller has read):
        the response timeout counts from here."""
        self._request_sent = True
        if self._timeout:
            self._deadline = now + self._timeout

    def detach(self) -> None:
        self.listener = None

    def write_eof(self) -> None:
        """Half-close (a tunnel whose client half-closed)."""
        t = self.transport
        if t is not None and not self.closed and t.can_write_eof():
            self.send_last()
            t.write_eof()
        else:
            self.close()

    def pause_reading(self) -> None:
        if self.transport is not None and not self.closed:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        # (the pool resumes every connection it gets back, nearly always unpaused: a call
        # into the transport each time cost ~600 instructions per request)
        if self._reading_paused and self.transport is not None and not self.closed:
            self._reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        self.reusable = False
        t = self.transport
        if t is not None and not t.is_closing():
            self.send_last()
            t.close()

    def abort(self) -> None:
        self.reusable = False
        self.drop_held()
        if self.transport is not None:
            self.transport.abort()

    # ------------------------------------------------------------------ timeouts
    def set_idle(self, idle_timeout: float) -> None:
        """Parked in the pool: close if nobody needs it for `idle_timeout` seconds (from its
        latest read, which is when its response ended: no clock reading of its own)."""
        self._timeout = 0.0
        self._set_deadline(idle_timeout, self.read_at)

    def _set_deadline(self, seconds: float, now: float = 0.0) -> None:
        """Deadline `seconds` from `now` (monotonic time, read here when the caller has none)."""
        if seconds <= 0:
            self._deadline = 0.0
            return
        self._deadline = (now or monotonic()) + seconds
        if self._timer is None or self._timer_at > self._deadline:
            if self._timer is not None:
                self._timer.cancel()
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.closed or not self._deadline:
            return
        now = monotonic()
        if (
            now >= self._deadline
            and self._timeout
            and (
                (not self._request_sent and not self._write_blocked and not self.got_bytes)
                or self._reading_paused
            )
        ):
            # The wait is the client's, not the upstream's: the request body is still coming
            # and the upstream keeps up with it (body_timeout governs the client: the response
            # timeout once ran from the request head, so an upload longer than
            # `timeouts.response` got a 504 half-way), or we stopped reading because the
            # client does not read the response (send_timeout governs that: a slow reader was
            # cut at `timeouts.response` and the healthy instance blamed, even ejected).
            self._deadline = now + self._timeout
        if now < self._deadline:
            self._timer_at = self._deadline
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        listener, self.listener = self.listener, None
        self.abort()
        if listener is not None and not self.tunnel:
            listener.on_upstream_timeout()

    def __repr__(self) -> str:
        state = "busy" if self.listener is not None else "idle"
        return f"<UpstreamConnection {self.pool.key} {state} requests={self.requests}>"


def _switches_to_offered(offered: bytes, answered: bytes | None) -> bool:
    """RFC 9110 §7.8: a 101 names the protocols it switches to (at least one), and a server
    "MUST NOT switch to a protocol that was not indicated by the client". Names compare
    case-insensitively; an offer without a version admits any version of that protocol."""
    if not answered:
        return False
    offers = {token.strip().lower() for token in offered.split(b",")}
    named = False
    for token in answered.split(b","):
        protocol = token.strip().lower()
        if not protocol:
            continue
        if protocol not in offers and protocol.split(b"/", 1)[0] not in offers:
            return False
        named = True
    return named
