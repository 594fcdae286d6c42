"""Trace context through a real gateway, and OTLP export to a fake collector.

The same trace id must appear at the client's side (its traceparent), in what the upstream
receives, and in the access log, which the test reads from its file.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any, ClassVar

from apigate.observability.tracing import TracingPlugin
from tests.integration.test_observability_metrics import (
    admin,
    gateway_config,
    key,
    proxy,
    samples,
)
from tests.support.gateway import GatewayProcess, raw_request, running_gateway
from tests.support.upstream import Upstream

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01"


def traced_config(upstream_url: str, log_path: Path, **plugins: Any) -> dict[str, Any]:
    cfg = gateway_config(upstream_url)
    cfg["plugins"] = {"access_log": {"path": str(log_path)}, **plugins}
    return cfg


def logged_trace_ids(log_path: Path) -> list[str]:
    return [json.loads(line)["trace_id"] for line in log_path.read_text().splitlines()]


async def get(port: int, target: str, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return await raw_request(port, f"GET {target} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode())


async def test_same_trace_id_at_client_upstream_and_log(tmp_path: Path) -> None:
    log_path = tmp_path / "access.log"
    async with Upstream() as up:
        async with running_gateway(traced_config(up.url, log_path), tmp_path) as gw:
            resp = await get(gw.proxy_port, "/api/echo", f"traceparent: {VALID}", "tracestate: a=1")
            assert resp.startswith(b"HTTP/1.1 200")
            sent = up.received[-1].header_values("traceparent")
            assert len(sent) == 1  # the client's field was replaced, not repeated
            assert up.received[-1].header_values("tracestate") == ["a=1"]
            version, trace_id, span_id, flags = sent[0].split("-")
            assert (version, trace_id, flags) == ("00", TRACE, "01")
            assert span_id != PARENT and len(span_id) == 16

            await get(gw.proxy_port, "/api/echo", "traceparent: 00-bad", "tracestate: a=1")
            started = up.received[-1].header("traceparent")  # invalid: the gateway starts one
            assert up.received[-1].header("tracestate") is None
            assert started is not None

            await get(gw.proxy_port, "/nowhere", f"traceparent: {VALID}")  # 404, never upstream
        # the access log is flushed when the gateway stops
        ids = logged_trace_ids(log_path)
        assert ids == [TRACE, started.split("-")[1], TRACE]
        assert ids[1] != TRACE


async def test_the_access_log_line_of_a_real_exchange(tmp_path: Path) -> None:
    """Every base field as the gateway's own exchange fills it in (the unit tests log
    stand-ins, which take another path)."""
    log_path = tmp_path / "access.log"
    async with Upstream() as up, running_gateway(traced_config(up.url, log_path), tmp_path) as gw:
        resp = await get(gw.proxy_port, "/api/echo?x=1")
        head, _, body = resp.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        request_id = next(
            line.split(b":", 1)[1].strip().decode()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"x-request-id:")
        )
        await get(gw.proxy_port, "/nowhere")
    first, second = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert first["request_id"] == request_id and len(first["trace_id"]) == 32
    assert (first["client"], first["method"], first["path"]) == ("127.0.0.1", "GET", "/api/echo")
    assert (first["route"], first["service"], first["status"]) == ("api", "up", 200)
    assert first["instance"] == f"127.0.0.1:{up.port}"
    assert first["bytes"] == len(body) > 0
    assert 0 <= first["upstream_ms"] <= first["total_ms"]
    assert not {"consumer", "retries", "breaker", "cache", "error"} & first.keys()
    assert (second["route"], second["service"], second["instance"]) == (None, None, None)
    assert (second["status"], second["upstream_ms"]) == (404, None)


async def test_latencies_are_finer_than_the_loop_clock(tmp_path: Path) -> None:
    """uvloop's loop.time() ticks in whole milliseconds: timed by it, a local request took
    0 or 1 ms, and the sub-millisecond histogram buckets and the ewma balancer saw nothing
    else. The gateway reads a precise monotonic clock instead."""
    log_path = tmp_path / "access.log"
    # a real `apigate run`, on uvloop (the tests' own loop is asyncio's, whose clock is precise)
    async with Upstream() as up, GatewayProcess(traced_config(up.url, log_path)) as gw:
        for _ in range(20):
            await get(gw.port, "/api/echo")
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    timings = [line[key] for line in lines for key in ("upstream_ms", "total_ms")]
    assert len(timings) == 40
    off_the_tick = [ms for ms in timings if abs(ms - round(ms)) > 0.01]
    assert len(off_the_tick) > 20, timings


async def test_requests_refused_while_parsing_are_logged_and_counted(tmp_path: Path) -> None:
    """A malformed head or one over a limit is answered by the connection itself, before any
    exchange: such 400s and 431s were in neither the access log nor the metrics (nginx logs
    them). The log shows what there was of the request."""
    log_path = tmp_path / "access.log"
    async with Upstream() as up, running_gateway(traced_config(up.url, log_path), tmp_path) as gw:
        twice = await raw_request(
            gw.proxy_port, b"GET /api/a HTTP/1.1\r\nHost: t\r\nHost: u\r\n\r\n"
        )
        bad_name = await raw_request(gw.proxy_port, b"PUT /api/b?c HTTP/1.1\r\nBad Name: 1\r\n\r\n")
        assert twice.startswith(b"HTTP/1.1 400 ") and bad_name.startswith(b"HTTP/1.1 400 ")
        _, _, body = await admin(gw, "GET", "/metrics")
    got = samples(body.decode())
    no_route = {"route": "", "service": ""}
    requests = got["apigate_requests_total"]
    assert requests[key(**no_route, method="GET", status_class="4xx")] == 1
    assert requests[key(**no_route, method="PUT", status_class="4xx")] == 1
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [(x["method"], x["path"], x["status"]) for x in lines] == [
        ("GET", "/api/a", 400),
        ("PUT", "/api/b", 400),  # (no query: as a served request's line)
    ]
    assert lines[0]["request_id"] == json.loads(twice.partition(b"\r\n\r\n")[2])["request_id"]
    assert lines[0]["bytes"] == len(twice.partition(b"\r\n\r\n")[2])
    assert lines[0]["route"] is None and "host" in lines[0]["error"].lower()


# ---------------------------------------------------------------------- OTLP export
class Collector(asyncio.Protocol):
    """A fake OTLP/HTTP collector: keeps every ExportTraceServiceRequest it is sent."""

    received: ClassVar[list[Any]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as pb

        self.buf += data
        head, sep, body = self.buf.partition(b"\r\n\r\n")
        if not sep:
            return
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        if len(body) < length:
            return
        self.buf = b""
        message = pb.ExportTraceServiceRequest()
        message.ParseFromString(body[:length])
        self.received.append(message)
        reply = pb.ExportTraceServiceResponse().SerializeToString()
        self.transport.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(reply), reply)
        )


async def test_otlp_export_of_server_and_upstream_spans(tmp_path: Path) -> None:
    # the OTLP exporter is an optional dependency of apigate, and a test dependency
    Collector.received.clear()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Collector, "127.0.0.1", 0)
    endpoint = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with Upstream() as up:
            cfg = traced_config(up.url, tmp_path / "access.log")
            cfg["plugins"]["apigate.observability.tracing:TracingPlugin"] = {
                "otlp_endpoint": endpoint,
                "service_name": "edge",
            }
            async with running_gateway(cfg, tmp_path) as gw:
                assert await proxy(gw, "GET", "/api/echo") == 200  # a new, sampled trace
                await get(gw.proxy_port, "/api/echo", f"traceparent: {VALID}")
                sent = up.received[-1].header("traceparent")
                assert sent is not None
                plugin = next(p for p in gw.runtime.plugins if isinstance(p, TracingPlugin))
                plugin.flush()
                for _ in range(100):
                    if Collector.received:
                        break
                    await asyncio.sleep(0.05)
    finally:
        server.close()
    spans = [
        (span, rs.resource)
        for message in Collector.received
        for rs in message.resource_spans
        for ss in rs.scope_spans
        for span in ss.spans
    ]
    assert len(spans) == 4  # two exchanges: a server span and an upstream span each
    ours = {span.span_id.hex(): span for span, _ in spans if span.trace_id.hex() == TRACE}
    upstream = ours[sent.split("-")[2]]
    server_span = ours[upstream.parent_span_id.hex()]
    assert server_span.parent_span_id.hex() == PARENT
    assert server_span.kind == 2 and upstream.kind == 3  # SERVER, CLIENT
    attrs = {a.key: a.value for a in server_span.attributes}
    assert attrs["http.route"].string_value == "api"
    assert attrs["http.response.status_code"].int_value == 200
    service_names = {
        a.value.string_value for _, res in spans for a in res.attributes if a.key == "service.name"
    }
    assert service_names == {"edge"}
