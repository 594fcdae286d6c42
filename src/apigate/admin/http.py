"""A small HTTP/1.1 server for the admin API (not the hot path: clarity over speed).

Requests are read whole (bounded by `max_body`), dispatched to an async handler, answered with
keep-alive. Parsing is httptools, as on the proxy listener, so malformed input gets a 400 here too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, cast
from urllib.parse import parse_qs, unquote

import httptools

from apigate.http.date import DATE
from apigate.http.status import status_line

MAX_BODY = 1024 * 1024
MAX_HEAD = 32 * 1024


@dataclass
class AdminRequest:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    client_ip: str
    params: dict[str, str] = field(default_factory=dict)
    # the path as sent, still percent-encoded: names in it are decoded segment by segment,
    # so that `/consumers/a%2Fb` names the consumer "a/b" (empty: `path` has no escapes)
    raw_path: str = ""

    def json(self) -> Any:
        """The body as JSON; raises AdminError(400) with the reason when it is not."""
        if not self.body:
            raise AdminError(400, "invalid_json", "a JSON body is required")
        try:
            return json.loads(self.body)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AdminError(400, "invalid_json", f"body is not valid JSON: {exc}") from None
        except RecursionError:  # json.loads recurses per level: `[` * 5000
            raise AdminError(400, "invalid_json", "body is nested too deeply") from None


@dataclass
class AdminResponse:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class AdminError(Exception):
    def __init__(
        self, status: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_response(
    doc: Any, status: int = 200, headers: dict[str, str] | None = None
) -> AdminResponse:
    body = json.dumps(doc, indent=2, default=str).encode()
    return AdminResponse(status, body, "application/json", headers or {})


def error_response(err: AdminError) -> AdminResponse:
    return json_response({"error": err.code, "message": err.message}, err.status, err.headers)


Handler = Callable[[AdminRequest], Awaitable[AdminResponse]]


class AdminConnection(asyncio.Protocol):
    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.client_ip = ""
        self._queue: asyncio.Queue[AdminRequest | AdminError | None] = asyncio.Queue()
        self._worker: asyncio.Task[None] | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body = bytearray()
        self._head_size = 0
        self._too_big = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client_ip = peer[0] if isinstance(peer, tuple) else ""
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self._queue.put_nowait(None)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._queue.put_nowait(AdminError(400, "bad_request", f"malformed request: {exc}"))

    # parser callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = bytearray()
        self._head_size = 0
        self._too_big = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._head_size += len(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_size += len(name) + len(value)
        if self._head_size <= MAX_HEAD:
            self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        length = self._headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY:
            self._too_big = True

    def on_body(self, body: bytes) -> None:
        if len(self._body) + len(body) > MAX_BODY:
            self._too_big = True
        elif not self._too_big:
            self._body += body

    def on_message_complete(self) -> None:
        if self._too_big:
            self._queue.put_nowait(
                AdminError(413, "payload_too_large", f"request body over {MAX_BODY} bytes")
            )
            return
        if self._head_size > MAX_HEAD:
            self._queue.put_nowait(AdminError(431, "header_fields_too_large", "headers too large"))
            return
        try:
            url = httptools.parse_url(self._url)
        except httptools.HttpParserInvalidURLError:
            self._queue.put_nowait(AdminError(400, "bad_request", "invalid request target"))
            return
        query = {k: v[-1] for k, v in parse_qs((url.query or b"").decode("latin-1")).items()}
        self._queue.put_nowait(
            AdminRequest(
                method=self.parser.get_method().decode(),
                path=unquote(url.path.decode("latin-1")),
                query=query,
                headers=self._headers,
                body=bytes(self._body),
                client_ip=self.client_ip,
                raw_path=url.path.decode("latin-1"),
            )
        )

    async def _serve(self) -> None:
        """Answer requests one at a time, in order (pipelining-safe)."""
        while True:
            item = await self._queue.get()
            if item is None or self.transport is None or self.transport.is_closing():
                return
            if isinstance(item, AdminError):
                self._write(error_response(item), head_only=False, close=True)
                return
            try:
                response = await self.handler(item)
            except AdminError as err:
                response = error_response(err)
            except Exception:  # never a stack trace to the client; the log has it
                import logging

                logging.getLogger("apigate.admin").exception("admin handler failed")
                response = json_response(
                    {"error": "internal_error", "message": "unexpected error; see the gateway log"},
                    500,
                )
            close = item.headers.get("connection", "").lower() == "close"
            self._write(response, head_only=item.method == "HEAD", close=close)
            if close:
                return

    def _write(self, resp: AdminResponse, head_only: bool, close: bool) -> None:
        if self.transport is None:
            return
        parts = [
            status_line(resp.status),
            b"Server: apigate-admin\r\n",
            DATE.value,
            b"Content-Type: %s\r\n" % resp.content_type.encode(),
            b"Content-Length: %d\r\n" % len(resp.body),
            b"Cache-Control: no-store\r\n",
        ]
        for name, value in resp.headers.items():
            parts.append(b"%s: %s\r\n" % (name.encode(), value.encode()))
        if close:
            parts.append(b"Connection: close\r\n")
        parts.append(b"\r\n")
        if not head_only:
            parts.append(resp.body)
        self.transport.write(b"".join(parts))
        if close:
            self.transport.close()
