"""Aggregation routes: one request fans out to several services, the JSON answers are merged.

    - name: user-dashboard
      match: {paths: ["/api/dashboard/{user_id}"]}
      aggregate:
        profile: {service: users, path: "/users/{user_id}"}
        orders: {service: orders, path: "/orders?user={user_id}", optional: true, timeout: 2s}

`GET /api/dashboard/42` calls both parts concurrently and answers

    {"profile": {...}, "orders": [...]}

Part paths are templates: `{name}` is a route path parameter, `{query.NAME}` a query parameter
of the client's request, `{claim.NAME}` a verified JWT claim (`ctx.vars["jwt_claims"]`); any
`apigate.plugins.transform.ValueTemplate` source works. Substituted values are percent-encoded
for where they stand: a path segment before the `?`, a query component after it.

Failures: a part fails on a timeout (its `timeout`), a connect error, a non-2xx status
(`HTTP 503`), a body that is not JSON (`invalid JSON`), a body over 10 MiB. An `optional` part
that fails becomes `null` and adds `{"part": ..., "error": ...}` to an `_errors` list; a
required one fails the request at once (the other calls are cancelled) with 502
`{"error": "aggregate_failed", "message": "part 'profile' failed: timeout", "request_id": ...}`.
A template value the request does not carry (no such query parameter or claim) fails a
required part with 400 and an optional one like any other failure. A 204 from a part is `null`.

Each call goes through the service's balancer and keep-alive pool (the proxy's own pools, so
connections are reused across parts and plain proxied requests, and passive health sees the
results); a pooled connection the upstream had just closed is retried once on a new one. The
service's circuit breaker guards the calls as it guards proxied requests: an open breaker fails
the part at once (`circuit open`) without a call, and a part's outcome (a timeout, a transport
error or a 5xx is a failure) counts towards opening or closing it; a call cancelled because a
required sibling failed, or because the client left (reset, not half-closed), counts for
neither.
Only the request id, the forwarding headers (as a proxied request gets them) and the trace
context go to the parts, never the client's credentials. Each part is a child span of the
request's trace: its own span id in `traceparent`, recorded in `vars["part_spans"]` for the
tracing exporter, which exports a client span per part.
Each call that got a response head adds, when it ends, its latency (from sending the request
to the head, as a proxied request's `upstream_ms`) and its service's name to
`vars["part_upstream_ms"]` (`apigate.observability.series.PART_LATENCIES`):
the metrics count it in `apigate_upstream_duration_seconds{route, service}` under the
aggregate route and the part's service, as Envoy and KrakenD make each backend call's latency
observable.
The HTTP client is injectable (`fetch=`), so unit tests need no sockets.
"""

from __future__ import annotations

import asyncio
import json
import json.scanner
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import quote

from apigate.config.schema import AGGREGATE_ERRORS
from apigate.http.errors import GatewayError
from apigate.http.headers import VIA_LINE, forwarding_lines
from apigate.http.pool import PoolFull
from apigate.http.upstream import UpstreamListener
from apigate.observability.series import PART_LATENCIES
from apigate.observability.trace_context import ChildTrace, PartSpan
from apigate.plugins.response import Response
from apigate.plugins.transform import ValueTemplate, refuse_json_constant
from apigate.routing.rewrite import encode_param, has_bad_segment

if TYPE_CHECKING:
    from apigate.config.schema import AggregatePartConfig, RouteConfig
    from apigate.http.pool import Pool
    from apigate.http.request import Request
    from apigate.http.response_head import ResponseHead
    from apigate.http.upstream import UpstreamConnection
    from apigate.registry.service import Service
    from apigate.resilience.circuit_breaker import CircuitBreaker

__all__ = [
    "MAX_PART_BODY",
    "Aggregator",
    "Fetch",
    "PartError",
    "PartRequest",
    "PartResponse",
    "build_aggregate_handler",
]

log = logging.getLogger("apigate.proxy.aggregate")

MAX_PART_BODY: Final = 10 << 20
# where the merged answer lists its failed parts
_ERRORS_MEMBER: Final = b'"%s":' % AGGREGATE_ERRORS.encode()


# Plain classes rather than dataclasses: mypyc compiles this module (apigate.buildinfo), and
# its dataclass support fails at import on annotations like these.
class PartRequest:
    __slots__ = ("headers", "max_body", "method", "part", "service", "target", "timeout")

    def __init__(
        self,
        part: str,
        service: Service,
        method: str,
        target: str,  # path?query, already encoded
        headers: list[tuple[bytes, bytes]],
        timeout: float,
        max_body: int = MAX_PART_BODY,
    ) -> None:
        self.part = part
        self.service = service
        self.method = method
        self.target = target
        self.headers = headers
        self.timeout = timeout
        self.max_body = max_body

    def __repr__(self) -> str:
        return f"<PartRequest {self.part} {self.method} {self.target}>"


class PartResponse:
    __slots__ = ("body", "headers", "status")

    def __init__(
        self, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.headers = headers if headers is not None else []

    def __repr__(self) -> str:
        return f"<PartResponse {self.status} {len(self.body)} bytes>"


class PartError(Exception):
    """A part's call failed; `str(exc)` is the text that goes into `_errors`."""


class _BadInput(Exception):
    """The request cannot fill in a part's path: the client's mistake (400)."""


class _MissingInput(_BadInput):
    def __init__(self, names: list[str]) -> None:
        super().__init__("missing " + ", ".join(names))
        self.names = names


Fetch = Callable[[PartRequest], Awaitable[PartResponse]]
# An exchange's handler (Runtime.handlers): it answers the exchange itself, through callbacks
# (None) or in a coroutine the exchange runs as a task.
Handler = Callable[[Any], Coroutine[Any, Any, None] | None]


class _Part:
    """One `aggregate:` entry, its path template parsed once."""

    __slots__ = (
        "constant_target",
        "encoders",
        "length_line",
        "member",
        "method",
        "method_bytes",
        "name",
        "optional",
        "service",
        "template",
        "timeout",
    )

    def __init__(self, name: str, config: AggregatePartConfig) -> None:
        self.name = name
        self.member = json.dumps(name).encode() + b":"  # its key in the merged object
        self.service = config.service
        self.optional = config.optional
        self.timeout = config.timeout
        self.method = config.method
        self.method_bytes = config.method.encode() + b" "  # the start of its request line
        # a request without a body says so where a body could be expected (RFC 9110 §8.6)
        bodyless = config.method in ("GET", "HEAD", "DELETE", "OPTIONS")
        self.length_line = b"" if bodyless else b"Content-Length: 0\r\n"
        self.template = ValueTemplate(config.path)
        # the target when the path has no placeholder (read per request: not through the
        # template, an interpreted object)
        self.constant_target = config.path if self.template.constant else None
        # A value before the first "?" stays inside a path segment; after it, a query component.
        self.encoders: list[Callable[[str], str]] = []
        in_query = False
        for literal in self.template.literals[:-1]:
            in_query = in_query or "?" in literal
            self.encoders.append(_query_component if in_query else encode_param)

    def target(self, ctx: Any) -> str:
        if self.constant_target is not None:
            return self.constant_target
        template = self.template
        values = template.values(ctx)
        missing = [n for n, v in zip(template.names, values, strict=True) if v is None]
        if missing:
            raise _MissingInput(missing)
        parts = [template.literals[0]]
        for value, encode, literal in zip(
            values, self.encoders, template.literals[1:], strict=True
        ):
            parts += (encode(value or ""), literal)
        target = "".join(parts)
        if has_bad_segment(target.partition("?")[0]):
            # ".." and "." are left as they are by the encoding, and `/users/{query.id}/orders`
            # with id=.. reached the upstream as /users/../orders, that is /orders
            raise _BadInput("a value would make a dot segment or an empty one in the part's path")
        return target

    def __repr__(self) -> str:
        kind = "optional" if self.optional else "required"
        return f"<Part {self.name} {self.service}{self.template.text} {kind}>"


def _query_component(value: str) -> str:
    return quote(value, safe="", errors="surrogateescape")


class Aggregator:
    """The handler of one aggregate route: `aggregator(ctx)` sets off the parts' calls, and
    the exchange is answered when their outcomes are in."""

    def __init__(
        self,
        route: RouteConfig,
        services: Mapping[str, Service],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        fetch: Fetch | None = None,
        max_body: int = MAX_PART_BODY,
    ) -> None:
        if not route.aggregate:
            raise ValueError(f"route {route.name} has no aggregate parts")
        self.route = route.name
        # (the runtime's own dict, kept, not copied; typed dict: compiled, a Mapping's get is
        # a lookup by name)
        self.services: dict[str, Service] = (
            services if isinstance(services, dict) else dict(services)
        )
        self.loop = loop
        self.fetch = fetch  # None: the proxy's own balancers and pools
        self.max_body = max_body
        self.parts = [_Part(name, part) for name, part in route.aggregate.items()]

    def __call__(self, ctx: Any) -> None:
        """Start answering `ctx`: every part's call goes out now, and the outcome that
        completes the aggregate answers the exchange (`ctx.respond` or `ctx.fail`) from the
        callback that brought it. No task and no coroutine per part: each call is driven by
        its connection's callbacks and the run's deadline timer. (Three parts: 168,000
        instructions per aggregated request against 319,000 with a task per part, counted
        with bench/micro.py --config aggregate3.)"""
        run: _Run | None = None
        try:
            run = _Run(self, ctx)
            run.start()
            if not run.over:
                ctx.on_client_lost = run.client_gone
        except Exception:  # a bug here must still answer the client, and only once
            log.exception("aggregation failed on route %s", self.route)
            err = GatewayError(500, "aggregation failed", "aggregate_error")
            if run is not None:
                run.abandon(err)
            else:
                ctx.fail(err)

    def merge(self, outcomes: list[bytes | BaseException | None]) -> bytes:
        """Spliced, not re-serialised: each part's body was validated as UTF-8 JSON."""
        members: list[bytes] = []
        errors: list[dict[str, str]] = []
        for part, outcome in zip(self.parts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                errors.append({"part": part.name, "error": _describe(outcome)})
                raw = b"null"
            else:
                raw = outcome if outcome is not None else b"null"
            members.append(part.member + raw)
        if errors:
            members.append(_ERRORS_MEMBER + json.dumps(errors, separators=(",", ":")).encode())
        return b"{" + b",".join(members) + b"}"

    def __repr__(self) -> str:
        return f"<Aggregator {self.route} {self.parts!r}>"


class _Run:
    """One aggregated request in flight: its part calls and their outcomes so far."""

    def __init__(self, aggregator: Aggregator, ctx: Any) -> None:
        self.aggregator = aggregator
        self.ctx = ctx
        self.loop = aggregator.loop or asyncio.get_running_loop()
        self.trace = ChildTrace(ctx)  # each part a child span of the request's trace
        # The header lines of every part's request but its traceparent (which comes first),
        # once per run: JSON wanted, the request id, the forwarding lines a proxied request of
        # the connection gets (kept by the connection when it can), Via, and the client's
        # tracestate when its trace is continued. Never the client's credentials.
        req: Request = ctx.request
        lines = [
            _ACCEPT_JSON,
            b"X-Request-Id: %s\r\n" % (req.request_id.encode(),),
            req.forwarding
            or forwarding_lines(req.client_ip, req.forwarded_for, req.scheme, req.host),
            VIA_LINE,
        ]
        lines += [b"tracestate: %s\r\n" % (state,) for state in self.trace.states]
        self.header_lines = b"".join(lines)
        self.spans: list[PartSpan] | None = None  # ctx.vars["part_spans"], once there is one
        # ctx.vars[PART_LATENCIES], once a part has a response head: (service, ms) per call
        self.latencies: list[tuple[str, float]] | None = None
        self.calls: list[_PartCall] = []
        self.outcomes: list[bytes | BaseException | None] = [None] * len(aggregator.parts)
        self.pending = len(aggregator.parts)
        self.over = False  # answered: later outcomes change nothing
        # One timer for the parts' deadlines, at the earliest one still ahead (parts mostly
        # share one timeout: a timer per part cost ~6,000 instructions each).
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    def start(self) -> None:
        for index, part in enumerate(self.aggregator.parts):
            if self.over:
                break  # a required part failed before its call (a missing input, say)
            call = _PartCall(self, index, part)
            self.calls.append(call)
            call.start()

    def arm(self, deadline: float) -> None:
        """Have the timer fire by `deadline` (a part's)."""
        if self.timer is None or deadline < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = deadline
            self.timer = self.loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        now = self.loop.time() + 0.001  # (a timer can fire a little early: libuv's are in ms)
        for call in list(self.calls):
            if not call.finished and call.deadline <= now:
                call.on_deadline()
        if self.over:
            return
        ahead = [call.deadline for call in self.calls if not call.finished]
        if ahead:
            self.arm(min(ahead))

    def _end(self) -> None:
        self.over = True
        # no cycle left for the garbage collector: run <-> calls, run <-> exchange
        self.calls = []
        self.ctx.on_client_lost = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def settle(self, call: _PartCall, outcome: bytes | BaseException) -> None:
        """A part's outcome: its body, or its failure. The first required failure answers at
        once and cancels the calls still running (fail fast); an optional part's failure is
        its outcome; the last outcome answers with the merged body."""
        if self.over:
            return
        part = call.part
        if isinstance(outcome, BaseException) and not part.optional:
            self.abandon(_required_failure(part, outcome))
            return
        self.outcomes[call.index] = outcome
        self.pending -= 1
        if self.pending:
            return
        self._end()
        try:
            body = self.aggregator.merge(self.outcomes)
        except Exception:
            log.exception("aggregation failed on route %s", self.aggregator.route)
            self.ctx.fail(GatewayError(500, "aggregation failed", "aggregate_error"))
            return
        self.ctx.respond(Response(200, body))

    def client_gone(self) -> None:
        """The client left: nobody wants the answer, so the calls still running are cut
        (as a proxied request's upstream connection is), counting for neither health nor
        breakers."""
        if not self.over:
            self._cancel_calls()

    def abandon(self, err: GatewayError) -> None:
        """Answer with `err` (unless answered already) and cancel the calls still running."""
        if self.over:
            return
        self._cancel_calls()
        self.ctx.fail(err)

    def _cancel_calls(self) -> None:
        calls = self.calls
        self._end()
        for call in calls:
            call.cancel()

    def answered_after(self, service: str, ms: float) -> None:
        """A part's call to `service` had its response head `ms` after it was sent."""
        latencies = self.latencies
        if latencies is None:
            latencies = self.latencies = self.ctx.vars.setdefault(PART_LATENCIES, [])
        latencies.append((service, ms))


# json.loads minus its three Python-level frames: the C scanner json.loads ends up in, with
# the same rules (surrounding whitespace allowed, nothing else after the value).
# (typeshed types make_scanner's argument as the scanner class itself)
_SCAN: Final[Callable[[str, int], tuple[Any, int]]] = json.scanner.make_scanner(
    json.JSONDecoder(parse_constant=refuse_json_constant)  # type: ignore[arg-type]
)
_JSON_BLANK: Final = " \t\n\r"  # JSON's whitespace (not Python's: no \f or \v)


def _json_bytes(body: bytes) -> bytes:
    """`body` when it is one JSON value in UTF-8 (what the merged object splices in), without
    the whitespace around it. (Stripped first, then scanned whole: two regex matches for the
    blanks cost 4,000 instructions a part.)"""
    try:
        text = body.decode("utf-8").strip(_JSON_BLANK)
        _value, end = _SCAN(text, 0)
        if end != len(text):
            raise ValueError("extra data")
    except (UnicodeDecodeError, ValueError, StopIteration, RecursionError):
        # (RecursionError: a body nested deeper than the C scanner goes, "[[[[..." say)
        raise PartError("invalid JSON") from None
    return body.strip(b" \t\n\r")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PartError | _BadInput):
        return str(exc)
    return "internal error"


def _required_failure(part: _Part, exc: BaseException) -> GatewayError:
    if isinstance(exc, _BadInput):
        return GatewayError(400, f"part '{part.name}': {exc}", "bad_request")
    if not isinstance(exc, PartError):
        log.error("aggregate part %s failed", part.name, exc_info=exc)
    return GatewayError(502, f"part '{part.name}' failed: {_describe(exc)}", "aggregate_failed")


_ACCEPT_JSON: Final = b"Accept: application/json\r\n"


def build_aggregate_handler(
    route: RouteConfig,
    services: Mapping[str, Service],
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    fetch: Fetch | None = None,
) -> Handler:
    """`Runtime.handlers[route.name]` for a route with `aggregate:` (built once per snapshot)."""
    return Aggregator(route, services, loop, fetch=fetch)


# ------------------------------------------------------------------------------ the calls


class _PartCall(UpstreamListener):
    """One part's call: through the service's balancer and keep-alive pools, or through an
    injected `fetch` (tests), within the part's `timeout` in all (the run's timer cuts the
    call wherever it is: connecting, sending or reading).

    Pooled: a connect failure moves on to another instance once; a reused keep-alive
    connection that turns out closed before any response byte is replaced once (the upstream
    closed it as we took it). Only opening a connection is awaited, in a task of its own."""

    def __init__(self, run: _Run, index: int, part: _Part) -> None:
        self.run = run
        self.index = index
        self.part = part
        self.service: Service | None = None
        self.target = ""
        self.request_line = b""  # up to the version: b"GET /users/42"
        self.traceparent = b""
        # the breaker that let the call through (a reload may replace the service's), and its
        # transitions then (see CircuitBreaker.record)
        self.breaker: CircuitBreaker | None = None
        self.since: int | None = None
        self.started = 0.0  # wall clock, for the span
        self.finished = False
        self.deadline = 0.0  # loop time (the run's timer keeps it)
        self.task: asyncio.Task[None] | None = None  # opening a connection, or a fetch
        # the pooled exchange in progress
        self.conn: UpstreamConnection | None = None
        self.inst: Any = None
        self.tried: list[Any] = []
        self.reused = False
        self.fresh_retry = True
        self.sent_at = 0.0
        self.head_at = 0.0  # when the response head came (0.0: not yet), for the metrics
        self.head: ResponseHead | None = None
        self.chunks: list[bytes] = []
        self.size = 0

    def start(self) -> None:
        run = self.run
        part = self.part
        aggregator = run.aggregator
        try:
            service = aggregator.services.get(part.service)
            if service is None:
                raise PartError(f"unknown service {part.service}")
            self.service = service
            self.traceparent = run.trace.traceparent()  # the part's own span id
            self.target = part.target(run.ctx)
            self.request_line = part.method_bytes + self.target.encode("ascii")
            breaker = service.breaker
            if breaker is not None:
                if not breaker.allow():
                    raise PartError("circuit open")  # as a proxied request: no call at all
                self.breaker = breaker
                self.since = breaker.transitions
        except Exception as exc:  # no call was made: no span, nothing for the breaker
            self.finished = True
            run.settle(self, exc)
            return
        self.started = time.time()
        loop = run.loop
        self.deadline = loop.time() + part.timeout
        run.arm(self.deadline)
        if aggregator.fetch is not None:
            self.task = loop.create_task(self._fetch(aggregator.fetch, self._part_request()))
        else:
            self._send()

    def _part_request(self) -> PartRequest:
        """The call as an injected client is given it: its header fields are the lines the
        pooled client writes, read back (one definition of what a part is sent)."""
        run, part, service = self.run, self.part, self.service
        assert service is not None
        lines = b"traceparent: %s\r\n%s" % (self.traceparent, run.header_lines)
        headers: list[tuple[bytes, bytes]] = []
        for line in lines.split(b"\r\n")[:-1]:
            name, _, value = line.partition(b": ")
            headers.append((name, value))
        return PartRequest(
            part.name,
            service,
            part.method,
            self.target,
            headers,
            part.timeout,
            run.aggregator.max_body,
        )

    def cancel(self) -> None:
        """A required sibling failed, or the client left: stop, counting for neither the
        instance nor the breaker (the call says nothing about the service)."""
        if self.finished:
            return
        self._stop_waiting()
        self._drop_conn()
        self._end(None, False, PartError("cancelled"))

    # ------------------------------------------------------------------ the outcome
    def _response(self, status: int, body: bytes) -> None:
        outcome: bytes | BaseException
        if not 200 <= status < 300:
            outcome = PartError(f"HTTP {status}")
        elif status == 204:
            outcome = b"null"
        else:
            try:
                outcome = _json_bytes(body)
            except PartError as invalid:
                outcome = invalid
        self._end(status < 500, status >= 400, outcome)

    def _fail(self, exc: Exception, healthy: bool | None = False) -> None:
        """`healthy` None: a failure of ours (a bug), not the service's."""
        self._end(healthy, healthy is False, exc)

    def _refused(self, reason: str) -> None:
        """The part fails before any instance was asked (none healthy, the gateway's own
        connection limit reached): nothing to tell the breaker about the service, as for a
        proxied request."""
        self._end(None, True, PartError(reason))

    def _end(self, healthy: bool | None, failed: bool, outcome: bytes | BaseException) -> None:
        """The call is over: the breaker and the exporter learn how it went (`healthy` None:
        cancelled), the run its outcome."""
        if self.finished:
            return
        self.finished = True
        try:  # (whatever goes wrong here, the run learns the outcome)
            service = self.service
            assert service is not None
            breaker = self.breaker
            if breaker is not None:
                if healthy is None:
                    breaker.release(self.since)
                else:
                    breaker.record(healthy, self.since)
            run = self.run
            spans = run.spans
            if spans is None:
                spans = run.spans = run.ctx.vars.setdefault("part_spans", [])
            spans.append(
                (
                    self.part.name,
                    service.name,
                    self.traceparent[36:52].decode(),
                    self.started,
                    (time.time() - self.started) * 1000.0,
                    failed,
                )
            )
            if self.head_at:  # it was answered: the latency of the service's answer
                run.answered_after(service.name, (self.head_at - self.sent_at) * 1000.0)
        finally:
            self.run.settle(self, outcome)

    def on_deadline(self) -> None:
        """The part's whole time is up: cut the call wherever it is."""
        if self.finished:
            return
        self._stop_waiting()
        self._drop_conn()
        self._fail(PartError("timeout"))

    def _stop_waiting(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()

    def _drop_conn(self) -> None:
        """Abandon the exchange in progress (a half-read response cannot be reused) without
        a word to passive health: cut by us, or never begun by the instance."""
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.detach()
            conn.abort()
            self._finished_on_instance(False)

    def _finished_on_instance(self, ok: bool) -> None:
        service = self.service
        assert service is not None
        service.balancer.on_finish(self.inst, time.monotonic() - self.sent_at, ok)

    # ------------------------------------------------------------------ injected client
    async def _fetch(self, fetch: Fetch, request: PartRequest) -> None:
        self.sent_at = time.monotonic()
        try:
            response = await fetch(request)
        except PoolFull:
            self._refused("connection limit reached")
            return
        except OSError:
            self._fail(PartError("connect error"))
            return
        except TimeoutError:
            self._fail(PartError("timeout"))
            return
        except PartError as part_error:  # (a name per clause: see UpstreamConnection)
            self._fail(part_error)
            return
        except Exception as exc:
            self._fail(exc, healthy=None)
            return
        self.task = None
        self.head_at = time.monotonic()  # (the whole response: an injected client has no head)
        try:
            self._response(response.status, response.body)
        except Exception as bug:
            self._crashed(bug)

    # ------------------------------------------------------------------ pooled client
    def _send(self) -> None:
        """Pick an instance; send on one of its idle connections, or open one."""
        if self.finished:
            return
        service = self.service
        assert service is not None
        try:
            inst = service.balancer.pick(None, self.tried)
            if inst is None:
                if self.tried:
                    self._fail(PartError("connect error"))
                else:
                    self._refused("no healthy instance")
                return
            pool = service.pool_for(inst)
            conn = pool.acquire_idle()
            if conn is not None:
                self._exchange(inst, conn, reused=True)
            else:
                self.task = self.run.loop.create_task(self._connect(inst, pool))
        except Exception as exc:
            self._crashed(exc)

    def _crashed(self, exc: Exception) -> None:
        """A bug of ours in a callback: the part fails (an internal error, not the service's)
        rather than the exception escaping into the connection's or the loop's hands."""
        log.exception("aggregate part %s: unexpected error", self.part.name, exc_info=exc)
        self._drop_conn()
        self._fail(exc, healthy=None)

    async def _connect(self, inst: Any, pool: Pool) -> None:
        service = self.service
        assert service is not None
        loop = self.run.loop
        left = self.deadline - loop.time()
        connect_timeout = service.config.timeouts.connect
        try:
            conn = await pool.connect(min(connect_timeout, max(left, 0.0)))
        except PoolFull:
            self.task = None
            self._refused("connection limit reached")
            return
        except (OSError, TimeoutError):
            self.task = None
            if self.finished:  # ended meanwhile (a cancel that came too late to interrupt)
                return
            if left <= connect_timeout and loop.time() >= self.deadline:
                self.on_deadline()  # the part's time ran out, not the instance's
                return
            service.report(inst, ok=False)
            self.tried.append(inst)
            if len(self.tried) >= 2:
                self._fail(PartError("connect error"))
            else:
                self._send()
            return
        self.task = None
        if self.finished:  # ended while connecting (it was not cancelled in time)
            pool.release(conn)
            return
        if conn.closed:  # handed over by a finishing call, then closed by the upstream
            pool.release(conn)
            if self.fresh_retry:
                self.fresh_retry = False
                self._send()
            else:
                self._fail(PartError("connection reset"))
            return
        try:
            self._exchange(inst, conn, reused=conn.requests > 0)  # (or handed over)
        except Exception as exc:
            self._crashed(exc)

    def _exchange(self, inst: Any, conn: UpstreamConnection, reused: bool) -> None:
        service = self.service
        assert service is not None
        part = self.part
        self.inst = inst
        self.conn = conn
        self.reused = reused
        self.head = None
        self.head_at = 0.0
        self.chunks = []
        self.size = 0
        now = self.sent_at = time.monotonic()
        service.balancer.on_start(inst)
        # no response timer of the connection's own: the part's deadline bounds the call
        conn.begin(self, part.method == "HEAD", 0.0, now=now)
        run = self.run
        request_line = self.request_line
        if inst.base_path:  # a target's path goes before every path, as for a proxied request
            request_line = part.method_bytes + (inst.base_path + self.target).encode("ascii")
        conn.write(
            b"".join(
                [
                    request_line,
                    b" HTTP/1.1\r\nHost: ",
                    conn.pool.host_header,
                    b"\r\ntraceparent: ",
                    self.traceparent,
                    b"\r\n",
                    run.header_lines,
                    part.length_line,
                    b"\r\n",
                ]
            )
        )
        conn.mark_sent(now)

    # UpstreamListener: what the connection reports
    def on_response_head(self, head: ResponseHead) -> None:
        self.head = head
        self.head_at = time.monotonic()

    def on_response_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.run.aggregator.max_body:
            # our limit, not the instance's fault: it answered, so passive health and the
            # breaker hear nothing against it (three such parts ejected a healthy instance)
            self._drop_conn()
            self._end(True, True, PartError("response too large"))
            return
        self.chunks.append(chunk)

    def on_response_done(self) -> None:
        conn, head = self.conn, self.head
        if conn is None:
            return
        if head is None:
            self._lost()
            self._fail(PartError("connection reset"))
            return
        self.conn = None
        conn.pool.release(conn)
        self._finished_on_instance(True)
        service = self.service
        assert service is not None
        service.report(self.inst, ok=head.status < 500, status=head.status)
        try:
            self._response(head.status, b"".join(self.chunks))
        except Exception as exc:
            self._crashed(exc)

    def on_upstream_lost(self, exc: Exception | None) -> None:
        conn = self.conn
        if conn is None:
            return
        if self.reused and not conn.got_bytes and self.fresh_retry:
            # The keep-alive race: the upstream closed the idle connection as we took it.
            # Nothing was processed, and it says nothing about the instance's health (as for
            # a proxied request): try once more, on a fresh connection.
            self.fresh_retry = False
            self._drop_conn()
            self._send()
            return
        self._lost()
        self._fail(PartError("connection reset"))

    def on_upstream_timeout(self) -> None:
        self._lost()
        self._fail(PartError("timeout"))

    def on_upgraded(self, extra: bytes) -> None:
        self._lost()
        self._fail(PartError("unexpected protocol upgrade"))

    def _lost(self) -> None:
        """The exchange failed on the instance's side: never reuse the connection; the
        balancer and passive health count a failure."""
        conn, self.conn = self.conn, None
        if conn is None:
            return
        conn.detach()
        conn.abort()
        self._finished_on_instance(False)
        service = self.service
        assert service is not None
        service.report(self.inst, ok=False, status=0)

    def flush_head(self) -> None:
        pass

    def upstream_write_paused(self) -> None:
        pass

    def upstream_write_resumed(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<PartCall {self.part.name} of {self.run.aggregator.route}>"
