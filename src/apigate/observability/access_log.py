"""The access log: one JSON line per request, to stdout or a file.

Lines are appended to an in-memory buffer and flushed once a second (or at 64 KiB), so the
hot path does no syscall per request. The `Authorization` header and query strings are never
logged; only the path.

Each line is exactly what `json.dumps(doc, separators=(",", ":"))` makes of the fields below
(same keys, same order, ASCII-only escaping), but built as one f-string: `json.dumps` with
keyword arguments makes a new `JSONEncoder` and walks a dict per call, which was most of the
plugin's cost. Every string goes through `encode_basestring_ascii`, the C function `json.dumps`
itself uses to quote and escape strings, so client-controlled values (path, request id, method)
are escaped exactly as before; nothing is escaped by hand.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from json.encoder import encode_basestring_ascii as _quote
from typing import IO, Any, Literal

from apigate.observability.tracing import trace_id_of
from apigate.periodic import Periodic
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv

_FLUSH_BYTES = 64 * 1024
# '.000Z' ... '.999Z': the milliseconds and zone of a timestamp, formatted once
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))


def _json(value: Any) -> str:
    """A value as json.dumps writes it (for the optional fields, whatever their type)."""
    return _quote(value) if type(value) is str else json.dumps(value, separators=(",", ":"))


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
        # '{"time":"YYYY-MM-DDTHH:MM:SS' of the last second logged: strftime once a second
        self._second = -1
        self._line_start = ""

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
        start = req.start
        second = int(start)  # time.gmtime also rounds down (and `start` is positive)
        if second != self._second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start))
            self._line_start = '{"time":"' + stamp
            self._second = second
        ms = int((start % 1) * 1000)
        route = ctx.route
        service = ctx.service
        inst = ctx.instance
        upstream_ms = ctx.upstream_ms
        total_ms = ctx.total_ms
        # set by the upstream head's trace headers; trace_id_of() makes one for the others
        trace_id = ctx.vars.get("trace_id") or trace_id_of(ctx)
        # The types are fixed (see ProxyExchange and Request): names and ids are str, status
        # and bytes int, durations finite floats or None, so each value is formatted directly.
        line = (
            f'{self._line_start}{_MILLIS[ms] if ms < 1000 else f".{ms}Z"}",'
            f'"request_id":{_quote(req.request_id)},'
            f'"trace_id":{_quote(trace_id)},'
            f'"client":{_quote(req.client_ip)},'
            f'"method":{_quote(req.method)},'
            f'"path":{_quote(req.path)},'
            f'"route":{"null" if route is None else _quote(route.name)},'
            f'"service":{"null" if service is None else _quote(service.name)},'
            f'"instance":{"null" if inst is None else _quote(inst.id)},'
            f'"status":{ctx.status},'
            f'"bytes":{ctx.bytes_sent},'
            f'"upstream_ms":{"null" if upstream_ms is None else round(upstream_ms, 3)},'
            f'"total_ms":{"null" if total_ms is None else round(total_ms, 3)}'
        )
        # the optional fields, present only when they say something (most requests: none)
        if ctx.consumer is not None:
            consumer = ctx.consumer
            line += f',"consumer":{_json(getattr(consumer, "name", str(consumer)))}'
        if ctx.retries:
            line += f',"retries":{_json(ctx.retries)}'
        breaker = service.breaker if service is not None else None
        if breaker is not None and breaker.state.value != "closed":
            # open: refused here; half_open: a probe
            line += f',"breaker":{_json(breaker.state.value)}'
        if ctx.cache_status:
            line += f',"cache":{_json(ctx.cache_status)}'
        if ctx.error:
            line += f',"error":{_json(ctx.error)}'
        line += "}\n"
        self._buf.append(line)
        self._size += len(line)
        if self._size >= _FLUSH_BYTES:
            self.flush()
