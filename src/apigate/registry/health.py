"""Active health checks: probe every instance over HTTP and keep failing ones out of rotation.

Theory of operation
-------------------
For each instance of each service whose config has `health.active`, a background task sends
`GET <path>` over a fresh connection (`Connection: close`) and reads only the status line, all
within `timeout`. `path` is the instance's own, as written: a target's base path
(`http://h:1/api`) is where the service's API lives and is not put before it (Kong's
healthcheck `http_path` works the same); `apigate check` probes the same path. The first
probe waits a random jitter in [0, interval), later ones `interval` +- 10%, so a hundred
instances are not probed in lockstep. `unhealthy_after`
consecutive failures (a status outside `statuses`, a timeout, a refused or reset connection)
take the instance out (`Instance.healthy = False`); `healthy_after` consecutive successes bring
it back. Each transition refreshes the service's balancer and records a "health" event with the
reason ("HTTP 500", "timeout", "connection refused").

Which instances: the checker polls the service table every `poll_interval` (0.5 s) and also
syncs on every reload (`on_runtime`). Polling is what notices self-registered and DNS instances,
which appear without a reload; a scan is a dict walk per service (~1 us per instance). New
instances start healthy (a registration receives traffic at once) and are probed from their
first jitter; removed ones stop being probed. Only the address of an instance the service
already has — from its config, a registration or DNS — is ever probed.

Active and passive together — both write `Instance.healthy`:
- Passive (`Service.report`): consecutive request failures eject a healthy instance for
  `eject_for`; its timer readmits it. Active checks do not shorten an ejection: a passing probe
  on a passively ejected instance changes nothing, the timer decides. At most
  `max_ejection_percent` of the instances that could serve (weight > 0, not held out by active
  checks) are out by passive ejection at once, and below 100% never the last of them; those
  held out by active checks do not count as ejected, as with Envoy's outlier detection.
- Active: an instance marked unhealthy by active checks stays out until `healthy_after` probes
  pass. Passive checks never eject it again (it is already out). If it had been ejected
  passively first, the passive timer may readmit it while active checks still fail; the checker
  puts it back out at its next poll tick or probe (within `poll_interval`). A hook in
  `Service._readmit` would close that window; until then it is bounded by 0.5 s.
- Turning `health.active` off (reload) readmits the instances it held out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import re
import ssl
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from apigate.http.resolver import is_ip_address

if TYPE_CHECKING:
    from apigate.balancing.base import Instance
    from apigate.config.schema import ActiveHealthConfig
    from apigate.http.resolver import Resolver
    from apigate.registry.service import Service
    from apigate.runtime import Runtime
    from apigate.server import Gateway

__all__ = [
    "ActiveHealthChecker",
    "ProbeResult",
    "ProbeState",
    "attach_health",
    "health_checker",
    "http_probe",
    "parse_status_line",
]

log = logging.getLogger("apigate.registry.health")  # under the registry: see events.py

POLL_INTERVAL = 0.5  # seconds between scans of the service table for new/removed instances
JITTER = 0.1  # every later probe waits interval * [1 - JITTER, 1 + JITTER)
MAX_STATUS_LINE = 8192

ProbeResult = tuple[bool, str]  # (healthy, reason): (True, "HTTP 200"), (False, "timeout")
Probe = Callable[["Instance", "ActiveHealthConfig"], Awaitable[ProbeResult]]

_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5]\d\d)(?: [^\r\n]*)?\r?\n")
_TLS: ssl.SSLContext | None = None


# --- one probe ------------------------------------------------------------------------------


def parse_status_line(line: bytes) -> int | None:
    """200 from b"HTTP/1.1 200 OK\\r\\n"; None when it is not an HTTP/1.x status line."""
    match = _STATUS_LINE.fullmatch(line)
    return int(match[1]) if match else None


def _tls_context() -> ssl.SSLContext:
    # The same trust as the data plane's upstream pool: the system's CAs, hostname checked.
    global _TLS
    if _TLS is None:
        _TLS = ssl.create_default_context()
    return _TLS


def _request(inst: Instance, path: str) -> bytes:
    host = f"[{inst.host}]" if ":" in inst.host else inst.host
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}:{inst.port}\r\nUser-Agent: apigate-health\r\n"
        "Accept: */*\r\nConnection: close\r\n\r\n"
    ).encode("latin-1")


async def http_probe(
    inst: Instance, config: ActiveHealthConfig, resolver: Resolver | None = None
) -> ProbeResult:
    """GET `config.path` on `inst`; (True, "HTTP 200") when the status is a healthy one.

    An instance given by name is looked up through `resolver`, the pools' cache, when there
    is one: a probe per instance and interval then costs no lookup, and a slow resolver no
    thread of libuv's four (which the data plane's connects need)."""
    tls = _tls_context() if inst.scheme == "https" else None
    try:
        async with asyncio.timeout(config.timeout):
            host, family = inst.host, 0
            if resolver is not None and not is_ip_address(host):
                family, host = (await resolver.resolve(host, inst.port, config.timeout))[0]
            reader, writer = await asyncio.open_connection(
                host,
                inst.port,
                family=family,
                ssl=tls,
                server_hostname=inst.host if tls else None,
                limit=MAX_STATUS_LINE,
            )
            try:
                writer.write(_request(inst, config.path))
                line = await reader.readline()
            finally:
                writer.close()
    except TimeoutError:
        return False, "timeout"
    except ConnectionRefusedError:
        return False, "connection refused"
    except ConnectionResetError:
        return False, "connection reset"
    except ssl.SSLError as exc:
        return False, f"TLS error: {exc.reason or exc}"
    except ValueError:  # the stream's limit: a status line longer than MAX_STATUS_LINE
        return False, "bad status line"
    except OSError as exc:
        return False, exc.strerror or type(exc).__name__
    if not line:
        return False, "connection closed without a response"
    code = parse_status_line(line)
    if code is None:
        return False, "bad status line"
    return config.is_healthy_status(code), f"HTTP {code}"


# --- per instance state ---------------------------------------------------------------------


@dataclass(eq=False)
class ProbeState:
    """The active-check view of one instance."""

    service: Service
    instance: Instance
    healthy: bool = True  # the active verdict; new instances start healthy
    successes: int = 0  # consecutive
    failures: int = 0  # consecutive
    last_check: float | None = None  # wall-clock time of the last finished probe
    last_error: str | None = None  # reason of the most recent failed probe
    task: asyncio.Task[None] | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "healthy": self.healthy,
            "last_check": self.last_check,
            "last_error": self.last_error,
            "successes": self.successes,
            "failures": self.failures,
        }


# --- the checker ----------------------------------------------------------------------------


class ActiveHealthChecker:
    """Probes every instance of every service with `health.active` while the gateway runs."""

    def __init__(
        self,
        services: Callable[[], Mapping[str, Service]],
        *,
        probe: Probe = http_probe,
        rng: random.Random | None = None,
        poll_interval: float = POLL_INTERVAL,
    ) -> None:
        self._services = services
        self._probe = probe
        self._rng = rng or random.Random()
        self.poll_interval = poll_interval
        self.states: dict[tuple[str, str], ProbeState] = {}
        self._poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ timing
    def first_delay(self, interval: float) -> float:
        """In [0, interval): spreads the first probes of instances that appear together."""
        return self._rng.random() * interval

    def next_delay(self, interval: float) -> float:
        """In [interval * 0.9, interval * 1.1)."""
        return interval * (1.0 - JITTER + 2 * JITTER * self._rng.random())

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.sync()
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll(), name="health")

    async def close(self) -> None:
        tasks = [st.task for st in self.states.values() if st.task is not None]
        if self._poller is not None:
            tasks.append(self._poller)
            self._poller = None
        for task in tasks:
            task.cancel()
        self.states.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            self.sync()

    def sync(self) -> None:
        """Probe every current instance of every actively checked service, and nothing else."""
        live: set[tuple[str, str]] = set()
        for name, service in self._services().items():
            if service.config.health.active is None:
                continue
            for iid, inst in service.instances.items():
                key = (name, iid)
                live.add(key)
                state = self.states.get(key)
                if state is not None and state.instance is inst and state.service is service:
                    self._hold_out(state)
                    continue
                if state is not None:
                    self._drop(state)
                self.states[key] = state = ProbeState(service, inst)
                state.task = asyncio.get_running_loop().create_task(
                    self._run(state), name=f"health:{name}/{iid}"
                )
        for key, state in list(self.states.items()):
            if key not in live:
                del self.states[key]
                self._drop(state)

    def _drop(self, state: ProbeState) -> None:
        if state.task is not None:
            state.task.cancel()
        service, inst = state.service, state.instance
        still_there = service.instances.get(inst.id) is inst
        if not state.healthy and still_there and not inst.healthy:
            # active checks were turned off: release what they held out
            inst.held_out = False
            service.set_health(
                inst,
                True,
                "readmitted: active checks off",
                check="active",
                reason="active checks disabled",
            )

    def _hold_out(self, state: ProbeState) -> None:
        """Undo a passive readmission of an instance that active checks still fail."""
        if not state.healthy and state.instance.healthy:
            state.instance.healthy = False
            state.service.refresh()
            log.debug(
                "%s/%s kept out: active checks still failing", state.service.name, state.instance.id
            )

    # ------------------------------------------------------------------ probing
    async def _run(self, state: ProbeState) -> None:
        active = state.service.config.health.active
        if active is None:
            return
        await asyncio.sleep(self.first_delay(active.interval))
        while True:
            active = state.service.config.health.active
            if active is None:  # turned off by a reload; the next sync cleans up
                return
            try:
                ok, reason = await self._probe(state.instance, active)
            except Exception as exc:  # a probe bug counts as a failure, never ends the loop
                log.exception("health probe of %s failed", state.instance.id)
                ok, reason = False, f"{type(exc).__name__}: {exc}"
            self.record(state, ok, reason)
            await asyncio.sleep(self.next_delay(active.interval))

    def record(self, state: ProbeState, ok: bool, reason: str) -> None:
        """Count one probe result; flip the instance at the thresholds."""
        active = state.service.config.health.active
        if active is None:
            return
        state.last_check = time.time()
        if ok:
            state.successes += 1
            state.failures = 0
            if not state.healthy and state.successes >= active.healthy_after:
                self._transition(state, True, reason)
            return
        state.failures += 1
        state.successes = 0
        state.last_error = reason
        if state.healthy and state.failures >= active.unhealthy_after:
            self._transition(state, False, reason)
        else:
            self._hold_out(state)

    def _transition(self, state: ProbeState, healthy: bool, reason: str) -> None:
        service, inst = state.service, state.instance
        state.healthy = healthy
        inst.held_out = not healthy
        if healthy:
            message = f"healthy after {state.successes} passing checks"
        else:
            message = f"unhealthy after {state.failures} failed checks ({reason})"
        service.set_health(inst, healthy, message, check="active", reason=reason)

    # ------------------------------------------------------------------ admin
    def status(self, service_name: str) -> dict[str, dict[str, Any]]:
        """instance id -> {healthy, last_check, last_error, successes, failures}."""
        return {
            iid: state.as_dict()
            for (name, iid), state in self.states.items()
            if name == service_name
        }

    def __repr__(self) -> str:
        down = sum(1 for st in self.states.values() if not st.healthy)
        return f"<ActiveHealthChecker {len(self.states)} probed, {down} unhealthy>"


_CHECKERS: weakref.WeakKeyDictionary[Gateway, ActiveHealthChecker] = weakref.WeakKeyDictionary()


def health_checker(gateway: Gateway) -> ActiveHealthChecker | None:
    """The checker that `attach_health` gave `gateway`, for the admin API (`status`)."""
    return _CHECKERS.get(gateway)


async def attach_health(
    gateway: Gateway,
    *,
    probe: Probe = http_probe,
    rng: random.Random | None = None,
    poll_interval: float = POLL_INTERVAL,
) -> None:
    """Run active health checks for `gateway`: start with it, follow reloads, stop with it.

    Attaching twice is a no-op.
    """
    if gateway in _CHECKERS:
        return
    if probe is http_probe:  # (tests bring their own)
        resolver = gateway.pools.resolver
        probe = functools.partial(http_probe, resolver=resolver)
    checker = ActiveHealthChecker(
        lambda: gateway.services.services, probe=probe, rng=rng, poll_interval=poll_interval
    )
    _CHECKERS[gateway] = checker
    running = False

    async def on_start(gw: Gateway) -> None:
        nonlocal running
        running = True
        checker.start()

    async def on_stop(gw: Gateway) -> None:
        nonlocal running
        running = False
        with contextlib.suppress(Exception):
            await checker.close()

    def on_runtime(runtime: Runtime) -> None:
        if running:
            checker.sync()

    gateway.on_start.append(on_start)
    gateway.on_stop.append(on_stop)
    gateway.on_runtime.append(on_runtime)
