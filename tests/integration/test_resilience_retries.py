"""Retries through a real gateway against real failing instances.

A service has two instances fed by round robin; one of them fails (answers 503, resets,
refuses, hangs) while the other answers. What is asserted is what each *upstream* received:
a retried request reaches the other instance once, a request that must not be repeated (a POST,
a response already under way) reaches exactly one, and the retry budget bounds the extra
requests an outage costs.
"""

from __future__ import annotations

import contextlib
import socket
import time
from typing import Any

from apigate.resilience.retry import RetryBudget
from tests.support.client import RawClient, Truncated
from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import Reply, request
from tests.support.upstream import Upstream


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(targets: list[str], retries: dict[str, Any], **service: Any) -> dict[str, Any]:
    return base_config(
        services={
            "pair": {
                "targets": targets,
                "health": {"passive": None},
                "retries": retries,
                **service,
            }
        },
        routes=[{"name": "pair", "match": {"paths": ["/"]}, "service": "pair"}],
    )


def _retried_once(bad: Upstream, good: Upstream, queries: list[str]) -> None:
    """Every request reached `good` exactly once; those that reached `bad` first, once there.
    (Which ones those are is the balancer's business: a retry advances its rotation too.)"""
    assert [r.query for r in good.received] == queries
    tried_bad = [r.query for r in bad.received]
    assert tried_bad, "no request reached the failing instance: the test proves nothing"
    assert len(set(tried_bad)) == len(tried_bad) and set(tried_bad) <= set(queries)


async def test_get_503_is_retried_on_the_other_instance() -> None:
    async with Upstream("bad") as bad, Upstream("good") as good:
        bad.state.override = "/status/503"
        config = _config([bad.url, good.url], {"attempts": 1, "on": [503], "backoff": "0s"})
        async with GatewayProcess(config) as gw:
            replies = [await request(gw.port, "GET", f"/echo?i={i}") for i in range(6)]
            assert [r.status for r in replies] == [200] * 6
            assert {r.json()["upstream"] for r in replies} == {"good"}
            _retried_once(bad, good, [f"i={i}" for i in range(6)])


async def test_post_is_never_retried_without_opt_in() -> None:
    async with Upstream("bad") as bad, Upstream("good") as good:
        bad.state.override = "/status/503"
        config = _config([bad.url, good.url], {"attempts": 1, "on": [503], "backoff": "0s"})
        async with GatewayProcess(config) as gw:
            replies = [
                await request(gw.port, "POST", f"/echo?i={i}", body=b"payload") for i in range(6)
            ]
            assert sorted(r.status for r in replies) == [200] * 3 + [503] * 3
            assert len(bad.received) + len(good.received) == 6  # each POST sent exactly once
            assert {r.query for r in bad.received}.isdisjoint({r.query for r in good.received})

            # an Idempotency-Key makes a POST safe to repeat: its body is replayed whole
            key = {"Idempotency-Key": "abc-123"}
            body = b"k" * 50_000
            keyed = [
                await request(gw.port, "POST", f"/echo?k={i}", body=body, headers=key)
                for i in range(4)
            ]
            assert [r.status for r in keyed] == [200] * 4
            bad.received[:] = [r for r in bad.received if r.query.startswith("k=")]
            good.received[:] = [r for r in good.received if r.query.startswith("k=")]
            _retried_once(bad, good, [f"k={i}" for i in range(4)])
            for rec in good.received:
                assert rec.body == body and rec.header("content-length") == str(len(body))


async def test_non_idempotent_opt_in_retries_post() -> None:
    async with Upstream("bad") as bad, Upstream("good") as good:
        bad.state.override = "/status/503"
        retries = {"attempts": 1, "on": [503], "backoff": "0s", "non_idempotent": True}
        async with GatewayProcess(_config([bad.url, good.url], retries)) as gw:
            replies = [
                await request(gw.port, "POST", f"/echo?i={i}", json_body={"i": i}) for i in range(4)
            ]
            assert [r.status for r in replies] == [200] * 4
            assert [r.json()["upstream"] for r in replies] == ["good"] * 4
            _retried_once(bad, good, [f"i={i}" for i in range(4)])
            assert [rec.body for rec in good.received] == [b'{"i": %d}' % i for i in range(4)]


async def test_connect_error_is_retried_on_another_instance() -> None:
    dead = f"http://127.0.0.1:{_closed_port()}"
    async with Upstream("good") as good:
        config = _config([dead, good.url], {"attempts": 1, "on": ["connect_error"]})
        async with GatewayProcess(config) as gw:
            for i in range(4):
                reply = await request(gw.port, "POST", f"/echo?i={i}", body=b"x" * 10)
                assert reply.status == 200, reply.body
            assert [r.query for r in good.received] == [f"i={i}" for i in range(4)]
        # without connect_error in `on`, the dead instance's share fails
        config = _config([dead, good.url], {"attempts": 1, "on": [503]})
        async with GatewayProcess(config) as gw:
            replies = [await request(gw.port, "GET", "/echo") for _ in range(4)]
            assert sorted(r.status for r in replies) == [200, 200, 502, 502]


async def test_reset_before_response_is_retried_when_configured() -> None:
    async with Upstream("bad") as bad, Upstream("good") as good:
        bad.state.override = "/reset"
        config = _config([bad.url, good.url], {"attempts": 1, "on": ["reset"], "backoff": "0s"})
        async with GatewayProcess(config) as gw:
            replies = [await request(gw.port, "GET", f"/echo?i={i}") for i in range(4)]
            assert [r.status for r in replies] == [200] * 4
            _retried_once(bad, good, [f"i={i}" for i in range(4)])
            # a POST that was reset is not repeated: the upstream may have acted on it
            bad.received.clear()
            good.received.clear()
            posts = [await request(gw.port, "POST", "/echo", body=b"once") for _ in range(2)]
            assert sorted(r.status for r in posts) == [200, 502]  # round robin: one each
            assert len(bad.received) == len(good.received) == 1
        config = _config([bad.url, good.url], {"attempts": 1, "on": [503]})
        async with GatewayProcess(config) as gw:
            replies = [await request(gw.port, "GET", "/echo") for _ in range(4)]
            assert sorted(r.status for r in replies) == [200, 200, 502, 502]


async def test_never_retried_after_response_bytes_reached_the_client() -> None:
    async with Upstream("a") as a, Upstream("b") as b:
        retries = {"attempts": 2, "on": ["reset", "connect_error", 502], "backoff": "0s"}
        async with GatewayProcess(_config([a.url, b.url], retries)) as gw:
            async with RawClient(gw.port) as client:
                await client.send(b"GET /reset-mid HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    await client.response()
                except Truncated as cut:
                    partial = cut.partial
                else:
                    raise AssertionError("the client got a complete response")
            assert partial == b"0123456789"  # what the upstream sent, then the cut
            assert len(a.received) + len(b.received) == 1


async def test_budget_caps_retries_during_an_outage() -> None:
    """Both instances answer 503 to everything. Every request is tried once and may be retried
    once (attempts: 1), but retries may only be 20% of the requests over the budget's window
    (10 s), plus its floor of min_per_second x window = 3 x 10 = 30: with N sequential requests
    the upstreams see exactly N + the retries `RetryBudget` grants, not 2N."""
    async with Upstream("a") as a, Upstream("b") as b:
        a.state.override = b.state.override = "/status/503"
        retries = {"attempts": 1, "on": [503], "budget": "20%", "backoff": "0s"}
        async with GatewayProcess(_config([a.url, b.url], retries)) as gw:
            n = 200
            started = time.monotonic()
            replies = [await request(gw.port, "GET", f"/x?{i}") for i in range(n)]
            elapsed = time.monotonic() - started
            assert {r.status for r in replies} == {503}
            upstream_requests = len(a.received) + len(b.received)
        assert elapsed < 9, "the whole run must fit in the budget's 10 s window"
        retried = upstream_requests - n

        budget = RetryBudget(0.2)  # what the gateway's budget grants, request by request
        granted = 0
        for _ in range(n):
            budget.record_request()
            granted += budget.try_acquire()
        assert granted == 70  # 20% of 200 + 30
        # the budget counts requests from marks taken every window/10, erring on the stingy
        # side by at most what arrives in one such step
        assert granted - 5 <= retried <= granted, f"{retried} retries for {n} requests"
        assert retried <= 0.2 * n + budget.min_per_second * budget.window


async def test_per_try_timeout_moves_on_to_the_other_instance() -> None:
    async with Upstream("slow") as slow, Upstream("fast") as fast:
        slow.state.override = "/slow?ms=3000"
        retries = {
            "attempts": 1,
            "on": ["timeout"],
            "per_try_timeout": "200ms",
            "backoff": "0s",
        }
        config = _config([slow.url, fast.url], retries, timeouts={"response": "5s"})
        async with GatewayProcess(config) as gw:
            for i in range(2):
                started = time.monotonic()
                reply: Reply = await request(gw.port, "GET", f"/echo?i={i}")
                assert reply.status == 200 and reply.json()["upstream"] == "fast"
                assert time.monotonic() - started < 1.5
            _retried_once(slow, fast, ["i=0", "i=1"])


async def test_overall_timeout_bounds_all_tries() -> None:
    """Three hanging instances, per_try_timeout 400 ms, timeouts.response (the overall
    deadline) 600 ms: the first try times out at 400 ms, the second is cut at the overall
    deadline, and no third one starts. The client has its 504 at ~600 ms, not 800 or 1200."""
    async with contextlib.AsyncExitStack() as stack:
        ups = [await stack.enter_async_context(Upstream(n)) for n in ("a", "b", "c")]
        for up in ups:
            up.state.override = "/slow?ms=5000"  # hangs
        retries = {"attempts": 2, "on": ["timeout"], "per_try_timeout": "400ms", "backoff": "0s"}
        config = _config([u.url for u in ups], retries, timeouts={"response": "600ms"})
        gw = await stack.enter_async_context(GatewayProcess(config))
        started = time.monotonic()
        reply = await request(gw.port, "GET", "/echo")
        elapsed = time.monotonic() - started
        assert reply.status == 504 and reply.json()["error"] == "upstream_timeout"
        assert sum(len(u.received) for u in ups) == 2
        assert 0.55 <= elapsed < 0.75, f"answered after {elapsed:.2f} s"


async def test_retries_do_not_skew_the_rotation_onto_the_failing_instance() -> None:
    """Round robin over a failing and a healthy instance, 200 requests in an outage of one:
    the failing one should get half of the first tries, as without retries. (When a retry
    used up the healthy instance's turn, every first try went to the failing one: once the
    budget ran out, 130 of 200 requests failed instead of about 30.)"""
    async with Upstream("bad") as bad, Upstream("good") as good:
        bad.state.override = "/status/503"
        retries = {"attempts": 1, "on": [503], "budget": "20%", "backoff": "0s"}
        async with GatewayProcess(_config([bad.url, good.url], retries)) as gw:
            statuses = [(await request(gw.port, "GET", f"/x?{i}")).status for i in range(200)]
        assert 90 <= len(bad.received) <= 110, f"{len(bad.received)} first tries on `bad`"
        assert statuses.count(503) <= 45, f"{statuses.count(503)} of 200 failed"
