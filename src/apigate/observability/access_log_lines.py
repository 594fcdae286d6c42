"""The per-request half of the access log (apigate.observability.access_log): what `on_log`
keeps of each exchange, and the JSON line each entry becomes when a batch is written.

Compiled with the data plane (apigate.buildinfo), so that the gateway calls `on_log` with no
interpreted frame in between and the lines are formatted as native code. `on_log` with its
share of the batch's formatting and writing costs ~5,500 instructions a request (callgrind,
bench/micro.py --config logged against plain), of which the line ~3,600; in bench/run.py the
logged scenario takes ~1.0 µs a request more than the plain one, the file's write included.

Each line is exactly what `json.dumps(doc, separators=(",", ":"))` makes of the fields (same
keys, same order, ASCII-only escaping), but built as one f-string: `json.dumps` with keyword
arguments makes a new `JSONEncoder` and walks a dict per call. Every string goes through
`encode_basestring_ascii`, the C function `json.dumps` itself uses to quote and escape strings,
so client-controlled values (path, request id, method) are escaped exactly as json.dumps does;
nothing is escaped by hand.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from json.encoder import encode_basestring_ascii
from typing import Any, Final

from apigate.http.request import Request
from apigate.observability.trace_context import line_trace_id, trace_id_of
from apigate.proxy.exchange import ProxyExchange
from apigate.resilience.circuit_breaker import State

# Final: a compiled module reads it from a C static, not from its globals dict per call
_quote: Final = encode_basestring_ascii
# Lines wait (as Entry objects) until this many, or the once-a-second tick: ~64 KiB
FLUSH_LINES: Final = 256
# A line is one build of its pieces (~17 strings), each of which costs ~70 instructions, so
# the tables below and the remembered fields each hold a value and the constant text after it.
# '.000Z","request_id":"' ...: the milliseconds and zone of a timestamp, and the next key
_MILLIS: Final = tuple(f'.{ms:03d}Z","request_id":"' for ms in range(1000))
# '.0', '.001', ..., '.01', ..., '.999': the decimals of a duration rounded to 3 places, as
# str(float) writes them (trailing zeros dropped, at least one digit)
_DECIMALS: Final = tuple("." + (f"{n:03d}".rstrip("0") or "0") for n in range(1000))
# '0' ... '999': an int below 1000 as str() writes it (a duration's whole milliseconds, the
# size of a small body), without formatting an int per line
_SMALL_INTS: Final = tuple(str(n) for n in range(1000))
# '0,"bytes":' ... '999,"bytes":': a status and the next key
_STATUS_FIELD: Final = tuple(f'{status},"bytes":' for status in range(1000))
_QUOTED_MAX: Final = 4096  # quoted values remembered (then forgotten all at once)
_METHODS_MAX: Final = 64  # methods whose lines' client fields are remembered
_NAMES_MAX: Final = 1024  # (route, service, instance) fields remembered
_NO_NAME: Final = object()  # a consumer without a `name` attribute (logged as its str())


class Entry:
    """What on_log keeps of an exchange for its line, all immutable values copied at log time.

    A native object rather than a tuple: compiled, its start time, status and byte count are
    kept unboxed and the line reads each field at its offset, where a tuple's were boxed, then
    read back by index and unboxed (bench/micro.py --config logged: ~0.15 µs a request less,
    ~200 instructions)."""

    __slots__ = (
        "breaker",
        "cache",
        "client",
        "consumer",
        "error",
        "method",
        "names",
        "path",
        "request_id",
        "retries",
        "sent",
        "start",
        "status",
        "total_ms",
        "trace",
        "upstream_ms",
    )

    def __init__(
        self,
        start: float,
        request_id: str,
        trace: bytes | str,
        client: str,
        method: str,
        path: str,
        names: str,
        status: int,
        sent: int,
        upstream_ms: float | None,
        total_ms: float | None,
        consumer: Any,
        retries: int,
        breaker: str | None,
        cache: str | None,
        error: str | None,
    ) -> None:
        self.start = start
        self.request_id = request_id  # as the line writes it (escaped for JSON if need be)
        # the exchange's `traceparent` line (bytes: its trace id is hex digits, read with
        # line_trace_id), or the trace id as the line writes it
        self.trace = trace
        self.client = client
        self.method = method
        self.path = path
        self.names = names  # the route, service and instance fields, and the status key
        self.status = status
        self.sent = sent
        self.upstream_ms = upstream_ms
        self.total_ms = total_ms
        self.consumer = consumer  # the consumer's name (or its str(), if it has none)
        self.retries = retries
        self.breaker = breaker
        self.cache = cache
        self.error = error


def _json(value: Any) -> str:
    """A value as json.dumps writes it (for the optional fields, whatever their type)."""
    return _quote(value) if type(value) is str else json.dumps(value, separators=(",", ":"))


def _inner(value: str) -> str:
    """`value` as json.dumps writes it, without the quotes. Ids are letters and digits (the
    gateway's own, every trace id, a client's request id mostly), and such a value is itself:
    no encode_basestring_ascii call (`isalnum` alone also takes other scripts' letters and
    digits, which json.dumps escapes)."""
    return value if value.isalnum() and value.isascii() else _quote(value)[1:-1]


def duration(value: float) -> str:
    """`str(round(value, 3))`, the way a duration has always been logged (see duration_parts)."""
    whole, decimals = duration_parts(value)
    return whole + decimals


def duration_parts(value: float) -> tuple[str, str]:
    """`str(round(value, 3))` in two pieces, the whole milliseconds and the rest, which the
    line's build takes as they are (compiled, the pair is returned as two values, with no
    tuple made, and no third string either). Mostly without `round` and the float's repr
    (together ~0.6 µs; two per line, the dearest part of it).

    Why the shortcut is exact: for 0 < x = value·1000 < 1e9, `scaled` is x within 1.2e-7, so
    when `scaled` is more than 1e-4 away from a tie, `n` is x correctly rounded, as `round`
    rounds it. The decimal n/1000 has at most 10 significant digits; any two such decimals are
    different doubles (a double tells 15 digits apart), so the shortest string that reads back
    as `round(value, 3)` — which is what str() writes — is that decimal, trailing zeros cut.
    Ties, zero (its sign), huge and negative values, NaN and infinities take the slow way."""
    scaled = value * 1000.0
    if 0.0 < scaled < 1e9:
        n = int(scaled + 0.5)
        off = scaled - n  # exact (Sterbenz): n is within 0.5 of scaled
        if -0.4999 < off < 0.4999:
            whole = n // 1000
            return _SMALL_INTS[whole] if whole < 1000 else str(whole), _DECIMALS[n % 1000]
    elif scaled == 0.0 and math.copysign(1.0, scaled) > 0.0:
        return "0", ".0"
    return str(round(value, 3)), ""


class AccessLogLines:
    """The entries waiting to be written, and their lines.

    `on_log` is the access log plugin's hook itself; when FLUSH_LINES entries wait it calls
    `full` (the plugin's flush, which takes them with `take` and writes `format(entries)`)."""

    def __init__(self, full: Callable[[], None]) -> None:
        self.pending: list[Entry] = []
        self.full = full
        # The quoted form of the values that repeat from line to line (client, method, route,
        # service, instance): a dict lookup instead of encode_basestring_ascii (~200
        # instructions against ~800 for a short string).
        self.quoted: dict[str, str] = {}
        # the client and method fields of a line, by method and client (see who)
        self._who: dict[str, dict[str, str]] = {}
        # '{"time":"YYYY-MM-DDTHH:MM:SS' of the last second formatted: strftime once a second
        self._second = -1
        self._line_start = ""
        # the line's route, service and instance fields, by those names (see _keep)
        self._names_by_key: dict[tuple[str | None, str | None, str | None], str] = {}
        self._route: str | None = None
        self._service: str | None = None
        self._instance: str | None = None
        self._names = ',"route":null,"service":null,"instance":null,"status":'

    def on_log(self, ctx: Any) -> None:
        """Keep the exchange's values, copied now; the line is made by `line` when it is
        written. `ctx` is Any (tests log stand-ins); the gateway's own exchanges are read as
        what they are: compiled, a typed read is a load where an untyped one is a lookup by
        name (a dozen per request).

        The breaker field is what the breaker decided for this request when the exchange asked
        it (refused, or let through as a probe), not the breaker's state when the request
        ended: the request whose failure opened the breaker had reached the upstream, and was
        logged "open"; the probe whose success closed it, as nothing."""
        if isinstance(ctx, ProxyExchange):
            route = ctx.route
            service = ctx.service
            inst = ctx.instance
            decision = ctx.breaker_decision
            # the traceparent line sent upstream: its trace id is trace_id_of's, which would
            # make the exchange a `vars` dict to keep it in
            line = ctx.trace_line
            self._keep(
                ctx.request,
                trace_id_of(ctx) if line is None else line,
                None if route is None else route.name,
                None if service is None else service.name,
                None if inst is None else inst.id,
                ctx.consumer,
                ctx.status,
                ctx.bytes_sent,
                ctx.upstream_ms,
                ctx.total_ms,
                ctx.retries,
                # (closed, the common case, is not logged: no enum `.value` read for it)
                None if decision is None or decision is State.CLOSED else decision.value,
                ctx.cache_status,
                ctx.error,
            )
        else:  # (other names: compiled, a name keeps the type of its first binding)
            any_route = ctx.route
            any_service = ctx.service
            any_inst = ctx.instance
            any_decision = ctx.breaker_decision
            self._keep(
                ctx.request,
                trace_id_of(ctx),
                None if any_route is None else any_route.name,
                None if any_service is None else any_service.name,
                None if any_inst is None else any_inst.id,
                ctx.consumer,
                ctx.status,
                ctx.bytes_sent,
                ctx.upstream_ms,
                ctx.total_ms,
                ctx.retries,
                None
                if any_decision is None or any_decision is State.CLOSED
                else any_decision.value,
                ctx.cache_status,
                ctx.error,
            )

    def _keep(
        self,
        req: Request,
        trace: bytes | str,
        route: str | None,
        service: str | None,
        instance: str | None,
        consumer: Any,
        status: int,
        sent: int,
        upstream_ms: float | None,
        total_ms: float | None,
        retries: int,
        breaker: str | None,
        cache: str | None,
        error: str | None,
    ) -> None:
        if consumer is not None:
            name = getattr(consumer, "name", _NO_NAME)
            consumer = str(consumer) if name is _NO_NAME else name
        request_id = req.request_id
        if request_id is not req.plain_id:  # a plugin's own id: maybe anything
            request_id = _inner(request_id)
        if type(trace) is str:  # (a trace line's id is hex digits: nothing to escape)
            trace = _inner(trace)
        # The names repeat from request to request (a route goes to few instances): the
        # last ones' fields are reused as they are, others looked up, made once.
        if route is self._route and service is self._service and instance is self._instance:
            names = self._names
        else:
            names = self._names_of(route, service, instance)
        pending = self.pending
        pending.append(
            Entry(
                req.start,
                request_id,
                trace,
                req.client_ip,
                req.method,
                req.path,
                names,
                status,
                sent,
                upstream_ms,
                total_ms,
                consumer,
                retries,
                breaker,
                cache,
                error,
            )
        )
        if len(pending) >= FLUSH_LINES:
            self.full()

    def _names_of(self, route: str | None, service: str | None, instance: str | None) -> str:
        """The route, service and instance fields of a line (remembered, and remembered as
        the last ones)."""
        key = (route, service, instance)
        names = self._names_by_key.get(key)
        if names is None:
            names = (
                f',"route":{"null" if route is None else self.quote(route)},'
                f'"service":{"null" if service is None else self.quote(service)},'
                f'"instance":{"null" if instance is None else self.quote(instance)},"status":'
            )
            if len(self._names_by_key) >= _NAMES_MAX:
                self._names_by_key.clear()  # a churn of instances: start again
            self._names_by_key[key] = names
        self._route = route
        self._service = service
        self._instance = instance
        self._names = names
        return names

    def take(self) -> list[Entry]:
        """The waiting entries, taken out (so that a failed write can neither repeat a line
        nor let them pile up)."""
        pending = self.pending
        self.pending = []
        return pending

    def format(self, entries: list[Entry]) -> str:
        """The lines of `entries`, together: one tight loop, hot in the CPU's caches."""
        return "".join([self.line(entry) for entry in entries])

    def line(self, entry: Entry) -> str:
        """One entry as its JSON line (what json.dumps made of the same fields as a dict)."""
        start = entry.start
        second = int(start)  # time.gmtime also rounds down (and `start` is positive)
        if second != self._second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start))
            self._line_start = '{"time":"' + stamp
            self._second = second
        ms = int((start - second) * 1000)  # (= start % 1 here: exact, and no fmod call)
        trace = entry.trace
        trace_id = line_trace_id(trace) if isinstance(trace, bytes) else trace
        status = entry.status
        upstream_ms = entry.upstream_ms
        total_ms = entry.total_ms
        if upstream_ms is None:
            upstream, upstream_decimals = "null", ""
        else:
            upstream, upstream_decimals = duration_parts(upstream_ms)
        if total_ms is None:
            total, total_decimals = "null", ""
        else:
            total, total_decimals = duration_parts(total_ms)
        millis = _MILLIS[ms] if ms < 1000 else f'.{ms}Z","request_id":"'
        status_field = _STATUS_FIELD[status] if 0 <= status < 1000 else f'{status},"bytes":'
        sent = entry.sent
        sent_text = _SMALL_INTS[sent] if 0 <= sent < 1000 else str(sent)
        # The types are fixed (see ProxyExchange and Request): names and ids are str, status
        # and bytes int, durations finite floats or None, so each value is formatted directly.
        return (
            f"{self._line_start}{millis}"
            f'{entry.request_id}","trace_id":"{trace_id}'
            f"{self.who(entry.client, entry.method)}{_quote(entry.path)}"
            f"{entry.names}"
            f"{status_field}"
            f'{sent_text},"upstream_ms":{upstream}{upstream_decimals},'
            f'"total_ms":{total}{total_decimals}'
            f"{_line_end(entry)}"
        )

    def who(self, client: str, method: str) -> str:
        """The client and method fields of a line, between the trace id's value and the
        path's: one piece of the build, remembered by method and client (lines repeat both)."""
        by_client = self._who.get(method)
        if by_client is None:
            if len(self._who) >= _METHODS_MAX:
                self._who.clear()  # methods are any token a client sends: a bound here too
            by_client = self._who[method] = {}
        who = by_client.get(client)
        if who is None:
            who = f'","client":{self.quote(client)},"method":{self.quote(method)},"path":'
            if len(by_client) >= _QUOTED_MAX:
                by_client.clear()  # a churn of clients: start again
            by_client[client] = who
        return who

    def quote(self, value: str) -> str:
        """`value` quoted and escaped as json.dumps does it, remembered for the next lines."""
        quoted = self.quoted.get(value)
        if quoted is None:
            quoted = _quote(value)
            if len(self.quoted) >= _QUOTED_MAX:
                self.quoted.clear()  # a churn of clients or instances: start again
            self.quoted[value] = quoted
        return quoted


def _line_end(entry: Entry) -> str:
    """The optional fields of a line, present only when they say something, and the line's
    end: most requests have none, and then the line is one build with no concatenation."""
    consumer = entry.consumer
    retries = entry.retries
    breaker = entry.breaker
    cache = entry.cache
    error = entry.error
    if consumer is None and not retries and breaker is None and not cache and not error:
        return "}\n"
    fields = ""
    if consumer is not None:
        fields += f',"consumer":{_json(consumer)}'
    if retries:
        fields += f',"retries":{_json(retries)}'
    if breaker is not None and breaker != "closed":  # open: refused; half_open: a probe
        fields += f',"breaker":{_json(breaker)}'
    if cache:
        fields += f',"cache":{_json(cache)}'
    if error:
        fields += f',"error":{_json(error)}'
    return fields + "}\n"
