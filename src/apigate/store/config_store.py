"""Where admin-API changes to services, routes and consumers are kept.

The file is the base; changes made through the admin API are an *overlay* of entity records
(kind, name, document or a tombstone) that wins over the file for the entities it names. A
`POST /config` replaces the base itself. Re-reading the file (SIGHUP) therefore keeps admin
changes, and a restart with `store: sqlite:///path` brings them back. `store: memory` keeps the
overlay in the process only and says so (`persisted: false` in `GET /config`).

SQLite writes are rare (one per admin change) and run in a thread so they never block the loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from apigate.config.schema import GatewayConfig

Kind = str  # "services" | "routes" | "consumers"
_NAMED_LISTS = ("routes", "consumers")


# What a registration for an undeclared service keeps: the service exists (its instances'
# heartbeats keep it so), with the defaults until a config declares it. Kept as `{}` it was
# an admin change like any other, which wins over the file: the file's settings for the
# service never applied, silently, not even after a restart. Only for a service the base
# does not declare: one the admin deleted from it and a registration re-created stays `{}`.
IMPLICIT_SERVICE: Final = {"declared_by": "registration"}


# What a config composed from stored changes always takes from the file (ConfigStore.merge).
FILE_ONLY: Final = ("store", "listeners")


class StoreConflict(Exception):
    """A shared store changed since this process read it: read it again, then redo the change."""


class ConfigStore:
    """In-memory overlay (the `memory` store)."""

    persistent = False

    def __init__(self) -> None:
        self.base: dict[str, Any] | None = None
        self.overlay: dict[tuple[Kind, str], dict[str, Any] | None] = {}
        self.version = 0  # of a shared store: +1 per change any node made

    async def open(self) -> None:
        """Load what was saved (nothing for memory)."""

    async def refresh(self, force: bool = False) -> bool:
        """Read again what other processes may have changed; whether anything did (`force`:
        read even if the version says nothing did). Only a shared store (Redis) has other
        writers."""
        return False

    async def close(self) -> None:
        """Release resources."""

    async def put(self, kind: Kind, name: str, doc: dict[str, Any] | None) -> None:
        if doc is not None and self.overlay.get((kind, name), doc) is None:
            # created again after a deletion: it goes last among the new ones, as live
            del self.overlay[(kind, name)]
        self.overlay[(kind, name)] = doc

    async def replace_base(self, doc: dict[str, Any]) -> None:
        self.base = doc
        self.overlay.clear()

    def merge(self, file_doc: dict[str, Any]) -> dict[str, Any]:
        """The effective config document: base (POSTed or file) plus the overlay.

        An overlay route or consumer that replaces one of the base keeps its place in the
        list, and new ones follow in the order they were created: what the admin API did live
        (`with_entity`), so a reload or a restart does not reorder routes (the
        file order breaks ties between equally specific routes). `store` and `listeners`
        are always the file's: where this overlay lives and where this node listens are for
        the file (and a restart) to choose, also after a `POST /config` (a cluster's nodes
        share that base, each with its own addresses).
        """
        doc: dict[str, Any] = json.loads(
            json.dumps(self.base if self.base is not None else file_doc)
        )
        for key in FILE_ONLY:
            if key in file_doc:
                doc[key] = file_doc[key]
        for (kind, name), entity in self.overlay.items():
            if entity == IMPLICIT_SERVICE:
                if name in (doc.get("services") or {}):
                    continue  # the file (or the POSTed config) declares it: its settings
                entity = {}
            if kind == "services" or kind in _NAMED_LISTS:
                doc = with_entity(doc, kind, name, entity)
        return doc

    def describe(self) -> dict[str, Any]:
        return {"kind": "memory", "persisted": False, "overlay_entries": len(self.overlay)}


def compose_stored(
    file_config: GatewayConfig, store: ConfigStore, source: str = "<store>"
) -> GatewayConfig:
    """The file's config with the changes `store` keeps applied: what the gateway serves
    (start-up, SIGHUP) and what `apigate validate` checks. ConfigError when they no longer
    fit the file (a route the admin API added names a service the file dropped)."""
    if store.base is None and not store.overlay:
        return file_config
    from apigate.config.loader import dump_config, parse_config

    return parse_config(store.merge(dump_config(file_config)), source=source, by_name=True)


def served_config(path: str | Path) -> tuple[GatewayConfig, str]:
    """The config `apigate run -c path` would serve, read without starting or creating
    anything (`apigate validate`, `routes`, `check`): the file plus the admin changes its
    `sqlite:///` store keeps, which `run` refuses to start with when they no longer fit
    the file. The note says which stored changes were applied, or that a shared store's
    were not looked at ("" when there are none)."""
    from apigate.config.loader import load_config
    from apigate.redaction import redact_url

    config = load_config(path)
    if config.store.startswith(("redis://", "rediss://")):
        return config, f"the admin changes kept in {redact_url(config.store)} are not checked"
    if not config.store.startswith("sqlite:///"):
        return config, ""
    store = SqliteConfigStore(config.store[len("sqlite:///") :])
    if not store.read_only():
        return config, ""
    count = len(store.overlay) + (store.base is not None)
    where = f"the admin changes kept in {store.path}"
    return compose_stored(config, store, f"{path} with {where}"), f"with {count} of {where}"


def with_entity(
    doc: dict[str, Any], kind: str, name: str, entity: dict[str, Any] | None
) -> dict[str, Any]:
    """`doc` (a shallow copy) with the service, route or consumer `name` put (`entity`) or
    removed (None). A route or consumer that replaces one keeps its place in the list, a new
    one goes last: the file order breaks ties between equally specific routes. The one rule
    for a live admin change (config_ops) and for the store's overlay on a reload or restart."""
    out = dict(doc)
    if kind == "services":
        services = dict(out.get("services") or {})
        if entity is None:
            services.pop(name, None)
        else:
            services[name] = entity
        out["services"] = services
        return out
    items: list[dict[str, Any]] = list(out.get(kind) or [])
    names = [item.get("name") for item in items]
    if entity is None:
        items = [item for item in items if item.get("name") != name]
    elif name in names:
        items[names.index(name)] = {**entity, "name": name}
    else:
        items.append({**entity, "name": name})
    out[kind] = items
    return out


class SqliteConfigStore(ConfigStore):
    persistent = True

    def __init__(self, path: str | Path) -> None:
        super().__init__()
        # absolute from the start, so that logs and GET /config say which file it is
        self.path = Path(path).absolute()
        self._db: sqlite3.Connection | None = None

    async def open(self) -> None:
        await asyncio.to_thread(self._open_sync)

    def _open_sync(self) -> None:
        try:
            self._open_db()
        except sqlite3.Error as exc:  # not a database, a directory, locked...: a clean start-up
            raise OSError(f"store {self.path}: {exc}") from None  # error (cli), no traceback

    def _open_db(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, check_same_thread=False)
        # the overlay holds plugin secrets and consumers' keys as configured: owner-only file
        os.chmod(self.path, 0o600)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(
            "CREATE TABLE IF NOT EXISTS overlay (kind TEXT, name TEXT, doc TEXT, "
            "updated REAL, PRIMARY KEY (kind, name))"
        )
        db.execute(
            "CREATE TABLE IF NOT EXISTS base (id INTEGER PRIMARY KEY, doc TEXT, updated REAL)"
        )
        db.commit()
        self._db = db
        self._load(db)

    def _load(self, db: sqlite3.Connection) -> None:
        row = db.execute("SELECT doc FROM base WHERE id = 1").fetchone()
        self.base = json.loads(row[0]) if row else None
        # in the order the entities were first created (see _put_sync): merge appends new
        # routes in that order
        for kind, name, doc in db.execute("SELECT kind, name, doc FROM overlay ORDER BY rowid"):
            self.overlay[(kind, name)] = json.loads(doc) if doc is not None else None

    def read_only(self) -> bool:
        """Load what the file keeps without changing it (`apigate validate`: a check must
        not create the store, write to it or take its lock). False when there is no store
        file yet (nothing kept); OSError when it cannot be read.

        Not without a trace: the store is in WAL mode, and SQLite reading it, even
        read-only (`mode=ro`), creates its `-wal` and `-shm` files beside it when they are
        missing, and a read-only connection leaves them there. (`immutable=1` would not,
        but it ignores the WAL, so changes not yet checkpointed into the database would go
        unseen.)"""
        if not self.path.exists():
            return False
        try:
            db = sqlite3.connect(f"{self.path.as_uri()}?mode=ro", uri=True)
            try:
                self._load(db)
            finally:
                db.close()
        except sqlite3.Error as exc:
            raise OSError(f"store {self.path}: {exc}") from None
        return True

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    async def put(self, kind: Kind, name: str, doc: dict[str, Any] | None) -> None:
        await super().put(kind, name, doc)
        await asyncio.to_thread(self._put_sync, kind, name, doc)

    def _put_sync(self, kind: Kind, name: str, doc: dict[str, Any] | None) -> None:
        """An update keeps the row (and its rowid: the order loaded back); an entity created
        again after its deletion gets a new row, last, as `ConfigStore.put` moves it."""
        assert self._db is not None
        with self._db:
            if doc is not None:
                self._db.execute(
                    "DELETE FROM overlay WHERE kind = ? AND name = ? AND doc IS NULL",
                    (kind, name),
                )
            self._db.execute(
                "INSERT INTO overlay (kind, name, doc, updated) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (kind, name) DO UPDATE SET doc = excluded.doc, "
                "updated = excluded.updated",
                (kind, name, json.dumps(doc) if doc is not None else None, time.time()),
            )

    async def replace_base(self, doc: dict[str, Any]) -> None:
        await super().replace_base(doc)
        await asyncio.to_thread(self._replace_sync, doc)

    def _replace_sync(self, doc: dict[str, Any]) -> None:
        assert self._db is not None
        with self._db:
            self._db.execute("DELETE FROM overlay")
            self._db.execute(
                "INSERT OR REPLACE INTO base (id, doc, updated) VALUES (1, ?, ?)",
                (json.dumps(doc), time.time()),
            )

    def describe(self) -> dict[str, Any]:
        return {
            "kind": "sqlite",
            "persisted": True,
            "path": str(self.path),
            "overlay_entries": len(self.overlay),
        }


def open_config_store(url: str) -> ConfigStore:
    """`memory` | `sqlite:///path` | `redis://...` (shared by every node: see
    `apigate.store.cluster`)."""
    if url.startswith("sqlite:///"):
        # sqlite:///state.db is relative to the working directory; sqlite:////var/x.db absolute
        return SqliteConfigStore(url[len("sqlite:///") :])
    if url.startswith(("redis://", "rediss://")):
        from apigate.store.redis_config_store import RedisConfigStore

        return RedisConfigStore(url)
    return ConfigStore()
