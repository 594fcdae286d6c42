"""Cluster state through Redis (`store: redis://`): every node sees every node's changes.

ARCHITECTURE.md, "Many nodes": registrations, heartbeats, deregistrations and admin-API config
changes made on any gateway node reach every other node within a second, and a node started
later begins with all of them. Rate limits and the cache already share Redis by themselves.

What is kept (all under `apigate:cluster:`):

    instances          hash  ["service","id"] -> {"url", "weight", "metadata"}
    expiry             zset  the same fields, scored by expiry on Redis's own clock (TIME), so
                             that nodes whose clocks differ agree on what has lapsed
    gone               zset  tombstones of deregistered instances, until their TTL would have
                             run out
    config:overlay     hash  ["kind","name"] -> the entity's document, or null (deleted)
    config:order       zset  the overlay's fields by creation sequence (config:sequence): a
                             hash's order is arbitrary once it outgrows a listpack, and the
                             order breaks ties between equally specific routes, so every node
                             reads the overlay in this order
    config:base        a POSTed whole config, when there is one
    config:version     +1 per config change, whoever made it
    epoch              a token naming the config's history (see below); config:seeded and
                       config:parent the version it began at and the state it began from,
                       config:run the Redis process that last wrote

and announced on the channel `apigate:cluster:events:<db>` (channels are server-wide, keys per
database: the number keeps clusters on two databases of one server apart). Every write and its
announcement are one Lua script: a change is in Redis and announced, or neither. A config write
names the epoch and version it was computed on and is refused if either moved (StoreConflict:
the node takes the other change and redoes its own, see `ConfigOps._change`), so versions
never fork within an epoch.

How a node follows: it subscribes, then reads everything (a *resync*), then applies each
announcement of another node as it comes: the registry's `apply`/`drop` and the config ops'
`sync_from_store` change this node only. A resync every `RESYNC_INTERVAL` and after every
reconnect repairs whatever announcement was missed (pub/sub delivers at most once): instances
another node deregistered while this one was not listening are dropped, renewals it missed are
taken, lapsed entries are removed from Redis; what changed on this node while it read is left
alone. Each node still removes lapsed registrations itself and runs its own health checks and
DNS discovery.

Redis being down or slow never stops proxying (every call has a deadline):
- a registration, heartbeat or deregistration still takes effect on the node that received it
  and is written to Redis (and so reaches the others) at the first resync that succeeds;
- an admin config change is refused with 503 `store_unavailable` and undone on this node, so
  that no node serves a config the others cannot learn;
- a Redis that comes back empty (restarted without persistence, flushed) has no epoch, and one
  restored from an old save has an older config version than the nodes have read. The first
  node back seeds it with its config (a new epoch); a node that knows a later version seeds
  it again, as long as Redis has taken no change since, so the most recent config wins
  whatever the order the nodes come back in. Once Redis has taken a change in the new epoch
  (its first change after a restart begins one too), versions of the old one no longer
  compare with it: a node that comes back knowing more of the lost history takes Redis's
  state and logs what of its own it dropped (see `_report_dropped`), instead of wiping
  changes Redis acknowledged. Each node writes back the registrations its own API took,
  unless a tombstone says another node deregistered them meanwhile or another node registered
  them anew, and keeps the instances Redis forgot until they lapse, instead of dropping them.
  (Instances deregistered after an old save was taken come back from it, until their TTL
  lapses.)

The cluster has its own Redis client: its reads and writes neither share pipelines nor outage
bookkeeping with the rate limiter's 50 ms calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from apigate.registry.registry import Registration
from apigate.store.cluster_scripts import (
    DEREGISTER,
    EPOCH,
    EXPIRY,
    GONE,
    INSTANCES,
    RECONNECT_DELAY,
    REGISTER,
    REGISTRY_TIMEOUT,
    RESYNC_INTERVAL,
    SNAPSHOT,
    SYNC_TIMEOUT,
    VERSION,
    field,
    text,
)
from apigate.store.redis import Script, StoreUnavailable
from apigate.store.redis_config_store import RedisConfigStore, Seeded

if TYPE_CHECKING:
    from apigate.admin.config_ops import ConfigOps
    from apigate.registry.registry import Registry
    from apigate.server import Gateway

log = logging.getLogger("apigate.cluster")

Key = tuple[str, str]  # (service, instance id)
Call = tuple[Script, list[str | bytes | int]]


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
        self.channel = self.config_store.channel  # (names the Redis database)
        self.joined: str | None = None  # the epoch whose state this node has taken in
        self.resyncs = 0
        # registry changes made here that Redis has not taken yet: "up", "down", or
        # "restore" (a registration written back into a Redis that lost it)
        self.unshared: dict[Key, str] = {}
        # registrations this node's own API took: what it writes back to a Redis that lost
        # its state (the others' are theirs to write back, or their instances' heartbeats')
        self.own: set[Key] = set()
        # instances Redis did not have when this node (re)joined: kept until they lapse here,
        # not dropped, since an emptied Redis only forgot them
        self.kept: set[Key] = set()
        # how long a deregistration's tombstone lasts (the TTL its instance had left)
        self.tombstones: dict[Key, float] = {}
        # registry writes this node sent whose announcement it has not heard back yet, by key:
        # another node's announcement of the key heard meanwhile was published before ours
        # (a channel delivers in publish order), so Redis has, or will have, ours last
        self.in_flight: dict[Key, int] = {}
        self.connected = False
        self._lost_logged = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ Registry.mirror
    async def instance_up(self, reg: Registration) -> None:
        key = (reg.service, reg.instance_id)
        self.own.add(key)
        self.kept.discard(key)
        await self._share(key, "up", self._up(key, reg.url, reg.weight, reg.metadata, reg.ttl))

    async def instance_down(self, service: str, instance_id: str, ttl_left: float) -> None:
        key = (service, instance_id)
        self.own.discard(key)
        self.tombstones[key] = ttl_left
        await self._share(key, "down", self._down(key, ttl_left))

    async def instance_down_unheard(self, service: str, instance_id: str) -> bool:
        """A deregistration of an instance this node has not heard of: registered through
        another node a few ms ago (announcements are not instant), or never. Redis knows;
        removed, tombstoned and announced only when it had it: an id nobody registered
        leaves no trace, and a node holding the instance outside Redis (kept after Redis lost
        its state) keeps it, as the 404 says. (Its remaining TTL is unknown here: the
        tombstone lasts the minimum, a resync interval.) Without an answer from Redis it is
        not left to a resync to write behind the 404: `unshared` gets back what it held."""
        if not self.redis.available():
            return False
        key = (service, instance_id)
        before = self.unshared.get(key)
        gone = None
        try:
            gone = await self._share(key, "down", self._down(key, mode="unheard"))
        finally:
            if gone is None and self.unshared.get(key) == "down":  # (not a newer change)
                if before is None:
                    del self.unshared[key]
                else:
                    self.unshared[key] = before
        return bool(gone)

    def _up(
        self,
        key: Key,
        url: str,
        weight: int,
        metadata: dict[str, Any] | None,
        ttl: float,
        mode: str = "fresh",
    ) -> Call:
        """The script call that writes and announces a registration or heartbeat."""
        doc = {"url": url, "weight": weight, "metadata": metadata or {}}
        announcement = {"op": "up", "node": self.node, "service": key[0], "id": key[1], **doc}
        announcement["ttl"] = ttl
        return REGISTER, [
            field(*key),
            json.dumps(doc),
            repr(ttl),
            self.channel,
            json.dumps(announcement),
            mode,
        ]

    def _down(self, key: Key, tombstone: float = 0.0, mode: str = "known") -> Call:
        """The script call that removes and announces a deregistration; its tombstone keeps a
        node that comes back from writing the instance back while it would still be alive.
        `mode` "unheard": only if Redis has the instance (see DEREGISTER)."""
        announcement = {"op": "down", "node": self.node, "service": key[0], "id": key[1]}
        return DEREGISTER, [
            field(*key),
            self.channel,
            json.dumps(announcement),
            repr(max(tombstone, RESYNC_INTERVAL)),
            mode,
        ]

    async def _share(self, key: Key, op: str, call: Call) -> Any:
        """Write one registry change; if Redis cannot take it now, the next resync will.
        The script's answer, None when Redis did not give one.

        The change counts as unshared until Redis has answered: a resync whose read crosses
        the write then neither drops the instance nor forgets to write it."""
        self.unshared[key] = op
        if not self.redis.available():
            return None
        self.in_flight[key] = self.in_flight.get(key, 0) + 1
        try:
            answer = await self._run(call, REGISTRY_TIMEOUT)
        except StoreUnavailable:
            # maybe not written: hold back nobody's announcements for it (if it was written
            # after all, its announcement finds the count at 0 and leaves it there)
            self._heard_back(key)
            return None
        except BaseException:  # cancelled (an admin request cut short): the same, then on
            self._heard_back(key)
            raise
        self._settled(key, op)
        return answer

    def _heard_back(self, key: Key) -> None:
        count = self.in_flight.get(key, 0) - 1
        if count > 0:
            self.in_flight[key] = count
        else:
            self.in_flight.pop(key, None)

    async def _run(self, call: Call, timeout: float = SYNC_TIMEOUT) -> Any:
        return await self.redis.run_script(call[0], [INSTANCES, EXPIRY, GONE], call[1], timeout)

    async def _snapshot(self) -> Any:
        return await self.redis.run_script(SNAPSHOT, [INSTANCES, EXPIRY, GONE, VERSION, EPOCH], [])

    def _settled(self, key: Key, op: str) -> None:
        """Redis has taken `op` for `key`, unless a newer change of it is on its way."""
        if self.unshared.get(key) == op:
            del self.unshared[key]
            self.tombstones.pop(key, None)

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
                await pubsub.subscribe(self.channel)
            self.in_flight.clear()  # what was announced while not subscribed never comes
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
            await self._apply_announcement(json.loads(data))
        except (ValueError, KeyError, TypeError, AttributeError):
            log.warning("ignoring a malformed cluster announcement", extra={"event": "cluster"})

    async def _apply_announcement(self, event: dict[str, Any]) -> None:
        op = event["op"]
        key = (event["service"], event["id"]) if op in ("up", "down") else None
        if event.get("node") == self.node:
            if key is not None:
                self._heard_back(key)
            return
        if key is not None and key in self.in_flight:
            return  # older than this node's own change of it (see in_flight)
        source = f"node {event.get('node')}"
        if op == "config":
            if event.get("epoch", self.joined) != self.joined:
                # the state was (re)created, or Redis restarted and took a change: whether
                # this node's config or Redis's stands is SEED's to say (see _join)
                await self.resync()
            elif int(event.get("version", 0)) != self.config_store.version:
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
            key = (reg.service, reg.instance_id)
            self.own.discard(key)  # its heartbeats go to that node now
            self.kept.discard(key)
            # not applicable: maybe a service that node just created, whose config is not here yet
            if not await self.registry.apply(reg, source) and await self.ops.sync_from_store():
                await self.registry.apply(reg, source)
        elif op == "down":
            key = (event["service"], event["id"])
            self.own.discard(key)
            self.kept.discard(key)
            self.registry.drop(*key, f"deregistered (through {source})")

    async def resync(self) -> None:
        """Read the whole shared state and make this node agree with it."""
        await self._write_unshared()
        mark = self.registry.changes
        reply = await self._snapshot()
        epoch = text(reply[0]) if reply[0] else None
        version = int(reply[1])
        if epoch is None or epoch != self.joined or version < self.config_store.version:
            await self._join()  # Redis lost its state (or some of it), or it was re-created
            return  # the next resync reads the state as it now is
        if version != self.config_store.version or self.ops.refused:
            # (a config this node refused may have failed for a passing reason: try again)
            await self.ops.sync_from_store(force=self.ops.refused is not None)
        await self._reconcile(reply, mark)
        self.resyncs += 1

    async def _join(self) -> None:
        """First resync, or Redis lost its state (no epoch) or began another epoch: (re)seed
        it if this node knows more and nothing Redis took would be lost (see SEED), take in
        the config in force, write back this node's own registrations, and keep what Redis
        forgot until it lapses."""
        store = self.config_store
        known = (store.epoch, store.version, store.base, dict(store.overlay))
        seeded = await store.seed()
        if seeded.ours:
            log.info(
                "cluster state (re)created in Redis from this node",
                extra={"event": "cluster", "epoch": seeded.epoch, "version": store.version},
            )
        await self.ops.sync_from_store(force=True)
        self._report_dropped(*known, seeded)
        now = self.gateway.loop.time()
        registered = self.registry.registered()
        for key in self.own:
            inst = registered.get(key)
            if inst is not None and inst.expires_at is not None and inst.expires_at > now:
                self.unshared.setdefault(key, "restore")
        await self._write_unshared()
        mark = self.registry.changes
        reply = await self._snapshot()
        self.kept = set(self.registry.registered()) - set(_live(reply[3:]))
        self.joined = seeded.epoch
        await self._reconcile(reply, mark)
        self.resyncs += 1

    def _report_dropped(
        self,
        epoch: str | None,
        version: int,
        base: dict[str, Any] | None,
        overlay: dict[tuple[str, str], dict[str, Any] | None],
        seeded: Seeded,
    ) -> None:
        """This node knew changes of a history Redis lost (a restart without persistence, an
        old save) and Redis has taken changes of another one since: Redis's state stands
        and this node's is dropped, not merged. Those changes were checked against a config
        that is no longer the shared one; added to changes other admins made meanwhile on
        another state (a route added here to a service deleted there), they would make a
        config nobody checked, and a deletion there cannot be told from an entity this node
        never had. So they are logged, by name, for an operator to make again."""
        if seeded.ours or version == 0 or seeded.continues(epoch, version):
            return
        store = self.config_store
        lost = [
            f"{kind}/{name}"
            for (kind, name), doc in overlay.items()
            if store.overlay.get((kind, name), ...) != doc
        ]
        if base is not None and base != store.base:
            lost.insert(0, "the POSTed config")
        if not lost:
            return
        log.warning(
            "the shared config is another history than this node's (Redis lost the changes "
            "this node knew and has taken others since): this node now serves it; its own "
            "config of version %d was dropped, apply again what is still wanted: %s",
            version,
            ", ".join(lost),
            extra={
                "event": "cluster",
                "ok": False,
                "dropped_epoch": epoch,
                "dropped_version": version,
                "epoch": seeded.epoch,
                "dropped": lost,
            },
        )

    async def _reconcile(self, snapshot: Sequence[Any], mark: int) -> None:
        """Agree with a snapshot read after change number `mark`: what changed here since is
        left as it is (the snapshot may predate it)."""
        gone = {tuple(json.loads(field)) for field in snapshot[2]}
        live = _live(snapshot[3:])
        changed = self.registry.changed
        for key in self.registry.registered():
            if key in live or key in self.unshared or changed.get(key, 0) > mark:
                continue
            if key in self.kept and key not in gone:
                continue  # forgotten by an emptied Redis: it lapses here, or is renewed
            self.registry.drop(*key, "removed: no longer in the shared registry")
        registered = self.registry.registered()
        self.kept.intersection_update(registered)
        self.own.intersection_update(registered)
        for key, (doc, left) in live.items():
            if left <= 0 or self.unshared.get(key) == "down" or changed.get(key, 0) > mark:
                continue
            self.kept.discard(key)
            reg = Registration(
                key[0], key[1], doc["url"], left, int(doc.get("weight", 1)), doc.get("metadata")
            )
            await self.registry.apply(reg, "the shared registry")
        for key in [k for k, n in changed.items() if n <= mark]:
            del changed[key]  # settled: keeps the table as small as the recent changes

    async def _write_unshared(self) -> None:
        """Registry changes Redis could not take when they were made, sent together (raises
        if Redis still cannot take them: the resync is retried after the reconnect delay)."""
        now = self.gateway.loop.time()
        registered = self.registry.registered()
        pending = list(self.unshared.items())
        calls: list[Call] = []
        for key, op in pending:
            if op == "down":
                calls.append(self._down(key, self.tombstones.get(key, 0.0)))
                continue
            inst = registered.get(key)  # (gone or lapsed since: nothing to write)
            if inst is not None and inst.expires_at is not None and inst.expires_at > now:
                # written late: a deregistration made meanwhile wins, and so does a later
                # registration through another node; a registration or heartbeat this node
                # took during the outage replaces an older one (it was once refused when it
                # differed, a moved instance's new address dropped on every node)
                left = inst.expires_at - now
                mode = "late" if op == "up" else "restore"
                calls.append(self._up(key, inst.url, inst.weight, inst.metadata, left, mode))
        await asyncio.gather(*(self._run(call) for call in calls))
        for key, op in pending:
            self._settled(key, op)

    def describe(self) -> dict[str, Any]:
        return {
            "node": self.node,
            "connected": self.connected,
            "epoch": self.joined,
            "config_version": self.config_store.version,
            "config_refused": self.ops.refused,
            "resyncs": self.resyncs,
            "unshared_changes": len(self.unshared),
        }


def _live(entries: Sequence[Any]) -> dict[Key, tuple[dict[str, Any], float]]:
    """A snapshot's instances: (service, id) -> (document, seconds left)."""
    live: dict[Key, tuple[dict[str, Any], float]] = {}
    for raw_field, raw_doc, left in zip(entries[0::3], entries[1::3], entries[2::3], strict=True):
        service, iid = json.loads(raw_field)
        live[(service, iid)] = (json.loads(raw_doc), float(left))
    return live


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
    # first of the hooks run as the drain starts: no other node's change applies from then
    # on. The store's client stays open until the admin hook closes it, once the drain is
    # over (on_drained).
    gateway.on_stop.insert(0, on_stop)
