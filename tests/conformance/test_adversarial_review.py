"""Findings of the adversarial HTTP/1.1 data-plane hunt (raw bytes against a real gateway and
a recording upstream that answers with canned bytes). Each case checks what the client gets and
what reached the upstream; every read is bounded, so that a hang fails instead of blocking."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.conformance.conftest import assert_error
from tests.conformance.test_responses import _config  # (one route, "/", to the upstream)
from tests.support.client import RawClient
from tests.support.env import Env, env_fixture, shared_env_fixture
from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

shared_env = shared_env_fixture(_config)
env = env_fixture()

_NEXT = b"GET /echo?next HTTP/1.1\r\nHost: x\r\n\r\n"


# ------------------------------------------------ an upgrade answered by the gateway itself
@pytest.mark.parametrize(
    "answer",
    [
        # a 101 to a protocol the client did not offer: 502 upstream_invalid_response
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: upgrade\r\n\r\n",
        # a head cut short: 502 upstream_reset
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Len",
    ],
    ids=["101-not-offered", "cut-head"],
)
async def test_an_upgrade_request_the_gateway_answers_closes_the_connection(
    env: Env, answer: bytes
) -> None:
    """The bytes after an upgrade request's head are held for the tunnel. When the gateway
    answered it itself (an error, a plugin) the answer said keep-alive: the connection stayed
    a tunnel that never opened, the client's next request went into its buffer, unanswered
    until tunnel_idle_timeout (5 min). Now it closes, as a proxied non-101 answer does."""
    env.up.state.canned["/ws"] = answer
    upgrade = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    async with RawClient(env.port, timeout=2.0) as c:
        await c.send(upgrade + _NEXT)
        resp = await c.response()
        assert_error(resp, 502, None)
        assert resp.header("connection") == "close"
        assert await c.closed(2.0)
    assert [r.path for r in env.up.received] == ["/ws"]  # the next request was not forwarded


# ------------------------------------------------ a refused HEAD request
@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HEAD /echo HTTP/1.1\r\nHost: x\r\nExpect: teapot\r\n\r\n", 417),
        (b"HEAD /echo HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"HEAD /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"HEAD /echo HTTP/1.1\r\nHost: x\r\n" + b"X-F: 1\r\n" * 101 + b"\r\n", 431),
    ],
    ids=["expect", "no-host", "te-gzip", "too-many-fields"],
)
async def test_a_head_request_refused_by_the_connection_gets_no_body(
    env: Env, head: bytes, status: int
) -> None:
    """RFC 9110 §9.3.2: a response to HEAD has no content. The errors the connection answers
    itself (the request's head refused) sent their JSON body after a HEAD's head all the same,
    bytes a client takes for the start of a next response. The exchange's errors did not."""
    async with RawClient(env.port, timeout=2.0) as c:
        await c.send(head)
        resp = await c.response(method="HEAD")
        assert resp.status == status
        assert resp.header("content-type") == "application/json" and resp.header("x-request-id")
        assert resp.header("connection") == "close"
        assert await c.closed(2.0)  # (and nothing after the head: closed() checks that)
    assert env.up.received == []


# ------------------------------------------------ an upgrade request, then the client's half-close
_UPGRADE = b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "status", "after"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, b""),
        (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade"
            b"\r\n\r\nhello",
            101,
            b"hello",
        ),
    ],
    ids=["refused", "switched"],
)
async def test_an_upgrade_request_then_a_half_close_is_still_answered(
    env: Env, answer: bytes, status: int, after: bytes
) -> None:
    """A client that sends a whole request and then shuts down its sending side waits for the
    answer (as for any request, which the gateway answers). With an Upgrade offer the request
    was dropped instead: never sent upstream, the connection closed without a byte. Now it
    goes upstream; an answer other than 101 reaches the client, and a 101 opens a tunnel whose
    client side is already done (the half-close is passed on, as once the tunnel is open)."""
    env.up.state.canned["/ws"] = answer
    async with RawClient(env.port, timeout=2.0) as c:
        await c.send(_UPGRADE)
        assert c.writer is not None
        c.writer.write_eof()
        resp = await c.response()
        assert resp.status == status
        if status == 101:
            assert await c.read_exact(len(after)) == after
        else:
            assert resp.body == b"ok" and resp.header("connection") == "close"
        assert await c.closed(2.0)
    assert [r.path for r in env.up.received] == ["/ws"]


# ------------------------------------------------ closing with the client's bytes unread
@pytest.mark.parametrize(
    "first",
    [
        b"GET /echo?1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /slow?ms=100 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET /echo?1 HTTP/1.0\r\n\r\n",
    ],
    ids=["close", "close-slow", "http10"],
)
async def test_a_response_that_closes_reaches_a_client_that_sent_more(
    env: Env, first: bytes
) -> None:
    """The client sends more after a request that ends the connection (pipelined requests
    the gateway will not process): reading stops while they queue, so they are still unread
    when the connection closes after the response, and the kernel answered them with a reset,
    which destroyed the response before the client read it. The close lingers (FIN after the
    response, what arrives meanwhile read and dropped), as for a refused request."""
    more = b"GET /echo?more HTTP/1.1\r\nHost: x\r\n\r\n" * 6000  # ~220 KB
    async with RawClient(env.port, timeout=2.0) as c:
        assert c.writer is not None
        c.writer.write(first + more)  # (not drained: the gateway stops reading)
        await asyncio.sleep(0.3)  # a client still busy sending reads its answer late
        resp = await c.response()
        assert resp.status == 200 and resp.header("connection") == "close"
        assert c.pending() == b""
    assert len(env.up.received) == 1  # nothing after the closing request went upstream


# ------------------------------------------------ a client waiting for 100 (Continue)
async def test_the_body_timeout_of_a_client_waiting_for_100_continue_starts_at_the_100() -> None:
    """RFC 9110 §10.1.1: a client that sends `Expect: 100-continue` may wait for the 100
    before it sends its body. The gateway sends it once it has an upstream connection; the
    body timeout ran from the head all the same, so a client that waited while the gateway
    did (here, for the service's one connection) got a 408 "timed out reading the request
    body" for the gateway's own delay. It now counts from the 100."""
    async with Upstream() as up:
        cfg = base_config(
            limits={"body_timeout": "150ms", "header_timeout": "150ms"},
            services={
                "up": {
                    "targets": [up.url],
                    "max_connections": 1,  # one connection: the second request waits for it
                    "max_pending": 1,
                    "timeouts": {"connect": "3s"},
                }
            },
            routes=[{"name": "all", "match": {"paths": ["/"]}, "service": "up"}],
        )
        async with GatewayProcess(cfg) as gw, RawClient(gw.port, timeout=2.0) as busy:
            await busy.send(b"GET /slow?ms=300 HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.05)  # (it holds the connection now)
            async with RawClient(gw.port, timeout=2.0) as c:
                await c.send(
                    b"POST /echo HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                    b"Content-Length: 3\r\n\r\n"
                )
                assert (await c.response(interim=True)).status == 100
                await c.send(b"abc")
                resp = await c.response()
                assert resp.status == 200 and resp.json()["body_len"] == 3
            assert (await busy.response()).status == 200


async def test_a_body_timeout_shorter_than_the_header_timeout_is_kept() -> None:
    """The connection's one timer is re-armed lazily, at least every header_timeout; a body
    deadline was stored without bringing the timer forward, so a route's body_timeout of
    150 ms (header_timeout 1.5 s) cut a stalled upload only at the next tick, ten times
    later."""
    async with Upstream() as up:
        cfg = base_config(
            limits={"header_timeout": "1500ms"},
            services={"up": {"targets": [up.url]}},
            routes=[
                {
                    "name": "all",
                    "match": {"paths": ["/"]},
                    "service": "up",
                    "limits": {"body_timeout": "150ms"},
                }
            ],
        )
        async with GatewayProcess(cfg) as gw, RawClient(gw.port, timeout=2.0) as c:
            await c.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
            t0 = time.monotonic()
            assert_error(await c.response(), 408, "request_timeout")
            assert time.monotonic() - t0 < 0.6
