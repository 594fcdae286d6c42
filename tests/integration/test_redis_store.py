"""The Redis store's batched script calls against a real redis-server (no fakes).

Many concurrent `run_script` calls share round trips (counted by the batcher and by Redis's own
`total_reads_processed`), yet every caller gets its own reply or its own error, under its own
deadline, through a hanging (SIGSTOP), killed, restarted or script-flushed Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from apigate.plugins.cache_store import RedisCacheStore
from apigate.plugins.rate_limit import GCRA_SCRIPT
from apigate.store.redis import TIMEOUTS_TO_TRIP, RedisStore, StoreUnavailable
from tests.support.redis_server import RedisServer
from tests.unit.test_cache_store import NOW, entry, key

pytestmark = pytest.mark.asyncio(loop_scope="module")

CALLERS = 200
TOLERANCE = 10_000_000  # µs: GCRA admits every call below


@pytest_asyncio.fixture(loop_scope="module")
async def redis() -> AsyncIterator[RedisServer]:
    async with RedisServer() as server:
        yield server


@pytest_asyncio.fixture(loop_scope="module")
async def store(redis: RedisServer) -> AsyncIterator[RedisStore]:
    store = RedisStore(redis.url, timeout=1.0, retry_after=0.2)
    try:
        yield store
    finally:
        await store.close()


async def gcra(store: RedisStore, tag: str, n: int = CALLERS, timeout: float = 1.0) -> list[Any]:
    """`n` concurrent GCRA calls on fresh keys, call i with interval 1000 + i µs: on a fresh key
    the script answers [1, interval], so every reply says whose it is."""
    calls = [
        store.run_script(GCRA_SCRIPT, [f"{tag}:{i}"], [1000 + i, TOLERANCE], timeout=timeout)
        for i in range(n)
    ]
    return list(await asyncio.gather(*calls, return_exceptions=True))


def own_replies(n: int = CALLERS) -> list[list[int]]:
    return [[1, 1000 + i] for i in range(n)]


async def stat(store: RedisStore, section: str, name: str) -> Any:
    info = await store.call("INFO", section)
    return info.get(name, {"calls": 0}) if section == "commandstats" else info[name]


# ============================================================================ batching
async def test_concurrent_calls_share_round_trips(store: RedisStore) -> None:
    await gcra(store, "warm", 1)  # loads the script
    trips = store.scripts.round_trips
    reads = await stat(store, "stats", "total_reads_processed")
    evalsha = (await stat(store, "commandstats", "cmdstat_evalsha"))["calls"]

    assert await gcra(store, "a") == own_replies()

    assert store.scripts.round_trips - trips == 1  # one pipeline for 200 callers
    assert (await stat(store, "commandstats", "cmdstat_evalsha"))["calls"] - evalsha == CALLERS
    # Redis's own count of socket reads: the pipeline, the INFO calls, nothing per caller
    assert await stat(store, "stats", "total_reads_processed") - reads < 10
    assert not store.is_down


async def test_concurrent_cache_lookups_and_stores_share_round_trips(store: RedisStore) -> None:
    cache = RedisCacheStore(store, namespace="batch:", timeout=1.0)
    entries = [entry(key("r", f"/{i}"), body=b"%d" % i) for i in range(50)]
    await cache.put(entries[0], NOW)  # loads the SET script
    await cache.get(entries[0].key, NOW)  # and the GET script
    trips = store.scripts.round_trips
    assert all(await asyncio.gather(*(cache.put(e, NOW) for e in entries)))
    got = await asyncio.gather(*(cache.get(e.key, NOW) for e in entries))
    assert [g.body if g else None for g in got] == [e.body for e in entries]
    assert store.scripts.round_trips - trips == 2  # one pipeline for 50 stores, one for 50 reads


async def test_more_callers_than_a_batch_holds(redis: RedisServer) -> None:
    store = RedisStore(redis.url, timeout=1.0, max_batch=64)
    try:
        await gcra(store, "warm", 1)
        trips = store.scripts.round_trips
        assert await gcra(store, "b") == own_replies()
        assert store.scripts.round_trips - trips == 4  # 64 + 64 + 64 + 8
    finally:
        await store.close()


async def test_a_script_error_fails_only_its_caller(store: RedisStore) -> None:
    await store.call("RPUSH", "bad:7", "not a timestamp")  # GET on a list: WRONGTYPE
    results = await gcra(store, "bad", 20)
    error = results[7]
    assert isinstance(error, StoreUnavailable) and "WRONGTYPE" in str(error)
    assert results[:7] + results[8:] == own_replies(20)[:7] + own_replies(20)[8:]
    assert not store.is_down  # Redis answered: an error reply is no outage


async def test_an_error_reply_to_a_command_is_no_outage(store: RedisStore) -> None:
    """The cache store's GET/SET go through `call`: a WRONGTYPE answer once marked the store
    down, and every feature using it skipped Redis for `retry_after`."""
    await store.call("RPUSH", "wrongtype:list", "x")
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await store.call("GET", "wrongtype:list")
    assert not store.is_down and store.available()
    assert await store.call("PING") is True


async def test_noscript_after_script_flush_is_handled_for_a_whole_batch(
    store: RedisStore,
) -> None:
    await gcra(store, "warm", 1)
    await store.call("SCRIPT", "FLUSH")
    evals = (await stat(store, "commandstats", "cmdstat_eval"))["calls"]
    trips = store.scripts.round_trips

    assert await gcra(store, "f") == own_replies()  # EVALSHA meets NOSCRIPT, then EVAL

    assert (await stat(store, "commandstats", "cmdstat_eval"))["calls"] - evals == CALLERS
    assert store.scripts.round_trips - trips == 2
    assert await gcra(store, "g") == own_replies()  # loaded again: EVALSHA alone
    assert (await stat(store, "commandstats", "cmdstat_eval"))["calls"] - evals == CALLERS
    assert not store.is_down


# ============================================================================ outages
async def test_a_paused_redis_times_out_every_caller_then_recovers(
    redis: RedisServer, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apigate.store.redis")
    await gcra(store, "warm", 1)
    redis.pause()
    try:
        for round_ in range(TIMEOUTS_TO_TRIP):
            # one batch of 200 timeouts is one slow round trip, not yet an outage
            assert not store.is_down, round_
            start = time.monotonic()
            results = await gcra(store, f"p{round_}", timeout=0.05)
            assert time.monotonic() - start < 0.5
            assert all(isinstance(r, StoreUnavailable) for r in results)
        assert store.is_down and not store.available()  # no I/O while down
    finally:
        redis.resume()
    await asyncio.sleep(0.25)
    assert store.available()  # the probe
    # The timed-out connections were dropped: their late replies reach nobody, so every caller
    # here gets its own answer.
    assert await gcra(store, "after") == own_replies()
    assert not store.is_down
    assert logged(caplog, "redis store unavailable") == 1
    assert logged(caplog, "redis store recovered") == 1


async def test_a_killed_then_restarted_redis(
    redis: RedisServer, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="apigate.store.redis")
    await gcra(store, "warm", 1)
    await redis.kill()
    start = time.monotonic()
    results = await gcra(store, "dead")
    assert time.monotonic() - start < 0.5  # refused at once, not after a timeout
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert store.is_down

    await redis.start()  # empty: the script must be loaded again
    await asyncio.sleep(0.25)
    assert store.available()
    assert await gcra(store, "back") == own_replies()
    assert not store.is_down
    assert logged(caplog, "redis store unavailable") == 1
    assert logged(caplog, "redis store recovered") == 1


def logged(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(text in record.getMessage() for record in caplog.records)


async def test_a_restart_between_calls_fails_none(
    redis: RedisServer, store: RedisStore, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis restarted while the pool's connections sat idle leaves each of them closed; every
    call after it must still be answered, and the store never taken for down (without the
    reconnect-once retry, each stale connection failed one call, each failure an outage)."""
    caplog.set_level(logging.INFO, logger="apigate.store.redis")
    await asyncio.gather(*(store.call("PING") for _ in range(8)))  # 8 pooled connections
    await gcra(store, "warm", 1)
    await redis.kill()
    await redis.start()  # no call in between: nothing has seen the outage yet
    for _ in range(8):  # one at a time, so that each takes one of the stale connections
        assert await store.call("PING") is True
    assert await asyncio.gather(*(store.call("PING") for _ in range(8))) == [True] * 8
    assert await gcra(store, "restarted") == own_replies()
    assert not store.is_down and logged(caplog, "redis store unavailable") == 0
