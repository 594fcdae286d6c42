"""The admin-API config changes every node of a cluster shares (`store: redis://`).

A write goes to Redis first, and only over the epoch and version this node last read
(StoreConflict otherwise: `ConfigOps._change` takes the other change and redoes its own); then
it is kept here too, for `ConfigStore.merge`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from typing import Any, NamedTuple

from apigate.redaction import redact_url
from apigate.store.cluster_scripts import (
    CONFIG_KEYS,
    CONFIG_READ,
    CONFIG_TIMEOUT,
    CONFIG_WRITE,
    SEED,
    SYNC_TIMEOUT,
    channel,
    field,
    text,
)
from apigate.store.config_store import ConfigStore, StoreConflict
from apigate.store.redis import RedisStore, StoreUnavailable

log = logging.getLogger("apigate.cluster")


class Seeded(NamedTuple):
    """What SEED found or made: the epoch in force, whether this node (re)created it, its
    version, the version it began at, and the state it began from (epoch, or "" when the
    node that seeded it knew none, and version)."""

    epoch: str
    ours: bool
    version: int
    began_at: int
    parent: tuple[str, int] | None

    def continues(self, epoch: str | None, version: int) -> bool:
        """Whether this epoch's state holds everything of `epoch` up to `version`: it is
        that epoch, or began from it at that version or later."""
        if epoch == self.epoch:
            return True
        return (
            epoch is not None
            and self.parent is not None
            and self.parent[0] == epoch
            and self.parent[1] >= version
        )


def node_name() -> str:
    """This process, as other nodes' logs and events name it."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(2)}"


class RedisConfigStore(ConfigStore):
    """The admin changes every node shares. A write goes to Redis first, and only over the
    version and epoch this node last read (StoreConflict otherwise); then it is kept here."""

    persistent = True

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        # its own client: the cluster's reads and writes neither share pipelines nor outage
        # bookkeeping with the rate limiter's 50 ms calls
        self.redis = RedisStore(url, timeout=SYNC_TIMEOUT, max_connections=8)
        self.node = node_name()
        self._node_json = json.dumps(self.node)
        self.channel = channel(self.redis.db)
        self.epoch: str | None = None  # of the state last read; None: Redis has none

    async def open(self) -> None:
        try:
            await self.refresh()
        except StoreUnavailable as exc:  # start with the file; the cluster sync catches up
            log.warning(
                "redis store unreachable at start-up; serving the file's config until it is: %s",
                exc,
                extra={"event": "config_sync", "ok": False, "store": redact_url(self.url)},
            )

    async def close(self) -> None:
        await self.redis.close()

    async def refresh(self, force: bool = False) -> bool:
        reply = await self.redis.run_script(CONFIG_READ, CONFIG_KEYS, [])
        version = int(reply[1])
        epoch = text(reply[2]) if reply[2] else None
        if not force and version == self.version and epoch == self.epoch:
            return False
        self.base = json.loads(reply[0]) if reply[0] else None
        self.overlay = {}  # in creation order, as every node merges it (see CONFIG_WRITE)
        for raw_field, raw_doc in zip(reply[3::2], reply[4::2], strict=True):
            kind, name = json.loads(raw_field)
            self.overlay[(kind, name)] = json.loads(raw_doc)
        self.version, self.epoch = version, epoch
        return True

    async def put(self, kind: str, name: str, doc: dict[str, Any] | None) -> None:
        await self._write(["put", field(kind, name), json.dumps(doc)])
        await super().put(kind, name, doc)

    async def replace_base(self, doc: dict[str, Any]) -> None:
        await self._write(["base", json.dumps(doc)])
        await super().replace_base(doc)

    async def _write(self, change: list[str | bytes | int]) -> None:
        reply = await self.redis.run_script(
            CONFIG_WRITE,
            CONFIG_KEYS,
            [
                self.epoch or "",
                str(self.version),
                self.channel,
                self._node_json,
                secrets.token_hex(8),  # the epoch to begin if Redis restarted (see the script)
                *change,
            ],
            timeout=CONFIG_TIMEOUT,
        )
        outcome = text(reply[0])
        if outcome == "conflict":
            raise StoreConflict("the shared config changed since this node read it")
        if outcome == "no_epoch":
            # Redis lost its state and no node has restored it yet: restore it now rather than
            # refuse the change until this node's resync does (SEED never writes over a
            # change Redis took, so this is safe from any node); the change is then computed
            # again
            await self.seed()
            raise StoreConflict("the shared state was lost and has been restored")
        self.version, self.epoch = int(reply[1]), text(reply[2])

    async def seed(self) -> Seeded:
        """(Re)create the cluster state from this node's config if Redis has none, or an older
        one of this node's history, or only an older seed (see SEED)."""
        args: list[str | bytes | int] = [
            secrets.token_hex(8),
            str(self.version),
            self.epoch or "",
            json.dumps(self.base) if self.base is not None else "",
            self.channel,
            self._node_json,
        ]
        for (kind, name), doc in self.overlay.items():  # (in creation order)
            args += [field(kind, name), json.dumps(doc)]
        reply = await self.redis.run_script(SEED, CONFIG_KEYS, args)
        parent_epoch, _, parent_version = text(reply[4]).rpartition(":")
        parent = (parent_epoch, int(parent_version)) if parent_version.isdigit() else None
        return Seeded(text(reply[0]), bool(reply[1]), int(reply[2]), int(reply[3]), parent)

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
