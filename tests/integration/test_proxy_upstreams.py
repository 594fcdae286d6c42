"""The upstream side: connection pooling (reuse, idle expiry, limits), retries after connect
failures and the keep-alive race, and what a client that goes away does to upstream
connections (they are never reused half-read)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.client import RawClient, request
from tests.support.env import Env, env_fixture, shared_env_fixture
from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(up: Upstream) -> dict[str, Any]:
    dead = f"http://127.0.0.1:{_closed_port()}"
    # Every service has its own pools (one per instance), so each one's idle connections are
    # closed after a short idle timeout: the tests below count the upstream's open connections.
    idle = {"idle": "300ms"}
    return base_config(
        services={
            "up": {"targets": [up.url], "timeouts": idle, "health": {"passive": None}},
            "mixed": {"targets": [dead, up.url], "timeouts": idle, "health": {"passive": None}},
            "one": {"targets": [up.url], "timeouts": idle, "max_connections": 1},
            "short": {
                "targets": [up.url],
                "timeouts": {"response": "1s", **idle},
                "health": {"passive": None},
            },
        },
        routes=[
            {"name": "up", "match": {"paths": ["/"]}, "service": "up"},
            {
                "name": "mixed",
                "match": {"paths": ["/mixed"]},
                "service": "mixed",
                "strip_prefix": True,
            },
            {"name": "one", "match": {"paths": ["/one"]}, "service": "one", "strip_prefix": True},
            {
                "name": "short",
                "match": {"paths": ["/short"]},
                "service": "short",
                "strip_prefix": True,
                "limits": {"max_body_bytes": "1GiB"},
            },
        ],
    )


shared_env = shared_env_fixture(_config)
env = env_fixture()


async def _send(env: Env, data: bytes) -> Any:
    resp, _ = await request(env.port, data, close_wait=0.01)
    return resp


async def _get(env: Env, path: bytes) -> Any:
    return await _send(env, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path)


async def test_idle_pooled_connection_expires(env: Env) -> None:
    await _get(env, b"/echo?1")
    await _get(env, b"/echo?2")
    await asyncio.sleep(0.6)  # longer than timeouts.idle (300 ms)
    await _get(env, b"/echo?3")
    a, b, c = env.up.received
    assert a.connection == b.connection != c.connection


async def test_connection_closed_by_the_upstream_is_not_reused(env: Env) -> None:
    await _get(env, b"/echo")
    first = env.up.received[0].connection
    for transport in list(env.up.state.open):  # the upstream drops its idle connections
        transport.close()
    await asyncio.sleep(0.1)
    assert (await _get(env, b"/echo")).status == 200
    assert env.up.received[1].connection != first


async def test_keep_alive_race_is_retried_for_idempotent_requests(env: Env) -> None:
    """A pooled connection that dies without a byte of response is what a keep-alive race
    looks like: an idempotent request is retried once on a fresh connection."""
    await _get(env, b"/echo")  # a pooled connection exists
    resp = await _get(env, b"/reset")
    assert resp.status == 502
    assert [r.path for r in env.up.received] == ["/echo", "/reset", "/reset"]


async def test_keep_alive_race_is_not_retried_for_post(env: Env) -> None:
    await _get(env, b"/echo")
    resp = await _send(env, b"POST /reset HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\n\r\nx")
    assert resp.status == 502
    assert [r.path for r in env.up.received] == ["/echo", "/reset"]


@pytest.mark.parametrize("method", [b"GET", b"POST"])
async def test_connect_failure_is_retried_on_another_instance(env: Env, method: bytes) -> None:
    """Nothing reached the refusing instance, so any method may go to the next one."""
    for i in range(4):  # round robin: every other pick is the dead instance
        resp = await _send(
            env,
            b"%s /mixed/echo?%d HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n\r\nbody" % (method, i),
        )
        assert resp.status == 200, resp.body
        assert resp.json()["body_len"] == 4
    assert len(env.up.received) == 4


async def test_service_connection_limit_is_503(env: Env) -> None:
    async with RawClient(env.port) as slow:
        await slow.send(b"GET /one/slow?ms=500 HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.1)
        resp = await _get(env, b"/one/echo")
        assert resp.status == 503 and resp.json()["error"] == "upstream_overloaded"
        assert (await slow.response()).status == 200
    assert (await _get(env, b"/one/echo")).status == 200  # the slot is free again


async def _no_upstream_connections(env: Env, seconds: float = 1.0) -> bool:
    """Wait until the upstream has no open connection (earlier tests' pooled ones idle out)."""
    for _ in range(int(seconds / 0.02)):
        if not env.up.state.open:
            return True
        await asyncio.sleep(0.02)
    return not env.up.state.open


async def test_client_gone_mid_response_aborts_the_upstream_connection(env: Env) -> None:
    assert await _no_upstream_connections(env)
    async with RawClient(env.port) as c:
        await c.send(b"GET /pattern?bytes=%d HTTP/1.1\r\nHost: x\r\n\r\n" % (50 << 20))
        await c.read_head()
    # the client closed with 50 MB unread: that upstream connection cannot be reused (it is
    # aborted at once: well within the wait, and before the 300 ms idle timeout could matter)
    assert await _no_upstream_connections(env, seconds=0.25)
    assert (await _get(env, b"/echo")).status == 200
    first, second = env.up.received
    assert second.connection != first.connection


async def test_client_reset_while_waiting_aborts_the_upstream_connection(env: Env) -> None:
    """(A client that only half-closes, with FIN, still gets its response: curl-style.)"""
    assert await _no_upstream_connections(env)
    c = RawClient(env.port)
    await c.connect()
    await c.send(b"GET /slow?ms=500 HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.sleep(0.1)
    assert len(env.up.state.open) == 1
    assert c.writer is not None
    sock = c.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.writer.transport.abort()  # RST
    await c.close()
    await asyncio.sleep(0.15)
    assert not env.up.state.open


# ------------------------------------------------------------------ the response timeout
async def test_upload_longer_than_the_response_timeout(env: Env) -> None:
    """timeouts.response (1 s here) waits for the upstream, not for a slow client: an upload
    that takes 1.5 s succeeds. (It once ran from the request head on: 504 mid-upload, so any
    upload longer than 30 s failed with the default.)"""
    async with RawClient(env.port) as c:
        await c.send(b"POST /short/echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n")
        for byte in b"abcde":
            await asyncio.sleep(0.3)
            await c.send(bytes([byte]))
        resp = await c.response()
        assert resp.status == 200 and resp.json()["body_len"] == 5


async def test_response_timeout_counts_from_the_end_of_the_request(env: Env) -> None:
    loop = asyncio.get_running_loop()
    async with RawClient(env.port) as c:
        await c.send(b"POST /short/slow?ms=3000 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n")
        await asyncio.sleep(0.8)
        await c.send(b"ab")
        t0 = loop.time()
        resp = await c.response()
        assert resp.status == 504
        assert 0.9 <= loop.time() - t0 < 2.2


async def test_upstream_that_stops_reading_the_body_times_out(env: Env) -> None:
    """An upstream that accepts a head and never reads the body: once the gateway cannot
    write, the response timeout runs, and the client gets a 504 (not an endless wait)."""
    loop = asyncio.get_running_loop()
    async with RawClient(env.port, timeout=10) as c:
        assert c.writer is not None
        size = 200 << 20
        await c.send(b"POST /short/stall HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % size)
        t0 = loop.time()

        async def upload() -> None:
            assert c.writer is not None
            block = b"u" * (1 << 20)
            with contextlib.suppress(ConnectionError):
                for _ in range(size >> 20):
                    c.writer.write(block)
                    await c.writer.drain()

        sending = asyncio.create_task(upload())
        try:
            resp = await c.response()
        finally:
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sending
        assert resp.status == 504
        assert loop.time() - t0 < 5


# ------------------------------------------------------------------ the connect timeout
@contextlib.contextmanager
def _blackhole() -> Iterator[int]:
    """A loopback port where connects hang: a listener that never accepts, its accept queue
    filled, so the kernel drops further SYNs (no traffic leaves the machine)."""
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = int(listener.getsockname()[1])
        for _ in range(3):
            filler = socket.socket()
            fillers.append(filler)
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(("127.0.0.1", port))
        yield port
    finally:
        for s in [*fillers, listener]:
            s.close()


async def test_connect_timeout_is_504() -> None:
    with _blackhole() as port:
        cfg = base_config(
            services={
                "hole": {"targets": [f"http://127.0.0.1:{port}"], "timeouts": {"connect": "300ms"}}
            },
            routes=[{"name": "hole", "match": {"paths": ["/"]}, "service": "hole"}],
        )
        async with GatewayProcess(cfg) as gw:
            await asyncio.sleep(0.2)  # let the fillers' handshakes settle
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            resp, _ = await request(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", close_wait=0.01)
            assert resp.status == 504 and resp.json()["error"] == "upstream_connect_timeout"
            assert 0.25 <= loop.time() - t0 < 2.0
            assert str(port) not in resp.body.decode()  # the upstream's address: logs only


async def test_a_connect_error_names_the_upstream_in_the_log_never_to_the_client() -> None:
    """Clients learn nothing of the network behind the gateway (as Envoy and Kong answer);
    the operator's access log says which address failed and why."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cfg = base_config(
        services={"dead": {"targets": [f"http://127.0.0.1:{port}"]}},
        routes=[{"name": "dead", "match": {"paths": ["/"]}, "service": "dead"}],
        plugins={"access_log": {"path": "-"}},
    )
    async with GatewayProcess(cfg) as gw:
        resp, _ = await request(gw.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", close_wait=0.01)
        assert resp.status == 502 and resp.json()["error"] == "upstream_connect_error"
        assert str(port) not in resp.body.decode() and "127.0.0.1" not in resp.body.decode()
        logged = json.loads(await gw.wait_for_log('"status":502'))
        assert logged["error"].startswith(f"connect to 127.0.0.1:{port} failed"), logged
