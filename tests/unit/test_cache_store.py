"""Cache stores: the byte-bounded LRU, the entry encoding, the Redis store (with a fake client)."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest

from apigate.plugins.cache_store import (
    KEY_SEP,
    CacheEntry,
    MemoryStore,
    RedisCacheStore,
    decode_entry,
    encode_entry,
    key_fields,
)
from apigate.store.redis import StoreUnavailable

NOW = 1_700_000_000.0


def key(route: str = "r", target: str = "/a") -> str:
    return KEY_SEP.join((route, "GET", target, "example.com", ""))


def entry(
    k: str | None = None, body: bytes = b"x" * 100, lifetime: float = 60, **kw: Any
) -> CacheEntry:
    k = k or key()
    route, target = key_fields(k)
    return CacheEntry(
        key=k,
        route=route,
        target=target,
        status=kw.pop("status", 200),
        headers=kw.pop("headers", [(b"Cache-Control", b"max-age=60")]),
        body=body,
        content_type=kw.pop("content_type", b"application/json"),
        stored_at=kw.pop("at", NOW),
        initial_age=0.0,
        lifetime=lifetime,
        **kw,
    )


def test_key_fields() -> None:
    assert key_fields(key("users", "/u/1?x=2")) == ("users", "/u/1?x=2")
    assert key_fields(key("users", "/u") + "\x1een\x1fgzip") == ("users", "/u")


# ------------------------------------------------------------------------------ memory LRU


def test_size_counts_body_headers_and_key() -> None:
    small, big = entry(body=b""), entry(body=b"x" * 1000)
    assert big.size - small.size == 1000
    assert small.size > len(small.key)


def test_lru_stays_within_its_byte_bound() -> None:
    one = entry(key("r", "/0")).size
    store = MemoryStore(max_bytes=one * 3)
    for i in range(10):
        assert store.put(entry(key("r", f"/{i}")))
        assert store.bytes <= store.max_bytes
    assert len(store) == 3 and store.evictions == 7
    assert [key("r", f"/{i}") in store for i in (7, 8, 9)] == [True] * 3


def test_lru_evicts_least_recently_used_not_oldest() -> None:
    one = entry(key("r", "/0")).size
    store = MemoryStore(max_bytes=one * 2)
    store.put(entry(key("r", "/0")))
    store.put(entry(key("r", "/1")))
    assert store.get(key("r", "/0"), NOW) is not None  # /0 becomes most recent
    store.put(entry(key("r", "/2")))
    assert key("r", "/0") in store and key("r", "/1") not in store


def test_replacing_an_entry_keeps_the_byte_count_right() -> None:
    store = MemoryStore(max_bytes=1 << 20)
    store.put(entry(body=b"a" * 100))
    store.put(entry(body=b"b" * 500))
    assert len(store) == 1 and store.bytes == entry(body=b"b" * 500).size


def test_an_entry_larger_than_the_whole_store_is_refused() -> None:
    store = MemoryStore(max_bytes=1000)
    assert not store.put(entry(body=b"x" * 2000))
    assert len(store) == 0 and store.bytes == 0


def test_expired_entries_are_dropped_on_read_but_kept_for_stale_window() -> None:
    store = MemoryStore(max_bytes=1 << 20)
    store.put(entry(key("r", "/fresh"), lifetime=60))
    store.put(entry(key("r", "/stale"), lifetime=60, stale_window=100))
    assert store.get(key("r", "/fresh"), NOW + 59) is not None
    assert store.get(key("r", "/fresh"), NOW + 61) is None
    assert key("r", "/fresh") not in store
    assert store.get(key("r", "/stale"), NOW + 120) is not None  # stale but kept
    assert store.get(key("r", "/stale"), NOW + 161) is None


def test_purge_by_route_and_prefix() -> None:
    store = MemoryStore(max_bytes=1 << 20)
    for route, target in [
        ("a", "/users/1"),
        ("a", "/users/2"),
        ("a", "/orders"),
        ("b", "/users/1"),
    ]:
        store.put(entry(key(route, target)))
    assert store.purge(route="a", prefix="/users/") == 2
    assert len(store) == 2
    assert store.purge(prefix="/users") == 1
    assert store.purge() == 1
    assert len(store) == 0 and store.bytes == 0


def test_repr_tells_the_state() -> None:
    store = MemoryStore(max_bytes=4096)
    store.put(entry())
    assert repr(store).startswith("<MemoryStore 1 entries, ")


# ------------------------------------------------------------------------------ encoding


def test_encode_decode_round_trip() -> None:
    original = entry(
        body=b"\x00\n\xffbinary\n",
        headers=[(b"ETag", b'"v1"'), (b"X-Latin", b"caf\xe9")],
        stale_window=5,
        auth_ok=True,
        vary=("accept",),
        etag='"v1"',
        last_modified=None,
    )
    copy = decode_entry(encode_entry(original))
    assert copy is not None
    for name in (
        "key",
        "route",
        "target",
        "status",
        "headers",
        "body",
        "content_type",
        "stored_at",
        "initial_age",
        "lifetime",
        "stale_window",
        "auth_ok",
        "vary",
        "etag",
        "last_modified",
        "size",
    ):
        assert getattr(copy, name) == getattr(original, name), name


@pytest.mark.parametrize("blob", [b"", b"no newline", b"{bad json\nbody", b'{"k":1}\nbody'])
def test_decode_refuses_garbage(blob: bytes) -> None:
    assert decode_entry(blob) is None


# ------------------------------------------------------------------------------ Redis


class FakeRedis:
    """The part of `apigate.store.redis.RedisStore` the cache uses, over a dict."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.ttl: dict[bytes, int] = {}
        self.down = False
        self.calls: list[tuple[Any, ...]] = []

    def available(self) -> bool:
        return not self.down

    async def run_script(
        self, script: Any, keys: list[str], args: list[Any], timeout: float
    ) -> Any:
        """The cache's two scripts, told apart by their source."""
        name = "GET" if "'GET'" in script.source else "SET"
        return await self.call(name, *keys, *([args[0], "PX", args[1]] if args else []))

    async def call(self, *command: Any, timeout: float | None = None) -> Any:
        self.calls.append(command)
        if self.down:
            raise StoreUnavailable("down")
        name, *args = command
        if name == "GET":
            return self.data.get(args[0].encode())
        if name == "SET":
            k, blob, _, ms = args
            self.data[k.encode()] = blob
            self.ttl[k.encode()] = ms
            return True
        if name == "SCAN":
            pattern = args[2]
            found = [k for k in self.data if fnmatch.fnmatchcase(k.decode(), pattern)]
            return 0, found
        if name == "DEL":
            return sum(1 for k in args if self.data.pop(k, None) is not None)
        raise AssertionError(name)


@pytest.fixture
def redis() -> FakeRedis:
    return FakeRedis()


async def test_redis_put_then_get(redis: FakeRedis) -> None:
    store = RedisCacheStore(redis)  # type: ignore[arg-type]
    e = entry(lifetime=60, stale_window=30)
    assert await store.put(e, NOW + 10)
    assert redis.ttl[(store.namespace + e.key).encode()] == 80_000  # retained until stale end
    got = await store.get(e.key, NOW + 20)
    assert got is not None and got.body == e.body
    assert await store.get(e.key, NOW + 91) is None  # past retention even if Redis kept it


async def test_redis_outage_reads_as_a_miss(redis: FakeRedis) -> None:
    store = RedisCacheStore(redis)  # type: ignore[arg-type]
    e = entry()
    await store.put(e, NOW)
    redis.down = True
    assert await store.get(e.key, NOW) is None
    assert not await store.put(e, NOW)


async def test_redis_purge_filters_by_route_and_prefix(redis: FakeRedis) -> None:
    store = RedisCacheStore(redis)  # type: ignore[arg-type]
    for route, target in [("a", "/users/1"), ("a", "/orders"), ("b", "/users/1")]:
        await store.put(entry(key(route, target)), NOW)
    assert await store.purge(route="a", prefix="/users") == 1
    assert await store.purge(prefix="/users") == 1
    assert len(redis.data) == 1
