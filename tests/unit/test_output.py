"""Writes held until the end of the loop's turn (apigate.http.output), alone and through both
connection kinds: nothing is sent early, reordered, sent twice, sent after a close or lost
before one."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest

from apigate.http.output import Sender, WriteBatch
from apigate.http.pool import Pool
from apigate.http.upstream import UpstreamConnection
from tests.unit.test_protocol import GET, Harness


class Loop:
    """Records call_soon; `turn()` runs what was scheduled, as the loop's next turn would."""

    def __init__(self) -> None:
        self.soon: list[Any] = []

    def call_soon(self, callback: Any, *args: Any) -> None:
        self.soon.append((callback, args))

    def turn(self) -> None:
        soon, self.soon = self.soon, []
        for callback, args in soon:
            callback(*args)


class Transport:
    """Records each call: one entry per write or writelines, so batching shows. A write once
    the connection closed it is a bug of ours; once the peer reset it (`lost`), the transport
    drops it, as asyncio's and uvloop's do once the connection is lost."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[bytes]]] = []
        self.closing = False
        self.eof = False
        self.lost = False
        self.dropped: list[bytes] = []

    def write(self, data: bytes) -> None:
        assert not self.closing and not self.eof, "write after close"
        if self.lost:
            self.dropped.append(data)
            return
        self.calls.append(("write", [data]))

    def writelines(self, parts: list[bytes]) -> None:
        assert not self.closing and not self.eof, "write after close"
        if self.lost:
            self.dropped.extend(parts)
            return
        self.calls.append(("writelines", list(parts)))

    def is_closing(self) -> bool:
        return self.closing or self.lost

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof = True

    @property
    def sent(self) -> bytes:
        return b"".join(b"".join(parts) for _, parts in self.calls)


def batch() -> tuple[Loop, WriteBatch]:
    loop = Loop()
    return loop, WriteBatch(cast(asyncio.AbstractEventLoop, loop))


def sender(writes: WriteBatch) -> tuple[Sender, Transport]:
    conn = Sender(writes)
    t = Transport()
    conn.transport = cast(Any, t)
    return conn, t


def test_writes_wait_for_the_end_of_the_turn_then_go_out_once_per_connection() -> None:
    loop, writes = batch()
    a, ta = sender(writes)
    b, tb = sender(writes)
    a.write(b"one")
    b.write(b"only")
    a.writelines([b"two", b"three"])
    assert ta.calls == [] and tb.calls == [], "nothing is sent before the turn ends"
    assert len(loop.soon) == 1, "one callback for the whole batch"
    loop.turn()
    assert ta.calls == [("writelines", [b"one", b"two", b"three"])]  # in order, one writev
    assert tb.calls == [("write", [b"only"])]  # (one message: as it is)
    loop.turn()
    assert len(ta.calls) == 1 and len(tb.calls) == 1, "nothing is sent twice"


def test_the_next_batch_schedules_its_own_flush() -> None:
    loop, writes = batch()
    conn, t = sender(writes)
    for round_ in (b"1", b"2"):
        conn.write(round_)
        conn.write(b"")  # (nothing to send: no part of its own)
        assert len(loop.soon) == 1
        loop.turn()
    assert t.calls == [("write", [b"1"]), ("write", [b"2"])]


def test_a_connection_that_stopped_sending_by_the_end_of_the_turn_sends_nothing() -> None:
    loop, writes = batch()
    conn, t = sender(writes)
    conn.write(b"late")
    conn.sending = False  # (as its close, half-close or abort says)
    loop.turn()
    assert t.calls == []
    conn.write(b"later")
    loop.turn()
    assert t.calls == []


def test_a_write_to_a_transport_the_peer_reset_is_left_to_the_transport() -> None:
    loop, writes = batch()
    conn, t = sender(writes)
    conn.write(b"late")
    t.lost = True  # reset meanwhile: connection_lost is yet to come
    loop.turn()
    assert t.calls == [] and t.dropped == [b"late"]


def test_send_held_sends_now_so_the_batch_does_not_send_it_again() -> None:
    loop, writes = batch()
    conn, t = sender(writes)
    conn.write(b"x")
    conn.send_held()
    conn.write(b"y")  # held again: the batch sends it once
    loop.turn()
    assert t.calls == [("write", [b"x"]), ("write", [b"y"])]


def test_send_last_sends_what_is_held_now_and_nothing_after() -> None:
    loop, writes = batch()
    conn, t = sender(writes)
    conn.write(b"x")
    conn.send_last()  # (a close or half-close)
    conn.write(b"y")
    loop.turn()
    assert t.calls == [("write", [b"x"])]


# ---------------------------------------------------------------- the client connection
def test_a_client_connection_sends_what_it_holds_before_closing() -> None:
    h = Harness()
    h.conn.write(b"answer")
    h.conn.close()
    assert h.transport.closed and h.transport.take() == b"answer"
    h.host.writes.flush()  # the turn ends: nothing is written after the close
    assert h.transport.take() == b""


def test_a_client_connection_sends_what_it_holds_before_half_closing() -> None:
    h = Harness()
    h.conn.writelines([b"a", b"b"])
    assert h.conn.write_eof()
    assert h.transport.eof_written and h.transport.take() == b"ab"
    h.host.writes.flush()
    assert h.transport.take() == b""


def test_a_client_connection_drops_what_it_holds_when_it_aborts_or_is_lost() -> None:
    h = Harness()
    h.conn.write(b"cut short")
    h.conn.abort()
    h.host.writes.flush()
    assert h.transport.take() == b""
    h = Harness()
    h.conn.write(b"nobody to read it")
    h.conn.connection_lost(None)
    h.host.writes.flush()
    assert h.transport.take() == b""
    h.conn.write(b"an exchange's answer after the loss")  # (a closed transport would raise)
    h.host.writes.flush()
    assert h.transport.take() == b""


def test_a_refused_request_is_answered_before_the_lingering_close() -> None:
    h = Harness()
    h.conn.data_received(b"GET / HTTP/1.1\r\n\r\n")  # no Host
    assert h.transport.eof_written, "the 400 half-closes the connection (lingering close)"
    assert h.transport.take().startswith(b"HTTP/1.1 400 ")


def test_responses_of_pipelined_requests_leave_in_one_write() -> None:
    h = Harness()
    h.conn.data_received(GET * 3)
    for ex in list(h.exchanges):
        ex.conn.write(b"r;")
    writes: list[bytes] = []
    h.transport.write = writes.append  # type: ignore[method-assign]
    h.transport.writelines = lambda parts: writes.append(b"".join(parts))  # type: ignore[method-assign]
    h.host.writes.flush()
    assert len(writes) == 1 and writes[0].startswith(b"r;")


# ---------------------------------------------------------------- the upstream connection
@pytest.fixture
def upstream() -> tuple[UpstreamConnection, Transport, WriteBatch]:
    loop, writes = batch()
    pool = Pool(cast(asyncio.AbstractEventLoop, loop), "10.0.0.1", 80, writes=writes)
    conn = UpstreamConnection(pool)
    t = Transport()
    conn.connection_made(cast(Any, t))
    return conn, t, writes


def test_an_upstream_connection_holds_its_writes_in_the_pools_batch(
    upstream: tuple[UpstreamConnection, Transport, WriteBatch],
) -> None:
    conn, t, writes = upstream
    conn.write(b"GET / HTTP/1.1\r\n\r\n")
    conn.writelines([b"5\r\n", b"hello", b"\r\n"])
    assert t.calls == []
    writes.flush()
    assert t.calls == [("writelines", [b"GET / HTTP/1.1\r\n\r\n", b"5\r\n", b"hello", b"\r\n"])]


@pytest.mark.parametrize("end", ["close", "write_eof"])
def test_an_upstream_connection_sends_what_it_holds_before_it_closes_or_half_closes(
    upstream: tuple[UpstreamConnection, Transport, WriteBatch], end: str
) -> None:
    conn, t, writes = upstream
    conn.write(b"last bytes")
    getattr(conn, end)()
    assert (t.closing if end == "close" else t.eof) and t.sent == b"last bytes"
    writes.flush()  # the turn ends: nothing is written after it
    assert t.sent == b"last bytes"


def test_an_upstream_connection_drops_what_it_holds_when_it_aborts(
    upstream: tuple[UpstreamConnection, Transport, WriteBatch],
) -> None:
    conn, t, writes = upstream
    conn.write(b"never")
    conn.abort()
    writes.flush()
    assert t.calls == []
    conn.connection_lost(None)
    conn.write(b"after the loss")
    writes.flush()
    assert t.calls == []


# ---------------------------------------------------------------- through an exchange
@pytest.mark.parametrize("size", [1, 4096, 4097, 200_000])
async def test_a_response_head_and_its_first_body_bytes_reach_the_client_whole(size: int) -> None:
    """A small first body read goes out copied after its head (one piece), a larger one as
    two pieces of one writev: the client gets the same bytes either way."""
    from tests.unit.test_resilience_review import Gateway

    gw = Gateway({"svc": {"targets": ["http://10.0.0.1:80"]}})
    conn, _ = gw.park("svc")
    _ex, client = gw.send("/svc/x")
    body = (bytes(range(256)) * (size // 256 + 1))[:size]
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + body)
    head, _, got = client.out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert head.endswith(b"\r\nContent-Length: %d" % size)
    assert got == body
