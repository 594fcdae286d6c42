"""Where cached responses live: an in-process LRU bounded in bytes, or Redis.

Keys are strings built by `cache.py`:

    route \\x1f GET \\x1f path?query \\x1f host \\x1f consumer            (the "base" key)
    base \\x1e value-of-vary-header-1 \\x1f value-2 ...                 (one variant)

When a response carries `Vary`, the base key holds a small *marker* entry (status 0) naming
the Vary'd headers, and each variant is stored under its own key; a lookup reads the base key
and, when it finds a marker, the variant key. Entries carry their route and path?query so
that a purge by route or path prefix needs no key parsing (Redis keys are parsed on SCAN).

`invalidate(base)` removes the entry (or marker) of a base key and every variant stored under
it (RFC 9111 §4.4, after an unsafe request). The variants' keys hold request header values
that cannot be derived from the base, so each store keeps an index of them per base key: a
dict of sets in memory, a Redis set (`apigate:cache-variants:<base>`, outside the namespace
that purge scans, expiring with its longest-kept variant) in Redis.

The memory store is synchronous (a hit costs a dict lookup and no task). The Redis store is
asynchronous and never fails a request: errors and timeouts read as a miss and a skipped
store, and `apigate.store.redis` stops calling a Redis that is down (one probe per 0.5 s).
"""

from __future__ import annotations

import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # imported when a Redis store is built: redis-py costs ~0.3 s at start-up
    from apigate.store.redis import RedisStore

__all__ = [
    "KEY_SEP",
    "VARIANT_SEP",
    "CacheEntry",
    "MemoryStore",
    "RedisCacheStore",
    "base_of",
    "decode_entry",
    "encode_entry",
    "key_fields",
]

log = logging.getLogger("apigate.plugins.cache")

KEY_SEP = "\x1f"
VARIANT_SEP = "\x1e"
_ENTRY_OVERHEAD = 256  # object headers, dict slot, list: measured ~240 bytes per entry


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
            + len(self.body)
            + 2 * len(self.key)
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


def base_of(key: str) -> str | None:
    """The base key a variant key belongs to; None for a base key itself."""
    base, sep, _ = key.partition(VARIANT_SEP)
    return base if sep else None


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
    """An LRU bounded by the bytes of its entries (bodies, headers, keys, a fixed overhead)."""

    is_async = False

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.evictions = 0
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        self._variants: dict[str, set[str]] = {}  # base key -> its variants' keys stored here

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
        old = self._entries.pop(entry.key, None)
        if old is not None:
            self.bytes -= old.size
        self._entries[entry.key] = entry
        self.bytes += entry.size
        base = base_of(entry.key)
        if base is not None:
            self._variants.setdefault(base, set()).add(entry.key)
        while self.bytes > self.max_bytes:
            evicted_key, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size
            self.evictions += 1
            self._unindex(evicted_key)
        return True

    def delete(self, key: str) -> None:
        self._drop(key)

    def invalidate(self, base: str) -> int:
        """Remove the entry (or Vary marker) under `base` and every variant of it; returns how
        many entries were removed."""
        removed = 0
        for key in (base, *self._variants.pop(base, ())):
            removed += self._drop(key)
        return removed

    def _drop(self, key: str) -> int:
        entry = self._entries.pop(key, None)
        if entry is None:
            return 0
        self.bytes -= entry.size
        self._unindex(key)
        return 1

    def _unindex(self, key: str) -> None:
        base = base_of(key)
        if base is None:
            return
        variants = self._variants.get(base)
        if variants is not None:
            variants.discard(key)
            if not variants:
                del self._variants[base]

    def purge(self, route: str | None = None, prefix: str | None = None) -> int:
        """Keys removed (a Vary'd resource counts its marker too)."""
        doomed = [
            key
            for key, entry in self._entries.items()
            if _matches(entry.route, entry.target, route, prefix)
        ]
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __repr__(self) -> str:
        return (
            f"<MemoryStore {len(self._entries)} entries, {self.bytes} of {self.max_bytes} bytes, "
            f"{self.evictions} evicted>"
        )


# ------------------------------------------------------------------------------ Redis


def encode_entry(entry: CacheEntry) -> bytes:
    """One JSON line of metadata, then the body as raw bytes."""
    meta = {
        "k": entry.key,
        "r": entry.route,
        "p": entry.target,
        "s": entry.status,
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


# KEYS[1] a variant's key, KEYS[2] its base's variant index; ARGV[1] the entry, ARGV[2] its
# PX. The index lives as long as the longest-kept variant it names.
_SET_VARIANT = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('SADD', KEYS[2], KEYS[1])
if redis.call('PTTL', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
end
return 1
"""

# KEYS[1] a base key, KEYS[2] its variant index: delete the base entry (or marker), every
# variant the index names (keys not passed in KEYS: fine for the single Redis the cache uses,
# not for a Redis Cluster) and the index; returns the entries deleted. One DEL per key keeps
# a large index within Lua's argument limit.
_INVALIDATE = """
local removed = redis.call('DEL', KEYS[1])
for _, key in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  removed = removed + redis.call('DEL', key)
end
redis.call('DEL', KEYS[2])
return removed
"""


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisCacheStore:
    """Entries as Redis strings with a PX expiry, through the process-wide Redis client.

    GET and SET go as one-line scripts rather than plain commands: script calls made in the
    same loop iteration share one pipeline (`apigate.store.redis_batch`). With 64 concurrent
    lookups against a local Redis that measured ~28-38 µs of gateway CPU per lookup, against
    ~150-165 µs as plain commands (a pooled connection and a timeout context each)."""

    is_async = True

    def __init__(
        self, redis: RedisStore, *, namespace: str = "apigate:cache:", timeout: float = 0.1
    ) -> None:
        from apigate.store.redis import Script, StoreUnavailable

        self.redis = redis
        self.namespace = namespace
        # the variant index lives beside the namespace, not in it: purge's SCAN never meets it
        self.variants_namespace = namespace.rstrip(":") + "-variants:"
        self.timeout = timeout
        self._unavailable: type[Exception] = StoreUnavailable
        self.get_script = Script("return redis.call('GET', KEYS[1])")
        self.set_script = Script("return redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])")
        self.set_variant_script = Script(_SET_VARIANT)
        self.invalidate_script = Script(_INVALIDATE)

    def variants_key(self, base: str) -> str:
        """The Redis set of the (namespaced) variant keys stored under `base`."""
        return self.variants_namespace + base

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
        blob = encode_entry(entry)
        keys = [self.namespace + entry.key]
        script = self.set_script
        base = base_of(entry.key)
        if base is not None:  # a variant: indexed so that invalidate(base) can find it
            keys.append(self.variants_key(base))
            script = self.set_variant_script
        try:
            await self.redis.run_script(script, keys, [blob, ttl_ms], timeout=self.timeout)
        except self._unavailable:
            return False
        return True

    async def invalidate(self, base: str) -> int:
        """Remove the entry (or Vary marker) under `base` and every variant of it; returns how
        many entries were removed (0 when Redis is unavailable: never raises)."""
        if not self.redis.available():
            return 0
        keys = [self.namespace + base, self.variants_key(base)]
        try:
            removed = await self.redis.run_script(
                self.invalidate_script, keys, [], timeout=self.timeout
            )
        except self._unavailable:
            return 0
        return int(removed)

    async def purge(self, route: str | None = None, prefix: str | None = None) -> int:
        """Keys removed (a Vary'd resource counts its marker too); raises StoreUnavailable.

        SCAN the namespace (narrowed to the route when given), DEL what matches."""
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
                removed += int(await self.redis.call("DEL", *doomed, timeout=2.0))
            if int(cursor) == 0:
                return removed

    def __repr__(self) -> str:
        return f"<RedisCacheStore {self.redis!r} ns={self.namespace!r}>"
