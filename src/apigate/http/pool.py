"""Keep-alive connection pools, one per service instance (as Envoy keeps one per host of a
cluster): a service's `max_connections` bounds its own connections to each instance, whatever
other services point at the same address, and an instance that leaves takes its pool along.

As in httpcore, the pool decides synchronously (take an idle connection, or reserve a slot for a
new one) and only then does I/O. Idle connections are reused most-recent-first so that the rest
age out under light load; each parked connection closes itself after `idle_timeout`.

With every slot busy (`max_connections`), up to `max_pending` requests wait for a connection to
come back (FIFO, at most the connect timeout); beyond that the pool refuses at once (503), so
there is never an unbounded queue.

A target given by name is resolved through the process's `Resolver` (cached, one lookup per name
at a time, never on the request path once resolved: see apigate.http.resolver) and connected to
by address; TLS checks the name. A target given by address connects as it always did.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import deque
from collections.abc import Awaitable, Callable

from apigate.http.output import WriteBatch
from apigate.http.resolver import Address, Resolver, is_ip_address
from apigate.http.upstream import UpstreamConnection


class PoolFull(Exception):
    """Every connection slot of the endpoint is busy."""


class Pool:
    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        host: str,
        port: int,
        *,
        scheme: str = "http",
        max_connections: int = 1024,
        max_pending: int = 0,
        max_idle: int = 256,
        idle_timeout: float = 60.0,
        service: str = "",
        instance: str = "",
        resolver: Resolver | None = None,
        writes: WriteBatch | None = None,
    ) -> None:
        self.loop = loop
        # where the connections' writes wait for the end of the loop's batch of events: the
        # client connections' (the server's), so that both sides go out together
        self.writes = writes if writes is not None else WriteBatch(loop)
        self.service = service  # whose pool this is (metrics labels)
        self.instance = instance
        self.host = host
        self.port = port
        self.scheme = scheme
        self.key = f"{scheme}://{host}:{port}"
        self.max_connections = max_connections
        self.max_pending = max_pending
        # requests waiting for a connection: a future gets a returned connection, or None
        # when a slot freed up; that slot stays counted in `total`, reserved for the waiter
        # (which opens a connection in it), so that a request arriving meanwhile cannot take it
        self.waiters: deque[asyncio.Future[UpstreamConnection | None]] = deque()
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # a list, not a deque: only its end is used (LIFO keeps the warmest connection busy),
        # and compiled, list pop/append are native where deque methods are generic calls
        self.idle: list[UpstreamConnection] = []
        self.total = 0  # open + connecting
        self.created = 0
        self.reused = 0
        self.closed = False
        default_port = 443 if scheme == "https" else 80
        host_part = f"[{host}]" if ":" in host else host
        self.host_header = (host_part if port == default_port else f"{host_part}:{port}").encode()
        self._ssl: ssl.SSLContext | None = None
        if scheme == "https":
            self._ssl = ssl.create_default_context()
        # None for an IP address (decided once, here): its connects skip the resolver entirely
        self.resolver: Resolver | None = None
        if not is_ip_address(host):
            self.resolver = resolver if resolver is not None else Resolver(loop)

    def acquire_idle(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if not conn.closed:
                self.reused += 1
                return conn
        return None

    async def connect(self, timeout: float) -> UpstreamConnection:
        """A connection for one exchange: a new one, or (when every slot is busy) one handed
        over by `release` after waiting in the bounded queue."""
        if self.total >= self.max_connections:
            # The exchange looked for an idle connection before it started this (in a task):
            # one parked since, while nobody waited, is not handed over by anyone.
            parked = self.acquire_idle()
            if parked is not None:
                return parked
            handed = await self._wait_for_slot(timeout)
            if handed is not None:
                return handed
        else:
            self.total += 1
        made: list[UpstreamConnection] = []

        def make() -> UpstreamConnection:
            conn = UpstreamConnection(self)
            made.append(conn)
            return conn

        try:
            if self.resolver is None:
                _, proto = await asyncio.wait_for(
                    self.loop.create_connection(
                        make,
                        self.host,
                        self.port,
                        ssl=self._ssl,
                        server_hostname=self.host if self._ssl else None,
                    ),
                    timeout,
                )
            else:
                proto = await self._connect_by_name(self.resolver, timeout, make)
        except BaseException:
            self._give_up_slot(made)
            raise
        self.created += 1
        return proto

    def _give_up_slot(self, made: list[UpstreamConnection]) -> None:
        """A connect failed, timed out or was cancelled (its client left). A connection the
        loop made meanwhile owns the slot from `connection_made` on, and frees it through
        `forget` when it is lost, once (freeing it here as well uncounted a slot twice, and
        the pool let one more connection open than `max_connections` from then on).

        It is lost here and now: uvloop, cancelled after `connection_made` and before the
        connecting task resumed, closes the transport itself and never calls
        `connection_lost`, so the slot stayed taken; clients resetting in bursts used up
        `max_connections` for good. (asyncio's loop calls it later: a no-op then.)"""
        for conn in made:
            if conn.transport is not None:
                conn.abort()
                conn.connection_lost(None)
                return
        self._free_slot()

    async def _connect_by_name(
        self, resolver: Resolver, timeout: float, make: Callable[[], UpstreamConnection]
    ) -> UpstreamConnection:
        """Resolve (from the cache, usually without waiting) and connect to the first address
        that takes the connection, all within `timeout`; TLS checks the name, not the address."""
        loop = self.loop
        deadline = loop.time() + timeout
        addresses = await resolver.resolve(self.host, self.port, timeout)
        error: OSError | None = None
        for address in addresses:
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"connect to {self.host}:{self.port} timed out")
            try:
                _, proto = await asyncio.wait_for(self._open(address, make), left)
            except OSError as exc:  # refused, unreachable (a TimeoutError ends the loop above)
                error = exc
                continue
            if address != addresses[0]:
                resolver.prefer(self.host, self.port, address)
            return proto
        assert error is not None  # resolve() returns at least one address
        raise error

    def _open(
        self, address: Address, make: Callable[[], UpstreamConnection]
    ) -> Awaitable[tuple[asyncio.BaseTransport, UpstreamConnection]]:
        family, ip = address
        return self.loop.create_connection(
            make,
            ip,
            self.port,
            family=family,
            ssl=self._ssl,
            server_hostname=self.host if self._ssl else None,
        )

    async def _wait_for_slot(self, timeout: float) -> UpstreamConnection | None:
        if len(self.waiters) >= self.max_pending:
            raise PoolFull(f"{self.key}: all {self.max_connections} connections busy")
        waiter: asyncio.Future[UpstreamConnection | None] = self.loop.create_future()
        self.waiters.append(waiter)
        try:
            handed = await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            self._pass_on(waiter)
            raise PoolFull(f"{self.key}: no connection free within {timeout:g}s") from None
        except asyncio.CancelledError:
            self._pass_on(waiter)
            raise
        finally:
            with contextlib.suppress(ValueError):
                self.waiters.remove(waiter)
        return handed

    def _pass_on(self, waiter: asyncio.Future[UpstreamConnection | None]) -> None:
        """A waiter timed out or was cancelled just as a connection (or a freed slot) was
        handed to it: on Python 3.12+ wait_for lets the timeout or cancellation win, and the
        handed value was lost, a connection open and counted that nobody would use or close
        (or a slot reserved for nobody). Give it to the next waiter, or back to the pool."""
        if waiter.done() and not waiter.cancelled():
            given = waiter.result()
            if given is not None:
                self.release(given)
            else:
                self._free_slot()

    def _hand_over(self, conn: UpstreamConnection | None) -> bool:
        """Give `conn` (or a free slot) to the longest-waiting request; False if none waits."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return True
        return False

    def release(self, conn: UpstreamConnection) -> None:
        """An exchange is done with `conn`: hand it to a waiting request, park it if it is
        clean, close it otherwise."""
        conn.detach()
        if not conn.reusable or conn.closed or self.closed:
            conn.close()
            return
        # the client may have paused our reading (backpressure) just as the response ended:
        # a parked connection must read again, or its next response hangs
        conn.resume_reading()
        if self.waiters and self._hand_over(conn):
            self.reused += 1
            return
        if len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.set_idle(self.idle_timeout)
        self.idle.append(conn)

    def forget(self, conn: UpstreamConnection) -> None:
        """Called once from `connection_lost`."""
        with contextlib.suppress(ValueError):  # it was busy, not parked
            self.idle.remove(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        """A connection slot is free: the first waiter gets it (and opens a connection in
        it), or it is uncounted."""
        if not (self.waiters and self._hand_over(None)):
            self.total -= 1

    def set_max_connections(self, max_connections: int) -> None:
        """A reload changed the limit: slots it adds go to the requests waiting first."""
        self.max_connections = max_connections
        while self.waiters and self.total < max_connections:
            self.total += 1
            if not self._hand_over(None):
                self.total -= 1
                break

    def close(self) -> None:
        """Close the idle connections now; busy ones close when their exchange releases them."""
        self.closed = True
        while self.idle:
            self.idle.pop().close()

    @property
    def reuse_ratio(self) -> float:
        uses = self.created + self.reused
        return self.reused / uses if uses else 0.0

    def __repr__(self) -> str:
        active = self.total - len(self.idle)
        return f"<Pool {self.key} {active} active, {len(self.idle)} idle>"


PoolKey = tuple[str, str, str, str, int]  # service, instance id, scheme, host, port


class PoolManager:
    """All pools of the process, shared across runtime snapshots so reloads keep connections.

    A pool belongs to one instance of one service; `retire` drops the pools of instances and
    services that left, so that registration churn does not accumulate pools. The pools share
    one `Resolver` for targets given by name, and a retired name leaves its cache with them."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        resolver: Resolver | None = None,
        writes: WriteBatch | None = None,
    ) -> None:
        self.loop = loop
        self.writes = writes if writes is not None else WriteBatch(loop)
        self.pools: dict[PoolKey, Pool] = {}
        self.resolver = resolver if resolver is not None else Resolver(loop)

    def get(
        self,
        service: str,
        instance_id: str,
        scheme: str,
        host: str,
        port: int,
        *,
        max_connections: int = 1024,
        max_pending: int = 0,
        idle_timeout: float = 60.0,
    ) -> Pool:
        key = (service, instance_id, scheme, host, port)
        pool = self.pools.get(key)
        if pool is None:
            pool = Pool(
                self.loop,
                host,
                port,
                scheme=scheme,
                max_connections=max_connections,
                max_pending=max_pending,
                idle_timeout=idle_timeout,
                service=service,
                instance=instance_id,
                resolver=self.resolver,
                writes=self.writes,
            )
            self.pools[key] = pool
        else:  # a reload may have changed the service's limits
            pool.set_max_connections(max_connections)
            pool.max_pending = max_pending
            pool.idle_timeout = idle_timeout
        return pool

    def retire(self, service: str, instance_id: str | None = None) -> int:
        """Close and forget the pools of `service` (of one instance when `instance_id` is
        given). Requests in flight finish on their connections. Returns how many pools."""
        keys = [
            key
            for key in self.pools
            if key[0] == service and (instance_id is None or key[1] == instance_id)
        ]
        names = set()
        for key in keys:
            pool = self.pools.pop(key)
            pool.close()
            if pool.resolver is not None:
                names.add((pool.host, pool.port))
        if names:  # unless another pool still connects to the name
            names.difference_update((p.host, p.port) for p in self.pools.values())
            for host, port in names:
                self.resolver.forget(host, port)
        return len(keys)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.close()
        self.resolver.close()

    def __repr__(self) -> str:
        return f"<PoolManager {len(self.pools)} pools>"
