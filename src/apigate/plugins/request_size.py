"""Request body size limit per route (`request_size`).

A declared Content-Length above `max_bytes` is refused with 413 before a byte of the body is
read (the exchange has not asked for the body yet when `on_request` runs). A chunked body has
no declared length: the plugin lowers the connection's streaming limit to `max_bytes`, so the
protocol stops it with a 413 as soon as it grows past the limit.
"""

from __future__ import annotations

from typing import Any

from apigate.config.units import Size
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.identity import StrictPluginConfig, reject


class RequestSizeConfig(StrictPluginConfig):
    max_bytes: Size


class RequestSizePlugin(Plugin):
    name = "request_size"
    priority = 1900
    Config = RequestSizeConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, RequestSizeConfig)
        self.max_bytes = config.max_bytes
        self._message = f"request body larger than {config.max_bytes} bytes"

    def on_request(self, ctx: Any) -> Response | None:
        req = ctx.request
        length = req.content_length
        if length is not None and length > self.max_bytes:
            return reject(ctx, 413, "payload_too_large", self._message)
        if req.chunked:
            if getattr(ctx, "buffered_body_bytes", 0) > self.max_bytes:  # read while queued
                return reject(ctx, 413, "payload_too_large", self._message)
            conn = getattr(ctx, "conn", None)
            if conn is not None and conn.apply_route_limits(ctx, None, None) > self.max_bytes:
                conn.apply_route_limits(ctx, self.max_bytes, None)
        return None

    def __repr__(self) -> str:
        return f"<RequestSizePlugin max_bytes={self.max_bytes}>"
