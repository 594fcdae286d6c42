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
from typing import Any

Kind = str  # "services" | "routes" | "consumers"
_NAMED_LISTS = ("routes", "consumers")


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
        self.overlay[(kind, name)] = doc

    async def replace_base(self, doc: dict[str, Any]) -> None:
        self.base = doc
        self.overlay.clear()

    def merge(self, file_doc: dict[str, Any]) -> dict[str, Any]:
        """The effective config document: base (POSTed or file) plus the overlay."""
        doc: dict[str, Any] = json.loads(
            json.dumps(self.base if self.base is not None else file_doc)
        )
        for (kind, name), entity in self.overlay.items():
            if kind == "services":
                services = doc.setdefault("services", {}) or {}
                doc["services"] = services
                if entity is None:
                    services.pop(name, None)
                else:
                    services[name] = entity
            elif kind in _NAMED_LISTS:
                items = [i for i in (doc.get(kind) or []) if i.get("name") != name]
                if entity is not None:
                    items.append({**entity, "name": name})
                doc[kind] = items
        return doc

    def describe(self) -> dict[str, Any]:
        return {"kind": "memory", "persisted": False, "overlay_entries": len(self.overlay)}


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
        row = db.execute("SELECT doc FROM base WHERE id = 1").fetchone()
        self.base = json.loads(row[0]) if row else None
        for kind, name, doc in db.execute("SELECT kind, name, doc FROM overlay"):
            self.overlay[(kind, name)] = json.loads(doc) if doc is not None else None

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await asyncio.to_thread(db.close)

    async def put(self, kind: Kind, name: str, doc: dict[str, Any] | None) -> None:
        await super().put(kind, name, doc)
        await asyncio.to_thread(self._put_sync, kind, name, doc)

    def _put_sync(self, kind: Kind, name: str, doc: dict[str, Any] | None) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT OR REPLACE INTO overlay (kind, name, doc, updated) VALUES (?, ?, ?, ?)",
            (kind, name, json.dumps(doc) if doc is not None else None, time.time()),
        )
        self._db.commit()

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
