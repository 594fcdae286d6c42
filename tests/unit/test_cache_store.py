"""Cache stores: the byte-bounded LRU, the entry encoding, the Redis store (with a fake client)."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest

from apigate.plugins.cache_store import (
    KEY_SEP,
    VARIANT_SEP,
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


def variant(base: str, *values: str) -> str:
    return base + VARIANT_SEP + KEY_SEP.join(values)


def test_invalidate_removes_the_base_entry_and_every_variant() -> None:
    store = MemoryStore(max_bytes=1 << 20)
    base, other = key("r", "/a"), key("r", "/b")
    for k in (base, variant(base, "en"), variant(base, "fr"), other, variant(other, "en")):
        store.put(entry(k))
    assert store.invalidate(base) == 3
    assert list(store._entries) == [other, variant(other, "en")]
    assert store.bytes == sum(e.size for e in store._entries.values())
    assert store.invalidate(base) == 0
    assert store.invalidate(key("r", "/nothing")) == 0


def test_invalidate_counts_only_what_is_still_stored() -> None:
    """Variants evicted, expired or purged are forgotten by the index as well."""
    base = key("r", "/a")
    one = entry(variant(base, "0")).size
    store = MemoryStore(max_bytes=one * 2)
    for i in range(4):  # the first two are evicted
        store.put(entry(variant(base, str(i))))
    store.put(entry(variant(base, "s"), lifetime=1))
    assert store.get(variant(base, "s"), NOW + 2) is None  # expired: dropped on read
    assert len(store) == 1
    assert store.invalidate(base) == 1 and len(store) == 0 and store.bytes == 0
    store.put(entry(variant(base, "x")))
    store.purge(route="r")
    assert store.invalidate(base) == 0
    assert not store._variants, "the index keeps keys that are gone"


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
        self.sets: dict[bytes, set[bytes]] = {}
        self.ttl: dict[bytes, int] = {}
        self.down = False
        self.calls: list[tuple[Any, ...]] = []

    def available(self) -> bool:
        return not self.down

    async def run_script(
        self, script: Any, keys: list[str], args: list[Any], timeout: float
    ) -> Any:
        """The cache's scripts, told apart by their source (the Lua itself runs against a
        real Redis in tests/integration/test_cache_gateway.py)."""
        source = script.source
        if "SMEMBERS" in source:  # invalidate: the base key, every indexed variant, the index
            members = await self.call("SMEMBERS", keys[1])
            removed = await self.call("DEL", keys[0], *members)
            await self.call("DEL", keys[1])
            return removed
        if "'GET'" in source:
            return await self.call("GET", *keys)
        await self.call("SET", keys[0], args[0], "PX", args[1])
        if "SADD" in source:  # a variant: indexed under its base key, kept as long as it
            await self.call("SADD", keys[1], keys[0])
            index = keys[1].encode()
            self.ttl[index] = max(self.ttl.get(index, 0), int(args[1]))
        return True

    async def call(self, *command: Any, timeout: float | None = None) -> Any:
        self.calls.append(command)
        if self.down:
            raise StoreUnavailable("down")
        name, *args = command
        raw = [a.encode() if isinstance(a, str) else a for a in args]
        if name == "GET":
            return self.data.get(raw[0])
        if name == "SET":
            k, blob, _, ms = raw
            self.data[k] = blob
            self.ttl[k] = ms
            return True
        if name == "SADD":
            self.sets.setdefault(raw[0], set()).update(raw[1:])
            return 1
        if name == "SMEMBERS":
            return list(self.sets.get(raw[0], ()))
        if name == "SCAN":
            pattern = args[2]
            found = [
                k for k in [*self.data, *self.sets] if fnmatch.fnmatchcase(k.decode(), pattern)
            ]
            return 0, found
        if name == "DEL":
            return sum(
                1
                for k in raw
                if self.data.pop(k, None) is not None or self.sets.pop(k, None) is not None
            )
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


async def test_redis_indexes_variants_under_their_base(redis: FakeRedis) -> None:
    store = RedisCacheStore(redis)  # type: ignore[arg-type]
    base = key("r", "/a")
    await store.put(entry(base, status=0, lifetime=60), NOW)  # the Vary marker: not indexed
    await store.put(entry(variant(base, "en"), lifetime=60), NOW)
    await store.put(entry(variant(base, "fr"), lifetime=10, stale_window=100), NOW)
    await store.put(entry(variant(base, "de"), lifetime=30), NOW)
    index = store.variants_key(base).encode()
    assert redis.sets == {
        index: {(store.namespace + variant(base, v)).encode() for v in ("en", "fr", "de")}
    }
    assert redis.ttl[index] == 110_000  # as long as its longest-kept variant
    assert not store.variants_key(base).startswith(store.namespace)  # purge never sees it


async def test_redis_invalidate_removes_the_base_and_its_variants(redis: FakeRedis) -> None:
    store = RedisCacheStore(redis)  # type: ignore[arg-type]
    base, other = key("r", "/a"), key("r", "/b")
    for k in (base, variant(base, "en"), variant(base, "fr"), other, variant(other, "en")):
        await store.put(entry(k), NOW)
    assert await store.invalidate(base) == 3
    assert sorted(redis.data) == sorted(
        (store.namespace + k).encode() for k in (other, variant(other, "en"))
    )
    assert await store.get(variant(other, "en"), NOW) is not None
    assert await store.invalidate(base) == 0
    redis.down = True
    assert await store.invalidate(other) == 0  # an outage: nothing removed, nothing raised
