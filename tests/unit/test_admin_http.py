"""AdminConnection without sockets: raw bytes into data_received, a fake transport recording
what the connection writes and whether it paused, closed or half-closed, and a handler
recording the requests it answers. Timeouts are the module's constants, patched small."""

from __future__ import annotations

import asyncio
import json
import re
import tracemalloc
from collections.abc import Callable
from typing import Any

import pytest

from apigate.admin import http as admin_http
from apigate.admin.http import AdminConnection, AdminRequest, AdminResponse, json_response
from tests.unit.test_protocol import FakeTransport

HEAD = b"GET /services HTTP/1.1\r\nHost: admin\r\n"
REQUEST = HEAD + b"\r\n"

# ------------------------------------------------------------------ fakes


class Client:
    """One connection: `send` feeds bytes, `statuses()` parses what was answered."""

    def __init__(
        self,
        *,
        connections: set[AdminConnection] | None = None,
        gate: asyncio.Event | None = None,
    ) -> None:
        self.requests: list[AdminRequest] = []
        self.gate = gate
        self.transport = FakeTransport()
        self.conn = AdminConnection(self.handle, connections if connections is not None else set())
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    async def handle(self, req: AdminRequest) -> AdminResponse:
        self.requests.append(req)
        if self.gate is not None:
            await self.gate.wait()
        return json_response({"path": req.path})

    def send(self, data: bytes) -> None:
        self.conn.data_received(data)

    def lose(self) -> None:
        self.transport.closed = True
        self.conn.connection_lost(None)

    def statuses(self) -> list[int]:
        return [int(s) for s in re.findall(rb"HTTP/1\.1 (\d{3}) ", bytes(self.transport.written))]

    def last_error(self) -> dict[str, Any]:
        body = bytes(self.transport.written).rsplit(b"\r\n\r\n", 1)[1]
        doc: dict[str, Any] = json.loads(body)
        return doc


async def settle(rounds: int = 5) -> None:
    """Let the worker task take and answer what is queued."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def wait_until(condition: Callable[[], bool], within: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------ head size


async def test_an_endless_header_line_is_cut_with_431_and_memory_stays_bounded() -> None:
    """The reviewer's case: one field line never ends. httptools kept all of it (joined to each
    read, quadratic), and nothing answered: 55 → 310 MiB and a frozen event loop."""
    c = Client()
    c.send(HEAD + b"X-Long: ")
    chunk = b"a" * (64 * 1024)
    tracemalloc.start()
    try:
        for _ in range(160):  # 10 MiB in 64 KiB reads
            c.send(chunk)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, peak  # a few reads' worth, not the 10 MiB sent
    await settle()
    assert c.statuses() == [431]
    assert c.last_error()["error"] == "header_fields_too_large"
    assert c.transport.eof_written  # answered, then closed lingering
    assert c.requests == []


async def test_a_head_of_many_lines_over_the_limit_is_refused_before_it_ends() -> None:
    c = Client()
    c.send(HEAD)
    line = b"X-Filler: " + b"f" * 1000 + b"\r\n"
    for _ in range(admin_http.MAX_HEAD // len(line) + 2):
        c.send(line)  # never the blank line that would end the head
    await settle()
    assert c.statuses() == [431]
    assert c.requests == []


async def test_an_endless_request_target_is_refused_with_414() -> None:
    c = Client()
    c.send(b"GET /" + b"a" * 1000)
    for _ in range(20):
        c.send(b"a" * 1000)
    await settle()
    assert c.statuses() == [414]
    assert c.last_error()["error"] == "uri_too_long"


async def test_a_head_within_the_limit_is_served_however_it_is_split() -> None:
    """The backstop counts whole reads: a head just within MAX_HEAD, fed in small reads or with
    a body in the same reads, is not taken for an endless one."""
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 900) for i in range(30))  # ~27 KiB
    c = Client()
    data = HEAD + fields + b"\r\n"
    for i in range(0, len(data), 100):
        c.send(data[i : i + 100])
    body = b'{"k": "' + b"x" * 500_000 + b'"}'
    post = b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n%s\r\n" % (len(body), fields)
    data = post + body
    for i in range(0, len(data), 64 * 1024):
        c.send(data[i : i + 64 * 1024])
    await settle()
    assert c.statuses() == [200, 200]
    assert c.requests[1].body == body


# ------------------------------------------------------------------ body size


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_read() -> None:
    """It used to be read (and dropped) to its end before the 413: a client announcing a huge
    body, and sending it slowly or not at all, got no answer."""
    c = Client()
    c.send(b"PUT /config HTTP/1.1\r\nHost: a\r\nContent-Length: %d\r\n\r\n" % (64 << 20))
    await settle()
    assert c.statuses() == [413]
    assert c.last_error()["error"] == "payload_too_large"
    assert c.transport.eof_written


async def test_a_chunked_body_over_the_limit_is_refused_as_it_grows() -> None:
    c = Client()
    c.send(b"PUT /config HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    for _ in range(admin_http.MAX_BODY // 0x10000 + 1):
        c.send(chunk)
    await settle()
    assert c.statuses() == [413]


async def test_an_endless_trailer_line_is_cut_with_431() -> None:
    """The trailer section of a chunked body is buffered by httptools as the head is."""
    c = Client()
    c.send(b"PUT /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n")
    c.send(b"2\r\n{}\r\n0\r\nX-Trailer: ")
    for _ in range(160):
        c.send(b"t" * (64 * 1024))
    await settle()
    assert c.statuses() == [431]
    assert c.requests == []


async def test_trailer_fields_are_not_taken_as_header_fields() -> None:
    c = Client()
    c.send(
        b"PUT /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\n{}\r\n0\r\nAuthorization: Bearer t\r\nHost: b\r\n\r\n"
    )
    await settle()
    assert c.statuses() == [200]
    assert c.requests[0].body == b"{}"
    assert c.requests[0].headers == {"host": "a", "transfer-encoding": "chunked"}


# ------------------------------------------------------------------ deadlines


async def test_a_head_not_finished_in_time_gets_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_http, "HEAD_TIMEOUT", 0.05)
    c = Client()
    c.send(HEAD)  # and never the blank line
    await wait_until(lambda: c.transport.eof_written)
    assert c.statuses() == [408]
    assert c.last_error()["error"] == "request_timeout"


async def test_a_silent_new_connection_is_closed_quietly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_http, "HEAD_TIMEOUT", 0.05)
    c = Client()
    await wait_until(lambda: c.transport.closed)
    assert c.transport.written == b""


async def test_a_stalled_body_gets_408(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_http, "BODY_TIMEOUT", 0.05)
    c = Client()
    c.send(b"PUT /x HTTP/1.1\r\nHost: a\r\nContent-Length: 10\r\n\r\nabc")
    await wait_until(lambda: c.transport.eof_written)
    assert c.statuses() == [408]


async def test_an_idle_keep_alive_connection_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_http, "IDLE_TIMEOUT", 0.05)
    c = Client()
    c.send(REQUEST)
    await settle()
    assert c.statuses() == [200] and not c.transport.closed
    await wait_until(lambda: c.transport.closed)
    assert c.statuses() == [200]  # closed quietly


async def test_no_deadline_runs_while_a_request_is_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A slow handler is ours, not the client's: neither the idle nor the head deadline of the
    next request (which the client finished sending) may close the connection meanwhile."""
    monkeypatch.setattr(admin_http, "IDLE_TIMEOUT", 0.05)
    monkeypatch.setattr(admin_http, "HEAD_TIMEOUT", 0.05)
    gate = asyncio.Event()
    c = Client(gate=gate)
    c.send(REQUEST + REQUEST)
    await asyncio.sleep(0.2)
    assert not c.transport.closed and c.statuses() == []
    gate.set()
    await settle()
    assert c.statuses() == [200, 200]


# ------------------------------------------------------------------ pipelining and connections


async def test_reading_pauses_once_max_pipelined_requests_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admin_http, "MAX_PIPELINED", 4)
    gate = asyncio.Event()
    c = Client(gate=gate)
    c.send(REQUEST)
    await settle()  # the worker holds the first request
    for _ in range(3):
        c.send(REQUEST)
    assert not c.transport.paused
    c.send(REQUEST)  # four wait now
    assert c.transport.paused
    gate.set()
    await settle(20)
    assert c.statuses() == [200] * 5
    assert not c.transport.paused and not c.transport.closed


async def test_more_pipelined_requests_in_one_read_than_may_wait_get_503(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(admin_http, "MAX_PIPELINED", 4)
    c = Client()
    c.send(REQUEST * 100)
    await settle(20)
    # four queued and answered in order, then the refusal, then nothing more is read
    assert c.statuses() == [200] * 4 + [503]
    assert c.last_error()["error"] == "too_many_pipelined"
    assert len(c.requests) == 4 and c.transport.eof_written


async def test_connections_beyond_the_cap_get_503(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_http, "MAX_CONNECTIONS", 2)
    open_: set[AdminConnection] = set()
    first, second = Client(connections=open_), Client(connections=open_)
    third = Client(connections=open_)
    assert third.statuses() == [503] and third.transport.closed
    assert third.last_error()["error"] == "too_many_connections"
    assert len(open_) == 2
    first.lose()
    fourth = Client(connections=open_)
    fourth.send(REQUEST)
    await settle()
    assert fourth.statuses() == [200]
    second.lose()
    fourth.lose()
    assert open_ == set()


# ------------------------------------------------------------------ what stays as it was


async def test_pipelined_requests_are_answered_in_order_before_a_malformed_one() -> None:
    c = Client()
    c.send(REQUEST + b"GET /b HTTP/1.1\r\nHost: a\r\n\r\nNOT HTTP\r\n\r\n")
    await settle(10)
    assert c.statuses() == [200, 200, 400]
    assert [r.path for r in c.requests] == ["/services", "/b"]


async def test_an_upgrade_request_is_answered_and_then_the_connection_closes() -> None:
    """llhttp stops after an upgrade request's head; the exception escaped data_received."""
    c = Client()
    c.send(HEAD + b"Connection: upgrade\r\nUpgrade: h2c\r\n\r\n" + REQUEST)
    await settle()
    assert c.statuses() == [200]
    assert c.transport.eof_written


async def test_a_lost_connection_stops_its_worker() -> None:
    gate = asyncio.Event()
    c = Client(gate=gate)
    c.send(REQUEST)
    await settle()
    c.lose()
    gate.set()
    await settle()
    assert c.statuses() == []
    worker = c.conn._worker
    assert worker is not None and worker.done()
    assert "closed" in repr(c.conn)
