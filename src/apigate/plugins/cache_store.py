"""Where cached responses live: an in-process LRU bounded in bytes, or Redis.

Keys are strings built by `cache.py`:

    route \\x1f GET \\x1f path?query \\x1f host                (the "target" key)
    target \\x1f upstream path \\x1f consumer                  (the "base" key)
    base \\x1e value-of-vary-header-1 \\x1f value-2 ...      (one variant)

(The upstream path is empty when it is the client's; a Vary'd field the request lacks has
the value NUL, which no field value holds; each variant keeps the Vary names it was stored
with, which a lookup compares with its marker's.)

When a response carries `Vary`, the base key holds a small *marker* entry (status 0) naming
the Vary'd headers, and each variant is stored under its own key; a lookup reads the base key
and, when it finds a marker, the variant key. Entries carry their route and path?query so
that a purge by route or path prefix needs no key parsing (Redis keys are parsed on SCAN).
A purge and an invalidation count the responses they removed, not the markers.

`invalidate(target)` removes every entry stored for a target URI: each consumer's entry (or
marker) and every Vary variant (RFC 9111 §4.4: the cache MUST invalidate the target URI's
stored responses after a non-error answer to an unsafe request, whatever their secondary
keys). Those keys hold consumer names and request header values that the unsafe request does
not know, so each store indexes every entry it stores under its target key (`target_of`).
The index costs nothing on a lookup: it is written when an entry is stored and read by an
invalidation only, and it never outgrows the entries it names:

- memory: a dict (target key -> the key of its entry, or a set of them). Every way an entry
  leaves the store (LRU eviction, expiry found by a lookup, purge, invalidation) removes its
  key from the index in the same step, so the index names exactly the stored entries (an
  expired entry nobody reads is dropped by a later store, whatever its place in the LRU: see
  `MemoryStore._drop_expired`), and `max_bytes` bounds both (each entry's size charges its
  index slot);
- Redis: a sorted set per target (`apigate:cache-targets:<target>`, outside the namespace
  that purge scans) of the entries' keys scored by the (Redis) time their PX expiry ends. A
  store drops the members already expired before adding its own, and the set expires with its
  longest-kept member, so it holds at most the entries stored for the target within one
  retention period; an invalidation deletes the entries it names and the set, in one Lua
  script.

The memory store is synchronous (a hit costs a dict lookup and no task). The Redis store is
asynchronous and never fails a request: errors and timeouts read as a miss and a skipped
store, and `apigate.store.redis` stops calling a Redis that is down (one probe per 0.5 s).
"""

from __future__ import annotations

import heapq
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:  # imported when a Redis store is built: redis-py costs ~0.3 s at start-up
    from apigate.store.redis import RedisStore

__all__ = [
    "KEY_SEP",
    "VARIANT_SEP",
    "CacheEntry",
    "MemoryStore",
    "RedisCacheStore",
    "decode_entry",
    "encode_entry",
    "key_fields",
    "target_of",
]

log = logging.getLogger("apigate.plugins.cache")

KEY_SEP: Final = "\x1f"  # between the fields of a key (see cache_hit.base_key)
VARIANT_SEP: Final = "\x1e"  # between a base key and the values of its Vary'd fields

_ENTRY_OVERHEAD = 256  # object headers, dict slot, list: measured ~240 bytes per entry
# a memory store's target index, per entry: a dict slot or a set member and the target key
# (a prefix of the key) with its object header: measured 84-111 bytes with a 35-byte key
_INDEX_OVERHEAD = 64
# a memory store's expiry heap costs 64 bytes per entry (measured: a (retain_until, key) tuple,
# 56, and its list slot, 8; the float and the key are the entry's own objects), and its stale
# items (of entries replaced or removed) at most as much again, plus the keys of the removed
# entries they keep alive, until a rebuild. Not charged to an entry's size: the heap holds at
# most twice as many items as the store holds entries, which `max_bytes` bounds.
_EXPIRY_SWEEP_POPS = 8  # heap items a store looks at, at most: a put's work stays bounded


@dataclass(slots=True, eq=False)
class CacheEntry:
    """One stored response (or, with `status == 0`, a Vary marker for a base key)."""

    key: str
    route: str
    target: str  # path?query, for purge by prefix
    status: int
    headers: list[tuple[bytes, bytes]]  # end-to-end fields minus `cache_rules.UNSTORED_FIELDS`
    body: bytes
    content_type: bytes | None
    stored_at: float  # wall clock (entries travel between nodes through Redis)
    initial_age: float
    lifetime: float
    stale_window: float = 0.0
    auth_ok: bool = False
    vary: tuple[str, ...] = ()
    etag: str | None = None
    last_modified: str | None = None
    size: int = field(default=0, init=False)
    # kept (in the store) until then: fresh life plus the stale-if-error window (computed
    # once: the store compares it on every lookup)
    retain_until: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        self.retain_until = self.expires_at + self.stale_window
        self.size = (
            _ENTRY_OVERHEAD
            + _INDEX_OVERHEAD
            + len(self.body)
            + 3 * len(self.key)  # the store's dict and the entry share one; the index's prefix
            + len(self.target)
            + sum(len(n) + len(v) + 16 for n, v in self.headers)
        )

    @property
    def is_marker(self) -> bool:
        return self.status == 0

    @property
    def expires_at(self) -> float:
        return self.stored_at - self.initial_age + self.lifetime

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.stored_at)

    def __repr__(self) -> str:
        kind = "vary-marker" if self.is_marker else f"{self.status}"
        return f"<CacheEntry {self.route} {self.target} {kind} {len(self.body)}B>"


def target_of(key: str) -> str:
    """The target key (route, GET, path?query, Host) of a base or variant key: what an unsafe
    request to that target invalidates. (The route is a config name, the target was parsed by
    llhttp and the Host validated, so none of them holds a separator; the consumer's name,
    which comes after them, may hold anything.)"""
    return KEY_SEP.join(key.split(KEY_SEP, 4)[:4])


def key_fields(key: str) -> tuple[str, str]:
    """(route, target) of a key built by `cache.py`."""
    parts = key.split(KEY_SEP, 3)
    if len(parts) < 3:
        return "", ""
    return parts[0], parts[2]


def _matches(route: str, target: str, want_route: str | None, prefix: str | None) -> bool:
    if want_route is not None and route != want_route:
        return False
    return prefix is None or target.startswith(prefix)


class MemoryStore:
    """An LRU bounded by the bytes of its entries (bodies, headers, keys, a fixed overhead),
    with an index of its entries by target key for `invalidate`."""

    is_async = False

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        # target key -> the key of its entry stored here, or a set of them when there are
        # several: together exactly the keys of `_entries`. (A lone key goes in as itself:
        # a set costs 216 bytes even with one member, more than the rest of the index.)
        self._targets: dict[str, str | set[str]] = {}
        # (retain_until, key) of each entry stored, earliest first, so that a put finds the
        # expired entries whatever their place in the LRU. Lazy: an entry replaced or removed
        # leaves its item behind, skipped when it comes up (`_drop_expired`) and dropped by a
        # rebuild (`_compact_expiry`).
        self._expiry: list[tuple[float, str]] = []

    def get(self, key: str, now: float) -> CacheEntry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now >= entry.retain_until:
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, entry: CacheEntry) -> bool:
        """Store `entry` (replacing its key), evicting least recently used ones to fit."""
        if entry.size > self.max_bytes:
            return False
        key = entry.key
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes -= old.size  # (its key is indexed already)
        else:
            self._index(key)
        self._entries[key] = entry
        self.bytes += entry.size
        heapq.heappush(self._expiry, (entry.retain_until, key))
        self._drop_expired(entry.stored_at)
        while self.bytes > self.max_bytes:
            evicted_key, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size
            self.evictions += 1
            self._unindex(evicted_key)
        self._compact_expiry()
        return True

    def delete(self, key: str) -> None:
        self._drop(key)

    def _drop_expired(self, now: float) -> None:
        """Drop entries expired by `now` that nobody read again (a lookup drops the expired
        entry it finds; the others stayed until LRU eviction). Sweeping the LRU's head
        stopped at a long-lived entry there: a review counted 1,699 expired entries of 2,001
        behind a max-age=3600 one. The heap finds them whatever their LRU position; each put
        looks at `_EXPIRY_SWEEP_POPS` items at most and pushes one, so a backlog drains."""
        heap = self._expiry
        for _ in range(_EXPIRY_SWEEP_POPS):
            if not heap or now < heap[0][0]:
                return
            _, key = heapq.heappop(heap)
            entry = self._entries.get(key)
            # (a stale item's key may hold a replacement still fresh: kept, with its own item)
            if entry is not None and now >= entry.retain_until:
                self._drop(key)

    def _compact_expiry(self) -> None:
        """Rebuild the heap from the entries when stale items outnumber them: after each put
        the heap holds at most twice as many items as there are entries, and a rebuild
        (linear in the entries) follows at least as many replacements or removals, so its
        cost per put is constant, amortised."""
        if len(self._expiry) > 2 * len(self._entries):
            self._expiry = [(entry.retain_until, key) for key, entry in self._entries.items()]
            heapq.heapify(self._expiry)

    def invalidate(self, target: str) -> int:
        """Remove every entry stored for `target` (a `target_of` key): each consumer's, each
        Vary variant and marker; returns how many responses were removed (not markers)."""
        keys = self._targets.pop(target, None)
        if keys is None:
            return 0
        removed = 0
        for key in (keys,) if isinstance(keys, str) else keys:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self.bytes -= entry.size
                removed += not entry.is_marker
        return removed

    def _drop(self, key: str) -> CacheEntry | None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes -= entry.size
            self._unindex(key)
        return entry

    def _index(self, key: str) -> None:
        target = target_of(key)
        keys = self._targets.get(target)
        if keys is None:
            self._targets[target] = key
        elif isinstance(keys, str):
            self._targets[target] = {keys, key}
        else:
            keys.add(key)

    def _unindex(self, key: str) -> None:
        target = target_of(key)
        keys = self._targets.get(target)
        if keys is None:
            return
        if isinstance(keys, str):
            if keys == key:
                del self._targets[target]
            return
        keys.discard(key)
        if len(keys) == 1:
            self._targets[target] = keys.pop()

    @property
    def indexed(self) -> int:
        """Keys in the target index (always `len(self)`: the index never outlives an entry)."""
        return sum(1 if isinstance(keys, str) else len(keys) for keys in self._targets.values())

    def purge(self, route: str | None = None, prefix: str | None = None) -> int:
        """Remove the entries (and Vary markers) of `route` whose path?query starts with
        `prefix` (None: any); returns how many responses were removed (not markers)."""
        doomed = [
            key
            for key, entry in self._entries.items()
            if _matches(entry.route, entry.target, route, prefix)
        ]
        removed = 0
        for key in doomed:
            entry = self._drop(key)
            removed += entry is not None and not entry.is_marker
        return removed

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return (
            f"<MemoryStore {len(self._entries)} entries for {len(self._targets)} targets, "
            f"{self.bytes} of {self.max_bytes} bytes, {self.evictions} evicted>"
        )


# ------------------------------------------------------------------------------ Redis


def encode_entry(entry: CacheEntry) -> bytes:
    """One JSON line of metadata, then the body as raw bytes. The status comes first, so that
    a script tells a Vary marker by its first bytes (`MARKER_PREFIX`) without reading it."""
    meta = {
        "s": entry.status,
        "k": entry.key,
        "r": entry.route,
        "p": entry.target,
        "h": [[n.decode("latin-1"), v.decode("latin-1")] for n, v in entry.headers],
        "c": None if entry.content_type is None else entry.content_type.decode("latin-1"),
        "t": entry.stored_at,
        "a": entry.initial_age,
        "l": entry.lifetime,
        "w": entry.stale_window,
        "o": entry.auth_ok,
        "v": list(entry.vary),
        "e": entry.etag,
        "m": entry.last_modified,
    }
    return json.dumps(meta, separators=(",", ":")).encode() + b"\n" + entry.body


def decode_entry(blob: bytes) -> CacheEntry | None:
    """The entry `encode_entry` wrote, or None for anything malformed."""
    line, sep, body = blob.partition(b"\n")
    if not sep:
        return None
    try:
        meta: dict[str, Any] = json.loads(line)
        content_type = meta["c"]
        return CacheEntry(
            key=str(meta["k"]),
            route=str(meta["r"]),
            target=str(meta["p"]),
            status=int(meta["s"]),
            headers=[(n.encode("latin-1"), v.encode("latin-1")) for n, v in meta["h"]],
            body=body,
            content_type=None if content_type is None else content_type.encode("latin-1"),
            stored_at=float(meta["t"]),
            initial_age=float(meta["a"]),
            lifetime=float(meta["l"]),
            stale_window=float(meta["w"]),
            auth_ok=bool(meta["o"]),
            vary=tuple(meta["v"]),
            etag=meta["e"],
            last_modified=meta["m"],
        )
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeError):
        return None


MARKER_PREFIX = b'{"s":0,'  # how `encode_entry` starts a Vary marker (status 0)

# KEYS[1] an entry's key, KEYS[2] its target's index; ARGV[1] the entry, ARGV[2] its PX.
# The index scores each key with the (Redis) time its entry expires: the members already
# expired go before this one is added, and the index expires with its longest-kept member.
# (TIME in a script that writes needs effects replication: the default since Redis 5.)
_PUT = """
local now = redis.call('TIME')
now = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', string.format('(%d', now))
redis.call('ZADD', KEYS[2], string.format('%d', now + tonumber(ARGV[2])), KEYS[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# Delete `keys`, counting those that were stored and were not Vary markers (ARGV[1] is
# `MARKER_PREFIX`, 7 bytes: GETRANGE reads those, not the body).
_DELETE_COUNTING = """
local function delete(keys)
  local responses = 0
  for _, key in ipairs(keys) do
    local head = redis.call('GETRANGE', key, 0, 6)
    if redis.call('DEL', key) == 1 and head ~= ARGV[1] then
      responses = responses + 1
    end
  end
  return responses
end
"""

# KEYS[1] a target's index: delete every entry it names (keys not passed in KEYS: fine for
# the single Redis the cache uses, not for a Redis Cluster) and the index; returns the
# responses deleted. One DEL per key keeps a large index within Lua's argument limit.
_INVALIDATE = (
    _DELETE_COUNTING
    + """
local removed = delete(redis.call('ZRANGE', KEYS[1], 0, -1))
redis.call('DEL', KEYS[1])
return removed
"""
)

# KEYS: entries a purge found; returns the responses deleted.
_PURGE = _DELETE_COUNTING + "return delete(KEYS)\n"


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisCacheStore:
    """Entries as Redis strings with a PX expiry, through the process-wide Redis client.

    GET and SET (with the target index) go as scripts rather than plain commands: script
    calls made in the same loop iteration share one pipeline (`apigate.store.redis_batch`).
    With 64 concurrent lookups against a local Redis that measured ~28-38 µs of gateway CPU
    per lookup, against ~150-165 µs as plain commands (a pooled connection and a timeout
    context each)."""

    is_async = True

    def __init__(
        self, redis: RedisStore, *, namespace: str = "apigate:cache:", timeout: float = 0.1
    ) -> None:
        from apigate.store.redis import Script, StoreUnavailable

        self.redis = redis
        self.namespace = namespace
        # the target index lives beside the namespace, not in it: purge's SCAN never meets it
        self.targets_namespace = namespace.rstrip(":") + "-targets:"
        self.timeout = timeout
        self._unavailable: type[Exception] = StoreUnavailable
        self.get_script = Script("return redis.call('GET', KEYS[1])")
        self.put_script = Script(_PUT)
        self.invalidate_script = Script(_INVALIDATE)
        self.purge_script = Script(_PURGE)

    def target_index(self, target: str) -> str:
        """The Redis sorted set of the (namespaced) keys stored for `target`."""
        return self.targets_namespace + target

    async def get(self, key: str, now: float) -> CacheEntry | None:
        if not self.redis.available():
            return None
        try:
            blob = await self.redis.run_script(
                self.get_script, [self.namespace + key], [], timeout=self.timeout
            )
        except self._unavailable:
            return None
        if not isinstance(blob, bytes):
            return None
        entry = decode_entry(blob)
        if entry is None or entry.key != key or now >= entry.retain_until:
            return None
        return entry

    async def put(self, entry: CacheEntry, now: float) -> bool:
        ttl_ms = int((entry.retain_until - now) * 1000)
        if ttl_ms <= 0 or not self.redis.available():
            return False
        keys = [self.namespace + entry.key, self.target_index(target_of(entry.key))]
        try:
            await self.redis.run_script(
                self.put_script, keys, [encode_entry(entry), ttl_ms], timeout=self.timeout
            )
        except self._unavailable:
            return False
        return True

    async def invalidate(self, target: str) -> int:
        """Remove every entry stored for `target` (a `target_of` key): each consumer's, each
        Vary variant and marker; returns how many responses were removed (not markers; 0 when
        Redis is unavailable: never raises)."""
        if not self.redis.available():
            return 0
        try:
            removed = await self.redis.run_script(
                self.invalidate_script,
                [self.target_index(target)],
                [MARKER_PREFIX],
                timeout=self.timeout,
            )
        except self._unavailable:
            return 0
        return int(removed)

    async def purge(self, route: str | None = None, prefix: str | None = None) -> int:
        """Remove the entries (and Vary markers) of `route` whose path?query starts with
        `prefix` (None: any); returns how many responses were removed (not markers); raises
        StoreUnavailable.

        SCAN the namespace (narrowed to the route when given), delete what matches. (The
        target indexes keep the purged keys until they expire: an invalidation that meets
        one deletes nothing.)"""
        pattern = self.namespace + (_glob_escape(route) + KEY_SEP if route else "") + "*"
        cursor: Any = 0
        removed = 0
        while True:
            cursor, keys = await self.redis.call(
                "SCAN", cursor, "MATCH", pattern, "COUNT", 500, timeout=max(self.timeout, 2.0)
            )
            doomed = []
            for raw in keys:
                key = raw.decode("latin-1") if isinstance(raw, bytes) else str(raw)
                entry_route, target = key_fields(key[len(self.namespace) :])
                if _matches(entry_route, target, route, prefix):
                    doomed.append(raw)
            if doomed:
                removed += int(
                    await self.redis.run_script(
                        self.purge_script, doomed, [MARKER_PREFIX], timeout=2.0
                    )
                )
            if int(cursor) == 0:
                return removed

    def __repr__(self) -> str:
        return f"<RedisCacheStore {self.redis!r} ns={self.namespace!r}>"
