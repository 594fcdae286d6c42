"""Consumers' own plugins (`consumers[].plugins`, Kong's consumer-scoped plugins): which are
refused, how a route's chain takes them (consumer > route > global), and what a request of a
consumer with plugins runs, on a real exchange with fake transports (no sockets).
tests/integration/test_consumer_plugins.py runs them in a gateway process."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.config.loader import parse_config
from apigate.http.pool import PoolManager
from apigate.http.upstream import UpstreamConnection
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv
from apigate.plugins.chain import AUTH_FLOOR, BUILTIN, ConsumerSwitch, RouteSwitch, resolve
from apigate.proxy.exchange import ProxyExchange
from apigate.runtime import CompiledRoute, Runtime, ServiceTable, compile_runtime, dry_compile
from tests.unit.test_resilience_review import Client, FakeTransport, Host

RECORDER = "tests.unit.test_consumer_plugins:Recorder"
# (label, hook) of every Recorder hook call, in order
CALLS: list[tuple[str, str]] = []


class RecorderConfig(PluginConfig):
    label: str


class Recorder(Plugin):
    """Records each of its hooks' calls under its label: which instance ran, in which phase."""

    name = "recorder"
    priority = 500
    Config = RecorderConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, RecorderConfig)
        self.label = config.label

    def _call(self, hook: str) -> None:
        CALLS.append((self.label, hook))

    def on_request(self, ctx: Any) -> None:
        self._call("on_request")

    def on_upstream_request(self, ctx: Any, request: Any) -> None:
        self._call("on_upstream_request")
        request.set_header("X-Recorder", self.label)

    def on_response(self, ctx: Any, head: Any) -> None:
        self._call("on_response")

    def on_response_chunk(self, ctx: Any, chunk: bytes) -> None:
        self._call("on_response_chunk")

    def on_response_end(self, ctx: Any) -> None:
        self._call("on_response_end")

    def on_log(self, ctx: Any) -> None:
        self._call("on_log")

    async def start(self) -> None:
        self._call("start")

    async def close(self) -> None:
        self._call("close")


ALL_PHASES = [
    "on_request",
    "on_upstream_request",
    "on_response",
    "on_response_chunk",
    "on_response_end",
    "on_log",
]


def calls_of(label: str) -> list[tuple[str, str]]:
    """What one Recorder's hooks record for a proxied request: every phase, once."""
    return [(label, hook) for hook in ALL_PHASES]


OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def config(
    consumers: list[dict[str, Any]],
    route_plugins: dict[str, Any],
    global_plugins: dict[str, Any] | None = None,
    **extra_routes: dict[str, Any],
) -> dict[str, Any]:
    """One service, route `r` on `/r` with `route_plugins`, and routes `extra_routes` (name:
    plugins) on `/<name>`."""
    routes = [{"name": "r", "match": {"paths": ["/r"]}, "service": "up", "plugins": route_plugins}]
    routes += [
        {"name": name, "match": {"paths": [f"/{name}"]}, "service": "up", "plugins": plugins}
        for name, plugins in extra_routes.items()
    ]
    return {
        "services": {"up": {"targets": ["http://10.0.0.1:80"], "health": {"passive": None}}},
        "consumers": consumers,
        "routes": routes,
        "plugins": global_plugins or {},
    }


ALICE = {"name": "alice", "api_keys": ["key-alice"]}
BOB = {"name": "bob", "api_keys": ["key-bob"]}


def alice_with(plugins: dict[str, Any]) -> dict[str, Any]:
    return {**ALICE, "plugins": plugins}


def refusals(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        dry_compile(parse_config(doc), asyncio.get_running_loop())
    return caught.value.errors


class Gateway:
    """A snapshot of `doc` compiled as the gateway compiles it, serving through real client
    connections and exchanges, with one upstream connection parked for the requests."""

    def __init__(self, doc: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        cfg = parse_config(doc)
        self.env = PluginEnv(config=cfg, loop=loop)
        pools = PoolManager(loop)
        self.runtime: Runtime = compile_runtime(cfg, ServiceTable(pools), self.env)
        self.host = Host(self.runtime, [], pools.writes)
        service = self.runtime.services["up"]
        pool = service.pool_for(next(iter(service.instances.values())))
        self.upstream = UpstreamConnection(pool)
        self.upstream_transport = FakeTransport(self.upstream)
        self.upstream.connection_made(self.upstream_transport)  # type: ignore[arg-type]
        pool.total += 1
        self.upstream.reusable = True
        pool.release(self.upstream)

    def send(self, path: str, key: str | None = None, extra: bytes = b"") -> Client:
        client = Client(self.host)
        auth = b"apikey: %s\r\n" % key.encode() if key else b""
        client.conn.data_received(
            b"GET %s HTTP/1.1\r\nHost: gw.test\r\n%s%s\r\n" % (path.encode(), auth, extra)
        )
        self.host.writes.flush()  # the end of the loop's turn: the request goes upstream
        return client

    def proxy(self, path: str, key: str | None = None, answer: bytes = OK) -> Client:
        """A request that goes upstream, answered with `answer`."""
        self.upstream_transport.written.clear()
        client = self.send(path, key)
        assert self.upstream_transport.written, client.out  # it went upstream
        self.upstream.data_received(answer)
        return client

    @property
    def exchange(self) -> ProxyExchange:
        return self.host.exchanges[-1]

    def sent_upstream(self) -> bytes:
        self.host.writes.flush()  # what the loop sends at the end of its turn
        return bytes(self.upstream_transport.written)


def head_field(out: bytes, name: str) -> str | None:
    for line in out.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]:
        field, _, value = line.partition(b":")
        if field.strip().lower() == name.lower().encode():
            return value.strip().decode()
    return None


# ================================================================ what a consumer may name


@pytest.mark.parametrize(
    ("name", "raw", "reason"),
    [
        ("cors", {"origins": ["*"]}, "it runs at priority 2100, before the authentication"),
        ("ip_filter", {"allow": ["10.0.0.0/8"]}, "it runs at priority 2000"),
        ("request_size", {"max_bytes": 10}, "it runs at priority 1900"),
        ("tracing", {}, "it runs at priority 3000"),
        ("key_auth", {}, "an authentication plugin identifies the consumer"),
        ("basic_auth", {}, "an authentication plugin identifies the consumer"),
        ("jwt", {"secret": "x" * 32, "algorithms": ["HS256"]}, "an authentication plugin"),
        ("acl", {"allow": ["admins"]}, "it judges the consumer for the route"),
    ],
)
async def test_plugins_that_run_before_the_consumer_is_known_are_refused(
    name: str, raw: dict[str, Any], reason: str
) -> None:
    doc = config([BOB, alice_with({name: raw})], {"key_auth": {}})
    (error,) = refusals(doc)
    assert error.startswith(f"consumers[1].plugins.{name}: consumer 'alice' cannot have '{name}'")
    assert reason in error


async def test_a_refusal_names_the_consumer_in_an_admin_change_too() -> None:
    doc = config([alice_with({"cors": {"origins": ["*"]}})], {"key_auth": {}})
    with pytest.raises(ConfigError) as caught:
        dry_compile(parse_config(doc, by_name=True), asyncio.get_running_loop())
    assert caught.value.errors[0].startswith(
        "consumers[0] (alice).plugins.cors: consumer 'alice' cannot have 'cors'"
    )


async def test_a_consumers_plugin_settings_are_checked_as_a_routes_are() -> None:
    doc = config(
        [alice_with({"rate_limt": {}, "rate_limit": {"per": "1m"}, "recorder": {}})],
        {"key_auth": {}},
    )
    errors = refusals(doc)
    assert errors[0].startswith(
        "consumers[0].plugins.rate_limt: unknown plugin 'rate_limt'; did you mean 'rate_limit'?"
    )
    assert errors[1] == "consumers[0].plugins.rate_limit.requests: required"
    assert errors[2].startswith("consumers[0].plugins.recorder: unknown plugin")


async def test_a_consumers_cache_keeps_its_entries_under_its_consumer() -> None:
    doc = config([alice_with({"cache": {"key_include_consumer": False}})], {"key_auth": {}})
    (error,) = refusals(doc)
    assert error.startswith("consumers[0].plugins.cache.key_include_consumer: a consumer's cache")
    # the same setting on a route is an explicit opt-in, as before
    dry_compile(
        parse_config(config([ALICE], {"cache": {"key_include_consumer": False}})),
        asyncio.get_running_loop(),
    )


async def test_one_plugin_named_twice_by_a_consumer_is_refused() -> None:
    doc = config(
        [
            alice_with(
                {
                    "rate_limit": {"requests": 1, "per": "1s"},
                    BUILTIN["rate_limit"]: {"requests": 2, "per": "1s"},
                }
            )
        ],
        {"key_auth": {}},
    )
    (error,) = refusals(doc)
    assert "cannot have 'apigate.plugins.rate_limit:RateLimitPlugin'" in error
    assert "it is the plugin 'rate_limit' names too" in error


def test_the_auth_floor_is_the_lowest_priority_of_the_plugins_that_identify_consumers() -> None:
    identifying = [cls for cls in map(resolve, BUILTIN) if cls.identifies_consumers]
    assert {cls.name for cls in identifying} == {"jwt", "key_auth", "basic_auth"}
    assert min(cls.priority for cls in identifying) == AUTH_FLOOR
    # and every built-in a consumer may name runs after all of them
    allowed = [
        cls.name
        for cls in map(resolve, BUILTIN)
        if cls.on_consumers and not cls.identifies_consumers and cls.priority < AUTH_FLOOR
    ]
    assert sorted(allowed) == [
        "access_log",
        "cache",
        "rate_limit",
        "request_termination",
        "request_transform",
        "response_transform",
    ]


# ================================================================ the chains


def _request_owner_names(route: CompiledRoute) -> list[str]:
    return [
        "switch" if isinstance(owner, ConsumerSwitch) else owner.name  # type: ignore[attr-defined]
        for owner in route.chain.request_owners
    ]


async def test_without_consumers_plugins_no_chain_changes() -> None:
    """A snapshot where no consumer has plugins builds the chains it built before them: no
    switch, no hook more, so their requests cost what they did."""
    loop = asyncio.get_running_loop()
    doc = config([ALICE, BOB], {"key_auth": {}, "rate_limit": {"requests": 1, "per": "1s"}})
    runtime = dry_compile(parse_config(doc), loop)
    chain = runtime.routes["r"].chain
    assert chain.switch is None
    assert _request_owner_names(runtime.routes["r"]) == ["key_auth", "rate_limit"]
    assert len(chain.request_hooks) == 2
    assert runtime.consumer_plugins == {}


async def test_only_routes_that_can_identify_a_consumer_get_the_switch_after_their_auth() -> None:
    loop = asyncio.get_running_loop()
    doc = config(
        [alice_with({"rate_limit": {"requests": 100, "per": "1s"}}), BOB],
        {"key_auth": {}, "rate_limit": {"requests": 1, "per": "1s"}, RECORDER: {"label": "r"}},
        {"cors": {"origins": ["*"]}, "access_log": {"path": "/dev/null"}},
        open={"rate_limit": {"requests": 1, "per": "1s"}},
        jwt={
            "jwt": {"secret": "x" * 32, "algorithms": ["HS256"]},
            "basic_auth": {},
            "request_size": {"max_bytes": 100},
        },
    )
    runtime = dry_compile(parse_config(doc), loop)
    routes = runtime.routes
    assert _request_owner_names(routes["r"]) == [
        "cors",
        "key_auth",
        "switch",
        "rate_limit",
        "recorder",
    ]
    # (every auth plugin of a chain before it, whatever else sits between them)
    assert _request_owner_names(routes["jwt"]) == [
        "cors",
        "request_size",
        "jwt",
        "basic_auth",
        "switch",
    ]
    # no plugin that identifies consumers: the chain it had, whoever has plugins
    assert routes["open"].chain.switch is None
    assert _request_owner_names(routes["open"]) == ["cors", "rate_limit"]
    assert all(plugin in runtime.plugins for plugin in runtime.consumer_plugins["alice"])


async def test_a_consumers_plugins_take_the_place_of_the_routes_and_the_global_ones() -> None:
    """consumer > route > global, per plugin name; the others stay; a new one joins."""
    loop = asyncio.get_running_loop()
    doc = config(
        [
            alice_with(
                {
                    "rate_limit": {"requests": 100, "per": "1s"},
                    RECORDER: {"label": "alice"},
                    "request_termination": {"status_code": 200, "message": "alice"},
                }
            ),
        ],
        {"key_auth": {}, "rate_limit": {"requests": 1, "per": "1s"}},
        {RECORDER: {"label": "global"}, "access_log": {"path": "/dev/null"}},
        other={"key_auth": {}},
    )
    runtime = dry_compile(parse_config(doc), loop)
    alice_rate, alice_recorder, alice_termination = runtime.consumer_plugins["alice"]
    for name in ("r", "other"):
        route = runtime.routes[name]
        variant = route.for_consumer(runtime.consumer_plugins["alice"])
        by_name = {p.name: p for p in variant.chain.plugins}
        assert by_name["rate_limit"] is alice_rate  # the route's own, or the global one
        assert by_name["recorder"] is alice_recorder  # the global one
        assert by_name["request_termination"] is alice_termination  # one the route lacks
        assert by_name["key_auth"] is next(p for p in route.chain.plugins if p.name == "key_auth")
        assert by_name["access_log"] in route.chain.plugins  # kept as it is
        assert [p.priority for p in variant.chain.plugins] == sorted(
            (p.priority for p in variant.chain.plugins), reverse=True
        )
        # the same hooks up to and with the switch, then the consumer's
        assert _request_owner_names(variant)[:2] == _request_owner_names(route)[:2]
        assert variant.chain.request_hooks[1] == route.chain.request_hooks[1]
        assert variant.name == route.name and variant.config is route.config
    # the route's variant is made once, on the consumer's first request, then kept
    switch = runtime.routes["r"].chain.switch
    assert switch is not None and switch.made == {}


# ================================================================ requests


async def test_a_consumers_plugin_runs_in_every_phase_in_place_of_the_routes() -> None:
    CALLS.clear()
    gw = Gateway(
        config(
            [alice_with({RECORDER: {"label": "alice"}}), BOB],
            {"key_auth": {}, RECORDER: {"label": "route"}},
        )
    )
    route = gw.runtime.routes["r"]
    alice = gw.proxy("/r", "key-alice")
    assert alice.status == 200 and alice.out.endswith(b"ok")
    assert b"X-Recorder: alice\r\n" in gw.sent_upstream()
    assert calls_of("alice") == CALLS
    assert gw.exchange.route is not route and gw.exchange.route.name == "r"
    assert isinstance(route.chain.switch, ConsumerSwitch)
    assert isinstance(route.chain.switch.made["alice"], RouteSwitch)

    CALLS.clear()
    bob = gw.proxy("/r", "key-bob")  # a consumer without plugins: the route's chain
    assert bob.status == 200
    assert b"X-Recorder: route\r\n" in gw.sent_upstream()
    assert calls_of("route") == CALLS
    assert gw.exchange.route is route

    CALLS.clear()
    nobody = gw.send("/r")  # no consumer: refused by the route's chain, logged by it
    assert nobody.status == 401
    assert CALLS == [("route", "on_response_end"), ("route", "on_log")]
    assert gw.exchange.route is route
    assert set(route.chain.switch.made) == {"alice"}


async def test_a_consumers_rate_limit_counts_apart_from_the_routes() -> None:
    gw = Gateway(
        config(
            [
                alice_with({"rate_limit": {"requests": 100, "per": "1m", "burst": 99}}),
                BOB,
                {
                    "name": "c:a{rol}",  # quoted in the counters' scope
                    "api_keys": ["key-carol"],
                    "plugins": {"rate_limit": {"requests": 5, "per": "1m", "burst": 4}},
                },
            ],
            {
                "key_auth": {},
                "rate_limit": {"requests": 1, "per": "1m"},
                "request_termination": {"status_code": 200, "message": "served"},
            },
        )
    )
    # the route's limit: one a minute per consumer
    assert gw.send("/r", "key-bob").status == 200
    limited = gw.send("/r", "key-bob")
    assert limited.status == 429 and head_field(limited.out, "RateLimit-Limit") == "1"
    # alice's own: 100 at once, and her answers carry her limiter's headers
    for _ in range(20):
        answer = gw.send("/r", "key-alice")
        assert answer.status == 200, answer.out
        assert head_field(answer.out, "RateLimit-Limit") == "100"
    assert head_field(answer.out, "RateLimit-Remaining") == "80"
    # bob's count was never alice's, nor the other way round
    assert gw.send("/r", "key-bob").status == 429
    for _ in range(5):
        assert gw.send("/r", "key-carol").status == 200
    assert gw.send("/r", "key-carol").status == 429

    route_limit = next(p for p in gw.runtime.routes["r"].chain.plugins if p.name == "rate_limit")
    alice_limit = gw.runtime.consumer_plugins["alice"][0]
    carol_limit = gw.runtime.consumer_plugins["c:a{rol}"][0]
    # counters (and Redis keys) apart: the route's scope, and each consumer's own
    assert route_limit._prefix == "apigate:rl:r:"
    assert alice_limit._prefix == "apigate:rl:@alice:"
    assert carol_limit._prefix == "apigate:rl:@c%3Aa%7Brol%7D:"
    tables = {k.split(":{")[0]: v for k, v in gw.env.shared.items() if k.startswith("rate_limit")}
    assert set(tables) == {"rate_limit:r", "rate_limit:@alice", "rate_limit:@c%3Aa%7Brol%7D"}
    assert set(tables["rate_limit:r"]) == {"bob"}
    assert set(tables["rate_limit:@alice"]) == {"alice"}


async def test_requests_answered_before_the_switch_are_the_routes() -> None:
    """A 401 from key_auth (no consumer yet) is decorated and logged by the route's chain,
    whatever the consumers' plugins."""
    gw = Gateway(
        config(
            [alice_with({"rate_limit": {"requests": 100, "per": "1m"}})],
            {"key_auth": {}, "rate_limit": {"requests": 1, "per": "1m"}},
        )
    )
    refused = gw.send("/r", "not-a-key")
    assert refused.status == 401
    assert gw.exchange.route is gw.runtime.routes["r"]


async def test_a_consumers_json_transform_rewrites_the_body_the_route_would_stream() -> None:
    """The body rewrite is the variant's: the route has none, the consumer's request_transform
    edits JSON, and the body (arriving after the hooks ran) is held for it."""
    gw = Gateway(
        config(
            [alice_with({"request_transform": {"json": {"add": {"partner": "acme"}}}}), BOB],
            {"key_auth": {}},
        )
    )
    for key, expected in (("key-alice", {"a": 1, "partner": "acme"}), ("key-bob", {"a": 1})):
        gw.upstream_transport.written.clear()
        client = Client(gw.host)
        body = b'{"a": 1}'
        client.conn.data_received(
            b"POST /r HTTP/1.1\r\nHost: gw.test\r\napikey: %s\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n"
            % (key.encode(), len(body))
        )
        client.conn.data_received(body)
        sent = gw.sent_upstream()
        assert json.loads(sent.split(b"\r\n\r\n", 1)[1]) == expected, sent
        gw.upstream.data_received(OK)
        assert client.status == 200


async def test_a_consumer_its_jwt_credential_names_gets_its_own_plugins() -> None:
    """jwt in Kong's credential model (`key_claim_name`) identifies the consumer too: the
    token's `iss` picks alice's credential, and the request runs alice's plugins."""
    import jwt as pyjwt

    secret = "s" * 32
    alice = {
        "name": "alice",
        "jwt_credentials": [{"key": "alice-iss", "secret": secret}],
        "plugins": {RECORDER: {"label": "alice"}},
    }
    CALLS.clear()
    gw = Gateway(config([alice], {"jwt": {"key_claim_name": "iss"}, RECORDER: {"label": "route"}}))
    token = pyjwt.encode({"iss": "alice-iss"}, secret, algorithm="HS256")
    gw.upstream_transport.written.clear()
    client = gw.send("/r", extra=b"Authorization: Bearer %s\r\n" % token.encode())
    gw.upstream.data_received(OK)
    assert client.status == 200
    assert b"X-Recorder: alice\r\n" in gw.sent_upstream()
    assert calls_of("alice") == CALLS
    assert gw.exchange.consumer is not None and gw.exchange.consumer.name == "alice"
