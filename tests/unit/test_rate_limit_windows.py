"""Several windows in one `rate_limit` (`windows:`, Kong's second/minute/hour/day): a request is
admitted only when every window admits it, a refused one consumes nothing in any window, and
the headers describe the window closest to refusing plus Kong's pair for every window.

The clock is the plugin's `clock` attribute (integer ns), as in test_plugin_rate_limit.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.config.errors import ConfigError
from apigate.plugins.rate_limit import GCRA_SCRIPT, RateLimitPlugin, window_label
from apigate.plugins.rate_limit_local import LocalLimiter, WindowsLimiter
from tests.unit.test_plugin_fakes import (
    body,
    build,
    header,
    make_ctx,
    make_env,
    make_route,
    settle,
    upstream_head,
)
from tests.unit.test_plugin_rate_limit import Clock, FakeStore, hit

S = 1_000_000_000  # ns per second


def limiter(*windows: dict[str, Any], **raw: Any) -> tuple[RateLimitPlugin, Clock]:
    plugin: RateLimitPlugin = build("rate_limit", {"windows": list(windows), **raw})
    clock = Clock()
    plugin.clock = clock
    return plugin, clock


def all_headers(plugin: RateLimitPlugin, ctx: Any) -> dict[str, str]:
    head = upstream_head([(b"Content-Type", b"text/plain")])
    plugin.on_response(ctx, head)
    return {n.decode(): v.decode() for n, v in head.headers if b"ateLimit" in n}


def statuses(plugin: RateLimitPlugin, n: int) -> list[int]:
    return [getattr(hit(plugin), "status", 200) for _ in range(n)]


# ============================================================================ admission
def test_a_request_is_admitted_only_when_every_window_admits_it() -> None:
    # 2 a second (both at once), 3 a minute (all at once)
    plugin, clock = limiter(
        {"requests": 3, "per": "1m", "burst": 2}, {"requests": 2, "per": "1s", "burst": 1}
    )
    assert isinstance(plugin.limiter, WindowsLimiter)
    assert statuses(plugin, 3) == [200, 200, 429]  # the second refuses, the minute would not
    clock.advance(1)
    assert statuses(plugin, 2) == [200, 429]  # the second admits 2; the minute has 1 left
    clock.advance(1)
    assert statuses(plugin, 1) == [429]  # the second would admit; the minute refuses
    clock.advance(20)  # one minute interval: one more
    assert statuses(plugin, 2) == [200, 429]


def test_a_refused_request_consumes_nothing_in_any_window() -> None:
    # 1 a second, 3 a minute (all at once): hammering inside a second must not eat the minute
    plugin, clock = limiter({"requests": 1, "per": "1s"}, {"requests": 3, "per": "1m", "burst": 2})
    for _ in range(3):
        assert statuses(plugin, 10) == [200] + [429] * 9
        table = plugin.limiter.table
        assert table is not None
        ((key, tats),) = table.items()
        before = list(tats)
        assert statuses(plugin, 5) == [429] * 5
        assert table == {key: before}  # the refusals moved no TAT
        clock.advance(1)
    assert statuses(plugin, 1) == [429]  # the minute's 3 are spent, by the 3 admissions alone


def test_one_window_is_the_single_form_with_kongs_headers() -> None:
    """`windows: [one]` is the single form's limiter and counters, plus Kong's pair (which the
    single form does not send: see LocalLimiter.kong_headers)."""
    env = make_env()
    route = make_route("api", {"rate_limit": {}})
    single: RateLimitPlugin = build("rate_limit", {"requests": 2, "per": "1m", "burst": 1}, env)
    one = {"requests": 2, "per": 60, "burst": 1}
    listed: RateLimitPlugin = build("rate_limit", {"windows": [one]}, env)
    assert isinstance(single.limiter, LocalLimiter) and isinstance(listed.limiter, LocalLimiter)
    clock = Clock()
    single.clock = listed.clock = clock
    ctx = make_ctx(route=route)
    assert hit(single, ctx) is None
    assert sorted(all_headers(single, ctx)) == [
        "RateLimit-Limit",
        "RateLimit-Remaining",
        "RateLimit-Reset",
    ]
    ctx = make_ctx(route=route)
    assert hit(listed, ctx) is None  # the same counters: the second of two
    assert all_headers(listed, ctx) == {
        "RateLimit-Limit": "2",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "60",
        "X-RateLimit-Limit-Minute": "2",
        "X-RateLimit-Remaining-Minute": "0",
    }
    assert hit(single, make_ctx(route=route)) is not None
    assert listed.key_suffixes == [""] and listed.script_args == single.script_args


@settings(max_examples=100, deadline=None)
@given(
    windows=st.lists(
        st.tuples(st.integers(1, 8), st.integers(1, 3000), st.integers(0, 6)),
        min_size=2,
        max_size=3,
        unique_by=lambda w: w[1],
    ),
    arrivals=st.lists(st.integers(0, 8000), min_size=1, max_size=200),
)
def test_every_window_keeps_its_own_bound(
    windows: list[tuple[int, int, int]], arrivals: list[int]
) -> None:
    """Over any [t, t + per) of each window at most its `requests + burst` are admitted."""
    plugin, clock = limiter(
        *({"requests": r, "per": ms / 1000, "burst": b} for r, ms, b in windows)
    )
    start = clock.now
    admitted = []
    for offset_ms in sorted(arrivals):
        clock.now = start + offset_ms * 1_000_000
        if hit(plugin) is None:
            admitted.append(clock.now)
    assert admitted  # the first request always passes
    for requests, per_ms, burst in windows:
        per = per_ms * 1_000_000
        for i, t in enumerate(admitted):
            assert sum(1 for u in admitted[i:] if u < t + per) <= requests + burst


# ============================================================================ headers
def test_headers_describe_the_window_closest_to_refusing() -> None:
    plugin, clock = limiter(
        {"requests": 10, "per": "1s", "burst": 4},  # T = 0.1 s
        {"requests": 4, "per": "1m", "burst": 3},  # T = 15 s
        {"requests": 100, "per": "24h", "burst": 9},
        {"requests": 5, "per": "30s", "burst": 3},  # T = 6 s
    )
    ctx = make_ctx()
    assert hit(plugin, ctx) is None
    assert all_headers(plugin, ctx) == {
        # the fewest remaining: 3 in the 30s window and in the minute; the minute's reset is
        # the longer (15 s against 6 s)
        "RateLimit-Limit": "4",
        "RateLimit-Remaining": "3",
        "RateLimit-Reset": "15",
        "X-RateLimit-Limit-Second": "10",
        "X-RateLimit-Remaining-Second": "4",
        "X-RateLimit-Limit-30s": "5",
        "X-RateLimit-Remaining-30s": "3",
        "X-RateLimit-Limit-Minute": "4",
        "X-RateLimit-Remaining-Minute": "3",
        "X-RateLimit-Limit-Day": "100",
        "X-RateLimit-Remaining-Day": "9",
    }
    clock.advance(2)
    ctx = make_ctx()
    assert hit(plugin, ctx) is None
    second = all_headers(plugin, ctx)
    # 30s: 6 - 2 + 6 = 10 s ahead, (18 - 10) // 6 + 1 = 2 left; minute: 15 - 2 + 15 = 28 s
    # ahead, (45 - 28) // 15 + 1 = 2 left: the minute again, its reset the longer
    assert (second["RateLimit-Limit"], second["RateLimit-Remaining"]) == ("4", "2")
    assert second["RateLimit-Reset"] == "28"
    assert second["X-RateLimit-Remaining-30s"] == "2"
    assert second["X-RateLimit-Remaining-Second"] == "4"


def test_a_tie_goes_to_the_longest_reset_whatever_the_order() -> None:
    # after one request both have 0 left: the 20s window resets in 20 s, the minute in 10 s
    plugin, _ = limiter({"requests": 6, "per": "1m"}, {"requests": 1, "per": "20s"})
    ctx = make_ctx()
    assert hit(plugin, ctx) is None
    headers = all_headers(plugin, ctx)
    assert (headers["RateLimit-Limit"], headers["RateLimit-Reset"]) == ("1", "20")
    assert headers["X-RateLimit-Remaining-Minute"] == headers["X-RateLimit-Remaining-20s"] == "0"


def test_a_429_names_every_refusing_window_in_retry_after() -> None:
    plugin, clock = limiter(
        {"requests": 1, "per": "1s"},
        {"requests": 2, "per": "1m", "burst": 1},  # T = 30 s, both at once
        {"requests": 1, "per": "10s"},
    )
    assert statuses(plugin, 1) == [200]
    denied = hit(plugin)  # the second and the 10s refuse, the minute admits
    assert denied is not None and denied.status == 429
    assert header(denied, "Retry-After") == "10"  # the longest wait of the refusing windows
    assert header(denied, "RateLimit-Limit") == "1"  # 0 left in two; the 10s resets later
    assert header(denied, "RateLimit-Remaining") == "0"
    assert header(denied, "RateLimit-Reset") == "10"
    assert header(denied, "X-RateLimit-Remaining-Minute") == "1"
    assert header(denied, "X-RateLimit-Remaining-Second") == "0"
    assert body(denied)["message"] == "rate limit exceeded: 1 requests per 10s"
    clock.advance(10)
    assert statuses(plugin, 2) == [200, 429]
    denied = hit(plugin)  # now all three refuse; the minute longest (50 s ahead, 30 s of burst)
    assert denied is not None and header(denied, "Retry-After") == "20"
    assert body(denied)["message"] == "rate limit exceeded: 2 requests per 1m"
    assert (header(denied, "RateLimit-Limit"), header(denied, "RateLimit-Reset")) == ("2", "50")


def test_headers_false_turns_all_of_them_off() -> None:
    plugin, _ = limiter({"requests": 1, "per": "1s"}, {"requests": 5, "per": "1m"}, headers=False)
    ctx = make_ctx()
    assert hit(plugin, ctx) is None
    head = upstream_head([(b"X-RateLimit-Limit-Minute", b"9")])
    plugin.on_response(ctx, head)
    assert head.headers == [(b"X-RateLimit-Limit-Minute", b"9")]  # the upstream's, untouched
    denied = hit(plugin)
    assert denied is not None and [n for n, _ in denied.headers if b"ateLimit" in n] == []
    assert header(denied, "Retry-After") == "12"  # both refuse; the minute's T is 12 s


def test_the_upstreams_rate_limit_headers_are_replaced() -> None:
    plugin, _ = limiter({"requests": 1, "per": "1s"}, {"requests": 5, "per": "1m"})
    ctx = make_ctx()
    assert hit(plugin, ctx) is None
    upstream = [(b"x-ratelimit-remaining-minute", b"99"), (b"RateLimit-Limit", b"9")]
    head = upstream_head([*upstream, (b"X-RateLimit-Limit", b"7")])
    plugin.on_response(ctx, head)
    names = [n for n, _ in head.headers]
    assert names[0] == b"X-RateLimit-Limit"  # GitHub's unsuffixed name is not one of ours
    assert b"x-ratelimit-remaining-minute" not in names and names.count(b"RateLimit-Limit") == 1


def test_window_labels() -> None:
    labels = [window_label(p) for p in (1, 60, 3600, 86400, 30, 0.25, 7200, 90, 1.5)]
    assert labels == ["Second", "Minute", "Hour", "Day", "30s", "250ms", "2h", "90s", "1.5s"]


# ============================================================================ Redis
async def test_redis_sends_every_window_in_one_script_call_with_one_hash_tag() -> None:
    plugin: RateLimitPlugin = build(
        "rate_limit",
        {
            "windows": [
                {"requests": 100, "per": "1h", "burst": 5},
                {"requests": 10, "per": "1s", "burst": 4},
            ],
            "store": "redis://r:6379/0",
        },
    )
    store = FakeStore([0, 1_500_000, 36_000_000])  # refused: the second is 1.5 s ahead
    plugin.redis = store  # type: ignore[assignment]
    ctx = make_ctx(route=make_route("api", {"rate_limit": {}}))
    denied = await settle(plugin.on_request(ctx))
    ((keys, args, _),) = store.calls
    assert keys == ["apigate:rl:{api:ip:203.0.113.7}:1s", "apigate:rl:{api:ip:203.0.113.7}:1h"]
    assert args == [100_000, 400_000, 36_000_000, 180_000_000]  # shortest window first
    assert denied is not None and denied.status == 429
    assert header(denied, "Retry-After") == "2"  # 1.5 s - 0.4 s, rounded up
    assert header(denied, "X-RateLimit-Remaining-Hour") == "5"
    assert header(denied, "RateLimit-Limit") == "10"
    store.result = [1, 200_000, 72_000_000]
    ctx = make_ctx(route=make_route("api", {"rate_limit": {}}))
    assert await settle(plugin.on_request(ctx)) is None
    assert all_headers(plugin, ctx)["X-RateLimit-Remaining-Hour"] == "4"
    store.result = [1, 200_000]  # one value short: garbled
    plugin.cfg = plugin.cfg.model_copy(update={"on_store_error": "deny"})
    outcome = await settle(plugin.on_request(make_ctx()))
    assert outcome is not None and outcome.status == 503


def test_the_script_checks_every_window_before_it_updates_any() -> None:
    """(Run on a real Redis in tests/integration/test_security_rate_limit.py.)"""
    source = GCRA_SCRIPT.source
    assert source.index("admitted = 0") < source.index("if admitted == 1 then")


# ============================================================================ config errors
def error(raw: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        build("rate_limit", raw)
    return str(info.value)


def test_config_errors() -> None:
    where = "routes[0].plugins.rate_limit"
    window = {"requests": 1, "per": "1s"}
    both = error({"requests": 5, "per": "1s", "windows": [window]})
    assert both.startswith(f"{where}.windows: give either windows or requests, per ")
    assert "not both" in both
    assert "burst" in error({"burst": 2, "windows": [window]})
    assert error({"windows": []}) == f"{where}.windows: give at least one window: {{requests, per}}"
    same = error({"windows": [window, {"requests": 2, "per": "1m"}, {"requests": 9, "per": 1}]})
    assert (
        same == f"{where}.windows[2].per: windows[0] has the same per (1s): one window per duration"
    )
    assert f"{where}.windows[0].requests: required" in error({"windows": [{"per": "1s"}]})
    assert f"{where}.windows[0].burst: input should be greater than or equal to 0" in error(
        {"windows": [{"requests": 1, "per": "1s", "burst": -1}]}
    )
    assert f"{where}.windows[1].burts: unknown key; did you mean 'burst'?" in error(
        {"windows": [window, {"requests": 1, "per": "1m", "burts": 1}]}
    )
    assert f"{where}.windows[0].per: invalid duration" in error(
        {"windows": [{"requests": 1, "per": "1w"}]}
    )
    neither = error({})
    assert f"{where}.requests: required" in neither and f"{where}.per: required" in neither
    assert f"{where}.windows: input should be a valid list" in error({"windows": window})
