"""The access log's JSON lines: valid JSON, client-controlled strings escaped, and byte for byte
what `json.dumps` made of the same fields before the line was built by hand."""

from __future__ import annotations

import io
import json
import os
import select
import time
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.observability.access_log import AccessLogPlugin, pipe_piece_bytes, pipe_pieces
from apigate.observability.tracing import trace_id_of
from apigate.resilience.circuit_breaker import State
from tests.unit.test_plugin_fakes import Ctx, build, make_request

NASTY = 'a"b\\c\x00\x01\x1f\x7f\n\r\t/é/ünï/€/😀/\u2028\u2029'


def make_log_ctx(
    *,
    path: str = "/hello",
    method: str = "GET",
    request_id: str = "req-1",
    client_ip: str = "203.0.113.7",
    start: float = 1_790_000_000.1234,
    routed: bool = True,
    **fields: Any,
) -> Ctx:
    req = make_request(method, path, client_ip=client_ip)
    req.request_id = request_id
    req.start = start
    ctx = Ctx(req)
    service = SimpleNamespace(name="up", breaker=None)
    if routed:
        ctx.route = SimpleNamespace(name="r", service=service)
    ctx.service = service if routed else None  # type: ignore[attr-defined]
    ctx.instance = SimpleNamespace(id="127.0.0.1:9") if routed else None  # type: ignore[attr-defined]
    defaults: dict[str, Any] = {
        "status": 200,
        "bytes_sent": 13,
        "upstream_ms": 0.12345,
        "total_ms": 0.98765,
        "retries": 0,
        "cache_status": None,
        "error": None,
        "breaker_decision": None,
    }
    for name, value in {**defaults, **fields}.items():
        setattr(ctx, name, value)
    return ctx


def reference_line(ctx: Any) -> str:
    """The line as the plugin built it with a dict and json.dumps (the behaviour to keep)."""
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
    decision = ctx.breaker_decision
    if decision is not None and decision is not State.CLOSED:
        doc["breaker"] = decision.value
    if ctx.cache_status:
        doc["cache"] = ctx.cache_status
    if ctx.error:
        doc["error"] = ctx.error
    return json.dumps(doc, separators=(",", ":")) + "\n"


def log_plugin() -> tuple[AccessLogPlugin, io.StringIO]:
    plugin: AccessLogPlugin = build("access_log", {})
    out = io.StringIO()
    plugin._out = out  # as start() would open it
    return plugin, out


def logged(ctx: Any) -> str:
    plugin, out = log_plugin()
    plugin.on_log(ctx)
    assert out.getvalue() == ""  # nothing is written per request
    plugin.flush()
    return out.getvalue()


def test_plain_line_matches_json_dumps() -> None:
    ctx = make_log_ctx()
    line = logged(ctx)
    assert line == reference_line(ctx)
    doc = json.loads(line)
    assert doc["time"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(1_790_000_000)) + ".123Z"
    assert doc["path"] == "/hello"
    assert doc["status"] == 200
    assert doc["upstream_ms"] == 0.123
    assert line.endswith("}\n") and line.count("\n") == 1


def test_client_controlled_strings_are_escaped() -> None:
    ctx = make_log_ctx(path="/" + NASTY, method='PO"ST', request_id=NASTY, client_ip=NASTY)
    line = logged(ctx)
    assert line == reference_line(ctx)
    assert line.isascii()  # ensure_ascii, as json.dumps: non-ASCII and U+2028 are \\u-escaped
    assert line.count("\n") == 1  # no raw newline from the path can split the line
    doc = json.loads(line)
    assert doc["path"] == "/" + NASTY
    assert doc["method"] == 'PO"ST'
    assert doc["request_id"] == NASTY
    assert doc["client"] == NASTY


@pytest.mark.parametrize(
    "value",
    ["0a1b2c3d4e5f17", "req-1", "é1", "\u0663", "\u216b", "\uff41\uff42", 'a"b', "a\\b", "", NASTY],
)
def test_ids_are_written_as_json_dumps_writes_them(value: str) -> None:
    """Letters-and-digits ids are written without the escaping call; the look-alikes (other
    scripts' letters and digits, which `isalnum` takes but json.dumps escapes) are not."""
    ctx = make_log_ctx(request_id=value)
    ctx.vars["trace_id"] = value  # as a plugin could set it
    line = logged(ctx)
    assert line == reference_line(ctx)
    assert line.isascii()
    doc = json.loads(line)
    assert (doc["request_id"], doc["trace_id"]) == (value, value)


@settings(max_examples=200, deadline=None)
@given(path=st.text(), request_id=st.text(), method=st.text(min_size=1))
def test_any_string_round_trips(path: str, request_id: str, method: str) -> None:
    ctx = make_log_ctx(path=path, request_id=request_id, method=method)
    line = logged(ctx)
    assert line == reference_line(ctx)
    doc = json.loads(line)
    assert (doc["path"], doc["request_id"], doc["method"]) == (path, request_id, method)


def test_unrouted_request_logs_nulls() -> None:
    ctx = make_log_ctx(routed=False, status=404, upstream_ms=None, total_ms=None)
    line = logged(ctx)
    assert line == reference_line(ctx)
    doc = json.loads(line)
    assert doc["route"] is None and doc["service"] is None and doc["instance"] is None
    assert doc["upstream_ms"] is None and doc["total_ms"] is None


def test_optional_fields() -> None:
    ctx = make_log_ctx(
        retries=2,
        cache_status="HIT",
        error='upstream "x" reset\n',
        breaker_decision=State.HALF_OPEN,
    )
    ctx.consumer = SimpleNamespace(name="alice\u00e9")
    line = logged(ctx)
    assert line == reference_line(ctx)
    doc = json.loads(line)
    assert doc["consumer"] == "alice\u00e9"
    assert doc["retries"] == 2
    assert doc["breaker"] == "half_open"
    assert doc["cache"] == "HIT"
    assert doc["error"] == 'upstream "x" reset\n'


def test_consumer_without_a_name_is_its_string() -> None:
    ctx = make_log_ctx()
    ctx.consumer = "bob"
    assert logged(ctx) == reference_line(ctx)
    assert json.loads(logged(ctx))["consumer"] == "bob"


@pytest.mark.parametrize(
    "start", [0.0, 1.0, 1_790_000_000.0, 1_790_000_000.9995, 1_790_000_000.999999999, 12.5]
)
def test_timestamps_match_strftime(start: float) -> None:
    ctx = make_log_ctx(start=start)
    assert logged(ctx) == reference_line(ctx)


def test_second_cache_follows_the_clock() -> None:
    """Consecutive lines within and across seconds (and back: clocks step) keep right times."""
    plugin, out = log_plugin()
    starts = [100.25, 100.75, 101.0, 99.5, 101.001]
    ctxs = [make_log_ctx(start=s) for s in starts]
    for ctx in ctxs:
        plugin.on_log(ctx)
    plugin.flush()
    assert out.getvalue() == "".join(reference_line(ctx) for ctx in ctxs)


def test_lines_are_written_in_batches_in_order() -> None:
    plugin, out = log_plugin()
    ctxs = [make_log_ctx(path=f"/{i}", start=1000.0 + i / 10) for i in range(600)]
    for ctx in ctxs[:255]:
        plugin.on_log(ctx)
    assert out.getvalue() == ""
    for ctx in ctxs[255:]:
        plugin.on_log(ctx)
    written = out.getvalue().splitlines(keepends=True)
    assert len(written) == 512  # two full batches; the rest waits for the tick
    plugin.flush()
    assert out.getvalue() == "".join(reference_line(ctx) for ctx in ctxs)
    plugin.flush()  # nothing pending: nothing written twice
    assert out.getvalue().count("\n") == 600


def test_values_are_taken_when_the_request_is_logged() -> None:
    """A line says what was true when its request ended, not when the batch is written."""
    ctx = make_log_ctx(path="/a", breaker_decision=State.OPEN)
    expected = reference_line(ctx)
    plugin, out = log_plugin()
    plugin.on_log(ctx)
    ctx.breaker_decision = State.CLOSED  # type: ignore[attr-defined]
    ctx.request.path = "/b"
    ctx.status = 500  # type: ignore[attr-defined]
    plugin.flush()
    assert out.getvalue() == expected
    assert json.loads(expected)["breaker"] == "open"


def test_lines_before_start_are_dropped() -> None:
    plugin: AccessLogPlugin = build("access_log", {})
    plugin.on_log(make_log_ctx())
    plugin.flush()  # no output yet (start() opens it): dropped, as before
    out = io.StringIO()
    plugin._out = out
    plugin.flush()
    assert out.getvalue() == ""


def test_to_a_pipe_lines_go_in_whole_pieces_of_at_most_pipe_buf() -> None:
    """Workers sharing a pipe (stdout under a supervisor): only writes of up to PIPE_BUF are
    never interleaved with another process's, so a flush is cut at line ends into such."""
    lines = [f'{{"n":{i},"pad":"{"x" * (i % 300)}"}}\n' for i in range(400)]
    pieces = pipe_pieces("".join(lines), select.PIPE_BUF)
    assert "".join(pieces) == "".join(lines)
    assert len(pieces) > 1 and all(len(p.encode()) <= select.PIPE_BUF for p in pieces)
    assert all(p.endswith("\n") for p in pieces)
    assert pipe_pieces("y" * 5000 + "\n", 4096) == ["y" * 5000 + "\n"]  # a long line: whole

    read_end, write_end = os.pipe()
    with os.fdopen(write_end, "w") as out, os.fdopen(read_end) as back:
        assert pipe_piece_bytes(out) == select.PIPE_BUF
        assert pipe_piece_bytes(io.StringIO()) == 0
        plugin: AccessLogPlugin = build("access_log", {})
        plugin._out, plugin._piece_bytes = out, pipe_piece_bytes(out)
        ctxs = [make_log_ctx(path=f"/{i}") for i in range(100)]
        for ctx in ctxs:
            plugin.on_log(ctx)
        plugin.flush()
        out.close()
        assert back.read() == "".join(reference_line(ctx) for ctx in ctxs)
