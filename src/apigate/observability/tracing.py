"""W3C Trace Context (traceparent / tracestate) on every request, and optional OTLP export.

Propagation is on the hot path and costs one span id per request:

    client ──traceparent: 00-T-P-01──► gateway ──traceparent: 00-T-S-01──► upstream
                                    (tracestate passes through unchanged)

`T` is kept when the client's `traceparent` is valid (strict: version 00, lower-case hex, right
lengths, not all zeros; two `traceparent` fields are invalid too), otherwise the gateway starts
a new trace and drops the client's `tracestate`, which belongs to the trace it no longer
continues. Of the client's flags only the sampled bit (01) goes on: the others are reserved,
and W3C Trace Context asks whoever propagates a trace to send them as zero. `S` is the id of
the gateway's *upstream (client) span*: the upstream's own span becomes its child. The
gateway's server span gets its id only when it is exported.

Costs: ids are random lower-case hex digits sliced from one `os.urandom` draw of 4 KiB
(hexlified once), so an id costs a bytes slice and the system call is shared by a few hundred
ids (`os.urandom(8).hex()` per id cost ~0.6 µs: a system call each); a forked worker draws its
own. Span ids are 64 random bits, as OpenTelemetry's; a new trace is sampled by the low 64 bits
of its id. The header is assembled as bytes, and the parser keeps the client's `traceparent`
and `tracestate` apart from the other headers, so nothing scans the header list for them.

The propagation functions live in `apigate.observability.trace_context` (compiled with the data
plane) and are re-exported here. OpenTelemetry export is optional (`pip install
'apigate[otlp]'`): `TracingPlugin` imports the SDK only when its config sets `otlp_endpoint`;
without it the plugin has no hook at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
from typing import Any

from pydantic import Field, model_validator

from apigate.observability.trace_context import (
    TRACE_HEADERS,
    ChildTrace,
    PartSpan,
    continue_trace,
    new_span_id,
    new_trace,
    new_trace_id,
    outgoing_traceparent,
    parse_traceparent,
    reset_sample_ratio,
    set_sample_ratio,
    span_context,
    trace_headers,
    trace_id_of,
)
from apigate.periodic import Periodic
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv

log = logging.getLogger("apigate.tracing")

__all__ = [
    "TRACE_HEADERS",
    "ChildTrace",
    "TracingPlugin",
    "continue_trace",
    "new_span_id",
    "new_trace",
    "new_trace_id",
    "outgoing_traceparent",
    "parse_traceparent",
    "reset_sample_ratio",
    "set_sample_ratio",
    "span_context",
    "trace_headers",
    "trace_id_of",
]


# ---------------------------------------------------------------------- the plugin
def otel_available() -> bool:
    """Whether the optional OpenTelemetry SDK and OTLP/HTTP exporter can be imported."""
    for name in ("opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http"):
        try:
            if importlib.util.find_spec(name) is None:
                return False
        except (ImportError, ValueError):
            return False
    return True


class TracingConfig(PluginConfig):
    otlp_endpoint: str | None = None  # e.g. http://collector:4318 (OTLP over HTTP/protobuf)
    service_name: str = "apigate"
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _needs_sdk(self) -> TracingConfig:
        if self.otlp_endpoint and not otel_available():
            raise ValueError(
                "otlp_endpoint needs the optional OpenTelemetry packages, which are not "
                "installed: pip install 'apigate[otlp]' (opentelemetry-sdk and "
                "opentelemetry-exporter-otlp-proto-http)"
            )
        return self


# (trace, start s, total ms, upstream ms, method, path, route, service, instance, status,
#  request id, error, an aggregate's part spans) of one finished exchange, kept until the next
#  export
_Record = tuple[
    tuple[str, str, str, str],
    float,
    float,
    float | None,
    str,
    str,
    str,
    str,
    Any,
    int,
    str,
    Any,
    list[PartSpan],
]
_MAX_QUEUE = 20_000


class TracingPlugin(Plugin):
    """`plugins: {tracing: {otlp_endpoint: http://collector:4318}}`: a span per request (server
    kind) with an upstream child span (client kind, the id sent in `traceparent`), exported in
    batches once a second from a worker thread."""

    name = "tracing"
    priority = 3000
    Config = TracingConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, TracingConfig)
        self.cfg = config
        self.queue: list[_Record] = []
        self.dropped = 0
        self.exported = 0
        self._exporter: Any = None
        self._ticker = Periodic(self.flush)
        self._pending: set[asyncio.Future[None]] = set()
        if config.otlp_endpoint:  # only then does the chain see an on_log hook
            self.on_log = self._record

    async def start(self) -> None:
        set_sample_ratio(self.cfg.sample_ratio, owner=self)
        if not self.cfg.otlp_endpoint:
            return
        self._exporter = make_exporter(self.cfg.otlp_endpoint)
        self._ticker.start(asyncio.get_running_loop())

    async def close(self) -> None:
        reset_sample_ratio(self)
        self._ticker.stop()
        self.flush()
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._exporter is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self._exporter.shutdown)
            self._exporter = None

    def _record(self, ctx: Any) -> None:
        trace = span_context(ctx)
        if trace[3] != "01" and not int(trace[3], 16) & 1:
            return  # parent-based: the caller (or `sample_ratio` for our own) said no
        if len(self.queue) >= _MAX_QUEUE:
            self.dropped += 1
            return
        req = ctx.request
        route = ctx.route
        service = ctx.service
        self.queue.append(
            (
                trace,
                req.start,
                ctx.total_ms or 0.0,
                ctx.upstream_ms,
                req.method,
                req.path,
                route.name if route is not None else "",
                service.name if service is not None else "",
                ctx.instance,
                ctx.status,
                req.request_id,
                ctx.error,
                ctx.vars.get("part_spans") or [],
            )
        )

    def flush(self) -> None:
        """Hand the queued records to a worker thread that builds and exports the spans."""
        if not self.queue or self._exporter is None:
            return
        batch, self.queue = self.queue, []
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(None, self._export, batch)
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)

    def _export(self, batch: list[_Record]) -> None:
        spans = build_spans(batch, self.cfg.service_name)
        try:
            result = self._exporter.export(spans)
        except Exception:
            log.warning("OTLP export failed", exc_info=True, extra={"event": "otlp_export"})
            return
        if getattr(result, "name", "SUCCESS") == "SUCCESS":
            self.exported += len(spans)
        else:
            log.warning("OTLP export failed: %s", result, extra={"event": "otlp_export"})


def make_exporter(endpoint: str) -> Any:
    """An OTLP/HTTP span exporter; a bare `http://host:4318` gets the `/v1/traces` path."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    url = endpoint.rstrip("/")
    if url.count("/") <= 2:
        url += "/v1/traces"
    return OTLPSpanExporter(endpoint=url, timeout=5)


def build_spans(batch: list[_Record], service_name: str) -> list[Any]:
    """OpenTelemetry `ReadableSpan`s: a server span per exchange and, when it reached an
    upstream, a client span for the time to the upstream's response head (one per part for an
    aggregate route). The exchange does
    not record when the upstream attempt began, so the client span starts with the server span."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import ReadableSpan
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags

    from apigate import __version__

    resource = Resource.create({"service.name": service_name})
    scope = InstrumentationScope("apigate", __version__)
    spans: list[Any] = []
    for record in batch:
        (trace, start, total_ms, up_ms, method, path, route, service, inst, status, rid, err) = (
            record[:12]
        )
        part_spans = record[12]
        trace_id = int(trace[0], 16)
        flags = TraceFlags(int(trace[3], 16))
        start_ns = int(start * 1e9)
        server_ctx = SpanContext(trace_id, int(new_span_id(), 16), False, flags)
        parent = SpanContext(trace_id, int(trace[2], 16), True, flags) if trace[2] else None
        attributes: dict[str, Any] = {
            "http.request.method": method,
            "url.path": path,
            "http.route": route,
            "http.response.status_code": status,
            "apigate.service": service,
            "apigate.request_id": rid,
        }
        if err:
            attributes["error.message"] = str(err)
        failed = status >= 500 or status == 0
        spans.append(
            ReadableSpan(
                f"{method} {route or '(no route)'}",
                context=server_ctx,
                parent=parent,
                resource=resource,
                attributes=attributes,
                kind=SpanKind.SERVER,
                instrumentation_scope=scope,
                status=Status(StatusCode.ERROR if failed else StatusCode.UNSET),
                start_time=start_ns,
                end_time=start_ns + int(total_ms * 1e6),
            )
        )
        if up_ms is not None and trace[1]:
            up_attrs: dict[str, Any] = {"apigate.service": service, "http.request.method": method}
            if inst is not None:
                up_attrs.update(
                    {
                        "server.address": inst.host,
                        "server.port": inst.port,
                        "apigate.instance": inst.id,
                    }
                )
            spans.append(
                ReadableSpan(
                    f"upstream {service}",
                    context=SpanContext(trace_id, int(trace[1], 16), False, flags),
                    parent=server_ctx,
                    resource=resource,
                    attributes=up_attrs,
                    kind=SpanKind.CLIENT,
                    instrumentation_scope=scope,
                    start_time=start_ns,
                    end_time=start_ns + int(up_ms * 1e6),
                )
            )
        for part, part_service, span_id, part_start, part_ms, part_failed in part_spans:
            part_start_ns = int(part_start * 1e9)
            spans.append(
                ReadableSpan(
                    f"part {part}",
                    context=SpanContext(trace_id, int(span_id, 16), False, flags),
                    parent=server_ctx,
                    resource=resource,
                    attributes={"apigate.service": part_service, "apigate.part": part},
                    kind=SpanKind.CLIENT,
                    instrumentation_scope=scope,
                    status=Status(StatusCode.ERROR if part_failed else StatusCode.UNSET),
                    start_time=part_start_ns,
                    end_time=part_start_ns + int(part_ms * 1e6),
                )
            )
    return spans
