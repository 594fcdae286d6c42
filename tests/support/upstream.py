"""A real upstream HTTP server for tests, in the test's own event loop, on port 0.

It records the raw bytes of every request it receives (so conformance tests can assert what the
gateway forwarded) and behaves according to the request path:

    /status/NNN        answer with that status
    /echo (default)    JSON {method, path, query, headers, body_len, body_sha256}
    /chunked?n=K       a chunked response of K chunks
    /eof               a body with no length, ended by closing the connection
    /eof-reset         a body with no length, then the connection is reset (not a clean end)
    /big?bytes=N       N bytes with Content-Length, streamed in 64 KiB writes
    /slow?ms=N         wait N ms before answering
    /reset             reset the connection (RST) without answering
    /reset-mid         send a head with Content-Length 100 and 10 bytes, then reset
                       (/reset-mid-json: the head says application/json)
    /ws                answer an Upgrade with 101 and echo bytes back
    /ws-half           answer an Upgrade with 101 and b"bye", then half-close: what the client
                       sends after that is kept in `state.tunnel_bytes` (`state.tunnel_eof` once
                       the client half-closes too, which closes the connection)
    /drain             stream the request body into a hash without keeping it (`Received.body`
                       stays empty; `body_len`/`body_sha256` are set), answer the echo document
    /pattern?bytes=N   N bytes of `pattern_bytes` with Content-Length, honouring backpressure
    /stall             stop reading after the head: the body is never read, nothing answered
    /hop               a response carrying hop-by-hop headers the gateway must remove
    anything in `state.canned[path]`: written verbatim (then closed if the bytes say
                       `Connection: close`), for response-side conformance cases;
                       `state.canned_parts[path]`: the same in parts, PART_PAUSE apart
    /respond?status=N&h=Name:Value&h=...&ms=M&cut=1
                       status N (200) with the given header fields, after M ms (0), and a JSON
                       body {upstream, n (requests this upstream had received), method, path,
                       query, headers}; `cut=1` announces 100 more bytes than it sends, then
                       resets (a response cut off mid-body, with whatever headers were asked)

`state.override` ("/status/503", "/reset", "/slow?ms=500"...), when set, makes this upstream
answer every request as if that were its path and query (one instance of a service failing
while another, fed the same requests, answers normally); `received` keeps the real request.

Every answer to HEAD is the head alone (as a correct server sends it), except canned ones.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import httptools

PATTERN_BLOCK = 65536


def pattern_block(index: int) -> bytes:
    """Block `index` of the deterministic download/upload pattern: position-dependent, so a
    lost, repeated or reordered block changes the hash."""
    return index.to_bytes(8, "big") * (PATTERN_BLOCK // 8)


def pattern_bytes(total: int, block: int = PATTERN_BLOCK) -> Iterator[bytes]:
    """The pattern as `block`-sized pieces (generated, never held whole in memory)."""
    index = 0
    sent = 0
    while sent < total:
        piece = pattern_block(index)[: min(block, total - sent)]
        yield piece
        sent += len(piece)
        index += 1


@dataclass
class Received:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes  # the request as received (for /drain: the head and first bytes only)
    body_len: int = -1
    body_sha256: str = ""
    connection: int = 0  # which connection it came on (1, 2, ... in accept order)

    def __post_init__(self) -> None:
        if self.body_len < 0:
            self.body_len = len(self.body)
            self.body_sha256 = hashlib.sha256(self.body).hexdigest()

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def header_values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]


PART_PAUSE = 0.2  # seconds between the parts of a canned_parts response


@dataclass
class UpstreamState:
    received: list[Received] = field(default_factory=list)
    connections: int = 0
    open: set[asyncio.BaseTransport] = field(default_factory=set)
    name: str = "upstream"
    canned: dict[str, bytes] = field(default_factory=dict)  # path -> raw response bytes
    # path -> raw response bytes written in parts, PART_PAUSE apart (each arrives in its own
    # read at the gateway)
    canned_parts: dict[str, list[bytes]] = field(default_factory=dict)
    bytes_received: int = 0  # every byte read on any connection, complete request or not
    override: str | None = None  # answer every request as if its target were this
    tunnel_bytes: bytearray = field(default_factory=bytearray)  # /ws-half: sent after our EOF
    tunnel_eof: bool = False  # /ws-half: the client half-closed its side too


class _Conn(asyncio.Protocol):
    def __init__(self, state: UpstreamState) -> None:
        self.state = state
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.raw = bytearray()
        self.tunnel = False
        self.half_closed = False  # /ws-half: we sent EOF; keep what arrives
        self.streaming: hashlib._Hash | None = None  # /drain: body hashed, not kept
        self.streamed = 0
        self.can_write = asyncio.Event()
        self.can_write.set()

    def pause_writing(self) -> None:
        self.can_write.clear()

    def resume_writing(self) -> None:
        self.can_write.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.state.connections += 1
        self.number = self.state.connections
        self.state.open.add(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.can_write.set()
        if self.transport is not None:
            self.state.open.discard(self.transport)

    def eof_received(self) -> bool | None:
        if self.half_closed:
            self.state.tunnel_eof = True
        return None  # close

    def data_received(self, data: bytes) -> None:
        self.state.bytes_received += len(data)
        if self.tunnel:
            assert self.transport is not None
            if self.half_closed:
                self.state.tunnel_bytes += data
            else:
                self.transport.write(data)
            return
        if self.streaming is None:
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

    def on_headers_complete(self) -> None:
        if self.url.startswith(b"/stall"):
            assert self.transport is not None
            self.transport.pause_reading()  # never read the body, never answer
        if self.url.startswith(b"/drain"):
            self.streaming = hashlib.sha256()
            self.streamed = 0

    def on_body(self, body: bytes) -> None:
        if self.streaming is not None:
            self.streaming.update(body)
            self.streamed += len(body)
        else:
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
            connection=self.number,
        )
        if self.streaming is not None:
            rec.body_len, rec.body_sha256 = self.streamed, self.streaming.hexdigest()
            self.streaming = None
        self.raw = bytearray()
        self.state.received.append(rec)
        asyncio.get_running_loop().create_task(self.answer(rec))

    async def answer(self, rec: Received) -> None:
        t = self.transport
        assert t is not None
        path, query = rec.path, rec.query
        if self.state.override is not None:
            path, _, query = self.state.override.partition("?")
        q = {k: v[0] for k, v in parse_qs(query).items()}
        if path.startswith("/slow"):
            await asyncio.sleep(int(q.get("ms", "100")) / 1000)
        canned = self.state.canned.get(path)
        if rec.method == "HEAD" and canned is None:
            t = _HeadOnly(t)  # type: ignore[assignment]
        parts = self.state.canned_parts.get(path)
        if parts is not None:
            for n, part in enumerate(parts):
                if n:
                    await asyncio.sleep(PART_PAUSE)
                t.write(part)
        elif canned is not None:
            t.write(canned)  # verbatim, even for HEAD
            if b"\r\nconnection: close\r\n" in canned.partition(b"\r\n\r\n")[0].lower() + b"\r\n":
                t.close()
        elif path.startswith("/respond"):
            await self._respond(t, rec, parse_qs(query))
        elif path.startswith("/pattern"):
            n = int(q.get("bytes", "1048576"))
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % n)
            for piece in pattern_bytes(n):
                await self.can_write.wait()
                if t.is_closing():
                    return
                t.write(piece)
        elif path.startswith("/hop"):
            body = b"hop"
            t.write(
                b"HTTP/1.1 200 OK\r\nConnection: X-Bar, keep-alive\r\nX-Bar: secret\r\n"
                b"Keep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\nTE: trailers\r\n"
                b"Trailers: x\r\nTrailer: X-Sum\r\nUpgrade: h2c\r\nProxy-Connection: keep-alive\r\n"
                b"X-End-To-End: kept\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        elif path.startswith("/status/"):
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
        elif path.startswith("/eof-reset"):
            t.write(b"HTTP/1.1 200 OK\r\n\r\npartial-body")
            await asyncio.sleep(0.05)
            _reset(t)
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
            kind = b"Content-Type: application/json\r\n" if "json" in path else b""
            t.write(b"HTTP/1.1 200 OK\r\n%sContent-Length: 100\r\n\r\n0123456789" % kind)
            await asyncio.sleep(0.05)
            _reset(t)
        elif path.startswith("/reset"):
            _reset(t)
        elif path.startswith("/ws-half"):
            t.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\nbye"
            )
            self.tunnel = self.half_closed = True
            t.write_eof()
        elif path.startswith("/ws"):
            t.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\n\r\n"
            )
            self.tunnel = True
        else:
            doc = {
                "upstream": self.state.name,
                "method": rec.method,
                "path": rec.path,
                "query": rec.query,
                "headers": rec.headers,
                "body_len": rec.body_len,
                "body_sha256": rec.body_sha256,
            }
            body = json.dumps(doc).encode()
            t.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )

    async def _respond(self, t: asyncio.Transport, rec: Received, q: dict[str, list[str]]) -> None:
        delay = int(q.get("ms", ["0"])[0])
        if delay:
            await asyncio.sleep(delay / 1000)
        status = int(q.get("status", ["200"])[0])
        doc = {
            "upstream": self.state.name,
            "n": len(self.state.received),
            "method": rec.method,
            "path": rec.path,
            "query": rec.query,
            "headers": rec.headers,
        }
        body = json.dumps(doc).encode()
        fields = [tuple(h.split(":", 1)) for h in q.get("h", [])]
        if not any(name.strip().lower() == "content-type" for name, _ in fields):
            fields.append(("Content-Type", "application/json"))
        head = "".join(f"{name.strip()}: {value.strip()}\r\n" for name, value in fields)
        cut = q.get("cut", ["0"])[0] == "1"
        length = len(body) + (100 if cut else 0)
        t.write(
            b"HTTP/1.1 %d X\r\n%sContent-Length: %d\r\n\r\n%s"
            % (status, head.encode("latin-1"), length, body)
        )
        if cut:
            await asyncio.sleep(0.05)
            _reset(t)


def _reset(transport: asyncio.Transport) -> None:
    """Close with a TCP reset (RST), not a FIN: SO_LINGER with a zero timeout, then close."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _HeadOnly:
    """Wraps a transport for a HEAD answer: the head goes out, body bytes are dropped."""

    def __init__(self, transport: asyncio.Transport) -> None:
        self._t = transport
        self._in_head = True

    def write(self, data: bytes) -> None:
        if self._in_head:
            head, sep, _ = data.partition(b"\r\n\r\n")
            self._t.write(head + sep)
            self._in_head = not sep

    def __getattr__(self, name: str) -> object:
        return getattr(self._t, name)


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
