"""Self-registration: instances announce themselves, heartbeat, and lapse.

`PUT /services/{service}/instances/{id}` lands in `Registry.register`: the instance joins the
service's balancer synchronously, before the API answers, so it can receive traffic at once.
A heartbeat is the same call (idempotent); it renews `expires_at`. An instance whose TTL
lapsed is removed when it lapses (a timer at the earliest expiry, see `_watch_lapse`). Removal
is draining: the balancer stops picking the instance immediately while
requests already on its connections finish.

A registration for a service the config does not declare creates it with default settings
(through a config change, so routes can name it and `GET /config` shows it).

With `store: redis://` a `mirror` (`apigate.store.cluster.ClusterSync`) shares every
registration, heartbeat and deregistration made here with the other gateway nodes, and brings
theirs in through `apply`/`drop`, which change this node only.
"""

from __future__ import annotations

import asyncio
import heapq
import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from pydantic import ValidationError

from apigate.balancing.base import Instance
from apigate.config.schema import TargetConfig
from apigate.registry.events import EVENTS

if TYPE_CHECKING:
    from apigate.server import Gateway

MAX_TTL = 24 * 3600.0


class RegistrationError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Registration:
    service: str
    instance_id: str
    url: str
    ttl: float
    weight: int = 1
    metadata: dict[str, Any] | None = None


class Mirror(Protocol):
    """Where this node's registry changes go so that other nodes see them."""

    async def instance_up(self, reg: Registration) -> None: ...

    async def instance_down(self, service: str, instance_id: str, ttl_left: float) -> None: ...

    async def instance_down_unheard(self, service: str, instance_id: str) -> bool: ...


class Registry:
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        # (expires_at, service, id) to look at, earliest first: one per registered instance,
        # at the expiry it had when it was queued (`_queued`); a heartbeat since moves it on
        # when its time comes rather than adding one (a cluster resync renews every instance
        # every 5 s: one entry per renewal grew without bound)
        self._lapses: list[tuple[float, str, str]] = []
        self._queued: dict[tuple[str, str], float] = {}
        self._lapse_timer: asyncio.TimerHandle | None = None
        self._lapse_due = 0.0  # when the timer fires
        self._stopped = False
        self.own_addresses: set[tuple[str, int]] = set()
        self.mirror: Mirror | None = None
        # +1 per change of a registered instance, and the number of each (service, id)'s last
        # change: a cluster resync leaves alone what changed while it read the shared state
        self.changes = 0
        self.changed: dict[tuple[str, str], int] = {}

    async def start(self) -> None:
        self._stopped = False
        self._arm_lapse_timer()

    async def stop(self) -> None:
        self._stopped = True
        if self._lapse_timer is not None:
            self._lapse_timer.cancel()
            self._lapse_timer = None

    # ------------------------------------------------------------------ API
    async def register(self, reg: Registration) -> tuple[Instance, bool]:
        """Register or heartbeat; returns the instance and whether it is new."""
        try:
            target = TargetConfig(url=reg.url, weight=reg.weight)
        except ValidationError as exc:
            first = exc.errors()[0]
            raise RegistrationError(400, "invalid_url", f"url: {first['msg']}") from None
        if await self.points_at_gateway(target.host, target.port):
            raise RegistrationError(
                400, "self_reference", "url points at this gateway's own listener"
            )
        if not 0 < reg.ttl <= MAX_TTL:
            raise RegistrationError(400, "invalid_ttl", f"ttl must be in (0, {MAX_TTL:.0f}s]")
        if reg.service not in self.gateway.config.services:
            # unknown, or left in the table by a config that dropped it while it had
            # registered instances: either way the config names it again
            await self._create_service(reg.service)
        inst, created = self._add(reg, target)
        if self.mirror is not None:
            await self.mirror.instance_up(reg)
        return inst, created

    async def apply(self, reg: Registration, source: str) -> bool:
        """A registration or heartbeat another node took: this node only. False when it cannot
        be applied here (an unknown service, a bad URL, an id a static target holds, an
        address that is this node's own listener)."""
        service = self.gateway.services.services.get(reg.service)
        if service is None:
            return False
        try:
            target = TargetConfig(url=reg.url, weight=reg.weight)
        except ValidationError:
            return False
        known = service.instances.get(reg.instance_id)
        if (known is None or known.url != reg.url) and await self.points_at_gateway(
            target.host, target.port
        ):
            logging.getLogger("apigate.registry").warning(
                "%s/%s from %s points at this node's own listener: not applied here",
                reg.service,
                reg.instance_id,
                source,
                extra={"event": "registration", "url": reg.url},
            )
            return False
        try:
            self._add(reg, target, source=source)
        except RegistrationError:
            return False
        return True

    def touch(self, key: tuple[str, str]) -> None:
        if self.mirror is not None:  # only the cluster sync reads (and prunes) these
            self.changes += 1
            self.changed[key] = self.changes

    def _add(
        self, reg: Registration, target: TargetConfig, source: str | None = None
    ) -> tuple[Instance, bool]:
        service = self.gateway.services.services[reg.service]
        existing = service.instances.get(reg.instance_id)
        if existing is not None and existing.origin != "registered":
            raise RegistrationError(
                409, "conflict", f"instance id {reg.instance_id} is a {existing.origin} target"
            )
        self.touch((reg.service, reg.instance_id))
        inst = service.add_instance(
            reg.instance_id,
            reg.url,
            target.host,
            target.port,
            weight=reg.weight,
            origin="registered",
            scheme=target.scheme,
            metadata=reg.metadata,
            base_path=target.base_path,
        )
        inst.expires_at = self.gateway.loop.time() + reg.ttl
        self._watch_lapse(inst.expires_at, reg.service, reg.instance_id)
        if existing is None:
            what = f"registered at {reg.url}"
        elif existing is not inst:  # a new address: the old one drains
            what = f"moved to {reg.url} (was {existing.url})"
        else:
            return inst, False  # a heartbeat
        via = f" (through {source})" if source else ""
        EVENTS.record(
            "registration",
            f"{reg.service}/{reg.instance_id} {what}{via}",
            service=reg.service,
            instance=reg.instance_id,
            url=reg.url,
            ttl=reg.ttl,
        )
        return inst, existing is None

    async def deregister(self, service_name: str, instance_id: str) -> bool:
        """`DELETE .../instances/{id}`: here, and on every node through the mirror. False when
        there is no such registered instance (here, nor in the cluster's shared state)."""
        service = self.gateway.services.services.get(service_name)
        inst = service.instances.get(instance_id) if service is not None else None
        expires_at = inst.expires_at if inst is not None else None
        if not self.drop(service_name, instance_id, "deregistered"):
            if self.mirror is None or inst is not None:  # (inst: a static target, not ours)
                return False
            # registered through another node moments ago, its announcement not heard yet
            return await self.mirror.instance_down_unheard(service_name, instance_id)
        if self.mirror is not None:
            ttl_left = expires_at - self.gateway.loop.time() if expires_at is not None else 0.0
            await self.mirror.instance_down(service_name, instance_id, ttl_left)
        return True

    def drop(self, service_name: str, instance_id: str, reason: str) -> bool:
        """Remove a registered instance from this node only (TTL lapse, another node's
        deregistration). False when there is no such registered instance."""
        service = self.gateway.services.services.get(service_name)
        if service is None:
            return False
        inst = service.instances.get(instance_id)
        if inst is None or inst.origin != "registered":
            return False
        self.touch((service_name, instance_id))
        service.remove_instance(instance_id)
        EVENTS.record(
            "registration",
            f"{service_name}/{instance_id} {reason}",
            service=service_name,
            instance=instance_id,
            reason=reason,
        )
        return True

    # ------------------------------------------------------------------ internals
    async def _create_service(self, name: str) -> None:
        from apigate.admin.config_ops import ConfigOps

        ops = ConfigOps.of(self.gateway)
        kept = name in self.gateway.services.services  # (see register)
        await ops.put_entity("services", name, {}, implicit=True)
        how = "declared again by a registration" if kept else "created by its first registration"
        EVENTS.record("service", f"service {name} {how}", service=name)

    async def points_at_gateway(self, host: str, port: int) -> bool:
        """Would a request to host:port come back to one of our listeners (a proxy loop)?

        The name is resolved (off the loop) and each address compared as an address, so
        127.0.0.2, ::ffff:127.0.0.1 or a hostname of this machine are caught as well as the
        literal spellings; a listener on 0.0.0.0 is reached through any local address."""
        ports = {p for _, p in self.own_addresses}
        if port not in ports:
            return False
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, port)
        except OSError:
            return False  # unresolvable: it cannot reach us either (and will fail health)
        local = await asyncio.get_running_loop().run_in_executor(None, _local_addresses)
        for info in infos:
            addr = ipaddress.ip_address(str(info[4][0]).split("%")[0])
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
                addr = addr.ipv4_mapped
            if addr.is_loopback or addr.is_unspecified or addr in local:
                return True
        return False

    def _watch_lapse(self, when: float, service_name: str, instance_id: str) -> None:
        """Remove the instance at `when` unless a heartbeat renews it first. (A sweep every
        250 ms used to serve a lapsed instance for up to that long; a timer per registration
        would be one more per heartbeat: one timer, at the earliest expiry, instead.)"""
        key = (service_name, instance_id)
        queued = self._queued.get(key)
        if queued is not None and queued <= when:
            return  # looked at sooner already, and moved on to `when` then
        self._queued[key] = when  # (an entry at a later time is left to be skipped)
        heapq.heappush(self._lapses, (when, service_name, instance_id))
        if self._lapse_timer is None or when < self._lapse_due:
            self._arm_lapse_timer()

    def _arm_lapse_timer(self) -> None:
        if self._lapse_timer is not None:
            self._lapse_timer.cancel()
            self._lapse_timer = None
        if self._lapses and not self._stopped:
            self._lapse_due = self._lapses[0][0]
            self._lapse_timer = self.gateway.loop.call_at(self._lapse_due, self._remove_lapsed)

    def _remove_lapsed(self) -> None:
        self._lapse_timer = None
        # (the timer's own time counts as reached: a clock that ticks in whole ms may read a
        # hair earlier when it fires)
        now = max(self.gateway.loop.time(), self._lapse_due)
        lapses = self._lapses
        renewed: list[tuple[float, str, str]] = []
        while lapses and lapses[0][0] <= now:
            when, service_name, iid = heapq.heappop(lapses)
            key = (service_name, iid)
            if self._queued.get(key) != when:
                continue  # an earlier entry of the instance took over from this one
            del self._queued[key]
            service = self.gateway.services.services.get(service_name)
            inst = service.instances.get(iid) if service is not None else None
            if inst is None or inst.origin != "registered" or inst.expires_at is None:
                continue  # deregistered, or gone with its service, since
            if inst.expires_at > now:
                renewed.append((inst.expires_at, service_name, iid))  # a heartbeat since
                continue
            try:
                self.drop(service_name, iid, "removed: TTL lapsed")
            except Exception:  # the next lapses must still be removed
                logging.getLogger("apigate.registry").exception("removing a lapsed instance")
        for when, service_name, iid in renewed:
            self._queued[(service_name, iid)] = when
            heapq.heappush(lapses, (when, service_name, iid))
        self._arm_lapse_timer()

    def registered(self) -> dict[tuple[str, str], Instance]:
        """Every registered instance on this node, by (service, instance id)."""
        return {
            (svc.name, inst.id): inst
            for svc in self.gateway.services.services.values()
            for inst in svc.instances.values()
            if inst.origin == "registered"
        }


def _local_addresses() -> set[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """This machine's own addresses (those its host name resolves to)."""
    found: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            found.add(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
    except OSError:
        pass
    return found


def registry_of(gateway: Gateway) -> Registry:
    reg = gateway.extensions.get("registry")
    assert isinstance(reg, Registry)
    return reg


async def attach_registry(gateway: Gateway) -> None:
    registry = Registry(gateway)
    gateway.extensions["registry"] = registry

    async def on_start(gw: Gateway) -> None:
        registry.own_addresses.update(gw.own_addresses())
        await registry.start()

    async def on_stop(gw: Gateway) -> None:
        await registry.stop()

    gateway.on_start.append(on_start)
    gateway.on_stop.append(on_stop)
