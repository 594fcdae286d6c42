"""A service as the data plane sees it: its instances, its balancer and its pools.

`Service` objects outlive runtime snapshots: a reload that keeps a service keeps its instances'
health, in-flight counts and pooled connections; only its config is swapped. Instances come from
three origins — static targets in the file, self-registration through the admin API, and DNS
discovery — and live in one dict keyed by instance id.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from apigate.balancing import make_balancer
from apigate.balancing.base import Balancer, Instance, Origin
from apigate.http.pool import Pool, PoolManager
from apigate.registry.events import EVENTS
from apigate.resilience.circuit_breaker import CircuitBreaker
from apigate.resilience.retry import RetryPolicy

if TYPE_CHECKING:
    from apigate.config.schema import PassiveHealthConfig, ServiceConfig, TargetConfig

log = logging.getLogger("apigate.registry")

HashKey = Callable[[Any], "str | None"]  # called with the exchange (request, claims)


def hash_key_extractor(hash_on: str) -> HashKey:
    """`header:NAME` | `cookie:NAME` | `ip` | `path` | `claim:NAME` -> a function of the
    exchange. `claim:` reads the claims the jwt plugin verified (ctx.vars["jwt_claims"])."""
    kind, _, name = hash_on.partition(":")
    lname = name.lower()
    if kind == "ip":
        return lambda ctx: ctx.request.client_ip
    if kind == "path":
        return lambda ctx: ctx.request.path
    if kind == "header":
        return lambda ctx: ctx.request.header(lname)
    if kind == "cookie":

        def from_cookie(ctx: Any) -> str | None:
            raw: str | None = ctx.request.header("cookie")
            if not raw:
                return None
            for part in raw.split(";"):
                key, _, value = part.strip().partition("=")
                if key == name:
                    return value
            return None

        return from_cookie
    if kind == "claim":

        def from_claim(ctx: Any) -> str | None:
            claims = ctx.vars.get("jwt_claims")
            value = claims.get(name) if isinstance(claims, dict) else None
            return None if value is None else str(value)

        return from_claim
    raise ValueError(f"unknown hash_on {hash_on!r}")


class Service:
    def __init__(self, name: str, config: ServiceConfig, pools: PoolManager) -> None:
        self.name = name
        self.config = config
        self.pools = pools
        self.instances: dict[str, Instance] = {}
        self.balancer: Balancer = make_balancer(config.balancer, [])
        self.hash_key: HashKey | None = None
        self.breaker: CircuitBreaker | None = None
        # breaker state entered -> transitions, for /metrics: kept here, not on the breaker, so
        # that a breaker rebuilt on new settings goes on counting where the last one stopped
        self.breaker_counts: dict[str, int] = {}
        self.retry: RetryPolicy = RetryPolicy(config.retries)
        self._pool_by_instance: dict[str, Pool] = {}
        # passive ejections in force -> the timer that ends each; keyed by the Instance object,
        # so that a replaced instance under the same id is not taken for the ejected one
        self._ejected: dict[Instance, asyncio.TimerHandle] = {}
        # instances the ejection cap kept in -> loop time of the event that said so
        self._cap_noted: dict[Instance, float] = {}
        # removed (deregistered, TTL lapsed, dropped by a reload) with requests still in
        # flight: shown as draining until those end (see listed_instances)
        self._departed: dict[Instance, None] = {}
        self.apply_config(config)

    # ------------------------------------------------------------------ configuration
    def apply_config(self, config: ServiceConfig) -> None:
        """Take a new config: reconcile static targets, rebuild the balancer if its kind changed."""
        old_kind = self.config.balancer
        old_config = self.config
        self.config = config
        # read on every request: a native attribute rather than two pydantic lookups
        self.response_timeout: float = config.timeouts.response
        # keep breaker state and retry budget across reloads that do not change their settings
        if config.circuit_breaker is None:
            self.breaker = None
        elif self.breaker is None or config.circuit_breaker != old_config.circuit_breaker:
            self.breaker = CircuitBreaker(
                self.name, config.circuit_breaker, counts=self.breaker_counts
            )
        if config.retries != old_config.retries:
            self.retry = RetryPolicy(config.retries)
        self.hash_key = (
            hash_key_extractor(config.hash_on) if config.balancer == "consistent_hash" else None
        )
        wanted: dict[str, TargetConfig] = {self.static_id(t): t for t in config.targets}
        for iid, inst in list(self.instances.items()):
            if inst.origin == "static" and iid not in wanted:
                self._take_out(iid)  # draining, as a deregistration (the balancer below)
        for iid, target in wanted.items():
            self._apply_target(iid, target)
        self._pool_by_instance.clear()
        if old_kind != config.balancer or not isinstance(self.balancer, Balancer):
            self.balancer = make_balancer(config.balancer, self.instances.values())
        else:
            self.balancer.set_instances(self.instances.values())

    def _apply_target(self, iid: str, target: TargetConfig) -> None:
        """A static target as the file now says it. Its id is its host:port, so the same id
        may come back with another scheme (a new instance: the old connections go) or
        another base path (the same instance, health and connections kept, its URL updated).
        (apply_config updates the balancer once, after every target.)"""
        self._put_instance(
            iid,
            target.url,
            target.host,
            target.port,
            weight=target.weight,
            origin="static",
            scheme=target.scheme,
            base_path=target.base_path,
        )

    @staticmethod
    def static_id(target: TargetConfig) -> str:
        return f"{target.host}:{target.port}"

    # ------------------------------------------------------------------ membership
    def add_instance(
        self,
        iid: str,
        url: str,
        host: str,
        port: int,
        *,
        weight: int = 1,
        origin: Origin = "registered",
        scheme: str = "http",
        metadata: dict[str, object] | None = None,
        base_path: str = "",
    ) -> Instance:
        """Add `iid`, or update it in place when it keeps its address (scheme, host, port):
        its health, in-flight count and pooled connections stay. Either way the instance then
        says what this call said, its `url` and `base_path` included (a re-registration that
        only moves the base path must not leave the old URL shown, or written back to a
        cluster's store).

        The balancer is updated only when this changes what it picks from (a new instance or
        address, a weight, availability): a heartbeat is this same call, every few seconds per
        instance, and a consistent_hash ring rebuilt for each one blocked the event loop."""
        before = self.instances.get(iid)
        seen = (before.weight, before.available) if before is not None else None
        inst = self._put_instance(
            iid,
            url,
            host,
            port,
            weight=weight,
            origin=origin,
            scheme=scheme,
            metadata=metadata,
            base_path=base_path,
        )
        if inst is not before or seen != (inst.weight, inst.available):
            self.balancer.set_instances(self.instances.values())
        return inst

    def _put_instance(
        self,
        iid: str,
        url: str,
        host: str,
        port: int,
        *,
        weight: int,
        origin: Origin,
        scheme: str,
        metadata: dict[str, object] | None = None,
        base_path: str = "",
    ) -> Instance:
        """add_instance without the balancer's update: the one rule for static targets and
        registrations (same address: updated in place; new address: a new instance)."""
        inst = self.instances.get(iid)
        if inst is None or (inst.host, inst.port, inst.scheme) != (host, port, scheme):
            if inst is not None:  # same id, new address: the old address's pool goes
                self.pools.retire(self.name, iid)
            inst = Instance(
                iid,
                url,
                host,
                port,
                weight=weight,
                origin=origin,
                scheme=scheme,
                metadata=dict(metadata or {}),
            )
            self.instances[iid] = inst
            self._pool_by_instance.pop(iid, None)
        else:
            inst.url = url
            inst.weight = weight
            inst.draining = False
            inst.metadata = dict(metadata or {})
        inst.base_path = base_path
        return inst

    def remove_instance(self, iid: str) -> Instance | None:
        """Stop sending new requests to `iid`; requests in flight finish on their connections."""
        inst = self._take_out(iid)
        if inst is not None:
            self.balancer.set_instances(self.instances.values())
        return inst

    def _take_out(self, iid: str) -> Instance | None:
        """remove_instance without the balancer's update: the one rule for a deregistration,
        a TTL lapse and a static target a reload drops (which updates the balancer once,
        after every target). The instance is marked draining and, while requests to it run,
        still listed (see listed_instances); its pool is retired."""
        inst = self.instances.pop(iid, None)
        if inst is not None:
            inst.draining = True
            if inst.in_flight > 0:
                self._prune_departed()  # (bounded without anyone looking)
                self._departed[inst] = None
            self._pool_by_instance.pop(iid, None)
            self.pools.retire(self.name, iid)
        return inst

    def listed_instances(self) -> list[Instance]:
        """The instances, then those removed while requests to them were in flight, until
        these end (`draining`): the admin API, the dashboard and /metrics showed an instance
        gone the moment it was removed, its requests still running and its in-flight gauge
        dropped. One whose id came back (a re-registration) is not listed beside its
        successor. (Pruned when someone looks or another leaves: the data plane does nothing
        for it.)"""
        self._prune_departed()
        instances = self.instances
        return [*instances.values(), *(i for i in self._departed if i.id not in instances)]

    def _prune_departed(self) -> None:
        for gone in [inst for inst in self._departed if inst.in_flight <= 0]:
            del self._departed[gone]

    def report(self, inst: Instance, ok: bool, status: int = 0) -> None:
        """Passive health: `failures` consecutive errors or 5xx eject `inst` for `eject_for`,
        unless `max_ejection_percent` of the instances that could serve is out by passive
        ejection already (see `_ejection_limit`).

        On the hot path: a success on a clean instance returns after one comparison; the cap is
        computed only when an ejection is due.
        """
        if ok:
            if inst.failures:
                inst.failures = 0
            return
        passive = self.config.health.passive
        if passive is None:
            return
        inst.failures += 1
        if inst.failures < passive.failures or not inst.healthy:
            return
        cap = passive.max_ejection_percent
        if cap < 1.0 and self._passively_ejected() >= self._ejection_limit(cap):
            # Kept in; `failures` keeps counting, so the first failure after a slot frees up
            # (a readmission, a removal, a new instance) ejects it.
            self._note_capped(inst, passive)
            return
        self._cap_noted.pop(inst, None)
        self.set_health(
            inst, False, f"ejected after {inst.failures} consecutive failures", check="passive"
        )
        loop = asyncio.get_running_loop()
        self._ejected[inst] = loop.call_later(passive.eject_for, self._readmit, inst)

    def _passively_ejected(self) -> int:
        """Instances of this service out by passive ejection now.

        Only passive ejections use up `max_ejection_percent`, as Envoy counts only its outlier-
        ejected hosts: instances held out by active checks (`held_out`) are the checker's verdict,
        which the cap never overrides, and do not count, even those ejected passively first
        (their timers are still pending); neither do ejected instances removed since."""
        return sum(
            1 for inst in self._ejected if self.instances.get(inst.id) is inst and not inst.held_out
        )

    def _could_serve(self) -> int:
        """Instances that would take traffic but for passive ejection: the share the cap is of.

        Weight-0 instances and those held out by active checks take none whatever passive
        ejection does, so counting them let the cap eject the last instance serving (one
        serving plus one of weight 0, at 50%: the serving one went, clients got 503)."""
        return sum(1 for inst in self.instances.values() if inst.weight > 0 and not inst.held_out)

    def _ejection_limit(self, cap: float) -> int:
        """How many may be out by passive ejection at once: `cap` of those that could serve,
        rounded down, and below 100% never the last of them (a lone instance answering 500
        serves its answers, not 503 no_healthy_instance)."""
        could_serve = self._could_serve()
        # + 1e-9: 0.29 * 100 is 28.999999999999996 in floats and means 29 instances
        limit = math.floor(cap * could_serve + 1e-9)
        return limit if cap >= 1.0 else min(limit, could_serve - 1)

    def _note_capped(self, inst: Instance, passive: PassiveHealthConfig) -> None:
        """One event per refusal streak, not one per failed request: a streak starts when the
        failure count reaches the threshold, and goes on as long as the instance keeps failing.
        A new streak (the instance answered well in between) is told again only after
        `eject_for`: a flapping instance would otherwise fill the event ring and the logs at the
        rate of its failures, where an ejection would have said two things per `eject_for`."""
        noted = self._cap_noted.get(inst)
        if noted is not None and inst.failures != passive.failures:
            return  # the streak already told
        now = asyncio.get_running_loop().time()
        if noted is not None and now - noted < passive.eject_for:
            return  # a new streak, too soon after the last one told
        for gone in [i for i in self._cap_noted if self.instances.get(i.id) is not i]:
            del self._cap_noted[gone]
        self._cap_noted[inst] = now
        cap = passive.max_ejection_percent
        ejected, total = self._passively_ejected(), self._could_serve()
        EVENTS.record(
            "health",
            f"{self.name}/{inst.id} not ejected after {inst.failures} consecutive failures: "
            f"max_ejection_percent {cap * 100:g}% allows {self._ejection_limit(cap)} of "
            f"{total} instances out, {ejected} already are",
            logging.WARNING,
            service=self.name,
            instance=inst.id,
            healthy=True,
            check="passive",
            reason="max_ejection_percent",
            ejected=ejected,
            instances=total,
        )

    def _readmit(self, inst: Instance) -> None:
        self._ejected.pop(inst, None)  # whatever follows, this ejection no longer counts
        if self.instances.get(inst.id) is not inst or inst.healthy or inst.held_out:
            return  # gone, already back, or kept out by failing active checks
        self.set_health(inst, True, "readmitted after ejection", check="passive")

    def set_health(
        self, inst: Instance, healthy: bool, message: str, *, check: str, **fields: Any
    ) -> None:
        """The one way health changes: the flag, the balancer's available set, an event.

        Passive ejection and active checks both come through here, so the admin API, the
        dashboard and the logs see every transition the same way."""
        inst.healthy = healthy
        if healthy:
            inst.failures = 0
            timer = self._ejected.pop(inst, None)
            if timer is not None:  # back before its passive timer (active checks passed)
                timer.cancel()  # a stale timer would cut a later ejection short
        self.refresh()
        EVENTS.record(
            "health",
            f"{self.name}/{inst.id} {message}",
            logging.INFO if healthy else logging.WARNING,
            service=self.name,
            instance=inst.id,
            healthy=healthy,
            check=check,
            **fields,
        )

    def refresh(self) -> None:
        """Health or weight changed in place: let the balancer recompute its available set."""
        self.balancer.refresh()

    # ------------------------------------------------------------------ data plane
    def pool_for(self, inst: Instance) -> Pool:
        pool = self._pool_by_instance.get(inst.id)
        if pool is None:
            pool = self.pools.get(
                self.name,
                inst.id,
                inst.scheme,
                inst.host,
                inst.port,
                max_connections=self.config.max_connections,
                max_pending=self.config.max_pending,
                idle_timeout=self.config.timeouts.idle,
            )
            self._pool_by_instance[inst.id] = pool
        return pool

    def __repr__(self) -> str:
        return f"<Service {self.name} {self.balancer!r}>"
