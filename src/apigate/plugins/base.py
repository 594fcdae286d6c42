"""The plugin contract (ARCHITECTURE.md).

A plugin is a class with a `name`, a `priority`, a pydantic `Config` and any of these hooks:

- `on_request(ctx) -> Response | None` — may return an awaitable; a `Response` stops the chain
  (401, 429, a cache hit). Runs after routing, before an instance is picked.
- `on_upstream_request(ctx, request)` — edit the request that goes upstream (headers, path).
- `on_response(ctx, head)` — edit the upstream response head before the client sees it.
- `on_response_chunk(ctx, chunk)` (also accepted as `on_body_chunk`) — every response body
  chunk as sent to the client; `on_response_end(ctx)` — once, when it ended (`ctx.error` is
  None only if the client got the whole body).
- `on_log(ctx)` — after the response is finished (access logs, metrics).

A consumer's `plugins:` (Kong's consumer-scoped plugins) are built once per snapshot with
`env.consumer` set to its name, and run for that consumer's requests in place of the route's or
global plugin of the same name. Only plugins that run once the consumer is known may be named
there (`apigate.plugins.chain.AUTH_FLOOR`): a class that sets `ctx.consumer` says so with
`identifies_consumers`, and one that judges the consumer for the route (`acl`) refuses to be a
consumer's with `on_consumers = False`.

Hooks are plain functions unless they must wait (Redis, JWKS fetch): the exchange only creates a
task when a hook actually returns an awaitable, so synchronous plugins cost no scheduling.
The chain takes each hook from the plugin *instance*, so `__init__` may also set one as an
attribute (any callable): the built-in jwt, rate_limit and access_log plugins bind the methods
of their compiled per-request halves that way, with no interpreted frame in between.
Higher `priority` runs first (auth 1000+, rate limit 900, cache 800, transform 700, log 0).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from apigate.config.schema import StrictModel
from apigate.plugins.response import Response

__all__ = ["Plugin", "PluginConfig", "PluginEnv", "Response"]

if TYPE_CHECKING:
    from apigate.config.schema import ConsumerConfig, GatewayConfig


class PluginConfig(StrictModel):
    """Base for plugin configs: unknown keys are errors with a "did you mean", as everywhere."""


@dataclass
class PluginEnv:
    """What a plugin may use besides its own config: the whole config, shared state, a loop."""

    config: GatewayConfig
    loop: asyncio.AbstractEventLoop | None = None
    store: Any = None  # apigate.store backend (memory / sqlite / redis) once it exists
    shared: dict[str, Any] = field(default_factory=dict)  # per-process objects kept across reloads
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("apigate.plugins"))
    # the consumer whose `plugins:` this plugin is built for; None: a route's or a global one
    consumer: str | None = None

    def consumers(self) -> list[ConsumerConfig]:
        return list(self.config.consumers)


class Plugin:
    name: ClassVar[str] = ""
    priority: ClassVar[int] = 500
    Config: ClassVar[type[PluginConfig]] = PluginConfig
    # sets ctx.consumer (an authentication plugin): consumers' plugins are chosen after it
    identifies_consumers: ClassVar[bool] = False
    # may a consumer's `plugins:` name it (not an auth plugin, nor `acl`, which judges the
    # consumer for the route: Kong refuses both on consumers)
    on_consumers: ClassVar[bool] = True

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        self.config = config
        self.env = env

    async def start(self) -> None:
        """Background work (JWKS refresh, store connections); called once per snapshot."""

    async def close(self) -> None:
        """Undo `start`; called when the snapshot that built this instance is retired."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} priority={self.priority}>"
