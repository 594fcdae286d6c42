"""Cache stores: the byte-bounded LRU, the entry encoding, the Redis store (with a fake client)."""

from __future__ import annotations

import fnmatch
from typing import Any

import pytest

from apigate.plugins.cache_store import (
    KEY_SEP,
    MARKER_PREFIX,
    VARIANT_SEP,
    CacheEntry,
    MemoryStore,
    RedisCacheStore,
    decode_entry,
    encode_entry,
    key_fields,
    target_of,
)
from apigate.store.redis import StoreUnavailable

NOW = 1_700_000_000.0


def key(route: str = "r", target: str = "/a", consumer: str = "") -> str:
    return KEY_SEP.join((route, "GET", target, "example.com", consumer))


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


def test_target_of_drops_the_consumer_and_the_variant() -> None:
    target = KEY_SEP.join(("users", "GET", "/u/1?x=2", "example.com"))
    for consumer in ("", "alice", "odd\x1fname\x1ewith separators"):
        base = key("users", "/u/1?x=2", consumer)
        assert target_of(base) == target
        assert target_of(variant(base, "en", "gzip")) == target


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


def target(route: str = "r", path: str = "/a") -> str:
    return target_of(key(route, path))


def test_invalidate_removes_every_consumers_entries_and_variants() -> None:
    """RFC 9111 §4.4: all the target's stored responses, whatever their secondary keys."""
    store = MemoryStore(max_bytes=1 << 20)
    markers, responses = [], []
    for consumer in ("", "alice", "bob"):  # Vary: Accept-Language, a marker at each base key
        base = key("r", "/a", consumer)
        markers.append(base)
        responses += [variant(base, "en"), variant(base, "fr")]
    responses.append(key("r", "/a", "carol"))  # a consumer whose response has no Vary
    kept = [
        key("r", "/b", "alice"),
        key("r", "/a?x", "alice"),
        key("s", "/a", "alice"),
        KEY_SEP.join(("r", "GET", "/a", "other.example.com", "alice")),
    ]
    for k in markers:
        store.put(entry(k, status=0, vary=("accept-language",)))
    for k in responses + kept:
        store.put(entry(k))
    assert store.invalidate(target("r", "/a")) == len(responses) == 7  # markers not counted
    assert list(store._entries) == kept
    assert store.bytes == sum(e.size for e in store._entries.values())
    assert store.invalidate(target("r", "/a")) == 0
    assert store.invalidate(target("r", "/nothing")) == 0
    assert store.indexed == len(store) == len(kept)


def test_invalidate_counts_only_what_is_still_stored() -> None:
    """Entries evicted, expired or purged are forgotten by the index as well."""
    base = key("r", "/a")
    one = entry(variant(base, "0")).size
    store = MemoryStore(max_bytes=one * 2)
    for i in range(4):  # the first two are evicted
        store.put(entry(variant(base, str(i))))
    store.put(entry(variant(base, "s"), lifetime=1))
    assert store.get(variant(base, "s"), NOW + 2) is None  # expired: dropped on read
    assert len(store) == 1
    assert store.invalidate(target()) == 1 and len(store) == 0 and store.bytes == 0
    store.put(entry(variant(base, "x")))
    store.purge(route="r")
    assert store.invalidate(target()) == 0
    assert not store._targets, "the index keeps keys that are gone"


def test_the_index_never_outlives_the_entries() -> None:
    """Every way out of the store (eviction, expiry on read, replacement, delete, purge,
    invalidation) takes the index slot along: the index names exactly the stored entries, so
    what bounds the entries (`max_bytes`) bounds it too, however many consumers and variants
    one target gets."""
    store = MemoryStore(max_bytes=entry(key("r", "/a", "c000")).size * 3 + 100)  # 3 fit

    def consistent() -> None:
        assert store.indexed == len(store) <= 3
        assert {k for k in store._entries} == {
            k
            for keys in store._targets.values()
            for k in ({keys} if isinstance(keys, str) else keys)
        }

    for i in range(100):  # 100 consumers of one target, each a minute apart
        # (living long enough to leave by eviction, not as expired ones the next put drops)
        store.put(entry(key("r", "/a", f"c{i:03}"), at=NOW + 60 * i, lifetime=10_000))
        consistent()
    assert len(store._targets) == 1 and store.evictions == 97
    for k in list(store._entries):  # long expired: dropped by the next lookup
        assert store.get(k, NOW + 100_000) is None
        consistent()
    assert not store._targets
    base = key("r", "/b", "alice")
    for k in (base, variant(base, "en"), variant(base, "en"), key("r", "/c")):
        store.put(entry(k))  # the second "en" replaces the first
        consistent()
    assert len(store) == 3 and len(store._targets) == 2
    store.delete(variant(base, "en"))
    consistent()
    assert store.purge(prefix="/c") == 1 and store.invalidate(target("r", "/b")) == 1
    consistent()
    assert not store._targets and store.bytes == 0


def test_an_entry_pays_for_its_index_slot() -> None:
    small = entry(key("r", "/a", ""))
    longer = entry(key("r", "/a", "x" * 100))
    assert longer.size - small.size == 3 * 100  # the store's key, and its prefix in the index


def test_purge_counts_responses_not_vary_markers() -> None:
    store = MemoryStore(max_bytes=1 << 20)
    base = key("r", "/a")
    store.put(entry(base, status=0))  # the marker naming Vary: Accept-Language
    store.put(entry(variant(base, "en")))
    store.put(entry(variant(base, "fr")))
    store.put(entry(key("r", "/b")))
    assert store.purge(prefix="/a") == 2
    assert len(store) == 1
    assert store.purge() == 1 and len(store) == 0


def test_repr_tells_the_state() -> None:
    store = MemoryStore(max_bytes=4096)
    store.put(entry())
    assert repr(store).startswith("<MemoryStore 1 entries for 1 targets, ")


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


def test_a_marker_is_told_by_its_first_bytes() -> None:
    """The Redis scripts count responses, not markers, from 7 bytes of each entry."""
    assert encode_entry(entry(status=0, vary=("accept",))).startswith(MARKER_PREFIX)
    for status in (200, 204, 404):
        assert not encode_entry(entry(status=status)).startswith(MARKER_PREFIX)
    assert len(MARKER_PREFIX) == 7  # GETRANGE key 0 6 in the scripts


@pytest.mark.parametrize("blob", [b"", b"no newline", b"{bad json\nbody", b'{"k":1}\nbody'])
def test_decode_refuses_garbage(blob: bytes) -> None:
    assert decode_entry(blob) is None


# ------------------------------------------------------------------------------ Redis


class FakeRedis:
    """The part of `apigate.store.redis.RedisStore` the cache uses, over dicts; `now_ms` is
    the Redis clock (TIME) and keys do not expire by themselves."""

    def __init__(self) -> None:
        self.data: dict[bytes, bytes] = {}
        self.zsets: dict[bytes, dict[bytes, int]] = {}
        self.ttl: dict[bytes, int] = {}  # the last PX / PEXPIRE given to a key, in ms
        self.now_ms = int(NOW * 1000)
        self.down = False
        self.calls: list[tuple[Any, ...]] = []

    def available(self) -> bool:
        return not self.down

    async def run_script(
        self, script: Any, keys: list[Any], args: list[Any], timeout: float
    ) -> Any:
        """The cache's scripts, told apart by their source, as the commands they send (the
        Lua itself runs against a real Redis in tests/integration/test_cache_gateway.py)."""
        source = script.source
        if "ZRANGE" in source:  # invalidate: every key the target's index names, the index
            removed = await self._delete_counting(await self.call("ZRANGE", keys[0], 0, -1))
            await self.call("DEL", keys[0])
            return removed
        if "delete(KEYS)" in source:  # purge
            return await self._delete_counting(keys)
        if "'GET'" in source:
            return await self.call("GET", *keys)
        assert "ZADD" in source
        ttl = int(args[1])
        await self.call("SET", keys[0], args[0], "PX", ttl)
        await self.call("ZREMRANGEBYSCORE", keys[1], "-inf", f"({self.now_ms}")
        await self.call("ZADD", keys[1], self.now_ms + ttl, keys[0])
        if await self.call("PTTL", keys[1]) < ttl:
            await self.call("PEXPIRE", keys[1], ttl)
        return 1

    async def _delete_counting(self, keys: list[Any]) -> int:
        responses = 0
        for k in keys:
            head = await self.call("GETRANGE", k, 0, len(MARKER_PREFIX) - 1)
            if await self.call("DEL", k) == 1 and head != MARKER_PREFIX:
                responses += 1
        return responses

    async def call(self, *command: Any, timeout: float | None = None) -> Any:
        self.calls.append(command)
        if self.down:
            raise StoreUnavailable("down")
        name, *args = command
        raw = [a.encode() if isinstance(a, str) else a for a in args]
        if name == "GET":
            return self.data.get(raw[0])
        if name == "GETRANGE":
            return self.data.get(raw[0], b"")[args[1] : args[2] + 1]
        if name == "SET":
            k, blob, _, ms = raw
            self.data[k] = blob
            self.ttl[k] = ms
            return True
        if name == "ZADD":
            self.zsets.setdefault(raw[0], {})[raw[2]] = args[1]
            return 1
        if name == "ZREMRANGEBYSCORE":
            below = int(args[2].removeprefix("("))
            zset = self.zsets.get(raw[0], {})
            for member in [m for m, score in zset.items() if score < below]:
                del zset[member]
            return 0
        if name == "ZRANGE":
            zset = self.zsets.get(raw[0], {})
            return sorted(zset, key=zset.__getitem__)
        if name == "PTTL":
            return self.ttl.get(raw[0], -1) if raw[0] in self.zsets else -2
        if name == "PEXPIRE":
            self.ttl[raw[0]] = args[1]
            return 1
        if name == "SCAN":
            pattern = args[2]
            found = [
                k for k in [*self.data, *self.zsets] if fnmatch.fnmatchcase(k.decode(), pattern)
            ]
            return 0, found
        if name == "DEL":
            return sum(
                1
                for k in raw
                if self.data.pop(k, None) is not None or self.zsets.pop(k, None) is not None
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


async def test_redis_indexes_every_entry_under_its_target(redis: FakeRedis) -> None:
    """Each entry's key, scored with the (Redis) time it expires; the index expires with its
    longest-kept entry."""
    store = RedisCacheStore(redis)  # type: ignore[arg-type]
    base = key("r", "/a", "alice")
    await store.put(entry(base, status=0, lifetime=60), NOW)  # the Vary marker
    await store.put(entry(variant(base, "en"), lifetime=60), NOW)
    await store.put(entry(variant(base, "fr"), lifetime=10, stale_window=100), NOW)
    await store.put(entry(key("r", "/a", "bob"), lifetime=30), NOW)
    await store.put(entry(key("r", "/b", "bob"), lifetime=30), NOW)
    index = store.target_index(target()).encode()
    ns, now = store.namespace, redis.now_ms
    assert redis.zsets[index] == {
        (ns + base).encode(): now + 60_000,
        (ns + variant(base, "en")).encode(): now + 60_000,
        (ns + variant(base, "fr")).encode(): now + 110_000,
        (ns + key("r", "/a", "bob")).encode(): now + 30_000,
    }
    assert redis.ttl[index] == 110_000
    assert set(redis.zsets) == {index, store.target_index(target("r", "/b")).encode()}
    assert not store.target_index(target()).startswith(store.namespace)  # purge never sees it


async def test_redis_index_drops_expired_members_when_it_stores(redis: FakeRedis) -> None:
    """A target stored again and again (one consumer after another, each for a second) keeps
    only the members whose entries can still be there: the index stays bounded even when it
    never expires itself."""
    store = RedisCacheStore(redis)  # type: ignore[arg-type]
    index = store.target_index(target()).encode()
    for i in range(100):
        redis.now_ms += 600
        now = redis.now_ms / 1000
        assert await store.put(entry(key("r", "/a", f"c{i}"), at=now, lifetime=1), now)
        assert len(redis.zsets[index]) <= 2
    assert redis.ttl[index] == 1000


async def test_redis_invalidate_removes_every_consumers_entries(redis: FakeRedis) -> None:
    store = RedisCacheStore(redis)  # type: ignore[arg-type]
    doomed = []
    for consumer in ("", "alice", "bob"):
        base = key("r", "/a", consumer)
        await store.put(entry(base, status=0, vary=("accept",)), NOW)
        doomed.append(base)
        for value in ("en", "fr"):
            await store.put(entry(variant(base, value)), NOW)
            doomed.append(variant(base, value))
    kept = [key("r", "/b", "alice"), key("s", "/a", "alice"), key("r", "/a?x", "bob")]
    for k in kept:
        await store.put(entry(k), NOW)
    assert await store.invalidate(target()) == 6  # responses: the 3 markers are not counted
    assert sorted(redis.data) == sorted((store.namespace + k).encode() for k in kept)
    assert store.target_index(target()).encode() not in redis.zsets
    for k in kept:
        assert await store.get(k, NOW) is not None
    assert await store.invalidate(target()) == 0
    redis.down = True
    assert await store.invalidate(target("r", "/b")) == 0  # an outage: nothing removed, raised


async def test_redis_purge_counts_responses_not_vary_markers(redis: FakeRedis) -> None:
    store = RedisCacheStore(redis)  # type: ignore[arg-type]
    base = key("r", "/a")
    await store.put(entry(base, status=0, vary=("accept",)), NOW)
    for value in ("en", "fr"):
        await store.put(entry(variant(base, value)), NOW)
    await store.put(entry(key("r", "/b")), NOW)
    assert await store.purge(prefix="/a") == 2
    assert await store.purge() == 1 and not redis.data


def test_expired_entries_nobody_reads_again_do_not_stay() -> None:
    """Unique keys with a short lifetime: expired entries piled up until LRU eviction."""
    store = MemoryStore(max_bytes=10_000_000)
    for i in range(100):
        store.put(entry(key(target=f"/old/{i}"), lifetime=3, at=NOW))
    for i in range(100):
        store.put(entry(key(target=f"/new/{i}"), lifetime=3, at=NOW + 10))
    assert len(store._entries) == 100
    assert all("/new/" in k for k in store._entries)
    assert store.bytes == sum(e.size for e in store._entries.values())
    assert sum(len(v) if isinstance(v, set) else 1 for v in store._targets.values()) == 100


def test_expired_entries_behind_a_long_lived_one_do_not_stay() -> None:
    """The review's mixed lifetimes: one max-age=3600 entry nobody reads again heads the LRU,
    then 2,000 unique keys with max-age=3, one every 10 ms. A sweep of the LRU's head stopped
    at the long-lived entry and kept 1,699 expired ones: only the ones still fresh may stay."""
    store = MemoryStore(max_bytes=100_000_000)
    store.put(entry(key(target="/long"), lifetime=3600, at=NOW))
    last = NOW
    for i in range(2000):
        last = NOW + i / 100
        store.put(entry(key(target=f"/short/{i}"), lifetime=3, at=last))
    expired = [k for k, e in store._entries.items() if last >= e.retain_until]
    assert len(expired) <= 8, f"{len(expired)} expired entries stayed"
    assert key(target="/long") in store
    assert len(store) <= 1 + 300 + 8
    assert store.bytes == sum(e.size for e in store._entries.values())
    assert store.indexed == len(store)


def test_the_expiry_heap_stays_proportional_to_the_entries() -> None:
    """Entries replaced or removed leave their heap items behind (skipped when they come
    up): the heap is rebuilt before they outnumber the entries."""
    store = MemoryStore(max_bytes=100_000_000)
    for i in range(5000):  # one key replaced again and again, lifetimes far from over
        store.put(entry(key(target="/same"), lifetime=3600, at=NOW + i))
        assert len(store._expiry) <= 2 * len(store) + 16
    for i in range(200):
        store.put(entry(key(target=f"/{i}"), lifetime=3600))
        store.delete(key(target=f"/{i}"))
        assert len(store._expiry) <= 2 * len(store) + 16
    assert len(store) == 1 and store.evictions == 0
