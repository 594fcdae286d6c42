"""Shared fakes for the plugin unit tests (this module holds no tests).

A plugin hook receives the proxy exchange as `ctx`; these tests give it a small stand-in with
the attributes plugins read (`request`, `route`, `consumer`, `vars`) and a real `Request`, so
no socket, protocol or runtime is involved.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from apigate.config.schema import GatewayConfig
from apigate.http.request import Request
from apigate.http.response_head import ResponseHead
from apigate.plugins.base import Plugin, PluginEnv, Response
from apigate.plugins.chain import build_plugin


def make_request(
    method: str = "GET",
    path: str = "/",
    headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    *,
    query: bytes = b"",
    client_ip: str = "203.0.113.7",
    content_length: int | None = None,
    chunked: bool = False,
    forwarded_for: bytes | None = None,
) -> Request:
    req = Request()
    req.method = method
    req.path = path
    req.query = query
    req.headers = [
        (n.encode() if isinstance(n, str) else n, v.encode() if isinstance(v, str) else v)
        for n, v in headers
    ]
    req.client_ip = client_ip
    req.request_id = "req-1"
    req.content_length = content_length
    req.chunked = chunked
    req.forwarded_for = forwarded_for
    return req


class Ctx:
    """The part of `ProxyExchange` that plugins touch."""

    def __init__(self, request: Request, route: Any = None) -> None:
        self.request = request
        self.route = route
        self.consumer: Any = None
        self.vars: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Ctx {self.request!r}>"


def make_route(name: str = "r", plugins: dict[str, Any] | None = None) -> SimpleNamespace:
    return SimpleNamespace(name=name, config=SimpleNamespace(plugins=plugins or {}))


def make_ctx(*args: Any, route: Any = None, **kwargs: Any) -> Ctx:
    return Ctx(make_request(*args, **kwargs), route)


def make_env(consumers: Iterable[dict[str, Any]] = (), store: str = "memory") -> PluginEnv:
    config = GatewayConfig.model_validate({"consumers": list(consumers), "store": store})
    return PluginEnv(config=config)


def build(name: str, raw: dict[str, Any], env: PluginEnv | None = None) -> Any:
    """Build a plugin the way the chain does (so config errors read as in the file)."""
    plugin: Plugin = build_plugin(name, raw, env or make_env(), f"routes[0].plugins.{name}")
    return plugin


def resolve(outcome: Any) -> Response | None:
    """A hook's outcome, awaited in a fresh loop when the hook returned an awaitable."""
    if inspect.isawaitable(outcome):
        outcome = asyncio.run(_await(outcome))
    assert outcome is None or isinstance(outcome, Response)
    result: Response | None = outcome
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def settle(outcome: Any) -> Response | None:
    """Like `resolve`, inside a running loop."""
    if inspect.isawaitable(outcome):
        outcome = await outcome
    assert outcome is None or isinstance(outcome, Response)
    return outcome


def header(response: Response, name: str) -> str | None:
    target = name.lower().encode()
    for n, v in response.headers:
        if n.lower() == target:
            return v.decode("latin-1")
    return None


def body(response: Response) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(response.body)
    return doc


def upstream_head(headers: Iterable[tuple[bytes, bytes]] = ()) -> ResponseHead:
    head = ResponseHead()
    head.status = 200
    head.headers = list(headers)
    return head


def sent_header(req: Request, name: str) -> list[str]:
    return req.header_values(name.lower())
