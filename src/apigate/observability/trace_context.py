"""W3C Trace Context (traceparent / tracestate) on every request: the hot-path half of
`apigate.observability.tracing` (which has the design notes and the OTLP exporter), kept apart
so that it can be compiled with the data plane (see apigate.buildinfo).
"""

from __future__ import annotations

import os
import random
import re
from binascii import hexlify
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from apigate.http.request import Request

TRACE_HEADERS: Final = frozenset({b"traceparent", b"tracestate"})  # lower-case names the head skips

# A call the exchange made itself (an aggregate's part), for the exporter: (part name, service,
# span id, start (epoch s), duration ms, failed). Recorded in `vars["part_spans"]`.
PartSpan = tuple[str, str, str, float, float, bool]

_MASK64: Final = (1 << 64) - 1
_ZERO_SPAN: Final = b"0" * 16
_ZERO_TRACE: Final = b"0" * 32
# Ids are random, not secret: drawn as OpenTelemetry's RandomIdGenerator draws them, from the
# `random` module (which reseeds in a forked child), not os.urandom, whose system call (a
# ChaCha20 draw in the kernel) perf put at 0.3% of the gateway's CPU.
_RANDOM_BYTES: Final = 4096  # drawn per random.randbytes call: 256 groups of 16 bytes
# The ids come from one pool, a hexlify with a "-" after every 16 bytes: "<32 hex>-<32 hex>-...".
# Each draw starts at a group: a trace id or a span id is the start of one group, and a new
# trace's ids are the first 49 bytes of two groups, a trace id, a "-" and a span id (the
# second group's last 16 digits go unused), so that the pair is one slice.
_GROUP: Final = 33  # 32 hex digits and the "-"
_PAIR: Final = 49  # <32 hex>-<16 hex>


class _State:
    """Process-wide state read on every request, in a native object rather than module
    globals (compiled, reading a global that is ever reassigned is a dictionary lookup)."""

    def __init__(self) -> None:
        self.pool = b""  # groups of 32 random hex digits and a "-" (see _GROUP), from
        self.pos = 0  # `pos` on not handed out yet
        # new traces: sampled when the low 64 bits of the id are below this
        self.sampled_below = 1 << 64
        # (every one: the usual case, decided without comparing 65-bit ints per request)
        self.sample_all = True
        self.ratio_owner: object = None


_STATE: Final = _State()


def _draw(groups: int, length: int) -> bytes:
    """The first `length` bytes of the pool's next `groups` groups (see _GROUP): an id costs a
    bytes slice, the draw of randomness is shared by a hundred ids or more."""
    state = _STATE
    start = state.pos
    if start + length > len(state.pool):
        state.pool = hexlify(random.randbytes(_RANDOM_BYTES), b"-", 16)
        start = 0
    state.pos = start + groups * _GROUP
    return state.pool[start : start + length]


def _random_hex(digits: int) -> bytes:
    """`digits` (at most 32) random lower-case hex digits."""
    return _draw(1, digits)


def _forget_random() -> None:
    """A forked worker must not repeat its parent's ids: it draws its own."""
    _STATE.pool, _STATE.pos = b"", 0


os.register_at_fork(after_in_child=_forget_random)


# ---------------------------------------------------------------------- ids and parsing
def _span() -> bytes:
    """16 random lower-case hex digits as bytes, never all zeros (W3C: an invalid id)."""
    span = _random_hex(16)
    while span == _ZERO_SPAN:
        span = _random_hex(16)
    return span


def _id_pair() -> bytes:
    """b"<trace id>-<span id>" of a new trace, one slice. Either id may be all zeros (W3C:
    invalid): see new_trace_line."""
    return _draw(2, _PAIR)


def new_trace_line() -> bytes:
    """The `traceparent` line of a new trace: the usual request's, which brings none (and
    whose exchange has no `vars` yet: no plugin began a trace, see trace_id_of). One slice
    and one build: compiled, the ids drawn apart, joined, and the trace id decoded for
    the log were ~2,000 instructions a request, 5% of the gateway's own."""
    pair = _id_pair()
    while pair.startswith(_ZERO_TRACE) or pair.endswith(_ZERO_SPAN):  # (one in 2**64)
        pair = _id_pair()
    state = _STATE
    if state.sample_all or int(pair[16:32], 16) < state.sampled_below:
        return b"traceparent: 00-%s-01\r\n" % (pair,)
    return b"traceparent: 00-%s-00\r\n" % (pair,)


def new_span_id() -> str:
    return _span().decode()


def _new_trace() -> tuple[bytes, bytes]:
    """(32 hex digits, flags) of a new trace; flags say sampled unless `set_sample_ratio`
    left this trace id out (by its low 64 bits, as OpenTelemetry's TraceIdRatioBased)."""
    trace_id = _random_hex(32)
    if trace_id == _ZERO_TRACE:  # W3C: an invalid id (one chance in 2**128)
        trace_id = b"0" * 31 + b"1"
    state = _STATE
    if state.sample_all or int(trace_id[16:], 16) < state.sampled_below:
        return trace_id, b"01"
    return trace_id, b"00"


def new_trace_id() -> str:
    return _new_trace()[0].decode()


def new_trace() -> tuple[str, str, str]:
    """A fresh root context, shaped like `parse_traceparent`'s answer: (trace id, span id,
    flags)."""
    trace_id, flags = _new_trace()
    return trace_id.decode(), new_span_id(), flags.decode()


def set_sample_ratio(ratio: float, owner: object = None) -> None:
    """Share of the traces the gateway *starts* that are marked sampled (by trace id, as
    OpenTelemetry's TraceIdRatioBased sampler decides, so that both sides agree).

    Process-wide: the tracing plugin of the current snapshot sets it (`owner`), and only that
    owner may set it back when it closes, so an old snapshot's plugin closing after a reload
    does not undo the new one's setting."""
    _STATE.sampled_below = int(max(0.0, min(1.0, ratio)) * (1 << 64))
    _STATE.sample_all = _STATE.sampled_below > _MASK64
    _STATE.ratio_owner = owner


def reset_sample_ratio(owner: object) -> None:
    if _STATE.ratio_owner is owner:
        set_sample_ratio(1.0)


# version 00, lower-case hex, trace id and parent id not all zeros, flags 00 or 01 (one C
# call: ~0.3 µs against ~0.6 µs for the same checks as slices and comparisons). The usual
# request's field, taken as it is.
_TRACEPARENT: Final = re.compile(rb"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-0[01]")
_match: Final = _TRACEPARENT.fullmatch
# Version 00 with other flag bits set: valid, but only the sampled bit (01) is defined, and
# the others must be zero when the trace is propagated (W3C Trace Context, "trace-flags").
# Tried only when the form above fails, so flags 00 and 01 pay nothing for it.
_ANY_FLAGS: Final = re.compile(rb"00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_match_any_flags: Final = _ANY_FLAGS.fullmatch
# A later version (01 to fe) is read as version 00 (W3C Trace Context, "Versioning of
# traceparent"): its first four fields, where more fields may follow after a "-"; version ff
# is invalid. Tried only when the version-00 forms fail, so the usual request pays nothing.
_LATER_VERSION: Final = re.compile(
    rb"(?!00|ff)[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}(?:-.*)?",
    re.DOTALL,
)
_match_later: Final = _LATER_VERSION.fullmatch
_ODD_HEX: Final = b"13579bdf"  # a flags byte pair ending in one of these has the sampled bit


def _sampled_only(value: bytes) -> bytes:
    """A valid traceparent's first four fields as version 00 with only the sampled bit of its
    flags kept (`value[54]` is the flags' low hex digit)."""
    return b"00" + value[2:53] + (b"01" if value[54] in _ODD_HEX else b"00")


def _valid(value: bytes) -> bytes | None:
    """`value` (surrounding blanks removed) when it is a valid version-00 traceparent with
    flags 00 or 01; otherwise a valid traceparent's first four fields as version 00 with its
    flags reduced to the sampled bit (what is continued and sent upstream)."""
    if _match(value) is not None:
        return value
    value = value.strip(b" \t")
    if _match(value) is not None:
        return value
    if _match_any_flags(value) is not None or _match_later(value) is not None:
        return _sampled_only(value)
    return None


def _continued(parent: bytes | None, trace_id: str) -> bytes | None:
    """The client's `parent` field (blanks removed) when it is valid and of trace `trace_id`,
    the exchange's: that trace was continued, not replaced."""
    valid = _valid(parent) if parent is not None else None
    return valid if valid is not None and valid[3:35].decode() == trace_id else None


def parse_traceparent(value: bytes) -> tuple[str, str, str] | None:
    """(trace id, parent id, flags) of a `traceparent` (a later version read as version 00),
    or None when invalid."""
    valid = _valid(value)
    if valid is None:
        return None
    return valid[3:35].decode(), valid[36:52].decode(), valid[53:55].decode()


def _incoming(request: Request) -> tuple[bytes | None, list[bytes]]:
    """The client's traceparent (None when absent or repeated) and tracestate values.

    The parser keeps both apart from the other headers (`Request.traceparent`/`tracestate`),
    so the upstream head needs no per-header check to replace them."""
    return (request.traceparent or None), (request.tracestate or [])


def continue_trace(incoming: bytes | None) -> tuple[bytes, str, bool]:
    """(traceparent to send upstream, trace id, whether `incoming` was valid and continued).

    The hot-path core: a valid `incoming` keeps its trace id and its sampled flag (other flag
    bits are dropped, as W3C Trace Context asks), anything else starts a new trace. The span
    id in the answer is new either way, and the version 00 (the one this gateway speaks, also
    when `incoming` was a later one)."""
    span = _span()
    if incoming is not None:
        valid = incoming if _match(incoming) is not None else _valid(incoming)
        if valid is not None:
            return valid[:36] + span + valid[52:], valid[3:35].decode(), True
    trace_id, flags = _new_trace()
    # (one formatting: compiled, five concatenations were five new bytes objects)
    return b"00-%s-%s-%s" % (trace_id, span, flags), trace_id.decode(), False


def outgoing_traceparent(request: Request) -> tuple[bytes, str]:
    """The `traceparent` value to send upstream and the trace id to log."""
    parent, _states = _incoming(request)
    value, trace_id, _continued = continue_trace(parent)
    return value, trace_id


def trace_headers(ctx: Any) -> bytes:
    """The trace header lines of the upstream request head of an exchange-like `ctx` (tests,
    plugins; the proxy's exchange makes its own as it builds the head, the same way): the
    `traceparent` line it records in `ctx.trace_line` (made once: a retry is the same span),
    and the client's `tracestate` with the client's own trace. The head builder must skip the
    client's own `traceparent` and `tracestate` fields (names in TRACE_HEADERS)."""
    line: bytes | None = getattr(ctx, "trace_line", None)
    if line is None:
        line = ctx.trace_line = first_trace_line(ctx.request, ctx.vars)
    return line + tracestate_lines(ctx.request, ctx.vars)


def first_trace_line(request: Request, tv: dict[str, Any]) -> bytes:
    """The exchange's `traceparent` line, whose `vars` are `tv`: a new span of the trace the
    client sent (valid: its field is kept in `tv["trace_parent"]` for the exporter, safe from
    later edits of the headers) or of the one a plugin asked for first (trace_id_of); else of
    a new trace."""
    parent, _states = _incoming(request)
    trace_id: str | None = tv.get("trace_id")
    if trace_id is not None:  # trace_id_of() ran first (a plugin logged): the same trace
        continued = _continued(parent, trace_id) is not None
        flags: bytes = tv.get("trace_flags", b"01")
        sent = b"-".join((b"00", trace_id.encode(), _span(), flags))
    elif parent is None:
        return new_trace_line()
    else:
        sent, _trace_id, continued = continue_trace(parent)
    if continued:
        tv["trace_parent"] = parent
    # (typed: compiled, formatting a value of unknown type is a generic % operation)
    return b"traceparent: %s\r\n" % (sent,)


def tracestate_lines(request: Request, tv: dict[str, Any] | None) -> bytes:
    """The client's `tracestate` lines, sent on with the trace they belong to: when the
    exchange (`vars` `tv`) continued the client's (first_trace_line)."""
    states = request.tracestate
    if states and tv is not None and "trace_parent" in tv:
        return b"".join([b"tracestate: " + s + b"\r\n" for s in states])
    return b""


# Where things sit in a `traceparent` line the exchange sent (its `trace_line`, always version
# 00): b"traceparent: 00-<32 hex trace id>-<16 hex span id>-<2 hex flags>\r\n"
# (literals: compiled, a Final int literal is a constant in the code, not a read)
_VALUE_AT: Final = 13  # len(b"traceparent: ")
_VALUE_LENGTH: Final = 55
_TRACE_ID_AT: Final = 16  # after the value's "00-"


def _sent(ctx: Any) -> bytes | None:
    """The `traceparent` value the exchange sent upstream, if it sent one."""
    line: bytes | None = getattr(ctx, "trace_line", None)
    return None if line is None else line[_VALUE_AT : _VALUE_AT + _VALUE_LENGTH]


def line_trace_id(line: bytes) -> str:
    """The trace id of a `traceparent` line the exchange sent, which trace_id_of gives for
    that exchange too."""
    return line[_TRACE_ID_AT : _TRACE_ID_AT + 32].decode()


def trace_id_of(ctx: Any) -> str:
    """The exchange's trace id, also for a request that never went upstream (401, 404):
    continued from the client's `traceparent` or new, and then recorded on the exchange."""
    tv = ctx.vars
    trace_id: str | None = tv.get("trace_id")
    if trace_id is not None:
        return trace_id
    line: bytes | None = getattr(ctx, "trace_line", None)
    if line is not None:
        trace_id = line_trace_id(line)
    else:
        parent, _states = _incoming(ctx.request)
        valid = _valid(parent) if parent is not None else None
        if valid is not None:
            trace_id, flags = valid[3:35].decode(), valid[53:55]
        else:
            new_id, flags = _new_trace()
            trace_id = new_id.decode()
        tv["trace_flags"] = flags
    tv["trace_id"] = trace_id
    return trace_id


class ChildTrace:
    """The exchange's trace for upstream calls it makes itself (an aggregate's parts), read
    once: each `traceparent()` is that trace and its flags with a new span id
    (`value[36:52]`, which the caller records for the exporter); `states` are the client's
    `tracestate` values when the trace is the client's own, else empty."""

    def __init__(self, ctx: Any) -> None:
        trace_id = trace_id_of(ctx)
        tv = ctx.vars
        sent = _sent(ctx)
        flags: bytes = sent[53:55] if sent is not None else tv.get("trace_flags", b"01")
        self._prefix = b"00-" + trace_id.encode() + b"-"
        self._suffix = b"-" + flags
        parent, states = _incoming(ctx.request)
        continued = _continued(parent, trace_id) is not None
        self.states: list[bytes] = states if continued else []

    def traceparent(self) -> bytes:
        return self._prefix + _span() + self._suffix


def span_context(ctx: Any) -> tuple[str, str, str, str]:
    """(trace id, upstream span id or "", parent id or "", flags) of a finished exchange, for
    the exporter (cold path: re-reads the client's traceparent)."""
    trace_id = trace_id_of(ctx)
    sent = _sent(ctx)
    parent: bytes | None = ctx.vars.get("trace_parent")
    if parent is None:
        parent, _states = _incoming(ctx.request)
    valid = _continued(parent, trace_id)
    parent_id = valid[36:52].decode() if valid is not None else ""
    if sent is not None:
        return trace_id, sent[36:52].decode(), parent_id, sent[53:55].decode()
    flags: bytes = ctx.vars.get("trace_flags", b"01")
    return trace_id, "", parent_id, flags.decode()
