"""A minimal async HTTP/1.1 client for tests (one request per connection, or a kept-alive one)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import httptools


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class _Parser:
    def __init__(self) -> None:
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.done = False
        self.parser = httptools.HttpResponseParser(self)

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done = True


async def request(
    port: int,
    method: str,
    path: str,
    *,
    json_body: Any = None,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> Reply:
    if json_body is not None:
        body = json.dumps(json_body).encode()
    hdrs = {"Host": f"127.0.0.1:{port}", "Connection": "close", **(headers or {})}
    if body or method in ("POST", "PUT", "PATCH"):
        hdrs["Content-Length"] = str(len(body))
        if json_body is not None:
            hdrs.setdefault("Content-Type", "application/json")
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        writer.write(head.encode() + b"\r\n" + body)
        p = _Parser()
        while not p.done:
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            p.parser.feed_data(chunk)
        return Reply(p.parser.get_status_code(), p.headers, bytes(p.body))
    finally:
        writer.close()


class KeepAliveClient:
    """Sequential requests over one connection (to check keep-alive behaviour)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self._buffer = b""

    async def __aenter__(self) -> KeepAliveClient:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()

    async def get(
        self, path: str, headers: dict[str, str] | None = None, timeout: float = 10.0
    ) -> Reply:
        assert self.reader is not None and self.writer is not None
        hdrs = {"Host": "test", **(headers or {})}
        head = f"GET {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
        self.writer.write(head.encode() + b"\r\n")
        p = _Parser()
        while not p.done:
            chunk = await asyncio.wait_for(self.reader.read(65536), timeout)
            if not chunk:
                raise ConnectionError("connection closed by the gateway")
            p.parser.feed_data(chunk)
        return Reply(p.parser.get_status_code(), p.headers, bytes(p.body))
