"""The access log: one JSON line per request, to stdout or a file.

Lines are kept in memory and written once a second (or every 256 lines, ~64 KiB), so the hot
path does no syscall per request. The `Authorization` header and query strings are never
logged; only the path.

Per request, `on_log` only copies the line's values into a tuple; the lines are formatted
together when they are written. The same formatting code then runs in a tight loop, hot in the
CPU's caches: measured in bench/micro.py, a line costs ~3 µs less that way than formatted in
between the rest of each request's work.

Each line is exactly what `json.dumps(doc, separators=(",", ":"))` makes of the fields (same
keys, same order, ASCII-only escaping), but built as one f-string: `json.dumps` with keyword
arguments makes a new `JSONEncoder` and walks a dict per call, which was most of the plugin's
cost. Every string goes through `encode_basestring_ascii`, the C function `json.dumps` itself
uses to quote and escape strings, so client-controlled values (path, request id, method) are
escaped exactly as before; nothing is escaped by hand."""

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

# Lines wait (as tuples of their values) until this many, or the once-a-second tick: ~64 KiB
_FLUSH_LINES = 256
# '.000Z' ... '.999Z': the milliseconds and zone of a timestamp, formatted once
_MILLIS = tuple(f".{ms:03d}Z" for ms in range(1000))

# What on_log keeps of an exchange for its line, all immutable values copied at log time:
# (start, request id, trace id, client, method, path, route, service, instance, status, bytes,
# upstream_ms, total_ms, then the optional consumer, retries, breaker, cache, error). A plain
# tuple: the cheapest thing to build per request.
Entry = tuple[Any, ...]


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
        self._pending: list[Entry] = []
        self._ticker = Periodic(self.flush)
        # '{"time":"YYYY-MM-DDTHH:MM:SS' of the last second formatted: strftime once a second
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
        # taken out first, so that a failure can neither write a line twice nor let them pile up
        pending, self._pending = self._pending, []
        if pending and self._out is not None:
            self._out.write("".join([self._line(entry) for entry in pending]))
            self._out.flush()

    def on_log(self, ctx: Any) -> None:
        # Only the values, copied now (a breaker's state, for one, changes later); the line is
        # made by _line when it is written.
        req = ctx.request
        route = ctx.route
        service = ctx.service
        inst = ctx.instance
        consumer = ctx.consumer
        breaker = service.breaker if service is not None else None
        pending = self._pending
        pending.append(
            (
                req.start,
                req.request_id,
                # set with the upstream head's trace headers; trace_id_of() makes the others'
                ctx.vars.get("trace_id") or trace_id_of(ctx),
                req.client_ip,
                req.method,
                req.path,
                None if route is None else route.name,
                None if service is None else service.name,
                None if inst is None else inst.id,
                ctx.status,
                ctx.bytes_sent,
                ctx.upstream_ms,
                ctx.total_ms,
                None if consumer is None else getattr(consumer, "name", str(consumer)),
                ctx.retries,
                None if breaker is None else breaker.state.value,
                ctx.cache_status,
                ctx.error,
            )
        )
        if len(pending) >= _FLUSH_LINES:
            self.flush()

    def _line(self, entry: Entry) -> str:
        """One entry as its JSON line (what json.dumps made of the same fields as a dict)."""
        (
            start,
            request_id,
            trace_id,
            client,
            method,
            path,
            route,
            service,
            instance,
            status,
            sent,
            upstream_ms,
            total_ms,
            consumer,
            retries,
            breaker,
            cache,
            error,
        ) = entry
        second = int(start)  # time.gmtime also rounds down (and `start` is positive)
        if second != self._second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start))
            self._line_start = '{"time":"' + stamp
            self._second = second
        ms = int((start % 1) * 1000)
        # The types are fixed (see ProxyExchange and Request): names and ids are str, status
        # and bytes int, durations finite floats or None, so each value is formatted directly.
        line = (
            f'{self._line_start}{_MILLIS[ms] if ms < 1000 else f".{ms}Z"}",'
            f'"request_id":{_quote(request_id)},'
            f'"trace_id":{_quote(trace_id)},'
            f'"client":{_quote(client)},'
            f'"method":{_quote(method)},'
            f'"path":{_quote(path)},'
            f'"route":{"null" if route is None else _quote(route)},'
            f'"service":{"null" if service is None else _quote(service)},'
            f'"instance":{"null" if instance is None else _quote(instance)},'
            f'"status":{status},'
            f'"bytes":{sent},'
            f'"upstream_ms":{"null" if upstream_ms is None else round(upstream_ms, 3)},'
            f'"total_ms":{"null" if total_ms is None else round(total_ms, 3)}'
        )
        # the optional fields, present only when they say something (most requests: none)
        if consumer is not None:
            line += f',"consumer":{_json(consumer)}'
        if retries:
            line += f',"retries":{_json(retries)}'
        if breaker is not None and breaker != "closed":  # open: refused; half_open: a probe
            line += f',"breaker":{_json(breaker)}'
        if cache:
            line += f',"cache":{_json(cache)}'
        if error:
            line += f',"error":{_json(error)}'
        return line + "}\n"
