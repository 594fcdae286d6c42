"""The upstream connection fed raw response bytes (no socket): what the exchange is told and
what the client would be sent.

Responses arrive the way TCP may deliver them: a byte at a time, an interim response and the
final one in one read, a response followed by bytes nobody asked for.
"""

from __future__ import annotations

import asyncio

import pytest

from apigate.config.schema import ServiceConfig
from apigate.http.pool import PoolManager
from apigate.http.request import Request
from apigate.http.response_head import InvalidResponse, ResponseHead
from apigate.http.upstream import UpstreamConnection, UpstreamListener
from apigate.proxy.heads import response_head
from apigate.registry.service import Service


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed


class Listener(UpstreamListener):
    """Records what the connection tells the exchange."""

    def __init__(self) -> None:
        self.heads: list[ResponseHead] = []
        self.interim: list[ResponseHead] = []
        self.body = b""
        self.done = 0
        self.lost: list[Exception | None] = []

    def on_response_head(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def on_interim_head(self, head: ResponseHead) -> None:
        self.interim.append(head)

    def on_response_body(self, chunk: bytes) -> None:
        self.body += chunk

    def on_response_done(self) -> None:
        self.done += 1

    def on_upstream_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)

    def on_upstream_timeout(self) -> None:
        raise AssertionError("no timeout expected")

    def on_upgraded(self, extra: bytes) -> None:
        pass

    def flush_head(self) -> None:
        pass

    def upstream_write_paused(self) -> None:
        pass

    def upstream_write_resumed(self) -> None:
        pass


def connection() -> tuple[UpstreamConnection, FakeTransport]:
    pools = PoolManager(asyncio.get_running_loop())
    svc = Service("svc", ServiceConfig.model_validate({"targets": ["http://10.0.0.1:80"]}), pools)
    conn = UpstreamConnection(svc.pool_for(svc.instances["10.0.0.1:80"]))
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.pool.total += 1
    return conn, transport


def exchange(conn: UpstreamConnection, *reads: bytes, head_only: bool = False) -> Listener:
    listener = Listener()
    conn.begin(listener, head_only, 0.0)
    conn.request_sent = True
    for data in reads:
        conn.data_received(data)
    return listener


def client_head(head: ResponseHead) -> bytes:
    req = Request()
    req.request_id = "rid"
    return response_head(head, req, chunk_out=False, keep_alive=True)


RESPONSE = (
    b"HTTP/1.1 201 Created\r\n"
    b"Server: up\r\n"
    b"X-Odd:no-space \r\n"
    b"Date: Sun, 22 Nov 2026 12:00:00 GMT\r\n"
    b"Connection: keep-alive, X-Secret\r\n"
    b"X-Secret: s\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"X-Request-Id: echoed\r\n"
    b"Set-Cookie: a=1\r\n"
    b"Set-Cookie: b=2\r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
    b"hello"
)
EXPECTED_HEAD = (
    b"HTTP/1.1 201 Created\r\n"
    b"Server: up\r\n"
    b"X-Odd: no-space\r\n"
    b"Date: Sun, 22 Nov 2026 12:00:00 GMT\r\n"
    b"Set-Cookie: a=1\r\n"
    b"Set-Cookie: b=2\r\n"
    b"X-Request-Id: rid\r\n"
    b"Via: 1.1 apigate\r\n"
    b"Content-Length: 5\r\n"
    b"\r\n"
)


@pytest.mark.parametrize("step", [len(RESPONSE), 1, 7, 50])
async def test_end_to_end_fields_are_forwarded_however_the_bytes_arrive(step: int) -> None:
    conn, _ = connection()
    reads = [RESPONSE[i : i + step] for i in range(0, len(RESPONSE), step)]
    listener = exchange(conn, *reads)
    [head] = listener.heads
    assert (head.status, head.reason, head.version) == (201, b"Created", "1.1")
    assert (head.content_length, head.keep_alive) == (5, True)
    assert client_head(head) == EXPECTED_HEAD
    assert listener.body == b"hello" and listener.done == 1
    assert conn.reusable


async def test_headers_read_by_a_plugin_are_the_ones_written() -> None:
    conn, _ = connection()
    [head] = exchange(conn, RESPONSE).heads
    assert head.header("x-odd") == "no-space"  # value without OWS
    assert head.header_values("set-cookie") == ["a=1", "b=2"]
    assert head.header("x-secret") is None  # named in Connection: hop-by-hop
    head.set_header("X-Added", "1")
    head.remove_header("Server")
    written = client_head(head)
    assert b"Server" not in written
    assert written.startswith(b"HTTP/1.1 201 Created\r\nX-Odd: no-space\r\nDate: Sun")
    assert b"X-Added: 1\r\n" in written and written.count(b"Date:") == 1


async def test_interim_response_and_the_final_one_in_one_read() -> None:
    conn, _ = connection()
    listener = exchange(
        conn,
        b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    )
    [head] = listener.heads
    assert head.status == 200 and head.header("x-interim") is None
    assert listener.body == b"ok" and listener.done == 1


async def test_interim_response_in_one_read_and_final_head_split_over_two() -> None:
    conn, _ = connection()
    listener = exchange(
        conn,
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nX-A",
        b": b\r\nContent-Length: 2\r\n\r\nok",
    )
    [head] = listener.heads
    assert (head.status, head.header("x-a"), listener.body) == (200, "b", b"ok")
    [hints] = listener.interim
    assert (hints.status, hints.headers) == (103, [(b"Link", b"</a>")])


INTERIM = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\nConnection: X-Hop\r\nX-Hop: 1\r\n"
    b"Keep-Alive: timeout=5\r\n\r\n"
    b"HTTP/1.1 102 Processing\r\n\r\n"
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
)


@pytest.mark.parametrize("step", [len(INTERIM), 1, 13])
async def test_interim_responses_but_100_reach_the_listener_filtered(step: int) -> None:
    conn, _ = connection()
    reads = [INTERIM[i : i + step] for i in range(0, len(INTERIM), step)]
    listener = exchange(conn, *reads)
    assert [(h.status, h.reason, h.headers) for h in listener.interim] == [
        (103, b"Early Hints", [(b"Link", b"</a>")]),
        (102, b"Processing", []),
    ]
    [head] = listener.heads
    assert (head.status, listener.body, listener.done) == (200, b"ok", 1)
    assert conn.reusable


async def test_no_date_from_the_upstream_gets_the_gateways() -> None:
    conn, _ = connection()
    [head] = exchange(conn, b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").heads
    assert head.version == "1.0" and not head.keep_alive
    assert client_head(head).count(b"Date: ") == 1


async def test_each_response_has_its_own_version_however_the_reads_fall() -> None:
    """Each head's version is read off its own status line (response_head.read_head): a
    final response after an interim one in the same read, or one whose status line is split,
    must still get its own version."""
    conn, _ = connection()
    [head] = exchange(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").heads
    assert head.version == "1.1" and conn.reusable
    listener = exchange(
        conn, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok"
    )
    [head] = listener.heads
    assert (head.version, head.keep_alive, listener.done) == ("1.0", False, 1)
    assert not conn.reusable
    conn2, _ = connection()
    [head] = exchange(conn2, b"HTTP/1.", b"0 200 OK\r\nContent-Length: 0\r\n\r\n").heads
    assert (head.version, head.keep_alive) == ("1.0", False)
    conn3, _ = connection()
    [head] = exchange(conn3, b"HTTP/1.1 100 Continue\r\n\r\n", b"HTTP/1.0 204 No\r\n\r\n").heads
    assert (head.version, head.status) == ("1.0", 204)


async def test_bytes_after_a_whole_response_close_the_connection() -> None:
    """A second, unasked-for response in the same read must never answer the next request
    (the connection would be handed to it when the first one's end is reported); the finished
    exchange hears nothing."""
    conn, transport = connection()
    listener = exchange(
        conn,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nforge",
    )
    assert listener.done == 1 and listener.lost == [] and listener.body == b"ok"
    assert transport.closed and not conn.reusable


async def test_a_head_after_a_head_response_body_is_not_taken_for_a_response() -> None:
    conn, transport = connection()
    listener = exchange(conn, b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc", head_only=True)
    assert listener.done == 1 and transport.closed  # bytes a HEAD response cannot have


async def test_unsupported_transfer_coding_is_refused() -> None:
    conn, transport = connection()
    listener = exchange(
        conn, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"
    )
    assert listener.heads == [] and transport.closed
    [exc] = listener.lost
    assert isinstance(exc, InvalidResponse) and "Transfer-Encoding" in str(exc)
