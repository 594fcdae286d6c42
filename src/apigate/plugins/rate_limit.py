"""Rate limiting (`rate_limit`) with GCRA, in process or shared through Redis.

The algorithm is GCRA (the generic cell rate algorithm, a leaky bucket kept as one timestamp).
Each key has a theoretical arrival time TAT. With the emission interval T = ⌈per / requests⌉
and the tolerance τ = burst · T, a request at time t is admitted iff TAT - t ≤ τ; then
TAT ← max(TAT, t) + T. The exact bound:

    over any window [t, t + per), at most `requests + burst` requests are admitted,
    and at most `burst + 1` of them at the same instant.

Why: if requests k..n are admitted inside the window, each admission pushed TAT on by T, so
t_n ≥ TAT_before_n - τ ≥ t_k + (n - k)·T - τ, hence (n - k)·T < per + τ and
n - k + 1 ≤ requests + burst. A fixed-window counter admits 2 x requests around a window
edge; here a client that spent its allowance at the end of one window finds no fresh one at
the start of the next. (A closed window [t, t + per] can hold one more, at its far edge.)
Times are integers (ns locally, µs in Redis) so the comparison is exact, and T is rounded up
so the rounding can only make the limit stricter.

Headers: `RateLimit-Limit` (requests), `RateLimit-Remaining` (admissible right now),
`RateLimit-Reset` (seconds until the allowance is whole again) on proxied responses and 429s,
plus `Retry-After` on a 429.

Stores. `local` (the default): a dict key → TAT in this process; the hot path is a clock read,
a dict get and a dict set, with no await, compiled with the data plane
(apigate.plugins.rate_limit_local). `redis`: one Lua script (below) does the whole
check-and-update atomically on the Redis server, with Redis's clock, so N gateway processes
share one limit exactly. A Redis call waits at most `store_timeout`; a failure applies
`on_store_error` (`allow`: pass without limiting, `deny`: 503) and the store stays "down",
answering without I/O, until a probe succeeds (see `apigate.store.redis`).

Local counters live in `env.shared`, so they survive config reloads with the same settings
(other settings start a fresh table). Redis counters keep their key across a change of
settings; the script brings a TAT left by a stricter limit back within the new one's reach, so
a raised limit takes effect at once there too.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import Field, field_validator

from apigate.config.errors import located_error
from apigate.config.units import PositiveDuration, format_duration
from apigate.http.headers import is_token
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.client_address import ClientAddresses
from apigate.plugins.identity import StrictPluginConfig, reject
from apigate.plugins.rate_limit_local import LocalLimiter, Window
from apigate.redaction import redact_url
from apigate.store.redis import RedisStore, Script, StoreUnavailable, shared_redis

# KEYS[1] = bucket; ARGV = emission interval T (µs), tolerance τ (µs).
# Returns {admitted (1/0), TAT - now in µs (after the update when admitted)}.
# Under one setting TAT never runs more than τ + T ahead of now (a request is admitted only
# when TAT - now ≤ τ, then TAT moves on by T), so a TAT further ahead was written under a
# stricter setting (or by a node still running it): it is brought back to now + τ + T, and a
# raised limit takes effect within one new interval instead of when the old TAT runs out.
# (The local store keys its table by the settings instead; here a clamp keeps the key, so a
# change that does not touch the limit, nodes mid-rollout, or a lowered limit keep the
# client's usage, and no key of an old setting lingers.)
GCRA_SCRIPT = Script("""
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tat = tonumber(redis.call('GET', KEYS[1])) or now
if tat < now then tat = now end
if tat - now > tolerance + interval then
  tat = now + tolerance + interval
  redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
end
if tat - now > tolerance then
  return {0, tat - now}
end
tat = tat + interval
redis.call('SET', KEYS[1], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
return {1, tat - now}
""")


class RateLimitConfig(StrictPluginConfig):
    requests: int = Field(ge=1)
    per: PositiveDuration
    burst: int = Field(default=0, ge=0)
    key: str | list[str] = "consumer"  # (as Kong's limit_by: the address when none is known)
    store: str | None = None  # None: the gateway's `store`; local | redis | redis://...
    store_timeout: PositiveDuration = 0.05
    on_store_error: Literal["allow", "deny"] = "allow"
    headers: bool = True

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str | list[str]) -> str | list[str]:
        parts = [value] if isinstance(value, str) else value
        if not parts:
            raise ValueError("give at least one of ip, consumer, route, header:NAME")
        for part in parts:
            kind, _, header = part.partition(":")
            if part in ("ip", "consumer", "route"):
                continue
            if kind == "header" and is_token(header):
                continue
            raise ValueError(f"invalid key {part!r}: use ip, consumer, route or header:NAME")
        return value

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str | None) -> str | None:
        if value is None or value in ("local", "memory", "redis"):
            return value
        if value.startswith(("redis://", "rediss://")):
            return value
        raise ValueError(
            f"invalid store {redact_url(value)!r}: use local, redis or redis://host:6379/0"
        )


def redis_url(cfg: RateLimitConfig, top_level: str) -> str | None:
    """The Redis URL this limiter uses, or None for the in-process store.

    Raises a located error (relative to the plugin's config): `build_plugin` prefixes the
    plugin's path in the file, which only it knows (global or a route's)."""
    top_is_redis = top_level.startswith(("redis://", "rediss://"))
    if cfg.store is None:
        return top_level if top_is_redis else None
    if cfg.store in ("local", "memory"):
        return None
    if cfg.store == "redis":
        if not top_is_redis:
            problem = (
                "'redis' needs the top-level store to be redis://host:port/db "
                "(or give the URL here)"
            )
            raise located_error(type(cfg).__name__, [(("store",), problem)])
        return top_level
    return cfg.store


# ============================================================================ the plugin
class RateLimitPlugin(Plugin):
    name = "rate_limit"
    priority = 910
    Config = RateLimitConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, RateLimitConfig)
        self.cfg = config
        per = format_duration(config.per)
        # the `ip` key's client behind the proxies the listener trusts (client_address)
        trusted = env.config.listeners.proxy.trusted_proxies
        window = Window(
            requests=config.requests,
            per=config.per,
            burst=config.burst,
            message=f"rate limit exceeded: {config.requests} requests per {per}",
        )
        self.limiter = LocalLimiter(
            window=window,
            key=config.key,
            headers=config.headers,
            bind=self._bind,
            proxies=ClientAddresses(trusted) if trusted else None,
        )
        per_us = round(config.per * 1e6)
        self.interval_us = -(-per_us // config.requests)
        self.tolerance_us = config.burst * self.interval_us
        self._signature = json.dumps(config.model_dump(mode="json"), sort_keys=True)
        self._prefix = ""
        url = redis_url(config, env.config.store)
        self.redis: RedisStore | None = (
            shared_redis(env.shared, url, timeout=config.store_timeout) if url else None
        )
        # The hooks are the compiled limiter's own methods, called by the chain with no
        # interpreted frame in between (timed in place, both hooks: ~1.1 µs per request
        # interpreted, ~0.5 compiled); only the Redis store answers from here.
        self.on_request: Callable[[Any], Any] = (
            self.limiter.on_request if self.redis is None else self._remote
        )
        self.on_response = self.limiter.on_response

    @property
    def clock(self) -> Callable[[], int]:
        """The local store's clock (integer ns; tests replace it)."""
        return self.limiter.clock

    @clock.setter
    def clock(self, clock: Callable[[], int]) -> None:
        self.limiter.clock = clock

    async def start(self) -> None:
        """Open a first Redis connection now, so the first request does not pay for it."""
        if self.redis is not None:
            # a failure is logged by the store; requests apply on_store_error until it is back
            with contextlib.suppress(StoreUnavailable):
                await self.redis.call("PING", timeout=max(1.0, self.cfg.store_timeout))

    # ------------------------------------------------------------------ local store
    def _bind(self, ctx: Any) -> dict[str, int]:
        """First request: find this limiter's table (shared with the same limiter of earlier
        snapshots) and the key prefix. A route's own `rate_limit` is scoped to the route; the
        global one (a route without its own) is shared by every route."""
        route = ctx.route
        own = route is not None and "rate_limit" in route.config.plugins
        scope = route.name if own else "*"
        self._prefix = f"apigate:rl:{scope}:"
        table: dict[str, int] = self.env.shared.setdefault(
            f"rate_limit:{scope}:{self._signature}", {}
        )
        return table

    # ------------------------------------------------------------------ redis store
    def _remote(self, ctx: Any) -> Any:
        """The `on_request` hook with the Redis store."""
        assert self.redis is not None
        if not self._prefix:
            self._bind(ctx)
        if not self.redis.available():
            return self._store_error(ctx)
        return self._remote_check(ctx, self._prefix + self.limiter.key_of(ctx))

    async def _remote_check(self, ctx: Any, key: str) -> Response | None:
        assert self.redis is not None
        try:
            result = await self.redis.run_script(
                GCRA_SCRIPT,
                [key],
                [self.interval_us, self.tolerance_us],
                timeout=self.cfg.store_timeout,
            )
            admitted, behind_us = int(result[0]), int(result[1])
        except (StoreUnavailable, TypeError, ValueError, IndexError):
            return self._store_error(ctx)
        behind = behind_us * self.limiter.interval // self.interval_us  # µs -> local ns units
        if not admitted:
            return self.limiter.reject(ctx, behind)
        ctx.vars["rate_limit"] = behind
        return None

    def _store_error(self, ctx: Any) -> Response | None:
        if self.cfg.on_store_error == "allow":
            return None
        return reject(
            ctx,
            503,
            "rate_limit_unavailable",
            "the rate limit store is unavailable",
            [(b"Retry-After", b"1")],
        )

    def __repr__(self) -> str:
        where = repr(self.redis) if self.redis is not None else "local"
        return (
            f"<RateLimitPlugin {self.cfg.requests}/{format_duration(self.cfg.per)} "
            f"burst={self.cfg.burst} key={self.cfg.key} {where}>"
        )
