"""A raw HTTP/1.1 client for conformance and integration tests.

It sends exactly the bytes a test gives it and parses responses strictly by their framing
(Content-Length, chunked, no body for HEAD/1xx/204/304, or until close), so that a test can see
what the gateway really wrote: several pipelined responses, a 100 Continue before the final one,
a truncated body, or a connection the gateway closed.

    async with RawClient(port) as c:
        await c.send(b"GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n")
        resp = await c.response()
        assert resp.status == 200
        assert await c.closed() is False
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass
from typing import Any


class Truncated(Exception):
    """The connection ended before the response's framing said it would."""

    def __init__(self, partial: bytes) -> None:
        super().__init__(f"connection closed after {len(partial)} body bytes")
        self.partial = partial


@dataclass
class Response:
    status: int
    reason: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes
    chunked: bool = False
    until_close: bool = False

    def header(self, name: str) -> str | None:
        for n, v in self.headers:
            if n.lower() == name.lower():
                return v
        return None

    def header_values(self, name: str) -> list[str]:
        return [v for n, v in self.headers if n.lower() == name.lower()]

    def has_header(self, name: str) -> bool:
        return any(n.lower() == name.lower() for n, _ in self.headers)

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    def __init__(self, port: int, host: str = "127.0.0.1", *, timeout: float = 10.0) -> None:
        self.port = port
        self.host = host
        self.timeout = timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._buf = b""
        self.eof = False

    async def __aenter__(self) -> RawClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, limit=1 << 20
        )

    async def close(self) -> None:
        if self.writer is not None:
            if self.writer.transport.get_write_buffer_size():
                self.writer.transport.abort()  # unsent bytes nobody reads: do not wait on them
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()
            self.writer = None

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    # ------------------------------------------------------------------ low-level reading
    async def _fill(self, within: float | None = None) -> bool:
        """Read more bytes into the buffer; False at EOF (or a reset)."""
        assert self.reader is not None
        if self.eof:
            return False
        try:
            chunk = await asyncio.wait_for(self.reader.read(1 << 18), within or self.timeout)
        except (ConnectionResetError, BrokenPipeError):
            chunk = b""
        if not chunk:
            self.eof = True
            return False
        self._buf += chunk
        return True

    async def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            if not await self._fill():
                partial, self._buf = self._buf, b""
                raise Truncated(partial)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    async def read_exact(self, n: int) -> bytes:
        """Exactly `n` raw bytes (a tunnel's payload, say); Truncated if the peer closes."""
        return await self._read_exact(n)

    async def _read_line(self) -> bytes:
        while True:
            i = self._buf.find(b"\r\n")
            if i >= 0:
                line, self._buf = self._buf[:i], self._buf[i + 2 :]
                return line
            if len(self._buf) > 1 << 20:
                raise AssertionError("line longer than 1 MiB")
            if not await self._fill():
                raise Truncated(self._buf)

    async def read_head(self) -> tuple[int, str, str, list[tuple[str, str]], bytes]:
        while b"\r\n\r\n" not in self._buf:
            if not await self._fill():
                raise Truncated(self._buf)
        raw, _, self._buf = self._buf.partition(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status_line = lines[0].decode("latin-1")
        version, code, *reason = status_line.split(" ", 2)
        assert version.startswith("HTTP/"), f"bad status line {status_line!r}"
        headers = []
        for line in lines[1:]:
            name, sep, value = line.decode("latin-1").partition(":")
            assert sep and name == name.strip(), f"bad header line {line!r}"
            headers.append((name, value.strip()))
        return int(code), reason[0] if reason else "", version, headers, raw + b"\r\n\r\n"

    # ------------------------------------------------------------------ responses
    async def response(self, *, method: str = "GET", interim: bool = False) -> Response:
        """Read one response; 1xx responses are returned only when `interim` is true."""
        while True:
            code, reason, version, headers, raw = await self.read_head()
            resp = Response(code, reason, version, headers, b"", raw)
            if 100 <= code < 200:
                if interim or code == 101:
                    return resp
                continue
            break
        if method == "HEAD" or code in (204, 304):
            return resp
        te = resp.header("transfer-encoding")
        length = resp.header("content-length")
        if te is not None:
            assert te.lower() == "chunked", f"unexpected Transfer-Encoding {te!r}"
            assert length is None, "both Content-Length and Transfer-Encoding"
            resp.chunked = True
            resp.body = await self._read_chunked()
        elif length is not None:
            resp.body = await self._read_exact(int(length))
        else:
            resp.until_close = True
            resp.body = await self.read_until_close()
        return resp

    async def _read_chunked(self) -> bytes:
        parts = []
        while True:
            line = await self._read_line()
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while await self._read_line():  # trailers, up to the empty line
                    pass
                return b"".join(parts)
            parts.append(await self._read_exact(size))
            if await self._read_exact(2) != b"\r\n":
                raise AssertionError("chunk not followed by CRLF")

    async def read_until_close(self, within: float | None = None) -> bytes:
        while await self._fill(within):
            pass
        out, self._buf = self._buf, b""
        return out

    async def closed(self, within: float = 2.0) -> bool:
        """True if the peer closes (EOF or reset) within `within` seconds, sending nothing more.

        Unread bytes make it an error: a test asking this has read everything it expects.
        """
        assert not self._buf, f"unexpected bytes: {self._buf[:200]!r}"
        try:
            more = await self._fill(within)
        except TimeoutError:
            return False
        assert not more, f"unexpected bytes: {self._buf[:200]!r}"
        return True

    def pending(self) -> bytes:
        return self._buf


async def request(
    port: int, data: bytes, *, method: str = "GET", close_wait: float = 1.0
) -> tuple[Response, bool]:
    """Send `data` on a fresh connection, read one response, and say whether the gateway
    closed the connection afterwards (waiting up to `close_wait` seconds)."""
    async with RawClient(port) as c:
        await c.send(data)
        resp = await c.response(method=method)
        return resp, await c.closed(close_wait)
