"""Rate limiting through real gateway processes, in-process and on a real Redis server.

The bound under test (see `apigate.plugins.rate_limit`): over any window [t, t + per) at most
`requests + burst` requests are admitted, at most `burst + 1` at once, and over a run of D
seconds at most `burst + 1 + D / T` with T = per / requests. Client-side clocks see each
admission up to a few ms late, so sliding-window counts get one request of slack.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from apigate.plugins.rate_limit import GCRA_SCRIPT
from apigate.store.redis import TIMEOUTS_TO_TRIP, RedisStore, StoreUnavailable
from tests.support.gateway import GatewayProcess, base_config
from tests.support.redis_server import RedisServer
from tests.support.upstream import Upstream


# ============================================================================ a small client
@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float
    at: float  # monotonic time the answer arrived


class Client:
    """One keep-alive HTTP/1.1 connection to the gateway (reconnects when it is closed)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def get(self, path: str) -> Answer:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        start = time.monotonic()
        self.writer.write(f"GET {path} HTTP/1.1\r\nHost: gw.test\r\n\r\n".encode())
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        status_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        now = time.monotonic()
        return Answer(int(status_line.split()[1]), headers, body, now - start, now)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def hammer(ports: list[int], path: str, workers: int, seconds: float) -> list[Answer]:
    """`workers` keep-alive clients (spread over `ports`) send requests back to back."""
    answers: list[Answer] = []
    deadline = time.monotonic() + seconds

    async def work(port: int) -> None:
        client = Client(port)
        try:
            while time.monotonic() < deadline:
                answers.append(await client.get(path))
        finally:
            await client.close()

    await asyncio.gather(*(work(ports[i % len(ports)]) for i in range(workers)))
    return answers


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


def limited(name: str, path: str, **rate: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": {"paths": [path]},
        "service": "up",
        "plugins": {"rate_limit": {"key": "route", **rate}},
    }


# ============================================================================ in-process store
pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def local_gateway() -> AsyncIterator[GatewayProcess]:
    config = base_config(
        services={"up": {"targets": []}},
        routes=[
            limited("n", "/n", requests=5, per="1m", burst=4),
            limited("edge", "/edge", requests=10, per="1s", burst=2),
            limited("burst", "/burst", requests=10, per="10s", burst=2),
            limited("windows", "/windows", windows=TWO_WINDOWS),
        ],
    )
    async with Upstream() as up:
        config["services"]["up"]["targets"] = [up.url]
        async with GatewayProcess(config) as gw:
            yield gw


async def test_n_plus_one_is_429_with_headers(local_gateway: GatewayProcess) -> None:
    client = Client(local_gateway.port)
    answers = [await client.get("/n/echo") for _ in range(6)]
    await client.close()
    assert [a.status for a in answers] == [200] * 5 + [429]
    assert [a.headers["ratelimit-remaining"] for a in answers] == ["4", "3", "2", "1", "0", "0"]
    assert all(a.headers["ratelimit-limit"] == "5" for a in answers)
    denied = answers[-1]
    assert denied.headers["retry-after"] == "12"
    assert denied.headers["ratelimit-reset"] == "60"
    assert denied.headers["content-type"] == "application/json"
    assert b'"error":"rate_limited"' in denied.body


async def test_at_most_burst_plus_one_at_once(local_gateway: GatewayProcess) -> None:
    clients = [Client(local_gateway.port) for _ in range(20)]
    answers = await asyncio.gather(*(c.get("/burst/echo") for c in clients))
    for c in clients:
        await c.close()
    assert sum(a.status == 200 for a in answers) == 3
    assert sum(a.status == 429 for a in answers) == 17


async def test_window_edges_never_double_the_limit(local_gateway: GatewayProcess) -> None:
    seconds = 2.2
    answers = await hammer([local_gateway.port], "/edge/echo", workers=8, seconds=seconds)
    admitted = [a.at for a in answers if a.status == 200]
    assert {a.status for a in answers} == {200, 429}
    span = max(a.at for a in answers) - min(a.at - a.elapsed for a in answers)
    # requests 10 per 1 s, burst 2: T = 0.1 s
    assert len(admitted) <= 3 + math.ceil(span / 0.1) + 1
    assert len(admitted) >= 3 + int(seconds / 0.1) - 3  # and the full rate is delivered
    assert max_in_window(admitted, 1.0) <= 10 + 2 + 1  # requests + burst (+1: client clocks)


# ============================================================================ several windows
# 1 a second, and 2 an hour (both at once: burst 1, then one every 30 minutes). (A second,
# not less: the five refusals must all land within it on a loaded CI machine.)
TWO_WINDOWS = [{"requests": 2, "per": "1h", "burst": 1}, {"requests": 1, "per": "1s"}]


async def check_two_windows(port: int, path: str) -> None:
    """Admitted only when both windows admit; the refusals consume nothing; the headers."""
    client = Client(port)
    first = await client.get(path)
    assert first.status == 200
    assert {k: v for k, v in first.headers.items() if "ratelimit" in k} == {
        "ratelimit-limit": "1",  # the 1s window: 0 left
        "ratelimit-remaining": "0",
        "ratelimit-reset": "1",
        "x-ratelimit-limit-second": "1",
        "x-ratelimit-remaining-second": "0",
        "x-ratelimit-limit-hour": "2",
        "x-ratelimit-remaining-hour": "1",
    }
    refused = [await client.get(path) for _ in range(5)]  # the 1s window refuses
    assert [a.status for a in refused] == [429] * 5
    assert {a.headers["retry-after"] for a in refused} == {"1"}
    assert {a.headers["ratelimit-limit"] for a in refused} == {"1"}
    assert {a.headers["x-ratelimit-remaining-hour"] for a in refused} == {"1"}
    await asyncio.sleep(1.1)
    second = await client.get(path)  # the refusals left the hour's second request
    assert second.status == 200
    assert second.headers["x-ratelimit-remaining-hour"] == "0"
    # both windows at 0: the hour's reset is the longer
    assert second.headers["ratelimit-limit"] == "2"
    assert 3598 <= int(second.headers["ratelimit-reset"]) <= 3600
    await asyncio.sleep(1.1)
    third = await client.get(path)  # the 1s window admits again, the hour refuses
    assert third.status == 429
    assert 1790 <= int(third.headers["retry-after"]) <= 1800
    assert third.headers["ratelimit-limit"] == "2"
    assert third.headers["x-ratelimit-remaining-second"] == "1"
    assert b"2 requests per 1h" in third.body
    await client.close()


async def test_two_windows_in_process(local_gateway: GatewayProcess) -> None:
    await check_two_windows(local_gateway.port, "/windows/echo")


# ============================================================================ Redis
@pytest_asyncio.fixture(loop_scope="module")
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


async def test_gcra_script_on_a_real_redis(redis: RedisServer) -> None:
    store = RedisStore(redis.url, timeout=1.0)
    try:
        await store.call("SCRIPT", "FLUSH")  # the first EVALSHA meets NOSCRIPT, then EVAL
        t_us, tau_us = 1_000_000, 2_000_000  # 1 per second, burst 2
        results = [await store.run_script(GCRA_SCRIPT, ["k"], [t_us, tau_us]) for _ in range(5)]
        assert [r[0] for r in results] == [1, 1, 1, 0, 0]
        assert 2_900_000 <= results[2][1] <= 3_000_000  # TAT three intervals ahead
        ttl = await store.call("PTTL", "k")
        assert 2_900 <= ttl <= 3_001  # the key disappears once it carries no state
    finally:
        await store.close()


async def test_a_raised_limit_takes_effect_within_one_new_interval(redis: RedisServer) -> None:
    """The key carries no settings: a TAT the old, stricter limit left an hour ahead used to
    refuse every request under the new limit until it ran out."""
    store = RedisStore(redis.url, timeout=1.0)
    try:
        hourly, per_ms = [3_600_000_000, 0], [1_000, 0]  # 1 an hour, then 1000 a second
        assert (await store.run_script(GCRA_SCRIPT, ["raised"], hourly))[0] == 1
        refused = await store.run_script(GCRA_SCRIPT, ["raised"], hourly)
        assert refused[0] == 0 and refused[1] > 3_500_000_000
        first = await store.run_script(GCRA_SCRIPT, ["raised"], per_ms)
        assert first[1] <= 1_000  # at most one new interval to wait, not an hour
        await asyncio.sleep(0.005)
        assert (await store.run_script(GCRA_SCRIPT, ["raised"], per_ms))[0] == 1
    finally:
        await store.close()


async def test_a_hanging_redis_costs_one_timeout_then_nothing(redis: RedisServer) -> None:
    store = RedisStore(redis.url, timeout=0.05, retry_after=0.3)
    try:
        assert await store.call("PING") in (b"PONG", True)
        redis.pause()
        for _ in range(TIMEOUTS_TO_TRIP):  # one slow answer is not an outage; a streak is
            assert not store.is_down
            start = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.call("PING")
            assert time.monotonic() - start < 0.3
        assert store.is_down and not store.available()  # no I/O while down
        redis.resume()
        await asyncio.sleep(0.35)
        assert store.available()  # one probe is let through
        assert not store.available()
        assert await store.call("PING") in (b"PONG", True)
        assert not store.is_down
    finally:
        redis.resume()
        await store.close()


async def test_two_gateways_share_one_limit(redis: RedisServer) -> None:
    # requests 20 per 2 s, burst 5: T = 0.1 s. Alone, each gateway would admit ~18 in 1.2 s.
    # On this busy test host a Redis answer may take longer than the default 50 ms: deny on a
    # store error so that a timeout can only make the count smaller, never larger.
    shared = {
        "requests": 20,
        "per": "2s",
        "burst": 5,
        "store_timeout": "1s",
        "on_store_error": "deny",
    }
    config = base_config(
        store=redis.url,
        services={"up": {"targets": []}},
        routes=[limited("shared", "/shared", **shared)],
    )
    async with Upstream() as up:
        config["services"]["up"]["targets"] = [up.url]
        async with GatewayProcess(config) as gw1, GatewayProcess(config) as gw2:
            answers = await hammer([gw1.port, gw2.port], "/shared/echo", workers=40, seconds=1.2)
    admitted = [a for a in answers if a.status == 200]
    span = max(a.at for a in answers) - min(a.at - a.elapsed for a in answers)
    assert span < 2.0, "the run must fit in one window for the window bound to apply"
    assert len(admitted) <= 20 + 5  # requests + burst in any window of length per
    assert len(admitted) <= 6 + math.ceil(span / 0.1) + 1
    assert len(admitted) >= 6 + 4
    assert {a.status for a in answers} <= {200, 429, 503}
    assert sum(a.status == 429 for a in answers) > 200  # many concurrent clients really ran


async def test_redis_killed_mid_run_then_restarted(redis: RedisServer) -> None:
    rate = {"requests": 3, "per": "1m", "burst": 2, "store_timeout": "50ms"}
    config = base_config(
        store=redis.url,
        services={"up": {"targets": []}},
        routes=[
            limited("allow", "/allow", on_store_error="allow", **rate),
            limited("deny", "/deny", on_store_error="deny", **rate),
        ],
    )
    async with Upstream() as up:
        config["services"]["up"]["targets"] = [up.url]
        async with GatewayProcess(config) as gw:
            client = Client(gw.port)

            def logged(text: str) -> int:
                return sum(text in line for line in gw.stderr_lines)

            # 1. Redis up: the limit holds (and lives in Redis).
            statuses = [(await client.get("/allow/echo")).status for _ in range(4)]
            assert statuses == [200, 200, 200, 429]

            # 2. Redis hangs: answers within the store timeout, as configured.
            redis.pause()
            try:
                hung = [await client.get(p) for p in ("/deny/echo", "/allow/echo") * 3]
            finally:
                redis.resume()
            assert [a.status for a in hung] == [503, 200] * 3
            assert max(a.elapsed for a in hung) < 0.5
            assert b"rate_limit_unavailable" in hung[0].body
            assert "ratelimit-limit" not in hung[1].headers
            await until_logged(gw, "redis store unavailable", 1)  # 3 timeouts in a row

            # 3. Back: the limit applies again (the counters survived the pause).
            await until(lambda: client.get("/allow/echo"), lambda a: a.status == 429)
            await until_logged(gw, "redis store recovered", 1)

            # 4. Redis dies: every request still answers at once.
            await redis.kill()
            answers = [await client.get(p) for p in ("/allow/echo", "/deny/echo") * 10]
            assert [a.status for a in answers] == [200, 503] * 10
            assert max(a.elapsed for a in answers) < 0.5
            await until_logged(gw, "redis store unavailable", 2)  # once per outage

            # 5. Redis restarts (empty): recovery, and the limit is enforced again.
            await redis.start()
            first = await until(
                lambda: client.get("/allow/echo"), lambda a: "ratelimit-limit" in a.headers
            )
            assert first.status == 200
            statuses = [(await client.get("/allow/echo")).status for _ in range(3)]
            assert 429 in statuses
            await until_logged(gw, "redis store recovered", 2)
            assert logged("redis store unavailable") == 2
            await client.close()


async def until(make: Any, done: Any, timeout: float = 5.0) -> Answer:
    deadline = time.monotonic() + timeout
    while True:
        answer: Answer = await make()
        if done(answer):
            return answer
        assert time.monotonic() < deadline, f"condition not reached; last answer {answer}"
        await asyncio.sleep(0.05)


async def until_logged(gw: GatewayProcess, text: str, count: int, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while sum(text in line for line in gw.stderr_lines) < count:
        assert time.monotonic() < deadline, f"{text!r} not logged {count}x:\n" + "\n".join(
            gw.stderr_lines[-20:]
        )
        await asyncio.sleep(0.05)
    assert sum(text in line for line in gw.stderr_lines) == count


async def test_two_windows_in_redis(redis: RedisServer) -> None:
    """Every window in one script call, with keys that share a hash tag (one slot)."""
    config = base_config(
        store=redis.url,
        services={"up": {"targets": []}},
        routes=[limited("win", "/win", windows=TWO_WINDOWS, store_timeout="1s")],
    )
    async with Upstream() as up:
        config["services"]["up"]["targets"] = [up.url]
        async with GatewayProcess(config) as gw:
            await check_two_windows(gw.port, "/win/echo")
    store = RedisStore(redis.url, timeout=1.0)
    try:
        # (the 1s window's key, "apigate:rl:{win:win}:1s", expired with its last TAT)
        keys = await store.call("KEYS", "apigate:rl:*")
        assert keys == [b"apigate:rl:{win:win}:1h"]
        seconds, micros = await store.call("TIME")
        now_us = int(seconds) * 1_000_000 + int(micros)
        ahead_us = int(await store.call("GET", keys[0])) - now_us
        # two admissions, 30 minutes each; the six refusals added nothing
        assert 3_590_000_000 < ahead_us <= 3_600_000_000
    finally:
        await store.close()


async def test_the_script_refuses_in_every_window_or_none(redis: RedisServer) -> None:
    """GCRA_SCRIPT over two keys: one window's refusal leaves the other's TAT alone."""
    store = RedisStore(redis.url, timeout=1.0)
    try:
        keys = ["{k}:1s", "{k}:1h"]
        args = [1_000_000, 0, 1_800_000_000, 1_800_000_000]  # 1 a second; 2 an hour, at once
        first = await store.run_script(GCRA_SCRIPT, keys, args)
        assert first[0] == 1 and 990_000 <= first[1] <= 1_000_000
        assert 1_799_990_000 <= first[2] <= 1_800_000_000
        for _ in range(3):
            refused = await store.run_script(GCRA_SCRIPT, keys, args)
            assert refused[0] == 0 and refused[2] <= 1_800_000_000  # the hour: untouched
        await asyncio.sleep(1.0)
        again = await store.run_script(GCRA_SCRIPT, keys, args)
        assert again[0] == 1 and again[2] > 3_590_000_000
        hour_ttl = await store.call("PTTL", "{k}:1h")
        assert 3_590_000 <= hour_ttl <= 3_600_001
    finally:
        await store.close()
