"""W3C Trace Context parsing and propagation, and the tracing plugin's config, without sockets."""

from __future__ import annotations

import os
import re
import sys
from types import SimpleNamespace
from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.config.schema import GatewayConfig
from apigate.http.request import Request
from apigate.observability import trace_context, tracing
from apigate.observability.tracing import (
    TRACE_HEADERS,
    new_span_id,
    new_trace,
    new_trace_id,
    outgoing_traceparent,
    parse_traceparent,
    span_context,
    trace_headers,
    trace_id_of,
)
from apigate.plugins.base import PluginEnv
from apigate.plugins.chain import build_plugin

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
VALID = f"00-{TRACE}-{PARENT}-01".encode()
FORMAT = re.compile(rb"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")


def request(*headers: tuple[bytes, bytes]) -> Request:
    """A request as the parser leaves it: trace fields apart from the other headers."""
    req = Request()
    req.method = "GET"
    req.path = "/x"
    req.headers = [(b"Accept", b"*/*")]
    for name, value in headers:
        if name.lower() == b"traceparent":
            req.traceparent = value if req.traceparent is None else b""
        elif name.lower() == b"tracestate":
            req.tracestate = [*(req.tracestate or []), value]
        else:
            req.headers.append((name, value))
    return req


def ctx(*headers: tuple[bytes, bytes]) -> Any:
    return SimpleNamespace(request=request(*headers), vars={})


def test_parse_valid() -> None:
    assert parse_traceparent(VALID) == (TRACE, PARENT, "01")
    assert parse_traceparent(b" " + VALID + b"\t") == (TRACE, PARENT, "01")
    assert parse_traceparent(VALID[:-2] + b"00") == (TRACE, PARENT, "00")


@pytest.mark.parametrize(
    "value",
    [
        b"",
        b"garbage",
        b"01" + VALID[2:] + b"x",  # a later version: its flags end the value or a "-" follows
        VALID.replace(b"00-", b"ff-", 1),
        VALID.upper(),  # upper-case hex is invalid
        VALID[:-1],
        VALID + b"0",
        VALID + b"-extra",
        f"00-{'0' * 32}-{PARENT}-01".encode(),  # all-zero trace id
        f"00-{TRACE}-{'0' * 16}-01".encode(),  # all-zero parent id
        f"00-{TRACE[:-1]}g-{PARENT}-01".encode(),
        f"00-{TRACE}-{PARENT}-0x".encode(),
        f"00_{TRACE}-{PARENT}-01".encode(),
        f"00-{TRACE}{PARENT}--01".encode(),
        f"00-{TRACE[:31]}-{PARENT}0-01".encode(),
    ],
)
def test_parse_invalid(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_new_ids_are_well_formed_unique_and_non_zero() -> None:
    spans = {new_span_id() for _ in range(50_000)}
    assert len(spans) == 50_000
    assert all(re.fullmatch("[0-9a-f]{16}", s) and s != "0" * 16 for s in spans)
    traces = {new_trace_id() for _ in range(1000)}
    assert len(traces) == 1000 and all(re.fullmatch("[0-9a-f]{32}", t) for t in traces)
    trace_id, span_id, flags = new_trace()
    assert parse_traceparent(f"00-{trace_id}-{span_id}-{flags}".encode()) is not None


def test_forked_worker_draws_other_ids() -> None:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.write(write_fd, (new_span_id() + new_trace_id()).encode() + trace_headers(ctx()))
        os._exit(0)
    os.close(write_fd)
    child = os.read(read_fd, 200)
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert len(child) == 48 + 70
    mine = (new_span_id() + new_trace_id()).encode() + trace_headers(ctx())
    assert child[:16] != mine[:16] and child[16:48] != mine[16:48]
    assert child[48:] != mine[48:]


def test_new_traces_are_well_formed_unique_and_recorded() -> None:
    seen: set[bytes] = set()
    for _ in range(1000):  # (several draws: 128 traces each)
        c = ctx((b"tracestate", b"congo=t61rcWkgMzE"))  # (no trace to continue: not sent)
        line = trace_headers(c)
        assert line.startswith(b"traceparent: ") and line.endswith(b"\r\n")
        value = line[13:-2]
        assert FORMAT.match(value) and value.endswith(b"-01")
        assert parse_traceparent(value) is not None
        trace_id, span_id = value[3:35], value[36:52]
        assert trace_id not in seen and span_id not in seen
        seen.update((trace_id, span_id))
        assert trace_id_of(c) == trace_id.decode()
        assert span_context(c) == (trace_id.decode(), span_id.decode(), "", "01")
        assert trace_headers(c) == line  # a retry reuses the span


def test_new_trace_skips_all_zero_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """W3C: an all-zero trace id or span id is invalid. The pool is drawn at random, so the
    gateway's own ids are made so here: each such pair is passed over."""
    good_trace, good_span = "a" * 32, "b" * 16
    groups = ["0" * 32, "c" * 32, TRACE, "0" * 16 + "d" * 16, good_trace, good_span + "e" * 16]
    state = trace_context._STATE
    monkeypatch.setattr(state, "pool", "-".join(groups).encode() + b"-")
    monkeypatch.setattr(state, "pos", 0)
    line = trace_headers(ctx())
    assert line == f"traceparent: 00-{good_trace}-{good_span}-01\r\n".encode()


def test_outgoing_continues_a_valid_trace_with_a_new_span() -> None:
    value, trace_id = outgoing_traceparent(request((b"Traceparent", VALID)))
    assert trace_id == TRACE
    parsed = parse_traceparent(value)
    assert parsed is not None
    assert parsed[0] == TRACE and parsed[1] != PARENT and parsed[2] == "01"
    again, _ = outgoing_traceparent(request((b"traceparent", VALID)))
    assert again != value  # every exchange is its own span


def test_outgoing_keeps_the_callers_flags() -> None:
    value, _ = outgoing_traceparent(request((b"traceparent", VALID[:-2] + b"00")))
    assert value.endswith(b"-00")


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [(b"traceparent", b"00-zzz")],
        [(b"traceparent", VALID), (b"traceparent", VALID)],  # repeated: invalid
    ],
)
def test_outgoing_starts_a_new_trace_otherwise(headers: list[tuple[bytes, bytes]]) -> None:
    value, trace_id = outgoing_traceparent(request(*headers))
    assert FORMAT.match(value)
    assert trace_id != TRACE and value[3:35].decode() == trace_id
    assert value.endswith(b"-01")


def test_trace_headers_pass_tracestate_with_a_continued_trace() -> None:
    c = ctx((b"traceparent", VALID), (b"tracestate", b"congo=t61rcWkgMzE"), (b"TraceState", b"x=1"))
    lines = trace_headers(c)
    assert lines.startswith(b"traceparent: 00-" + TRACE.encode())
    assert lines.endswith(b"\r\ntracestate: congo=t61rcWkgMzE\r\ntracestate: x=1\r\n")
    assert trace_id_of(c) == TRACE
    assert trace_headers(c) == lines  # a retry reuses the span
    assert span_context(c) == (TRACE, lines[49:65].decode(), PARENT, "01")
    c.request.traceparent = lines[13:68]  # a later plugin edited the field
    assert span_context(c)[2] == PARENT  # the exporter's parent link was kept


def test_trace_headers_drop_tracestate_of_an_invalid_parent() -> None:
    c = ctx((b"traceparent", b"00-bad"), (b"tracestate", b"congo=t61rcWkgMzE"))
    lines = trace_headers(c)
    assert b"tracestate" not in lines
    assert lines.count(b"\r\n") == 1 and FORMAT.match(lines[13:-2])
    assert span_context(c)[2] == ""  # a root span: no parent


def test_trace_id_of_a_request_that_never_went_upstream() -> None:
    c = ctx()
    trace_id = trace_id_of(c)
    assert trace_id_of(c) == trace_id
    lines = trace_headers(c)  # (a plugin logged first, then the request went upstream)
    assert lines[16:48].decode() == trace_id
    continued = ctx((b"traceparent", VALID))
    assert trace_id_of(continued) == TRACE
    assert span_context(continued) == (TRACE, "", PARENT, "01")


def test_trace_header_names_for_the_head_builder() -> None:
    assert sorted(TRACE_HEADERS) == [b"traceparent", b"tracestate"]


def test_sample_ratio_marks_new_traces_unsampled() -> None:
    try:
        tracing.set_sample_ratio(0.0)
        assert outgoing_traceparent(request())[0].endswith(b"-00")
        assert trace_headers(ctx()).endswith(b"-00\r\n")
        assert outgoing_traceparent(request((b"traceparent", VALID)))[0].endswith(b"-01")
    finally:
        tracing.set_sample_ratio(1.0)
    assert outgoing_traceparent(request())[0].endswith(b"-01")


# ---------------------------------------------------------------------- the plugin
def env() -> PluginEnv:
    return PluginEnv(config=GatewayConfig.model_validate({"version": 1}))


def test_plugin_without_otlp_has_no_hook() -> None:
    plugin = build_plugin("apigate.observability.tracing:TracingPlugin", {}, env(), "plugins.t")
    assert plugin.name == "tracing" and plugin.priority == 3000
    assert not hasattr(plugin, "on_log")


def test_plugin_config_is_strict() -> None:
    with pytest.raises(ConfigError, match="sample_ratio"):
        build_plugin("apigate.observability.tracing:TracingPlugin", {"sample_ratio": 2}, env(), "p")
    with pytest.raises(ConfigError, match="did you mean"):
        build_plugin(
            "apigate.observability.tracing:TracingPlugin", {"otlp_endpont": "x"}, env(), "p"
        )


def test_otlp_without_opentelemetry_is_a_clear_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with pytest.raises(ConfigError) as info:
        build_plugin(
            "apigate.observability.tracing:TracingPlugin",
            {"otlp_endpoint": "http://127.0.0.1:4318"},
            env(),
            "plugins.tracing",
        )
    text = str(info.value)
    assert "plugins.tracing" in text and "pip install 'apigate[otlp]'" in text


def test_spans_link_server_upstream_and_caller() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.trace import SpanKind

    c = ctx((b"traceparent", VALID))
    sent = trace_headers(c)[13:68].decode()
    inst = SimpleNamespace(host="10.0.0.1", port=8080, id="a")
    record = (
        span_context(c),
        1000.0,
        12.0,
        8.0,
        "GET",
        "/x",
        "api",
        "users",
        inst,
        200,
        "r1",
        None,
        [],
    )
    server, upstream = tracing.build_spans([record], "apigate")
    assert server.kind == SpanKind.SERVER and upstream.kind == SpanKind.CLIENT
    assert f"{server.context.trace_id:032x}" == TRACE
    assert f"{server.parent.span_id:016x}" == PARENT
    assert upstream.parent.span_id == server.context.span_id
    assert f"{upstream.context.span_id:016x}" == sent.split("-")[2]
    assert server.end_time - server.start_time == 12_000_000
    assert upstream.attributes["server.address"] == "10.0.0.1"


def test_an_aggregates_parts_are_client_spans_of_the_server_span() -> None:
    pytest.importorskip("opentelemetry.sdk.trace")
    from opentelemetry.trace import SpanKind, StatusCode

    c = ctx((b"traceparent", VALID), (b"tracestate", b"k=v"))
    trace = tracing.ChildTrace(c)
    first, second = trace.traceparent(), trace.traceparent()
    assert FORMAT.match(first) and first[3:35].decode() == TRACE and first[53:55] == b"01"
    assert first[36:52] != second[36:52] and trace.states == [b"k=v"]
    parts = [
        ("profile", "users", first[36:52].decode(), 1000.001, 3.0, False),
        ("orders", "orders", second[36:52].decode(), 1000.002, 5.0, True),
    ]
    record = (span_context(c), 1000.0, 12.0, None, "GET", "/x", "dash", "", None, 502, "r1")
    server, profile, orders = tracing.build_spans([(*record, None, parts)], "apigate")
    assert server.kind == SpanKind.SERVER
    assert profile.kind == orders.kind == SpanKind.CLIENT
    assert profile.parent.span_id == orders.parent.span_id == server.context.span_id
    assert f"{profile.context.span_id:016x}" == first[36:52].decode()
    assert f"{orders.context.trace_id:032x}" == TRACE
    assert profile.name == "part profile" and profile.attributes["apigate.service"] == "users"
    assert orders.end_time - orders.start_time == 5_000_000
    assert (profile.status.status_code, orders.status.status_code) == (
        StatusCode.UNSET,
        StatusCode.ERROR,
    )


def test_a_part_of_a_request_without_a_valid_trace_starts_one_for_the_exchange() -> None:
    c = ctx((b"traceparent", b"garbage"), (b"tracestate", b"k=v"))
    first = tracing.ChildTrace(c).traceparent()
    second = tracing.ChildTrace(c).traceparent()  # (a second reading: the same trace)
    assert first[3:35] == second[3:35] != TRACE.encode()  # one new trace for the exchange
    assert first[3:35].decode() == trace_id_of(c)
    assert tracing.ChildTrace(c).states == []  # not the old trace's state


async def test_an_old_snapshots_plugin_does_not_reset_the_new_ones_ratio() -> None:
    def plugin(ratio: float) -> Any:
        raw = {"sample_ratio": ratio}
        return build_plugin("apigate.observability.tracing:TracingPlugin", raw, env(), "p")

    old, new = plugin(0.5), plugin(0.0)
    await old.start()
    await new.start()  # a reload built a new snapshot
    await old.close()  # the old snapshot retires later
    try:
        assert outgoing_traceparent(request())[0].endswith(b"-00")
    finally:
        await new.close()
    assert outgoing_traceparent(request())[0].endswith(b"-01")


# ---------------------------------------------------------------------- review: flag bits
# W3C Trace Context §3.2.2.5: only the sampled bit (01) is defined; vendors MUST set the other
# bits to zero when they propagate. A later version's flags are read as version 00's.
@pytest.mark.parametrize(
    ("flags", "kept"),
    [(b"09", b"01"), (b"ff", b"01"), (b"fe", b"00"), (b"02", b"00"), (b"80", b"00")],
)
def test_unknown_flag_bits_are_not_forwarded(flags: bytes, kept: bytes) -> None:
    for version in (b"00", b"02", b"cc"):
        incoming = version + VALID[2:-2] + flags
        value, trace_id = outgoing_traceparent(request((b"traceparent", incoming)))
        assert trace_id == TRACE, incoming  # still continued
        assert FORMAT.match(value) and value.endswith(b"-" + kept), (incoming, value)
        with_more = outgoing_traceparent(request((b"traceparent", incoming + b"-later")))[0]
        if version != b"00":  # (a later version may carry more fields)
            assert with_more.endswith(b"-" + kept), (incoming, with_more)


def test_unknown_flag_bits_are_dropped_everywhere_the_trace_is_reused() -> None:
    """trace_id_of (a plugin logged first), an aggregate's parts and the exporter's view."""
    incoming = VALID[:-2] + b"0b"  # sampled, plus two reserved bits
    assert parse_traceparent(incoming) == (TRACE, PARENT, "01")
    logged_first = ctx((b"traceparent", incoming))
    assert trace_id_of(logged_first) == TRACE
    line = trace_headers(logged_first)
    assert line.startswith(b"traceparent: 00-" + TRACE.encode()) and line.endswith(b"-01\r\n")
    part = tracing.ChildTrace(ctx((b"traceparent", incoming))).traceparent()
    assert part.endswith(b"-01")
    assert span_context(logged_first)[3] == "01"
    unsampled = ctx((b"traceparent", VALID[:-2] + b"fe"))
    assert tracing.ChildTrace(unsampled).traceparent().endswith(b"-00")
