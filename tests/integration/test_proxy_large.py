"""Large bodies stream through the gateway with backpressure: 200 MB up and down while the
gateway's resident memory is sampled from /proc. Nothing here holds a body in memory: bodies
are generated, sent and hashed block by block (tests.support.upstream.pattern_bytes)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

import pytest

from tests.support.client import RawClient
from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Upstream, pattern_bytes

SIZE = 200 * 1024 * 1024
RSS_GROWTH_LIMIT_KIB = 80 * 1024


@contextlib.asynccontextmanager
async def rss_sampler(gw: GatewayProcess) -> AsyncIterator[list[int]]:
    """Samples the gateway's VmRSS (KiB) every 10 ms while the block runs."""
    samples = [gw.rss_kib()]

    async def sample() -> None:
        while True:
            samples.append(gw.rss_kib())
            await asyncio.sleep(0.01)

    task = asyncio.create_task(sample())
    try:
        yield samples
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _warm(gw: GatewayProcess) -> int:
    """One small request through every path, so the idle RSS includes imports and pools."""
    async with RawClient(gw.port) as c:
        await c.send(b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        assert (await c.response()).status == 200
        await c.send(b"GET /pattern?bytes=100000 HTTP/1.1\r\nHost: x\r\n\r\n")
        assert len((await c.response()).body) == 100000
    await asyncio.sleep(0.1)
    return gw.rss_kib()


def _config(up: Upstream) -> dict:
    return base_config(
        # a stalled exchange is still "in flight" at teardown: do not wait 30 s for it
        limits={"drain_timeout": "500ms"},
        services={"up": {"targets": [up.url]}},
        routes=[
            {
                "name": "all",
                "match": {"paths": ["/"]},
                "service": "up",
                "limits": {"max_body_bytes": "1GiB"},
            }
        ],
    )


async def test_upload_200mb_streams_with_bounded_memory() -> None:
    async with Upstream() as up, GatewayProcess(_config(up)) as gw:
        idle = await _warm(gw)
        digest = hashlib.sha256()
        async with rss_sampler(gw) as samples, RawClient(gw.port, timeout=60) as c:
            await c.send(b"POST /drain HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % SIZE)
            assert c.writer is not None
            for piece in pattern_bytes(SIZE, block=1 << 20):
                digest.update(piece)
                c.writer.write(piece)
                await c.writer.drain()
            resp = await c.response()
        assert resp.status == 200
        doc = resp.json()
        assert doc["body_len"] == SIZE
        assert doc["body_sha256"] == digest.hexdigest()
        growth = max(samples) - idle
        assert growth < RSS_GROWTH_LIMIT_KIB, f"gateway RSS grew by {growth} KiB"
        assert len(samples) > 10  # the sampler really ran during the transfer


async def test_download_200mb_streams_with_bounded_memory() -> None:
    async with Upstream() as up, GatewayProcess(_config(up)) as gw:
        idle = await _warm(gw)
        got, expected = hashlib.sha256(), hashlib.sha256()
        for piece in pattern_bytes(SIZE, block=1 << 20):
            expected.update(piece)
        received = 0
        async with rss_sampler(gw) as samples, RawClient(gw.port, timeout=60) as c:
            await c.send(b"GET /pattern?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % SIZE)
            status, _, _, headers, _ = await c.read_head()
            assert status == 200 and ("Content-Length", str(SIZE)) in headers
            first = c.pending()
            got.update(first)
            received = len(first)
            assert c.reader is not None
            while received < SIZE:
                block = await c.reader.read(1 << 20)
                assert block, f"connection closed after {received} bytes"
                got.update(block)
                received += len(block)
        assert received == SIZE
        assert got.hexdigest() == expected.hexdigest()
        growth = max(samples) - idle
        assert growth < RSS_GROWTH_LIMIT_KIB, f"gateway RSS grew by {growth} KiB"
        assert len(samples) > 10


@pytest.mark.parametrize("direction", ["up", "down"])
async def test_slow_reader_on_the_far_side_pauses_the_sender(direction: str) -> None:
    """Backpressure, not buffering: with the receiving side not reading at all, the gateway
    stops reading the sender after a few buffers (its RSS stays flat while we wait)."""
    async with Upstream() as up, GatewayProcess(_config(up)) as gw:
        idle = await _warm(gw)
        async with RawClient(gw.port, timeout=60) as c:
            assert c.writer is not None
            if direction == "down":
                # the client reads nothing while the upstream offers 100 MB
                await c.send(b"GET /pattern?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (100 << 20))
                await asyncio.sleep(1.0)
            else:
                # the upstream stops reading after the head of a 100 MB upload
                await c.send(
                    b"POST /stall HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (100 << 20)
                )
                sent = 0
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(1.0):
                        for piece in pattern_bytes(100 << 20, block=1 << 20):
                            c.writer.write(piece)
                            await c.writer.drain()
                            sent += len(piece)
                assert sent < 50 << 20, f"{sent} bytes accepted with nobody reading them"
            growth = gw.rss_kib() - idle
            assert growth < 40 * 1024, f"gateway RSS grew by {growth} KiB"
