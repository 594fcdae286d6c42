"""A small HTTP/1.1 server for the admin API (not the hot path: clarity over speed).

Requests are read whole, answered one at a time and in order by an async handler, with
keep-alive. Parsing is httptools, as on the proxy listener, so malformed input gets a 400 here too.

Theory of operation
-------------------
Everything below runs before the admin token is checked, and README documents exposing the
listener (with a token), so the admin listener is bounded as the proxy bounds its clients
(`apigate.http.protocol`), with fixed limits: the module constants below, which tests patch.
Without them one endless header line grew the gateway from 55 to 310 MiB and froze its event
loop (httptools joins a partial line to each read: quadratic), and silent connections stayed
open for ever. The phases describe the *reading* side, as on the proxy:

    IDLE  --first byte-->  HEAD  --head read-->  BODY  --message complete-->  IDLE

and each has its bound:

    IDLE   closed quietly after IDLE_TIMEOUT (a new connection: after HEAD_TIMEOUT)
    HEAD   408 after HEAD_TIMEOUT from its first byte; 414 over MAX_URL; 431 over MAX_HEAD
    BODY   408 after BODY_TIMEOUT without body bytes; 413 over MAX_BODY (a declared length: at
           once); 431 when a chunked body's trailer section is over MAX_HEAD

A refusal moves to CLOSED: nothing more is parsed, the error is answered after the responses
owed to earlier pipelined requests, then the connection closes lingering. Complete requests wait
for the worker (`_serve`) in `_queue`; once MAX_PIPELINED wait, reading pauses (no deadline runs
while we hold the client back), and one more that came in the same read is refused (503). The
idle deadline runs only while no request waits or is being answered. Beyond MAX_CONNECTIONS open
connections a new one is answered 503 and closed.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote

import httptools

from apigate.http.date import DATE
from apigate.http.status import status_line

log = logging.getLogger("apigate.admin")

MAX_BODY = 1024 * 1024  # a whole config (POST /config) is the largest admin body
# the request target and every field line, as the proxy's default `limits.max_header_bytes`;
# a browser's cookies for the host are the largest part of a normal admin head
MAX_HEAD = 32 * 1024
MAX_URL = 8 * 1024  # as the proxy's default `limits.max_url_bytes`: admin paths are short
HEAD_TIMEOUT = 10.0  # first byte to blank line (the proxy's header_timeout); also how long a
# new connection may stay silent (a browser reopens a spare connection that was closed)
BODY_TIMEOUT = 30.0  # between two reads of a request body (the proxy's body_timeout)
IDLE_TIMEOUT = 60.0  # keep-alive between requests: well above the dashboard's poll interval
MAX_CONNECTIONS = 256  # open admin connections: a dashboard or two, scrapers, registrations
MAX_PIPELINED = 16  # complete requests waiting behind the one being answered, per connection
LINGER_SECONDS = 2.0  # how long a refused client's further input is read and discarded
_TRAILER_SLACK = 1024  # over MAX_HEAD, for the chunk framing that shares the trailer's reads


@dataclass
class AdminRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    client_ip: str
    params: dict[str, str] = field(default_factory=dict)
    # the path as sent, still percent-encoded: names in it are decoded segment by segment,
    # so that `/consumers/a%2Fb` names the consumer "a/b" (empty: `path` has no escapes)
    raw_path: str = ""

    def json(self) -> Any:
        """The body as JSON; raises AdminError(400) with the reason when it is not."""
        if not self.body:
            raise AdminError(400, "invalid_json", "a JSON body is required")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdminError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
        except RecursionError:  # json.loads recurses per level: `[` * 5000
            raise AdminError(400, "invalid_json", "body is nested too deeply") from None


@dataclass
class AdminResponse:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class AdminError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> AdminResponse:
    body = json.dumps(doc, indent=2, default=str).encode()
    return AdminResponse(status, body, "application/json", headers or {})


def error_response(err: AdminError) -> AdminResponse:
    return json_response({"error": err.code, "message": err.message}, err.status, err.headers)


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]
# what the worker takes from a connection's queue: a request, a refusal to answer and close
# on, or None: no more requests (the connection was lost, or nothing after an upgrade is read)
_Item = AdminRequest | AdminError | None


class Phase(enum.Enum):
    """What the connection is reading (answering is the worker's, apart from this)."""

    IDLE = "idle"  # between requests: the next one has not begun
    HEAD = "head"  # a request line and its field lines
    BODY = "body"  # a request body
    CLOSED = "closed"  # refused, or closing: what still arrives is discarded


class AdminConnection(asyncio.Protocol):
    """One admin client connection; `connections` is the listener's set of open ones."""

    def __init__(self, handler: Handler, connections: set[AdminConnection]) -> None:
        self.handler = handler
        self.connections = connections
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self.phase = Phase.IDLE
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[_Item] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False  # by us: MAX_PIPELINED requests wait, or a refusal is pending
        self._feeding = 0  # size of the read being parsed (see _bound_unparsed)
        self._unparsed = 0
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._head_size = 0

    # ------------------------------------------------------------------ connection events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else ""
        if len(self.connections) >= MAX_CONNECTIONS:
            # answered rather than refused silently, so that a client can tell why (the proxy
            # listener does the same beyond `limits.max_connections`)
            self.phase = Phase.CLOSED
            err = AdminError(503, "too_many_connections", "too many admin connections are open")
            self._write(error_response(err), head_only=False, close=True)
            self.transport.close()
            return
        self.connections.add(self)
        self._loop = asyncio.get_running_loop()
        self._worker = self._loop.create_task(self._serve())
        self._arm(HEAD_TIMEOUT, self._idle_timed_out)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        self.connections.discard(self)
        self._disarm()
        self.transport = None
        self._queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        if self.phase is Phase.CLOSED:
            return  # refused: discard what the client still sends (see _close_lingering)
        self._feeding = len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if not isinstance(cause, AdminError):
                raise
            self._refuse(cause)
        except httptools.HttpParserUpgrade:
            # llhttp stops after an upgrade request's head (skipping any body of it): nothing
            # after it can be framed, so the requests read are answered and the connection
            # closes. (This used to escape data_received: a "fatal error" and an abrupt close.)
            self._stop_reading(None)
        except httptools.HttpParserError as exc:
            self._refuse(AdminError(400, "bad_request", f"malformed request: {exc}"))
        else:
            if self.phase is Phase.HEAD or self.phase is Phase.BODY:
                self._bound_unparsed(len(data))
        finally:
            self._feeding = 0

    def _bound_unparsed(self, size: int) -> None:
        """Backstop for a field line that never ends, as the proxy's _bound_unread.

        httptools keeps a partial field line itself, joining each read to it (`+=`: the
        copying grows with the square of the line), and calls on_header only once the line is
        whole: on_header cannot bound it. So count the whole reads that end inside a head, or
        inside a body without carrying any of its bytes (chunk framing, the trailer section).
        The read a message began in, the one its head ended in and any read with body bytes
        count 0 (on_message_begin, on_headers_complete and on_body set the count to minus
        their size), so what is counted is all head or trailer bytes: a head within MAX_HEAD
        is never refused, and one endless line is cut after at most two reads (a read is at
        most 256 KiB, asyncio's and uvloop's buffer)."""
        self._unparsed += size
        in_head = self.phase is Phase.HEAD
        if self._unparsed > (MAX_HEAD if in_head else MAX_HEAD + _TRAILER_SLACK):
            section = "head" if in_head else "trailer section"
            self._refuse(
                AdminError(
                    431, "header_fields_too_large", f"request {section} over {MAX_HEAD} bytes"
                )
            )

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        self.phase = Phase.HEAD
        self._unparsed = -self._feeding  # data_received adds this read back: counts 0
        self._url = b""
        self._headers = {}
        self._body = bytearray()
        self._head_size = 0
        self._time_reading()

    def on_url(self, url: bytes) -> None:
        # (llhttp passes the target in pieces, one per read: joined here, within MAX_URL)
        self._url += url
        if len(self._url) > MAX_URL:
            raise AdminError(414, "uri_too_long", f"request target over {MAX_URL} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        # a chunked body's trailer fields count against the head's limit, and are dropped
        # (they were once taken as header fields, overriding the head's)
        self._head_size += len(name) + len(value) + 4  # ": " and CRLF
        if len(self._url) + self._head_size > MAX_HEAD:
            raise _head_too_large()
        if self.phase is Phase.HEAD:
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.phase = Phase.BODY
        self._unparsed = -self._feeding  # (the head's last read is no trailer: _bound_unparsed)
        length = self._headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            raise _body_too_large()  # before reading any of it
        self._time_reading()

    def on_body(self, body: bytes) -> None:
        self._unparsed = -self._feeding  # a read with body bytes is no trailer (_bound_unparsed)
        if len(self._body) + len(body) > MAX_BODY:
            raise _body_too_large()
        self._body += body
        self._time_reading()

    def on_message_complete(self) -> None:
        self.phase = Phase.IDLE
        self._disarm()  # (the worker starts the idle deadline once it has answered)
        if self._queue.qsize() >= MAX_PIPELINED:  # (reading paused at MAX_PIPELINED: one read)
            raise AdminError(503, "too_many_pipelined", "too many requests wait on this connection")
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            raise AdminError(400, "bad_request", "invalid request target") from None
        query = {k: v[-1] for k, v in parse_qs((url.query or b"").decode("latin-1")).items()}
        self._queue.put_nowait(
            AdminRequest(
                method=self.parser.get_method().decode(),
                path=unquote(url.path.decode("latin-1")),
                query=query,
                headers=self._headers,
                body=bytes(self._body),
                client_ip=self.client_ip,
                raw_path=url.path.decode("latin-1"),
            )
        )
        if self._queue.qsize() >= MAX_PIPELINED:
            self._pause()

    # ------------------------------------------------------------------ refusals and closing
    def _refuse(self, err: AdminError) -> None:
        """Read nothing more; answer `err` after the responses owed to earlier requests, then
        close (lingering)."""
        self._stop_reading(err)

    def _stop_reading(self, last: AdminError | None) -> None:
        if self.phase is Phase.CLOSED:
            return
        self.phase = Phase.CLOSED
        self._disarm()
        self._pause()  # the client's further bytes wait in its buffers until we linger
        self._queue.put_nowait(last)

    def _close_lingering(self) -> None:
        """Close while the client may still be sending (a refused head, an unread body): FIN
        after the answer, then read and discard for LINGER_SECONDS (the proxy's close_lingering).
        Closing at once makes the kernel answer the client's next bytes with a reset, which can
        destroy the answer before the client has read it."""
        t = self.transport
        if t is None or t.is_closing():
            return
        self.phase = Phase.CLOSED
        if not t.can_write_eof():
            t.close()
            return
        t.write_eof()
        self._resume()
        self._arm(LINGER_SECONDS, t.close)

    # ------------------------------------------------------------------ deadlines
    def _time_reading(self) -> None:
        """Start the deadline of what is being read; none runs while we hold the client back."""
        if self._paused:
            self._disarm()
        elif self.phase is Phase.HEAD:
            self._arm(HEAD_TIMEOUT, self._head_timed_out)
        elif self.phase is Phase.BODY:
            self._arm(BODY_TIMEOUT, self._body_timed_out)

    def _arm(self, seconds: float, callback: Callable[[], object]) -> None:
        self._disarm()
        if self._loop is not None:
            self._timer = self._loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._refuse(AdminError(408, "request_timeout", "timed out reading the request head"))

    def _body_timed_out(self) -> None:
        self._refuse(AdminError(408, "request_timeout", "timed out reading the request body"))

    def _idle_timed_out(self) -> None:
        # no request begun and none owed an answer: close quietly, as nginx and the proxy do
        self.phase = Phase.CLOSED
        if self.transport is not None:
            self.transport.close()

    # ------------------------------------------------------------------ flow control
    def _pause(self) -> None:
        if not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
            self._disarm()

    def _resume(self) -> None:
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
            self._time_reading()  # the client could not send meanwhile: its deadline restarts

    # ------------------------------------------------------------------ answering
    async def _serve(self) -> None:
        """Answer requests one at a time, in order (pipelining-safe)."""
        while True:
            item = await self._queue.get()
            if self.phase is not Phase.CLOSED and self._queue.qsize() < MAX_PIPELINED:
                self._resume()
            if item is None:  # lost, or nothing more can be read: close once answered
                self._close_lingering()
                return
            if self.transport is None or self.transport.is_closing():
                return
            if isinstance(item, AdminError):
                self._write(error_response(item), head_only=False, close=True)
                self._close_lingering()
                return
            response = await self._respond(item)
            if self.transport is None:  # lost while the handler ran
                return
            close = item.headers.get("connection", "").lower() == "close"
            self._write(response, head_only=item.method == "HEAD", close=close)
            if close:
                self.phase = Phase.CLOSED
                self.transport.close()
                return
            if self.phase is Phase.IDLE and self._queue.empty():
                self._arm(IDLE_TIMEOUT, self._idle_timed_out)

    async def _respond(self, req: AdminRequest) -> AdminResponse:
        try:
            return await self.handler(req)
        except AdminError as err:
            return error_response(err)
        except Exception:  # never a stack trace to the client; the log has it
            log.exception("admin handler failed")
            return json_response(
                {"error": "internal_error", "message": "unexpected error; see the gateway log"},
                500,
            )

    def _write(self, resp: AdminResponse, head_only: bool, close: bool) -> None:
        if self.transport is None:
            return
        parts = [
            status_line(resp.status),
            b"Server: apigate-admin\r\n",
            DATE.value,
            b"Content-Type: %s\r\n" % resp.content_type.encode(),
            b"Content-Length: %d\r\n" % len(resp.body),
            b"Cache-Control: no-store\r\n",
        ]
        for name, value in resp.headers.items():
            parts.append(b"%s: %s\r\n" % (name.encode(), value.encode()))
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if not head_only:
            parts.append(resp.body)
        self.transport.write(b"".join(parts))

    def __repr__(self) -> str:
        return (
            f"<AdminConnection {self.client_ip or '?'} {self.phase.value}, "
            f"{self._queue.qsize()} queued{', paused' if self._paused else ''}>"
        )


def _head_too_large() -> AdminError:
    return AdminError(431, "header_fields_too_large", f"request head over {MAX_HEAD} bytes")


def _body_too_large() -> AdminError:
    return AdminError(413, "payload_too_large", f"request body over {MAX_BODY} bytes")
