"""Script calls batched into round trips (`apigate.store.redis_batch`), over a fake client.

The fake stands for redis-py's asyncio client: plain EVALSHA/EVAL and non-transactional
pipelines, a script cache that answers NOSCRIPT until EVAL loads the script, and switches to
hang or break the connection. The same behaviours against a real redis-server are in
tests/integration/test_redis_store.py.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from apigate.store.redis import TIMEOUTS_TO_TRIP, RedisStore, Script, StoreUnavailable
from apigate.store.redis_batch import ScriptBatcher

SCRIPT = Script("return {KEYS[1], ARGV[1]}")
Command = tuple[Any, ...]


def echo(keys: list[Any], args: list[Any]) -> Any:
    if keys[0] == "bad":
        raise ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value")
    return [keys[0], args[0]]


class FakeClient:
    """What the batcher uses of redis-py's client; `trips` records each round trip's commands
    and whether it went as a pipeline."""

    def __init__(self, script: Callable[[list[Any], list[Any]], Any] = echo) -> None:
        self.script = script
        self.known: set[str] = {SCRIPT.sha}  # the server's script cache
        self.trips: list[tuple[str, list[Command]]] = []
        self.hang: asyncio.Event | None = None  # set: answers wait until the event is set
        self.broken = False  # every round trip fails as a reset connection would
        self.cancelled = 0  # round trips abandoned mid-way (redis-py drops their connection)

    async def round_trip(self, kind: str, commands: list[Command]) -> list[Any]:
        self.trips.append((kind, commands))
        try:
            if self.hang is not None:
                await self.hang.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.broken:
            raise RedisConnectionError("Connection reset by peer")
        return [self._run(*command) for command in commands]

    def _run(self, name: str, script: str, numkeys: int, *keys_and_args: Any) -> Any:
        if name == "EVAL":
            self.known.add(hashlib.sha1(script.encode()).hexdigest())
        elif script not in self.known:
            return NoScriptError("No matching script. Please use EVAL.")
        keys, args = list(keys_and_args[:numkeys]), list(keys_and_args[numkeys:])
        try:
            return self.script(keys, args)
        except ResponseError as exc:
            return exc

    async def evalsha(self, *command: Any) -> Any:
        return self._raise((await self.round_trip("command", [("EVALSHA", *command)]))[0])

    async def eval(self, *command: Any) -> Any:
        return self._raise((await self.round_trip("command", [("EVAL", *command)]))[0])

    @staticmethod
    def _raise(reply: Any) -> Any:
        if isinstance(reply, Exception):
            raise reply
        return reply

    def pipeline(self, transaction: bool) -> FakePipeline:
        assert transaction is False
        return FakePipeline(self)

    def sizes(self) -> list[int]:
        return [len(commands) for _, commands in self.trips]


class FakePipeline:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.commands: list[Command] = []

    def evalsha(self, *command: Any) -> FakePipeline:
        self.commands.append(("EVALSHA", *command))
        return self

    def eval(self, *command: Any) -> FakePipeline:
        self.commands.append(("EVAL", *command))
        return self

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        assert raise_on_error is False  # one call's error must not fail the others
        return await self.client.round_trip("pipeline", self.commands)


class Health:
    """Records what the batcher reports to the store's outage bookkeeping."""

    def __init__(self) -> None:
        self.failures: list[BaseException] = []
        self.successes = 0

    def failed(self, exc: BaseException) -> None:
        self.failures.append(exc)

    def succeeded(self) -> None:
        self.successes += 1


def batcher(client: FakeClient, health: Health, max_batch: int = 256) -> ScriptBatcher:
    return ScriptBatcher(
        client,  # type: ignore[arg-type]
        on_failure=health.failed,
        on_success=health.succeeded,
        max_batch=max_batch,
    )


async def call(b: ScriptBatcher, key: str, arg: int = 0, timeout: float = 1.0) -> Any:
    return await b.submit(SCRIPT, [key], [arg], timeout)


async def settled(*calls: Any) -> list[Any]:
    return list(await asyncio.gather(*calls, return_exceptions=True))


# ============================================================================ batching
async def test_calls_of_one_loop_tick_share_one_pipeline() -> None:
    client, health = FakeClient(), Health()
    b = batcher(client, health)
    results = await settled(*(call(b, f"k{i}", i) for i in range(50)))
    assert results == [[f"k{i}", i] for i in range(50)]  # each caller gets its own reply
    assert [kind for kind, _ in client.trips] == ["pipeline"] and client.sizes() == [50]
    assert health.successes == 1 and health.failures == []
    assert repr(b) == "<ScriptBatcher 0 queued, 0 in flight, 1 round trips, max 256>"


async def test_a_lone_call_goes_as_a_plain_command() -> None:
    client, health = FakeClient(), Health()
    b = batcher(client, health)
    assert await call(b, "k", 7) == ["k", 7]
    assert client.trips == [("command", [("EVALSHA", SCRIPT.sha, 1, "k", 7)])]


async def test_calls_of_later_ticks_go_in_later_batches() -> None:
    client, health = FakeClient(), Health()
    b = batcher(client, health)

    async def later(key: str) -> Any:
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        return await call(b, key)

    assert await settled(call(b, "a"), call(b, "b"), later("c")) == [["a", 0], ["b", 0], ["c", 0]]
    assert client.sizes() == [2, 1]


async def test_a_batch_holds_at_most_max_batch_calls() -> None:
    client, health = FakeClient(), Health()
    b = batcher(client, health, max_batch=8)
    results = await settled(*(call(b, f"k{i}", i) for i in range(20)))
    assert results == [[f"k{i}", i] for i in range(20)]
    assert client.sizes() == [8, 8, 4]


# ============================================================================ per-call errors
async def test_a_script_error_fails_only_its_own_call() -> None:
    client, health = FakeClient(), Health()
    b = batcher(client, health)
    ok1, bad, ok2 = await settled(call(b, "a"), call(b, "bad"), call(b, "c"))
    assert ok1 == ["a", 0] and ok2 == ["c", 0]
    assert isinstance(bad, StoreUnavailable) and "WRONGTYPE" in str(bad)
    assert isinstance(bad.__cause__, ResponseError)
    assert health.failures == [] and health.successes == 1  # Redis answered: no outage


async def test_a_lone_call_script_error_is_that_calls_error() -> None:
    client, health = FakeClient(), Health()
    b = batcher(client, health)
    with pytest.raises(StoreUnavailable, match="WRONGTYPE"):
        await call(b, "bad")
    assert health.failures == [] and health.successes == 1


async def test_noscript_sends_those_calls_again_as_eval() -> None:
    client, health = FakeClient(), Health()
    client.known.clear()  # a restarted or flushed Redis
    b = batcher(client, health)
    assert await settled(call(b, "a"), call(b, "b")) == [["a", 0], ["b", 0]]
    (_, first), (_, second) = client.trips
    assert [c[0] for c in first] == ["EVALSHA", "EVALSHA"]
    assert [c[:2] for c in second] == [("EVAL", SCRIPT.source)] * 2
    assert await settled(call(b, "c"), call(b, "d")) == [["c", 0], ["d", 0]]
    assert [c[0] for c in client.trips[-1][1]] == ["EVALSHA", "EVALSHA"]  # loaded now
    assert health.successes == 2


async def test_noscript_for_a_lone_call() -> None:
    client, health = FakeClient(), Health()
    client.known.clear()
    b = batcher(client, health)
    assert await call(b, "a") == ["a", 0]
    assert [commands[0][0] for _, commands in client.trips] == ["EVALSHA", "EVAL"]


async def test_a_broken_connection_fails_the_batch_and_counts_once() -> None:
    client, health = FakeClient(), Health()
    client.broken = True
    b = batcher(client, health)
    results = await settled(*(call(b, f"k{i}") for i in range(10)))
    assert all(isinstance(r, StoreUnavailable) and "reset" in str(r) for r in results)
    assert len(health.failures) == 1 and health.successes == 0


async def test_a_cancelled_caller_leaves_the_others_alone() -> None:
    client, health = FakeClient(), Health()
    b = batcher(client, health)
    gone = asyncio.ensure_future(call(b, "gone"))
    others = asyncio.gather(call(b, "a"), call(b, "b"))
    await asyncio.sleep(0)  # every call is queued; the batch is not sent yet
    gone.cancel()
    assert await others == [["a", 0], ["b", 0]]
    assert gone.cancelled()
    assert client.sizes() == [2]  # the cancelled call was not sent


# ============================================================================ deadlines
async def test_a_hanging_redis_fails_every_caller_at_its_deadline() -> None:
    client, health = FakeClient(), Health()
    client.hang = asyncio.Event()
    b = batcher(client, health)
    start = time.monotonic()
    results = await settled(*(call(b, f"k{i}", timeout=0.03) for i in range(20)))
    elapsed = time.monotonic() - start
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert all(isinstance(r.__cause__, TimeoutError) for r in results)
    assert 0.025 <= elapsed < 0.5
    assert len(health.failures) == 1  # one slow round trip, however many callers shared it
    await asyncio.sleep(0)
    assert client.cancelled == 1  # nobody waits: the round trip (its connection) is dropped
    assert "0 in flight" in repr(b)


async def test_each_call_keeps_its_own_deadline() -> None:
    client, health = FakeClient(), Health()
    client.hang = asyncio.Event()
    b = batcher(client, health)
    loop = asyncio.get_running_loop()
    loop.call_later(0.1, client.hang.set)  # the answer comes after 0.1 s
    short, long, shorter = await settled(
        call(b, "short", timeout=0.05), call(b, "long", timeout=2.0), call(b, "s", timeout=0.02)
    )
    assert isinstance(short, StoreUnavailable) and isinstance(shorter, StoreUnavailable)
    assert long == ["long", 0]
    assert len(health.failures) == 1 and health.successes == 1
    assert client.cancelled == 0


async def test_close_fails_queued_and_waiting_calls() -> None:
    client, health = FakeClient(), Health()
    client.hang = asyncio.Event()
    b = batcher(client, health)
    waiting = asyncio.gather(call(b, "a"), call(b, "b"), return_exceptions=True)
    await asyncio.sleep(0.01)  # sent, waiting for the answer
    queued = asyncio.ensure_future(call(b, "c"))
    await asyncio.sleep(0)  # queued, not sent yet
    await b.close()
    assert all(isinstance(r, StoreUnavailable) for r in await waiting)
    with pytest.raises(StoreUnavailable):
        await queued


# ============================================================================ the store
async def test_timed_out_batches_trip_the_store_like_timed_out_calls() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", timeout=0.02, retry_after=0.05)
    client = FakeClient()
    client.hang = asyncio.Event()
    store.scripts.client = client  # type: ignore[assignment]
    for _ in range(TIMEOUTS_TO_TRIP):
        assert not store.is_down  # a batch of 30 timeouts is one slow answer, not an outage
        results = await settled(*(store.run_script(SCRIPT, [f"k{i}"], [0]) for i in range(30)))
        assert all(isinstance(r, StoreUnavailable) for r in results)
    assert store.is_down and not store.available()
    client.hang.set()
    await asyncio.sleep(0.06)
    assert store.available()  # the probe
    assert await store.run_script(SCRIPT, ["k"], [1]) == ["k", 1]
    assert not store.is_down
    await store.close()
