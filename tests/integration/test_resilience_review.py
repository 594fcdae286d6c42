"""Resilience review findings through a real gateway and real upstreams: a response cut in the
middle of its body (reset or stalled) is a failure for the circuit breaker; a client that leaves
while queued for a connection gives its place up; a per-try timeout longer than the overall one
does not stretch the first try; the access log's `breaker` field says what the breaker decided
for each request."""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import time
from pathlib import Path
from typing import Any

from tests.support.client import RawClient, Truncated
from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import request
from tests.support.upstream import Upstream

# a head that announces 100 bytes and 5 of them: the rest never comes (the connection stays open)
_STALLING = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"
_BREAKER = {"consecutive_failures": 3, "min_requests": 1000, "open_for": "30s"}


def _config(target: str, **service: Any) -> dict[str, Any]:
    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={"svc": {"targets": [target], "health": {"passive": None}, **service}},
        routes=[{"name": "svc", "match": {"paths": ["/"]}, "service": "svc"}],
    )


async def _breaker(gw: GatewayProcess) -> dict[str, Any]:
    breaker: dict[str, Any] = (await request(gw.admin_port, "GET", "/services/svc")).json()[
        "breaker"
    ]
    return breaker


async def _cut_response(gw: GatewayProcess, path: str) -> bytes:
    """GET `path`, expecting a response the gateway cuts short: what arrived of its body."""
    async with RawClient(gw.port) as client:
        await client.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        try:
            await client.response()
        except Truncated as cut:
            return cut.partial
    raise AssertionError("the response was complete")


async def test_responses_reset_mid_body_open_the_breaker() -> None:
    async with Upstream() as up, GatewayProcess(_config(up.url, circuit_breaker=_BREAKER)) as gw:
        for _ in range(3):
            assert await _cut_response(gw, "/reset-mid") == b"0123456789"
        state = await _breaker(gw)
        assert (state["window_requests"], state["window_failures"]) == (3, 3), state
        assert state["state"] == "open"
        refused = await request(gw.port, "GET", "/echo")
        assert refused.status == 503 and refused.json()["error"] == "circuit_open"
        assert len(up.received) == 3


async def test_responses_stalled_mid_body_open_the_breaker() -> None:
    async with Upstream() as up:
        up.state.canned["/stall-body"] = _STALLING
        config = _config(up.url, circuit_breaker=_BREAKER, timeouts={"response": "200ms"})
        async with GatewayProcess(config) as gw:
            for _ in range(3):
                assert await _cut_response(gw, "/stall-body") == b"hello"
            state = await _breaker(gw)
            assert state["state"] == "open" and state["window_failures"] == 3, state


async def _reset_after(port: int, path: str, seconds: float) -> None:
    """Send a request, then reset the connection (RST) after `seconds`."""
    async with RawClient(port) as client:
        await client.send(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        await asyncio.sleep(seconds)
        assert client.writer is not None
        sock = client.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        client.writer.transport.abort()


async def test_a_client_that_leaves_while_queued_gives_its_place_up() -> None:
    """max_connections 1, max_pending 1: A holds the connection, B queues and resets; C, who
    came after B left, must wait for the connection (it was refused: 503 upstream_overloaded)."""
    async with Upstream() as up:
        config = _config(up.url, max_connections=1, max_pending=1, timeouts={"connect": "3s"})
        async with GatewayProcess(config) as gw:
            first = asyncio.create_task(request(gw.port, "GET", "/slow?ms=800&n=a"))
            await asyncio.sleep(0.2)
            await _reset_after(gw.port, "/echo?n=b", 0.1)
            await asyncio.sleep(0.1)
            third = await request(gw.port, "GET", "/echo?n=c")
            assert third.status == 200, third.body
            assert (await first).status == 200
            assert [r.query for r in up.received] == ["ms=800&n=a", "n=c"]


async def test_the_first_try_ends_at_the_overall_timeout() -> None:
    """timeouts.response 400 ms, per_try_timeout 3 s: the upstream answering after 1.5 s must
    not be waited for (the client had its 200 after 1.5 s instead of a 504 at 0.4 s)."""
    retries = {"attempts": 1, "on": ["timeout"], "per_try_timeout": "3s", "backoff": "1ms"}
    async with Upstream() as up:
        config = _config(up.url, retries=retries, timeouts={"response": "400ms"})
        async with GatewayProcess(config) as gw:
            started = time.monotonic()
            reply = await request(gw.port, "GET", "/slow?ms=1500")
            elapsed = time.monotonic() - started
            assert reply.status == 504 and reply.json()["error"] == "upstream_timeout"
            assert 0.35 <= elapsed < 0.9, f"answered after {elapsed:.2f} s"


async def test_the_access_log_tells_the_breakers_decision(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    breaker = {**_BREAKER, "open_for": "300ms", "half_open_requests": 1}
    async with Upstream() as up:
        config = _config(up.url, circuit_breaker=breaker)
        config["plugins"] = {"access_log": {"path": str(log_path)}}
        async with GatewayProcess(config) as gw:
            statuses = [
                (await request(gw.port, "GET", f"/status/500?{i}")).status for i in (1, 2, 3)
            ]
            assert statuses == [500, 500, 500]
            assert (await request(gw.port, "GET", "/echo?refused")).status == 503
            await asyncio.sleep(0.35)
            assert (await request(gw.port, "GET", "/echo?probe")).status == 200
            assert (await _breaker(gw))["state"] == "closed"
            assert (await request(gw.port, "GET", "/echo?after")).status == 200
    # (the access log is flushed when the gateway stops)
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(d["status"], d.get("breaker")) for d in lines] == [
        (500, None),
        (500, None),
        (500, None),  # it reached the upstream: logged "open", the state after it
        (503, "open"),
        (200, "half_open"),  # the probe that closed the breaker: logged without the field
        (200, None),
    ]
