"""The circuit breaker through a real gateway: failing upstreams (5xx, hanging, refusing) open it,
an open breaker answers 503 `circuit_open` with Retry-After and sends the upstream nothing,
half-open lets `half_open_requests` probes through, a success closes it and a failure reopens
it. Its state shows in `GET /services/{name}` ("breaker") and in `GET /events` (kind
"breaker")."""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

from tests.support.client import RawClient
from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import Reply, request
from tests.support.upstream import Upstream


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# opened by one failure, half-open after 300 ms with a single probe
ONE_PROBE: dict[str, Any] = {
    "consecutive_failures": 1,
    "min_requests": 1000,
    "open_for": "300ms",
    "half_open_requests": 1,
}


def _config(target: str, breaker: dict[str, Any], **service: Any) -> dict[str, Any]:
    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={
            "flaky": {
                "targets": [target],
                "health": {"passive": None},
                "circuit_breaker": breaker,
                **service,
            }
        },
        routes=[{"name": "flaky", "match": {"paths": ["/"]}, "service": "flaky"}],
    )


async def _get(gw: GatewayProcess, path: str) -> Reply:
    return await request(gw.port, "GET", path)


async def _breaker(gw: GatewayProcess) -> dict[str, Any]:
    doc = (await request(gw.admin_port, "GET", "/services/flaky")).json()
    breaker: dict[str, Any] = doc["breaker"]
    return breaker


async def _transitions(gw: GatewayProcess) -> list[tuple[str, str]]:
    """(state, reason) of every breaker event, oldest first."""
    events = (await request(gw.admin_port, "GET", "/events?limit=500")).json()["events"]
    return [
        (e["state"], e["reason"])
        for e in events
        if e["kind"] == "breaker" and e.get("breaker") == "flaky"
    ]


def _is_circuit_open(reply: Reply) -> bool:
    return reply.status == 503 and reply.json()["error"] == "circuit_open"


async def test_failure_rate_opens_and_open_breaker_sends_nothing_upstream() -> None:
    breaker = {"failure_rate": "50%", "min_requests": 4, "window": "10s", "open_for": "1500ms"}
    async with Upstream() as up, GatewayProcess(_config(up.url, breaker)) as gw:
        assert [(await _get(gw, p)).status for p in ("/echo", "/echo", "/status/500")] == [
            200,
            200,
            500,
        ]
        state = await _breaker(gw)
        assert state["state"] == "closed"  # 1 failure in 3: under min_requests
        assert (state["window_requests"], state["window_failures"]) == (3, 1)

        # the 4th request fails: 2 of 4 = 50% → open
        fourth = await _get(gw, "/status/503")
        assert fourth.status == 503 and fourth.json() == {"status": 503}  # the upstream's own
        opened_at = time.monotonic()
        assert len(up.received) == 4

        refused = [await _get(gw, "/echo") for _ in range(10)]
        assert all(_is_circuit_open(r) for r in refused), [r.body for r in refused]
        assert time.monotonic() - opened_at < 0.5, "the test's Retry-After check needs speed"
        assert {r.headers["retry-after"] for r in refused} == {"2"}  # ceil(1.5 s - elapsed)
        assert "flaky" in refused[0].json()["message"]
        assert len(up.received) == 4, "an open breaker must not touch the upstream"

        state = await _breaker(gw)
        assert state["state"] == "open" and state["retry_after_s"] in (1, 2)
        assert await _transitions(gw) == [("open", "failure rate 50% over 4 requests")]


async def test_half_open_lets_probes_through_and_success_closes() -> None:
    breaker = {
        "consecutive_failures": 2,
        "min_requests": 1000,
        "open_for": "400ms",
        "half_open_requests": 2,
    }
    async with Upstream() as up, GatewayProcess(_config(up.url, breaker)) as gw:
        assert [(await _get(gw, "/status/500")).status for _ in range(2)] == [500, 500]
        assert _is_circuit_open(await _get(gw, "/echo"))
        assert (await _breaker(gw))["state"] == "open"
        await asyncio.sleep(0.5)  # past open_for

        # three at once: two probes pass (and take 300 ms), the third is refused
        before = len(up.received)
        replies = await asyncio.gather(*(_get(gw, "/slow?ms=300") for _ in range(3)))
        statuses = sorted(r.status for r in replies)
        assert statuses == [200, 200, 503], [r.body for r in replies]
        assert sum(_is_circuit_open(r) for r in replies) == 1
        assert len(up.received) - before == 2

        state = await _breaker(gw)  # two successful probes closed it
        assert state["state"] == "closed" and state["consecutive_failures"] == 0
        assert [(await _get(gw, "/echo")).status for _ in range(5)] == [200] * 5
        assert await _transitions(gw) == [
            ("open", "2 consecutive failures"),
            ("half_open", "open_for elapsed; probing"),
            ("closed", "2 probes succeeded"),
        ]


async def test_failed_probe_reopens_for_another_open_for() -> None:
    breaker = {**ONE_PROBE, "open_for": "400ms"}
    async with Upstream() as up, GatewayProcess(_config(up.url, breaker)) as gw:
        assert (await _get(gw, "/status/502")).status == 502
        assert _is_circuit_open(await _get(gw, "/echo"))
        await asyncio.sleep(0.5)
        probe = await _get(gw, "/status/500")
        assert probe.status == 500 and probe.json() == {"status": 500}  # the probe went through
        # reopened at once: the next request is refused without reaching the upstream
        before = len(up.received)
        again = await _get(gw, "/echo")
        assert _is_circuit_open(again) and again.headers["retry-after"] == "1"
        assert len(up.received) == before
        assert (await _breaker(gw))["state"] == "open"
        await asyncio.sleep(0.5)
        assert (await _get(gw, "/echo")).status == 200  # a good probe closes it
        assert (await _breaker(gw))["state"] == "closed"
        assert [s for s, _ in await _transitions(gw)] == [
            "open",
            "half_open",
            "open",
            "half_open",
            "closed",
        ]
        assert (await _transitions(gw))[2] == ("open", "a probe failed in half-open state")


async def test_consecutive_failures_count_5xx_and_timeouts_and_reset_on_success() -> None:
    breaker = {"consecutive_failures": 3, "min_requests": 1000}
    config = _config("http://x", breaker, timeouts={"response": "200ms"})
    async with Upstream() as up:
        config["services"]["flaky"]["targets"] = [up.url]
        async with GatewayProcess(config) as gw:
            sequence = ["/echo", "/status/502", "/slow?ms=1000", "/echo", "/status/500"]
            statuses = [(await _get(gw, p)).status for p in sequence]
            assert statuses == [200, 502, 504, 200, 500]
            assert (await _get(gw, "/status/503")).status == 503
            state = await _breaker(gw)
            assert state["state"] == "closed" and state["consecutive_failures"] == 2
            assert (await _get(gw, "/slow?ms=1000")).status == 504  # a hanging upstream: 3rd
            assert len(up.received) == 7
            assert _is_circuit_open(await _get(gw, "/echo"))
            assert len(up.received) == 7
            assert await _transitions(gw) == [("open", "3 consecutive failures")]


async def test_refusing_upstream_opens_the_breaker() -> None:
    breaker = {"consecutive_failures": 3, "min_requests": 1000, "open_for": "30s"}
    async with GatewayProcess(_config(f"http://127.0.0.1:{_closed_port()}", breaker)) as gw:
        refused = [await _get(gw, "/echo") for _ in range(3)]
        assert [r.json()["error"] for r in refused] == ["upstream_connect_error"] * 3
        blocked = await _get(gw, "/echo")
        assert _is_circuit_open(blocked) and blocked.headers["retry-after"] == "30"
        state = await _breaker(gw)
        assert state["state"] == "open" and state["consecutive_failures"] == 3
        assert state["retry_after_s"] == 30


async def test_a_probe_whose_client_went_away_does_not_close_the_breaker() -> None:
    """The client of the only half-open probe disconnects before the upstream answered: that
    says nothing about the service, so the breaker must not count it as a success (and close);
    it stays half-open with the probe slot free for the next request."""
    breaker = ONE_PROBE
    async with Upstream() as up, GatewayProcess(_config(up.url, breaker)) as gw:
        assert (await _get(gw, "/status/500")).status == 500
        await asyncio.sleep(0.4)
        async with RawClient(gw.port) as client:  # the probe: reset by its client at 100 ms
            await client.send(b"GET /slow?ms=1000 HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.sleep(0.1)
            assert client.writer is not None
            sock = client.writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            client.writer.transport.abort()
        await asyncio.sleep(0.1)
        assert len(up.received) == 2
        state = await _breaker(gw)
        assert state["state"] == "half_open", state
        # the slot was given back: the next request is a probe, and its success closes it
        assert (await _get(gw, "/echo")).status == 200
        assert (await _breaker(gw))["state"] == "closed"


async def test_a_request_from_before_the_opening_is_not_a_probe() -> None:
    """A slow request that started while the breaker was closed finishes while it is half-open
    with its one probe still in flight: its success is not the probe's, so the breaker stays
    half-open (and keeps refusing) until the probe itself answers."""
    breaker = ONE_PROBE
    async with Upstream() as up, GatewayProcess(_config(up.url, breaker)) as gw:
        early = asyncio.create_task(_get(gw, "/slow?ms=1200"))  # started while closed
        await asyncio.sleep(0.05)
        assert (await _get(gw, "/status/500")).status == 500  # opens it
        await asyncio.sleep(0.4)
        probe = asyncio.create_task(_get(gw, "/slow?ms=1500&probe"))
        assert (await early).status == 200  # finishes in half-open state
        await asyncio.sleep(0.05)
        assert not probe.done()
        state = await _breaker(gw)
        assert state["state"] == "half_open", state
        assert _is_circuit_open(await _get(gw, "/echo")), "the probe slot is still taken"
        assert (await probe).status == 200
        assert (await _breaker(gw))["state"] == "closed"


async def test_failures_hidden_by_stale_cache_entries_still_open_the_breaker() -> None:
    """A route serves stale cache entries when its service fails (stale_if_error). The clients
    see 200 STALE, but the service did fail: its breaker must count the failures, open, and
    spare the upstream (the open breaker's 503 is replaced by the stale entry in turn)."""
    async with Upstream() as up:
        config = _config(up.url, {"consecutive_failures": 2, "min_requests": 1000})
        config["routes"][0]["plugins"] = {"cache": {"stale_if_error": "30s"}}
        async with GatewayProcess(config) as gw:
            path = "/respond?h=Cache-Control%3A%20max-age%3D1"
            first = await _get(gw, path)
            assert first.headers["x-cache"] == "MISS"
            await asyncio.sleep(1.05)
            up.state.override = "/status/500"
            replies = [await _get(gw, path) for _ in range(5)]
            assert [r.headers.get("x-cache") for r in replies] == ["STALE"] * 5
            assert all(r.status == 200 and r.body == first.body for r in replies)
            assert len(up.received) == 3, "the breaker should have opened after 2 failures"
            assert (await _breaker(gw))["state"] == "open"


async def test_max_connections_overflow_is_an_immediate_503() -> None:
    async with Upstream() as up:
        config = _config(up.url, {"min_requests": 1000}, max_connections=1)
        async with GatewayProcess(config) as gw:
            slow = asyncio.create_task(_get(gw, "/slow?ms=500"))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            overflow = await _get(gw, "/echo")
            assert overflow.status == 503 and overflow.json()["error"] == "upstream_overloaded"
            assert time.monotonic() - started < 0.2, "never queued"
            assert (await slow).status == 200
            assert [r.path for r in up.received] == ["/slow"]


async def test_max_pending_queues_that_many_then_overflows() -> None:
    """max_connections: 1 with max_pending: 1 — one request in flight, one waiting for the
    connection, a third refused at once."""
    async with Upstream() as up:
        config = _config(up.url, {"min_requests": 1000}, max_connections=1, max_pending=1)
        async with GatewayProcess(config) as gw:
            first = asyncio.create_task(_get(gw, "/slow?ms=400&n=1"))
            await asyncio.sleep(0.1)
            second = asyncio.create_task(_get(gw, "/slow?ms=10&n=2"))
            await asyncio.sleep(0.1)
            started = time.monotonic()
            third = await _get(gw, "/echo")
            assert third.status == 503 and third.json()["error"] == "upstream_overloaded"
            assert time.monotonic() - started < 0.2
            assert (await first).status == 200
            queued = await second
            assert queued.status == 200, queued.body
            assert [r.query for r in up.received] == ["ms=400&n=1", "ms=10&n=2"]


async def test_the_gateways_own_connection_limit_is_not_a_service_failure() -> None:
    """503 upstream_overloaded (max_connections reached) says nothing about the service: it
    must not open the breaker on a healthy upstream (Envoy keeps overflow out of it too)."""
    breaker = {"failure_rate": "50%", "min_requests": 4, "open_for": "30s"}
    async with Upstream() as up:
        config = _config(up.url, breaker, max_connections=1)
        async with GatewayProcess(config) as gw:
            replies = await asyncio.gather(*(_get(gw, "/slow?ms=300") for _ in range(6)))
            codes = sorted(r.json()["error"] for r in replies if r.status == 503)
            assert codes == ["upstream_overloaded"] * 5, [r.body for r in replies]
            state = await _breaker(gw)
            assert state["state"] == "closed", state
            assert (await _get(gw, "/echo")).status == 200


async def test_half_open_probe_that_reached_no_instance_does_not_close_the_breaker() -> None:
    """Two 500s eject the only instance (passive health, allowed to eject it) and open the
    breaker; the probes after open_for find no healthy instance. That is no success: the
    breaker stays half-open."""
    breaker = {"consecutive_failures": 2, "min_requests": 1000, "open_for": "300ms"}
    passive = {"failures": 2, "eject_for": "30s", "max_ejection_percent": "100%"}
    async with Upstream() as up:
        config = _config(up.url, breaker, health={"passive": passive})
        async with GatewayProcess(config) as gw:
            assert [(await _get(gw, "/status/500")).status for _ in range(2)] == [500, 500]
            assert (await _breaker(gw))["state"] == "open"
            await asyncio.sleep(0.4)
            for _ in range(5):  # more than half_open_requests
                probe = await _get(gw, "/echo")
                assert probe.status == 503 and probe.json()["error"] == "no_healthy_instance"
            assert (await _breaker(gw))["state"] == "half_open"
            assert len(up.received) == 2


async def test_a_websocket_probe_answered_101_settles_at_the_upgrade() -> None:
    """An upgrade let through as the half-open probe counted only when its tunnel ended: a
    live WebSocket held the probe slot, and every other request was refused `circuit_open`
    while the upstream was healthy, as long as the tunnel lasted."""
    breaker = ONE_PROBE
    async with Upstream() as up, GatewayProcess(_config(up.url, breaker)) as gw:
        assert (await _get(gw, "/status/500")).status == 500
        await asyncio.sleep(0.4)
        async with RawClient(gw.port) as ws:
            await ws.send(
                b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            )
            assert (await ws.response(method="GET")).status == 101
            await ws.send(b"ping")  # the tunnel is open and busy
            assert (await _get(gw, "/echo")).status == 200
            assert (await _breaker(gw))["state"] == "closed"
