"""ClientConnection without sockets: raw bytes into data_received, a mock transport recording
what the connection does, a fake host and fake exchanges recording what they are told, and a
fake loop clock so that timeouts fire when the test says."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apigate.config.schema import LimitsConfig
from apigate.http.errors import GatewayError
from apigate.http.headers import FieldKinds, RequestIds, TrustedProxies
from apigate.http.output import WriteBatch
from apigate.http.protocol import ClientConnection, Exchange, ExchangeMaker, Phase
from apigate.http.request import Request

# ------------------------------------------------------------------ fakes


class FakeHandle:
    def __init__(self, when: float, callback: Callable[..., None], args: tuple[Any, ...]) -> None:
        self.when = when
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """Just what the connection uses: time(), call_at(), call_later(); advance() fires timers."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.handles: list[FakeHandle] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., None], *args: Any) -> FakeHandle:
        handle = FakeHandle(when, callback, args)
        self.handles.append(handle)
        return handle

    def call_later(self, delay: float, callback: Callable[..., None], *args: Any) -> FakeHandle:
        return self.call_at(self.now + delay, callback, *args)

    def call_soon(self, callback: Callable[..., None], *args: Any) -> FakeHandle:
        return self.call_at(self.now, callback, *args)

    def turn(self) -> None:
        """One turn of the event loop: the callbacks due now, not those they schedule."""
        for handle in [h for h in self.pending if h.when <= self.now]:
            self.handles.remove(handle)
            handle.callback(*handle.args)

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = [h for h in self.handles if not h.cancelled and h.when <= end]
            if not due:
                break
            handle = min(due, key=lambda h: h.when)
            self.handles.remove(handle)
            self.now = max(self.now, handle.when)
            handle.callback(*handle.args)
        self.now = end

    @property
    def pending(self) -> list[FakeHandle]:
        return [h for h in self.handles if not h.cancelled]


class FakeTransport:
    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.peer = peer
        self.written = bytearray()
        self.paused = False
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.pause_calls = 0
        self.unsent = 0  # what the client has not read yet (a test sets it)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def get_write_buffer_size(self) -> int:
        return self.unsent

    def write(self, data: bytes) -> None:
        assert not self.closed and not self.eof_written, "write after close"
        self.written += data

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.write(part)

    def pause_reading(self) -> None:
        self.paused = True
        self.pause_calls += 1

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def take(self) -> bytes:
        out, self.written = bytes(self.written), bytearray()
        return out


class FakeExchange(Exchange):
    """Records what the connection tells it; `answer()` plays a finished response."""

    def __init__(self, conn: ClientConnection, request: Request) -> None:
        self.conn = conn
        self.request = request
        self.events: list[str] = []
        self.body = b""
        self.tunnel = b""
        self.response_started = False

    def start(self) -> None:
        self.events.append("start")

    def feed_body(self, chunk: bytes) -> None:
        self.body += chunk

    def body_done(self) -> None:
        self.events.append("body_done")

    def client_lost(self) -> None:
        self.events.append("client_lost")

    def refused(self, err: GatewayError, sent: int) -> None:
        self.events.append(f"refused {err.status}")

    def client_write_paused(self) -> None:
        self.events.append("write_paused")

    def client_write_resumed(self) -> None:
        self.events.append("write_resumed")

    def tunnel_data(self, data: bytes) -> None:
        self.tunnel += data

    def tunnel_eof(self) -> None:
        self.events.append("tunnel_eof")

    def answer(self, body: bytes = b"ok", keep_alive: bool = True) -> None:
        self.conn.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        self.conn.finish_exchange(self, keep_alive)
        self.conn.host.writes.flush()  # the end of the loop's turn (apigate.http.output)


class FakeMaker(ExchangeMaker):
    """Makes the host's `exchange_class` and keeps each in `host.exchanges`."""

    def __init__(self, host: FakeHost) -> None:
        self.host = host

    def new_exchange(self, conn: ClientConnection, request: Request) -> FakeExchange:
        ex = self.host.exchange_class(conn, request)
        self.host.exchanges.append(ex)
        return ex


class FakeHost:
    def __init__(self, loop: FakeLoop, limits: LimitsConfig, trusted: tuple[str, ...]) -> None:
        self.loop = loop
        self.clock = loop.time
        self.limits = limits
        self.request_ids = RequestIds()
        self.trusted_proxies = TrustedProxies(trusted)
        self.scheme = "http"
        self.connections: set[ClientConnection] = set()
        self.exchange_maker = FakeMaker(self)
        self.writes = WriteBatch(cast(Any, loop))
        self.exchanges: list[FakeExchange] = []
        self.exchange_class = FakeExchange
        self.refusals: list[tuple[Request, int, int]] = []  # requests refused without exchange

    def refused(
        self, conn: ClientConnection, request: Request, err: GatewayError, sent: int
    ) -> None:
        self.refusals.append((request, err.status, sent))


LIMITS = dict(
    max_header_bytes=2048,
    max_headers=20,
    max_url_bytes=512,
    max_body_bytes=1000,
    header_timeout=5.0,
    body_timeout=3.0,
    idle_timeout=10.0,
    max_connections=100,
)


class Harness:
    def __init__(self, trusted: tuple[str, ...] = (), **limits: Any) -> None:
        self.loop = FakeLoop()
        self.host = FakeHost(self.loop, LimitsConfig(**{**LIMITS, **limits}), trusted)
        self.conn = ClientConnection(cast(Any, self.host))
        self.transport = FakeTransport()
        self.conn.connection_made(cast(Any, self.transport))

    def feed(self, *reads: bytes) -> None:
        """Each read as the loop delivers it, then what it wrote is sent (the end of its
        turn, apigate.http.output)."""
        for data in reads:
            self.conn.data_received(data)
            self.host.writes.flush()

    @property
    def exchanges(self) -> list[FakeExchange]:
        return self.host.exchanges

    def error(self) -> tuple[int, dict[str, Any], bytes]:
        """The gateway error written to the client: status, JSON body, raw head."""
        raw = self.transport.take()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        return status, json.loads(body), head + b"\r\n"


@pytest.fixture
def h() -> Harness:
    return Harness()


GET = b"GET /a?x=1 HTTP/1.1\r\nHost: Example.COM\r\nAccept: */*\r\n\r\n"


# ------------------------------------------------------------------ parsing
def test_simple_get(h: Harness) -> None:
    h.feed(GET)
    (ex,) = h.exchanges
    assert ex.events == ["start"]
    req = ex.request
    assert (req.method, req.path, req.query, req.version) == ("GET", "/a", b"x=1", "1.1")
    assert req.host == "example.com"
    assert req.headers == [(b"Accept", b"*/*")]
    assert req.keep_alive and not req.has_body
    assert req.client_ip == "127.0.0.1" and req.client_port == 40000
    assert len(req.request_id) >= 8
    assert h.conn.phase == Phase.WAIT
    assert h.conn in h.host.connections


def test_byte_by_byte_gives_the_same_request(h: Harness) -> None:
    h.feed(*[GET[i : i + 1] for i in range(len(GET))])
    (ex,) = h.exchanges
    assert ex.events == ["start"]
    assert (ex.request.path, ex.request.headers) == ("/a", [(b"Accept", b"*/*")])


def test_content_length_body_streams_after_start(h: Harness) -> None:
    h.feed(b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
    (ex,) = h.exchanges
    assert ex.events == ["start"] and ex.body == b"abc"
    assert h.conn.phase == Phase.BODY
    h.feed(b"defghij")
    assert ex.body == b"abcdefghij" and ex.events == ["start", "body_done"]
    assert h.conn.phase == Phase.WAIT


def test_chunked_body_is_decoded_and_trailers_are_ignored(h: Harness) -> None:
    h.feed(
        b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n"
        b"3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Trailer: t\r\nHost: evil\r\n\r\n"
    )
    (ex,) = h.exchanges
    assert ex.body == b"abcde" and ex.events == ["start", "body_done"]
    assert ex.request.chunked and ex.request.host == "x"
    assert ex.request.headers == [(b"X-A", b"1")]


def test_trailers_of_a_queued_request_do_not_become_headers(h: Harness) -> None:
    """Regression: a queued request stayed in the HEAD phase, so its trailers were taken as
    header fields (a trailer Host replaced the validated one)."""
    h.feed(
        GET + b"POST /u HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"1\r\na\r\n0\r\nX-Trailer: t\r\nHost: evil\r\n\r\n"
    )
    first, second = h.exchanges
    assert second.events == ["body_done"]  # queued: not started yet
    assert second.request.headers == [] and second.request.host == "x"
    first.answer()
    assert second.events == ["body_done", "start"]


def test_hop_by_hop_and_connection_named_headers_are_dropped(h: Harness) -> None:
    h.feed(
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, X-Foo\r\nX-Foo: 1\r\n"
        b"Keep-Alive: 5\r\nTE: trailers\r\nProxy-Authorization: b\r\nUpgrade: h2c\r\n"
        b"Trailer: X\r\nX-Keep: 2\r\nX-Forwarded-For: 6.6.6.6\r\nForwarded: for=x\r\n\r\n"
    )
    req = h.exchanges[0].request
    assert req.headers == [(b"X-Keep", b"2")]
    assert req.upgrade is None and req.forwarded_for is None


def test_trusted_peer_keeps_forwarding_headers() -> None:
    h = Harness(trusted=("127.0.0.0/8",))
    h.feed(
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\r\nX-Forwarded-For: 5.6.7.8\r\n"
        b"X-Forwarded-Proto: https\r\n\r\n"
    )
    req = h.exchanges[0].request
    assert req.forwarded_for == b"1.2.3.4, 5.6.7.8"
    assert (b"X-Forwarded-Proto", b"https") in req.headers


@pytest.mark.parametrize(
    ("sent", "kept"),
    [(b"abc-123", True), (b"a b", False), (b"x" * 129, False), (b"x" * 128, True), (b"", False)],
)
def test_request_id_kept_only_when_valid(h: Harness, sent: bytes, kept: bool) -> None:
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + sent + b"\r\n\r\n")
    rid = h.exchanges[0].request.request_id
    assert (rid == sent.decode()) is kept
    assert rid


def test_connection_close_and_http10_keep_alive(h: Harness) -> None:
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert h.exchanges[0].request.keep_alive is False
    h2 = Harness()
    h2.feed(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert h2.exchanges[0].request.keep_alive is True
    h3 = Harness()
    h3.feed(b"GET / HTTP/1.0\r\n\r\n")
    assert h3.exchanges[0].request.keep_alive is False


def _versions(h: Harness) -> list[tuple[str, bool]]:
    return [(ex.request.version, ex.request.keep_alive) for ex in h.exchanges]


def test_each_request_has_its_own_version_however_the_reads_fall(h: Harness) -> None:
    """The connection reads "1.1" off the first line of a read instead of asking httptools
    (see ClientConnection._read_starts_v11): a request that is not first in its read, that
    does not start it, or whose line is split must still get its own version."""
    h.feed(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.0\r\n\r\n")  # pipelined
    assert _versions(h) == [("1.1", True), ("1.0", False)]
    h2 = Harness()
    h2.feed(b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\nX-A: b HTTP/1.1\r\n\r\n")
    h2.exchanges[0].answer()
    h2.feed(b"\r\nGET /b HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")  # leading CRLF
    h2.exchanges[1].answer()
    h2.feed(b"GET /c HTT", b"P/1.0\r\nConnection: keep-alive\r\n\r\n")  # split line
    h2.exchanges[2].answer()
    h2.feed(b"GET /d HTTP/1.1\r\nHost: x\r\n\r\n")
    assert _versions(h2) == [("1.0", True)] * 3 + [("1.1", True)]
    # a GET's line is checked after its target (on_url): split there, or within the target
    h3 = Harness()
    reads = [
        (b"GET /a", b" HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
        (b"GET /lo", b"ng HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"),
        (b"GET /a", b" HTTP/1.1\r\nHost: x\r\n\r\n"),
        (b"GET /a?q=HTTP/1.1 HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",),
        (b"POST /p HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n",),
        (b"DELETE /p HTTP/1.1\r\nHost: x\r\n\r\n",),
    ]
    for i, read in enumerate(reads):
        h3.feed(*read)
        h3.exchanges[i].answer()
    assert _versions(h3) == [("1.0", True)] * 2 + [("1.1", True)] + [("1.0", True)] * 2 + [
        ("1.1", True)
    ]


def test_an_unsupported_version_after_a_supported_one_is_refused(h: Harness) -> None:
    h.feed(GET)
    h.exchanges[0].answer()
    h.transport.take()
    h.feed(b"GET / HTTP/1.2\r\nHost: x\r\n\r\n")
    assert h.error()[0] == 505


def test_absolute_form_sets_host_and_path(h: Harness) -> None:
    h.feed(b"GET http://Other.Example:8080/p/../q?z HTTP/1.1\r\nHost: x\r\n\r\n")
    req = h.exchanges[0].request
    assert (req.host, req.path, req.query) == ("other.example:8080", "/q", b"z")


def test_expect_100_continue_only_for_http11(h: Harness) -> None:
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n")
    assert h.exchanges[0].request.expect_continue
    h10 = Harness()
    h10.feed(b"POST / HTTP/1.0\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\n")
    assert not h10.exchanges[0].request.expect_continue  # RFC 9110 §10.1.1: ignored
    h10b = Harness()
    h10b.feed(b"GET / HTTP/1.0\r\nExpect: something\r\n\r\n")  # ignored too, no 417
    assert h10b.exchanges[0].events == ["start"]


# ------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
        (b"GET / HTTP/1.2\r\nHost: a\r\n\r\n", 505),  # regression: was 400 from llhttp
        (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
        (b"CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 405),
        (b"GET / HTTP/1.1\r\nHost: a\r\nExpect: other\r\n\r\n", 417),
        (b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n", 400),
        (b"GET /#f HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /?q#f HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # regression: fragment after query
        (b"GET http://u@h/ HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET /%zz HTTP/1.1\r\nHost: a\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n", 400),
        (b"GET / HTTP/1.1\nHost: a\r\n\r\n", 400),
    ],
)
def test_refusals_answer_json_and_close(h: Harness, data: bytes, status: int) -> None:
    h.feed(data)
    got, doc, head = h.error()
    assert got == status
    assert set(doc) == {"error", "message", "request_id"}
    assert b"\r\nX-Request-Id: " + doc["request_id"].encode() + b"\r\n" in head
    assert b"\r\nConnection: close\r\n" in head
    assert h.transport.eof_written and not h.transport.closed  # lingering close
    assert all(ex.events in ([], ["client_lost"]) for ex in h.exchanges)


def test_error_before_the_head_is_complete_still_has_a_request_id(h: Harness) -> None:
    """Regression: errors raised by llhttp before headers-complete had no request_id."""
    h.feed(b"GET / HTTP/1.1\r\nBad Header: x\r\n\r\n")
    status, doc, _ = h.error()
    assert status == 400 and doc["request_id"]


def test_lingering_close_discards_input_then_closes(h: Harness) -> None:
    h.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert h.error()[0] == 400
    h.feed(b"more bytes the client was already sending")
    assert h.transport.take() == b"" and h.exchanges == []
    assert not h.transport.closed
    h.loop.advance(2.5)
    assert h.transport.closed


def test_lingering_close_ends_at_client_eof(h: Harness) -> None:
    h.feed(b"GET / HTTP/1.1\r\n\r\n")
    assert h.conn.eof_received() is None
    assert h.transport.closed


# ------------------------------------------------------------------ limits
def test_too_many_headers() -> None:
    h = Harness(max_headers=3)
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    assert h.error()[0] == 431
    assert h.exchanges == []


def test_header_bytes_limit() -> None:
    h = Harness()
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nA: " + b"a" * 2100 + b"\r\n\r\n")
    assert h.error()[0] == 431


def test_url_limit() -> None:
    h = Harness()
    h.feed(b"GET /" + b"a" * 600 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert h.error()[0] == 414


def test_unfinished_header_line_is_bounded_across_reads() -> None:
    h = Harness()
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nA: ")
    for _ in range(3):
        h.feed(b"a" * 1000)
    assert h.transport.written == b""  # 3000 < 2048 + 512 + 1024: still waiting
    h.feed(b"a" * 1000)
    assert h.error()[0] == 431


def test_body_in_the_same_read_as_the_head_is_not_head_bytes() -> None:
    """Regression: the whole first read was counted against the header limit (431)."""
    h = Harness(max_body_bytes=100_000)
    body = b"b" * 50_000
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 50000\r\n\r\n" + body)
    (ex,) = h.exchanges
    assert ex.body == body and ex.events == ["start", "body_done"]
    assert h.transport.written == b""


def test_body_limit_with_content_length_and_chunked() -> None:
    h = Harness()
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"a" * 1001)
    assert h.error()[0] == 413
    # (logged as the 413 it is: it was a 499, "client closed")
    assert h.exchanges[0].events == ["start", "refused 413"]
    h2 = Harness()
    h2.feed(
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"3e8\r\n" + b"a" * 1000 + b"\r\n1\r\nz\r\n0\r\n\r\n"
    )
    assert h2.error()[0] == 413


def test_route_limits_raise_the_body_limit() -> None:
    h = Harness()
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n")
    assert h.conn.apply_route_limits(h.exchanges[0], 5000, None) == 5000
    h.feed(b"a" * 3000)
    assert h.exchanges[0].events == ["start", "body_done"]


def test_max_connections() -> None:
    h = Harness(max_connections=1)
    h.feed(b"GET / HTTP/1.1\r\n")  # a request under way: not idle, not reclaimed
    second = ClientConnection(cast(Any, h.host))
    transport = FakeTransport()
    second.connection_made(cast(Any, transport))
    head, _, body = bytes(transport.written).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ")
    assert json.loads(body)["error"] == "too_many_connections"
    assert json.loads(body)["request_id"]
    assert transport.closed
    second.connection_lost(None)
    assert h.host.connections == {h.conn}


def test_max_connections_reclaims_an_idle_connection() -> None:
    """Idle keep-alive clients (or ones that never sent a byte) held every slot until their
    idle timeout while new clients were refused; nginx reuses such connections too."""
    h = Harness(max_connections=1)
    h.feed(GET)
    h.exchanges[0].answer()  # served, now idle
    second = ClientConnection(cast(Any, h.host))
    transport = FakeTransport()
    second.connection_made(cast(Any, transport))
    assert transport.written == b"" and not transport.closed
    assert h.transport.closed and h.host.connections == {second}


def test_a_client_that_reads_nothing_is_cut_after_send_timeout() -> None:
    """nginx's send_timeout: it held its connection (a max_connections slot) and the unsent
    response for ever; a close waited for a flush that never came."""
    h = Harness(send_timeout=30.0)
    h.feed(GET)
    h.conn.pause_writing()  # the client's window is shut
    h.loop.advance(29)
    h.conn.resume_writing()  # it read some: the timeout starts again at the next stall
    h.conn.pause_writing()
    h.loop.advance(29)
    assert not h.transport.aborted
    h.loop.advance(2)
    assert h.transport.aborted
    h2 = Harness(send_timeout=30.0)
    h2.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    h2.transport.unsent = 5000  # what the client has not read when the connection closes
    h2.exchanges[0].answer(keep_alive=False)
    assert h2.transport.closed and not h2.transport.aborted
    h2.loop.advance(31)
    assert h2.transport.aborted
    # closing while paused: the transport resumes writing below its low-water mark with
    # bytes still unsent; the close still waits on the client, so the deadline stands
    h3 = Harness(send_timeout=30.0)
    h3.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    h3.conn.pause_writing()
    h3.transport.unsent = 70_000
    h3.exchanges[0].answer(keep_alive=False)
    h3.transport.unsent = 10_000
    h3.conn.resume_writing()
    h3.loop.advance(31)
    assert h3.transport.aborted


def test_a_refused_upgrade_llhttp_did_not_stop_at_leaves_no_flag_behind(h: Harness) -> None:
    """An empty Upgrade in HTTP/1.0 was taken for a refused upgrade, but llhttp went on: the
    flag stayed, and the next real upgrade's tunnel bytes were parsed as HTTP."""
    h.feed(b"GET /a HTTP/1.0\r\nConnection: Upgrade, keep-alive\r\nUpgrade:\r\n\r\n")
    h.exchanges[0].answer()
    h.feed(WS_UPGRADE + b"frame-bytes")
    ws = h.exchanges[1]
    assert ws.request.upgrade == b"websocket" and ws.tunnel == b"frame-bytes"


# ------------------------------------------------------------------ pipelining
def test_pipelined_requests_run_one_at_a_time_in_order(h: Harness) -> None:
    h.feed(b"".join(b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(3)))
    a, b, c = h.exchanges
    assert (a.events, b.events, c.events) == (["start"], [], [])
    assert h.transport.paused, "reading pauses while requests are queued"
    a.answer()
    assert b.events == ["start"] and c.events == [] and h.transport.paused
    b.answer()
    assert c.events == ["start"] and not h.transport.paused
    c.answer()
    assert h.conn.phase == Phase.IDLE
    assert h.transport.written.count(b"HTTP/1.1 200 OK") == 3


def test_queued_request_body_is_read_untimed_and_started_with_its_body(h: Harness) -> None:
    h.feed(GET + b"POST /u HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nab")
    first, second = h.exchanges
    assert second.body == b"ab" and second.events == []
    assert h.conn.phase == Phase.WAIT
    h.loop.advance(20)  # longer than every timeout: nothing fires, we hold it back
    assert h.transport.written == b""
    first.answer()
    assert second.events == ["start"] and h.conn.phase == Phase.BODY
    h.feed(b"cd")
    assert second.body == b"abcd" and second.events == ["start", "body_done"]


def test_malformed_pipelined_request_is_answered_after_the_earlier_ones(h: Harness) -> None:
    """Regression: the queue was dropped and the connection closed with no answer."""
    h.feed(GET + GET + b"GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n")
    a, b = h.exchanges[:2]
    assert h.transport.written == b""
    a.answer(b"first")
    b.answer(b"second")
    raw = h.transport.take()
    assert raw.index(b"first") < raw.index(b"second") < raw.index(b"HTTP/1.1 400 ")
    assert h.transport.eof_written
    ((refused, status, sent),) = h.host.refusals  # the third had no exchange: the host logs it
    assert (refused.method, refused.path, status) == ("GET", "/", 400)
    assert sent == len(raw.rpartition(b"\r\n\r\n")[2])  # the error's body


def test_a_head_refused_half_read_is_told_to_the_host_as_far_as_it_was_read(h: Harness) -> None:
    h.feed(b"POST /a/b?c=d HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n")
    status, doc, _ = h.error()
    assert status == 400 and h.exchanges == []
    ((refused, logged_status, _),) = h.host.refusals
    assert (refused.method, refused.path, logged_status) == ("POST", "/a/b", 400)
    assert refused.request_id == doc["request_id"]


@pytest.mark.parametrize(
    ("target", "logged"),
    [
        (b"/a/x?token=SECRET", "/a/x"),
        (b"/a/x#token=SECRET", "/a/x"),
        (b"http://user:SECRET@example.com/a?k=SECRET", "http://example.com/a"),
        (b"http://user@example.com", "http://example.com"),
        (b"/plain", "/plain"),
    ],
)
def test_a_refused_heads_logged_target_has_no_query_fragment_or_user_info(
    h: Harness, target: bytes, logged: str
) -> None:
    """As the log lines of served requests: the README promises query strings are not logged
    (a token in a query reached the access log, and OTLP spans, when its head was refused)."""
    h.feed(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n")
    assert h.error()[0] == 400
    ((refused, _, _),) = h.host.refusals
    assert refused.path == logged


def test_bad_body_of_a_queued_request(h: Harness) -> None:
    h.feed(GET + b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n")
    first, bad = h.exchanges
    assert bad.events == []
    first.answer()
    assert b"HTTP/1.1 400 " in h.transport.take()
    assert bad.events == ["refused 400"] and h.host.refusals == []


def test_error_mid_body_after_the_response_started_aborts(h: Harness) -> None:
    """An error response cannot be written into a response already begun: abort instead."""
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n")
    (ex,) = h.exchanges
    ex.response_started = True
    h.feed(b"zz\r\n")
    assert ex.events == ["start", "client_lost"]
    assert h.transport.aborted and h.transport.written == b""


def test_after_read_runs_once_the_read_is_parsed(h: Harness) -> None:
    calls: list[str] = []
    assert h.conn.after_read(lambda: calls.append("now")) is False  # not inside a read

    class Deferring(FakeExchange):
        def start(self) -> None:
            super().start()
            assert self.conn.after_read(lambda: calls.append(f"after {self.body!r}"))

    h.host.exchange_class = Deferring
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
    assert calls == ["after b'abc'"]  # the whole read was parsed first


# ------------------------------------------------------------------ keep-alive and close
def test_keep_alive_then_close(h: Harness) -> None:
    h.feed(GET)
    h.exchanges[0].answer()
    assert h.conn.phase == Phase.IDLE and not h.transport.closed
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    h.exchanges[1].answer(keep_alive=False)
    assert h.transport.closed
    assert h.conn.requests_served == 2


def test_draining_closes_after_the_current_response(h: Harness) -> None:
    h.feed(GET)
    h.host.exchange_maker.draining = True
    h.exchanges[0].answer()
    assert h.transport.closed


def test_answered_before_the_body_was_read_closes(h: Harness) -> None:
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    h.exchanges[0].answer(keep_alive=False)  # e.g. a 413 from a plugin
    assert h.transport.eof_written, "lingering close: the client may still be sending"


def test_answered_before_the_body_was_read_drops_the_rest_and_goes_on(h: Harness) -> None:
    """A 401 or a 429 to a POST kept alive (nginx's discard_request_body): the rest of the
    body is read and dropped, and the next request is read after it, not out of it."""
    rest = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"  # the body's end, shaped as a request
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nabc" % (3 + len(rest)))
    first = h.exchanges[0]
    assert h.conn.may_discard(cast(Any, first))
    first.answer(keep_alive=True)
    assert not h.transport.eof_written and not h.transport.closed
    assert h.conn.phase == Phase.BODY
    h.feed(rest, GET)
    assert [ex.request.path for ex in h.exchanges] == ["/", "/a"]
    assert first.events == ["start", "body_done"]
    assert h.exchanges[1].events == ["start"]
    h.exchanges[1].answer()
    assert h.conn.phase == Phase.IDLE and not h.transport.closed


def test_a_body_dropped_too_slowly_closes_without_a_second_answer(h: Harness) -> None:
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    h.exchanges[0].answer(keep_alive=True)
    h.transport.take()
    h.loop.advance(2.0)
    h.feed(b"x" * 10)  # the body timeout (3 s) counts from the latest body bytes
    h.loop.advance(2.0)
    assert not h.transport.closed
    h.loop.advance(1.5)
    assert h.transport.closed and h.transport.take() == b"", "its answer was already sent"


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\nabc" % (1024 * 1024 + 4),
    ],
    ids=["chunked", "over-1MiB"],
)
def test_which_unread_bodies_are_not_dropped(head: bytes) -> None:
    h = Harness(max_body_bytes=4 * 1024 * 1024)
    h.feed(head)
    (ex,) = h.exchanges
    assert not h.conn.may_discard(cast(Any, ex))


def test_a_body_over_the_limit_is_not_dropped() -> None:
    """A 404 or 405 comes before the 413 its declared length would get: what it would drop
    is bounded by the limit all the same (review: 500 KB read against max_body_bytes 100)."""
    h = Harness(max_body_bytes=100)
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 101\r\n\r\nabc")
    assert not h.conn.may_discard(cast(Any, h.exchanges[0]))
    h = Harness(max_body_bytes=100)
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    assert h.conn.may_discard(cast(Any, h.exchanges[0]))


def test_one_mebibyte_still_to_come_is_dropped() -> None:
    h = Harness(max_body_bytes=4 * 1024 * 1024)
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1048579\r\n\r\nabc")
    (ex,) = h.exchanges
    assert h.conn.may_discard(cast(Any, ex))


def test_the_body_of_a_refused_upgrade_is_dropped_too(h: Harness) -> None:
    """An upgrade request with a body goes as a plain request, its body read by a parser of
    its own (_parse_after_upgrade): dropping it keeps that framing too."""
    h.feed(
        b"POST /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 10\r\n\r\nabc"
    )
    first = h.exchanges[0]
    assert h.conn.may_discard(cast(Any, first))
    first.answer(keep_alive=True)
    h.feed(b"GET /x ", GET)  # the 7 body bytes left, then a request
    assert [ex.request.path for ex in h.exchanges] == ["/ws", "/a"]
    assert first.events == ["start", "body_done"]


def test_connection_lost_tells_every_exchange(h: Harness) -> None:
    h.feed(GET + GET)
    h.conn.connection_lost(None)
    assert [ex.events[-1] for ex in h.exchanges] == ["client_lost", "client_lost"]
    assert h.conn not in h.host.connections
    assert not h.loop.pending


def test_half_closed_client_still_gets_its_response(h: Harness) -> None:
    h.feed(GET)
    assert h.conn.eof_received() is True
    h.exchanges[0].answer(keep_alive=False)
    assert h.transport.closed


def test_half_closed_client_is_closed_once_answered(h: Harness) -> None:
    """It sends nothing more: the connection waited for the idle timeout (75 s by default)
    after a keep-alive answer; nginx closes at once. Pipelined requests are answered first."""
    h.feed(GET + GET)
    assert h.conn.eof_received() is True
    first, second = h.exchanges
    first.answer()
    assert not h.transport.closed and second.events == ["start"]
    second.answer()
    assert h.transport.closed


def test_a_client_that_half_closes_in_the_middle_of_its_body_is_let_go(h: Harness) -> None:
    """Its body can never be whole: the exchange (and its upstream request, and the
    instance's in-flight count) waited for the body timeout, logged and counted nowhere
    meanwhile. It ends at once as a client that left (nginx: "client prematurely closed
    connection"), with the body bytes it did send."""
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
    (ex,) = h.exchanges
    assert h.conn.eof_received() is None
    assert ex.events[-1] == "client_lost" and ex.request.body_received == 3
    assert h.transport.closed


def test_write_backpressure_is_passed_to_the_exchange(h: Harness) -> None:
    h.feed(GET)
    h.conn.pause_writing()
    h.conn.resume_writing()
    assert h.exchanges[0].events == ["start", "write_paused", "write_resumed"]


# ------------------------------------------------------------------ upgrades
WS_UPGRADE = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


def test_upgrade_switches_to_a_tunnel(h: Harness) -> None:
    h.feed(WS_UPGRADE + b"early-bytes")
    (ex,) = h.exchanges
    assert ex.request.upgrade == b"websocket"
    assert ex.events == ["start"] and ex.tunnel == b"early-bytes"
    h.feed(b"GET / HTTP/1.1\r\n\r\n")  # not parsed: tunnel payload
    assert ex.tunnel == b"early-bytesGET / HTTP/1.1\r\n\r\n"
    assert h.conn.eof_received() is True
    assert ex.events == ["start", "tunnel_eof"]


def test_an_idle_tunnel_is_closed_after_tunnel_idle_timeout() -> None:
    """A WebSocket whose peer vanished without a FIN held both sockets for ever: no deadline
    ran in a tunnel. Bytes either way (the upstream's come through tunnel_active) keep it."""
    h = Harness(tunnel_idle_timeout=20.0)
    h.feed(WS_UPGRADE)
    for _ in range(3):
        h.loop.advance(15)
        h.feed(b"ping")  # from the client
        h.loop.advance(15)
        h.conn.tunnel_active()  # from the upstream (ProxyExchange.on_tunnel_data)
    assert not h.transport.closed
    h.loop.advance(26)  # one timer tick (header_timeout 5 s) past the deadline at most
    assert h.transport.closed


def test_a_tunnel_idle_timeout_shorter_than_the_header_timeout_is_kept() -> None:
    """The deadline moved, but the timer stayed armed for the head's timeout: a 2 s
    tunnel_idle_timeout closed a silent tunnel after the 30 s header_timeout (docs audit)."""
    h = Harness(tunnel_idle_timeout=2.0, header_timeout=30.0)
    h.feed(WS_UPGRADE)
    h.feed(b"ping")
    h.loop.advance(1.5)
    assert not h.transport.closed
    h.loop.advance(1.0)
    assert h.transport.closed


class AnsweredAtOnce(FakeExchange):
    """An exchange the gateway answers itself (a 404, a 401, a cache hit): within start()."""

    def start(self) -> None:
        super().start()
        self.answer()


def test_a_pipeline_answered_at_once_lets_other_connections_run(h: Harness) -> None:
    """Pipelined requests the gateway answered itself ran one after another within one read:
    one connection's pipeline held the event loop (another client waited 11 s)."""
    h.host.exchange_class = AnsweredAtOnce
    h.feed(GET * 40)
    assert len(h.exchanges) == 40 and h.transport.paused
    started = [sum(1 for ex in h.exchanges if ex.events)]
    while started[-1] < 40:
        h.loop.turn()  # (the other connections' callbacks run meanwhile)
        started.append(sum(1 for ex in h.exchanges if ex.events))
    assert started == [16, 32, 40]
    assert h.transport.take().count(b"HTTP/1.1 200 OK") == 40 and not h.transport.paused


def test_a_client_that_does_not_read_gets_no_more_answers_made(h: Harness) -> None:
    """Answers to a pipeline piled up in memory while the client read none (300 MB in 20 s
    on one connection): while its buffer is full no request starts, and reading pauses."""
    h.host.exchange_class = AnsweredAtOnce
    h.conn.pause_writing()  # (the transport: the client's buffer is over its high-water mark)
    h.feed(GET * 3)
    assert [ex.events for ex in h.exchanges] == [[], [], []] and h.transport.paused
    h.loop.turn()
    assert h.exchanges[0].events == []
    h.conn.resume_writing()
    h.loop.turn()
    assert all(ex.events == ["start"] for ex in h.exchanges) and not h.transport.paused


def test_a_stalled_tunnel_is_closed_after_tunnel_idle_timeout() -> None:
    """The upstream stopped reading, so the tunnel paused reading the client (backpressure),
    and a deadline that passed while reading was paused was dropped as "paused by us": no
    byte moved either way and the tunnel stayed open for ever (streaming review)."""
    h = Harness(tunnel_idle_timeout=20.0)
    h.feed(WS_UPGRADE)
    h.conn.pause_reading()  # (ProxyExchange.upstream_write_paused)
    h.loop.advance(26)
    assert h.transport.closed


def test_upgrade_pipelined_behind_a_request_tunnels_its_own_bytes(h: Harness) -> None:
    """The tunnel belongs to the upgrade request, which waits behind the one before it: its
    early bytes, and what follows, must not reach the earlier request's exchange."""
    h.feed(GET + WS_UPGRADE + b"early-bytes")
    first, ws = h.exchanges
    assert first.events == ["start"] and ws.events == []
    assert first.tunnel == b"" and ws.tunnel == b"early-bytes"
    h.feed(b"more")
    assert first.tunnel == b"" and ws.tunnel == b"early-bytesmore"
    first.answer()
    assert ws.events == ["start"]
    assert h.conn.eof_received() is True
    assert ws.events == ["start", "tunnel_eof"] and "tunnel_eof" not in first.events


def test_client_lost_with_a_queued_tunnel_reaches_each_exchange_once(h: Harness) -> None:
    h.feed(GET + WS_UPGRADE)
    first, ws = h.exchanges
    h.conn.connection_lost(None)
    assert first.events == ["start", "client_lost"] and ws.events == ["client_lost"]


# ------------------------------------------------------------------ timeouts
def test_idle_connection_without_bytes_closes_quietly(h: Harness) -> None:
    h.loop.advance(4.9)
    assert not h.transport.closed
    h.loop.advance(0.2)
    assert h.transport.closed and h.transport.written == b""


def test_header_timeout_is_408(h: Harness) -> None:
    h.feed(b"GET / HTTP/1.1\r\nHost: x\r\n")
    h.loop.advance(3)
    h.feed(b"A: 1\r\n")  # progress does not move the deadline
    h.loop.advance(2.1)
    status, doc, _ = h.error()
    assert status == 408 and "head" in doc["message"]


def test_body_timeout_is_408_and_restarts_with_each_read(h: Harness) -> None:
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    for _ in range(4):
        h.loop.advance(2.5)
        h.feed(b"a")
    assert h.transport.written == b""
    h.loop.advance(10)
    status, doc, _ = h.error()
    assert status == 408 and "body" in doc["message"]
    assert h.exchanges[0].events == ["start", "refused 408"]


def test_a_request_starting_after_its_body_leaves_the_next_ones_limits_alone(
    h: Harness,
) -> None:
    """A, then B (chunked, read whole while it waited behind A), then C's head and part of
    its body, in one read. When B starts, its route's limits (10 bytes, 0.5 s) are B's
    alone: C, whose body is arriving, keeps the edge's (1000 bytes, 3 s)."""
    h.feed(
        GET
        + b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"5\r\nhello\r\n0\r\n\r\n"
        + b"POST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 500\r\n\r\n"
        + b"c" * 100
    )
    a, b, c = h.exchanges
    a.answer()
    assert b.events == ["body_done", "start"]
    assert h.conn.apply_route_limits(b, 10, 0.5) == 10  # what B checks its body against
    h.transport.take()
    h.loop.advance(2)  # past B's route body_timeout, within the edge's
    h.feed(b"c" * 400)  # C's 500 bytes: over B's limit, within the edge's
    assert h.transport.written == b"" and c.body == b"c" * 500
    assert c.events == ["body_done"]


def test_route_body_timeout(h: Harness) -> None:
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n")
    h.conn.apply_route_limits(h.exchanges[0], None, 1.0)
    h.loop.advance(6)
    assert h.error()[0] == 408


def test_no_timeout_while_we_pause_reading(h: Harness) -> None:
    """Backpressure from a slow upstream pauses the client: that is not the client's delay."""
    h.feed(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nab")
    h.conn.pause_reading()
    h.loop.advance(30)
    assert h.transport.written == b""
    h.conn.resume_reading()
    h.loop.advance(2)
    assert h.transport.written == b""  # a fresh body deadline after resuming
    h.loop.advance(5)
    assert h.error()[0] == 408


def test_idle_keep_alive_timeout_closes_quietly(h: Harness) -> None:
    h.feed(GET)
    h.loop.advance(100)  # waiting for our response: no client deadline
    assert not h.transport.closed
    h.exchanges[0].answer()
    h.transport.take()
    h.loop.advance(9)
    assert not h.transport.closed
    h.loop.advance(6)
    assert h.transport.closed and h.transport.written == b""


def test_pipelined_head_arriving_during_a_response_is_timed(h: Harness) -> None:
    h.feed(GET + b"GET /next HTTP/1.1\r\nHost:")
    assert h.conn.phase == Phase.HEAD
    h.exchanges[0].answer()
    assert h.conn.phase == Phase.HEAD  # not IDLE: its header deadline stands
    h.loop.advance(6)
    assert b"HTTP/1.1 408 " in h.transport.take()


def test_repr(h: Harness) -> None:
    assert repr(h.conn) == "<ClientConnection 127.0.0.1:40000 IDLE served=0 queued=0>"


def _spellings(lname: bytes) -> set[bytes]:
    title = b"-".join(part.capitalize() for part in lname.split(b"-"))
    return {lname, lname.upper(), title, title.swapcase(), lname[:1].upper() + lname[1:]}


def test_field_tables_classify_every_spelling_as_the_lower_case_name() -> None:
    """The parsers classify a field name as it arrives: each special name in any letter
    case is its kind, every other name (common ones, near misses of the special ones, names
    of another length) is 0."""
    from apigate.http import protocol, response_head

    for table, names in (
        (protocol._SPECIAL, protocol._SPECIAL_NAMES),
        (response_head._RESPONSE_SPECIAL, response_head._RESPONSE_SPECIAL_NAMES),
    ):
        for lname, kind in names.items():
            assert kind != 0
            for spelling in _spellings(lname):
                assert table.kind(spelling) == kind, spelling
                assert _kind_in_line(table, spelling) == kind, spelling
            # one byte changed, added or taken away: not that name (unless it is another one)
            # (and a first byte that is no letter but shares the letter's low five bits, so
            # its place in the table: "#onnection")
            first_twin = bytes([lname[0] ^ 0x40]) + lname[1:]
            for near in (lname[:-1] + b"_", lname + b"s", lname[:-1], b"x" + lname[1:], first_twin):
                assert table.kind(near) == names.get(near.lower(), 0), near
        for other in (b"User-Agent", b"content-type", b"Date", b"Server", b"", b"x" * 300):
            assert table.kind(other) == names.get(other.lower(), 0), other
            assert _kind_in_line(table, other) == names.get(other.lower(), 0), other
        # letters fold, other bytes do not ("-" is not "\r", which is 0x0d, "-" | 0x20)
        assert table.kind(b"Content\x0dLength") == 0


def _kind_in_line(table: FieldKinds, name: bytes) -> int:
    """`table.kind_at` of `name` read where it stands in a field line, between other bytes."""
    line = b"Content-Length: 1\r\n" + name + b": value\r\n"
    return table.kind_at(line, 19, 19 + len(name))


def _cased(name: bytes, upper: list[bool]) -> bytes:
    return bytes(
        c - 32 if 97 <= c <= 122 and i < len(upper) and upper[i] else c for i, c in enumerate(name)
    )


def _names() -> list[bytes]:
    from apigate.http import protocol, response_head

    return sorted({*protocol._SPECIAL_NAMES, *response_head._RESPONSE_SPECIAL_NAMES})


@given(
    st.one_of(
        st.binary(max_size=24),
        st.builds(_cased, st.sampled_from(_names()), st.lists(st.booleans(), max_size=24)),
    )
)
def test_field_tables_agree_with_a_lower_case_lookup(name: bytes) -> None:
    from apigate.http import protocol, response_head

    for table, names in (
        (protocol._SPECIAL, protocol._SPECIAL_NAMES),
        (response_head._RESPONSE_SPECIAL, response_head._RESPONSE_SPECIAL_NAMES),
    ):
        assert table.kind(name) == names.get(name.lower(), 0)
        assert _kind_in_line(table, name) == names.get(name.lower(), 0)


@pytest.mark.parametrize("value", [b"0", b"13", b"007", b"18446744073709551616" * 2])
def test_parse_length_reads_digits_as_int_does(value: bytes) -> None:
    from apigate.http.headers import parse_length

    assert parse_length(value) == int(value)


@pytest.mark.parametrize(("value", "read"), [(b"-1", -1), (b"+1", 1), (b" 7", 7)])
def test_parse_length_leaves_anything_but_digits_to_int(value: bytes, read: int) -> None:
    """llhttp lets only digits through; should anything else reach parse_length, int()
    decides as it always did: these it reads (llhttp never lets them through)..."""
    from apigate.http.headers import parse_length

    assert parse_length(value) == read


@pytest.mark.parametrize("value", [b"", b"1a", b"1 2", b"\xd9\xa1"])
def test_parse_length_raises_where_int_raises(value: bytes) -> None:
    """... and these it refuses, with the ValueError int() raised."""
    from apigate.http.headers import parse_length

    with pytest.raises(ValueError):
        parse_length(value)


def test_request_start_is_the_wall_clock_time_of_its_first_byte() -> None:
    """Request.start is derived from the loop's monotonic clock reading the connection took
    at the first byte (the loop's clock is time.monotonic-based)."""
    import time

    req = Request()
    req.began_at = time.monotonic() - 2.5
    assert abs(req.start - (time.time() - 2.5)) < 0.05
    assert abs(Request().start - time.time()) < 0.05  # not from a connection: now
    # Set explicitly, even to the epoch, that is the answer (0.0 once meant "unset", and two
    # reads gave two different times: a flaky access-log test).
    req.start = 0.0
    assert req.start == 0.0


async def test_request_start_uses_the_offset_read_with_the_date_header() -> None:
    """While the Date header ticks (a running gateway), the wall clock's offset read with it
    gives the start: no clock call per request, the same time within the refresh."""
    import asyncio
    import time

    from apigate.http.date import DATE

    req = Request()
    req.began_at = time.monotonic() - 2.5
    DATE.start(asyncio.get_running_loop())
    try:
        assert DATE.ticking
        assert req.start == req.began_at + DATE.wall_offset
        assert abs(req.start - (time.time() - 2.5)) < 0.05
        DATE.wall_offset += 100.0  # (a stepped wall clock, as the next refresh would read it)
        assert abs(req.start - (time.time() + 97.5)) < 0.05
    finally:
        DATE.stop()
        DATE.wall_offset -= 100.0
    assert not DATE.ticking
    assert abs(req.start - (time.time() - 2.5)) < 0.05  # not ticking: read the clocks
