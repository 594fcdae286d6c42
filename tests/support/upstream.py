"""A real upstream HTTP server for tests, in the test's own event loop, on port 0.

It records the raw bytes of every request it receives (so conformance tests can assert what the
gateway forwarded) and behaves according to the request path:

    /status/NNN        answer with that status
    /echo (default)    JSON {method, path, query, headers, body_len, body_sha256}
    /chunked?n=K       a chunked response of K chunks
    /eof               a body with no length, ended by closing the connection
    /big?bytes=N       N bytes with Content-Length, streamed in 64 KiB writes
    /slow?ms=N         wait N ms before answering
    /reset             close the connection without answering
    /reset-mid         send a head with Content-Length 100 and 10 bytes, then close
    /ws                answer an Upgrade with 101 and echo bytes back
    /drain             read the request body fully (counting), then answer its size
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import httptools


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def header_values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


@dataclass
class UpstreamState:
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    open: set[asyncio.BaseTransport] = field(default_factory=set)
    name: str = "upstream"


class _Conn(asyncio.Protocol):
    def __init__(self, state: UpstreamState) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()
        self.tunnel = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections += 1
        self.state.open.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is not None:
            self.state.open.discard(self.transport)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            assert self.transport is not None
            self.transport.write(data)
            return
        self.raw += data
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            pass
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url = b""
        self.headers: list[tuple[str, str]] = []
        self.body = bytearray()

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self.url)
        rec = Received(
            method=self.parser.get_method().decode(),
            path=url.path.decode(),
            query=(url.query or b"").decode(),
            headers=self.headers,
            body=bytes(self.body),
            raw=bytes(self.raw),
        )
        self.raw = bytearray()
        self.state.received.append(rec)
        asyncio.get_running_loop().create_task(self.answer(rec))

    async def answer(self, rec: Received) -> None:
        t = self.transport
        assert t is not None
        q = {k: v[0] for k, v in parse_qs(rec.query).items()}
        path = rec.path
        if path.startswith("/slow"):
            await asyncio.sleep(int(q.get("ms", "100")) / 1000)
        if path.startswith("/status/"):
            code = int(path.split("/")[2])
            body = b"" if code in (204, 304) else json.dumps({"status": code}).encode()
            length = b"" if code in (204, 304) else b"Content-Length: %d\r\n" % len(body)
            t.write(b"HTTP/1.1 %d X\r\n%s\r\n%s" % (code, length, body))
        elif path.startswith("/chunked"):
            n = int(q.get("n", "3"))
            t.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for i in range(n):
                chunk = b"chunk-%d;" % i
                t.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                await asyncio.sleep(0)
            t.write(b"0\r\n\r\n")
        elif path.startswith("/eof"):
            t.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nbody-until-eof")
            t.close()
        elif path.startswith("/big"):
            n = int(q.get("bytes", "1048576"))
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            block = b"x" * 65536
            sent = 0
            while sent < n:
                part = block[: min(65536, n - sent)]
                t.write(part)
                sent += len(part)
                if t.get_write_buffer_size() > 1 << 20:
                    await asyncio.sleep(0.001)
        elif path.startswith("/reset-mid"):
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            await asyncio.sleep(0.05)
            t.abort()
        elif path.startswith("/reset"):
            t.abort()
        elif path.startswith("/ws"):
            t.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                    b"Connection: Upgrade\r\n\r\n")
            self.tunnel = True
        else:
            doc = {
                "upstream": self.state.name,
                "method": rec.method,
                "path": rec.path,
                "query": rec.query,
                "headers": rec.headers,
                "body_len": len(rec.body),
                "body_sha256": hashlib.sha256(rec.body).hexdigest(),
            }
            body = json.dumps(doc).encode()
            t.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class Upstream:
    """`async with Upstream() as up:` — a real server on 127.0.0.1, port 0."""

    def __init__(self, name: str = "upstream") -> None:
        self.state = UpstreamState(name=name)
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def received(self) -> list[Received]:
        return self.state.received

    async def __aenter__(self) -> Upstream:
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Conn(self.state), "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for transport in list(self.state.open):  # Server.close_clients() is 3.13+
            transport.abort()
        await self.server.wait_closed()
