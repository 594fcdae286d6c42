"""The compiled half of the rate_limit plugin: keys, the table it binds once, and its headers.
GCRA's bound and the plugin's behaviour as a whole are in test_plugin_rate_limit.py."""

from __future__ import annotations

from typing import Any

from apigate.config.schema import ConsumerConfig
from apigate.plugins.base import Response
from apigate.plugins.chain import PluginChain
from apigate.plugins.client_address import ClientAddresses
from apigate.plugins.rate_limit_local import (
    LocalLimiter,
    Window,
    is_rate_limit_field,
    key_function,
)
from tests.unit.test_plugin_fakes import build, make_ctx, make_route, upstream_head

S = 1_000_000_000  # ns per second


def local_limiter(
    requests: int = 2, per: float = 1.0, burst: int = 0, **overrides: Any
) -> tuple[LocalLimiter, list[dict[str, int]]]:
    tables: list[dict[str, int]] = []

    def bind(ctx: Any) -> dict[str, int]:
        tables.append({})
        return tables[-1]

    window = Window(requests=requests, per=per, burst=burst, label="W", message="slow down")
    settings: dict[str, Any] = {
        "window": window,
        "key": "ip",
        "headers": True,
        "kong_headers": False,
        "bind": bind,
        **overrides,
    }
    limiter = LocalLimiter(**settings)
    limiter.clock = lambda: 1000 * S
    return limiter, tables


def test_the_table_is_bound_once_on_the_first_request() -> None:
    limiter, tables = local_limiter(requests=10, burst=5)
    assert limiter.table is None
    for _ in range(3):
        assert limiter.on_request(make_ctx()) is None
    assert len(tables) == 1 and limiter.table is tables[0]
    assert tables[0] == {"203.0.113.7": 1000 * S + 3 * (S // 10)}


def test_a_full_bucket_is_a_429_with_retry_after_and_headers() -> None:
    limiter, _ = local_limiter(requests=2, per=10.0)
    ctx = make_ctx()
    assert limiter.on_request(ctx) is None
    assert ctx.vars["rate_limit"] == 5 * S
    denied = limiter.on_request(make_ctx())
    assert isinstance(denied, Response) and denied.status == 429
    assert denied.headers == [
        (b"Retry-After", b"5"),
        (b"RateLimit-Limit", b"2"),
        (b"RateLimit-Remaining", b"0"),
        (b"RateLimit-Reset", b"5"),
    ]


def test_headers_replace_the_upstreams_and_are_absent_when_off() -> None:
    limiter, _ = local_limiter()
    ctx = make_ctx()
    assert limiter.on_request(ctx) is None
    upstream = [(b"RateLimit-Limit", b"9"), (b"X-A", b"1"), (b"rATELIMIT-x", b"2")]
    head = upstream_head([*upstream, (b"x-ratelimit-remaining-minute", b"7")])
    limiter.on_response(ctx, head)
    assert head.headers == [
        (b"X-A", b"1"),
        (b"RateLimit-Limit", b"2"),
        (b"RateLimit-Remaining", b"0"),
        (b"RateLimit-Reset", b"1"),
    ]
    quiet, _ = local_limiter(headers=False)
    assert quiet.on_request(ctx) is None
    head = upstream_head([(b"X-A", b"1")])
    quiet.on_response(ctx, head)
    assert head.headers == [(b"X-A", b"1")]


def test_values_beyond_the_precomputed_headers_are_formatted() -> None:
    limiter, _ = local_limiter(requests=1, per=10_000.0, burst=2000)
    window = limiter.window
    assert len(window.remaining_cache) == 1024 and len(window.reset_cache) == 4096
    assert len(window.x_remaining_cache) == 1024
    assert limiter.rate_headers(limiter.interval) == (
        (b"RateLimit-Limit", b"1"),
        (b"RateLimit-Remaining", b"2000"),
        (b"RateLimit-Reset", b"10000"),
    )
    limiter.kong_headers = True
    assert limiter.rate_headers(limiter.interval)[3:] == (
        (b"X-RateLimit-Limit-W", b"1"),
        (b"X-RateLimit-Remaining-W", b"2000"),
    )


def test_kong_headers_add_the_windows_pair() -> None:
    """`windows:` with one entry: the single form's limiter, plus Kong's pair."""
    limiter, _ = local_limiter(requests=2, per=10.0, burst=1, kong_headers=True)
    ctx = make_ctx()
    assert limiter.on_request(ctx) is None
    head = upstream_head([(b"X-RateLimit-Limit-W", b"9")])
    limiter.on_response(ctx, head)
    assert head.headers == [
        (b"RateLimit-Limit", b"2"),
        (b"RateLimit-Remaining", b"1"),
        (b"RateLimit-Reset", b"5"),
        (b"X-RateLimit-Limit-W", b"2"),
        (b"X-RateLimit-Remaining-W", b"1"),
    ]
    assert limiter.on_request(make_ctx()) is None
    denied = limiter.on_request(make_ctx())
    assert isinstance(denied, Response) and denied.headers[-2:] == [
        (b"X-RateLimit-Limit-W", b"2"),
        (b"X-RateLimit-Remaining-W", b"0"),
    ]


def test_key_functions() -> None:
    alice = make_ctx(client_ip="10.0.0.1", headers=[("X-Tenant", "t1")], route=make_route("a"))
    alice.consumer = ConsumerConfig(name="alice")
    anonymous = make_ctx(client_ip="10.0.0.2")
    anonymous.vars["client_ip"] = "198.51.100.9"  # resolved by ip_filter
    assert key_function("ip")(anonymous) == "198.51.100.9"
    assert key_function("consumer")(alice) == "alice"
    assert key_function("consumer")(anonymous) == "ip:198.51.100.9"
    assert key_function("route")(alice) == "a"
    assert key_function("route")(anonymous) == "-"
    assert key_function("header:X-Tenant")(alice) == "h:t1"
    assert key_function("header:X-Tenant")(anonymous) == "ip:198.51.100.9"
    assert key_function(["consumer", "route"])(alice) == "alice\x1fa"


def test_the_chain_calls_the_compiled_hooks_directly() -> None:
    plugin = build("rate_limit", {"requests": 1, "per": "1s"})
    chain = PluginChain([plugin])
    assert chain.request_hooks == [plugin.limiter.on_request]
    assert chain.response_hooks == [plugin.limiter.on_response]


# ============================================================================ security review
def test_key_functions_name_the_client_behind_trusted_proxies() -> None:
    proxies = ClientAddresses(["10.0.0.0/8"])
    lb = make_ctx(client_ip="10.0.0.1", forwarded_for=b"203.0.113.1, 198.51.100.9, 10.0.0.7")
    lb.request.headers = [(b"X-Tenant", b"")]
    assert key_function("ip", proxies)(lb) == "198.51.100.9"
    assert key_function("consumer", proxies)(lb) == "ip:198.51.100.9"
    assert key_function("header:X-Tenant", proxies)(lb) == "ip:198.51.100.9"
    assert key_function("ip")(lb) == "10.0.0.1"  # no trusted proxies: the peer
    direct = make_ctx(client_ip="192.0.2.1", forwarded_for=b"198.51.100.9")
    assert key_function("ip", proxies)(direct) == "192.0.2.1"
    limiter, tables = local_limiter(proxies=proxies)
    assert limiter.on_request(lb) is None
    assert list(tables[0]) == ["198.51.100.9"]


def test_the_upstreams_headers_go_even_with_no_decision_to_report() -> None:
    limiter, _ = local_limiter()
    head = upstream_head([(b"RateLimit-Remaining", b"999"), (b"X-A", b"1"), (b"RateLimit", b"x")])
    limiter.on_response(make_ctx(), head)  # on_request set no `rate_limit` for this exchange
    assert head.headers == [(b"X-A", b"1")]
    names = [b"ratelimit-policy", b"RATELIMIT", b"RateLimits", b"Retry-After", b"Referer"]
    assert [n for n in names if is_rate_limit_field(n)] == [b"ratelimit-policy", b"RATELIMIT"]
    # Kong's per-window family (which the gateway sends too); GitHub's unsuffixed names pass
    kong = [b"X-RateLimit-Limit-Minute", b"x-ratelimit-remaining-30s", b"X-RateLimit-Limit"]
    kong += [b"X-RateLimit-Remaining", b"X-RateLimit-Reset", b"X-Request-Id"]
    assert [n for n in kong if is_rate_limit_field(n)] == kong[:2]
