"""Upstream host names, resolved off the request path: a cache with one lookup per name at a time.

Theory of operation
-------------------
A target given by name (`http://users.internal:8080`) used to be looked up by
`loop.create_connection` on every new upstream connection: no cache, and each lookup holds one of
the 4 threads of libuv's pool for as long as the resolver takes. A slow or dead name then filled
that pool, and every other service addressed by name timed out behind it (nginx resolves at load
time, or through `resolver` with a TTL; Envoy in the background; neither on the request path).

Here `Pool.connect` asks `Resolver.resolve(host, port)` and connects to the address it gets
(TLS still checks and sends, as SNI, the name; the Host header stays the name too). Per
(host, port) there is one `_Entry`, in one of these states:

- fresh (younger than `ttl`): its addresses are returned at once, no await;
- stale (older than `ttl`, with addresses): they are still returned at once, and a refresh
  starts in the background if none runs (stale-while-revalidate): a slow resolver never stalls
  the requests of a name that resolved before. A refresh that fails keeps the old addresses
  (as DNS discovery keeps its last good answer) and is retried after `negative_ttl`;
- failed (no addresses, younger than `negative_ttl`): an `OSError` at once, so a dead name costs
  one lookup every few seconds, not one per request;
- resolving (no addresses, or a failure that aged out): the connects wait for the lookup in
  flight, all of them for the same one (coalesced), each at most its own connect timeout.

A waiter that gives up (its timeout, or its request cancelled) never cancels the lookup: it waits
with `asyncio.wait`, which leaves the lookup running, and the lookup fills the cache for whoever
comes next. The lookup task catches everything its lookup raises and keeps it in the entry, so no
future is ever left with an exception nobody retrieved (uvloop's create_connection cut during its
own getaddrinfo logs "Future exception was never retrieved", MagicStack/uvloop#437).

A failure is logged once per outage of a name (a WARNING event), its recovery once (INFO).
Entries exist only for names that pools connected to, and `PoolManager.retire` drops those no
remaining pool uses, so the cache is bounded by the configured and registered upstreams.

IP literals never get here: a pool whose host is an address connects as before (`is_ip_address`
is checked once, when the pool is made), so the benchmarks' 127.0.0.1 path is unchanged.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

from apigate.registry.events import EVENTS

__all__ = ["NEGATIVE_TTL", "TTL", "Address", "Lookup", "Resolver", "is_ip_address"]

log = logging.getLogger("apigate.upstream.dns")

TTL: Final = 30.0  # seconds an answer is used before a background refresh
NEGATIVE_TTL: Final = 3.0  # seconds a failure is answered from the cache
# Past this many names, expired ones are dropped when a new one comes: pools forget their names
# when retired, but a name only probed by the health checks (an instance never picked) has no
# pool, and registration churn with a new name per pod would grow the cache for ever.
MAX_NAMES: Final = 1024

Address = tuple[int, str]  # (address family, IP address as text), as create_connection takes it
AddrInfo = tuple[Any, ...]  # (family, type, proto, canonname, sockaddr), as getaddrinfo gives
Lookup = Callable[[str, int], Awaitable[Sequence[AddrInfo]]]


def is_ip_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Entry:
    """What is known about one (host, port); see the module docstring for its states."""

    __slots__ = ("addresses", "errno", "expires", "failing", "host", "pending", "port", "reason")

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.addresses: list[Address] = []  # best first; empty until a lookup succeeded
        self.expires = 0.0  # loop time after which the answer (or failure) is refreshed
        self.errno: int | None = None  # the last failure, if the last lookup failed
        self.reason = "lookup was cancelled"
        self.pending: asyncio.Task[None] | None = None  # the lookup in flight
        self.failing = False  # in an outage (logged once, when it began)

    def failure(self) -> OSError:
        """A new exception each time: one shared instance raised again and again by every
        request would grow its traceback with each raise."""
        message = f"cannot resolve {self.host}: {self.reason}"
        if self.errno is None:
            return OSError(message)
        return socket.gaierror(self.errno, message)


class Resolver:
    """The upstream name cache of a process (one per `PoolManager`).

    `lookup(host, port)` does the actual resolution; `loop.getaddrinfo` by default, which
    consults /etc/hosts and the system resolver as create_connection did. Tests inject theirs.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        *,
        ttl: float = TTL,
        negative_ttl: float = NEGATIVE_TTL,
        lookup: Lookup | None = None,
    ) -> None:
        self.loop = loop
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.lookup: Lookup = lookup if lookup is not None else self._getaddrinfo
        self.entries: dict[tuple[str, int], _Entry] = {}
        self.lookups = 0  # lookups started (coalesced connects share one)
        self.closed = False

    async def _getaddrinfo(self, host: str, port: int) -> Sequence[AddrInfo]:
        return await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)

    async def resolve(self, host: str, port: int, timeout: float) -> list[Address]:
        """The addresses to connect to for (host, port), best first; waits (at most `timeout`,
        then `TimeoutError`) only when nothing usable is cached. `OSError` if the name does not
        resolve."""
        entry = self.entries.get((host, port))
        if entry is not None and self.loop.time() < entry.expires:
            if entry.addresses:
                return entry.addresses
            raise entry.failure()
        if self.closed:
            raise OSError(f"cannot resolve {host}: the gateway is shutting down")
        if entry is None:
            if len(self.entries) >= MAX_NAMES:
                self._drop_expired()
            entry = self.entries[(host, port)] = _Entry(host, port)
        pending = entry.pending
        if pending is None:
            pending = self._start(entry)
        if entry.addresses:  # stale: keeps serving while the refresh runs
            return entry.addresses
        # asyncio.wait, unlike wait_for, leaves the lookup running when this waiter times out
        # or is cancelled: the next connect gets its answer
        done, _ = await asyncio.wait((pending,), timeout=timeout)
        if not done:
            raise TimeoutError(f"resolving {host} took longer than {timeout:g}s")
        if entry.addresses:
            return entry.addresses
        raise entry.failure()

    def prefer(self, host: str, port: int, address: Address) -> None:
        """`address` took a connection after the ones before it failed: try it first from now
        on (a new list: connects iterating over the old one are not disturbed)."""
        entry = self.entries.get((host, port))
        if entry is not None and address in entry.addresses:
            entry.addresses = [address, *(a for a in entry.addresses if a != address)]

    def _drop_expired(self) -> None:
        now = self.loop.time()
        for key in [k for k, e in self.entries.items() if e.expires <= now and e.pending is None]:
            del self.entries[key]

    def forget(self, host: str, port: int) -> None:
        """No pool connects to (host, port) any more. A lookup in flight finishes into the
        dropped entry, harmlessly."""
        self.entries.pop((host, port), None)

    def close(self) -> None:
        """Shutting down: stop the lookups in flight (a lookup already running in a thread
        still runs to its end) and start no more."""
        self.closed = True
        for entry in self.entries.values():
            if entry.pending is not None:
                entry.pending.cancel()
        self.entries.clear()

    # ------------------------------------------------------------------ the lookup task
    def _start(self, entry: _Entry) -> asyncio.Task[None]:
        self.lookups += 1
        task = self.loop.create_task(self._run(entry))
        entry.pending = task
        return task

    async def _run(self, entry: _Entry) -> None:
        """Never raises (but CancelledError): the outcome goes into the entry."""
        try:
            infos = await self.lookup(entry.host, entry.port)
            addresses = _addresses(infos)
        except Exception as exc:  # gaierror, UnicodeError for a bad name, a broken lookup
            self._failed(entry, exc)
        else:
            if addresses:
                self._succeeded(entry, addresses)
            else:
                self._failed(entry, socket.gaierror(socket.EAI_NONAME, "no IPv4/IPv6 address"))
        finally:
            entry.pending = None

    def _succeeded(self, entry: _Entry, addresses: list[Address]) -> None:
        best = entry.addresses[0] if entry.addresses else None
        if best is not None and best in addresses and addresses[0] != best:
            # the address that took the last connections stays first (see `prefer`)
            addresses = [best, *(a for a in addresses if a != best)]
        entry.addresses = addresses
        entry.errno = None
        entry.expires = self.loop.time() + self.ttl
        if entry.failing:
            entry.failing = False
            EVENTS.record(
                "upstream_dns",
                f"upstream name {entry.host} resolves again",
                host=entry.host,
                port=entry.port,
                addresses=[a[1] for a in addresses],
            )

    def _failed(self, entry: _Entry, exc: Exception) -> None:
        entry.errno = exc.errno if isinstance(exc, OSError) else None
        strerror = exc.strerror if isinstance(exc, OSError) else None
        entry.reason = strerror or str(exc) or type(exc).__name__
        entry.expires = self.loop.time() + self.negative_ttl
        if not entry.failing:
            entry.failing = True
            if entry.addresses:
                serving = f"connecting to the last known {len(entry.addresses)} addresses"
            else:
                serving = "its connects fail"
            EVENTS.record(
                "upstream_dns",
                f"upstream name {entry.host} does not resolve ({entry.reason}): {serving}, "
                f"retrying every {self.negative_ttl:g}s",
                logging.WARNING,
                host=entry.host,
                port=entry.port,
                error=entry.reason,
            )
        else:
            log.debug("upstream name %s still does not resolve: %s", entry.host, entry.reason)

    def __repr__(self) -> str:
        pending = sum(1 for e in self.entries.values() if e.pending is not None)
        return f"<Resolver {len(self.entries)} names, {pending} resolving>"


def _addresses(infos: Sequence[AddrInfo]) -> list[Address]:
    """getaddrinfo's answer as (family, address) pairs, in its order, each once."""
    out: list[Address] = []
    for info in infos:
        family, sockaddr = info[0], info[4]
        if family in (socket.AF_INET, socket.AF_INET6):
            address = (int(family), str(sockaddr[0]))
            if address not in out:
                out.append(address)
    return out
