"""The floor: the least a Python proxy on uvloop + httptools can do per request.

    python bench/run.py --scenarios plain --targets nginx,apigate \\
        --apigate-cmd "{python} bench/floor.py {config} {port}"

Not a gateway: GET only, one upstream, bodies with Content-Length only, headers copied as they
are (no hop-by-hop removal, no X-Forwarded-*, no ids, no routing, no limits, no timeouts, no
errors handled). It reads apigate's generated config for the listener port and the first
target, parses both directions with httptools and writes each message with one send, through
a keep-alive pool, held until the loop's turn ends as apigate's writes are
(apigate.http.output). Its CPU per request is what the event loop, the parser and the kernel
cost on this machine before any gateway logic: the reference for how close apigate can get with
this design (see README, Benchmark). It handles no races either (a client gone before its
upstream answers, an upstream closing an idle connection), so wrk counts a few socket errors
against it at the run boundaries, and run.py marks its row as not comparable: read its CPU per
request as the order of magnitude it is (measured: 20.5 µs against nginx's 17.8 µs; 21.6 µs
when each write was sent at once).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import httptools
import uvloop
import yaml

idle: list[Upstream] = []
connecting: set[asyncio.Task[None]] = set()  # the loop keeps tasks only weakly
held: list[tuple[Any, bytes]] = []  # writes waiting for the end of the loop's turn


def write_later(transport: Any, data: bytes) -> None:
    """Send `data` once the loop has handled its batch of events, as apigate does (see
    apigate.http.output: one message each, so a list of pairs is enough here)."""
    if not held:
        asyncio.get_running_loop().call_soon(flush)
    held.append((transport, data))


def flush() -> None:
    batch = held[:]
    held.clear()
    for transport, data in batch:
        transport.write(data)


class _Parsed(asyncio.Protocol):
    """Feeds what arrives to httptools and collects the header lines as they are."""

    parser: Any

    def __init__(self) -> None:
        self.lines: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.lines = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.lines.append(b"%s: %s\r\n" % (name, value))


class Upstream(_Parsed):
    def __init__(self) -> None:
        super().__init__()
        self.parser = httptools.HttpResponseParser(self)
        self.client: Client | None = None
        self.head = b""
        self.body = b""

    def on_headers_complete(self) -> None:
        status = b"HTTP/1.1 %d OK\r\n" % self.parser.get_status_code()
        self.head = status + b"".join(self.lines) + b"\r\n"

    def on_body(self, body: bytes) -> None:
        self.body = body

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        idle.append(self)
        if client is not None:
            write_later(client.transport, self.head + self.body)


class Client(_Parsed):
    def __init__(self, host: str, port: int) -> None:
        super().__init__()
        self.upstream = (host, port)
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""

    def on_url(self, url: bytes) -> None:
        self.url = url

    def on_message_complete(self) -> None:
        request = b"GET %s HTTP/1.1\r\n" % self.url + b"".join(self.lines) + b"\r\n"
        if idle:
            up = idle.pop()
            up.client = self
            write_later(up.transport, request)
        else:
            task = asyncio.ensure_future(self.connect(request))
            connecting.add(task)
            task.add_done_callback(connecting.discard)

    async def connect(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        _, up = await loop.create_connection(Upstream, *self.upstream)
        up.client = self
        write_later(up.transport, request)


async def serve(config: dict[str, Any], port: int) -> None:
    target = next(iter(config["services"].values()))["targets"][0]
    url = target["url"] if isinstance(target, dict) else target
    host, _, up_port = url.split("//", 1)[1].rstrip("/").partition(":")
    loop = asyncio.get_running_loop()
    await loop.create_server(lambda: Client(host, int(up_port)), "127.0.0.1", port)
    await asyncio.Event().wait()


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        uvloop.run(serve(yaml.safe_load(f), int(sys.argv[2])))
