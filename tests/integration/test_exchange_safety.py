"""Exchange edge cases found in review: each once let a request through, hung, or lied."""

from __future__ import annotations

import asyncio
from typing import Any

from apigate.plugins.base import Plugin, Response
from tests.support.gateway import GatewayProcess, base_config, raw_request
from tests.support.upstream import Upstream

HERE = "tests.integration.test_exchange_safety"


class SlowDeny(Plugin):
    """An async auth-like hook that refuses after a while (a JWKS fetch, a Redis call)."""

    name = "slow_deny"
    priority = 5000

    async def on_request(self, ctx: Any) -> Response:
        await asyncio.sleep(0.3)
        return Response(401, b'{"error":"unauthorized"}')


class BrokenResponseHook(Plugin):
    name = "broken"
    priority = 10

    def on_response(self, ctx: Any, head: Any) -> None:
        raise RuntimeError("plugin bug")


def _route(up_url: str, **route: Any) -> dict[str, Any]:
    return base_config(
        services={"up": {"targets": [up_url]}},
        routes=[{"name": "r", "match": {"paths": ["/"]}, "service": "up", **route}],
    )


async def test_oversized_body_cannot_overtake_a_pending_async_hook() -> None:
    plugins = {
        f"{HERE}:SlowDeny": {},
        "request_transform": {"json": {"add": {"x": 1}}, "max_body_bytes": "1KiB"},
    }
    async with Upstream() as up, GatewayProcess(_route(up.url, plugins=plugins)) as gw:
        body = b'{"pad": "' + b"y" * 5000 + b'"}'
        chunk = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
        head = (
            b"POST /echo HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        resp = await raw_request(gw.port, head + chunk)
        assert resp.startswith(b"HTTP/1.1 401"), resp[:200]
        await asyncio.sleep(0.2)
        assert up.received == []


async def test_a_failing_response_hook_is_a_500_not_a_hang() -> None:
    cfg = _route("", plugins={f"{HERE}:BrokenResponseHook": {}})
    async with Upstream() as up:
        cfg["services"]["up"]["targets"] = [up.url]
        async with GatewayProcess(cfg) as gw:
            resp = await raw_request(gw.port, b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            assert resp.startswith(b"HTTP/1.1 500"), resp[:200]
            assert b'"plugin_error"' in resp
            again = await raw_request(gw.port, b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n")
            assert again.startswith(b"HTTP/1.1 500")  # and the gateway still serves


async def test_status_retry_without_another_instance_returns_the_real_answer() -> None:
    async with Upstream() as up:
        cfg = _route(up.url)
        cfg["services"]["up"]["retries"] = {"attempts": 1, "on": [503]}
        async with GatewayProcess(cfg) as gw:
            resp = await raw_request(gw.port, b"GET /status/503 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert resp.startswith(b"HTTP/1.1 503"), resp[:200]
            assert b'{"status": 503}' in resp  # the upstream's own body
            assert len(up.received) == 1


async def test_target_path_is_put_before_the_request_path() -> None:
    async with Upstream() as up:
        cfg = _route(f"{up.url}/base")
        async with GatewayProcess(cfg) as gw:
            resp = await raw_request(gw.port, b"GET /echo?q=1 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert resp.startswith(b"HTTP/1.1 200")
            assert up.received[-1].path == "/base/echo"
            assert up.received[-1].query == "q=1"


class _AnswerThenClose(asyncio.Protocol):
    """An upstream that answers its first request after 300 ms with a keep-alive response
    and closes the connection in the same breath (response and FIN arrive together), and
    answers later connections' requests at once."""

    connections = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).connections += 1
        self.first = type(self).connections == 1
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        if b"\r\n\r\n" not in data:
            return
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok"
        if self.first:
            loop = asyncio.get_running_loop()
            loop.call_later(0.3, lambda: (self.transport.write(answer), self.transport.close()))
        else:
            self.transport.write(answer)


async def test_a_connection_handed_over_then_closed_by_the_upstream_is_not_used() -> None:
    """Every slot busy, a request waits; the busy connection's response hands it to the
    waiter, and the upstream's FIN, right behind the response, closes it as the waiter takes
    it. The waiter's request goes out again on a new connection (the keep-alive race), not
    a 502, nor a wait for the response timeout."""
    _AnswerThenClose.connections = 0
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_AnswerThenClose, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = _route(f"http://127.0.0.1:{port}")
    cfg["services"]["up"].update(
        {"max_connections": 1, "max_pending": 1, "timeouts": {"response": "3s"}}
    )
    try:
        async with GatewayProcess(cfg) as gw:
            first = asyncio.ensure_future(
                raw_request(gw.port, b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
            )
            await asyncio.sleep(0.1)  # the first holds the one connection; the second waits
            started = loop.time()
            second = await raw_request(gw.port, b"GET /b HTTP/1.1\r\nHost: t\r\n\r\n")
            took = loop.time() - started
            assert (await first).startswith(b"HTTP/1.1 200")
            assert second.startswith(b"HTTP/1.1 200"), second[:200]
            assert took < 1.5, took
            assert _AnswerThenClose.connections == 2
    finally:
        server.close()
