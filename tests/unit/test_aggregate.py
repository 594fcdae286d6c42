"""Aggregation routes: a fake client for the rules, one real upstream for the pooled client."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
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

    def respond(self, response: Response) -> None:
        self.response = response

    def fail(self, err: GatewayError) -> None:
        self.error = err

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
    async def answer() -> PartResponse:
        await asyncio.sleep(seconds)
        return ok(doc)

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
    await handler(ctx)
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
            "/users/42": PartResponse(503, b"{}"),
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


async def test_pooled_client_against_a_real_upstream() -> None:
    loop = asyncio.get_running_loop()
    pools = PoolManager(loop)
    async with Upstream() as up:
        service = Service("users", ServiceConfig.model_validate({"targets": [up.url]}), pools)
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
        handler = build_aggregate_handler(config, {"users": service}, loop)
        for _ in range(2):
            ctx = Ctx()
            await asyncio.wait_for(handler(ctx), 2.0)
            doc = ctx.doc()
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
        pools.close()
    await asyncio.sleep(0)


async def test_pooled_client_connect_error() -> None:
    loop = asyncio.get_running_loop()
    pools = PoolManager(loop)
    service = Service(
        "users", ServiceConfig.model_validate({"targets": ["http://127.0.0.1:9"]}), pools
    )
    config = route({"profile": {"service": "users", "path": "/users/{user_id}"}})
    ctx = Ctx()
    await asyncio.wait_for(build_aggregate_handler(config, {"users": service}, loop)(ctx), 3.0)
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
    ],
)
def test_part_bodies_are_validated_as_json_loads_would(body: bytes) -> None:
    from apigate.proxy.aggregate import PartError, _json_bytes

    try:
        json.loads(body.decode("utf-8"))
        valid = True
    except ValueError:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        valid = False
    if valid:
        assert _json_bytes(body) == body.strip(b" \t\n\r")
    else:
        with pytest.raises(PartError):
            _json_bytes(body)


async def test_join_fails_fast_and_every_part_exception_is_retrieved() -> None:
    """The parts' join (asyncio.gather's job before): the first failure ends the wait at
    once; a failure that comes later is still retrieved, so asyncio never logs it as lost."""
    from apigate.proxy.aggregate import _Join

    loop = asyncio.get_running_loop()
    gate: asyncio.Future[None] = loop.create_future()

    async def fail(message: str, wait: asyncio.Future[None] | None = None) -> bytes:
        if wait is not None:
            await wait
        raise RuntimeError(message)

    async def slow() -> bytes:
        await asyncio.sleep(10)
        return b"1"

    first, second, pending = (
        loop.create_task(fail("first")),
        loop.create_task(fail("second", gate)),
        loop.create_task(slow()),
    )
    join = _Join(loop, [first, second, pending])  # type: ignore[list-item]
    with pytest.raises(RuntimeError, match="first"):
        await join.future
    gate.set_result(None)
    await asyncio.wait([second])
    assert not second._log_traceback  # type: ignore[attr-defined]
    pending.cancel()
    await asyncio.wait([pending])
    assert join.future.done()


async def test_join_waits_for_every_part() -> None:
    from apigate.proxy.aggregate import _Join

    loop = asyncio.get_running_loop()

    async def part(delay: float) -> bytes:
        await asyncio.sleep(delay)
        return b"%r" % delay

    tasks = [loop.create_task(part(d)) for d in (0.02, 0.0, 0.01)]
    await _Join(loop, tasks).future  # type: ignore[arg-type]
    assert [t.result() for t in tasks] == [b"0.02", b"0.0", b"0.01"]
