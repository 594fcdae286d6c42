"""Resilience review findings, on a real exchange, service, pool and upstream connection with fake
transports (no sockets): what the circuit breaker and passive health learn from a response cut
mid-body, a queued client that leaves, per-try timeouts against the overall deadline, and the
breaker's decision in the access log."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from apigate.balancing.base import Instance
from apigate.config.schema import GatewayConfig, LimitsConfig
from apigate.http.headers import RequestIds, TrustedProxies
from apigate.http.output import WriteBatch
from apigate.http.pool import Pool, PoolFull, PoolManager
from apigate.http.protocol import ClientConnection, ExchangeMaker
from apigate.http.request import Request
from apigate.http.upstream import UpstreamConnection
from apigate.observability.access_log_lines import AccessLogLines
from apigate.plugins.base import PluginEnv
from apigate.proxy.exchange import ProxyExchange
from apigate.registry.service import Service
from apigate.resilience.circuit_breaker import State
from apigate.runtime import Runtime, ServiceTable, compile_runtime
from tests.unit.test_protocol import FakeTransport as ClientTransport

OK_HEAD_AND_5_BYTES = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhello"
ANSWER_500 = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n"
ANSWER_200 = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeTransport:
    """A socket's transport: records writes; closing it reports connection_lost to its
    protocol on the next loop iteration, as asyncio's and uvloop's transports do."""

    def __init__(self, protocol: Any = None) -> None:
        self.protocol = protocol
        self.written = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def writelines(self, parts: list[bytes]) -> None:
        self.written += b"".join(parts)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.protocol is not None:
                asyncio.get_running_loop().call_soon(self.protocol.connection_lost, None)

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class Client:
    """One client connection (the real one: compiled, the exchange takes nothing else) over a
    transport that records what the gateway writes to it."""

    def __init__(self, host: Host) -> None:
        self.host = host
        self.transport = ClientTransport()
        self.conn = ClientConnection(host)  # type: ignore[arg-type]
        self.conn.connection_made(self.transport)  # type: ignore[arg-type]

    @property
    def out(self) -> bytes:
        self.host.writes.flush()  # what the loop sends at the end of its turn
        return bytes(self.transport.written)

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def status(self) -> int:
        out = self.out
        return int(out.split(b" ", 2)[1]) if out else 0


class _Maker(ExchangeMaker):
    def __init__(self, host: Host) -> None:
        self.host = host

    def new_exchange(self, conn: ClientConnection, request: Request) -> ProxyExchange:
        ex = ProxyExchange(conn, request, self.host.runtime, self.host.observers)
        self.host.exchanges.append(ex)
        return ex


class Host:
    """The listener's side of the connections (apigate.http.protocol.ConnectionHost): their
    requests become ProxyExchanges on `runtime`."""

    def __init__(self, runtime: Runtime, observers: list[Any], writes: WriteBatch) -> None:
        self.runtime = runtime
        self.observers = observers
        self.loop = asyncio.get_running_loop()
        self.clock = time.monotonic
        self.limits = LimitsConfig()
        self.request_ids = RequestIds()
        self.trusted_proxies = TrustedProxies(())
        self.scheme = "http"
        self.connections: set[ClientConnection] = set()
        self.exchange_maker = _Maker(self)
        self.writes = writes  # the pools' too, as in the gateway
        self.exchanges: list[ProxyExchange] = []

    def refused(self, conn: Any, request: Request, err: Any, sent: int) -> None:
        raise AssertionError(f"refused: {err}")


class Gateway:
    """One route per service (`/NAME`), compiled as the gateway compiles its snapshot."""

    def __init__(self, services: dict[str, dict[str, Any]]) -> None:
        loop = asyncio.get_running_loop()
        config = GatewayConfig.model_validate(
            {
                "services": services,
                "routes": [
                    {"name": name, "match": {"paths": [f"/{name}"]}, "service": name}
                    for name in services
                ],
            }
        )
        pools = PoolManager(loop)
        self.runtime: Runtime = compile_runtime(
            config, ServiceTable(pools), PluginEnv(config=config, loop=loop)
        )
        self.log = AccessLogLines(full=lambda: None)
        self.host = Host(self.runtime, [self.log.on_log], pools.writes)

    def service(self, name: str) -> Service:
        return self.runtime.services[name]

    def pool(self, name: str, inst: Instance | None = None) -> Pool:
        svc = self.service(name)
        return svc.pool_for(inst or next(iter(svc.instances.values())))

    def park(
        self, name: str, inst: Instance | None = None
    ) -> tuple[UpstreamConnection, FakeTransport]:
        """An idle keep-alive connection in the pool of the service's instance `inst` (by
        default its first)."""
        pool = self.pool(name, inst)
        conn = UpstreamConnection(pool)
        transport = FakeTransport(conn)
        conn.connection_made(transport)  # type: ignore[arg-type]
        pool.total += 1
        conn.reusable = True
        pool.release(conn)
        return conn, transport

    def send(self, path: str) -> tuple[ProxyExchange, Client]:
        client = Client(self.host)
        client.conn.data_received(b"GET %s HTTP/1.1\r\nHost: gw.test\r\n\r\n" % path.encode())
        self.host.writes.flush()  # the end of the loop's turn: the request goes upstream
        return self.host.exchanges[-1], client

    def logged(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log.format(self.log.take()).splitlines()]


def _breaker_service(**extra: Any) -> dict[str, Any]:
    return {
        "targets": ["http://10.0.0.1:80"],
        "health": {"passive": None},
        "retries": {"attempts": 0},
        "circuit_breaker": {
            "failure_rate": "90%",
            "min_requests": 100,
            "consecutive_failures": 3,
            "open_for": "50ms",
            "half_open_requests": 1,
        },
        **extra,
    }


# ---------------------------------------------------------------- 1. failures mid-response
async def test_a_reset_mid_body_is_a_failure_for_the_breaker() -> None:
    gw = Gateway({"cons": _breaker_service()})
    breaker = gw.service("cons").breaker
    assert breaker is not None
    for i in range(3):
        conn, _ = gw.park("cons")
        ex, client = gw.send(f"/cons/{i}")
        conn.data_received(OK_HEAD_AND_5_BYTES)
        assert client.out.startswith(b"HTTP/1.1 200")
        conn.connection_lost(ConnectionResetError())
        assert client.aborted and ex.error == "upstream closed mid-response"
    assert breaker.window_counts() == (3, 3)
    assert breaker.state is State.OPEN


async def test_a_timeout_mid_body_is_a_failure_for_the_breaker() -> None:
    gw = Gateway({"cons": _breaker_service(timeouts={"response": "30ms"})})
    breaker = gw.service("cons").breaker
    assert breaker is not None
    for i in range(3):
        conn, _ = gw.park("cons")
        ex, client = gw.send(f"/cons/{i}")
        conn.data_received(OK_HEAD_AND_5_BYTES)  # then the body stalls
        await asyncio.sleep(0.15)
        assert client.aborted and ex.error == "upstream timed out mid-response"
    assert breaker.window_counts() == (3, 3)
    assert breaker.state is State.OPEN


async def test_passive_health_counts_a_response_cut_mid_body_as_the_breaker_does() -> None:
    passive = {"failures": 2, "eject_for": "30s", "max_ejection_percent": "100%"}
    gw = Gateway({"cons": _breaker_service(health={"passive": passive})})
    inst = next(iter(gw.service("cons").instances.values()))
    conn, _ = gw.park("cons")
    gw.send("/cons/1")
    conn.data_received(OK_HEAD_AND_5_BYTES)
    conn.connection_lost(ConnectionResetError())
    assert inst.failures == 1 and inst.healthy
    conn, _ = gw.park("cons")
    gw.send("/cons/2")
    conn.data_received(OK_HEAD_AND_5_BYTES)
    conn.connection_lost(ConnectionResetError())
    assert not inst.healthy  # ejected after two


async def test_a_client_gone_mid_body_is_no_failure_of_the_upstream() -> None:
    gw = Gateway({"cons": _breaker_service()})
    breaker = gw.service("cons").breaker
    assert breaker is not None
    inst = next(iter(gw.service("cons").instances.values()))
    for i in range(3):
        conn, _ = gw.park("cons")
        ex, _ = gw.send(f"/cons/{i}")
        conn.data_received(OK_HEAD_AND_5_BYTES)
        ex.client_lost()
        assert ex.status == 200  # (logged with the upstream's status: it answered)
    assert breaker.window_counts() == (3, 0) and breaker.state is State.CLOSED
    assert inst.failures == 0


# ---------------------------------------------------------------- 2. a queued client leaves
def _limited() -> dict[str, Any]:
    return {
        "targets": ["http://10.0.0.1:80"],
        "max_connections": 1,
        "max_pending": 1,
        "timeouts": {"connect": "5s"},
    }


class Connects:
    """The running loop, except that a connect makes its connection on a fake transport at
    once; with `hang`, it then waits for ever to report it, and, cancelled, closes the
    connection it made, as asyncio and uvloop do."""

    def __init__(self, loop: asyncio.AbstractEventLoop, hang: bool = False) -> None:
        self._loop = loop
        self.hang = hang
        self.made: list[FakeTransport] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    async def create_connection(self, factory: Any, *args: Any, **kwargs: Any) -> Any:
        proto = factory()
        transport = FakeTransport(proto)
        proto.connection_made(transport)
        self.made.append(transport)
        if not self.hang:
            return transport, proto
        try:
            await self._loop.create_future()
        except BaseException:
            transport.close()
            raise


async def test_a_client_that_leaves_while_queued_frees_its_place() -> None:
    gw = Gateway({"lim": _limited()})
    pool = gw.pool("lim")
    busy, _ = gw.park("lim")
    first, _ = gw.send("/lim/a")  # takes the only connection
    assert first.upstream is busy
    queued, _ = gw.send("/lim/b")  # waits for it
    await asyncio.sleep(0)
    assert len(pool.waiters) == 1
    queued.client_lost()
    await asyncio.sleep(0.01)
    assert not pool.waiters, "the departed client still holds its place in the queue"
    assert queued.status == 499
    # a third request queues (it was refused at once: 503 upstream_overloaded)
    third, client = gw.send("/lim/c")
    await asyncio.sleep(0)
    assert len(pool.waiters) == 1 and client.status == 0
    busy.data_received(ANSWER_200)  # the first is answered: its connection goes to the third
    await asyncio.sleep(0.01)
    assert third.upstream is busy
    busy.data_received(ANSWER_200)
    assert client.status == 200
    busy.connection_lost(None)
    assert pool.total == 0 and not pool.waiters and not pool.idle


async def test_a_client_that_leaves_after_a_slot_was_handed_to_it_gives_the_slot_back() -> None:
    """The busy connection closes, its slot goes to the queued request, whose client leaves
    before it ran again: the slot is freed, not kept for nobody."""
    gw = Gateway({"lim": _limited()})
    pool = gw.pool("lim")
    pool.loop = Connects(asyncio.get_running_loop())  # type: ignore[assignment]
    busy, _ = gw.park("lim")
    gw.send("/lim/a")
    queued, _ = gw.send("/lim/b")
    await asyncio.sleep(0)
    busy.data_received(OK_HEAD_AND_5_BYTES)
    busy.connection_lost(ConnectionResetError())  # the slot is handed to the waiter ...
    queued.client_lost()  # ... whose client leaves in the same loop iteration
    await asyncio.sleep(0.01)
    # (Python 3.11's wait_for hands the slot over despite the cancellation: the connection
    # opened in it is closed at once, the client being gone; 3.12's frees the slot)
    assert pool.total == 0 and not pool.waiters and not pool.idle


async def test_a_client_that_leaves_while_connecting_frees_the_slot_once() -> None:
    """The connection was made but not yet reported when the client left: the connect is
    cancelled and the loop closes the connection (whose connection_lost frees the slot). The
    slot was freed a second time by the failed connect: the count went negative, one more
    connection than max_connections allowed from then on."""
    gw = Gateway({"lim": _limited()})
    pool = gw.pool("lim")
    loop = Connects(asyncio.get_running_loop(), hang=True)
    pool.loop = loop  # type: ignore[assignment]
    ex, _ = gw.send("/lim/a")
    await asyncio.sleep(0.01)
    assert pool.total == 1 and len(loop.made) == 1
    ex.client_lost()
    await asyncio.sleep(0.01)
    assert loop.made[0].closed
    assert pool.total == 0 and not pool.waiters and not pool.idle


async def test_a_connect_that_times_out_after_the_connection_was_made_frees_the_slot_once() -> None:
    """The same race with the connect timeout (which cancels the connect too)."""
    gw = Gateway({"lim": _limited()})
    pool = gw.pool("lim")
    pool.loop = Connects(asyncio.get_running_loop(), hang=True)  # type: ignore[assignment]
    with pytest.raises(TimeoutError):
        await pool.connect(0.02)
    await asyncio.sleep(0.01)
    assert pool.total == 0


async def test_the_queue_is_still_bounded_after_a_client_left() -> None:
    gw = Gateway({"lim": _limited()})
    pool = gw.pool("lim")
    gw.park("lim")
    gw.send("/lim/a")
    queued, _ = gw.send("/lim/b")
    await asyncio.sleep(0)
    queued.client_lost()
    await asyncio.sleep(0.01)
    _, third = gw.send("/lim/c")
    await asyncio.sleep(0.01)
    assert len(pool.waiters) == 1 and third.status == 0  # queued in the place given up
    with pytest.raises(PoolFull):  # a queue of one, taken by the third request
        await pool.connect(1.0)
    assert pool.total == 1


# ---------------------------------------------------------------- 3. per-try vs overall timeout
def _timed_service(response: str, per_try: str) -> dict[str, Any]:
    """One instance that never answers (parked), retried on timeouts once."""
    return {
        "targets": ["http://10.0.0.1:80"],
        "health": {"passive": None},
        "timeouts": {"response": response},
        "retries": {"attempts": 1, "on": ["timeout"], "per_try_timeout": per_try},
    }


async def test_the_first_try_is_cut_at_the_overall_timeout() -> None:
    """per_try_timeout (500 ms) longer than timeouts.response (50 ms): the first try ran on
    for its 500 ms, past the overall deadline."""
    gw = Gateway({"pt": _timed_service(response="50ms", per_try="500ms")})
    gw.park("pt")
    ex, client = gw.send("/pt/x")  # the upstream never answers
    await asyncio.sleep(0.2)
    assert client.status == 504, bytes(client.out)
    assert ex.error is not None and "did not answer in time" in ex.error


async def test_a_per_try_timeout_shorter_than_the_overall_one_still_applies() -> None:
    gw = Gateway({"pt": _timed_service(response="5s", per_try="30ms")})
    gw.park("pt")
    _, client = gw.send("/pt/x")
    await asyncio.sleep(0.15)
    assert client.status == 504  # (one instance: no other to retry on)


# ---------------------------------------------------------------- 4. the breaker in the log
async def test_the_access_log_says_what_the_breaker_decided_for_each_request() -> None:
    gw = Gateway({"cons": _breaker_service()})
    conn, _ = gw.park("cons")
    for i in range(3):  # let through while closed; the third opens the breaker
        _, client = gw.send(f"/cons/{i}")
        conn.data_received(ANSWER_500)
        assert client.status == 500
    _, refused = gw.send("/cons/refused")
    assert refused.status == 503
    await asyncio.sleep(0.06)  # open_for
    _, probe = gw.send("/cons/probe")  # a probe: its success closes the breaker
    conn.data_received(ANSWER_200)
    assert probe.status == 200
    gw.send("/cons/after")
    conn.data_received(ANSWER_200)
    lines = {doc["path"]: doc for doc in gw.logged()}
    assert [lines[f"/cons/{i}"].get("breaker") for i in range(3)] == [None, None, None]
    assert lines["/cons/refused"]["breaker"] == "open"
    assert lines["/cons/probe"]["breaker"] == "half_open"
    assert "breaker" not in lines["/cons/after"]


async def test_a_request_refused_by_a_half_open_breaker_is_logged_as_refused() -> None:
    gw = Gateway({"cons": _breaker_service()})
    conn, _ = gw.park("cons")
    for i in range(3):
        gw.send(f"/cons/{i}")
        conn.data_received(ANSWER_500)
    await asyncio.sleep(0.06)
    gw.send("/cons/probe")  # holds the one probe slot
    _, refused = gw.send("/cons/refused")
    assert refused.status == 503
    lines = {doc["path"]: doc for doc in gw.logged()}
    assert lines["/cons/refused"]["breaker"] == "open"
