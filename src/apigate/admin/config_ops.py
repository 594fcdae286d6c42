"""Config changes made at run time: validate, apply (new snapshot), then persist.

Every change is computed on the effective config document, validated by the same schema as
the file, compiled into a snapshot, and only then written to the store — so the store never
holds a change the gateway refused. A change the store cannot take (SQLite failing, Redis
down) is undone here too, so that this node never serves what the others do not know of.
`ETag`s are a hash of the effective document.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from apigate.config.errors import ConfigError
from apigate.config.loader import dump_config, parse_config
from apigate.config.schema import GatewayConfig
from apigate.registry.events import EVENTS
from apigate.store.config_store import (
    IMPLICIT_SERVICE,
    ConfigStore,
    StoreConflict,
    compose_stored,
    with_entity,
)

if TYPE_CHECKING:
    from apigate.server import Gateway

KINDS = ("services", "routes", "consumers")
CONFLICT_RETRIES = 5  # a change redone after another node's: then 409

# a computed change: the new config, and the store write that keeps it
Change = tuple[GatewayConfig, Callable[[], Awaitable[None]]]


class ConfigConflict(Exception):
    """The change is valid on its own but contradicts the current state (409)."""


class StoreWriteFailed(Exception):
    """The store could not keep a change (503); the change was undone on this node."""


class PreconditionFailed(Exception):
    """The config is not the one the client read (`If-Match`): 412."""


class ConfigOps:
    def __init__(self, gateway: Gateway, store: ConfigStore) -> None:
        self.gateway = gateway
        self.store = store
        self._lock = asyncio.Lock()
        # the file's own config, as last read (start-up, SIGHUP): what other nodes' changes
        # are composed onto
        self.file_config: GatewayConfig = gateway.config
        self.refused: str | None = None  # why the shared config last failed to apply here

    @classmethod
    def of(cls, gateway: Gateway) -> ConfigOps:
        ops = gateway.extensions.get("config_ops")
        assert isinstance(ops, ConfigOps)
        return ops

    # ------------------------------------------------------------------ reading
    def effective_doc(self) -> dict[str, Any]:
        return dump_config(self.gateway.config)

    def etag(self, doc: dict[str, Any] | None = None) -> str:
        body = json.dumps(doc if doc is not None else self.effective_doc(), sort_keys=True)
        return '"' + hashlib.sha256(body.encode()).hexdigest()[:20] + '"'

    def compose(self, file_config: GatewayConfig) -> GatewayConfig:
        """The file's config with the stored changes applied (start-up and SIGHUP)."""
        self.file_config = file_config
        return compose_stored(file_config, self.store)

    def file_role(self) -> str:
        """What a reload of the file puts in force, for its event: once a `POST /config`
        replaced the base, only the file's `listeners` and `store` (ConfigStore.merge)."""
        if self.store.base is None:
            return "the file"
        return "the file's listeners and store; the rest is the config POSTed through the admin API"

    @staticmethod
    def get_entity(doc: dict[str, Any], kind: str, name: str) -> dict[str, Any] | None:
        if kind == "services":
            found = (doc.get("services") or {}).get(name)
            return found if found is None else dict(found)
        for item in doc.get(kind) or []:
            if item.get("name") == name:
                return dict(item)
        return None

    # ------------------------------------------------------------------ changing
    async def put_entity(
        self, kind: str, name: str, body: dict[str, Any], implicit: bool = False
    ) -> tuple[dict[str, Any], bool]:
        """Create or replace one service/route/consumer. Returns (entity, created).

        `implicit`: a service a registration declares (with the defaults); stored as such,
        so that a config declaring it later sets it up (see IMPLICIT_SERVICE), unless the
        base already declares it (see _base_declares)."""
        entity = dict(body)
        if kind != "services":
            entity["name"] = name
        stored = {k: v for k, v in entity.items() if k != "name"} if kind != "services" else entity
        if implicit and not self._base_declares(name):
            stored = dict(IMPLICIT_SERVICE)
        created = False

        def change(doc: dict[str, Any]) -> Change:
            nonlocal created
            created = self.get_entity(doc, kind, name) is None
            config = parse_config(
                with_entity(doc, kind, name, entity), source="<admin>", by_name=True
            )
            return config, lambda: self.store.put(kind, name, stored)

        config = await self._change(change)
        assert config is not None
        if not implicit:  # (the registry tells of the services registrations declare)
            self._changed(f"{_singular(kind)} {name} {'created' if created else 'replaced'}")
        return self.get_entity(dump_config(config), kind, name) or entity, created

    def _base_declares(self, service: str) -> bool:
        """Whether the base the store's overlay applies to (the POSTed config, else the
        file's) declares `service`. A registration re-creating such a service (the admin
        deleted it) is an admin change like any other (`{}`, the defaults, as live): kept
        as the implicit marker, the base's declaration would replace it on the next
        reload, bringing back the settings and static targets the admin deleted."""
        if self.store.base is not None:
            return service in (self.store.base.get("services") or {})
        return service in self.file_config.services

    async def delete_entity(self, kind: str, name: str) -> bool:
        def change(doc: dict[str, Any]) -> Change | None:
            if self.get_entity(doc, kind, name) is None:
                return None
            if kind == "services":
                users = [r.get("name") for r in doc.get("routes") or [] if _uses(r, name)]
                if users:
                    raise ConfigConflict(f"service {name} is used by routes: {', '.join(users)}")
                self._refuse_registered(name)
            config = parse_config(
                with_entity(doc, kind, name, None), source="<admin>", by_name=True
            )
            return config, lambda: self.store.put(kind, name, None)

        if await self._change(change) is None:
            return False
        self._changed(f"{_singular(kind)} {name} deleted")
        return True

    def _refuse_registered(self, name: str) -> None:
        """A service with registered instances is not deleted (409), as one a route uses is
        not: the instances heartbeat, and the next heartbeat would create the service again
        (a registration for an unknown service does), so "deleted" would last a TTL at most
        while the instances went on taking traffic meanwhile. Deregister them (or stop them
        and let their TTL lapse), then delete the service."""
        service = self.gateway.services.services.get(name)
        registered = [
            inst.id
            for inst in (service.instances.values() if service else ())
            if inst.origin == "registered"
        ]
        if registered:
            shown = ", ".join(registered[:5]) + (", ..." if len(registered) > 5 else "")
            raise ConfigConflict(
                f"service {name} has {len(registered)} registered instance(s) ({shown}): "
                f"deregister them first (DELETE /services/{name}/instances/{{id}})"
            )

    async def replace(
        self, doc: dict[str, Any], dry_run: bool = False, if_match: str | None = None
    ) -> GatewayConfig:
        """Replace the whole config; `if_match`: only if it is still the one with that ETag
        (checked again each time another node's change forces a retry)."""
        config = parse_config(doc, source="<admin>")
        if config.listeners != self.gateway.config.listeners:
            # (merge() would put the file's back at the next reload or restart: refused now
            # rather than in force until then; compared with those in force, which the file
            # gave, as a reload the file's new ones refused left them)
            raise ConfigError(
                [
                    "listeners: where and how this node listens comes from its file (edit "
                    "it, then reload or restart); leave them out, or send them as GET "
                    "/config shows them"
                ],
                "<admin>",
            )

        def check(current: dict[str, Any]) -> None:
            if if_match is not None and if_match != "*" and if_match != self.etag(current):
                raise PreconditionFailed("the config changed since you read it (ETag mismatch)")

        if dry_run:  # compile against throwaway services: plugins, routes and TLS checked
            from apigate.runtime import dry_compile

            check(self.effective_doc())
            if problems := self.gateway.restart_changes(config):
                raise ConfigError(problems, "<admin>")
            # TLS as the real change would: an unchanged tls section is not re-judged
            dry_compile(
                config, self.gateway.loop, tls_in_force=self.gateway.config.listeners.proxy.tls
            )
            return config

        def change(current: dict[str, Any]) -> Change:
            check(current)
            return config, lambda: self.store.replace_base(dump_config(config))

        await self._change(change)
        self._changed("config replaced")
        return config

    def _changed(self, what: str) -> None:
        """An admin change took (applied and stored): an event, as a reload of the file is,
        so that `GET /events` and the dashboard show who changed the config and when."""
        EVENTS.record(
            "config",
            f"{what} through the admin API",
            source="the admin API",
            generation=self.gateway.runtime.generation,
        )

    async def _change(
        self, change: Callable[[dict[str, Any]], Change | None]
    ) -> GatewayConfig | None:
        """Compute a change on the effective config (None: nothing to change), apply it, then
        store it. A shared store that another node changed meanwhile refuses the write
        (StoreConflict): this node then takes the other change and computes its own again,
        so that no node's change is lost and every node ends with the same config."""
        for _ in range(CONFLICT_RETRIES):
            async with self._lock:
                computed = change(self.effective_doc())
                if computed is None:
                    return None
                config, write = computed
                try:
                    await self._apply_then_store(config, write)
                    return config
                except StoreConflict:
                    try:
                        await self._sync_locked(force=True)
                    except Exception as exc:  # the store failed as we read it again
                        raise StoreWriteFailed(str(exc) or type(exc).__name__) from exc
        raise ConfigConflict("the config kept changing on other nodes meanwhile; try again")

    async def _apply_then_store(
        self, config: GatewayConfig, write: Callable[[], Awaitable[None]]
    ) -> None:
        """Compile `config` (ConfigError: nothing changed), store it, then swap it in. A store
        failure or conflict leaves the config in force as it was (StoreWriteFailed,
        StoreConflict). It was applied before the write once: while a slow or hung shared
        store took the write (up to its timeout), the change served on this node, and one the
        store then refused had been in force all that time."""
        await self._refuse_own_listeners(config, self.gateway.config)

        async def store() -> None:
            try:
                await write()
            except StoreConflict:
                raise
            except Exception as exc:
                raise StoreWriteFailed(str(exc) or type(exc).__name__) from exc

        await self.gateway.apply_config(config, before_swap=store)

    async def _refuse_own_listeners(self, config: GatewayConfig, previous: GatewayConfig) -> None:
        """A target this change adds that is this gateway's own listener is refused, as a
        registration of one is (`self_reference`): a service pointed at the admin listener
        served the admin API through the proxy listener, to whoever reaches that. (The
        file's own targets are the operator's: not looked at again.)"""
        registry = self.gateway.extensions.get("registry")
        if registry is None:
            return
        known = {(t.host, t.port) for s in previous.services.values() for t in s.targets}
        for name, service in config.services.items():
            for target in service.targets:
                if (target.host, target.port) in known:
                    continue
                if await registry.points_at_gateway(target.host, target.port):
                    raise ConfigError(
                        [f"services.{name}.targets: {target.url} is this gateway's own listener"]
                    )

    async def sync_from_store(self, force: bool = False) -> bool:
        """Another node changed the shared store: read it and apply what it now says.
        Returns whether a new config was applied; a config this node refuses is logged and
        the current one keeps serving (`refused` says why)."""
        async with self._lock:
            return await self._sync_locked(force)

    async def _sync_locked(self, force: bool) -> bool:
        if not await self.store.refresh(force):
            return False
        self.refused = await self.gateway.apply_reload(
            lambda: self.compose(self.file_config), source="the shared store"
        )
        return self.refused is None


def _singular(kind: str) -> str:
    return kind.removesuffix("s")  # services, routes, consumers


def _uses(route: dict[str, Any], service: str) -> bool:
    """Whether a route document sends requests to `service`, itself or in an aggregate part."""
    if route.get("service") == service:
        return True
    parts = route.get("aggregate") or {}
    return any(isinstance(p, dict) and p.get("service") == service for p in parts.values())
