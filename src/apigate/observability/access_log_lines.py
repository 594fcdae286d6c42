"""The per-request half of the access log (apigate.observability.access_log): what `on_log`
keeps of each exchange, and the JSON line each entry becomes when a batch is written.

Compiled with the data plane (apigate.buildinfo), so that the gateway calls `on_log` with no
interpreted frame in between and the lines are formatted as native code: timed in place on a
bench/micro.py exchange, `on_log` with its share of the batch's formatting and writing cost
~3.2 µs per request interpreted, ~1.3 µs compiled.

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
from apigate.observability.trace_context import trace_id_of
from apigate.proxy.exchange import ProxyExchange
from apigate.resilience.circuit_breaker import State

# Final: a compiled module reads it from a C static, not from its globals dict per call
_quote: Final = encode_basestring_ascii
# Lines wait (as tuples of their values) until this many, or the once-a-second tick: ~64 KiB
FLUSH_LINES: Final = 256
# '.000Z' ... '.999Z': the milliseconds and zone of a timestamp, formatted once
_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))
# '.0', '.001', ..., '.01', ..., '.999': the decimals of a duration rounded to 3 places, as
# str(float) writes them (trailing zeros dropped, at least one digit)
_DECIMALS: Final = tuple("." + (f"{n:03d}".rstrip("0") or "0") for n in range(1000))
# '0' ... '999': a status as str() writes it, without formatting an int per line
_STATUS: Final = tuple(str(status) for status in range(1000))
_QUOTED_MAX: Final = 4096  # quoted values remembered (then forgotten all at once)
_NO_NAME: Final = object()  # a consumer without a `name` attribute (logged as its str())

# What on_log keeps of an exchange for its line, all immutable values copied at log time:
# (start, request id, trace id, client, method, path, route, service, instance, status, bytes,
# upstream_ms, total_ms, then the optional consumer, retries, breaker, cache, error). A plain
# tuple: the cheapest thing to build per request.
Entry = tuple[Any, ...]


def _json(value: Any) -> str:
    """A value as json.dumps writes it (for the optional fields, whatever their type)."""
    return _quote(value) if type(value) is str else json.dumps(value, separators=(",", ":"))


def _plain(value: str) -> bool:
    """Whether json.dumps writes `value` as itself in quotes: ASCII letters and digits only
    (`isalnum` alone also takes other scripts' letters and digits, which json.dumps escapes)."""
    return value.isalnum() and value.isascii()


def duration(value: float) -> str:
    """`str(round(value, 3))`, the way a duration has always been logged, mostly without
    `round` and the float's repr (together ~0.6 µs; two per line, the dearest part of it).

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
            return str(n // 1000) + _DECIMALS[n % 1000]
    elif scaled == 0.0 and math.copysign(1.0, scaled) > 0.0:
        return "0.0"
    return str(round(value, 3))


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
        # '{"time":"YYYY-MM-DDTHH:MM:SS' of the last second formatted: strftime once a second
        self._second = -1
        self._line_start = ""

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
            self._keep(
                ctx.request,
                trace_id_of(ctx),
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
        trace_id: str,
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
        pending = self.pending
        pending.append(
            (
                req.start,
                req.request_id,
                # set with the upstream head's trace headers; trace_id_of() makes the others'
                trace_id,
                req.client_ip,
                req.method,
                req.path,
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
            )
        )
        if len(pending) >= FLUSH_LINES:
            self.full()

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
        start: float = entry[0]
        second = int(start)  # time.gmtime also rounds down (and `start` is positive)
        if second != self._second:
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start))
            self._line_start = '{"time":"' + stamp
            self._second = second
        ms = int((start - second) * 1000)  # (= start % 1 here: exact, and no fmod call)
        route = entry[6]
        service = entry[7]
        instance = entry[8]
        upstream_ms: float | None = entry[11]
        total_ms: float | None = entry[12]
        status: int = entry[9]
        sent: int = entry[10]  # (typed: an int's text is native, an Any's a generic str())
        # Ids are letters and digits (the gateway's own request ids and every trace id always,
        # a client's request id mostly), and such a value quoted is the value in quotes: no
        # encode_basestring_ascii call for either. Anything else (a client's id with '-', a
        # plugin's own value) is escaped as json.dumps does it (its quotes taken off: the
        # line has them).
        request_id: str = entry[1]
        trace_id: str = entry[2]
        rid = request_id if _plain(request_id) else _quote(request_id)[1:-1]
        tid = trace_id if _plain(trace_id) else _quote(trace_id)[1:-1]
        # The types are fixed (see ProxyExchange and Request): names and ids are str, status
        # and bytes int, durations finite floats or None, so each value is formatted directly.
        return (
            f'{self._line_start}{_MILLIS[ms] if ms < 1000 else f".{ms}Z"}",'
            f'"request_id":"{rid}",'
            f'"trace_id":"{tid}",'
            f'"client":{self.quote(entry[3])},'
            f'"method":{self.quote(entry[4])},'
            f'"path":{_quote(entry[5])},'
            f'"route":{"null" if route is None else self.quote(route)},'
            f'"service":{"null" if service is None else self.quote(service)},'
            f'"instance":{"null" if instance is None else self.quote(instance)},'
            f'"status":{_STATUS[status] if 0 <= status < 1000 else str(status)},'
            f'"bytes":{sent},'
            f'"upstream_ms":{"null" if upstream_ms is None else duration(upstream_ms)},'
            f'"total_ms":{"null" if total_ms is None else duration(total_ms)}'
            f"{_optional_fields(entry)}}}\n"
        )

    def quote(self, value: str) -> str:
        """`value` quoted and escaped as json.dumps does it, remembered for the next lines."""
        quoted = self.quoted.get(value)
        if quoted is None:
            quoted = _quote(value)
            if len(self.quoted) >= _QUOTED_MAX:
                self.quoted.clear()  # a churn of clients or instances: start again
            self.quoted[value] = quoted
        return quoted


def _optional_fields(entry: Entry) -> str:
    """The optional fields of a line, present only when they say something: most requests
    have none, and then the line is one build with no concatenation after it."""
    consumer = entry[13]
    retries = entry[14]
    breaker = entry[15]
    cache = entry[16]
    error = entry[17]
    if consumer is None and not retries and breaker is None and not cache and not error:
        return ""
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
    return fields
