"""The gateway's own Python cost per proxied request, without sockets or the event loop's I/O.

    python bench/micro.py [--requests 50000] [--profile] [--metrics] [--config NAME]

NAME: plain (the default), logged, plugins, consumer, consumer_plugins, other_consumer_plugins,
aggregate3.

A real `Gateway` (runtime, routing, plugins, pools) serves requests through the real
`ClientConnection` and `UpstreamConnection` protocols, whose transports are in-memory fakes: the
request bytes go into `data_received`, the upstream's answer is fed back the same way. What is
left is exactly the per-request Python work of the data plane, which is what the hot-path rules
are about; the syscalls (4 per request) and epoll are what `bench/run.py` adds on top.

`--config logged` is bench/scenarios.py's `logged` scenario (issue 6's yardstick): the plain
route with the JSON access log to a temporary file.
`--config plugins` is bench/scenarios.py's `plugins` scenario (issue 4's yardstick): a JWT
(HS256, the same token every time, so verified once and then cached), a local rate limit that
never trips and the JSON access log to a temporary file. `--config aggregate3` is the
`aggregate3` scenario: one request, three part calls on three pooled upstream connections, the
loop run between the steps (its few idle iterations per request are counted too). One request
at a time: what 50 concurrent ones cost the garbage collector does not show here.
`--config consumer` is `plugins` where the token names a consumer; `consumer_plugins` the same
where that consumer has a rate limit of its own (consumers' plugins), `other_consumer_plugins`
where another consumer has it.
`--metrics`
adds the per-request Prometheus observer the real server always runs
(`apigate.observability.metrics`). The Date header ticks as in the server, so a request's
wall-clock start for its log line is read as there (without it, a `time.time()` call).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from apigate.config.loader import parse_config
from apigate.http.date import DATE
from apigate.http.output import WriteBatch
from apigate.http.protocol import ClientConnection
from apigate.http.upstream import UpstreamConnection
from apigate.observability.metrics import GatewayMetrics
from apigate.server import Gateway

RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"Hello, World!"
)


def request_bytes(*headers: str) -> bytes:
    """The request every iteration sends, with `headers` ("Name: value") added."""
    lines = ["GET /hello HTTP/1.1", "Host: bench", "User-Agent: wrk", "Accept: */*", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass(frozen=True)
class Bench:
    """One micro-benchmark config: apigate's config (as parsed YAML) and the request bytes."""

    config: dict[str, Any]
    request: bytes


def _plain(workdir: Path) -> Bench:
    return Bench(
        {
            "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
            "services": {"up": {"targets": ["http://127.0.0.1:9"]}},
            "routes": [{"name": "r", "match": {"paths": ["/"]}, "service": "up"}],
        },
        request_bytes(),
    )


def _logged(workdir: Path) -> Bench:
    """bench/scenarios.py's `logged`: the plain route with the JSON access log to a file."""
    plain = _plain(workdir)
    log = {"access_log": {"path": str(workdir / "access.log")}}
    return Bench({**plain.config, "plugins": log}, plain.request)


def _plugins(workdir: Path) -> Bench:
    """bench/scenarios.py's `plugins`: jwt (cached) + local rate limit + JSON access log."""
    secret = secrets.token_hex(32)  # made per run: no key lives in the repository
    claims = {"sub": "bench", "iss": "bench", "exp": int(time.time()) + 3600}
    token = jwt.encode(claims, secret, algorithm="HS256")
    plugins = {
        "jwt": {"secret": secret, "algorithms": ["HS256"], "issuer": "bench"},
        "rate_limit": {"requests": 1_000_000_000, "per": "1s", "key": "ip"},
    }
    return Bench(
        {
            "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
            "services": {"up": {"targets": ["http://127.0.0.1:9"]}},
            "routes": [
                {"name": "r", "match": {"paths": ["/"]}, "service": "up", "plugins": plugins}
            ],
            "plugins": {"access_log": {"path": str(workdir / "access.log")}},
        },
        request_bytes(f"Authorization: Bearer {token}"),
    )


def _consumer(workdir: Path, own_plugins: str | None = None) -> Bench:
    """`plugins` where the token's subject names a consumer (`bench`); with `own_plugins`, the
    consumer of that name has a rate limit of its own with the route's settings, in place of
    the route's for its requests (consumers' plugins)."""
    bench = _plugins(workdir)
    consumers: list[dict[str, Any]] = [{"name": "bench"}]
    if own_plugins is not None:
        if own_plugins != "bench":
            consumers.append({"name": own_plugins})
        rate_limit = bench.config["routes"][0]["plugins"]["rate_limit"]
        consumers[-1]["plugins"] = {"rate_limit": rate_limit}
    return Bench({**bench.config, "consumers": consumers}, bench.request)


def _consumer_plugins(workdir: Path) -> Bench:
    """`consumer` with its own rate limit: the switch to the route's variant for it."""
    return _consumer(workdir, own_plugins="bench")


def _other_consumer_plugins(workdir: Path) -> Bench:
    """`consumer` where another consumer has plugins: what the switch costs the requests of a
    consumer without plugins of its own on a route that has it."""
    return _consumer(workdir, own_plugins="partner")


def _aggregate3(workdir: Path) -> Bench:
    """bench/scenarios.py's `aggregate3`: one request fanned out to three upstream calls."""
    parts = {f"p{i}": {"service": "up", "path": "/json"} for i in range(3)}
    return Bench(
        {
            "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
            "services": {"up": {"targets": ["http://127.0.0.1:9"]}},
            "routes": [{"name": "agg", "match": {"paths": ["/"]}, "aggregate": parts}],
        },
        request_bytes(),
    )


CONFIGS = {
    "plain": _plain,
    "logged": _logged,
    "plugins": _plugins,
    "consumer": _consumer,
    "consumer_plugins": _consumer_plugins,
    "other_consumer_plugins": _other_consumer_plugins,
    "aggregate3": _aggregate3,
}
JSON_RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Sun, 22 Nov 2026 12:00:00 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: 11\r\n\r\n"
    b'{"ok":true}'
)


class FakeTransport:
    """Enough of asyncio.Transport for the protocols; records what was written."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def writelines(self, parts: list[bytes]) -> None:
        for part in parts:
            self.written += len(part)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name in ("peername", "sockname") else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def write_eof(self) -> None:
        pass


async def run(requests: int, profile: bool, config_name: str, metrics: bool) -> float:
    with tempfile.TemporaryDirectory(prefix="apigate-micro-") as workdir:
        bench = CONFIGS[config_name](Path(workdir))
        gateway = Gateway(parse_config(bench.config))
        if metrics:
            gateway.observers.append(GatewayMetrics(gateway).recorder.observe)  # as install()
        for plugin in gateway.runtime.plugins:  # e.g. the access log opens its file
            await plugin.start()
        DATE.start(asyncio.get_running_loop())  # as the server: the wall clock's offset kept
        try:
            if config_name == "aggregate3":
                return await _measure_aggregate(gateway, bench.request, requests, profile)
            return _measure(gateway, bench.request, requests, profile)
        finally:
            DATE.stop()
            for plugin in gateway.runtime.plugins:
                await plugin.close()


class _OwnTurns:
    """The event loop as the write batch sees it, where `one()` ends each turn itself (its
    flush calls): the callback the batch asks for is not scheduled. (On the real loop, never
    run while `one()` loops, those callbacks piled up: ~4 µs a request.)"""

    def call_soon(self, callback: Any, *args: Any) -> None:
        pass


def _measure(gateway: Gateway, request: bytes, requests: int, profile: bool) -> float:
    service = gateway.services.services["up"]
    inst = next(iter(service.instances.values()))
    pool = service.pool_for(inst)
    gateway.writes = pool.writes = WriteBatch(_OwnTurns())  # type: ignore[arg-type]
    upstream = UpstreamConnection(pool)
    upstream.connection_made(FakeTransport(("127.0.0.1", 9)))  # type: ignore[arg-type]
    pool.total += 1
    pool.idle.append(upstream)
    client = ClientConnection(gateway)
    client.connection_made(FakeTransport(("127.0.0.1", 50000)))  # type: ignore[arg-type]

    def one() -> None:  # each read, then what the loop does at the end of its turn
        client.data_received(request)
        gateway.writes.flush()
        upstream.data_received(RESPONSE)
        gateway.writes.flush()

    for _ in range(2000):  # warm up caches (matcher host cache, pools)
        one()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    start = time.process_time()  # CPU time: steadier than wall time on a busy machine
    for _ in range(requests):
        one()
    elapsed = time.process_time() - start
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    assert upstream.requests >= requests, "the upstream connection was not reused"
    return elapsed / requests * 1e6


async def _measure_aggregate(
    gateway: Gateway, request: bytes, requests: int, profile: bool
) -> float:
    """As `_measure`, for a route whose handler runs as tasks: each request is fed, the loop
    runs until the three part requests are written upstream, their answers are fed back, and
    the loop runs until the client's response is written. The event loop's own iterations
    (three or four per request, no I/O) are part of the figure."""
    service = gateway.services.services["up"]
    pool = service.pool_for(next(iter(service.instances.values())))
    upstreams = []
    for _ in range(3):
        upstream = UpstreamConnection(pool)
        upstream.connection_made(FakeTransport(("127.0.0.1", 9)))  # type: ignore[arg-type]
        pool.total += 1
        pool.idle.append(upstream)
        upstreams.append(upstream)
    client = ClientConnection(gateway)
    client_transport = FakeTransport(("127.0.0.1", 50000))
    client.connection_made(client_transport)  # type: ignore[arg-type]

    async def one() -> None:
        answered = client_transport.written
        client.data_received(request)
        for _ in range(10):
            await asyncio.sleep(0)
            busy = [up for up in upstreams if up.listener is not None]
            if len(busy) == 3:
                break
        else:
            raise RuntimeError("the parts were not sent upstream")
        for up in busy:
            up.data_received(JSON_RESPONSE)
        for _ in range(10):
            await asyncio.sleep(0)
            if client_transport.written > answered:
                return
        raise RuntimeError("the aggregate was not answered")

    for _ in range(2000):
        await one()
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    start = time.process_time()
    for _ in range(requests):
        await one()
    elapsed = time.process_time() - start
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
    assert sum(up.requests for up in upstreams) >= 3 * requests, "connections not reused"
    return elapsed / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="plain")
    parser.add_argument("--metrics", action="store_true", help="add the metrics observer")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    per_request = asyncio.run(run(args.requests, args.profile, args.config, args.metrics))
    name = args.config + (" + metrics" if args.metrics else "")
    print(f"{name}: {per_request:.2f} µs of Python per proxied request")


if __name__ == "__main__":
    main()
