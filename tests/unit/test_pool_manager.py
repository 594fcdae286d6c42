"""Connection pools per service instance: own limits, retired when the instance leaves; targets
given by name resolved through the shared, cached resolver (tests/unit/test_resolver.py has the
cache itself)."""

from __future__ import annotations

import asyncio
import errno
import gc
import ipaddress
import socket
from typing import Any

import pytest

from apigate.config.loader import parse_config
from apigate.config.schema import ServiceConfig
from apigate.http.pool import Pool, PoolFull, PoolManager
from apigate.http.upstream import UpstreamConnection
from apigate.registry.service import Service
from apigate.runtime import ServiceTable


class FakeTransport:
    def __init__(self) -> None:
        self.closed = False
        self.reading = True
        self.resumes = 0

    def pause_reading(self) -> None:
        self.reading = False

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def resume_reading(self) -> None:
        self.reading = True
        self.resumes += 1


def service(pools: PoolManager, name: str, *targets: str, **extra: Any) -> Service:
    cfg = ServiceConfig.model_validate({"targets": list(targets), **extra})
    return Service(name, cfg, pools)


def parked_connection(svc: Service, iid: str) -> tuple[UpstreamConnection, FakeTransport]:
    """An idle keep-alive connection in the pool of `iid`."""
    pool = svc.pool_for(svc.instances[iid])
    conn = UpstreamConnection(pool)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    pool.total += 1
    conn.reusable = True
    pool.release(conn)
    assert list(pool.idle) == [conn]
    return conn, transport


async def test_services_on_one_address_have_their_own_pools_and_limits() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    small = service(pools, "small", "http://10.0.0.1:80", max_connections=2)
    large = service(pools, "large", "http://10.0.0.1:80", max_connections=500)
    small_pool = small.pool_for(small.instances["10.0.0.1:80"])
    large_pool = large.pool_for(large.instances["10.0.0.1:80"])
    assert small_pool is not large_pool
    # the last service's limit used to win for both
    assert (small_pool.max_connections, large_pool.max_connections) == (2, 500)
    assert (small_pool.service, large_pool.service) == ("small", "large")


async def test_a_removed_instance_takes_its_pool_along() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    svc = service(pools, "svc")
    svc.add_instance("a", "http://10.0.0.1:80", "10.0.0.1", 80)
    svc.add_instance("b", "http://10.0.0.2:80", "10.0.0.2", 80)
    _, a_transport = parked_connection(svc, "a")
    _, b_transport = parked_connection(svc, "b")
    assert len(pools.pools) == 2

    svc.remove_instance("a")
    assert [key[1] for key in pools.pools] == ["b"]
    assert a_transport.closed and not b_transport.closed


async def test_registration_churn_does_not_accumulate_pools() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    svc = service(pools, "svc")
    for i in range(100):
        inst = svc.add_instance(f"i{i}", f"http://10.0.1.{i}:80", f"10.0.1.{i}", 80)
        svc.pool_for(inst)
        svc.remove_instance(f"i{i}")
    assert pools.pools == {}


async def test_a_busy_connection_of_a_retired_pool_closes_when_released() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    svc = service(pools, "svc")
    inst = svc.add_instance("a", "http://10.0.0.1:80", "10.0.0.1", 80)
    pool = svc.pool_for(inst)
    busy = UpstreamConnection(pool)
    transport = FakeTransport()
    busy.connection_made(transport)  # type: ignore[arg-type]
    pool.total += 1
    svc.remove_instance("a")
    assert not transport.closed  # the request in flight finishes on it
    busy.reusable = True
    pool.release(busy)
    assert transport.closed and not pool.idle


async def test_a_new_address_for_an_instance_id_retires_the_old_pool() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    svc = service(pools, "svc")
    svc.add_instance("a", "http://10.0.0.1:80", "10.0.0.1", 80)
    _, old = parked_connection(svc, "a")
    inst = svc.add_instance("a", "http://10.0.0.9:80", "10.0.0.9", 80)
    assert old.closed
    assert svc.pool_for(inst).host == "10.0.0.9"
    assert len(pools.pools) == 1


async def test_a_static_target_dropped_by_a_reload_takes_its_pool_along() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    svc = service(pools, "svc", "http://10.0.0.1:80", "http://10.0.0.2:80")
    _, gone = parked_connection(svc, "10.0.0.1:80")
    _, kept = parked_connection(svc, "10.0.0.2:80")
    svc.apply_config(ServiceConfig.model_validate({"targets": ["http://10.0.0.2:80"]}))
    assert gone.closed and not kept.closed
    assert [key[1] for key in pools.pools] == ["10.0.0.2:80"]


async def test_a_service_dropped_by_a_reload_takes_its_pools_along() -> None:
    pools = PoolManager(asyncio.get_running_loop())
    table = ServiceTable(pools)

    def config(*names: str) -> Any:
        return parse_config(
            {
                "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
                "services": {n: {"targets": ["http://10.0.0.1:80"]} for n in names},
                "routes": [{"name": "r", "match": {"paths": ["/"]}, "service": names[0]}],
            }
        )

    services = table.reconcile(config("keep", "drop"))
    _, dropped = parked_connection(services["drop"], "10.0.0.1:80")
    _, kept = parked_connection(services["keep"], "10.0.0.1:80")
    table.reconcile(config("keep"))
    assert dropped.closed and not kept.closed
    assert [key[0] for key in pools.pools] == ["keep"]


async def test_a_connection_paused_by_backpressure_reads_again_once_parked() -> None:
    """The client stopped reading as the response ended: the exchange paused the upstream's
    reading; parked like that, the connection's next response would hang. An unpaused one is
    parked without a call into its transport (the common case, once per request)."""
    pools = PoolManager(asyncio.get_running_loop())
    svc = service(pools, "svc", "http://10.0.0.1:80")
    conn, transport = parked_connection(svc, "10.0.0.1:80")
    assert transport.resumes == 0
    pool = svc.pool_for(svc.instances["10.0.0.1:80"])
    pool.idle.remove(conn)
    conn.pause_reading()
    assert not transport.reading
    conn.reusable = True
    pool.release(conn)
    assert transport.reading and transport.resumes == 1 and list(pool.idle) == [conn]


async def test_a_connection_handed_to_a_waiter_cancelled_meanwhile_is_not_lost() -> None:
    """Every slot busy; a request waits; a finishing exchange hands it a connection, and in
    the same loop iteration the waiting request is cancelled (its client left, its sibling
    part failed). The connection must end up with the request or back in the pool: never
    open and counted with nobody to use or close it. (Python 3.11's wait_for returns the
    handed value despite the cancellation; 3.12's let it be lost before the pool caught it.)"""
    pools = PoolManager(asyncio.get_running_loop())
    svc = service(pools, "svc", "http://10.0.0.1:80", max_connections=1, max_pending=1)
    conn, _ = parked_connection(svc, "10.0.0.1:80")
    pool = svc.pool_for(svc.instances["10.0.0.1:80"])
    assert pool.acquire_idle() is conn  # the one slot is busy
    waiting = asyncio.get_running_loop().create_task(pool.connect(5.0))
    await asyncio.sleep(0)
    assert len(pool.waiters) == 1
    conn.reusable = True
    pool.release(conn)  # handed to the waiter ...
    waiting.cancel()  # ... which is cancelled before it runs again
    await asyncio.gather(waiting, return_exceptions=True)
    got = None if waiting.cancelled() else waiting.result()
    assert got is conn or list(pool.idle) == [conn]
    assert pool.total == 1 and not pool.waiters


class ConnectingLoop:
    """The running loop, except that a new connection opens at once, on a fake transport."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.opened = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def create_connection(self, factory: Any, *args: Any, **kwargs: Any) -> Any:
        proto = factory()
        transport = FakeTransport()
        proto.connection_made(transport)
        self.opened += 1
        return transport, proto


def busy_pool(max_pending: int) -> tuple[Pool, UpstreamConnection]:
    """A pool of one slot, busy with the connection returned; new connections open at once."""
    loop = asyncio.get_running_loop()
    svc = service(
        PoolManager(loop), "svc", "http://10.0.0.1:80", max_connections=1, max_pending=max_pending
    )
    conn, _ = parked_connection(svc, "10.0.0.1:80")
    pool = svc.pool_for(svc.instances["10.0.0.1:80"])
    pool.loop = ConnectingLoop(loop)  # type: ignore[assignment]
    assert pool.acquire_idle() is conn
    return pool, conn


async def test_a_slot_freed_for_a_waiter_is_not_taken_by_a_request_arriving_meanwhile() -> None:
    """Every slot busy, a request waits; the busy connection is closed, so its slot goes to
    the waiter, and a new request arrives before the waiter runs again. The waiter must get
    the slot and the newcomer wait its turn. (The slot was only uncounted: the newcomer took
    it, and the waiter, woken to an over-full pool, failed with 503.)"""
    loop = asyncio.get_running_loop()
    pool, conn = busy_pool(max_pending=1)
    waiting = loop.create_task(pool.connect(5.0))
    await asyncio.sleep(0)
    assert len(pool.waiters) == 1
    conn.connection_lost(None)  # the upstream closed it: the slot is the waiter's
    newcomer = loop.create_task(pool.connect(0.2))
    got, late = await asyncio.gather(waiting, newcomer, return_exceptions=True)
    assert isinstance(got, UpstreamConnection), got
    assert isinstance(late, PoolFull) and "within" in str(late)  # it waited, then gave up
    assert pool.total == 1 and not pool.waiters


async def test_a_connection_parked_before_the_connect_task_ran_is_used_not_waited_for() -> None:
    """The exchange finds nothing idle and starts its connect in a task; the busy connection
    is parked before that task runs (nobody waited yet, so it was not handed over). With
    every slot counted busy, connect waited for a release that may never come (a 503 after
    the connect timeout) while that connection sat idle."""
    loop = asyncio.get_running_loop()
    pool, conn = busy_pool(max_pending=1)
    assert pool.acquire_idle() is None  # the exchange's look: nothing idle
    connecting = loop.create_task(pool.connect(0.2))
    conn.reusable = True
    pool.release(conn)  # parked before the task's first step
    assert await connecting is conn
    assert pool.total == 1 and not pool.idle and not pool.waiters


async def test_a_raised_limit_lets_the_waiting_requests_in_first() -> None:
    loop = asyncio.get_running_loop()
    pool, _ = busy_pool(max_pending=4)
    waiting = [loop.create_task(pool.connect(5.0)) for _ in range(3)]
    await asyncio.sleep(0)
    assert len(pool.waiters) == 3
    pool.set_max_connections(3)  # two more slots: the first two waiters'
    newcomer = loop.create_task(pool.connect(0.2))
    late, got1, got2 = await asyncio.gather(newcomer, *waiting[:2], return_exceptions=True)
    assert isinstance(got1, UpstreamConnection) and isinstance(got2, UpstreamConnection)
    assert isinstance(late, PoolFull)  # behind the third waiter, which still waits
    assert pool.total == 3 and len(pool.waiters) == 1
    waiting[2].cancel()
    await asyncio.gather(waiting[2], return_exceptions=True)
    assert not pool.waiters and pool.total == 3


class NetworkLoop:
    """The running loop with a fake network: names resolve through `names` (each lookup waits
    for `gate`), connections open at once on fake transports, except to `refused` addresses.
    Like a real loop, `create_connection` given a name looks it up (through `getaddrinfo`)
    and tries each of its addresses in turn."""

    def __init__(self, loop: asyncio.AbstractEventLoop, **names: list[str]) -> None:
        self._loop = loop
        self.names = {name.replace("_", "."): ips for name, ips in names.items()}
        self.lookups: list[str] = []
        self.calls: list[tuple[str, str | None]] = []  # create_connection's (host, server_hostname)
        self.attempts: list[str] = []  # the addresses connected to
        self.refused: set[str] = set()
        self.gate = asyncio.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def getaddrinfo(self, host: str, port: int, **kwargs: Any) -> list[tuple[Any, ...]]:
        self.lookups.append(host)
        await self.gate.wait()
        if host not in self.names:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in self.names[host]]

    async def create_connection(self, factory: Any, host: str, port: int, **kwargs: Any) -> Any:
        self.calls.append((host, kwargs.get("server_hostname")))
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = [info[4][0] for info in await self.getaddrinfo(host, port)]
        for address in addresses:
            self.attempts.append(address)
            if address not in self.refused:
                proto = factory()
                transport = FakeTransport()
                proto.connection_made(transport)
                return transport, proto
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")


def named_pool(net: NetworkLoop, url: str, name: str = "svc") -> tuple[PoolManager, Pool]:
    pools = PoolManager(net)  # type: ignore[arg-type]
    svc = service(pools, name, url)
    return pools, svc.pool_for(next(iter(svc.instances.values())))


async def test_connects_to_a_named_target_share_one_lookup() -> None:
    """A target given by name was looked up by create_connection for every new connection:
    no cache, and a slow resolver stalled each connect (and filled libuv's 4 lookup threads)."""
    net = NetworkLoop(asyncio.get_running_loop(), svc_test=["10.0.0.7"])
    net.gate.clear()
    _, pool = named_pool(net, "http://svc.test:8080")
    connects = [asyncio.create_task(pool.connect(1.0)) for _ in range(10)]
    await asyncio.sleep(0.01)
    net.gate.set()
    conns = await asyncio.gather(*connects)
    conns += [await pool.connect(1.0) for _ in range(5)]
    assert net.lookups == ["svc.test"]  # one lookup for 15 connections
    assert net.attempts == ["10.0.0.7"] * 15 and pool.created == 15 == pool.total
    assert all(isinstance(c, UpstreamConnection) for c in conns)


async def test_ip_targets_connect_as_before_without_the_resolver() -> None:
    net = NetworkLoop(asyncio.get_running_loop())
    for url, host in (("http://10.0.0.1:80", "10.0.0.1"), ("https://[::1]:8443", "::1")):
        _, pool = named_pool(net, url)
        assert pool.resolver is None
        await pool.connect(1.0)
        assert net.calls[-1] == (host, host if url.startswith("https") else None)
    assert net.lookups == []


async def test_tls_checks_the_name_while_connecting_to_the_resolved_address() -> None:
    net = NetworkLoop(asyncio.get_running_loop(), api_example_com=["10.0.0.7"])
    _, pool = named_pool(net, "https://api.example.com:8443")
    await pool.connect(1.0)
    assert net.calls == [("10.0.0.7", "api.example.com")]  # SNI and certificate: the name
    assert pool.host_header == b"api.example.com:8443"


async def test_a_connect_timeout_during_a_slow_lookup_leaves_the_lookup_running() -> None:
    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    net = NetworkLoop(loop, slow_test=["10.0.0.7"])
    net.gate.clear()
    _, pool = named_pool(net, "http://slow.test:80")
    for _ in range(3):
        with pytest.raises(TimeoutError):
            await pool.connect(0.01)
    assert pool.total == 0  # the slots came back
    net.gate.set()
    await asyncio.sleep(0.01)
    await pool.connect(0.01)  # the answer the timed-out connects left behind: no new lookup
    assert net.lookups == ["slow.test"]
    gc.collect()
    await asyncio.sleep(0)
    assert errors == []  # no "Future exception was never retrieved"


async def test_a_dead_name_is_looked_up_once_not_once_per_connect() -> None:
    net = NetworkLoop(asyncio.get_running_loop())
    _, pool = named_pool(net, "http://dead.test:80")
    for _ in range(20):
        with pytest.raises(OSError, match="Name or service not known"):
            await pool.connect(1.0)
    assert net.lookups == ["dead.test"] and pool.total == 0


async def test_an_address_that_refuses_is_skipped_and_the_next_one_kept() -> None:
    net = NetworkLoop(asyncio.get_running_loop(), svc_test=["10.0.0.1", "10.0.0.2"])
    net.refused.add("10.0.0.1")
    _, pool = named_pool(net, "http://svc.test:80")
    await pool.connect(1.0)
    await pool.connect(1.0)
    assert net.attempts == ["10.0.0.1", "10.0.0.2", "10.0.0.2"]  # then straight to the one
    net.refused.add("10.0.0.2")
    with pytest.raises(ConnectionRefusedError):
        await pool.connect(1.0)
    assert pool.total == 2


async def test_pools_share_the_cache_and_the_last_one_retired_drops_the_name() -> None:
    net = NetworkLoop(asyncio.get_running_loop(), svc_test=["10.0.0.7"])
    pools = PoolManager(net)  # type: ignore[arg-type]
    one = service(pools, "one", "http://svc.test:80")
    two = service(pools, "two", "http://svc.test:80")
    await one.pool_for(one.instances["svc.test:80"]).connect(1.0)
    await two.pool_for(two.instances["svc.test:80"]).connect(1.0)
    assert net.lookups == ["svc.test"]
    pools.retire("one")
    assert list(pools.resolver.entries) == [("svc.test", 80)]  # service two still uses it
    pools.retire("two")
    assert pools.resolver.entries == {}
    pools.close()
    assert pools.resolver.closed
