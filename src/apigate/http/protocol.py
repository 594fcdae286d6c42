"""The downstream (client-facing) HTTP/1.1 connection.

Theory of operation
-------------------
`ClientConnection` is an `asyncio.Protocol`; httptools (llhttp) calls our `on_*` methods as bytes
arrive. llhttp already refuses the classic smuggling vectors (CL+TE, duplicate or malformed
Content-Length, bad chunk sizes, bare LF, obs-fold, control bytes); we add what it allows but a
proxy must not: HTTP versions other than 1.0/1.1, Transfer-Encoding other than exactly `chunked`,
Transfer-Encoding on HTTP/1.0, a missing or repeated Host, CONNECT, and every size limit.

Per connection the phases describe the *reading* side (what the client owes us, and so which
deadline applies):

    IDLE  --first byte-->  HEAD  --headers complete-->  BODY  --message complete-->  WAIT
     ^                                                                                |
     +------------------------- response finished, keep-alive ------------------------+

BODY is only the body of the exchange being answered; the body of a queued (pipelined) request
is read in WAIT, untimed, because we are the ones holding it back. A pipelined head that starts
arriving while a response is still being written is HEAD and timed as such. No deadline runs
while reading is paused by us (queue or backpressure): a slow upstream is not the client's fault.

Each request becomes an *exchange* (see `apigate.proxy.exchange`). Only the exchange at the front
of the queue may write; pipelined requests that arrive while it works wait in `_queue` with their
bodies buffered, and reading pauses until the queue drains, so pipelining cannot grow memory.

Timeouts use one lazily re-armed timer per connection: a phase change only stores a new deadline,
and the timer, which fires at least every `header_timeout`, checks it. A keep-alive request costs
no timer operations at all (measured: 2 `call_later` + 2 `cancel` per request cost ~1.5 µs).
Times come from the host's `clock` (`time.monotonic`), not from `loop.time()`: uvloop's clock
has the same base but ticks in whole milliseconds, and request latencies are often below one.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import socket
import struct
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, Protocol, cast

import httptools
from mypy_extensions import mypyc_attr

from apigate.http.errors import GatewayError, body_size, render_error
from apigate.http.headers import (
    FORWARDING,
    HOP_BY_HOP,
    IDENTITY,
    FieldKinds,
    connection_tokens,
    forwarding_lines,
    parse_length,
    underscore_spellings,
    valid_host,
    valid_request_id,
)
from apigate.http.output import Sender, WriteBatch
from apigate.http.request import Request
from apigate.http.upstream import UpstreamListener
from apigate.routing.normalize import is_canonical, normalize_path

if TYPE_CHECKING:
    from apigate.config.schema import LimitsConfig
    from apigate.http.headers import RequestIds, TrustedProxies


class Phase(enum.IntEnum):
    IDLE = 0  # between requests (keep-alive) or before the first byte
    HEAD = 1  # reading the request line and headers
    BODY = 2  # reading the request body
    WAIT = 3  # request read; the response is being produced
    CLOSED = 4


@mypyc_attr(allow_interpreted_subclasses=True)
class Exchange(UpstreamListener):
    """What the connection needs from the per-request proxy logic: ProxyExchange (which also
    listens to its upstream connection, hence the base: a compiled class has one) and, in
    tests, fakes. A base class, not a Protocol: compiled, the connection's calls on it are
    native calls, where calls and attribute reads on a Protocol-typed object are lookups by
    name (~200 instructions each, five a request)."""

    request: Request
    response_started: bool = False  # some of the response head/body was committed

    def start(self) -> None:
        raise NotImplementedError

    def feed_body(self, chunk: bytes) -> None:
        raise NotImplementedError

    def body_done(self) -> None:
        raise NotImplementedError

    def client_lost(self) -> None:
        raise NotImplementedError

    def refused(self, err: GatewayError, sent: int) -> None:
        """The connection answered `err` itself (a body of `sent` bytes) and closes: the
        request's outcome."""
        raise NotImplementedError

    def client_write_paused(self) -> None:
        raise NotImplementedError

    def client_write_resumed(self) -> None:
        raise NotImplementedError

    def tunnel_data(self, data: bytes) -> None:
        raise NotImplementedError

    def tunnel_eof(self) -> None:
        raise NotImplementedError


@mypyc_attr(allow_interpreted_subclasses=True)
class ExchangeMaker:
    """What a connection asks of its listener once per request (apigate.proxy.exchange's
    ExchangeFactory; fakes in tests): an exchange for each request it reads, and whether the
    listener is draining (then the connection closes after its response). A base class: a
    native call and a native read, compiled, where on the gateway (an interpreted object)
    they were lookups by name, ~350 instructions a request."""

    draining: bool = False

    def new_exchange(self, conn: ClientConnection, request: Request) -> Exchange:
        raise NotImplementedError


class ConnectionHost(Protocol):
    """The listener-level state a connection reads (implemented by `apigate.server`)."""

    loop: asyncio.AbstractEventLoop
    # monotonic seconds, the base of the loop's timers but not rounded to its millisecond ticks
    clock: Callable[[], float]
    limits: LimitsConfig
    request_ids: RequestIds
    trusted_proxies: TrustedProxies
    scheme: str
    connections: set[ClientConnection]
    writes: WriteBatch  # the loop's (apigate.http.output)

    @property
    def exchange_maker(self) -> ExchangeMaker: ...

    # `request`, which has no exchange, was refused with `err` (a body of `sent` bytes): log and
    # count it
    def refused(
        self, conn: ClientConnection, request: Request, err: GatewayError, sent: int
    ) -> None: ...


# Request headers the connection interprets itself, by lower-cased name.
_H_HOST: Final = 1
_H_CONTENT_LENGTH: Final = 2
_H_TRANSFER_ENCODING: Final = 3
_H_CONNECTION: Final = 4
_H_EXPECT: Final = 5
_H_UPGRADE: Final = 6
_H_REQUEST_ID: Final = 7
_H_XFF: Final = 8
_H_DROP: Final = 9  # hop-by-hop or gateway-owned: never forwarded
_H_TRACEPARENT: Final = 10
_H_TRACESTATE: Final = 11
_H_PREFIX: Final = 12
# Every hop-by-hop name (headers.HOP_BY_HOP, the one list) and the forwarding headers the gateway
# writes itself are dropped; the names the connection interprets override that below.
_SPECIAL_NAMES: Final[dict[bytes, int]] = {
    **dict.fromkeys(HOP_BY_HOP | FORWARDING | IDENTITY, _H_DROP),
    b"host": _H_HOST,
    b"content-length": _H_CONTENT_LENGTH,
    b"transfer-encoding": _H_TRANSFER_ENCODING,
    b"connection": _H_CONNECTION,
    b"expect": _H_EXPECT,
    b"upgrade": _H_UPGRADE,
    b"x-request-id": _H_REQUEST_ID,
    b"x-forwarded-for": _H_XFF,
    b"x-forwarded-prefix": _H_PREFIX,
    b"traceparent": _H_TRACEPARENT,
    b"tracestate": _H_TRACESTATE,
    # connection-specific (RFC 9113 §3.2.1), and h2c is never tunnelled (see _tunnels)
    b"http2-settings": _H_DROP,
}


# (nginx ignores names with underscores altogether, `underscores_in_headers off`; only the
# spellings of these go)
_SPECIAL_NAMES.update(dict.fromkeys(underscore_spellings(_SPECIAL_NAMES), _H_DROP))
_SPECIAL: Final = FieldKinds(_SPECIAL_NAMES)  # kind 0: an end-to-end field
_FORWARDING_KEPT_IF_TRUSTED: Final = (
    b"x-forwarded-proto",
    b"x-forwarded-host",
    b"x-forwarded-port",
    b"forwarded",
)

_HASH: Final = ord("#")
_QUESTION_MARK: Final = ord("?")
_V11_LINE_END: Final = b" HTTP/1.1\r\n"  # how a request line of that version ends
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_PAUSE_BUFFER: Final = 64 * 1024  # buffered request body bytes before we stop reading the client
_LOGGED_URL: Final = 1024  # how much of a refused head's request target its log line shows
# pipelined requests begun one after another before the connection lets the others run
_PIPELINE_BURST: Final = 16
_RECLAIM_SCAN: Final = 1024  # connections looked at for an idle one at max_connections
_LINGER_SECONDS: Final = 2.0  # how long a refused client's further input is read and discarded
# The most request body still to come that an answer given before reading it (a 401, a 429, a
# 404) reads and drops to keep the connection open (see may_discard); a larger one closes it.
_DISCARD_MAX: Final = 1024 * 1024
# slack over max_header_bytes for the framing that shares the trailer's reads ("0\r\n", CRLFs)
_TRAILER_SLACK: Final = 1024


class EdgeLimits:
    """The `limits:` section as plain attributes: the connection reads them several times per
    request, and compiled, a native attribute is a load where a pydantic model's costs a
    lookup through its class hierarchy and then its instance dictionary."""

    def __init__(self, config: LimitsConfig) -> None:
        self.config = config
        self.max_header_bytes: int = config.max_header_bytes
        self.max_headers: int = config.max_headers
        self.max_url_bytes: int = config.max_url_bytes
        self.max_body_bytes: int = config.max_body_bytes
        self.header_timeout: float = config.header_timeout
        self.body_timeout: float = config.body_timeout
        self.idle_timeout: float = config.idle_timeout
        self.send_timeout: float = config.send_timeout
        self.tunnel_idle_timeout: float = config.tunnel_idle_timeout
        self.max_connections: int = config.max_connections


_edge_limits: EdgeLimits | None = None


def edge_limits(config: LimitsConfig) -> EdgeLimits:
    """`config` as EdgeLimits, made once per config object (a reload brings a new one)."""
    global _edge_limits
    cached = _edge_limits
    if cached is None or cached.config is not config:
        cached = _edge_limits = EdgeLimits(config)
    return cached


class ClientConnection(Sender):
    """One client TCP connection: parses requests, enforces limits, runs exchanges in order.
    Its writes wait for the end of the loop's turn (Sender)."""

    def __init__(self, host: ConnectionHost) -> None:
        super().__init__(host.writes)
        self.host = host
        self.loop = host.loop
        self.clock = host.clock
        self.limits = edge_limits(host.limits)
        # Per-request reads of the host (an interpreted object) cost a generic lookup each:
        # what cannot change while the listener runs is taken once per connection.
        self.scheme = host.scheme
        self.request_ids = host.request_ids
        self.exchange_maker = host.exchange_maker
        self.parser = _request_parser(self)
        # its feed_data, bound once: called per read, a method looked up by name each time
        self._feed_data: Callable[[bytes], None] = self.parser.feed_data
        self.phase = Phase.IDLE
        self.client_ip = ""
        self.client_port = 0
        self.local_port = 0  # the listener's, for X-Forwarded-Port (0: a unix socket)
        self.trusted_peer = False
        self.current: Exchange | None = None
        self._queue: deque[Exchange] = deque()
        self._parsing: Exchange | None = None  # the exchange whose request is being read
        # answered before its body was read, the body read and dropped (see may_discard)
        self._discarding: Exchange | None = None
        self._req: Request | None = None
        self._url = b""
        # bytes of whole reads that ended inside a section httptools buffers (see _bound_unread)
        self._head_bytes = 0
        self._header_bytes = 0  # field lines of the message being read (head and trailer)
        self._feeding = 0  # size of the read being parsed (see on_message_begin)
        # The request line of the message this read begins with ends in " HTTP/1.1" (see
        # data_received), and the same for the message being parsed: its version is known
        # without asking httptools, whose get_http_version() formats a new str every call
        # (measured: ~2,000 instructions, 3% of a proxied request).
        self._read_starts_v11 = False
        self._v11 = False
        # the same for the method: a read that begins with "GET " (get_method() makes a new
        # bytes object every call); such a read's line is checked for " HTTP/1.1" in on_url
        self._read_starts_get = False
        self._get = False
        self._read = b""  # the read being parsed
        self._after_read: list[Callable[[], None]] = []
        self._header_count = 0
        self._host_count = 0
        self._body_bytes = 0
        # the request being read asks for an upgrade and has a body, which llhttp skips: it is
        # forwarded as a plain request, and the body read by _parse_after_upgrade
        self._upgrade_body = False
        # the request just read asked for an upgrade that is refused (h2c, HTTP/1.0) and had
        # no body: llhttp stopped after it all the same, and what follows is the next request
        self._upgrade_ignored = False
        self._client_eof = False  # the client half-closed while its request was answered
        self._max_body = 0
        self._te_values: list[bytes] = []
        self._connection_values: list[bytes] = []
        self._forwarding_kept: list[tuple[bytes, bytes]] = []
        self._reading_paused = False
        self._pause_reasons = 0
        self.writing_paused = False
        self.tunnel: Exchange | None = None
        self._queue_paused = False
        # requests begun since this connection last let the others run (see _may_begin)
        self._burst = 0
        self._queue_call: asyncio.Handle | None = None  # _resume_queue, scheduled
        self._route_body_timeout: float | None = None
        # a later pipelined request was malformed: answer the earlier ones, then this, then close
        self._pending_error: GatewayError | None = None
        self._pending_exchange: Exchange | None = None  # that request's exchange, if it has one
        self._deadline = 0.0
        self.began_at = 0.0  # clock reading at the current request's first byte
        self._host_field = b""  # the last valid Host field and its routing form
        self._host = ""
        self._forwarding_host: str | None = None  # the Host of `_forwarding`
        self._forwarding = b""
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.requests_served = 0
        self._linger: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None  # while the client reads nothing

    # ------------------------------------------------------------------ connection events
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.client_ip, self.client_port = peer[0], peer[1]
            local = transport.get_extra_info("sockname")
            if isinstance(local, tuple):
                self.local_port = local[1]
        elif peer:  # unix socket
            self.client_ip = "unix"
        self.trusted_peer = bool(self.host.trusted_proxies) and (
            self.client_ip in self.host.trusted_proxies
        )
        self.host.connections.add(self)
        if len(self.host.connections) > self.limits.max_connections and not _reclaim_idle(
            self.host.connections, self
        ):
            err = GatewayError(503, "too many connections", "too_many_connections")
            rid = self.request_ids.next()  # every error body carries a request id
            self.transport.write(render_error(err, rid, keep_alive=False))
            self.close()
            return
        self._set_deadline(self.limits.header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self.phase = Phase.CLOSED
        self.drop_held()
        self.host.connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self.current is not None:
            self.current.client_lost()
        tunnel = self.tunnel
        if tunnel is not None and tunnel is not self.current and tunnel not in self._queue:
            tunnel.client_lost()
        for ex in self._queue:
            ex.client_lost()
        self._queue.clear()

    def data_received(self, data: bytes) -> None:
        if self._linger is not None:
            return  # refused and answered: discard what the client still sends
        if self.tunnel is not None:
            self.tunnel_active()
            self.tunnel.tunnel_data(data)
            return
        self._feeding = len(data)
        self._burst = 0
        if self.phase == Phase.IDLE:  # no message begun: the read starts with a request line
            self._read = data
            self._read_starts_get = data.startswith(b"GET ")
            if not self._read_starts_get:  # (a GET's line: on_url, which knows its length)
                # (bytes.find parses its arguments the old way, ~400 instructions)
                eol = data.find(b"\n")
                # (a slice compared, not data.startswith(_V11_LINE_END, eol - 10): with a
                # start offset, startswith is no mypyc primitive but a generic call that
                # parses its arguments as a tuple, ~800 instructions more than a slice)
                self._read_starts_v11 = eol >= 10 and data[eol - 10 : eol + 1] == _V11_LINE_END
        try:
            upgrade_at = self._feed(data)
            if upgrade_at >= 0:
                # (not in _feed's handler: what a callback raises there gets the
                # HttpParserUpgrade as its __context__, where _callback_failed looks for the
                # GatewayError)
                self._parse_after_upgrade(data[upgrade_at:])
        finally:
            self._feeding = 0
            self._read_starts_v11 = self._read_starts_get = False
            self._read = b""
        if self._after_read:
            callbacks, self._after_read = self._after_read, []
            for callback in callbacks:
                callback()

    def _feed(self, data: bytes) -> int:
        """Parse `data`; where in it an upgrade request's head ended, else -1. A malformed
        request or one over a limit is refused (_reject)."""
        try:
            self._feed_data(data)
        except httptools.HttpParserUpgrade as upg:
            offset: int = upg.args[0]
            return offset
        # (a name per clause: compiled by mypyc, a name keeps the type of its first binding)
        except httptools.HttpParserCallbackError as callback_error:
            self._callback_failed(callback_error)
        except httptools.HttpParserError as parse_error:
            self._parse_failed(parse_error)
        else:
            # a head, or a body (chunk framing, trailer), is still being read
            if self.phase == Phase.HEAD or self._parsing is not None:
                self._bound_unread(len(data))
        return -1

    def _callback_failed(self, error: httptools.HttpParserCallbackError) -> None:
        cause = error.__context__
        if isinstance(cause, GatewayError):
            self._reject(cause)
        elif cause is not None and not isinstance(cause, _Stop):
            raise cause from None

    def _parse_failed(self, error: httptools.HttpParserError) -> None:
        self._reject(GatewayError(400, f"malformed request: {_parser_reason(error)}"))

    def _bound_unread(self, size: int) -> None:
        """Backstop against a field line that never ends: httptools accumulates a partial
        header or trailer line in memory, and calls on_header only once it is whole.

        So bound the whole reads that end inside the head, or inside a body without carrying
        any of its bytes (chunk framing and the trailer section, RFC 9112 §7.1.2: a trailer
        line grew memory without limit). The read a message began in, the one its head ended
        in and any read that carried body bytes count as 0 (on_message_begin,
        on_headers_complete and on_body set the count to minus its size), so a body sharing a
        read with its head is never mistaken for header bytes (it was, and a 100 KB POST got
        a 431). A Content-Length body always carries bytes, so it never adds up.
        """
        self._head_bytes += size
        if self.phase == Phase.HEAD:
            limit = self.limits.max_header_bytes + self.limits.max_url_bytes + 1024
            if self._head_bytes > limit:
                self._reject(GatewayError(431, "request header section too large"))
        elif self._head_bytes > self.limits.max_header_bytes + _TRAILER_SLACK:
            # (431 while nothing of the response went out, else _reject closes the connection)
            self._reject(GatewayError(431, "request trailer section too large"))

    def after_read(self, callback: Callable[[], None]) -> bool:
        """Run `callback` once the read being parsed is fully parsed; False if none is.

        The exchange defers forwarding a request that has a body until then: when a whole
        request arrives in one read (the usual smuggling attempt), a bad chunk or an oversized
        body is refused before its head has gone upstream. A body spanning reads is streamed,
        so then only the reads already validated are forwarded.
        """
        if not self._feeding:
            return False
        self._after_read.append(callback)
        return True

    def eof_received(self) -> bool | None:
        if self.tunnel is not None:
            # Pass the half-close on; the tunnel ends when the upstream closes. (It used to be
            # kept open with the upstream never told, so the connection lived for ever.)
            self.tunnel.tunnel_eof()
            return True
        # A half-closed client may still wait for its response (curl does this after sending).
        if (self.current is None and not self._queue) or self._linger is not None:
            self.close()
            return None
        parsing = self._parsing
        if parsing is not None and parsing is self.current:
            # ... but one in the middle of its body sends no more of it: the request (and the
            # upstream request it streams to) can never be whole. It is a client that left,
            # now (nginx: "client prematurely closed connection"), not at the body timeout.
            parsing.client_lost()
            self.close()
            return None
        self._client_eof = True  # ... but sends nothing more: close once it is answered
        return True

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._arm_send_timeout()
        ex = self.tunnel or self.current
        if ex is not None:
            ex.client_write_paused()

    def resume_writing(self) -> None:
        self.writing_paused = False
        t = self.transport
        if self._send_timer is not None and not (
            self.phase == Phase.CLOSED and t is not None and t.get_write_buffer_size()
        ):
            # (closing with bytes left, the transport calls this below its low-water mark:
            # the close still waits on the client, so its deadline stands)
            self._send_timer.cancel()
            self._send_timer = None
        ex = self.tunnel or self.current
        if ex is not None:
            ex.client_write_resumed()
        elif self._queue:  # requests held back while the client did not read (_may_begin)
            self._schedule_queue()

    # ------------------------------------------------------------------ parser callbacks
    def on_message_begin(self) -> None:
        if self.phase == Phase.CLOSED:
            # We decided to close while parsing this read (a response before the request's
            # body was read, a draining server): RFC 9112 §9.6, no further request on this
            # connection is processed. llhttp would go on with the rest of the read, and a
            # pipelined request after a 413 reached the upstream, its answer never sent.
            raise _Stop
        self.phase = Phase.HEAD
        # (set by a refused upgrade llhttp did not stop at after all, as with an empty
        # Upgrade value: a later real upgrade's tunnel bytes were parsed as HTTP)
        self._upgrade_ignored = False
        now = self.began_at = self.clock()  # (the exchange starts its clock from this)
        self._deadline = now + self.limits.header_timeout
        self._head_bytes = -self._feeding  # data_received adds this read back: counts as 0
        # (only the first message of a read starts where data_received looked)
        self._v11, self._read_starts_v11 = self._read_starts_v11, False
        self._get, self._read_starts_get = self._read_starts_get, False
        req = Request()
        req.began_at = now
        req.client_ip = self.client_ip
        req.client_port = self.client_port
        req.scheme = self.scheme
        self._req = req
        self._url = b""
        self._header_count = 0
        self._header_bytes = 0
        self._host_count = 0
        self._body_bytes = 0
        self._max_body = self.limits.max_body_bytes
        self._route_body_timeout = None
        # (emptied, not replaced: nothing keeps them past the head, and most requests have
        # none of these fields, so three new lists a request were three allocations for nothing)
        if self._te_values:
            self._te_values.clear()
        if self._connection_values:
            self._connection_values.clear()
        if self._forwarding_kept:
            self._forwarding_kept.clear()

    def on_url(self, url: bytes) -> None:
        if len(self._url):  # (compiled, b"" + url is a copy: a target in one piece is kept)
            self._url = self._url + url
        else:
            self._url = url
            if self._get:  # this read begins with the line: is it "GET " url " HTTP/1.1\r\n"?
                end = len(url) + 4
                self._v11 = self._read[end : end + 11] == _V11_LINE_END
        if len(self._url) > self.limits.max_url_bytes:
            raise GatewayError(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self._req
        if req is None:
            return
        if self.phase != Phase.HEAD:  # a trailer field after a chunked body: not forwarded
            # (on_headers_complete leaves HEAD even for a queued request, so a pipelined
            # request's trailers cannot become its headers, as they once did)
            self._on_trailer(name, value)
            return
        self._count_field(name, value)
        # (len(): compiled, a bytes object's truth is a generic call, ~30 instructions)
        if len(value) and (value[-1] == 32 or value[-1] == 9):
            # llhttp keeps trailing whitespace, which is not part of a field value (RFC 9110
            # §5.5): "Host: a.example " was refused as an invalid Host
            value = value.rstrip(b" \t")
        kind = _SPECIAL.kind(name)
        if kind == 0:
            req.headers.append((name, value))
            return
        if kind == _H_HOST:
            self._host_count += 1
            # (a keep-alive client repeats the one it sent; b"" is where a connection starts)
            if value != self._host_field or not value:
                if not valid_host(value):  # not uri-host [":" port]: RFC 9112 §3.2 says 400
                    raise GatewayError(400, "invalid Host header")
                self._host_field = value
                self._host = value.decode("latin-1").lower()
            req.host = self._host  # sent upstream by the exchange
        elif kind == _H_CONTENT_LENGTH:
            req.content_length = parse_length(value)  # llhttp validated digits, duplicates
        elif kind == _H_TRANSFER_ENCODING:
            self._te_values.append(value)
        elif kind == _H_CONNECTION:
            self._connection_values.append(value)
        elif kind == _H_EXPECT:
            if self._http_version() == "1.0":
                pass  # RFC 9110 §10.1.1: a server MUST ignore 100-continue in HTTP/1.0
            elif value.strip().lower() == b"100-continue":
                req.expect_continue = True
            else:
                raise GatewayError(417, "unsupported Expect value", "expectation_failed")
        elif kind == _H_UPGRADE:
            req.upgrade = value
        elif kind == _H_REQUEST_ID:
            if valid_request_id(value) and not req.request_id:
                req.request_id = req.plain_id = value.decode("ascii")
        elif kind == _H_TRACEPARENT:
            req.traceparent = value if req.traceparent is None else b""
        elif kind == _H_TRACESTATE:
            if req.tracestate is None:
                req.tracestate = []
            req.tracestate.append(value)
        elif kind == _H_XFF:
            if self.trusted_peer:
                req.forwarded_for = (
                    value if req.forwarded_for is None else req.forwarded_for + b", " + value
                )
        elif kind == _H_PREFIX:
            if self.trusted_peer:  # (one value: the path a client sees, before our part)
                req.forwarded_prefix = value
        elif self.trusted_peer and name.lower() in _FORWARDING_KEPT_IF_TRUSTED:
            self._forwarding_kept.append((name, value))

    def _count_field(self, name: bytes, value: bytes) -> None:
        """Every field line of the message counts, head and trailer, whatever becomes of it:
        Host, the trace context and the hop-by-hop fields were once left out, and a 20 KB Host
        went upstream twice (in X-Forwarded-Host and Forwarded) past a 2 KiB limit. The bytes
        are checked once the head is read (parser_headers_done), or at each trailer field."""
        self._header_count += 1
        if self._header_count > self.limits.max_headers:
            raise GatewayError(431, "too many request header fields")
        self._header_bytes += len(name) + len(value) + 4  # ": " and CRLF

    def _on_trailer(self, name: bytes, value: bytes) -> None:
        """A trailer field is dropped, but it counts against the same limits as the head's
        fields: a client must not be able to send in a trailer section what the head may not
        carry. (A partial line: see _bound_unread.)"""
        self._count_field(name, value)
        if self._header_bytes > self.limits.max_header_bytes:
            raise GatewayError(431, "request trailer section too large")

    def on_headers_complete(self) -> None:
        req = self._req
        assert req is not None
        self._head_bytes = -self._feeding  # (the head's last read is no trailer: _bound_unread)
        self.parser_headers_done(req)
        # The head is read: leave HEAD now, whatever happens to the exchange. A queued request
        # used to stay in HEAD, so its trailers were taken as headers and the header timeout
        # fired (408, queue dropped) while it merely waited behind a slow response.
        self.phase = Phase.WAIT
        self._deadline = 0.0
        ex = self.exchange_maker.new_exchange(self, req)
        self._parsing = ex
        if req.has_body:
            # Stream the body: the exchange starts now if it is at the front of the queue.
            if self.current is None and self._may_begin():
                self._begin(ex)
            else:
                self._enqueue(ex)
        # A bodiless request starts in on_message_complete, which llhttp calls right after.

    def _may_begin(self) -> bool:
        """Whether a request with nothing ahead of it may start now. Not while the client is
        not reading our answers: pipelined requests the gateway answers itself (404, 405,
        401, a cache hit) piled their answers up in memory (300 MB in 20 s on one
        connection). Nor after _PIPELINE_BURST of them in a row: answered synchronously,
        one after another in one read, one connection's pipeline held the event loop
        (another client's request waited 11 s). Either way the request is queued, and
        reading paused, until _resume_queue."""
        return not self.writing_paused and self._burst < _PIPELINE_BURST

    def _begin(self, ex: Exchange) -> None:
        self._burst += 1
        self.current = ex
        if ex is self._parsing:
            self.phase = Phase.BODY
            # A client that asked for a 100 (Continue) may send nothing until it has one (RFC
            # 9110 §10.1.1): its body's deadline starts at the 100 (write_continue), not while
            # the gateway routes, runs plugins and waits for an upstream connection (the
            # client got a 408 "timed out reading the request body" for the gateway's wait).
            if ex.request.expect_continue and not self._body_bytes:
                self._deadline = 0.0
            else:
                # (_set_deadline brings the timer forward when the body timeout is shorter
                # than its tick, the header timeout: a route's 1 s was kept only at the tick)
                self._set_deadline(self._body_timeout())
        elif self.phase != Phase.HEAD:  # (a next pipelined head may be arriving: keep timing it)
            self.phase = Phase.WAIT
            self._deadline = 0.0
        ex.start()

    def _enqueue(self, ex: Exchange) -> None:
        self._queue.append(ex)
        if not self._queue_paused:
            self._queue_paused = True
            self.pause_reading()
        if self.current is None:  # held back by _may_begin, not behind a request
            self._schedule_queue()

    def _begin_queued(self) -> None:
        nxt = self._queue.popleft()
        if not self._queue and self._queue_paused:
            self._queue_paused = False
            self.resume_reading()
        self._begin(nxt)

    def _schedule_queue(self) -> None:
        """Go on with the queue on the event loop's next turn, after the other connections'
        callbacks; or, while the client is not reading, once it does (resume_writing)."""
        if self._queue_call is None and not self.writing_paused:
            self._queue_call = self.loop.call_soon(self._resume_queue)

    def _resume_queue(self) -> None:
        self._queue_call = None
        self._burst = 0
        ready = self.current is None and self._queue and self.phase != Phase.CLOSED
        if ready and self._may_begin():
            self._begin_queued()

    def parser_headers_done(self, req: Request) -> None:
        """Validate the complete head and fill the derived fields; raises GatewayError."""
        version = self._http_version()
        if version not in ("1.1", "1.0"):
            raise GatewayError(505, f"HTTP/{version} is not supported")
        req.version = version
        # the constant, not a new str per request: its hash is cached for every dict the
        # method is looked up in later (routing, metrics)
        if self._get:
            req.method = "GET"
        else:
            raw_method = self.parser.get_method()
            req.method = "GET" if raw_method == b"GET" else raw_method.decode("ascii")
        if len(self._url) + self._header_bytes > self.limits.max_header_bytes:
            raise GatewayError(431, "request header section too large")
        if req.method == "CONNECT" or req.method == "TRACE":
            # TRACE: the upstream would echo the request as it got it, with what the gateway
            # added (a transform's credentials, the consumer headers) for the client to read
            # (cross-site tracing); nginx refuses it likewise
            raise GatewayError(405, f"{req.method} is not supported", headers=())
        if self._host_count > 1:
            raise GatewayError(400, "more than one Host header")
        if self._host_count == 0 and version == "1.1":
            raise GatewayError(400, "missing Host header")
        if self._te_values:
            if version == "1.0":
                raise GatewayError(400, "Transfer-Encoding is not allowed in HTTP/1.0")
            if len(self._te_values) != 1 or self._te_values[0].strip().lower() != b"chunked":
                raise GatewayError(501, "only Transfer-Encoding: chunked is supported")
            req.chunked = True
        self._parse_target(req)
        keep_alive = version == "1.1"
        if self._connection_values:
            tokens = connection_tokens(self._connection_values)
            if b"close" in tokens:
                keep_alive = False
            elif b"keep-alive" in tokens:
                keep_alive = True
            if req.upgrade is not None:
                if b"upgrade" not in tokens:
                    req.upgrade = None
                elif not _tunnels(version, req.upgrade):
                    req.upgrade = None
                    self._upgrade_body = req.has_body  # (then read as below)
                    self._upgrade_ignored = not req.has_body
                elif req.has_body:
                    # An upgrade request with a body (curl --http2 -d sends one): llhttp skips
                    # the body of any upgrade request, the upstream was sent a Content-Length
                    # it never received, and the client waited for a 504. RFC 9110 §7.8 lets a
                    # server ignore Upgrade, so it goes as a plain request (nginx does the same
                    # to h2c), and _parse_after_upgrade reads the body llhttp skipped.
                    req.upgrade = None
                    self._upgrade_body = True
            named = tokens - {b"close", b"keep-alive", b"upgrade"}
            if named:  # headers the client marked hop-by-hop for this connection
                req.headers = [(n, v) for n, v in req.headers if n.lower() not in named]
        elif req.upgrade is not None:
            req.upgrade = None  # Upgrade without "Connection: upgrade" is not an upgrade
        req.keep_alive = keep_alive
        kept = self._forwarding_kept
        if kept or req.forwarded_for is not None:  # a trusted peer's: they change per request
            # its fields are carried on, and stand instead of ours (forwarding_lines)
            req.headers.extend(kept)
            req.forwarding = forwarding_lines(
                self.client_ip,
                req.forwarded_for,
                self.scheme,
                req.host,
                self.local_port,
                frozenset(name.lower() for name, _ in kept),
            )
        else:
            if req.host != self._forwarding_host:
                self._forwarding_host = req.host
                self._forwarding = forwarding_lines(
                    self.client_ip, None, self.scheme, req.host, self.local_port
                )
            req.forwarding = self._forwarding
        if not req.request_id:
            req.request_id = req.plain_id = self.request_ids.next()

    def _http_version(self) -> str:
        """The version of the request being parsed, as "1.1"."""
        return "1.1" if self._v11 else self.parser.get_http_version()

    def _parse_target(self, req: Request) -> None:
        url = self._url
        # (bytes searched for an int: `b"#" in url` first tries b"#" as an int, and the
        # TypeError raised and cleared inside made it ~8 times slower, ~2,000 instructions)
        if _HASH in url:  # in the query too (it went upstream with it), in either form
            raise GatewayError(400, "fragment in request target")
        if url[:1] != b"/":
            if url[:7].lower() == b"http://" or url[:8].lower() == b"https://":
                # absolute-form (RFC 9112 §3.2.2): the authority replaces Host
                try:
                    parsed = cast(_URLParts, httptools.parse_url(url))
                except httptools.HttpParserInvalidURLError:
                    raise GatewayError(400, "invalid request target") from None
                if parsed.userinfo:  # RFC 9110 §4.2.4: treat userinfo in an http URI as an error
                    raise GatewayError(400, "userinfo in request target")
                if not parsed.host:
                    raise GatewayError(400, "invalid request target")
                authority = parsed.host.decode("latin-1").lower()
                if ":" in authority:  # an IPv6 literal: httptools gives it without brackets
                    authority = f"[{authority}]"
                if parsed.port:
                    authority += f":{parsed.port}"
                # the authority replaces Host: the same grammar ("[fe80::1%25eth0]" passed)
                if not valid_host(authority.encode("latin-1")):
                    raise GatewayError(400, "invalid host in request target")
                req.host = authority
                url = (parsed.path or b"/") + (b"?" + parsed.query if parsed.query else b"")
            elif url == b"*" and req.method == "OPTIONS":
                req.path = "*"
                return
            else:
                raise GatewayError(400, "invalid request target")
        if _QUESTION_MARK in url:
            raw_path, _, req.query = url.partition(b"?")
        else:
            raw_path = url
        if is_canonical(raw_path):  # nearly every request
            req.path = req.one_reading = raw_path.decode("ascii")
            return
        try:
            path_text = raw_path.decode("ascii")
        except UnicodeDecodeError:
            raise GatewayError(400, "non-ASCII bytes in request target") from None
        path = normalize_path(path_text)
        if path is None:
            raise GatewayError(400, "invalid request path")
        req.path = path

    def on_body(self, body: bytes) -> None:
        self._body_bytes += len(body)
        self._head_bytes = -self._feeding  # a read with body bytes is no trailer (_bound_unread)
        ex = self._parsing
        if self._body_bytes > self._max_body and (ex is None or ex is self.current):
            # A queued exchange's route, and so its limit, is not known yet: what it buffers
            # meanwhile is bounded by one read (reading paused when it was queued), and it
            # checks that against its route's limit when it starts (apply_route_limits).
            raise GatewayError(413, f"request body larger than {self._max_body} bytes")
        if ex is not None:
            if ex is self.current or ex is self._discarding:
                self._deadline = self.clock() + self._body_timeout()
            ex.request.body_received = self._body_bytes
            ex.feed_body(body)

    def on_message_complete(self) -> None:
        ex = self._parsing
        self._parsing = None
        if ex is None:
            return
        if ex.request.has_body:
            if self._upgrade_body:
                self._upgrade_body = False
                if self.parser.should_upgrade():
                    # llhttp "completes" an upgrade request at its head, having skipped its
                    # body: the body is still to be read (see _parse_after_upgrade)
                    self._parsing = ex
                    return
            if self.phase == Phase.BODY:
                self.phase = Phase.WAIT
                self._deadline = 0.0
            ex.body_done()
            if ex is self._discarding:  # its answer went out before: the connection goes on
                self._discarding = None
                self._after_response(True)
        elif self.current is None and self._may_begin():
            self._begin(ex)
        else:
            self._enqueue(ex)

    # ------------------------------------------------------------------ limits per route
    def apply_route_limits(
        self, ex: Exchange, max_body: int | None, body_timeout: float | None
    ) -> int:
        """The exchange `ex` calls this once its route is known (a route may override the edge).

        Returns the body limit in force for `ex`, so that it can refuse a declared
        Content-Length above it before reading a byte of the body (413), or a body it read
        while it waited behind an earlier pipelined request. The connection's own limits
        change only while `ex`'s body is the one being read: a request that starts once its
        body is read must not set the limits of the next one, which may be arriving meanwhile
        (it did: a route's smaller max_body or body_timeout applied to the next request).
        """
        if ex is not self._parsing:
            return max_body if max_body is not None else self.limits.max_body_bytes
        if max_body is not None:
            self._max_body = max_body
        if body_timeout is not None:
            self._route_body_timeout = body_timeout
            if self.phase == Phase.BODY:
                self._set_deadline(body_timeout)
        return self._max_body

    def _body_timeout(self) -> float:
        t = self._route_body_timeout
        return t if t is not None else self.limits.body_timeout

    # ------------------------------------------------------------------ writing and ordering
    def write_continue(self, ex: Exchange) -> None:
        """Send `ex`'s client the 100 (Continue) it waits for: from now on its silence is its
        own, and the body's deadline runs (see _begin)."""
        self.write(_CONTINUE)
        if ex is self._parsing and ex is self.current and self.phase == Phase.BODY:
            self._set_deadline(self._body_timeout())

    def finish_exchange(self, ex: Exchange, keep_alive: bool, now: float = 0.0) -> None:
        """The current exchange wrote its whole response (`now`: the clock's reading then, if
        the exchange has one: the idle timeout counts from it)."""
        if ex is not self.current:
            return
        self.requests_served += 1
        self.current = None
        if self._parsing is ex:  # answered before the request body was read
            if keep_alive and not self.exchange_maker.draining:
                # the exchange asked may_discard: read the rest of the body and drop it (the
                # exchange does), then go on as after any response, in on_message_complete
                self._discarding = ex
                self._set_deadline(self._body_timeout())
            else:
                self.close_lingering()
            return
        self._after_response(keep_alive, now)

    def may_discard(self, ex: Exchange) -> bool:
        """May an answer that `ex` gives before its request body was read keep the connection
        open? Yes when the rest of the body has a declared length of at most _DISCARD_MAX,
        the whole within the body limit in force: it is read and dropped, and the next
        request is read after it (nginx's discard_request_body; Kong answers a 401 or a 429
        to a POST so). A chunked body has no length to bound that by: it closes (with a
        lingering close, see close_lingering). The exchange also leaves out a client that
        waits for a 100 (Continue) it never got: it may send no body at all, and its next
        request would be read as the body."""
        req = ex.request
        length = req.content_length
        return (
            ex is self._parsing
            and length is not None
            and not req.chunked
            and length <= self._max_body  # (a 404 comes before the 413 that would say so)
            and length - req.body_received <= _DISCARD_MAX
        )

    def _after_response(self, keep_alive: bool, now: float = 0.0) -> None:
        """The connection after a response that was written whole: close, the next request
        (queued, or a refused head's error), or idle (from `now`, if given)."""
        if not keep_alive or self.exchange_maker.draining:
            # The client may have sent more than we read: its next request arriving (HEAD),
            # or pipelined ones queued, reading paused, the rest unread in the kernel. A plain
            # close then made the kernel answer those bytes with a reset, which destroyed the
            # response before the client read it: linger instead (nginx does when input is
            # pending). A client with nothing more to send is closed at once.
            if self.phase == Phase.HEAD or self._queue or self._reading_paused:
                self.close_lingering()
            else:
                self.close()
            return
        if self._queue:
            if self._may_begin():
                self._begin_queued()
            else:
                self._schedule_queue()
            return
        if self._pending_error is not None:
            self.respond_error(self._pending_error, self._req, refused=self._pending_exchange)
            return
        if self._client_eof:  # (it waited for the idle timeout, nginx closes at once)
            self.close()
            return
        if self.phase == Phase.HEAD:
            return  # the next request's head is arriving: its header deadline stands
        self.phase = Phase.IDLE
        self._set_deadline(self.limits.idle_timeout, now)

    def respond_error(
        self, err: GatewayError, request: Request | None, *, refused: Exchange | None = None
    ) -> None:
        """Answer with a gateway error and close (the connection state is unknown).

        The refused request is logged and counted like any other: through its exchange, or
        the host's when it was refused before it had one (its head malformed, over a limit, or
        too slow). nginx logs its 400s and 408s too; they were in neither the access log nor
        the metrics."""
        rid = request.request_id if request is not None else ""
        if not rid:  # refused before the head was complete: still give the client an id
            rid = self.request_ids.next()
            if request is not None:
                request.request_id = request.plain_id = rid
        # (a response to HEAD has no content, RFC 9110 §9.3.2, an error's neither: the JSON
        # body went out after a refused HEAD's head, bytes a client reads as a next response)
        head_only = request is not None and request.method == "HEAD"
        data = render_error(err, rid, keep_alive=False, head_only=head_only)
        self.write(data)
        body = 0 if head_only else body_size(data)
        if refused is not None:
            refused.refused(err, body)
        elif request is not None:
            self.host.refused(self, request, err, body)
        self.close_lingering()

    def _reject(self, err: GatewayError) -> None:
        """A protocol-level error: answer it (after the responses still owed), then close."""
        if self.phase == Phase.CLOSED or self._pending_error is not None:
            return
        parsing, self._parsing = self._parsing, None
        if self.phase == Phase.HEAD and self._req is not None:
            # refused while its head was read: its log line shows what there was of it (the
            # method once the target began: llhttp keeps the previous message's until then)
            self._req.method = _seen_method(self.parser) if self._url else ""
            self._req.path = _logged_target(self._url)
        if parsing is not None and parsing is not self.current and parsing in self._queue:
            self._queue.remove(parsing)  # a queued request whose body was malformed
        current = self.current
        if current is not None and current is not parsing:
            # Earlier pipelined requests are owed their responses, in order: answer them, then
            # this error (finish_exchange), then close. Read nothing more meanwhile. (This used
            # to drop the queued requests and close without any answer to the bad one.)
            self._pending_error = err
            self._pending_exchange = parsing
            self.phase = Phase.WAIT
            self._deadline = 0.0
            self.pause_reading()
            return
        if current is not None:
            self.current = None
            if current.response_started:
                # an error response now would land inside the one already begun
                current.client_lost()
                self.abort()
                return
        self.respond_error(err, self._req, refused=parsing)

    def close(self) -> None:
        t = self.transport
        if t is not None and not t.is_closing():
            self.send_last()
            t.close()
            if t.get_write_buffer_size():  # it flushes first: as long as the client reads
                self._arm_send_timeout()
        self.phase = Phase.CLOSED

    def _arm_send_timeout(self) -> None:
        """Cut the connection if the client reads nothing for `send_timeout` (nginx's): a
        client that stops reading held its connection for ever (and with it a slot of
        max_connections, the unsent response, a closing transport that never flushed)."""
        if self._send_timer is None:
            self._send_timer = self.loop.call_later(self.limits.send_timeout, self._send_timed_out)

    def _send_timed_out(self) -> None:
        self._send_timer = None
        self.abort()  # connection_lost tells the exchange (the upstream is released)

    def close_lingering(self) -> None:
        """Close after a response while the client may still be sending (a refused head, an
        unread body): send FIN after the response, read and discard for a while, then close.

        Closing at once made the kernel answer the client's next bytes with a reset, which
        destroys the response before the client reads it: a client uploading a body too large
        saw "connection reset" instead of the 413 (nginx's lingering_close). Error path only.
        """
        t = self.transport
        if t is None or t.is_closing() or self._linger is not None:
            return
        if not t.can_write_eof():  # TLS cannot half-close
            self.close()
            return
        self.phase = Phase.CLOSED
        self.send_last()
        t.write_eof()
        self._linger = self.loop.call_later(_LINGER_SECONDS, self.close)
        if self._reading_paused:
            self._reading_paused = False
            t.resume_reading()

    def write_eof(self) -> bool:
        """Half-close towards the client (a tunnel whose upstream half-closed); False when the
        transport cannot (TLS has no half-close) or is already closing."""
        t = self.transport
        if t is None or t.is_closing() or not t.can_write_eof():
            return False
        self.send_last()
        t.write_eof()
        return True

    def abort(self) -> None:
        """Cut the connection with a reset (RST), not an end (FIN): a response cut short must
        not look whole. One whose body ends with the connection (an HTTP/1.0 client's, with
        no length) looked complete to the client, and to a cache in front, on a FIN."""
        t = self.transport
        self.drop_held()
        if t is not None:
            if not t.is_closing():
                _reset_on_close(t)
            t.abort()
        self.phase = Phase.CLOSED

    # ------------------------------------------------------------------ flow control
    def pause_reading(self) -> None:
        self._pause_reasons += 1
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self._pause_reasons > 0:
            self._pause_reasons -= 1
        if self._pause_reasons == 0 and self._reading_paused and self.transport is not None:
            self._reading_paused = False
            # The client could not send while we held it: its deadline starts again now.
            if self.phase == Phase.HEAD:
                self._deadline = self.clock() + self.limits.header_timeout
            elif self.phase == Phase.BODY:
                self._set_deadline(self._body_timeout())
            elif self.tunnel is not None:
                self.tunnel_active()
            if not self.transport.is_closing():
                self.transport.resume_reading()

    # ------------------------------------------------------------------ upgrades (WebSocket)
    def _parse_after_upgrade(self, rest: bytes) -> None:
        """llhttp stopped after the head of an upgrade request; `rest` is what followed it.

        Without a body that is the start of the tunnel. With one, llhttp skipped the body (on
        any upgrade request: httptools tells it to) and on_message_complete kept the request
        open: a new parser reads it, primed with a head that frames the body the same way
        (_BodyAfterUpgrade drops that head's callbacks), then every later request. Looped, not
        recursive: one read may hold many such requests.
        """
        while self.phase != Phase.CLOSED:
            if self._parsing is not None:
                parser = _request_parser(_BodyAfterUpgrade(self))
                parser.feed_data(_body_framing_head(self._parsing.request))
            elif self._upgrade_ignored:  # a whole plain request: what follows is the next
                self._upgrade_ignored = False
                parser = _request_parser(self)
            else:
                self._start_tunnel_buffer(rest)
                return
            self.parser = parser
            self._feed_data = parser.feed_data
            upgrade_at = self._feed(rest)
            if upgrade_at < 0:
                return
            rest = rest[upgrade_at:]

    def _start_tunnel_buffer(self, extra: bytes) -> None:
        """llhttp stopped at an Upgrade request: bytes after the head belong to the tunnel.

        The upgrade request is the last one parsed: still being read, or waiting behind
        earlier pipelined requests (the queue's tail), or begun.
        """
        ex = self._parsing or (self._queue[-1] if self._queue else self.current)
        self._parsing = None
        if ex is None:
            self.close()
            return
        self.tunnel = ex
        self.phase = Phase.WAIT
        self.tunnel_active()
        if extra:
            ex.tunnel_data(extra)

    def tunnel_active(self) -> None:
        """Bytes went through the tunnel, either way: its idle deadline starts again (and
        the timer comes forward when it was armed later: for the head's timeout, say)."""
        self._set_deadline(self.limits.tunnel_idle_timeout)

    # ------------------------------------------------------------------ timeouts
    def _set_deadline(self, seconds: float, now: float = 0.0) -> None:
        """The connection's deadline `seconds` from `now` (the clock read, if not given:
        a call by name, which the exchange spares us at the end of its response)."""
        self._deadline = (now or self.clock()) + seconds
        if self._timer is None or self._timer_at > self._deadline:
            self._arm(self._deadline)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self.phase == Phase.CLOSED:
            return
        now = self.clock()
        if self._deadline and now >= self._deadline:
            # (a tunnel's deadline is "no byte either way": reading paused because the
            # upstream stopped reading is no excuse, it is how a peer that vanished with a
            # full window looks, and it held both sockets for ever)
            if not self._reading_paused or self.tunnel is not None:
                self._on_timeout()
                return
            self._deadline = 0.0  # paused by us: resume_reading sets a fresh deadline
        tick = now + self.limits.header_timeout
        self._arm(min(self._deadline, tick) if self._deadline else tick)

    def _on_timeout(self) -> None:
        if self.phase == Phase.IDLE:
            self.close()  # idle keep-alive connection: close quietly, as nginx does
        elif self.phase == Phase.HEAD:  # only on_message_begin enters HEAD: a request began
            self._reject(GatewayError(408, "timed out reading the request head"))
        elif self.phase == Phase.BODY:
            if self._discarding is not None:  # its answer was sent: nothing more to say
                self.close()
            else:
                self._reject(GatewayError(408, "timed out reading the request body"))
        elif self.tunnel is not None:
            self.close()  # no byte either way for tunnel_idle_timeout (the tunnel closes too)

    def __repr__(self) -> str:
        return (
            f"<ClientConnection {self.client_ip}:{self.client_port} {self.phase.name} "
            f"served={self.requests_served} queued={len(self._queue)}>"
        )


_LINGER_RESET: Final = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST


def _reset_on_close(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # (a socket already gone: it is closing anyway)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)


def _reclaim_idle(connections: set[ClientConnection], new: ClientConnection) -> bool:
    """Close one idle keep-alive connection to make room for a new one (nginx reuses such
    connections too): at max_connections, idle clients held every slot until their idle
    timeout (75 s) while new ones were refused. Scans a bounded part of the set (error path
    only); False when it found none."""
    for scanned, conn in enumerate(connections):
        if scanned >= _RECLAIM_SCAN:
            break
        if conn.phase == Phase.IDLE and conn.current is None and conn is not new:
            conn.close()
            connections.discard(conn)
            return True
    return False


def _tunnels(version: str, upgrade: bytes) -> bool:
    """Whether an upgrade request is forwarded as one (and tunnelled after a 101).

    Not in HTTP/1.0 (RFC 9110 §7.8: a server MUST ignore Upgrade there, and a 1.0 client may
    not be sent a 101). Not to h2c: past the 101 the client speaks HTTP/2 straight to the
    upstream, out of reach of routing, plugins and the forwarding headers ("h2c smuggling");
    Envoy and nginx do not pass it on either. Such a request goes as a plain HTTP/1.1 one.
    Nor an Upgrade that names no protocol (RFC 9110 §7.8: at least one).
    """
    return version == "1.1" and b"h2c" not in upgrade.lower() and bool(upgrade.strip(b" \t,"))


def _request_parser(protocol: object) -> httptools.HttpRequestParser:
    parser = httptools.HttpRequestParser(protocol)
    # Let any "HTTP/d.d" through llhttp so that parser_headers_done answers every version
    # but 1.0/1.1 with 505 (strict llhttp says 400 to HTTP/1.2 but accepts HTTP/2.0).
    parser.set_dangerous_leniencies(lenient_version=True)
    return parser


def _body_framing_head(req: Request) -> bytes:
    """A request head that frames a body as `req`'s head did, for a parser to read it with."""
    if req.chunked:
        framing = b"Transfer-Encoding: chunked"
    else:
        framing = b"Content-Length: %d" % (req.content_length or 0)
    persistence = b"keep-alive" if req.keep_alive else b"close"  # (what may follow it)
    return b"POST / HTTP/%s\r\n%s\r\nConnection: %s\r\n\r\n" % (
        req.version.encode("ascii"),
        framing,
        persistence,
    )


class _BodyAfterUpgrade:
    """The callbacks of a parser that takes over after llhttp skipped an upgrade request's
    body (ClientConnection._parse_after_upgrade). Its first message is a made-up head followed
    by the real body: that head's callbacks are dropped, and the rest, the body, its trailer
    and every later request, go to the connection. Only such a connection pays the extra call
    per callback; httptools binds a protocol's callbacks once, when the parser is made."""

    def __init__(self, conn: ClientConnection) -> None:
        self._conn = conn
        self._in_made_up_head = True

    def on_message_begin(self) -> None:
        if not self._in_made_up_head:
            self._conn.on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._in_made_up_head:
            self._conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_made_up_head:
            self._conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._in_made_up_head:
            self._in_made_up_head = False
        else:
            self._conn.on_headers_complete()

    def on_body(self, body: bytes) -> None:
        self._conn.on_body(body)

    def on_message_complete(self) -> None:
        self._conn.on_message_complete()


class _URLParts(Protocol):
    """httptools' URL as it really is: its stub types every part as bytes, but a part the URL
    does not have is None (mypyc checks the declared types at run time)."""

    host: bytes | None
    port: int | None
    path: bytes | None
    query: bytes | None
    userinfo: bytes | None


def _logged_target(url: bytes) -> str:
    """What a refused head's log line shows of its request target: as a served request's, no
    query or fragment (tokens travel there), nor the user info of an absolute form."""
    end = len(url)
    for mark in (b"?", b"#"):
        at = url.find(mark, 0, end)
        if at >= 0:
            end = at
    target = url[: min(end, _LOGGED_URL)]
    scheme_end = target.find(b"://")
    if scheme_end >= 0:
        start = scheme_end + 3
        slash = target.find(b"/", start)
        user_end = target.rfind(b"@", start, slash if slash >= 0 else len(target))
        if user_end >= 0:
            target = target[:start] + target[user_end + 1 :]
    return target.decode("latin-1")


def _seen_method(parser: httptools.HttpRequestParser) -> str:
    """The method of a request refused while its head was read, for its log line ("" when
    llhttp had not read it yet)."""
    try:
        return parser.get_method().decode("latin-1")
    except Exception:  # (httptools raises when there is none yet)
        return ""


class _Stop(Exception):
    """Raised inside a parser callback to stop parsing after we already answered."""


def _parser_reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:120]
