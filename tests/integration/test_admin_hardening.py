"""The admin listener's bounds against a real gateway: an endless header line is cut with a 431
while the proxy keeps serving (a separate `apigate run` process, so that a frozen event loop
shows as slow proxy answers), and the connection cap and deadlines of an in-process gateway,
whose module constants the tests patch small."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from apigate.admin import http as admin_http
from tests.support.gateway import GatewayProcess, base_config, raw_request, running_gateway
from tests.support.upstream import Upstream

TOKEN = "s3cret-admin-token"
GET_SERVICES = f"GET /services HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"


def _config(upstream_url: str) -> dict[str, Any]:
    return base_config(
        listeners={
            "proxy": {"address": "127.0.0.1:0"},
            "admin": {"address": "127.0.0.1:0", "token": TOKEN},
        },
        services={"up": {"targets": [upstream_url]}},
        routes=[{"name": "api", "match": {"paths": ["/api"]}, "service": "up"}],
    )


async def _proxy_requests(port: int, latencies: list[float], stop: asyncio.Event) -> None:
    """Proxied requests one after another until `stop`: how long each took."""
    while not stop.is_set():
        started = time.monotonic()
        raw = await raw_request(port, b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n", read_timeout=10)
        assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.01)


async def test_an_endless_admin_header_is_cut_with_431_while_the_proxy_serves() -> None:
    """The reviewer's case: one header line that never ends, sent before any token is checked.
    The gateway grew by 255 MiB and its loop froze (1 proxied request in 10 s) as httptools
    joined every read to the partial line; nothing ever answered it."""
    budget = 64 << 20
    async with Upstream() as up, GatewayProcess(_config(up.url)) as gw:
        rss_before = gw.rss_kib()
        latencies: list[float] = []
        stop = asyncio.Event()
        proxied = asyncio.create_task(_proxy_requests(gw.port, latencies, stop))
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.admin_port)
        answer = asyncio.create_task(reader.read())  # the whole answer, up to the gateway's FIN
        writer.write(b"GET /services HTTP/1.1\r\nHost: admin\r\nX-Long: ")
        chunk = b"a" * (64 * 1024)
        sent = 0
        sent_when_answered = -1
        try:
            # Go on sending after the answer too: the refused connection's input is read and
            # discarded for a while (lingering close), which must not hold up the proxy either.
            while sent < budget:
                if answer.done() and sent_when_answered < 0:
                    sent_when_answered = sent
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), 10)
                sent += len(chunk)
        except ConnectionError:
            pass  # closed after lingering
        finally:
            writer.close()
        done, _ = await asyncio.wait({answer}, timeout=10)
        data = answer.result() if done else b""  # (no answer: the connection is still open)
        answer.cancel()
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.wait_for(proxied, 15)
        grown_kib = gw.rss_kib() - rss_before
        assert data.startswith(b"HTTP/1.1 431 "), (data[:200], grown_kib, max(latencies))
        doc = json.loads(data.partition(b"\r\n\r\n")[2])
        assert doc["error"] == "header_fields_too_large"
        # cut after a few of the gateway's reads (plus what the sockets' buffers held)
        assert 0 <= sent_when_answered <= 16 << 20, sent_when_answered
        assert grown_kib < 32 * 1024
        assert len(latencies) >= 5 and max(latencies) < 1.0, latencies


# ------------------------------------------------------------------ in-process gateway


@asynccontextmanager
async def _running_gateway(config: dict[str, Any], tmp_path: Path) -> AsyncIterator[int]:
    """A gateway in this event loop (its module constants patched by the test); yields the
    admin port."""
    async with running_gateway(config, tmp_path) as gw:
        assert gw.admin_server is not None
        yield int(gw.admin_server.sockets[0].getsockname()[1])


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def _get(stream: Stream, request: str = GET_SERVICES) -> bytes:
    """One request on a kept-alive connection: the status line."""
    reader, writer = stream
    writer.write(request.encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    await asyncio.wait_for(reader.readexactly(length), 5)
    return head.split(b"\r\n")[0]


async def _until_closed(stream: Stream, within: float = 5.0) -> bytes | None:
    """What the gateway sends until it closes the connection; None if it keeps it open."""
    try:
        return await asyncio.wait_for(stream[0].read(), within)
    except TimeoutError:
        return None


async def test_admin_connections_beyond_the_cap_get_503(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(admin_http, "MAX_CONNECTIONS", 3)
    async with Upstream() as up, _running_gateway(_config(up.url), tmp_path) as port:
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        try:
            for stream in streams:
                assert await _get(stream) == b"HTTP/1.1 200 OK"
            fourth = await asyncio.open_connection("127.0.0.1", port)
            refused = await _until_closed(fourth)  # answered, then closed
            fourth[1].close()
            assert refused is not None and refused.startswith(b"HTTP/1.1 503 "), refused
            doc = json.loads(refused.partition(b"\r\n\r\n")[2])
            assert doc["error"] == "too_many_connections"
            # the three still serve (the dashboard's polling, a scraper) ...
            for stream in streams:
                assert await _get(stream) == b"HTTP/1.1 200 OK"
            # ... and once one closes, a new connection is taken
            _, first = streams.pop(0)
            first.close()
            await first.wait_closed()
            for _ in range(100):
                raw = await raw_request(port, GET_SERVICES.encode())
                if raw.startswith(b"HTTP/1.1 200 "):
                    break
                await asyncio.sleep(0.02)
            assert raw.startswith(b"HTTP/1.1 200 "), raw[:200]
        finally:
            for _, writer in streams:
                writer.close()


async def test_silent_and_idle_admin_connections_are_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reviewer's 100 silent or half-sent connections were all open after 45 s."""
    monkeypatch.setattr(admin_http, "HEAD_TIMEOUT", 0.3)
    monkeypatch.setattr(admin_http, "IDLE_TIMEOUT", 1.0)
    async with Upstream() as up, _running_gateway(_config(up.url), tmp_path) as port:
        silent = await asyncio.open_connection("127.0.0.1", port)
        half_sent = await asyncio.open_connection("127.0.0.1", port)
        half_sent[1].write(b"GET /services HTTP/1.1\r\nHost: admin\r\n")
        kept_alive = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert await _get(kept_alive) == b"HTTP/1.1 200 OK"
            assert await _until_closed(silent) == b""  # closed quietly
            timed_out = await _until_closed(half_sent)
            assert timed_out is not None and timed_out.startswith(b"HTTP/1.1 408 "), timed_out
            # within the idle timeout the connection serves again (the dashboard polls)
            await asyncio.sleep(0.3)
            assert await _get(kept_alive) == b"HTTP/1.1 200 OK"
            assert await _until_closed(kept_alive) == b""
        finally:
            for _, writer in (silent, half_sent, kept_alive):
                writer.close()
