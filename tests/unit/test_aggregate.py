"""Aggregation routes: a fake client for the rules, one real upstream for the pooled client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from apigate.config.schema import AggregatePartConfig, RouteConfig, ServiceConfig
from apigate.http.errors import GatewayError, render_error
from apigate.http.pool import PoolManager
from apigate.plugins.base import Response
from apigate.proxy.aggregate import (
    Aggregator,
    PartError,
    PartRequest,
    PartResponse,
    build_aggregate_handler,
)
from apigate.registry.service import Service
from tests.support.upstream import Upstream
from tests.unit.test_plugin_fakes import make_request


class Ctx:
    """The exchange as an aggregate handler sees it: request data in, respond/fail out."""

    def __init__(self, path: str = "/api/dashboard/42", **kwargs: Any) -> None:
        self.request = make_request("GET", path, **kwargs)
        self.request.host = "gw.example.com"
        self.params: dict[str, str] = {"user_id": "42"}
        self.vars: dict[str, Any] = {}
        self.consumer: Any = None
        self.response: Response | None = None
        self.error: GatewayError | None = None
        self.answers = 0
        self.answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def respond(self, response: Response) -> None:
        self.response = response
        self._answer()

    def fail(self, err: GatewayError) -> None:
        self.error = err
        self._answer()

    def _answer(self) -> None:
        self.answers += 1
        assert self.answers == 1, "answered twice"
        self.answered.set_result(None)

    def doc(self) -> Any:
        assert self.response is not None, self.error
        assert self.response.status == 200
        return json.loads(self.response.body)


def route(
    parts: dict[str, dict[str, Any]], paths: tuple[str, ...] = ("/api/dashboard/{user_id}",)
) -> RouteConfig:
    return RouteConfig.model_validate(
        {"name": "dash", "match": {"paths": list(paths)}, "aggregate": parts}
    )


def constructed_route(parts: dict[str, dict[str, Any]]) -> RouteConfig:
    """A route whose templates use {query.X} / {claim.X}, which the schema does not accept yet."""
    built = {
        name: AggregatePartConfig.model_construct(
            **{"optional": False, "timeout": 5.0, "method": "GET", **part}
        )
        for name, part in parts.items()
    }
    return RouteConfig.model_construct(name="dash", aggregate=built)


FakeAnswer = PartResponse | Exception | Callable[[], Awaitable[PartResponse]]


class FakeClient:
    """Answers by target; records every request it was asked for."""

    def __init__(self, answers: dict[str, FakeAnswer]) -> None:
        self.answers = answers
        self.requests: list[PartRequest] = []
        self.cancelled: list[str] = []

    async def __call__(self, request: PartRequest) -> PartResponse:
        self.requests.append(request)
        answer = self.answers[request.target]
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, PartResponse):
            return answer
        try:
            return await answer()
        except asyncio.CancelledError:
            self.cancelled.append(request.target)
            raise


def ok(doc: Any) -> PartResponse:
    return PartResponse(200, json.dumps(doc).encode())


def slow(seconds: float, doc: Any = None) -> Callable[[], Awaitable[PartResponse]]:
    return later(seconds, ok(doc))


def later(seconds: float, response: PartResponse) -> Callable[[], Awaitable[PartResponse]]:
    async def answer() -> PartResponse:
        await asyncio.sleep(seconds)
        return response

    return answer


def services(*names: str) -> dict[str, Service]:
    """Real services (the fake client answers for them: nothing connects)."""
    pools = PoolManager(asyncio.get_running_loop())
    config = ServiceConfig.model_validate({"targets": ["http://127.0.0.1:9"]})
    return {name: Service(name, config, pools) for name in names}


async def run(config: RouteConfig, client: FakeClient, ctx: Ctx | None = None) -> Ctx:
    ctx = ctx or Ctx()
    known = services("users", "orders")
    handler = build_aggregate_handler(config, known, asyncio.get_running_loop(), fetch=client)
    assert handler(ctx) is None  # it answers the exchange itself, through callbacks
    await ctx.answered
    return ctx


DASHBOARD: dict[str, dict[str, Any]] = {
    "profile": {"service": "users", "path": "/users/{user_id}"},
    "orders": {
        "service": "orders",
        "path": "/orders?user={user_id}",
        "optional": True,
        "timeout": "50ms",
    },
}


# ------------------------------------------------------------------------------ merging


async def test_parts_are_called_concurrently_and_merged_under_their_keys() -> None:
    client = FakeClient(
        {
            "/users/42": ok({"name": "Ada"}),
            "/orders?user=42": PartResponse(200, b' [{"id": 1}]\n'),
        }
    )
    ctx = await run(route(DASHBOARD), client)
    assert ctx.response is not None and ctx.response.content_type == b"application/json"
    assert ctx.response.body == b'{"profile":{"name": "Ada"},"orders":[{"id": 1}]}'
    assert ctx.doc() == {"profile": {"name": "Ada"}, "orders": [{"id": 1}]}
    sent = {r.part: r for r in client.requests}
    assert sent["profile"].method == "GET" and sent["profile"].timeout == 5.0
    assert (b"X-Request-Id", b"req-1") in sent["profile"].headers
    assert (b"X-Forwarded-For", b"203.0.113.7") in sent["profile"].headers
    assert not any(n.lower() == b"authorization" for n, _ in sent["profile"].headers)


async def test_parts_get_the_forwarding_fields_and_a_span_of_the_clients_trace() -> None:
    """As a proxied request would: a trusted proxy's X-Forwarded-For chain extended,
    Forwarded, and the client's trace continued, each part with its own span id."""
    client = FakeClient({"/users/42": ok({}), "/orders?user=42": ok([])})
    ctx = Ctx()
    ctx.request.forwarded_for = b"198.51.100.1"
    parent = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    ctx.request.traceparent = parent
    ctx.request.tracestate = [b"k=v"]
    await run(route(DASHBOARD), client, ctx)
    spans = {}
    for request in client.requests:
        fields = dict(request.headers)
        assert fields[b"X-Forwarded-For"] == b"198.51.100.1, 203.0.113.7"
        assert fields[b"Forwarded"] == b'for=203.0.113.7;host="gw.example.com";proto=http'
        assert fields[b"X-Forwarded-Host"] == b"gw.example.com"
        assert fields[b"tracestate"] == b"k=v"
        sent = fields[b"traceparent"]
        assert sent[:36] == parent[:36] and sent[52:] == b"-01"
        spans[request.part] = sent[36:52].decode()
    assert len(set(spans.values())) == 2
    recorded = {name: span_id for name, _, span_id, _, _, _ in ctx.vars["part_spans"]}
    assert recorded == spans


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (slow(1.0), "timeout"),
        (PartResponse(503, b'{"status": 503}'), "HTTP 503"),
        (OSError("refused"), "connect error"),
        (PartError("connect error"), "connect error"),
        (PartResponse(200, b"<html>"), "invalid JSON"),
        (PartResponse(200, b"\xff\xfe{}"), "invalid JSON"),
        (PartResponse(200, b""), "invalid JSON"),
        (RuntimeError("bug"), "internal error"),
    ],
)
async def test_an_optional_part_that_fails_is_null_with_an_error(
    answer: FakeAnswer, error: str
) -> None:
    client = FakeClient({"/users/42": ok({"name": "Ada"}), "/orders?user=42": answer})
    ctx = await run(route(DASHBOARD), client)
    assert ctx.doc() == {
        "profile": {"name": "Ada"},
        "orders": None,
        "_errors": [{"part": "orders", "error": error}],
    }


async def test_a_204_part_is_null_without_error() -> None:
    client = FakeClient({"/users/42": ok({}), "/orders?user=42": PartResponse(204, b"")})
    assert (await run(route(DASHBOARD), client)).doc() == {"profile": {}, "orders": None}


async def test_a_required_part_that_fails_is_a_502_naming_it_and_cancels_the_rest() -> None:
    parts = {**DASHBOARD, "orders": {**DASHBOARD["orders"], "timeout": "5s"}}
    client = FakeClient(
        {
            "/users/42": later(0.01, PartResponse(503, b"{}")),  # once the other call is out
            "/orders?user=42": slow(5.0, []),
        }
    )
    ctx = await asyncio.wait_for(run(route(parts), client), 1.0)
    assert ctx.response is None and ctx.error is not None
    assert ctx.error.status == 502 and ctx.error.code == "aggregate_failed"
    assert ctx.error.message == "part 'profile' failed: HTTP 503"
    await asyncio.sleep(0)
    assert client.cancelled == ["/orders?user=42"]
    body = render_error(ctx.error, "req-1", keep_alive=True).partition(b"\r\n\r\n")[2]
    assert json.loads(body) == {
        "error": "aggregate_failed",
        "message": "part 'profile' failed: HTTP 503",
        "request_id": "req-1",
    }


async def test_required_timeout_is_named() -> None:
    parts = {"profile": {"service": "users", "path": "/users/{user_id}", "timeout": "30ms"}}
    ctx = await run(route(parts), FakeClient({"/users/42": slow(1.0)}))
    assert ctx.error is not None and ctx.error.message == "part 'profile' failed: timeout"


# ------------------------------------------------------------------------------ templates


async def test_values_are_encoded_for_their_place() -> None:
    parts = {"a": {"service": "users", "path": "/users/{user_id}/x?u={user_id}&v=1"}}
    ctx = Ctx()
    ctx.params = {"user_id": "a/b c&d"}
    client = FakeClient({"/users/a%2Fb%20c&d/x?u=a%2Fb%20c%26d&v=1": ok(1)})
    assert (await run(route(parts), client, ctx)).doc() == {"a": 1}


async def test_query_and_claim_placeholders() -> None:
    config = constructed_route(
        {
            "orders": {"service": "orders", "path": "/orders?page={query.page}&user={claim.sub}"},
        }
    )
    ctx = Ctx(query=b"page=2&x=1")
    ctx.vars["jwt_claims"] = {"sub": "u 1"}
    client = FakeClient({"/orders?page=2&user=u%201": ok([])})
    assert (await run(config, client, ctx)).doc() == {"orders": []}


async def test_a_missing_input_is_a_400_for_a_required_part() -> None:
    config = constructed_route({"me": {"service": "users", "path": "/users/{claim.sub}"}})
    ctx = await run(config, FakeClient({}))
    assert ctx.error is not None and ctx.error.status == 400
    assert ctx.error.message == "part 'me': missing claim.sub"


@pytest.mark.parametrize("value", ["..", ".", "%2e%2E"])
async def test_a_value_making_a_dot_segment_is_a_400(value: str) -> None:
    """`/users/{query.id}/orders` with id=.. went upstream as /users/../orders, which the
    upstream resolves to /orders: outside what the part's path says (rewrites refuse it too)."""
    config = constructed_route({"o": {"service": "users", "path": "/users/{query.id}/orders"}})
    query = b"id=" + value.encode()
    ctx = await run(config, FakeClient({}), Ctx(query=query))
    assert ctx.error is not None and ctx.error.status == 400, ctx.error
    assert "dot segment" in ctx.error.message


@pytest.mark.parametrize("query", [b"id=", b"x=1"])
async def test_a_value_leaving_an_empty_segment_is_a_400(query: bytes) -> None:
    """An empty `id` sent `/users//orders`: an upstream merging slashes reads /users/orders.
    (A missing one is a 400 of its own: missing input.)"""
    config = constructed_route({"o": {"service": "users", "path": "/users/{query.id}/orders"}})
    ctx = await run(config, FakeClient({}), Ctx(query=query))
    assert ctx.error is not None and ctx.error.status == 400, ctx.error


async def test_dots_in_a_query_value_or_inside_a_segment_are_kept() -> None:
    config = constructed_route({"o": {"service": "users", "path": "/u/{query.id}?next={query.n}"}})
    client = FakeClient({"/u/a..b?next=..": ok(1)})
    assert (await run(config, client, Ctx(query=b"id=a..b&n=.."))).doc() == {"o": 1}


async def test_a_missing_input_nulls_an_optional_part() -> None:
    config = constructed_route(
        {
            "profile": {"service": "users", "path": "/users/1"},
            "me": {"service": "users", "path": "/users/{claim.sub}", "optional": True},
        }
    )
    ctx = await run(config, FakeClient({"/users/1": ok({"id": 1})}))
    assert ctx.doc() == {
        "profile": {"id": 1},
        "me": None,
        "_errors": [{"part": "me", "error": "missing claim.sub"}],
    }


def test_a_route_without_parts_is_refused() -> None:
    with pytest.raises(ValueError, match="no aggregate parts"):
        Aggregator(RouteConfig.model_construct(name="x", aggregate=None), {})


# ------------------------------------------------------------------------------ real sockets


@asynccontextmanager
async def users_upstream(**config: Any) -> AsyncIterator[tuple[Upstream, Service]]:
    """A real upstream, and the service `users` in front of it with pools of its own."""
    pools = PoolManager(asyncio.get_running_loop())
    async with Upstream() as up:
        try:
            yield (
                up,
                Service(
                    "users", ServiceConfig.model_validate({"targets": [up.url], **config}), pools
                ),
            )
        finally:
            pools.close()
    await asyncio.sleep(0)  # (the closed connections' callbacks)


async def answered(handler: Callable[[Ctx], None], ctx: Ctx | None = None) -> Ctx:
    ctx = ctx or Ctx()
    handler(ctx)
    await asyncio.wait_for(ctx.answered, 2.0)
    return ctx


async def test_pooled_client_against_a_real_upstream() -> None:
    async with users_upstream() as (up, service):
        config = route(
            {
                "echo": {"service": "users", "path": "/echo/{user_id}?user={user_id}"},
                "down": {"service": "users", "path": "/status/503", "optional": True},
                "slow": {
                    "service": "users",
                    "path": "/slow?ms=2000",
                    "optional": True,
                    "timeout": "100ms",
                },
            }
        )
        handler = build_aggregate_handler(config, {"users": service})
        for _ in range(2):
            doc = (await answered(handler)).doc()
            assert doc["echo"]["path"] == "/echo/42" and doc["echo"]["query"] == "user=42"
            assert doc["down"] is None and doc["slow"] is None
            assert doc["_errors"] == [
                {"part": "down", "error": "HTTP 503"},
                {"part": "slow", "error": "timeout"},
            ]
        echo = next(r for r in up.received if r.path == "/echo/42")
        assert (
            echo.header("x-request-id") == "req-1" and echo.header("accept") == "application/json"
        )
        pool = service.pool_for(next(iter(service.instances.values())))
        assert pool.reused >= 1  # the second request reused the first one's connections


async def test_pooled_client_connect_error() -> None:
    loop = asyncio.get_running_loop()
    pools = PoolManager(loop)
    service = Service(
        "users", ServiceConfig.model_validate({"targets": ["http://127.0.0.1:9"]}), pools
    )
    config = route({"profile": {"service": "users", "path": "/users/{user_id}"}})
    ctx = await answered(build_aggregate_handler(config, {"users": service}, loop))
    assert ctx.error is not None and ctx.error.message == "part 'profile' failed: connect error"
    pools.close()


def test_aggregator_repr_names_its_parts() -> None:
    aggregator = Aggregator(route(DASHBOARD), {})
    assert repr(aggregator) == (
        "<Aggregator dash [<Part profile users/users/{user_id} required>, "
        "<Part orders orders/orders?user={user_id} optional>]>"
    )


@pytest.mark.parametrize(
    "body",
    [
        b'{"a":1}',
        b" [1, 2] ",
        b'"x"',
        b"1",
        b"null",
        b"\n{}\r\n\t",
        b"NaN",
        b"",
        b"  ",
        b"{",
        b'{"a":1} x',
        b"{}{}",
        b"\xef\xbb\xbf{}",
        b"\xff",
        b'{"a":"\\ud800"}',
        b"[1,]",
        b"\x0c{}",  # form feed: Python whitespace, not JSON's
        b"{}\x0b",
        b" 12 ",
        b'{"x":Infinity}',
        b"[-Infinity]",
        b"1e400",  # valid JSON (spliced in as it is)
    ],
)
def test_part_bodies_are_validated_as_json_loads_would(body: bytes) -> None:
    """As json.loads would, less its NaN/Infinity extension (not JSON: the merged document
    would not be either)."""
    from apigate.plugins.transform import refuse_json_constant
    from apigate.proxy.aggregate import PartError, _json_bytes

    try:
        json.loads(body.decode("utf-8"), parse_constant=refuse_json_constant)
        valid = True
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        valid = False
    if valid:
        assert _json_bytes(body) == body.strip(b" \t\n\r")
    else:
        with pytest.raises(PartError):
            _json_bytes(body)


# ------------------------------------------------------------------------------ the run


async def test_outcomes_are_merged_in_the_configured_order_whatever_order_they_come_in() -> None:
    parts = {
        "a": {"service": "users", "path": "/a"},
        "b": {"service": "users", "path": "/b"},
        "c": {"service": "orders", "path": "/c"},
    }
    client = FakeClient({"/a": slow(0.03, "a"), "/b": ok("b"), "/c": slow(0.01, "c")})
    ctx = await run(route(parts), client)
    assert ctx.response is not None and ctx.response.body == b'{"a":"a","b":"b","c":"c"}'
    assert [r.target for r in client.requests] == ["/a", "/b", "/c"]  # all out at once


async def test_a_required_part_failing_before_its_call_leaves_the_rest_uncalled() -> None:
    config = constructed_route(
        {
            "me": {"service": "users", "path": "/users/{claim.sub}"},
            "profile": {"service": "users", "path": "/users/1"},
        }
    )
    client = FakeClient({"/users/1": ok({"id": 1})})
    ctx = await run(config, client)
    assert ctx.error is not None and ctx.error.status == 400
    await asyncio.sleep(0.01)  # (time for a call, had one been started)
    assert client.requests == []
    assert "part_spans" not in ctx.vars  # no call, no span


async def test_an_unknown_service_fails_its_part_without_a_call() -> None:
    parts = {
        "a": {"service": "users", "path": "/a"},
        "b": {"service": "nowhere", "path": "/b", "optional": True},
    }
    client = FakeClient({"/a": ok(1)})
    ctx = await run(route(parts), client)
    assert ctx.doc() == {
        "a": 1,
        "b": None,
        "_errors": [{"part": "b", "error": "unknown service nowhere"}],
    }
    assert [r.target for r in client.requests] == ["/a"]


async def test_spans_record_every_call_and_whether_it_failed() -> None:
    parts = {
        "a": {"service": "users", "path": "/a"},
        "b": {"service": "orders", "path": "/b", "optional": True},
        "c": {"service": "orders", "path": "/c", "optional": True, "timeout": "20ms"},
    }
    client = FakeClient({"/a": ok(1), "/b": PartResponse(404, b"{}"), "/c": slow(1.0)})
    ctx = await run(route(parts), client)
    spans = {name: (service, failed) for name, service, _, _, _, failed in ctx.vars["part_spans"]}
    assert spans == {"a": ("users", False), "b": ("orders", True), "c": ("orders", True)}
    assert client.cancelled == ["/c"]  # its deadline cut the call


async def test_a_bug_in_the_client_is_an_internal_error_not_the_services_failure() -> None:
    """An exception other than a transport failure says nothing about the service: the
    breaker gives the probe slot back instead of counting a failure."""
    known = services("users")
    config = ServiceConfig.model_validate(
        {"targets": ["http://127.0.0.1:9"], "circuit_breaker": {"consecutive_failures": 1}}
    )
    known["users"] = Service("users", config, PoolManager(asyncio.get_running_loop()))
    client = FakeClient({"/a": RuntimeError("bug")})
    ctx = Ctx()
    route_config = route({"a": {"service": "users", "path": "/a"}})
    build_aggregate_handler(route_config, known, fetch=client)(ctx)
    await ctx.answered
    assert ctx.error is not None and ctx.error.message == "part 'a' failed: internal error"
    breaker = known["users"].breaker
    assert breaker is not None and breaker.allow()  # still closed


async def test_pooled_client_replaces_a_kept_alive_connection_the_upstream_closed() -> None:
    """The keep-alive race: the upstream closes an idle connection as a part takes it. The
    part goes out again on a fresh connection, and the instance is not blamed."""
    # one failure ejects an instance: a blamed instance fails the retry, and the test
    async with users_upstream(health={"passive": {"failures": 1}}) as (up, service):
        handler = build_aggregate_handler(
            route({"echo": {"service": "users", "path": "/echo/{user_id}"}}), {"users": service}
        )
        inst = next(iter(service.instances.values()))
        pool = service.pool_for(inst)
        for round_ in range(2):
            if round_:
                assert len(pool.idle) == 1
                for transport in list(up.state.open):  # closed by the upstream, unseen yet
                    transport.close()
            assert (await answered(handler)).doc()["echo"]["path"] == "/echo/42"
        assert up.state.connections == 2 and pool.reused == 1
        assert [r.path for r in up.received] == ["/echo/42", "/echo/42"]
        assert inst.failures == 0 and inst.healthy


async def test_pooled_client_cuts_what_it_no_longer_needs() -> None:
    """A response over the size cap and a call whose required sibling failed are both cut:
    their connections are closed, never reused with the rest of a response unread."""
    async with users_upstream() as (_up, service):
        pool = service.pool_for(next(iter(service.instances.values())))
        config = route(
            {
                "big": {"service": "users", "path": "/big?bytes=100000", "optional": True},
                "small": {"service": "users", "path": "/echo/1"},
            }
        )
        ctx = await answered(Aggregator(config, {"users": service}, max_body=1000))
        doc = ctx.doc()
        assert doc["small"]["path"] == "/echo/1" and doc["big"] is None
        assert doc["_errors"] == [{"part": "big", "error": "response too large"}]
        await asyncio.sleep(0.05)
        assert pool.total == len(pool.idle) == 1  # only the small part's connection is back

        config = route(
            {
                "slow": {"service": "users", "path": "/slow?ms=3000"},
                "down": {"service": "users", "path": "/status/503"},
            }
        )
        ctx = await answered(Aggregator(config, {"users": service}))
        assert ctx.error is not None and ctx.error.message == "part 'down' failed: HTTP 503"
        await asyncio.sleep(0.05)
        assert pool.total == len(pool.idle) == 1  # the slow call's connection was closed


async def test_a_part_over_the_size_cap_says_nothing_against_its_instance() -> None:
    """The cap is the gateway's limit: the instance answered, so passive health does not count
    a failure (three such parts ejected a healthy instance) nor does the breaker."""
    async with users_upstream(
        health={"passive": {"failures": 2}},
        circuit_breaker={"consecutive_failures": 2, "min_requests": 1000},
    ) as (_up, service):
        config = route({"big": {"service": "users", "path": "/big?bytes=100000"}})
        for _ in range(3):
            ctx = await answered(Aggregator(config, {"users": service}, max_body=1000))
            assert ctx.error is not None
            assert ctx.error.message == "part 'big' failed: response too large"
        (inst,) = service.instances.values()
        assert service.balancer.pick(None, []) is inst, "the instance must not be ejected"
        assert service.breaker is not None and service.breaker.state.value == "closed"


async def test_a_part_no_instance_was_asked_for_says_nothing_to_the_breaker() -> None:
    """No healthy instance, or the gateway's own connection limit reached: the part fails,
    but the breaker counts nothing (it opened on a healthy service for the pool's limit)."""
    async with users_upstream(
        max_connections=1, circuit_breaker={"consecutive_failures": 1, "min_requests": 1000}
    ) as (_up, service):
        slow = route({"slow": {"service": "users", "path": "/slow?ms=300", "optional": True}})
        busy = asyncio.ensure_future(answered(Aggregator(slow, {"users": service})))
        await asyncio.sleep(0.05)  # its call holds the one connection
        config = route({"p": {"service": "users", "path": "/echo/1"}})
        ctx = await answered(Aggregator(config, {"users": service}))
        assert ctx.error is not None
        assert ctx.error.message == "part 'p' failed: connection limit reached"
        await busy
        (inst,) = service.instances.values()
        service.set_health(inst, False, "down", check="test")
        ctx = await answered(Aggregator(config, {"users": service}))
        assert ctx.error is not None
        assert ctx.error.message == "part 'p' failed: no healthy instance"
        assert service.breaker is not None and service.breaker.state.value == "closed"


async def test_each_part_keeps_its_own_deadline() -> None:
    """One timer serves the parts' deadlines: each part is cut at its own, not at the first
    or the last."""
    parts = {  # (the longest first: the timer must move to an earlier deadline)
        "late": {"service": "orders", "path": "/c", "optional": True, "timeout": "1s"},
        "long": {"service": "users", "path": "/b", "optional": True, "timeout": "150ms"},
        "short": {"service": "users", "path": "/a", "optional": True, "timeout": "20ms"},
    }
    client = FakeClient({"/a": slow(1.0), "/b": slow(1.0), "/c": slow(0.05, "c")})
    loop = asyncio.get_running_loop()
    started = loop.time()
    ctx = await run(route(parts), client)
    took = loop.time() - started
    assert ctx.doc() == {
        "late": "c",  # answered after the short part's deadline, before the long one's
        "long": None,
        "short": None,
        "_errors": [{"part": "long", "error": "timeout"}, {"part": "short", "error": "timeout"}],
    }
    assert 0.14 <= took < 0.6
    ends = {name: ms for name, _, _, _, ms, _ in ctx.vars["part_spans"]}
    assert 15 <= ends["short"] < 100 and 140 <= ends["long"] < 600


async def test_a_bug_in_the_aggregator_answers_500_once(caplog: pytest.LogCaptureFixture) -> None:
    ctx = Ctx()
    ctx.vars = None  # type: ignore[assignment]  # (the run cannot read the trace)
    client = FakeClient({})
    await run(route(DASHBOARD), client, ctx)
    assert ctx.error is not None and (ctx.error.status, ctx.error.code) == (500, "aggregate_error")
    assert client.requests == [] and "aggregation failed on route dash" in caplog.text


async def test_the_client_leaving_cuts_the_calls_still_running() -> None:
    parts = {
        "fast": {"service": "users", "path": "/a"},
        "slow": {"service": "orders", "path": "/b", "timeout": "5s"},
    }
    client = FakeClient({"/a": ok(1), "/b": slow(5.0)})
    ctx = Ctx()
    handler = build_aggregate_handler(route(parts), services("users", "orders"), fetch=client)
    handler(ctx)
    await asyncio.sleep(0.01)
    assert ctx.on_client_lost is not None  # type: ignore[attr-defined]
    ctx.on_client_lost()  # type: ignore[attr-defined]  # what the exchange calls
    await asyncio.sleep(0.01)
    assert client.cancelled == ["/b"] and not ctx.answered.done()
    assert ctx.on_client_lost is None  # type: ignore[attr-defined]  # (no cycle left)
    spans = {name: failed for name, _, _, _, _, failed in ctx.vars["part_spans"]}
    assert spans == {"fast": False, "slow": False}  # cut by us: not the service's failure


async def test_an_answered_run_leaves_no_hook_on_the_exchange() -> None:
    client = FakeClient({"/users/42": ok({}), "/orders?user=42": slow(0.01, [])})
    ctx = await run(route(DASHBOARD), client)
    assert ctx.response is not None and ctx.on_client_lost is None  # type: ignore[attr-defined]


async def test_pooled_calls_are_closed_when_the_client_leaves() -> None:
    async with users_upstream() as (up, service):
        pool = service.pool_for(next(iter(service.instances.values())))
        ctx = Ctx()
        Aggregator(
            route({"slow": {"service": "users", "path": "/slow?ms=3000"}}), {"users": service}
        )(ctx)
        for _ in range(100):  # until the upstream has the request
            await asyncio.sleep(0.01)
            if up.received:
                break
        assert len(up.state.open) == 1
        ctx.on_client_lost()  # type: ignore[attr-defined]
        for _ in range(100):
            await asyncio.sleep(0.01)
            if not up.state.open:
                break
        assert not up.state.open and pool.total == 0 and not ctx.answered.done()


async def test_a_body_nested_too_deep_to_scan_is_invalid_json() -> None:
    """The C scanner gives up with a RecursionError, not a ValueError: still an invalid
    body (it once escaped into the connection's callback and the part hung to its deadline)."""
    deep = b"[" * 100_000
    client = FakeClient({"/users/42": ok({}), "/orders?user=42": PartResponse(200, deep)})
    ctx = await run(route(DASHBOARD), client)
    assert ctx.doc()["_errors"] == [{"part": "orders", "error": "invalid JSON"}]

    async with users_upstream() as (up, service):
        up.state.canned["/deep"] = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (
            len(deep),
            deep,
        )
        config = route({"deep": {"service": "users", "path": "/deep"}})
        ctx = await answered(Aggregator(config, {"users": service}))
        assert ctx.error is not None and ctx.error.message == "part 'deep' failed: invalid JSON"


async def test_a_bug_in_a_parts_bookkeeping_is_logged_and_the_client_answered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Not an exception escaping into the connection's callback, and a run left unanswered."""
    async with users_upstream() as (_up, service):
        config = route(
            {
                "echo": {"service": "users", "path": "/echo/1"},
                "broken": {"service": "users", "path": "/echo/2", "optional": True},
            }
        )
        ctx = Ctx()
        ctx.vars = _ExplodingVars()  # no span can be recorded
        doc = (await answered(Aggregator(config, {"users": service}), ctx)).doc()
        assert doc["echo"]["path"] == "/echo/1" and doc["broken"]["path"] == "/echo/2"
        assert caplog.text.count("unexpected error") == 2


class _ExplodingVars(dict[str, Any]):
    def setdefault(self, key: str, default: Any = None) -> Any:
        raise RuntimeError("no room for spans")
