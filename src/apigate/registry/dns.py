"""DNS discovery: a service's instances follow what DNS says about a name.

Theory of operation
-------------------
Each service with `discovery: {dns: NAME, port: P}` gets one `DnsDiscovery`: a background task
that resolves NAME (A and AAAA together; SRV when `srv: true`, whose targets give the ports and
weights), reconciles the service's `origin="dns"` instances with the answer, then sleeps for the
answer's TTL clamped to [min_ttl, max_ttl] and asks again. Requests never wait for DNS: they
pick among the instances the service has now. This is the failure nginx is known for — resolving
once at start and sending traffic to addresses that no longer exist — turned around.

Reconciliation: instance ids are `dns:ADDRESS:PORT` (`dns:[::1]:8080` for IPv6). An address that
stays keeps its `Instance` object, so its health and pooled connections survive re-resolves; a
vanished one goes through `Service.remove_instance` (no new requests; in-flight ones finish).
Static and self-registered instances of the same service are never touched.

Serve-stale: a lookup that fails (timeout, SERVFAIL, no nameserver, or an answer without a
single address) changes nothing and the last good answer keeps serving. The first failure of an
outage is recorded once as a WARNING event, the recovery as an INFO event; retries back off from
min_ttl, doubling, to at most max_ttl (and at most `RETRY_CEILING` apart unless min_ttl is
larger, so a recovery is noticed soon). An *empty* answer (NXDOMAIN, no records) counts as a
failure on purpose: emptying a service because a zone was briefly wrong turns a DNS glitch into
an outage, while health checks eject dead addresses anyway. A lookup is all-or-nothing: if the A
query answers and the AAAA query times out, nothing changes until both answer.

SRV: only the targets of the lowest priority value are used (higher values are backups in RFC
2782; the balancer has no notion of tiers). Weight 0 becomes 1 and weights above 1000 are scaled
down proportionally, since an `Instance` weight of 0 means "no traffic" and the config caps 1000.

Resolver: dnspython's asyncio resolver (`dns.asyncresolver.Resolver`) with no cache — every
lookup asks the server, whose TTL we then follow. Nameservers come from the `nameservers`
argument, else `APIGATE_DNS_NAMESERVER=host[:port][,host[:port]...]`, else the system
configuration (/etc/resolv.conf; note that /etc/hosts is not consulted).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from apigate.registry.events import EVENTS

if TYPE_CHECKING:
    from apigate.config.schema import DiscoveryConfig, ServiceConfig
    from apigate.registry.service import Service
    from apigate.runtime import Runtime
    from apigate.server import Gateway

__all__ = [
    "NAMESERVER_ENV",
    "DnsDiscovery",
    "DnsLookupError",
    "DnsManager",
    "DnsPythonResolver",
    "Endpoint",
    "Resolution",
    "Resolver",
    "attach_dns",
    "clamp_ttl",
    "dns_manager",
    "nameservers_from_env",
    "parse_nameservers",
    "retry_delay",
]

log = logging.getLogger("apigate.dns")

NAMESERVER_ENV = "APIGATE_DNS_NAMESERVER"
MIN_INTERVAL = 0.1  # never re-resolve more than 10 times a second, whatever TTL 0 says
RETRY_CEILING = 30.0  # a failing lookup is retried at least this often (unless min_ttl is more)
STARTUP_WAIT = 2.0  # on start, wait this long at most for the first answers
MAX_WEIGHT = 1000  # TargetConfig.weight's upper bound


# --- what a lookup returns ------------------------------------------------------------------


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One address the name resolves to."""

    host: str
    port: int
    weight: int = 1

    @property
    def instance_id(self) -> str:
        return f"dns:{_host_port(self.host, self.port)}"


@dataclass(frozen=True, slots=True)
class Resolution:
    """A good answer: its endpoints (sorted, never empty) and its TTL in seconds."""

    endpoints: tuple[Endpoint, ...]
    ttl: float


class DnsLookupError(Exception):
    """A lookup that gave no usable answer; `reason` is short and human ("timeout")."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Resolver(Protocol):
    """What `DnsDiscovery` needs: tests pass a fake, production uses `DnsPythonResolver`."""

    async def lookup(self, config: DiscoveryConfig) -> Resolution: ...


# --- timing ---------------------------------------------------------------------------------


def clamp_ttl(ttl: float, config: DiscoveryConfig) -> float:
    """Seconds until the next lookup after a good answer with `ttl`."""
    return max(MIN_INTERVAL, min(max(ttl, config.min_ttl), config.max_ttl))


def retry_delay(failures: int, config: DiscoveryConfig) -> float:
    """Seconds until the next lookup after `failures` (>= 1) consecutive failed ones."""
    base = max(config.min_ttl, MIN_INTERVAL)
    backoff: float = base * 2.0 ** min(failures - 1, 30)
    ceiling = max(RETRY_CEILING, config.min_ttl)
    return max(MIN_INTERVAL, min(backoff, ceiling, config.max_ttl))


# --- nameservers ----------------------------------------------------------------------------


def parse_nameservers(text: str) -> list[tuple[str, int]]:
    """`127.0.0.1:5353,[::1]:53,10.0.0.2` -> [(host, port), ...]; ValueError if malformed."""
    servers: list[tuple[str, int]] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, port = item, 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest:
                if not rest.startswith(":") or not rest[1:].isdigit():
                    raise ValueError(f"invalid nameserver {item!r}: use host:port or [v6]:port")
                port = int(rest[1:])
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
            if not port_text.isdigit():
                raise ValueError(f"invalid nameserver {item!r}: bad port")
            port = int(port_text)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"invalid nameserver {item!r}: use an IP address") from None
        if not 0 < port < 65536:
            raise ValueError(f"invalid nameserver {item!r}: bad port")
        servers.append((host, port))
    return servers


def nameservers_from_env(environ: Mapping[str, str] | None = None) -> list[tuple[str, int]] | None:
    """The nameservers of `APIGATE_DNS_NAMESERVER`, or None (system resolver) when unset."""
    text = (os.environ if environ is None else environ).get(NAMESERVER_ENV, "").strip()
    if not text:
        return None
    try:
        return parse_nameservers(text)
    except ValueError as exc:
        raise ValueError(f"{NAMESERVER_ENV}: {exc}") from None


# --- the dnspython resolver -----------------------------------------------------------------


def srv_weights(weights: Sequence[int]) -> list[int]:
    """SRV weights (0..65535) as instance weights (1..1000), keeping their proportions."""
    top = max(weights, default=0)
    if top <= MAX_WEIGHT:
        return [max(w, 1) for w in weights]
    return [max(1, round(w * MAX_WEIGHT / top)) for w in weights]


class DnsPythonResolver:
    """Looks up A+AAAA or SRV with dnspython's asyncio resolver; no cache, a bounded wait."""

    def __init__(
        self, nameservers: Sequence[tuple[str, int]] | None = None, *, timeout: float = 2.0
    ) -> None:
        self.nameservers = list(nameservers) if nameservers else None
        self.timeout = timeout
        self._resolver: dns.asyncresolver.Resolver | None = None

    def _get(self) -> dns.asyncresolver.Resolver:
        if self._resolver is None:
            if self.nameservers is None:
                resolver = dns.asyncresolver.Resolver()  # reads /etc/resolv.conf
            else:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(host, port) for host, port in self.nameservers
                ]
            resolver.cache = None
            resolver.timeout = resolver.lifetime = self.timeout
            self._resolver = resolver
        return self._resolver

    async def lookup(self, config: DiscoveryConfig) -> Resolution:
        try:
            if config.srv:
                endpoints, ttl = await self._srv(config.dns)
            else:
                endpoints, ttl = await self._addresses(config.dns, config.port)
        except dns.exception.Timeout:
            raise DnsLookupError("timeout") from None
        except dns.resolver.NoNameservers:
            raise DnsLookupError("no nameserver answered (SERVFAIL or refused)") from None
        except dns.exception.DNSException as exc:
            raise DnsLookupError(str(exc) or type(exc).__name__) from None
        except OSError as exc:
            raise DnsLookupError(exc.strerror or str(exc)) from None
        if not endpoints:
            kind = "SRV" if config.srv else "A/AAAA"
            raise DnsLookupError(f"no {kind} records (NXDOMAIN or empty answer)")
        return Resolution(tuple(sorted(endpoints, key=_sort_key)), ttl)

    async def _query(self, name: str, rdtype: str) -> tuple[list[Any], float]:
        """Records of one type (empty for NXDOMAIN/NODATA) and their remaining TTL."""
        try:
            answer = await self._get().resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN:
            return [], float("inf")
        if answer.rrset is None:
            return [], float("inf")
        # `expiration` accounts for every record of a CNAME chain, not just the last one.
        return list(answer.rrset), max(0.0, answer.expiration - time.time())

    async def _addresses(
        self, name: str, port: int, weight: int = 1
    ) -> tuple[list[Endpoint], float]:
        results = await asyncio.gather(
            self._query(name, "A"), self._query(name, "AAAA"), return_exceptions=True
        )
        endpoints: list[Endpoint] = []
        ttl = float("inf")
        for result in results:
            if isinstance(result, BaseException):
                raise result
            records, record_ttl = result
            endpoints += [Endpoint(r.address, port, weight) for r in records]
            ttl = min(ttl, record_ttl)
        return endpoints, ttl

    async def _srv(self, name: str) -> tuple[list[Endpoint], float]:
        records, ttl = await self._query(name, "SRV")
        records = [r for r in records if str(r.target) != "."]  # "." = no such service
        if not records:
            return [], ttl
        best = min(r.priority for r in records)
        chosen = [r for r in records if r.priority == best]
        weights = srv_weights([r.weight for r in chosen])
        lookups = [
            self._target(r.target.to_text(omit_final_dot=True), r.port, w)
            for r, w in zip(chosen, weights, strict=True)
        ]
        merged: dict[tuple[str, int], Endpoint] = {}
        for result in await asyncio.gather(*lookups, return_exceptions=True):
            if isinstance(result, BaseException):
                raise result
            endpoints, target_ttl = result
            ttl = min(ttl, target_ttl)
            for ep in endpoints:
                seen = merged.get((ep.host, ep.port))
                weight = ep.weight + (seen.weight if seen else 0)
                merged[(ep.host, ep.port)] = Endpoint(ep.host, ep.port, min(weight, MAX_WEIGHT))
        return list(merged.values()), ttl

    async def _target(self, target: str, port: int, weight: int) -> tuple[list[Endpoint], float]:
        try:
            ipaddress.ip_address(target)
        except ValueError:
            return await self._addresses(target, port, weight)
        return [Endpoint(target, port, weight)], float("inf")

    def __repr__(self) -> str:
        where = ",".join(_host_port(h, p) for h, p in self.nameservers or ()) or "system"
        return f"<DnsPythonResolver {where} timeout={self.timeout}s>"


def _sort_key(ep: Endpoint) -> tuple[int, bytes, int]:
    addr = ipaddress.ip_address(ep.host)
    return (addr.version, addr.packed, ep.port)


# --- one service ----------------------------------------------------------------------------


class DnsDiscovery:
    """Keeps one service's `origin="dns"` instances equal to what its name resolves to."""

    def __init__(self, service: Service, config: DiscoveryConfig, resolver: Resolver) -> None:
        self.service = service
        self.config = config
        self.resolver = resolver
        self.last_good: Resolution | None = None
        self.last_error: str | None = None
        self.failures = 0  # consecutive failed lookups (0: the last one worked)
        self.lookups = 0
        self.next_lookup_at: float | None = None  # loop time
        self.first_done = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        if self._task is None:
            name = f"dns:{self.service.name}"
            self._task = asyncio.get_running_loop().create_task(self.run(), name=name)

    def cancel(self, *, remove_instances: bool) -> asyncio.Task[None] | None:
        """Stop resolving (synchronously); optionally drain every DNS instance of the service."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        if remove_instances:
            removed = self.reconcile(())[1]
            if removed:
                EVENTS.record(
                    "dns",
                    f"{self.service.name}: discovery stopped, removed {len(removed)} DNS instances",
                    service=self.service.name,
                    dns_name=self.config.dns,
                    added=[],
                    removed=removed,
                )
        return task

    def reconfigure(self, config: DiscoveryConfig) -> None:
        """New discovery settings: look up again now if anything changed."""
        if config != self.config:
            self.config = config
            self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            self._wake.clear()
            delay = await self.resolve_once()
            self.first_done.set()
            self.next_lookup_at = loop.time() + delay
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    # ------------------------------------------------------------------ one lookup
    async def resolve_once(self) -> float:
        """Look up once, apply the answer (or keep the last one); return seconds to the next."""
        config = self.config
        self.lookups += 1
        try:
            result = await self.resolver.lookup(config)
        except DnsLookupError as exc:
            return self._failed(config, exc.reason)
        except Exception as exc:  # a resolver bug must not end discovery: serve stale, retry
            log.exception("DNS resolver error for %s", config.dns)
            return self._failed(config, f"{type(exc).__name__}: {exc}")
        if config is not self.config:  # reconfigured while we waited: this answer is stale
            return 0.0
        if not result.endpoints:
            return self._failed(config, "no addresses in the answer")
        return self._succeeded(config, result)

    def _failed(self, config: DiscoveryConfig, reason: str) -> float:
        self.failures += 1
        self.last_error = reason
        delay = retry_delay(self.failures, config)
        stale = sum(1 for i in self.service.instances.values() if i.origin == "dns")
        if self.failures == 1:
            EVENTS.record(
                "dns",
                f"{self.service.name}: DNS lookup of {config.dns} failed ({reason}); "
                f"serving the last {stale} known addresses, retrying in {delay:g}s",
                logging.WARNING,
                service=self.service.name,
                dns_name=config.dns,
                error=reason,
                stale=stale,
            )
        else:
            log.debug(
                "DNS lookup of %s failed again (%s), attempt %d, next in %gs",
                config.dns,
                reason,
                self.failures,
                delay,
            )
        return delay

    def _succeeded(self, config: DiscoveryConfig, result: Resolution) -> float:
        if self.failures:
            EVENTS.record(
                "dns",
                f"{self.service.name}: DNS lookup of {config.dns} works again "
                f"after {self.failures} failed attempts",
                service=self.service.name,
                dns_name=config.dns,
                failures=self.failures,
            )
        self.failures = 0
        self.last_error = None
        self.last_good = result
        added, removed = self.reconcile(result.endpoints)
        if added or removed:
            EVENTS.record(
                "dns",
                f"{self.service.name}: {config.dns} resolves to {len(result.endpoints)} "
                f"addresses (+{len(added)} -{len(removed)})",
                service=self.service.name,
                dns_name=config.dns,
                added=added,
                removed=removed,
                ttl=result.ttl,
            )
        return clamp_ttl(result.ttl, config)

    def reconcile(self, endpoints: Sequence[Endpoint]) -> tuple[list[str], list[str]]:
        """Make the service's DNS instances equal `endpoints`; return (added, removed) ids."""
        service = self.service
        scheme = service.config.scheme
        wanted = {ep.instance_id: ep for ep in endpoints}
        removed = [
            iid
            for iid, inst in service.instances.items()
            if inst.origin == "dns" and iid not in wanted
        ]
        for iid in removed:
            service.remove_instance(iid)
        added: list[str] = []
        reweighed = False
        for iid, ep in wanted.items():
            inst = service.instances.get(iid)
            if inst is not None and inst.origin != "dns":
                continue  # someone registered this id by hand: theirs wins
            if inst is None or inst.scheme != scheme:
                service.add_instance(
                    iid,
                    f"{scheme}://{_host_port(ep.host, ep.port)}",
                    ep.host,
                    ep.port,
                    weight=ep.weight,
                    origin="dns",
                    scheme=scheme,
                    metadata={"dns": self.config.dns},
                )
                added.append(iid)
            elif inst.weight != ep.weight:
                inst.weight = ep.weight
                reweighed = True
        if reweighed:
            service.refresh()
        return added, removed

    def status(self) -> dict[str, Any]:
        loop_now = asyncio.get_running_loop().time()
        good = self.last_good
        return {
            "dns": self.config.dns,
            "srv": self.config.srv,
            "addresses": [ep.instance_id.removeprefix("dns:") for ep in good.endpoints]
            if good
            else [],
            "ttl": good.ttl if good else None,
            "failures": self.failures,
            "last_error": self.last_error,
            "next_lookup_in": max(0.0, self.next_lookup_at - loop_now)
            if self.next_lookup_at is not None
            else None,
        }

    def __repr__(self) -> str:
        count = len(self.last_good.endpoints) if self.last_good else 0
        state = f"failing x{self.failures}" if self.failures else "ok"
        return f"<DnsDiscovery {self.service.name} {self.config.dns} {count} addresses {state}>"


# --- every service of a gateway -------------------------------------------------------------


class DnsManager:
    """One `DnsDiscovery` per service whose current config has `discovery:`."""

    def __init__(self, resolver: Resolver) -> None:
        self.resolver = resolver
        self.discoveries: dict[str, DnsDiscovery] = {}
        self.running = False
        self._stopping: set[asyncio.Task[None]] = set()

    def sync(self, configs: Mapping[str, ServiceConfig], services: Mapping[str, Service]) -> None:
        """Start, reconfigure or stop discoveries to match `configs` (synchronous)."""
        self._stop_unwanted(configs, services)
        for name, config in configs.items():
            service = services.get(name)
            if config.discovery is None or service is None:
                continue
            found = self.discoveries.get(name)
            if found is None:
                started = DnsDiscovery(service, config.discovery, self.resolver)
                self.discoveries[name] = started
                started.start()
            else:
                found.reconfigure(config.discovery)

    def _stop_unwanted(
        self, configs: Mapping[str, ServiceConfig], services: Mapping[str, Service]
    ) -> None:
        for name, disc in list(self.discoveries.items()):
            config = configs.get(name)
            service = services.get(name)
            if config is None or config.discovery is None or service is not disc.service:
                del self.discoveries[name]
                # drain its DNS instances unless the service object itself is gone or replaced
                self._forget(disc.cancel(remove_instances=service is disc.service))

    def _forget(self, task: asyncio.Task[None] | None) -> None:
        if task is not None:
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def wait_first_answers(self, timeout: float = STARTUP_WAIT) -> None:
        waits = [disc.first_done.wait() for disc in self.discoveries.values()]
        if waits:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout)

    async def close(self) -> None:
        """Stop every discovery; DNS instances stay (the gateway is going away)."""
        self.running = False
        for disc in self.discoveries.values():
            self._forget(disc.cancel(remove_instances=False))
        self.discoveries.clear()
        tasks = list(self._stopping)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)

    def status(self) -> dict[str, dict[str, Any]]:
        """Per service: name, addresses, TTL, failures — for the admin API."""
        return {name: disc.status() for name, disc in self.discoveries.items()}

    def __repr__(self) -> str:
        failing = sum(1 for d in self.discoveries.values() if d.failures)
        return f"<DnsManager {len(self.discoveries)} services, {failing} failing {self.resolver!r}>"


_MANAGERS: weakref.WeakKeyDictionary[Gateway, DnsManager] = weakref.WeakKeyDictionary()


def dns_manager(gateway: Gateway) -> DnsManager | None:
    """The `DnsManager` that `attach_dns` gave `gateway`, for the admin API."""
    return _MANAGERS.get(gateway)


async def attach_dns(
    gateway: Gateway,
    *,
    resolver: Resolver | None = None,
    nameservers: Sequence[tuple[str, int]] | None = None,
    timeout: float = 2.0,
) -> None:
    """Resolve every `discovery:` service of `gateway` in the background while it runs.

    Starts on the gateway's start (waiting up to `STARTUP_WAIT` for the first answers), follows
    reloads (services with discovery added, changed or removed), stops on shutdown.
    Raises ValueError when `APIGATE_DNS_NAMESERVER` is malformed. Attaching twice is a no-op.
    """
    if gateway in _MANAGERS:
        return
    if resolver is None:
        resolver = DnsPythonResolver(nameservers or nameservers_from_env(), timeout=timeout)
    manager = DnsManager(resolver)
    _MANAGERS[gateway] = manager

    async def on_start(gw: Gateway) -> None:
        manager.running = True
        manager.sync(gw.config.services, gw.services.services)
        await manager.wait_first_answers()

    async def on_stop(gw: Gateway) -> None:
        await manager.close()

    def on_runtime(runtime: Runtime) -> None:
        if manager.running:
            manager.sync(runtime.config.services, gateway.services.services)

    gateway.on_start.append(on_start)
    gateway.on_stop.append(on_stop)
    gateway.on_runtime.append(on_runtime)
