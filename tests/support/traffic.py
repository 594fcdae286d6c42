"""Small helpers for tests that watch where traffic goes and wait for conditions."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from apigate.registry.events import EVENTS
from tests.support.gateway import raw_request


def last_seq() -> int:
    """The sequence number of the newest control-plane event (0 when none)."""
    recent = EVENTS.recent(limit=1)
    return int(recent[-1]["seq"]) if recent else 0


async def who(port: int, host: str = "svc") -> str:
    """The name of the upstream that answered /echo, or "HTTP/1.1 nnn" for a gateway error."""
    request = b"GET /echo HTTP/1.1\r\nHost: %s\r\n\r\n" % host.encode()
    resp = await raw_request(port, request)
    head, _, body = resp.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return head.split(b"\r\n")[0].decode(errors="replace")[:12]
    return str(json.loads(body)["upstream"])


async def spread(port: int, n: int, host: str = "svc") -> Counter[str]:
    """Which upstream answered each of `n` sequential requests."""
    return Counter([await who(port, host) for _ in range(n)])


async def eventually(check: Callable[[], bool | Awaitable[bool]], timeout: float) -> float:
    """Seconds until `check()` (plain or async) held; the test fails after `timeout`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return loop.time() - start
        if loop.time() - start > timeout:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.02)


async def until(
    probe: Callable[[], Awaitable[Any]],
    ok: Callable[[Any], bool],
    *,
    within: float = 8.0,
    what: str = "",
) -> Any:
    """Poll `probe` until `ok` holds of its result; the result, or AssertionError with the last."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = await probe()
        if ok(result):
            return result
        if loop.time() > deadline:
            raise AssertionError(f"not {what} within {within}s: {result!r}")
        await asyncio.sleep(0.02)
