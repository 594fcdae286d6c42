"""Cluster state through Redis (`store: redis://`): every node sees every node's changes.

ARCHITECTURE.md, "Many nodes": registrations, heartbeats, deregistrations and admin-API config
changes made on any gateway node reach every other node within a second, and a node started
later begins with all of them. Rate limits and the cache already share Redis by themselves.

What is kept (all under `apigate:cluster:`):

    instances          hash  ["service","id"] -> {"url", "weight", "metadata"}
    expiry             zset  the same fields, scored by expiry on Redis's own clock (TIME), so
                             that nodes whose clocks differ agree on what has lapsed
    config:overlay     hash  ["kind","name"] -> the entity's document, or null (deleted)
    config:base        a POSTed whole config, when there is one
    config:version     +1 per config change, whoever made it
    epoch              a token written when the state above was (re)created

and announced on the channel `apigate:cluster:events`. Every write and its announcement are one
Lua script: a change is in Redis and announced, or neither.

How a node follows: it subscribes, then reads everything (a *resync*), then applies each
announcement of another node as it comes: the registry's `apply`/`drop` and the config ops'
`sync_from_store` change this node only. A resync every `RESYNC_INTERVAL` and after every
reconnect repairs whatever announcement was missed (pub/sub delivers at most once): instances
another node deregistered while this one was not listening are dropped, renewals it missed are
taken, lapsed entries are removed from Redis. Each node still runs its own TTL sweep, health
checks and DNS discovery.

Redis being down or slow never stops proxying (every call has a deadline):
- a registration, heartbeat or deregistration still takes effect on the node that received it
  and is written to Redis (and so reaches the others) at the first resync that succeeds;
- an admin config change is refused with 503 `store_unavailable` and undone on this node, so
  that no node serves a config the others cannot learn;
- a Redis that comes back empty (restarted without persistence, flushed) has no epoch: the first
  node to see that writes its config and registrations back, and every other node adds its own
  registrations, instead of dropping instances Redis merely forgot.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from apigate.registry.registry import Registration
from apigate.store.config_store import ConfigStore
from apigate.store.redis import RedisStore, Script, StoreUnavailable, redact_url, shared_redis

if TYPE_CHECKING:
    from apigate.admin.config_ops import ConfigOps
    from apigate.registry.registry import Registry
    from apigate.server import Gateway

log = logging.getLogger("apigate.cluster")

PREFIX = "apigate:cluster:"
CHANNEL = PREFIX + "events"
INSTANCES = PREFIX + "instances"
EXPIRY = PREFIX + "expiry"
OVERLAY = PREFIX + "config:overlay"
BASE = PREFIX + "config:base"
VERSION = PREFIX + "config:version"
EPOCH = PREFIX + "epoch"

RESYNC_INTERVAL = 5.0  # seconds between full reads of the shared state
RECONNECT_DELAY = 1.0  # after the channel was lost
CONFIG_TIMEOUT = 1.0  # an admin change waits this long for Redis, then 503
REGISTRY_TIMEOUT = 0.5  # a registration waits this long, then counts as not yet shared
SYNC_TIMEOUT = 2.0  # a resync's reads

# ------------------------------------------------------------------ scripts
# KEYS: instances, expiry. ARGV: field, document, ttl seconds, channel, announcement.
REGISTER = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PUBLISH', ARGV[4], ARGV[5])
return 1
"""
)

# KEYS: instances, expiry. ARGV: field, channel, announcement.
DEREGISTER = Script(
    """
redis.call('ZREM', KEYS[2], ARGV[1])
local gone = redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], ARGV[3])
return gone
"""
)

# KEYS: instances, expiry, version, epoch. Removes lapsed entries, then answers
# [epoch or false, version, field, document, seconds left, field, document, ...].
SNAPSHOT = Script(
    """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
for _, field in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)) do
  redis.call('HDEL', KEYS[1], field)
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local out = {redis.call('GET', KEYS[4]), redis.call('GET', KEYS[3]) or '0'}
local live = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. now, '+inf', 'WITHSCORES')
for i = 1, #live, 2 do
  local doc = redis.call('HGET', KEYS[1], live[i])
  if doc then
    out[#out + 1] = live[i]
    out[#out + 1] = doc
    out[#out + 1] = tostring(tonumber(live[i + 1]) - now)
  end
end
return out
"""
)

# KEYS: overlay, version. ARGV: field, document, channel, node (JSON string).
CONFIG_PUT = Script(
    """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local version = redis.call('INCR', KEYS[2])
redis.call('PUBLISH', ARGV[3],
  '{"op":"config","node":' .. ARGV[4] .. ',"version":' .. version .. '}')
return version
"""
)

# KEYS: base, overlay, version. ARGV: document, channel, node (JSON string).
CONFIG_BASE = Script(
    """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
local version = redis.call('INCR', KEYS[3])
redis.call('PUBLISH', ARGV[2],
  '{"op":"config","node":' .. ARGV[3] .. ',"version":' .. version .. '}')
return version
"""
)

# KEYS: base, overlay, version. Answers [base or false, version, field, document, ...].
CONFIG_READ = Script(
    """
local out = {redis.call('GET', KEYS[1]), redis.call('GET', KEYS[3]) or '0'}
for _, item in ipairs(redis.call('HGETALL', KEYS[2])) do out[#out + 1] = item end
return out
"""
)

# KEYS: epoch, base, overlay, version. ARGV: new epoch, version, base or '', field, doc, ...
# Writes this node's config only if no node has (re)created the state yet; answers the epoch
# in force and whether this call created it.
SEED = Script(
    """
local epoch = redis.call('GET', KEYS[1])
if epoch then return {epoch, 0} end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[4], ARGV[2])
redis.call('DEL', KEYS[2], KEYS[3])
if ARGV[3] ~= '' then redis.call('SET', KEYS[2], ARGV[3]) end
for i = 4, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
return {ARGV[1], 1}
"""
)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _field(*parts: str) -> str:
    """A hash field naming (service, instance) or (kind, name): JSON, so no name can clash."""
    return json.dumps(parts, separators=(",", ":"))


def node_name() -> str:
    """This process, as other nodes' logs and events name it."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


# ------------------------------------------------------------------ config store
class RedisConfigStore(ConfigStore):
    """The admin changes every node shares: written to Redis first, then kept here."""

    persistent = True

    def __init__(self, url: str, shared: dict[str, Any]) -> None:
        super().__init__()
        self.url = url
        self.redis: RedisStore = shared_redis(shared, url)
        self.node = node_name()
        self._node_json = json.dumps(self.node)

    async def open(self) -> None:
        try:
            await self.refresh()
        except StoreUnavailable as exc:  # start with the file; the cluster sync catches up
            log.warning(
                "redis store unreachable at start-up; serving the file's config until it is: %s",
                exc,
                extra={"event": "config_sync", "ok": False, "store": redact_url(self.url)},
            )

    async def refresh(self) -> bool:
        reply = await self.redis.run_script(
            CONFIG_READ, [BASE, OVERLAY, VERSION], [], timeout=SYNC_TIMEOUT
        )
        version = int(reply[1])
        if version == self.version and self.version:
            return False
        self.base = json.loads(reply[0]) if reply[0] else None
        self.overlay = {}
        for raw_field, raw_doc in zip(reply[2::2], reply[3::2], strict=True):
            kind, name = json.loads(raw_field)
            self.overlay[(kind, name)] = json.loads(raw_doc)
        changed = version != self.version
        self.version = version
        return changed

    async def put(self, kind: str, name: str, doc: dict[str, Any] | None) -> None:
        version = await self.redis.run_script(
            CONFIG_PUT,
            [OVERLAY, VERSION],
            [_field(kind, name), json.dumps(doc), CHANNEL, self._node_json],
            timeout=CONFIG_TIMEOUT,
        )
        await super().put(kind, name, doc)
        self.version = max(self.version, int(version))

    async def replace_base(self, doc: dict[str, Any]) -> None:
        version = await self.redis.run_script(
            CONFIG_BASE,
            [BASE, OVERLAY, VERSION],
            [json.dumps(doc), CHANNEL, self._node_json],
            timeout=CONFIG_TIMEOUT,
        )
        await super().replace_base(doc)
        self.version = max(self.version, int(version))

    async def seed(self, epoch: str) -> tuple[str, bool]:
        """Write this node's config into a Redis that has no cluster state (fresh, restarted
        empty, flushed), unless another node just did. Returns (epoch in force, ours)."""
        args: list[str | bytes | int] = [
            epoch,
            self.version,
            json.dumps(self.base) if self.base is not None else "",
        ]
        for (kind, name), doc in self.overlay.items():
            args += [_field(kind, name), json.dumps(doc)]
        reply = await self.redis.run_script(
            SEED, [EPOCH, BASE, OVERLAY, VERSION], args, timeout=SYNC_TIMEOUT
        )
        return _text(reply[0]), bool(reply[1])

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "redis",
            "persisted": True,
            "shared": True,
            "url": redact_url(self.url),
            "node": self.node,
            "version": self.version,
            "overlay_entries": len(self.overlay),
        }


# ------------------------------------------------------------------ registry and follower
class ClusterSync:
    """Shares this node's registry changes (`Registry.mirror`) and follows everyone else's."""

    def __init__(self, gateway: Gateway, ops: ConfigOps, registry: Registry) -> None:
        assert isinstance(ops.store, RedisConfigStore)
        self.gateway = gateway
        self.ops = ops
        self.config_store: RedisConfigStore = ops.store
        self.registry = registry
        self.redis = self.config_store.redis
        self.node = self.config_store.node
        self.epoch: str | None = None  # the cluster state this node last read
        self.resyncs = 0
        # registry changes made here that Redis has not taken yet: "up" or "down"
        self.unshared: dict[tuple[str, str], str] = {}
        self.connected = False
        self._lost_logged = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ Registry.mirror
    async def instance_up(self, reg: Registration) -> None:
        key = (reg.service, reg.instance_id)
        await self._share(key, "up", self._up(key, reg.url, reg.weight, reg.metadata, reg.ttl))

    async def instance_down(self, service: str, instance_id: str) -> None:
        key = (service, instance_id)
        await self._share(key, "down", self._down(key))

    def _up(
        self,
        key: tuple[str, str],
        url: str,
        weight: int,
        metadata: dict[str, Any] | None,
        ttl: float,
    ) -> tuple[Script, list[str | bytes | int]]:
        """The script call that writes and announces a registration or heartbeat."""
        doc = {"url": url, "weight": weight, "metadata": metadata or {}}
        announcement = {"op": "up", "node": self.node, "service": key[0], "id": key[1], **doc}
        announcement["ttl"] = ttl
        return REGISTER, [
            _field(*key),
            json.dumps(doc),
            repr(ttl),
            CHANNEL,
            json.dumps(announcement),
        ]

    def _down(self, key: tuple[str, str]) -> tuple[Script, list[str | bytes | int]]:
        """The script call that removes and announces a deregistration."""
        announcement = {"op": "down", "node": self.node, "service": key[0], "id": key[1]}
        return DEREGISTER, [_field(*key), CHANNEL, json.dumps(announcement)]

    async def _share(
        self, key: tuple[str, str], op: str, call: tuple[Script, list[str | bytes | int]]
    ) -> None:
        """Write one registry change; if Redis cannot take it now, the next resync will.

        The change counts as unshared until Redis has answered: a resync whose read crosses
        the write then neither drops the instance nor forgets to write it."""
        self.unshared[key] = op
        if not self.redis.available():
            return
        with contextlib.suppress(StoreUnavailable):
            await self.redis.run_script(
                call[0], [INSTANCES, EXPIRY], call[1], timeout=REGISTRY_TIMEOUT
            )
            self._settled(key, op)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._task = self.gateway.loop.create_task(self._follow_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _follow_forever(self) -> None:
        while True:
            try:
                await self._follow()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis gone or hung: reconnect, then resync
                self.connected = False
                if not self._lost_logged:
                    self._lost_logged = True
                    log.warning(
                        "cluster sync lost its Redis channel; this node serves what it knows: %s",
                        str(exc) or type(exc).__name__,
                        extra={"event": "cluster", "ok": False},
                    )
            await asyncio.sleep(RECONNECT_DELAY)

    async def _follow(self) -> None:
        client = Redis.from_url(
            self.config_store.url,
            retry=Retry(NoBackoff(), 0),  # a lost channel must surface: then we resync
            socket_connect_timeout=SYNC_TIMEOUT,
        )
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        loop = self.gateway.loop
        try:
            async with asyncio.timeout(SYNC_TIMEOUT):
                await pubsub.subscribe(CHANNEL)
            await self.resync()  # after subscribing: nothing can fall between the two
            self.connected = True
            if self._lost_logged:
                self._lost_logged = False
                log.info("cluster sync is back", extra={"event": "cluster", "ok": True})
            next_resync = loop.time() + RESYNC_INTERVAL
            while True:
                wait = max(0.0, next_resync - loop.time())
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
                if message is not None and message.get("type") == "message":
                    await self._on_announcement(message["data"])
                if loop.time() >= next_resync:
                    await self.resync()
                    next_resync = loop.time() + RESYNC_INTERVAL
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(Exception):
                await client.aclose()

    # ------------------------------------------------------------------ following
    async def _on_announcement(self, data: bytes | str) -> None:
        try:
            event = json.loads(data)
            op = event["op"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring a malformed cluster announcement", extra={"event": "cluster"})
            return
        if event.get("node") == self.node:
            return
        source = f"node {event.get('node')}"
        if op == "config":
            if int(event.get("version", 0)) != self.config_store.version:
                await self.ops.sync_from_store()
        elif op == "up":
            reg = Registration(
                event["service"],
                event["id"],
                event["url"],
                float(event["ttl"]),
                int(event.get("weight", 1)),
                event.get("metadata") or {},
            )
            # not applicable: maybe a service that node just created, whose config is not here yet
            if not self.registry.apply(reg, source) and await self.ops.sync_from_store():
                self.registry.apply(reg, source)
        elif op == "down":
            self.registry.drop(event["service"], event["id"], f"deregistered (through {source})")

    async def resync(self) -> None:
        """Read the whole shared state and make this node agree with it."""
        await self._write_unshared()
        changes = self.registry.changes
        reply = await self.redis.run_script(
            SNAPSHOT, [INSTANCES, EXPIRY, VERSION, EPOCH], [], timeout=SYNC_TIMEOUT
        )
        epoch = _text(reply[0]) if reply[0] else None
        if epoch is None or epoch != self.epoch:
            await self._join(epoch)
            return  # what Redis holds changed under us: the next resync reads it again
        if int(reply[1]) != self.config_store.version:
            await self.ops.sync_from_store()
        if self.registry.changes != changes:
            return  # a registration here raced the read: apply nothing stale
        self._reconcile(reply[2:])
        self.resyncs += 1

    async def _join(self, epoch: str | None) -> None:
        """First resync, or the cluster state was lost (no epoch) or re-created (another
        epoch): never drop what this node knows; add it to what Redis has."""
        if epoch is None:
            epoch, ours = await self.config_store.seed(secrets.token_hex(8))
            if ours:
                log.info(
                    "cluster state (re)created in Redis from this node",
                    extra={"event": "cluster", "epoch": epoch},
                )
        await self.ops.sync_from_store()
        if self.epoch is not None:  # Redis lost its registrations: give back ours
            now = self.gateway.loop.time()
            for key, inst in self.registry.registered().items():
                if inst.expires_at is not None and inst.expires_at > now:
                    self.unshared.setdefault(key, "up")
            await self._write_unshared()
        self.epoch = epoch
        self.resyncs += 1
        # the first time, this node adopts everything Redis has (nothing to give back)
        reply = await self.redis.run_script(
            SNAPSHOT, [INSTANCES, EXPIRY, VERSION, EPOCH], [], timeout=SYNC_TIMEOUT
        )
        self._reconcile(reply[2:], drop=False)

    def _reconcile(self, entries: Sequence[Any], drop: bool = True) -> None:
        live: dict[tuple[str, str], tuple[dict[str, Any], float]] = {}
        for raw_field, raw_doc, left in zip(
            entries[0::3], entries[1::3], entries[2::3], strict=True
        ):
            service, iid = json.loads(raw_field)
            live[(service, iid)] = (json.loads(raw_doc), float(left))
        if drop:
            for key in self.registry.registered():
                if key not in live and key not in self.unshared:
                    self.registry.drop(*key, "removed: no longer in the shared registry")
        for (service, iid), (doc, left) in live.items():
            if self.unshared.get((service, iid)) == "down":
                continue  # deregistered here; Redis has not taken it yet
            reg = Registration(
                service, iid, doc["url"], left, int(doc.get("weight", 1)), doc.get("metadata")
            )
            self.registry.apply(reg, "the shared registry")

    async def _write_unshared(self) -> None:
        """Registry changes Redis could not take when they were made (raises if it still
        cannot: the resync is then retried after the reconnect delay)."""
        now = self.gateway.loop.time()
        registered = self.registry.registered()
        for key, op in list(self.unshared.items()):
            inst = registered.get(key)
            call = None
            if op == "down":
                call = self._down(key)
            elif inst is not None and inst.expires_at is not None and inst.expires_at > now:
                call = self._up(key, inst.url, inst.weight, inst.metadata, inst.expires_at - now)
            if call is not None:
                await self.redis.run_script(
                    call[0], [INSTANCES, EXPIRY], call[1], timeout=SYNC_TIMEOUT
                )
            self._settled(key, op)

    def _settled(self, key: tuple[str, str], op: str) -> None:
        """Redis has taken `op` for `key`, unless a newer change of it is on its way."""
        if self.unshared.get(key) == op:
            del self.unshared[key]

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "connected": self.connected,
            "epoch": self.epoch,
            "config_version": self.config_store.version,
            "resyncs": self.resyncs,
            "unshared_changes": len(self.unshared),
        }


async def attach_cluster(gateway: Gateway) -> None:
    """With `store: redis://`: share the registry and follow the other nodes."""
    from apigate.admin.config_ops import ConfigOps
    from apigate.registry.registry import registry_of

    ops = ConfigOps.of(gateway)
    if not isinstance(ops.store, RedisConfigStore):
        return
    registry = registry_of(gateway)
    sync = ClusterSync(gateway, ops, registry)
    registry.mirror = sync
    gateway.extensions["cluster"] = sync

    async def on_start(gw: Gateway) -> None:
        # the other nodes' registrations before this node reports ready; if Redis cannot
        # answer now, the follower's first resync brings them
        with contextlib.suppress(StoreUnavailable):
            await sync.resync()
        sync.start()

    async def on_stop(gw: Gateway) -> None:
        await sync.stop()

    gateway.on_start.append(on_start)
    gateway.on_stop.append(on_stop)
