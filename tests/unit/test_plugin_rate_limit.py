"""The rate_limit plugin: GCRA's exact bound, headers, keys, and the store-error behaviour.

The clock is the plugin's `clock` attribute (integer ns), so time is whatever a test says.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.config.errors import ConfigError
from apigate.config.schema import ConsumerConfig, GatewayConfig
from apigate.plugins.base import PluginEnv, Response
from apigate.plugins.rate_limit import RateLimitPlugin
from apigate.store.redis import StoreUnavailable
from tests.unit.test_plugin_fakes import (
    Ctx,
    body,
    build,
    header,
    make_ctx,
    make_env,
    make_route,
    resolve,
    settle,
    upstream_head,
)

S = 1_000_000_000  # ns per second


class Clock:
    def __init__(self, start: int = 1000 * S) -> None:
        self.now = start

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += round(seconds * S)


def limiter(raw: dict[str, Any], env: PluginEnv | None = None) -> tuple[RateLimitPlugin, Clock]:
    plugin: RateLimitPlugin = build("rate_limit", raw, env)
    clock = Clock()
    plugin.clock = clock
    return plugin, clock


def hit(plugin: RateLimitPlugin, ctx: Ctx | None = None) -> Response | None:
    return resolve(plugin.on_request(ctx or make_ctx()))


def admitted(plugin: RateLimitPlugin, n: int, ctx: Ctx | None = None) -> int:
    return sum(hit(plugin, ctx) is None for _ in range(n))


def rate_headers(plugin: RateLimitPlugin, ctx: Ctx) -> dict[str, str]:
    head = upstream_head([(b"Content-Type", b"text/plain")])
    plugin.on_response(ctx, head)
    return {n.decode(): v.decode() for n, v in head.headers if n.startswith(b"RateLimit")}


# ============================================================================ GCRA
def test_n_plus_one_is_429_with_headers() -> None:
    plugin, _ = limiter({"requests": 5, "per": "1m", "burst": 4})
    remaining = []
    for _ in range(5):
        ctx = make_ctx()
        assert hit(plugin, ctx) is None
        headers = rate_headers(plugin, ctx)
        assert headers["RateLimit-Limit"] == "5"
        remaining.append(int(headers["RateLimit-Remaining"]))
    assert remaining == [4, 3, 2, 1, 0]
    assert headers["RateLimit-Reset"] == "60"
    denied = hit(plugin)
    assert denied is not None and denied.status == 429
    assert header(denied, "Retry-After") == "12"  # one emission interval: 60s / 5
    assert header(denied, "RateLimit-Remaining") == "0"
    assert header(denied, "RateLimit-Reset") == "60"
    assert body(denied) == {
        "error": "rate_limited",
        "request_id": "req-1",
        "message": "rate limit exceeded: 5 requests per 1m",
    }


def test_an_empty_bucket_and_a_filling_one_give_their_own_headers() -> None:
    """The empty-bucket headers are built once; a filling bucket's are computed per response."""
    plugin, clock = limiter({"requests": 2, "per": "3s", "burst": 3})
    seen = []
    for _ in range(3):
        ctx = make_ctx()
        assert hit(plugin, ctx) is None
        seen.append(rate_headers(plugin, ctx))
        seen.append(rate_headers(plugin, ctx))  # a second response: same values, no sharing
    clock.advance(10)  # drained: empty again
    ctx = make_ctx()
    assert hit(plugin, ctx) is None
    seen.append(rate_headers(plugin, ctx))
    pairs = [(h["RateLimit-Remaining"], h["RateLimit-Reset"]) for h in seen]
    # (remaining, reset): 1.5 s per request, 3 of burst; then empty again after the pause
    assert pairs == [
        ("3", "2"),
        ("3", "2"),
        ("2", "3"),
        ("2", "3"),
        ("1", "5"),
        ("1", "5"),
        ("3", "2"),
    ]
    assert all(h["RateLimit-Limit"] == "2" for h in seen)


def test_burst_zero_means_an_even_pace() -> None:
    plugin, clock = limiter({"requests": 10, "per": "1s"})
    assert admitted(plugin, 5) == 1
    clock.advance(0.099)
    assert admitted(plugin, 1) == 0
    clock.advance(0.001)
    assert admitted(plugin, 5) == 1


def test_no_double_allowance_at_a_window_edge() -> None:
    # A fixed one-second window would admit 10 at 0.999 s and 10 more at 1.001 s.
    plugin, clock = limiter({"requests": 10, "per": "1s", "burst": 9})
    clock.advance(0.999)
    assert admitted(plugin, 10) == 10
    clock.advance(0.002)
    assert admitted(plugin, 10) == 0
    clock.advance(0.098)
    assert admitted(plugin, 10) == 1  # one more emission interval has passed


def simulate(requests: int, per_s: float, burst: int, arrivals: Iterable[float]) -> list[int]:
    plugin, clock = limiter({"requests": requests, "per": per_s, "burst": burst})
    start = clock.now
    times = []
    for offset in sorted(arrivals):
        clock.now = start + round(offset * S)
        if hit(plugin) is None:
            times.append(clock.now)
    return times


@settings(max_examples=150, deadline=None)
@given(
    requests=st.integers(1, 20),
    per_ms=st.integers(1, 5000),
    burst=st.integers(0, 20),
    arrivals=st.lists(st.floats(0, 12, allow_nan=False), min_size=1, max_size=300),
)
def test_any_window_of_length_per_admits_at_most_requests_plus_burst(
    requests: int, per_ms: int, burst: int, arrivals: list[float]
) -> None:
    per = per_ms * 1_000_000
    times = simulate(requests, per_ms / 1000, burst, arrivals)
    for i, t in enumerate(times):
        in_window = sum(1 for u in times[i:] if u < t + per)
        assert in_window <= requests + burst
    at_once: dict[int, int] = {}
    for t in times:
        at_once[t] = at_once.get(t, 0) + 1
    assert max(at_once.values()) <= burst + 1


def test_a_steady_client_gets_the_full_rate() -> None:
    arrivals = [i * 0.01 for i in range(1000)]  # 100/s for 10 s against 10/s
    times = simulate(10, 1.0, 0, arrivals)
    assert len(times) == 100


def test_headers_can_be_turned_off() -> None:
    plugin, _ = limiter({"requests": 1, "per": "1s", "headers": False})
    ctx = make_ctx()
    assert hit(plugin, ctx) is None
    assert rate_headers(plugin, ctx) == {}
    denied = hit(plugin)
    assert denied is not None and header(denied, "Retry-After") == "1"
    assert header(denied, "RateLimit-Limit") is None


def test_upstream_ratelimit_headers_are_replaced() -> None:
    plugin, _ = limiter({"requests": 3, "per": "1s", "burst": 2})
    ctx = make_ctx()
    assert hit(plugin, ctx) is None
    head = upstream_head([(b"ratelimit-limit", b"999"), (b"X-Other", b"1")])
    plugin.on_response(ctx, head)
    names = [n for n, _ in head.headers]
    assert names == [b"X-Other", b"RateLimit-Limit", b"RateLimit-Remaining", b"RateLimit-Reset"]


def test_responses_of_other_plugins_get_no_headers() -> None:
    plugin, _ = limiter({"requests": 3, "per": "1s"})
    head = upstream_head()
    plugin.on_response(make_ctx(), head)  # on_request never admitted this exchange
    assert head.headers == []


# ============================================================================ keys
def test_key_ip_uses_the_address_ip_filter_resolved() -> None:
    plugin, _ = limiter({"requests": 1, "per": "1m"})
    assert hit(plugin, make_ctx(client_ip="10.0.0.1")) is None
    assert hit(plugin, make_ctx(client_ip="10.0.0.1")) is not None
    assert hit(plugin, make_ctx(client_ip="10.0.0.2")) is None
    behind_proxy = make_ctx(client_ip="10.0.0.1")
    behind_proxy.vars["client_ip"] = "198.51.100.9"
    assert hit(plugin, behind_proxy) is None


def test_key_consumer_falls_back_to_the_address() -> None:
    plugin, _ = limiter({"requests": 1, "per": "1m", "key": "consumer"})
    alice = make_ctx(client_ip="10.0.0.1")
    alice.consumer = ConsumerConfig(name="alice")
    assert hit(plugin, alice) is None
    assert hit(plugin, alice) is not None
    assert hit(plugin, make_ctx(client_ip="10.0.0.1")) is None  # anonymous, own bucket
    assert hit(plugin, make_ctx(client_ip="10.0.0.1")) is not None


def test_the_default_key_is_the_consumer_as_kongs_limit_by() -> None:
    """Two consumers behind one address shared one bucket: the key defaulted to `ip`, where
    Kong's limit_by defaults to the consumer (Kong-migration audit)."""
    plugin, _ = limiter({"requests": 1, "per": "1m"})
    alice, bob = make_ctx(client_ip="10.0.0.1"), make_ctx(client_ip="10.0.0.1")
    alice.consumer, bob.consumer = ConsumerConfig(name="alice"), ConsumerConfig(name="bob")
    assert hit(plugin, alice) is None
    assert hit(plugin, alice) is not None
    assert hit(plugin, bob) is None  # a bucket of its own, at the same address
    assert hit(plugin, make_ctx(client_ip="10.0.0.1")) is None  # anonymous: the address's
    assert hit(plugin, make_ctx(client_ip="10.0.0.1")) is not None


def test_key_header_and_combinations() -> None:
    plugin, _ = limiter({"requests": 1, "per": "1m", "key": ["header:X-Tenant", "route"]})
    a = make_route("a", {"rate_limit": {}})
    b = make_route("b", {"rate_limit": {}})
    assert hit(plugin, make_ctx(headers=[("x-tenant", "t1")], route=a)) is None
    assert hit(plugin, make_ctx(headers=[("X-Tenant", "t1")], route=a)) is not None
    assert hit(plugin, make_ctx(headers=[("X-Tenant", "t2")], route=a)) is None
    assert hit(plugin, make_ctx(headers=[("X-Tenant", "t1")], route=b)) is None
    assert hit(plugin, make_ctx(route=a)) is None  # no header: by address


def test_local_counters_survive_a_reload_with_the_same_settings() -> None:
    env = make_env()
    raw = {"requests": 1, "per": "1m"}
    route = make_route("api", {"rate_limit": raw})
    first, clock = limiter(raw, env)
    assert hit(first, make_ctx(route=route)) is None
    second, _ = limiter(raw, env)  # the next snapshot's instance
    second.clock = clock
    assert hit(second, make_ctx(route=route)) is not None
    other_route = make_route("other", {"rate_limit": raw})
    third, _ = limiter(raw, env)
    third.clock = clock
    assert hit(third, make_ctx(route=other_route)) is None  # a route's own limiter is its own
    changed, _ = limiter({"requests": 2, "per": "1m"}, env)
    changed.clock = clock
    assert hit(changed, make_ctx(route=route)) is None  # new settings, fresh counters


def test_expired_keys_are_swept() -> None:
    plugin, clock = limiter({"requests": 10, "per": "1s"})
    plugin.limiter.sweep_at = 100
    for i in range(100):
        assert hit(plugin, make_ctx(client_ip=f"10.0.{i // 250}.{i % 250}")) is None
    clock.advance(1)
    assert hit(plugin, make_ctx(client_ip="10.9.9.9")) is None
    assert hit(plugin, make_ctx(client_ip="10.9.9.8")) is None  # 102 keys > 100: sweep
    assert plugin.limiter.table is not None and len(plugin.limiter.table) == 2


# ============================================================================ stores
class FakeStore:
    def __init__(self, result: Any = None, up: bool = True) -> None:
        self.result = result
        self.up = up
        self.calls: list[tuple[Any, ...]] = []

    def available(self) -> bool:
        return self.up

    async def run_script(self, script: Any, keys: Any, args: Any, timeout: float) -> Any:
        self.calls.append((keys, args, timeout))
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


def redis_limiter(result: Any, **raw: Any) -> tuple[RateLimitPlugin, FakeStore]:
    plugin, _ = limiter(
        {"requests": 10, "per": "1s", "burst": 4, "store": "redis://r:6379/0", **raw}
    )
    store = FakeStore(result)
    plugin.redis = store  # type: ignore[assignment]
    return plugin, store


async def test_redis_admission_and_headers() -> None:
    plugin, store = redis_limiter([1, 300_000])  # admitted; TAT is 0.3 s ahead
    ctx = make_ctx(route=make_route("api", {"rate_limit": {}}))
    assert await settle(plugin.on_request(ctx)) is None
    ((keys, args, timeout),) = store.calls
    assert keys == ["apigate:rl:api:ip:203.0.113.7"]  # (the default key: consumer, else ip)
    assert args == [100_000, 400_000] and timeout == 0.05
    assert rate_headers(plugin, ctx)["RateLimit-Remaining"] == "2"


async def test_redis_rejection() -> None:
    plugin, _ = redis_limiter([0, 450_000])
    denied = await settle(plugin.on_request(make_ctx()))
    assert denied is not None and denied.status == 429
    assert header(denied, "Retry-After") == "1"


@pytest.mark.parametrize("on_error, expected", [("allow", None), ("deny", 503)])
async def test_store_errors_apply_on_store_error(on_error: str, expected: int | None) -> None:
    plugin, store = redis_limiter(StoreUnavailable("timeout"), on_store_error=on_error)
    outcome = await settle(plugin.on_request(make_ctx()))
    assert (outcome.status if outcome else None) == expected
    store.up = False  # down: answered without calling the store at all
    outcome = plugin.on_request(make_ctx())
    assert outcome is None or isinstance(outcome, Response)
    assert (outcome.status if outcome else None) == expected
    assert len(store.calls) == 1
    if outcome is not None:
        assert body(outcome)["error"] == "rate_limit_unavailable"
        assert header(outcome, "Retry-After") == "1"


async def test_a_garbled_store_answer_is_a_store_error() -> None:
    for garbled in (None, [1], ["x", "y"]):
        plugin, _ = redis_limiter(garbled, on_store_error="deny")
        outcome = await settle(plugin.on_request(make_ctx()))
        assert outcome is not None and outcome.status == 503


def test_store_selection() -> None:
    local, _ = limiter({"requests": 1, "per": "1s"})
    assert local.redis is None
    env = make_env(store="redis://127.0.0.1:6399/0")
    follows, _ = limiter({"requests": 1, "per": "1s"}, env)
    assert follows.redis is not None and follows.redis.url == "redis://127.0.0.1:6399/0"
    explicit, _ = limiter({"requests": 1, "per": "1s", "store": "redis"}, env)
    assert explicit.redis is follows.redis  # one client per process and URL
    forced_local, _ = limiter({"requests": 1, "per": "1s", "store": "local"}, env)
    assert forced_local.redis is None


def test_config_errors() -> None:
    def error(raw: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as info:
            build("rate_limit", raw)
        return str(info.value)

    assert "requests: required" in error({"per": "1s"})
    assert "input should be greater than or equal to 1" in error({"requests": 0, "per": "1s"})
    assert "invalid duration" in error({"requests": 1, "per": "soon"})
    assert "invalid key 'cookie:x'" in error({"requests": 1, "per": "1s", "key": "cookie:x"})
    assert "invalid store 'mysql://x'" in error({"requests": 1, "per": "1s", "store": "mysql://x"})
    with_password = error({"requests": 1, "per": "1s", "store": "mysql://u:pw9@x"})
    assert "'mysql://u:[redacted]@x'" in with_password and "pw9" not in with_password
    assert "'redis' needs the top-level store" in error(
        {"requests": 1, "per": "1s", "store": "redis"}
    )
    assert "burts: unknown key; did you mean 'burst'?" in error(
        {"requests": 1, "per": "1s", "burts": 3}
    )


# ============================================================================ security review
def trusting(*cidrs: str) -> PluginEnv:
    """An env whose proxy listener trusts `cidrs` (listeners.proxy.trusted_proxies)."""
    listeners = {"proxy": {"trusted_proxies": list(cidrs)}}
    return PluginEnv(config=GatewayConfig.model_validate({"listeners": listeners}))


def behind(peer: str, forwarded_for: str) -> Ctx:
    return make_ctx(client_ip=peer, forwarded_for=forwarded_for.encode())


def test_key_ip_is_the_client_a_trusted_proxy_names() -> None:
    plugin, _ = limiter({"requests": 1, "per": "1m"}, trusting("10.0.0.0/8", "fd00::/8"))
    for client in ("198.51.100.1", "198.51.100.2", "2001:db8::3"):
        assert hit(plugin, behind("10.0.0.1", client)) is None  # a bucket each
    # the right-most address no trusted proxy wrote; what the client put left of it is ignored
    assert hit(plugin, behind("10.0.0.2", "203.0.113.50, 198.51.100.1, 10.0.0.9")) is not None
    assert hit(plugin, behind("fd00::1", "[2001:db8::3]:443")) is not None
    assert hit(plugin, behind("10.0.0.1", "203.0.113.51, 198.51.100.4")) is None
    # a peer the listener does not trust is the client, whatever it forwards
    assert hit(plugin, behind("192.0.2.1", "198.51.100.6")) is None
    assert hit(plugin, behind("192.0.2.1", "198.51.100.7")) is not None
    assert hit(plugin, make_ctx(client_ip="10.0.0.1")) is None  # the proxy's own request
    assert hit(plugin, make_ctx(client_ip="10.0.0.1")) is not None


def test_key_consumer_falls_back_to_the_client_a_trusted_proxy_names() -> None:
    raw = {"requests": 1, "per": "1m", "key": "consumer"}
    plugin, _ = limiter(raw, trusting("10.0.0.0/8"))
    assert hit(plugin, behind("10.0.0.1", "198.51.100.1")) is None
    assert hit(plugin, behind("10.0.0.1", "198.51.100.2")) is None
    assert hit(plugin, behind("10.0.0.3", "198.51.100.1")) is not None


def test_the_upstreams_ratelimit_headers_go_without_a_decision_to_report() -> None:
    # Redis down with on_store_error: allow admits without a decision: the upstream's own
    # RateLimit-* must not reach the client as if they were the gateway's
    plugin, store = redis_limiter(StoreUnavailable("down"), on_store_error="allow")
    store.up = False
    ctx = make_ctx()
    assert resolve(plugin.on_request(ctx)) is None
    upstream = [(b"RateLimit-Remaining", b"999"), (b"X-A", b"1"), (b"ratelimit-reset", b"9")]
    head = upstream_head([*upstream, (b"RateLimit", b'"default";r=999')])
    plugin.on_response(ctx, head)
    assert head.headers == [(b"X-A", b"1")]
    quiet, _ = limiter({"requests": 1, "per": "1s", "headers": False})
    head = upstream_head(upstream)
    quiet.on_response(make_ctx(), head)
    assert head.headers == upstream  # headers: false leaves the upstream's alone
