"""One request's trip through the gateway.

    start ─► route ─► plugins.on_request ─► pick instance ─► pool (idle? reuse : connect)
                                                                   │
      client ◄── response head/body ◄── upstream ◄── request head + body (streamed)

The exchange is both the client connection's `Exchange` and the upstream connection's listener,
so every event on either side lands in one object with one state. Everything up to writing the
request head runs synchronously when the pool has an idle connection and the plugins are
synchronous: no task is created on the plain path. A task exists only to await a new
connection or an asynchronous plugin hook.

Backpressure: the client's body is written upstream as it arrives; when the upstream's write
buffer fills (`upstream_write_paused`) we pause reading the client, and when the client's write
buffer fills (`client_write_paused`) we pause reading the upstream. Before an upstream connection
exists the body is buffered, up to 64 KiB, then the client is paused.

Resilience: a service's circuit breaker is asked before an instance is picked (open → 503 with
Retry-After, nothing sent upstream). A failed attempt is retried on another instance when the
service's retry policy names the failure, the request is safe to repeat (idempotent method,
`Idempotency-Key`, or opted in), no byte of the response reached the client, the body can be
replayed (≤ 64 KiB, kept while it was sent), and the retry budget allows it. The breaker and
passive health hear of every attempt's outcome: a transport error, a timeout or a 5xx is a
failure, before the response or in the middle of its body alike; a client that leaves is none.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from apigate.http.errors import GatewayError, body_size, render_error, render_response
from apigate.http.pool import PoolFull
from apigate.http.protocol import Exchange, ExchangeMaker
from apigate.http.response_head import InvalidResponse, ResponseHead
from apigate.http.upstream import UpstreamConnection
from apigate.observability.trace_context import (
    first_trace_line,
    new_trace_line,
    tracestate_lines,
)
from apigate.plugins.chain import RouteSwitch
from apigate.plugins.response import Response
from apigate.proxy.body_rewrite import RequestBodyRewrite, ResponseBodyRewrite
from apigate.proxy.heads import consumer_lines, interim_head, request_head, response_head
from apigate.resilience.circuit_breaker import State
from apigate.routing.matcher import Match, NoMatch

if TYPE_CHECKING:
    from apigate.balancing.base import Instance
    from apigate.http.protocol import ClientConnection
    from apigate.http.request import Request
    from apigate.registry.service import Service
    from apigate.runtime import CompiledRoute, Runtime

# (a Final alias: compiled, a call reads a static, where the imported name was looked up in
# the module's dict at every call, ~130 instructions)
monotonic: Final = time.monotonic

log = logging.getLogger("apigate.proxy")

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_BUFFER_LIMIT: Final = 64 * 1024
_REPLAY_LIMIT: Final = 64 * 1024  # a request body up to this size is kept so that it can be retried
_LAST_CHUNK: Final = b"0\r\n\r\n"
_CRLF: Final = b"\r\n"
# A response's first body bytes up to this size are copied after its head: one piece to send
# (the copy costs less than a list of the two and a writev of it); larger ones are not copied.
_WITH_HEAD: Final = 4096
_GET: Final = b"GET"  # the usual method, not encoded per request
# Answers that close the connection when the request body was not read (nginx's list, in
# ngx_http_special_response_handler): the others read the rest and drop it (_answer_keeps_alive)
_CLOSE_UNREAD: Final = frozenset({400, 413, 414, 500, 501})
# what `OPTIONS *` is told the gateway proxies (CONNECT is refused: 405)
_SERVER_METHODS: Final = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# (never written to: a route with params brings its own dict)
_NO_PARAMS: Final[dict[str, str]] = {}
_NONE: Final[list[Any]] = []  # (never appended to: see ProxyExchange.__init__)


def _no_header(lname: str) -> str | None:
    return None


_NO_HEADER: Final = _no_header  # the matcher's header lookup when no route matches on one


class ExchangeFactory(ExchangeMaker):
    """The gateway's `ConnectionHost.exchange_maker`, compiled: called once per request, where
    an interpreted method cost a Python frame. It holds the gateway's current runtime (the
    gateway's `runtime` is this attribute: a reload sets it here), its observers (reading
    them off the gateway, an interpreted object, cost two lookups by name per request) and
    whether it is draining (the gateway's `draining`)."""

    def __init__(self, runtime: Runtime, observers: list[Callable[[Any], None]]) -> None:
        self.runtime = runtime
        self.observers = observers

    def new_exchange(self, conn: ClientConnection, request: Request) -> ProxyExchange:
        return ProxyExchange(conn, request, self.runtime, self.observers)


class ProxyExchange(Exchange):
    """The client connection's `http.protocol.Exchange`, and its upstream connection's
    `http.upstream.UpstreamListener` (the base's base)."""

    # Rarely changed state lives here as class-level defaults: an exchange only pays for the
    # attributes it actually sets (measured: ~1 µs less per request than setting 35 in __init__).
    route: CompiledRoute | None = None
    prefix = ""
    service: Service | None = None
    instance: Instance | None = None
    upstream: UpstreamConnection | None = None
    consumer: Any = None  # set by auth plugins
    # set with it by the built-in ones: an apigate.plugins.identity.Identity, the consumer's
    # upstream lines made when the plugin was built, and whether it is an `anonymous` one
    credential: Any = None
    status = 0
    bytes_sent = 0
    upstream_ms: float | None = None
    total_ms: float | None = None
    error: str | None = None
    cache_status: str | None = None
    retries = 0
    _body_size = 0
    _paused_for_buffer = False
    _paused_upstream_write = False
    _sent_continue = False
    _pending_head: bytes | None = None
    _chunk_out = False
    _keep_alive = False
    _finished = False
    _client_gone = False
    _tunnel_buf: list[bytes] | None = None
    _tunnel_buffered = 0
    _paused_for_tunnel = False
    _tunnel_open = False
    _t_upstream = 0.0
    _reused = False
    _pending_error: GatewayError | None = None
    # What the service's circuit breaker decided for this request, as the access log tells it:
    # CLOSED let it through, HALF_OPEN let it through as a probe, OPEN refused it (a half-open
    # breaker with every probe slot taken refuses too); None: no breaker was asked. The state
    # right after allow(), stored as it is: a closed breaker's request pays one field store.
    breaker_decision: State | None = None
    _breaker_armed = False  # the breaker let this request through and awaits its outcome
    _breaker_since = 0  # breaker.transitions right after allow(): which period the outcome is for
    _service_failed = False  # an attempt failed (5xx, error), even if a stale answer hid it
    # the gateway refused before any instance was asked (none healthy, the pool full): nothing
    # to tell the breaker about the service, in either direction
    _not_attempted = False
    _replay: list[bytes] | None = None  # the request body as sent, for a retry
    _replay_ok = True  # False once the body outgrew _REPLAY_LIMIT
    _respond_index = -1  # which request hook produced the response (for decoration)
    _response_rewrite: ResponseBodyRewrite | None = None
    _request_rewrite: RequestBodyRewrite | None = None
    _chunk_hooks: list[Callable[..., Any]] | None = None
    _forwarding = False  # an attempt is under way (picking, connecting or attached)
    _task: asyncio.Task[None] | None = None  # kept: the loop holds tasks only weakly
    # a route handler answering through callbacks (an aggregate) stops its calls with this
    # when the client leaves first, as a proxied request's upstream is cut
    on_client_lost: Callable[[], None] | None = None
    _retry_timer: asyncio.TimerHandle | None = None
    # getting a connection from the pool: waiting in its queue, or connecting
    _connecting: asyncio.Task[None] | None = None
    _replay_size = 0
    _vars: dict[str, Any] | None = None  # (see `vars`)
    # the traceparent line sent upstream (made with the first attempt's head: a retry is the
    # same span), which trace_context reads for the access log and the exporter
    trace_line: bytes | None = None
    _stale_retried = False
    # a tunnel's half-closes, each side's EOF passed on to the other
    _client_eof = False
    _upstream_eof = False

    def __init__(
        self,
        conn: ClientConnection,
        request: Request,
        runtime: Runtime,
        observers: list[Callable[[Any], None]] | None = None,
    ) -> None:
        self.conn = conn
        self.request = request
        self.runtime = runtime
        self.observers = observers
        self.loop = conn.loop
        # the clock starts at the request's first byte (the connection read the time then)
        self.t0 = conn.began_at or monotonic()
        # (empty lists shared by every exchange, never appended to: an empty one is replaced
        # by one of its own. Most requests have no body and are tried once: a list made empty
        # and grown by an append was two allocations, ~200 instructions)
        self.tried: list[Instance] = _NONE
        self.upstream_path = request.path
        self.params: dict[str, str] = _NO_PARAMS  # the route's captured {params}, once routed
        self._body: list[bytes] = _NONE
        self._body_done = not request.has_body

    @property
    def vars(self) -> dict[str, Any]:
        """Scratch space shared by plugins: made when first asked for (most requests have
        none, and a dict made and freed was ~250 instructions a request)."""
        found = self._vars
        if found is None:
            found = self._vars = {}
        return found

    @property
    def buffered_body_bytes(self) -> int:
        """Request body bytes read and not forwarded yet: before the request goes upstream
        (while plugins decide), all that was read, a pipelined request's whole body even."""
        return self._body_size

    # ================================================================== client side events
    def start(self) -> None:
        if self.request.path == "*":  # OPTIONS * (the parser takes "*" with OPTIONS only)
            # about the server itself, not a resource (RFC 9110 §9.3.7): answered here, as no
            # route's upstream is the server meant (it was routed as "/" and sent upstream)
            self.respond(Response(200, b"", [(b"Allow", _SERVER_METHODS)], b"text/plain"))
            return
        try:
            self._route()
        except GatewayError as err:
            self.fail(err)
            return
        chain = self.route.chain if self.route is not None else None
        if chain is not None and chain.request_hooks:
            self._run_request_hooks(0)
        else:
            self._forward()

    def feed_body(self, chunk: bytes) -> None:
        up = self.upstream
        if up is not None and not self._finished:
            if self._replay is not None:
                self._keep_for_replay(chunk)
            if self.request.chunked:
                up.writelines([b"%x\r\n" % len(chunk), chunk, _CRLF])
            else:
                up.write(chunk)
            return
        if self._finished:
            return  # answered already (e.g. 401): the rest of the body is discarded
        if self._body:
            self._body.append(chunk)
        else:
            self._body = [chunk]
        self._body_size += len(chunk)
        rewrite = self._request_rewrite
        limit = rewrite.limit if rewrite is not None and rewrite.active else _BUFFER_LIMIT
        if self._body_size > limit and not self._paused_for_buffer:
            if rewrite is not None and rewrite.active:
                waiting = rewrite.waiting
                rewrite.give_up(self)  # too large to rewrite: stream it as it is
                if waiting:  # the request hooks are done and asked to forward: go now
                    self._forward()
                return
            self._paused_for_buffer = True
            self.conn.pause_reading()

    def body_done(self) -> None:
        self._body_done = True
        up = self.upstream
        if up is not None and not self._finished:
            if self.request.chunked:
                up.write(_LAST_CHUNK)
            up.request_sent = True
        elif self._request_rewrite is not None and self._request_rewrite.waiting:
            self._forward()  # the whole body is here: rewrite it and send

    def client_lost(self) -> None:
        self._client_gone = True
        task = self._task
        if task is not None and not task.done():
            # an async plugin hook (a policy call, a Redis check) or a route handler: its
            # work is for a client that is gone (it held its upstream call for its timeout)
            task.cancel()
        if self._retry_timer is not None:
            self._retry_timer.cancel()
            self._retry_timer = None
        if self._connecting is not None:
            # its place in the pool's queue (or the slot it connects in) goes to the next
            # request: a queued client that left kept it, and others got 503 for nobody
            self._connecting.cancel()
            self._connecting = None
        if self._finished:
            return
        stop, self.on_client_lost = self.on_client_lost, None
        if stop is not None:
            stop()
        up = self.upstream
        if up is not None:
            self.upstream = None
            up.detach()
            up.abort()  # a half-read response cannot be reused
            self._release_instance(ok=True)
        self.status = self.status or 499  # nginx's "client closed request"
        self.error = self.error or "client closed the connection"
        self._complete(keep_alive=False)

    def refused(self, err: GatewayError, sent: int) -> None:
        """The connection answered `err` itself (`sent` bytes: a malformed body, a limit, a
        timeout) and closes: that is this request's outcome in the logs and metrics, not the
        499 "client closed" it was logged as; a request refused before its head was all read
        gets an exchange for this alone."""
        self.status = err.status
        self.error = err.detail
        self.bytes_sent = sent
        self.client_lost()

    def client_write_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def client_write_resumed(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()

    def tunnel_data(self, data: bytes) -> None:
        if self._tunnel_open and self.upstream is not None:
            self.upstream.write(data)
        else:
            if self._tunnel_buf is None:
                self._tunnel_buf = []
            self._tunnel_buf.append(data)
            self._tunnel_buffered += len(data)
            if self._tunnel_buffered > _BUFFER_LIMIT and not self._paused_for_tunnel:
                # bytes sent before the upstream's 101 wait in memory: bound them (they were
                # buffered without limit for as long as the upstream took to answer)
                self._paused_for_tunnel = True
                self.conn.pause_reading()

    def tunnel_eof(self) -> None:
        up = self.upstream
        if self._tunnel_open and up is not None:
            self._client_eof = True
            if self._upstream_eof:
                up.close()  # both sides are done (what is buffered still goes first)
            else:
                up.write_eof()
        elif not self._finished:
            # Half-closed after a whole upgrade request, before its answer: the client waits
            # for it, as for any request (the request was dropped, the connection closed
            # without a byte). A 101 opens a tunnel whose client side is done (on_upgraded
            # passes the half-close on); another answer closes the connection after it.
            self._client_eof = True
        else:
            self.conn.close()

    # ================================================================== routing and plugins
    def _route(self) -> None:
        req = self.request
        matcher = self.runtime.matcher
        path = req.path
        if matcher.routing_fields:
            _check_routing_fields(req, matcher.routing_fields, matcher.routing_field_spellings)
            result = matcher.match(req.host, req.method, path, req.header)
        else:  # no route matches on a header: the lookup is never called (no bound method)
            result = matcher.match(req.host, req.method, path, _NO_HEADER)
        # (rare: "%" is an escape other than of an unreserved character, ";" a parameter; the
        # parser saw that the usual path has neither, unless a plugin has changed it since)
        if (
            path is not req.one_reading
            and ("%" in path or ";" in path)
            and isinstance(result, Match)
        ):
            for other in matcher.other_routes(req.host, req.method, path, req.header, result):
                _refuse_stricter_reading(result, other)
        if isinstance(result, NoMatch):
            if result.allowed_methods:
                allow = ", ".join(sorted(result.allowed_methods)).encode()
                raise GatewayError(
                    405, f"method {req.method} not allowed here", headers=[(b"Allow", allow)]
                )
            raise GatewayError(404, f"no route for {req.method} {req.path}")
        route: CompiledRoute = result.spec.payload  # type: ignore[assignment]
        self.route = route
        self.params = result.params
        self.prefix = result.prefix
        self.service = route.service
        chain = route.chain
        if chain.chunk_hooks:
            self._chunk_hooks = chain.chunk_hooks
        if chain.request_body_plugins and req.has_body:
            rewrite = RequestBodyRewrite.start(self, chain.request_body_plugins)
            if rewrite is not None:
                self._request_rewrite = rewrite
        if (
            route.max_body is not None
            or route.body_timeout is not None
            or req.content_length
            or self._body_size  # read while it was queued: the connection did not check it
        ):
            limit = self.conn.apply_route_limits(self, route.max_body, route.body_timeout)
            if req.content_length is not None and req.content_length > limit:
                raise GatewayError(413, f"request body larger than {limit} bytes")
            if self._body_size > limit:  # (chunked) read while it waited behind another request
                raise GatewayError(413, f"request body larger than {limit} bytes")
        try:
            self.upstream_path = route.upstream_path(req.path, result.prefix, result.params)
        except ValueError:  # a captured value, or a regex's rest, would make a dot segment
            raise GatewayError(400, "invalid path for this route's upstream") from None

    def _run_request_hooks(self, index: int) -> None:
        assert self.route is not None
        hooks = self.route.chain.request_hooks
        for i in range(index, len(hooks)):
            try:
                outcome = hooks[i](self)
            except GatewayError as err:
                self.fail(err)
                return
            except Exception:  # a plugin bug answers 500; it never kills the connection
                log.exception("plugin hook failed on %s", self._describe())
                self.fail(GatewayError(500, "a plugin failed", "plugin_error"))
                return
            if outcome is None:
                continue
            # a Response first: inspect.isawaitable goes through the ABC machinery (~1 µs
            # on every cache hit, 401, 429)
            if not isinstance(outcome, Response):
                if isinstance(outcome, RouteSwitch):
                    # the consumer has plugins of its own (chain.ConsumerSwitch, a hook only
                    # routes that need it have): the rest runs on the route's variant for it
                    self._use_route(outcome.route)
                    self._run_request_hooks(i + 1)
                    return
                if inspect.isawaitable(outcome):
                    self._task = self.loop.create_task(self._await_hook(outcome, i))
                    return
            self._respond_index = i
            self.respond(outcome)
            return
        self._forward()

    def _use_route(self, route: CompiledRoute) -> None:
        """Go on with `route`, the matched route's variant for the request's consumer: its
        chain is the same up to the switch, then has the consumer's plugins in place of the
        route's or global ones of the same names, for every hook from here on (response, body
        and log hooks read `self.route`). What _route took from the chain is taken again."""
        base = self.route
        self.route = route
        chain = route.chain
        self._chunk_hooks = chain.chunk_hooks if chain.chunk_hooks else None
        if (
            base is not None
            and self.request.has_body
            and chain.request_body_plugins != base.chain.request_body_plugins
        ):
            self._restart_request_rewrite(chain.request_body_plugins)

    def _restart_request_rewrite(self, plugins: list[Any]) -> None:
        """The request body rewrite of the consumer's variant (its own request_transform, say)
        in place of the route's: what was buffered so far is still all here, as nothing went
        upstream yet; over the new limit it streams as it is."""
        rewrite = RequestBodyRewrite.start(self, plugins) if plugins else None
        self._request_rewrite = rewrite
        if rewrite is None:
            return
        if self._body_size > rewrite.limit:
            rewrite.give_up(self)
        elif self._paused_for_buffer:  # paused at the streaming limit: the new one is larger
            self._paused_for_buffer = False
            self.conn.resume_reading()

    async def _await_hook(self, awaitable: Any, index: int) -> None:
        try:
            outcome = await awaitable
        except GatewayError as err:
            self.fail(err)
            return
        except Exception:
            log.exception("plugin hook failed on %s", self._describe())
            self.fail(GatewayError(500, "a plugin failed", "plugin_error"))
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._client_gone or (task is not None and task.cancelling()):
                raise  # cancelled by client_lost (or the loop): nobody to answer
            # the hook's own (a shared task it awaited was cancelled): the request hung
            log.error("plugin hook was cancelled on %s", self._describe())
            self.fail(GatewayError(500, "a plugin failed", "plugin_error"))
            return
        if self._client_gone:
            return
        if outcome is not None:
            self._respond_index = index
            self.respond(outcome)
        else:
            self._run_request_hooks(index + 1)

    # ================================================================== upstream selection
    def _forward(self) -> None:
        if self._client_gone or self._finished or self._forwarding:
            return  # (an async hook and a body callback could both ask: forward once)
        rewrite = self._request_rewrite
        if rewrite is not None and rewrite.active:
            if not self._body_done:
                rewrite.waiting = True  # body_done() calls back once the body is complete
                if self.request.expect_continue and not self._sent_continue:
                    self._sent_continue = True  # the client waits for this to send the body
                    self.conn.write_continue(self)
                return
            try:
                rewrite.apply(self)
            except Exception:
                log.exception("request body rewrite failed on %s", self._describe())
                self.fail(GatewayError(500, "a plugin failed", "plugin_error"))
                return
        if self.request.has_body and self.conn.after_read(self._forward):
            return  # its body framing is validated first (see ClientConnection.after_read)
        self._forwarding = True
        service = self.service
        if service is None:
            assert self.route is not None
            handler = self.runtime.handlers.get(self.route.name)
            if handler is None:
                self.fail(GatewayError(502, f"route {self.route.name} has no upstream"))
                return
            running = handler(self)  # (an aggregate answers through callbacks: None)
            if running is not None:
                self._task = self.loop.create_task(running)
            return
        if not self.tried:  # first attempt: breaker and retry budget see every request once
            breaker = service.breaker
            if breaker is not None and not self._breaker_armed:
                if not breaker.allow():
                    self.breaker_decision = State.OPEN  # refused
                    retry_after = str(breaker.retry_after()).encode()
                    self.fail(
                        GatewayError(
                            503,
                            f"service {service.name} is failing; circuit open",
                            "circuit_open",
                            headers=[(b"Retry-After", retry_after)],
                        )
                    )
                    return
                self._breaker_armed = True
                self._breaker_since = breaker.transitions
                self.breaker_decision = breaker.state  # CLOSED, or HALF_OPEN: a probe
            if service.retry.attempts:
                service.retry.budget.requests += 1  # inline: it runs on every request
                if self._replay_ok and self.request.has_body and self._can_repeat(service):
                    self._replay = []
        key = service.hash_key(self) if service.hash_key is not None else None
        inst = service.balancer.pick(key, self.tried)
        if inst is None:
            if self.tried:
                self.fail(self._pending_error or GatewayError(502, "every instance failed"))
            else:
                self._not_attempted = True
                self.fail(
                    GatewayError(
                        503, f"no healthy instance of service {service.name}", "no_healthy_instance"
                    )
                )
            return
        self.instance = inst
        if self.tried:
            self.tried.append(inst)
        else:
            self.tried = [inst]
        pool = service.pool_for(inst)
        up = pool.acquire_idle() if not self._stale_retried else None
        if up is not None:
            self._attach(up, reused=True)
        else:
            self._connecting = self.loop.create_task(self._connect(service, inst))

    async def _connect(self, service: Service, inst: Instance) -> None:
        pool = service.pool_for(inst)
        timeouts = service.config.timeouts
        try:
            up = await pool.connect(timeouts.connect)
        except PoolFull:
            # the gateway's own limit (max_connections), not a sign of the service's health
            self._not_attempted = True
            self.fail(
                GatewayError(
                    503, f"service {service.name}: connection limit reached", "upstream_overloaded"
                )
            )
            return
        except TimeoutError:
            service.report(inst, ok=False)
            self._pending_error = GatewayError(
                504,
                "connecting to the upstream timed out",
                "upstream_connect_timeout",
                detail=f"connect to {inst.host}:{inst.port} timed out",
            )
            self._retry_connect()
            return
        except OSError as os_error:  # (a name per clause: see UpstreamConnection.data_received)
            service.report(inst, ok=False)
            why = os_error.strerror or os_error
            self._pending_error = GatewayError(
                502,
                "could not connect to the upstream",
                "upstream_connect_error",
                detail=f"connect to {inst.host}:{inst.port} failed: {why}",
            )
            self._retry_connect()
            return
        except Exception as exc:  # never leave the client unanswered
            log.exception("connecting to %s:%s failed", inst.host, inst.port)
            self.fail(
                GatewayError(
                    502,
                    "could not connect to the upstream",
                    "upstream_connect_error",
                    detail=f"connect to {inst.host}:{inst.port} failed: {exc}",
                )
            )
            return
        if self._client_gone or self._finished:
            pool.release(up)  # not reusable yet (no request): closes it
            return
        self._attach(up, reused=up.requests > 0)  # handed over by a finishing request

    def _retry_connect(self) -> None:
        """Nothing reached the upstream, so another instance may be tried, whatever the method
        (Envoy's connect-failure policy does the same), within attempts and budget."""
        assert self.service is not None and self._pending_error is not None
        policy = self.service.retry
        if (
            not self._client_gone
            and policy.on_connect_error
            and self.retries < policy.attempts
            and policy.budget.try_acquire()
        ):
            self.retries += 1
            self._forwarding = False
            self._forward()
        else:
            self.fail(self._pending_error)

    def _can_repeat(self, service: Service) -> bool:
        req = self.request
        if req.method in IDEMPOTENT or service.retry.non_idempotent:
            return True
        return req.header("idempotency-key") is not None

    def _keep_for_replay(self, chunk: bytes) -> None:
        replay = self._replay
        assert replay is not None
        replay.append(chunk)
        self._replay_size += len(chunk)
        if self._replay_size > _REPLAY_LIMIT:
            self._replay = None
            self._replay_ok = False

    def _retry_after_failure(self, kind: str, status: int = 0) -> bool:
        """Try the request again on another instance if policy, safety and budget allow.

        Called before any byte of the response reached the client. Returns True when a retry
        was scheduled (the caller then does nothing more)."""
        service = self.service
        if service is None or self._client_gone or self._finished or self.response_started:
            return False
        policy = service.retry
        if self.retries >= policy.attempts or not policy.retryable(kind=kind, status=status):
            return False
        if not self._can_repeat(service):
            return False
        if self.request.has_body and (self._replay is None or not self._body_done):
            return False  # the body was streamed and not kept: it cannot be sent again
        if monotonic() >= self.t0 + service.response_timeout - 0.001:
            # the overall deadline (timeouts.response) has passed, or is where the try that
            # just timed out was cut: "now" can equal that deadline exactly, and a strict
            # comparison let one more try start (within a timer tick, 1 ms, it has passed)
            return False
        key = service.hash_key(self) if service.hash_key is not None else None
        if service.balancer.pick(key, self.tried) is None:
            return False  # no other instance: the client gets this attempt's real answer
        if not policy.budget.try_acquire():
            return False
        self.retries += 1
        self.status = 0  # the discarded attempt's status is not this request's
        if self._replay is not None:
            self._body, self._replay = self._replay, []
            self._replay_size = 0
        self._forwarding = False
        self._retry_timer = self.loop.call_later(policy.delay(self.retries), self._forward)
        return True

    def _attach(self, up: UpstreamConnection, reused: bool) -> None:
        assert self.service is not None and self.instance is not None
        req = self.request
        self.upstream = up
        self._reused = reused
        self.service.balancer.on_start(self.instance)
        now = self._t_upstream = monotonic()  # one reading for all of this
        overall = self.service.response_timeout
        per_try = self.service.retry.per_try_timeout
        if per_try or self.retries:
            # Every try, the first one included, ends by the overall deadline (counted from the
            # request's start, as _retry_after_failure counts it): a per_try_timeout longer than
            # timeouts.response once let the first try run past it (Envoy caps it the same way).
            timeout = max(0.001, min(per_try or overall, self.t0 + overall - now))
        else:  # the one try has all of timeouts.response, from the end of the request
            timeout = overall
        up.begin(self, req.method == "HEAD", timeout, upgrade=req.upgrade, now=now)
        if self.conn.writing_paused:
            # the client reads nothing of what it was sent (a pipelined request behind a
            # response it does not read): read no faster from the upstream, or the whole
            # response went into the client's buffer (resume_writing lets it flow)
            up.pause_reading()
        route = self.route
        assert route is not None
        if route.chain.upstream_request_hooks and not self._call_hooks(
            route.chain.upstream_request_hooks, req
        ):
            return
        # (an HTTP/1.0 request may come without Host: the upstream's own authority then)
        host = (
            req.host.encode("latin-1") if route.preserve_host and req.host else up.pool.host_header
        )
        chunked = req.chunked
        length = req.content_length
        path = self.upstream_path
        base = self.instance.base_path
        if base:
            # The root of the service, nothing after the matched prefix (`/api` on a
            # strip_prefix route `/api`, `/` on `/`), is the base path itself, as Kong sends
            # it (path_handling v0 and v1): `/base`, not `/base/`. A slash the client put
            # after the prefix stays (`/api/`: `/base/`). (Two comparisons, with a base only.)
            path = base if path == "/" and len(req.path) == len(self.prefix) else base + path
        head = request_head(
            req,
            _GET if req.method == "GET" else req.method.encode(),
            path,
            host,
            chunked=chunked,
            content_length=length,
            extra=self._extra_lines(route, req),
        )
        body = self._body
        if body and self._replay is not None:
            for chunk in body:
                if self._replay is None:
                    break
                self._keep_for_replay(chunk)
        if body:
            parts = [head]
            for chunk in body:
                if chunked:
                    parts += (b"%x\r\n" % len(chunk), chunk, _CRLF)
                else:
                    parts.append(chunk)
            if self._body_done and chunked:
                parts.append(_LAST_CHUNK)
            up.writelines(parts)
            self._body = _NONE
            self._body_size = 0
        elif self._body_done and chunked:
            up.writelines([head, _LAST_CHUNK])
        else:
            up.write(head)
        if self._body_done:
            up.mark_sent(now)
        elif req.expect_continue and not self._sent_continue:
            self._sent_continue = True
            self.conn.write_continue(self)
        if self._paused_for_buffer:
            self._paused_for_buffer = False
            self.conn.resume_reading()

    # ================================================================== upstream events
    def on_response_head(self, head: ResponseHead) -> None:
        if self._client_gone:
            return
        req = self.request
        self.status = head.status
        up = self.upstream  # (the head arrived in its read: its clock reading is now)
        now = up.read_at if up is not None else monotonic()
        self.upstream_ms = (now - self._t_upstream) * 1000.0
        service = self.service
        if (
            head.status >= 500
            and service is not None
            and service.retry.statuses
            and self._retry_after_failure("status", head.status)
        ):
            self._drop_upstream(ok=False)
            return
        if head.status >= 500:
            self._service_failed = True
        route = self.route
        if route is not None and route.chain.response_hooks:
            if not self._call_hooks(route.chain.response_hooks, head):
                return
            replacement = None if self._vars is None else self._vars.get("replace_response")
            if isinstance(replacement, Response):  # e.g. a stale cache entry for a 5xx
                self._drop_upstream(ok=head.status < 500)
                self._respond_index = -1
                self.respond(replacement)
                return
            if route.chain.response_body_plugins:
                self._response_rewrite = ResponseBodyRewrite.start(
                    self, route.chain.response_body_plugins, head
                )
        status = head.status
        bodyless = req.method == "HEAD" or status in (204, 304) or status == 101
        self._chunk_out = not bodyless and (head.chunked or head.until_eof) and req.version == "1.1"
        keep_alive = req.keep_alive and (status == 101 or req.upgrade is None)
        if self.conn.exchange_maker.draining:
            keep_alive = False  # we close after it: say so (Connection: close)
        if (head.until_eof or head.chunked) and not self._chunk_out and not bodyless:
            # An HTTP/1.0 client learns the end of the body from the close. (A chunked upstream
            # body was once sent to a keep-alive 1.0 client with no framing at all.)
            keep_alive = False
        if not self._body_done:
            keep_alive = False  # answered before the request body ended: framing is lost
        self._keep_alive = keep_alive
        self.response_started = True
        rewrite = self._response_rewrite
        if rewrite is not None and rewrite.active:
            rewrite.hold(head, keep_alive)  # the head waits for the rewritten body's length
            return
        # Held back until the end of this upstream read, so that head and body leave in one
        # send() (measured: a second write syscall per response cost ~15% of the plain path).
        self._pending_head = response_head(
            head, req, chunk_out=self._chunk_out, keep_alive=keep_alive
        )
        if status == 101:
            self.flush_head()

    def on_interim_head(self, head: ResponseHead) -> None:
        # RFC 9110 §15.2: a proxy forwards 1xx responses (103 Early Hints, 102), but never to
        # an HTTP/1.0 client, nor once the final head is on its way (after a retry)
        if self._client_gone or self.response_started or self.request.version != "1.1":
            return
        self.conn.write(interim_head(head))

    def _holding_response(self) -> bool:
        """The response head is held (with the body so far) for a body rewrite."""
        rewrite = self._response_rewrite
        return rewrite is not None and rewrite.active

    def flush_head(self) -> None:
        """End of an upstream read: whatever head is still held goes out now."""
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            self.conn.write(head)

    def on_response_body(self, chunk: bytes) -> None:
        if self._client_gone:
            return
        rewrite = self._response_rewrite
        if rewrite is not None and rewrite.active:
            if rewrite.collect(self, chunk):
                return
            chunk = rewrite.release(self, chunk)  # over its cap: stream from here on
        if self._chunk_hooks is not None and not self._call_hooks(self._chunk_hooks, chunk):
            return
        self.bytes_sent += len(chunk)
        head = self._pending_head
        if head is not None:
            self._pending_head = None
            if self._chunk_out:
                self.conn.writelines([head, b"%x\r\n" % len(chunk), chunk, _CRLF])
            elif len(chunk) <= _WITH_HEAD:
                self.conn.write(head + chunk)
            else:
                self.conn.writelines([head, chunk])
        elif self._chunk_out:
            self.conn.writelines([b"%x\r\n" % len(chunk), chunk, _CRLF])
        else:
            self.conn.write(chunk)

    def on_response_done(self) -> None:
        up = self.upstream
        self.upstream = None
        now = 0.0
        if up is not None:
            now = up.read_at  # the response ended in its latest read (or at its EOF)
            up.pool.release(up)
        self._release_instance(ok=True, now=now)
        if self._client_gone:
            return
        rewrite = self._response_rewrite
        if rewrite is not None and rewrite.active:
            written = self._write_rewritten(rewrite)
            self._complete(self._keep_alive and written)
            return
        head, self._pending_head = self._pending_head, None
        if self._chunk_out:
            self.conn.write(head + _LAST_CHUNK if head is not None else _LAST_CHUNK)
        elif head is not None:
            self.conn.write(head)
        self._complete(self._keep_alive, now)

    def on_upstream_lost(self, exc: Exception | None) -> None:
        up = self.upstream
        self.upstream = None
        if self._tunnel_open:
            self._release_instance(ok=True)
            self._complete(keep_alive=False)
            self.conn.close()
            return
        stale = (
            up is not None
            and self._reused
            and not up.got_bytes
            and self._body_done
            and (not self.request.has_body or self._replay is not None)  # (kept: sent again)
            and self.request.method in IDEMPOTENT
        )
        # a pooled connection the upstream closed while idle says nothing about its health
        self._release_instance(ok=stale)
        if self._client_gone:
            return
        if not self.response_started:
            if stale and not self._stale_retried:
                # The classic keep-alive race: the upstream closed the pooled connection as we
                # reused it. Nothing was processed; try once more on a fresh connection (not
                # another pooled one, which an upstream that closes after each response has
                # closed too). This is not a policy retry (it spends neither attempts nor
                # budget). A body is sent again from what was kept of it.
                self._stale_retried = True
                self.tried.pop()
                self._forwarding = False
                if self._replay is not None:
                    self._body, self._replay = self._replay, []
                    self._replay_size = 0
                self._forward()
                return
            if not isinstance(exc, InvalidResponse) and self._retry_after_failure("reset"):
                return
            if isinstance(exc, InvalidResponse):
                reason = f"invalid response from upstream {self._where()}: {exc}"
                self.fail(GatewayError(502, reason, "upstream_invalid_response"))
                return
            reason = f"upstream {self._where()} closed the connection"
            self.fail(GatewayError(502, reason, "upstream_reset"))
        elif self._holding_response():
            reason = f"upstream {self._where()} closed the connection mid-response"
            self.fail(GatewayError(502, reason, "upstream_reset"))
        else:
            # a response cut short is the service's failure, as a 5xx is (Envoy counts resets
            # too); passive health heard it from _release_instance above
            self._service_failed = True
            self.error = "upstream closed mid-response"
            self.flush_head()
            self.conn.abort()  # the client must see a truncated response, not a clean end
            self._complete(keep_alive=False)

    def on_upstream_timeout(self) -> None:
        self.upstream = None
        self._release_instance(ok=False)
        if self._client_gone:
            return
        if not self.response_started:
            if self._retry_after_failure("timeout"):
                return
            self.fail(
                GatewayError(
                    504, f"upstream {self._where()} did not answer in time", "upstream_timeout"
                )
            )
        elif self._holding_response():
            reason = f"upstream {self._where()} did not finish its response in time"
            self.fail(GatewayError(504, reason, "upstream_timeout"))
        else:
            self._service_failed = True  # (as for a reset mid-response: see on_upstream_lost)
            self.error = "upstream timed out mid-response"
            self.conn.abort()
            self._complete(keep_alive=False)

    def on_upgraded(self, extra: bytes) -> None:
        self._tunnel_open = True
        service = self.service
        if self._breaker_armed and service is not None and service.breaker is not None:
            # the 101 is the service's answer: a tunnel lasts as long as its peers want, and
            # held a half-open probe slot (every other request refused) all that time
            self._breaker_armed = False
            service.breaker.record(True, since=self._breaker_since)
        if extra:
            self.on_response_body(extra)
        up = self.upstream
        if up is not None and self._tunnel_buf:
            up.writelines(self._tunnel_buf)
        self._tunnel_buf = None
        if up is not None and self._client_eof:  # the client half-closed before the 101
            up.write_eof()
        if self._paused_for_tunnel:
            self._paused_for_tunnel = False
            self.conn.resume_reading()

    def on_tunnel_data(self, data: bytes) -> None:
        self.conn.tunnel_active()  # (the idle timeout counts both directions)
        self.on_response_body(data)

    def on_tunnel_eof(self) -> bool:
        # TCP half-close is passed on both ways, as nginx and HAProxy do: the upstream's EOF
        # once closed the whole tunnel, and what the client still sent was lost
        if self._client_eof or self._client_gone or not self.conn.write_eof():
            return False  # (both sides done, or TLS: no half-close; the tunnel closes)
        self._upstream_eof = True
        return True

    def upstream_write_paused(self) -> None:
        self._paused_upstream_write = True
        self.conn.pause_reading()

    def upstream_write_resumed(self) -> None:
        if self._paused_upstream_write:
            self._paused_upstream_write = False
            self.conn.resume_reading()

    # ================================================================== answering ourselves
    def respond(self, response: Response) -> None:
        """Answer with a plugin's response instead of proxying."""
        if self._client_gone or self._finished:
            return
        if self.response_started or self.upstream is not None:
            # too late: the request went upstream (a plugin answered after forwarding)
            log.error("a plugin answered %s after it was forwarded", self._describe())
            self.fail(GatewayError(500, "a plugin answered too late", "plugin_error"))
            return
        req = self.request
        keep_alive = self._answer_keeps_alive(response.status)
        try:
            data = self._render(response, keep_alive)
        except Exception:  # a decorating hook failed, or a Response of the wrong types
            log.exception("plugin response failed on %s", self._describe())
            self.fail(GatewayError(500, "a plugin failed", "plugin_error"))
            return
        self.status = response.status
        self.bytes_sent = 0 if req.method == "HEAD" else len(response.body)
        self.conn.write(data)
        self._complete(keep_alive)

    def _answer_keeps_alive(self, status: int) -> bool:
        """May an answer the gateway makes itself (a plugin's, an error) keep the connection?
        Not when the client or a graceful shutdown says close. With the request body not all
        read yet, as nginx: a 400, 413, 414, 500 or 501 closes; another status keeps it when
        the connection can read the rest and drop it (`may_discard`), unless the client waits
        for a 100 (Continue) it was never sent (RFC 9110 §10.1.1: it may send no body, and
        its next request would be read as this one's). Nor for an upgrade request: what the
        client sent after its head is held as the tunnel's first bytes (a tunnel this answer
        never opens), so its next request would wait there unanswered for tunnel_idle_timeout;
        a proxied answer other than 101 closes for the same reason (on_response_head)."""
        req = self.request
        if not req.keep_alive or self.conn.exchange_maker.draining or req.upgrade is not None:
            return False
        if self._body_done:
            return True
        if status in _CLOSE_UNREAD or (req.expect_continue and not self._sent_continue):
            return False
        return self.conn.may_discard(self)

    def _render(self, response: Response, keep_alive: bool) -> bytes:
        """A plugin's response as written, decorated by the response hooks of the plugins
        before the one that made it (CORS, rate-limit headers on a 401/429/cache hit, as Kong
        does). Raises what a hook or a malformed Response raises: nothing is written then."""
        req = self.request
        response_headers = response.headers
        route = self.route
        if route is not None and self._respond_index >= 0:
            decorators = route.chain.respond_hooks[self._respond_index]
            if decorators:
                head = ResponseHead()
                head.status = response.status
                head.headers = list(response_headers)
                for hook in decorators:
                    hook(self, head)
                response_headers = head.headers
        headers = [*response_headers, (b"X-Request-Id", req.request_id.encode())]
        return render_response(
            response.status,
            response.body,
            content_type=response.content_type,
            headers=headers,
            keep_alive=keep_alive,
            head_only=req.method == "HEAD",
            http10=req.version == "1.0",
        )

    def fail(self, err: GatewayError) -> None:
        if self._client_gone or self._finished:
            return
        if (
            err.status >= 500
            and self.instance is not None
            and err.code != "plugin_error"
            and not self._not_attempted
        ):
            self._service_failed = True  # before a stale answer can hide it
        if self._holding_response():
            # nothing has reached the client, which can still be told what went wrong (it
            # used to get a cut connection and no answer)
            self._response_rewrite = None
        elif self.response_started:
            self.error = err.detail
            self.conn.abort()
            self._complete(keep_alive=False)
            return
        if err.status >= 500:
            stale = self.vars.get("stale_response")
            if stale is not None:  # serve-stale-if-error (the cache plugin leaves this here)
                replacement = stale()
                if isinstance(replacement, Response):
                    self.error = err.detail
                    self._respond_index = -1
                    self.respond(replacement)
                    return
        req = self.request
        self.status = err.status
        self.error = err.detail
        keep_alive = self._answer_keeps_alive(err.status)
        out = render_error(
            err,
            req.request_id,
            keep_alive=keep_alive,
            head_only=req.method == "HEAD",
            http10=req.version == "1.0",
        )
        self.bytes_sent = body_size(out)  # the body, as for a proxied one
        self.conn.write(out)
        self._complete(keep_alive)

    # ================================================================== bookkeeping
    def _release_instance(self, ok: bool, now: float = 0.0) -> None:
        """Tell the balancer and passive health how the attempt went; `now`: the monotonic time,
        when the caller has read it already."""
        inst = self.instance
        if inst is None or self._t_upstream == 0.0:
            return
        latency = (now or monotonic()) - self._t_upstream
        self._t_upstream = 0.0
        service = self.service
        if service is not None:
            service.balancer.on_finish(inst, latency, ok)
            service.report(inst, ok=ok and self.status < 500, status=self.status)

    def _complete(self, keep_alive: bool, now: float = 0.0) -> None:
        if self._finished:
            return
        self._finished = True
        now = now or monotonic()
        self.total_ms = (now - self.t0) * 1000.0
        if self._breaker_armed and self.service is not None and self.service.breaker is not None:
            breaker = self.service.breaker
            if self._service_failed:
                breaker.record(False, since=self._breaker_since)
            elif self._not_attempted or (self._client_gone and not self.response_started):
                # the client left before the service answered, or no instance was asked: no
                # outcome to count, but a half-open probe slot to give back
                breaker.release(since=self._breaker_since)
            else:
                breaker.record(True, since=self._breaker_since)
        route = self.route
        if route is not None and route.chain.end_hooks:
            for hook in route.chain.end_hooks:
                try:
                    hook(self)
                except Exception:
                    log.exception("response-end hook failed")
        # give back any pause this exchange put on the client connection: an upstream that
        # answered without reading the whole body, for one, never resumes its writing
        if self._paused_upstream_write or self._paused_for_buffer or self._paused_for_tunnel:
            for paused in ("_paused_upstream_write", "_paused_for_buffer", "_paused_for_tunnel"):
                if getattr(self, paused):  # each one is a pause_reading() of its own
                    setattr(self, paused, False)
                    self.conn.resume_reading()
        if self.observers:
            self._run_log_hooks(self.observers)
        log_hooks = route.chain.log_hooks if route is not None else self.runtime.log_hooks
        if log_hooks:
            self._run_log_hooks(log_hooks)
        if not self._client_gone:
            self.conn.finish_exchange(self, keep_alive, now)

    def _run_log_hooks(self, hooks: list[Callable[[Any], None]]) -> None:
        for hook in hooks:
            try:
                hook(self)
            except Exception:  # logging must never break the connection
                log.exception("log hook failed on %s", self._describe())

    def _drop_upstream(self, ok: bool) -> None:
        """Abandon the current upstream response (retried or replaced): its connection cannot
        carry another request, since the rest of this response was never read."""
        up = self.upstream
        self.upstream = None
        if up is not None:
            up.detach()
            up.abort()
        self._release_instance(ok=ok)

    def _write_rewritten(self, rewrite: ResponseBodyRewrite) -> bool:
        """The held head with the rewritten body; False if a plugin failed (connection cut)."""
        try:
            body = rewrite.finish(self)
        except Exception:
            log.exception("body rewrite failed on %s", self._describe())
            self.error = "response body rewrite failed"
            self.conn.abort()
            return False
        if self._chunk_hooks is not None and not self._call_hooks(self._chunk_hooks, body):
            return False
        self.bytes_sent += len(body)
        self.conn.writelines([rewrite.head_bytes(self, len(body)), body])
        return True

    def _describe(self) -> str:
        """For logs: method, path and request id (never the query, which may hold a key)."""
        req = self.request
        return f"{req.method} {req.path} id={req.request_id}"

    def _call_hooks(self, hooks: list[Callable[..., Any]], arg: Any) -> bool:
        """Run response-side hooks with `arg` (the request, the response head or a chunk); a
        failing one is logged and answered with 500 (or a cut, if the response already
        started). Returns False when that happened. (One argument, not *args: compiled, a
        starred call packs a tuple and makes a generic call per hook.)"""
        try:
            for hook in hooks:
                hook(self, arg)
        except Exception:
            log.exception("plugin hook failed on %s", self._describe())
            self._drop_upstream(ok=True)
            self.fail(GatewayError(500, "a plugin failed", "plugin_error"))
            return False
        return True

    def _extra_lines(self, route: CompiledRoute, req: Request) -> bytes:
        """The upstream head's lines besides the forwarding ones: the trace context, and the
        X-Forwarded-Prefix and consumer lines when there are any."""
        line = self.trace_line
        if line is None:
            if self._vars is None and not req.traceparent:  # the usual request: a new trace
                line = new_trace_line()
            else:
                line = first_trace_line(req, self.vars)
            self.trace_line = line
        lines = line + tracestate_lines(req, self._vars) if req.tracestate else line
        if route.strip_prefix or req.forwarded_prefix:
            lines = self._prefix_line() + lines
        consumer = self.consumer
        if consumer is not None:  # an auth plugin identified one
            credential = self.credential
            if credential is not None and credential.consumer is consumer:
                # made once per consumer and credential: no str work per request
                lines = credential.lines + lines
            else:  # a plugin of one's own set ctx.consumer alone
                lines = consumer_lines(consumer) + lines
        return lines

    def _prefix_line(self) -> bytes:
        """X-Forwarded-Prefix: what the client's path has before the one the upstream gets,
        the prefix this route strips after a trusted peer's own (Spring, ASP.NET Core and
        Werkzeug's ProxyFix build their links with it; Kong sends it too)."""
        route = self.route
        mine = b""
        if route is not None and route.strip_prefix:
            mine = self.prefix.rstrip("/").encode()
        theirs = self.request.forwarded_prefix
        value = theirs.rstrip(b"/") + mine if theirs else mine
        return b"X-Forwarded-Prefix: %s\r\n" % (value,) if value else b""

    def _where(self) -> str:
        inst = self.instance
        return f"{inst.host}:{inst.port}" if inst is not None else "?"

    def __repr__(self) -> str:
        route = self.route.name if self.route else "-"
        return f"<ProxyExchange {self.request.method} {self.request.path} route={route}>"


def _check_routing_fields(
    req: Request, names: frozenset[bytes], spellings: frozenset[bytes]
) -> None:
    """The request's fields named like one some route matches on (`names`, lower case): one
    sent twice with two values is refused (the router reads the first, a back end may read
    the last, or both); one spelled with "_" for "-" (`spellings`) is dropped (WSGI, CGI and
    PHP read `X_Tenant` as `X-Tenant`, a field the router never saw), as the connection
    drops those of the gateway's own fields."""
    first: dict[bytes, bytes] | None = None
    underscored = False
    for name, value in req.headers:
        lname = name.lower()
        if lname in names:
            if first is None:
                first = {}
            if first.setdefault(lname, value) != value:
                raise GatewayError(
                    400, f"header {name.decode('latin-1')} sent twice: routes match on it"
                )
        elif lname in spellings:
            underscored = True
    if underscored:
        req.headers[:] = [(n, v) for n, v in req.headers if n.lower() not in spellings]


def _refuse_stricter_reading(found: Match, other: Match) -> None:
    """`other` is the route a back end reads the path as (``Matcher.other_routes``): a 400
    unless its plugins are all `found`'s, as the back end serves its path under `found`'s.
    (``/projects/group%2Fproject/mrs`` on its ``{id}`` route, read as the catch-all's path,
    goes on: the catch-all asks for nothing more.)"""
    mine: CompiledRoute = found.spec.payload  # type: ignore[assignment]
    theirs: CompiledRoute = other.spec.payload  # type: ignore[assignment]
    if not theirs.plugin_settings() <= mine.plugin_settings():
        raise GatewayError(
            400,
            "ambiguous path: read with %2F or %5C as a separator, or without its ';'"
            " parameters, as many back ends read it, it is another route's, with other plugins",
            "ambiguous_path",
        )
