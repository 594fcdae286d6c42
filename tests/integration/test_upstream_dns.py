"""Upstream targets given by name (`http://localhost:PORT`), end to end.

`localhost` resolves locally (/etc/hosts), so these need no DNS server. The in-process tests
count the lookups the gateway makes by wrapping the test loop's `getaddrinfo`, which is what
both the resolver and (before it) `loop.create_connection` called. The starvation test gives
the loop a 4-thread default executor, as libuv's thread pool is under uvloop, and a name whose
lookups hold a thread for 1 s (this sandbox's resolver takes 5-10 s for parallel queries of a
dead name). The last test runs a real `apigate run` (uvloop) against a TLS upstream by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import Counter
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from apigate.config.schema import GatewayConfig
from apigate.server import Gateway
from tests.support.certs import TestCA
from tests.support.gateway import GatewayProcess, base_config, raw_request
from tests.support.upstream import Upstream


class CountingLookups:
    """The loop's getaddrinfo, counted per name; `delay` makes it slow (without a thread),
    names in `blocking` hold an executor thread for `blocking[name]` seconds and then fail."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.real = loop.getaddrinfo
        self.calls: Counter[str] = Counter()
        self.delay = 0.0
        self.blocking: dict[str, float] = {}

    async def __call__(self, host: Any, port: Any, **kwargs: Any) -> Any:
        self.calls[host] += 1
        if host in self.blocking:
            return await self.loop.run_in_executor(None, self._dead, self.blocking[host])
        if self.delay:
            await asyncio.sleep(self.delay)
        return await self.real(host, port, **kwargs)

    @staticmethod
    def _dead(seconds: float) -> Any:
        time.sleep(seconds)
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


@pytest.fixture
async def lookups(monkeypatch: pytest.MonkeyPatch) -> CountingLookups:
    loop = asyncio.get_running_loop()
    counting = CountingLookups(loop)
    monkeypatch.setattr(loop, "getaddrinfo", counting)
    return counting


@pytest.fixture
async def loop_errors() -> list[dict[str, Any]]:
    """What reaches the loop's exception handler ("Future exception was never retrieved")."""
    seen: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    return seen


def config(services: dict[str, Any]) -> dict[str, Any]:
    routes = [
        {"name": name, "match": {"paths": [f"/{name}"]}, "service": name, "strip_prefix": True}
        for name in services
    ]
    return base_config(services=services, routes=routes)


@contextlib.asynccontextmanager
async def gateway(cfg: dict[str, Any]) -> AsyncIterator[Gateway]:
    gw = Gateway(GatewayConfig.model_validate(cfg))
    await gw.start()
    try:
        yield gw
    finally:
        await gw.shutdown(0)


async def get(gw: Gateway, path: str) -> tuple[int, float]:
    """(status, seconds) of one GET on a new client connection."""
    start = time.monotonic()
    raw = await raw_request(gw.proxy_port, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % path.encode())
    status = int(raw[9:12]) if raw.startswith(b"HTTP/1.1 ") else 0
    return status, time.monotonic() - start


async def test_a_target_by_name_is_looked_up_once_not_once_per_connection(
    lookups: CountingLookups, loop_errors: list[dict[str, Any]]
) -> None:
    # /eof answers with `Connection: close`: every request needs a new upstream connection
    async with (
        Upstream() as up,
        gateway(config({"svc": {"targets": [f"http://localhost:{up.port}"]}})) as gw,
    ):
        statuses = [(await get(gw, "/svc/eof"))[0] for _ in range(10)]
        statuses += [s for s, _ in await asyncio.gather(*(get(gw, "/svc/eof") for _ in range(20)))]
        assert statuses == [200] * 30 and len(up.received) == 30
        assert up.received[0].header("host") == f"localhost:{up.port}"  # the name, still
    assert lookups.calls == {"localhost": 1}
    assert loop_errors == []


async def test_an_expired_answer_is_refreshed_without_making_requests_wait(
    lookups: CountingLookups,
) -> None:
    async with (
        Upstream() as up,
        gateway(config({"svc": {"targets": [f"http://localhost:{up.port}"]}})) as gw,
    ):
        gw.pools.resolver.ttl = 0.2
        assert (await get(gw, "/svc/eof"))[0] == 200
        lookups.delay = 1.0  # the resolver turns slow
        await asyncio.sleep(0.3)  # the answer expired
        results = [await get(gw, "/svc/eof") for _ in range(5)]
        assert [s for s, _ in results] == [200] * 5
        assert max(t for _, t in results) < 0.5  # served the old answer, no 1 s lookup waited
        assert lookups.calls == {"localhost": 2}  # one refresh in the background


async def test_a_slow_dead_name_does_not_starve_the_other_names(
    lookups: CountingLookups, loop_errors: list[dict[str, Any]]
) -> None:
    """The reviewer's case: 30 clients on a service whose name takes long to fail filled the
    lookup threads, and the services addressed by a good name timed out (504) behind them."""
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(4)  # as libuv's pool: 4 threads for every lookup
    loop.set_default_executor(executor)
    lookups.blocking["dead.test"] = 1.0
    async with Upstream() as up:
        cfg = config(
            {
                "dead": {"targets": ["http://dead.test:8080"], "timeouts": {"connect": "300ms"}},
                "good": {
                    "targets": [f"http://localhost:{up.port}"],
                    "timeouts": {"connect": "500ms"},
                },
            }
        )
        async with gateway(cfg) as gw:
            end = loop.time() + 1.5
            dead: Counter[int] = Counter()

            async def hammer() -> None:
                while loop.time() < end:
                    dead[(await get(gw, "/dead/x"))[0]] += 1

            clients = [asyncio.create_task(hammer()) for _ in range(30)]
            good = []
            while loop.time() < end:
                await asyncio.sleep(0.1)
                good.append(await get(gw, "/good/eof"))
            await asyncio.gather(*clients)
    assert set(dead) <= {502, 504} and sum(dead.values()) >= 30
    assert [s for s, _ in good] == [200] * len(good)
    assert max(t for _, t in good) < 0.45  # (its connect timeout is 0.5 s)
    assert lookups.calls["localhost"] == 1
    assert lookups.calls["dead.test"] == 1  # 1 s to fail, then cached as failed for 3 s
    assert loop_errors == []
    executor.shutdown(wait=True)


class TlsEcho(asyncio.Protocol):
    """Answers every request head with the SNI name the client sent."""

    def __init__(self, sni: list[str | None]) -> None:
        self.sni = sni
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf and self.transport is not None:
            _, _, self.buf = self.buf.partition(b"\r\n\r\n")
            body = str(self.sni[-1]).encode()
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )


async def test_a_real_gateway_connects_by_name_over_plain_and_tls(tmp_path: Path) -> None:
    """`apigate run` (uvloop, whose getaddrinfo runs in libuv's thread pool): the resolver
    gives an address, and TLS still sends the name as SNI and checks the certificate for it
    (issued for `localhost` only, not for 127.0.0.1)."""
    ca = TestCA(tmp_path)
    files = ca.issue("up", ["localhost"])
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(files.cert, files.key)
    sni: list[str | None] = []
    ctx.sni_callback = lambda _obj, name, _ctx: sni.append(name)
    loop = asyncio.get_running_loop()
    tls_server = await loop.create_server(lambda: TlsEcho(sni), "127.0.0.1", 0, ssl=ctx)
    tls_port = tls_server.sockets[0].getsockname()[1]
    try:
        async with Upstream() as up:
            cfg = config(
                {
                    "plain": {"targets": [f"http://localhost:{up.port}"]},
                    "tls": {"targets": [f"https://localhost:{tls_port}"]},
                }
            )
            env = {"SSL_CERT_FILE": str(ca.cert_path)}  # the default context trusts the test CA
            async with GatewayProcess(cfg, env=env) as gw:
                for _ in range(3):
                    plain = await raw_request(
                        gw.port, b"GET /plain/eof HTTP/1.1\r\nHost: x\r\n\r\n"
                    )
                    assert plain.startswith(b"HTTP/1.1 200"), plain
                tls = await raw_request(gw.port, b"GET /tls/ HTTP/1.1\r\nHost: x\r\n\r\n")
                assert tls.startswith(b"HTTP/1.1 200"), tls
                assert tls.endswith(b"\r\n\r\nlocalhost")
                logs = gw.logs()
            assert "never retrieved" not in logs and "Traceback" not in logs
    finally:
        tls_server.close()
        await tls_server.wait_closed()
