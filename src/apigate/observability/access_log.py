"""The access log: one JSON line per request, to stdout or a file.

Lines are appended to an in-memory buffer and flushed once a second (or at 64 KiB), so the
hot path does no syscall per request. The `Authorization` header and query strings are never
logged; only the path.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from typing import IO, Any, Literal

from apigate.observability.tracing import trace_id_of
from apigate.periodic import Periodic
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv

_FLUSH_BYTES = 64 * 1024


class AccessLogConfig(PluginConfig):
    format: Literal["json"] = "json"
    path: str = "-"  # "-" = stdout


class AccessLogPlugin(Plugin):
    name = "access_log"
    priority = 0
    Config = AccessLogConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, AccessLogConfig)
        self.path = config.path
        self._out: IO[str] | None = None
        self._buf: list[str] = []
        self._size = 0
        self._ticker = Periodic(self.flush)

    async def start(self) -> None:
        if self.path == "-":
            self._out = sys.stdout
        else:
            self._out = await asyncio.to_thread(open, self.path, "a", encoding="utf-8")
        self._ticker.start(asyncio.get_running_loop())

    async def close(self) -> None:
        self._ticker.stop()
        self.flush()
        if self._out is not None and self._out is not sys.stdout:
            self._out.close()
        self._out = None

    def flush(self) -> None:
        if self._buf and self._out is not None:
            self._out.write("".join(self._buf))
            self._out.flush()
        self._buf.clear()
        self._size = 0

    def on_log(self, ctx: Any) -> None:
        req = ctx.request
        route = ctx.route
        inst = ctx.instance
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(req.start))
            + f".{int((req.start % 1) * 1000):03d}Z",
            "request_id": req.request_id,
            "trace_id": trace_id_of(ctx),
            "client": req.client_ip,
            "method": req.method,
            "path": req.path,
            "route": route.name if route is not None else None,
            "service": ctx.service.name if ctx.service is not None else None,
            "instance": inst.id if inst is not None else None,
            "status": ctx.status,
            "bytes": ctx.bytes_sent,
            "upstream_ms": round(ctx.upstream_ms, 3) if ctx.upstream_ms is not None else None,
            "total_ms": round(ctx.total_ms, 3) if ctx.total_ms is not None else None,
        }
        if ctx.consumer is not None:
            doc["consumer"] = getattr(ctx.consumer, "name", str(ctx.consumer))
        if ctx.retries:
            doc["retries"] = ctx.retries
        breaker = ctx.service.breaker if ctx.service is not None else None
        if breaker is not None and breaker.state.value != "closed":
            doc["breaker"] = breaker.state.value  # open: refused here; half_open: a probe
        if ctx.cache_status:
            doc["cache"] = ctx.cache_status
        if ctx.error:
            doc["error"] = ctx.error
        line = json.dumps(doc, separators=(",", ":")) + "\n"
        self._buf.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_BYTES:
            self.flush()
