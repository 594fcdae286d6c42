"""Findings of the robustness review (a long-running gateway under slow, silent or pipelining
clients and misbehaving upstreams): each once grew memory without bound, cut a healthy
exchange, or failed a request that could have been served."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Upstream


def _config(up_url: str, **service: Any) -> dict[str, Any]:
    return base_config(
        services={"up": {"targets": [up_url], **service}},
        routes=[{"name": "r", "match": {"paths": ["/"]}, "service": "up"}],
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    return status, await reader.readexactly(length)


async def test_a_pipelined_response_to_a_client_that_reads_nothing_is_not_buffered() -> None:
    """The second of two pipelined downloads began while the client's transport was already
    paused, so nothing ever paused its upstream: all of it went into the gateway's buffer
    (100 MB for a 100 MB body), for as long as the client stayed."""
    async with Upstream() as up, GatewayProcess(_config(up.url)) as gw:
        before = gw.rss_kib()
        loop = asyncio.get_running_loop()
        with socket.socket() as sock:  # (a plain socket: a stream reader would read some)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await loop.sock_connect(sock, (gw.host, gw.port))
            await loop.sock_sendall(
                sock,
                b"GET /big?bytes=2900000 HTTP/1.1\r\nHost: t\r\n\r\n"
                b"GET /big?bytes=60000000 HTTP/1.1\r\nHost: t\r\n\r\n",
            )
            await asyncio.sleep(2.5)  # (the upstream streams 60 MB in well under that)
            grown = gw.rss_kib() - before
        assert grown < 20_000, f"gateway grew {grown} KiB for a client that reads nothing"


async def test_a_slow_reader_is_not_cut_by_the_response_timeout() -> None:
    """While the gateway holds the upstream back for a client that reads slowly, the wait is
    the client's (send_timeout), not the upstream's: the download was cut at
    `timeouts.response` as "upstream timed out" and the healthy instance blamed."""
    size = 6_000_000
    async with Upstream() as up:
        config = _config(up.url, timeouts={"response": "1s"})
        async with GatewayProcess(config) as gw:
            reader, writer = await asyncio.open_connection(gw.host, gw.port, limit=1 << 16)
            writer.write(b"GET /big?bytes=%d HTTP/1.1\r\nHost: t\r\n\r\n" % size)
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            await asyncio.sleep(2.5)  # reads nothing for longer than the response timeout
            body = await asyncio.wait_for(reader.readexactly(size), 10)
            writer.close()
            assert len(body) == size
            assert "timed out" not in gw.logs()


class _ClosesAfterEachResponse(asyncio.Protocol):
    """Answers one request, then closes without saying `Connection: close` (some servers do
    at their keep-alive limit): a pooled connection the gateway reuses may be closing."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        head, sep, rest = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        if len(rest) < length:
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        self.transport.close()


async def test_an_idempotent_request_with_a_body_survives_the_keep_alive_race() -> None:
    """A PUT sent on a pooled connection the upstream was closing got a 502 (43% of them at
    concurrency 1): only bodyless requests were tried again, and on another pooled
    connection, which such an upstream has closed too."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_ClosesAfterEachResponse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with GatewayProcess(_config(f"http://127.0.0.1:{port}")) as gw:
            reader, writer = await asyncio.open_connection(gw.host, gw.port)
            statuses = []
            for i in range(60):
                body = b"%010d" % i
                writer.write(b"PUT /item HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\n" + body)
                statuses.append((await _read_response(reader))[0])
            writer.close()
    finally:
        server.close()
    assert statuses == [200] * 60, statuses
