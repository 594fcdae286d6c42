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
required sibling failed counts for neither.
Only the request id, the forwarding headers (as a proxied request gets them) and the trace
context go to the parts, never the client's credentials. Each part is a child span of the
request's trace: its own span id in `traceparent`, recorded in `vars["part_spans"]` for the
tracing exporter, which exports a client span per part.
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

from apigate.http.errors import GatewayError
from apigate.http.headers import VIA_VALUE, forwarding_fields
from apigate.http.pool import PoolFull
from apigate.http.upstream import UpstreamListener
from apigate.observability.trace_context import ChildTrace, PartSpan
from apigate.plugins.base import Response
from apigate.plugins.transform import ValueTemplate
from apigate.routing.rewrite import encode_param

if TYPE_CHECKING:
    from apigate.config.schema import AggregatePartConfig, RouteConfig
    from apigate.http.upstream import ResponseHead, UpstreamConnection
    from apigate.registry.service import Service

__all__ = [
    "MAX_PART_BODY",
    "Aggregator",
    "Fetch",
    "PartError",
    "PartRequest",
    "PartResponse",
    "build_aggregate_handler",
    "pooled_fetch",
]

log = logging.getLogger("apigate.proxy.aggregate")

MAX_PART_BODY: Final = 10 << 20


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


class _MissingInput(Exception):
    def __init__(self, names: list[str]) -> None:
        super().__init__("missing " + ", ".join(names))
        self.names = names


Fetch = Callable[[PartRequest], Awaitable[PartResponse]]
Handler = Callable[[Any], Coroutine[Any, Any, None]]


class _Part:
    """One `aggregate:` entry, its path template parsed once."""

    __slots__ = (
        "constant_target",
        "encoders",
        "member",
        "method",
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
        return "".join(parts)

    def __repr__(self) -> str:
        kind = "optional" if self.optional else "required"
        return f"<Part {self.name} {self.service}{self.template.text} {kind}>"


def _query_component(value: str) -> str:
    return quote(value, safe="", errors="surrogateescape")


class Aggregator:
    """The handler of one aggregate route: `await aggregator(ctx)` answers the exchange."""

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
        self.services = services
        self.loop = loop
        self.fetch: Fetch = fetch if fetch is not None else pooled_fetch
        self.max_body = max_body
        self.parts = [_Part(name, part) for name, part in route.aggregate.items()]

    async def __call__(self, ctx: Any) -> None:
        try:
            body = await self.aggregate(ctx)
        except GatewayError as err:
            ctx.fail(err)
            return
        except Exception:
            log.exception("aggregation failed on route %s", self.route)
            ctx.fail(GatewayError(500, "aggregation failed", "aggregate_error"))
            return
        ctx.respond(Response(200, body))

    async def aggregate(self, ctx: Any) -> bytes:
        """The merged JSON body; raises GatewayError when a required part fails."""
        loop = self.loop or asyncio.get_running_loop()
        headers = _part_headers(ctx)  # the same for every part (read, never changed)
        trace = ChildTrace(ctx)  # each part a child span of the request's trace
        tasks = [loop.create_task(self._outcome(part, ctx, headers, trace)) for part in self.parts]
        try:
            # the first required failure raises here at once (fail fast); an optional part's
            # failure is its outcome
            await _Join(loop, tasks).future
        finally:
            for task in tasks:
                if not task.done():
                    task.cancel()
        return self._merge(
            {part.name: task.result() for part, task in zip(self.parts, tasks, strict=True)}
        )

    async def _outcome(
        self, part: _Part, ctx: Any, headers: list[tuple[bytes, bytes]], trace: ChildTrace
    ) -> bytes | BaseException:
        """The part's body; its failure as a value when it is optional, raised otherwise."""
        try:
            return await self._call(part, ctx, headers, trace)
        except Exception as exc:
            if part.optional:
                return exc
            raise _required_failure(part, exc) from None

    def _merge(self, results: dict[str, bytes | BaseException]) -> bytes:
        """Spliced, not re-serialised: each part's body was validated as UTF-8 JSON."""
        members: list[bytes] = []
        errors: list[dict[str, str]] = []
        for part in self.parts:
            outcome = results[part.name]
            if isinstance(outcome, BaseException):
                errors.append({"part": part.name, "error": _describe(outcome)})
                raw = b"null"
            else:
                raw = outcome
            members.append(part.member + raw)
        if errors:
            members.append(b'"_errors":' + json.dumps(errors, separators=(",", ":")).encode())
        return b"{" + b",".join(members) + b"}"

    async def _call(
        self, part: _Part, ctx: Any, headers: list[tuple[bytes, bytes]], trace: ChildTrace
    ) -> bytes:
        service = self.services.get(part.service)
        if service is None:
            raise PartError(f"unknown service {part.service}")
        traceparent = trace.traceparent()  # the part's own span id in the request's trace
        part_headers = [*headers, (b"traceparent", traceparent)]
        part_headers += [(b"tracestate", state) for state in trace.states]
        request = PartRequest(
            part=part.name,
            service=service,
            method=part.method,
            target=part.target(ctx),
            headers=part_headers,
            timeout=part.timeout,
            max_body=self.max_body,
        )
        breaker = service.breaker
        since = None
        if breaker is not None:
            if not breaker.allow():
                raise PartError("circuit open")  # as a proxied request: the upstream sees nothing
            since = breaker.transitions
        healthy: bool | None = None  # None: cancelled, which says nothing about the service
        started = time.time()
        status = 0
        try:
            if self.fetch is pooled_fetch:  # it keeps the part's deadline itself, with one timer
                response = await pooled_fetch(request)
            else:
                async with asyncio.timeout(part.timeout):
                    response = await self.fetch(request)
            status = response.status
            healthy = status < 500
        except TimeoutError:
            healthy = False
            raise PartError("timeout") from None
        except (OSError, PoolFull):
            healthy = False
            raise PartError("connect error") from None
        except PartError:
            healthy = False
            raise
        finally:
            if breaker is not None:
                if healthy is None:
                    breaker.release(since)
                else:
                    breaker.record(healthy, since)
            # for the tracing exporter (a cancelled call is not a failed one)
            spans: list[PartSpan] = ctx.vars.setdefault("part_spans", [])
            spans.append(
                (
                    part.name,
                    service.name,
                    traceparent[36:52].decode(),
                    started,
                    (time.time() - started) * 1000.0,
                    healthy is False or status >= 400,
                )
            )
        if not 200 <= response.status < 300:
            raise PartError(f"HTTP {response.status}")
        if response.status == 204:
            return b"null"
        return _json_bytes(response.body)

    def __repr__(self) -> str:
        return f"<Aggregator {self.route} {self.parts!r}>"


class _Join:
    """One future for the parts' tasks: done when all are, failed at once when one raises (a
    required part: fail fast). asyncio.gather does the same through a Python-level callback
    per task and a future subclass; compiled, this costs a fraction of that per part."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, tasks: list[asyncio.Task[bytes | BaseException]]
    ) -> None:
        self.future: asyncio.Future[None] = loop.create_future()
        self.pending = len(tasks)
        for task in tasks:
            task.add_done_callback(self.done)

    def done(self, task: asyncio.Task[bytes | BaseException]) -> None:
        future = self.future
        if task.cancelled():  # by us after a failure, or from outside
            if not future.done():
                future.cancel()
            return
        exc = task.exception()  # (retrieved even when it comes too late to matter)
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
            return
        self.pending -= 1
        if self.pending == 0:
            future.set_result(None)


# json.loads minus its three Python-level frames: the C scanner json.loads ends up in, with
# the same rules (surrounding whitespace allowed, nothing else after the value).
# (typeshed types make_scanner's argument as the scanner class itself)
_SCAN: Final[Callable[[str, int], tuple[Any, int]]] = json.scanner.make_scanner(
    json.JSONDecoder()  # type: ignore[arg-type]
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
    except (UnicodeDecodeError, ValueError, StopIteration):
        raise PartError("invalid JSON") from None
    return body.strip(b" \t\n\r")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PartError | _MissingInput):
        return str(exc)
    return "internal error"


def _required_failure(part: _Part, exc: BaseException) -> GatewayError:
    if isinstance(exc, _MissingInput):
        return GatewayError(400, f"part '{part.name}': {exc}", "bad_request")
    if not isinstance(exc, PartError):
        log.error("aggregate part %s failed", part.name, exc_info=exc)
    return GatewayError(502, f"part '{part.name}' failed: {_describe(exc)}", "aggregate_failed")


def _part_headers(ctx: Any) -> list[tuple[bytes, bytes]]:
    """What every part is sent besides its trace context: the forwarding fields a proxied
    request gets (a trusted proxy's X-Forwarded-For chain extended, Forwarded), and no
    client credentials."""
    req = ctx.request
    return [
        (b"Accept", b"application/json"),
        (b"X-Request-Id", req.request_id.encode()),
        *forwarding_fields(req.client_ip, req.forwarded_for, req.scheme, req.host),
        (b"Via", VIA_VALUE),
    ]


def build_aggregate_handler(
    route: RouteConfig,
    services: Mapping[str, Service],
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    fetch: Fetch | None = None,
) -> Handler:
    """`Runtime.handlers[route.name]` for a route with `aggregate:` (built once per snapshot)."""
    return Aggregator(route, services, loop, fetch=fetch)


# ------------------------------------------------------------------------------ the client


class _Lost(Exception):
    """The connection closed before the response ended."""

    def __init__(self, got_bytes: bool) -> None:
        super().__init__("connection reset")
        self.got_bytes = got_bytes


class _PartListener(UpstreamListener):
    """Collects one response from a pooled `UpstreamConnection`."""

    __slots__ = ("chunks", "conn", "future", "head", "max_body", "size")

    def __init__(self, conn: UpstreamConnection, max_body: int) -> None:
        self.conn = conn
        self.max_body = max_body
        self.future: asyncio.Future[PartResponse] = conn.loop.create_future()
        self.head: ResponseHead | None = None
        self.chunks: list[bytes] = []
        self.size = 0

    def _fail(self, exc: Exception) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    def on_response_head(self, head: ResponseHead) -> None:
        self.head = head

    def on_response_body(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_body:
            self.conn.detach()
            self.conn.abort()
            self._fail(PartError("response too large"))
            return
        self.chunks.append(chunk)

    def on_response_done(self) -> None:
        head = self.head
        if head is None:
            self._fail(_Lost(True))
        elif not self.future.done():
            self.future.set_result(PartResponse(head.status, b"".join(self.chunks), head.headers))

    def on_upstream_lost(self, exc: Exception | None) -> None:
        self._fail(_Lost(self.conn.got_bytes))

    def on_upstream_timeout(self) -> None:
        self._fail(PartError("timeout"))

    def on_deadline(self) -> None:
        """The part's whole time is up (pooled_fetch's deadline): cut the call."""
        if not self.future.done():
            self.conn.detach()
            self.conn.abort()
            self._fail(TimeoutError())

    def on_upgraded(self, extra: bytes) -> None:
        self.conn.abort()
        self._fail(PartError("unexpected protocol upgrade"))

    def flush_head(self) -> None:
        pass

    def upstream_write_paused(self) -> None:
        pass

    def upstream_write_resumed(self) -> None:
        pass


def _request_bytes(request: PartRequest, host: bytes) -> bytes:
    parts = [
        b"%s %s HTTP/1.1\r\nHost: %s\r\n"
        % (request.method.encode(), request.target.encode("ascii"), host)
    ]
    parts += [b"%s: %s\r\n" % (name, value) for name, value in request.headers]
    if request.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        parts.append(b"Content-Length: 0\r\n")
    parts.append(b"\r\n")
    return b"".join(parts)


async def pooled_fetch(request: PartRequest) -> PartResponse:
    """One call through the service's balancer and pools, within `request.timeout` in all
    (TimeoutError past it, as `asyncio.timeout` would raise, without its per-call cost).

    A connect failure moves on to another instance once; a reused keep-alive connection that
    turns out closed before any response byte is replaced by a fresh one once.
    """
    service = request.service
    loop = asyncio.get_running_loop()
    deadline = loop.time() + request.timeout
    tried: list[Any] = []
    fresh_retry = True
    while True:
        inst = service.balancer.pick(None, tried)
        if inst is None:
            raise PartError("connect error" if tried else "no healthy instance")
        pool = service.pool_for(inst)
        conn = pool.acquire_idle()
        reused = conn is not None
        if conn is None:
            left = deadline - loop.time()
            connect_timeout = service.config.timeouts.connect
            try:
                conn = await pool.connect(min(connect_timeout, max(left, 0.0)))
            except PoolFull:
                raise PartError("connection limit reached") from None
            except (OSError, TimeoutError):
                if left <= connect_timeout and loop.time() >= deadline:
                    raise TimeoutError from None  # the part's time ran out, not the instance's
                service.report(inst, ok=False)
                tried.append(inst)
                if len(tried) >= 2:
                    raise PartError("connect error") from None
                continue
        try:
            return await _exchange(service, inst, conn, request, deadline)
        except _Lost as lost:
            if reused and not lost.got_bytes and fresh_retry:
                fresh_retry = False  # the keep-alive race: the upstream closed it as we reused it
                continue
            raise PartError("connection reset") from None


async def _exchange(
    service: Service,
    inst: Any,
    conn: UpstreamConnection,
    request: PartRequest,
    deadline: float,
) -> PartResponse:
    listener = _PartListener(conn, request.max_body)
    loop = conn.loop
    started = loop.time()
    service.balancer.on_start(inst)
    ok = cancelled = False
    status = 0
    timer = loop.call_at(deadline, listener.on_deadline)
    try:
        # no response timer of the connection's own: the deadline timer above bounds the call
        conn.begin(listener, request.method == "HEAD", 0.0, now=started)
        conn.write(_request_bytes(request, conn.pool.host_header))
        conn.mark_sent(started)
        response = await listener.future
        status = response.status
        ok = True
        return response
    except (asyncio.CancelledError, TimeoutError):
        # the part's deadline or a failed sibling part: says nothing about the instance
        cancelled = True
        raise
    finally:
        timer.cancel()
        if ok:
            conn.pool.release(conn)
        else:
            conn.detach()
            conn.abort()  # cancelled or broken mid-response: never reuse
        service.balancer.on_finish(inst, loop.time() - started, ok)
        if not cancelled:
            service.report(inst, ok=ok and status < 500, status=status)
