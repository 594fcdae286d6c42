"""Rate limiting (`rate_limit`) with GCRA, in process or shared through Redis.

The algorithm is GCRA (the generic cell rate algorithm, a leaky bucket kept as one timestamp).
Each key has a theoretical arrival time TAT. With the emission interval T = ⌈per / requests⌉
and the tolerance τ = burst · T, a request at time t is admitted iff TAT - t ≤ τ; then
TAT ← max(TAT, t) + T.

Several windows (`windows:`, Kong's second/minute/hour/day at once) are one GCRA each, with
its own T, τ and TAT per key: a request is admitted iff every window admits it, and then every
window's TAT moves on; a refused request moves none (all are checked before any is updated).
The single form (`requests`, `per`, `burst`) is one window. The exact bound, for each window:

    over any span [t, t + per) of the window's `per`, at most its `requests + burst` requests
    are admitted, and at most its `burst + 1` of them at the same instant.

Why: if requests k..n are admitted inside the span, each admission pushed the window's TAT on
by its T (whatever the other windows did: its TAT moves on exactly the admitted requests, and
each of them passed its check), so t_n ≥ TAT_before_n - τ ≥ t_k + (n - k)·T - τ, hence
(n - k)·T < per + τ and n - k + 1 ≤ requests + burst. A fixed-window counter admits
2 x requests around a window edge; here a client that spent its allowance at the end of one
window finds no fresh one at the start of the next. (A closed span [t, t + per] can hold one
more, at its far edge.) Times are integers (ns locally, µs in Redis) so the comparison is
exact, and T is rounded up so the rounding can only make the limit stricter.

Headers, on proxied responses and 429s: `RateLimit-Limit` (requests), `RateLimit-Remaining`
(admissible right now), `RateLimit-Reset` (seconds until the allowance is whole again) of the
window closest to refusing (the fewest remaining; on a tie the longest reset); with `windows:`
Kong's `X-RateLimit-Limit-<W>` / `X-RateLimit-Remaining-<W>` for every window too (<W>: Second,
Minute, Hour, Day, else the duration as the file writes it: `30s`); plus `Retry-After` on a
429: the time until every refusing window admits again.

Stores. `local` (the default): a dict key → TAT in this process (key → one TAT per window
with several); the hot path of one window is a clock read, a dict get and a dict set, with no
await, compiled with the data plane (apigate.plugins.rate_limit_local). `redis`: one Lua script
(below) does the whole check-and-update of every window atomically on the Redis server, with
Redis's clock, so N gateway processes share one limit exactly. A Redis call waits at most
`store_timeout`; a failure applies `on_store_error` (`allow`: pass without limiting, `deny`:
503) and the store stays "down", answering without I/O, until a probe succeeds (see
`apigate.store.redis`).

Local counters live in `env.shared`, so they survive config reloads with the same settings
(other settings start a fresh table). Redis counters keep their key across a change of
settings; the script brings a TAT left by a stricter limit back within the new one's reach, so
a raised limit takes effect at once there too. (With several windows a window's key names its
`per`: a changed `per` is a new key, and so is going from one window to several.)
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, Literal
from urllib.parse import quote

from pydantic import ConfigDict, Field, field_validator, model_validator

from apigate.config.errors import Loc, located_error
from apigate.config.schema import StrictModel
from apigate.config.units import PositiveDuration, format_duration
from apigate.http.headers import is_token
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.client_address import ClientAddresses
from apigate.plugins.identity import StrictPluginConfig, reject
from apigate.plugins.rate_limit_local import LocalLimiter, Window, WindowsLimiter
from apigate.redaction import redact_url
from apigate.store.redis import RedisStore, Script, StoreUnavailable, shared_redis

# KEYS = one bucket per window; ARGV = each window's emission interval T (µs) and tolerance τ
# (µs), in KEYS order. Returns {admitted (1/0), then each window's TAT - now in µs (after the
# update when admitted)}. Every window is checked before any is updated, so a request one
# window refuses consumes nothing in the others; one script keeps all of it atomic (the keys
# share a hash tag, hence a slot, so a Redis Cluster takes them in one call too).
# Under one setting TAT never runs more than τ + T ahead of now (a request is admitted only
# when TAT - now ≤ τ, then TAT moves on by T), so a TAT further ahead was written under a
# stricter setting (or by a node still running it): it is brought back to now + τ + T, and a
# raised limit takes effect within one new interval instead of when the old TAT runs out.
# (The local store keys its table by the settings instead; here a clamp keeps the key, so a
# change that does not touch the limit, nodes mid-rollout, or a lowered limit keep the
# client's usage, and no key of an old setting lingers.)
GCRA_SCRIPT = Script("""
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000000 + tonumber(clock[2])
local tats = {}
local admitted = 1
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local tolerance = tonumber(ARGV[2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i])) or now
  if tat < now then tat = now end
  if tat - now > tolerance + interval then
    tat = now + tolerance + interval
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  end
  if tat - now > tolerance then admitted = 0 end
  tats[i] = tat
end
local result = {admitted}
for i = 1, #KEYS do
  local tat = tats[i]
  if admitted == 1 then
    tat = tat + tonumber(ARGV[2 * i - 1])
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX', math.floor((tat - now) / 1000) + 1)
  end
  result[i + 1] = tat - now
end
return result
""")

# Kong's names for its windows in `X-RateLimit-Limit-<name>`; any other `per` is spelt as
# the file would (`30s`, `2h`).
KONG_WINDOW_NAMES = {1.0: "Second", 60.0: "Minute", 3600.0: "Hour", 86400.0: "Day"}


def window_label(per: float) -> str:
    """`Minute` for 1m, `30s` for 30s: the window's name in `X-RateLimit-*-<name>`."""
    return KONG_WINDOW_NAMES.get(per) or str(format_duration(per))


class RateWindow(StrictModel):
    """One window of `windows:`: the same keys, meaning and checks as the single form."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(ge=1)
    per: PositiveDuration
    burst: int = Field(default=0, ge=0)


class RateLimitConfig(StrictPluginConfig):
    # one window (`requests`, `per`, `burst`) or several (`windows`), never both
    requests: int | None = Field(default=None, ge=1)
    per: PositiveDuration | None = None
    burst: int = Field(default=0, ge=0)
    windows: list[RateWindow] | None = None
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

    @model_validator(mode="after")
    def _one_form(self) -> RateLimitConfig:
        problems: list[tuple[Loc, str]] = []
        if self.windows is None:
            missing = [n for n in ("requests", "per") if getattr(self, n) is None]
            problems += [((name,), "required") for name in missing]
        else:
            single = [n for n in ("requests", "per", "burst") if n in self.model_fields_set]
            if single:
                problem = (
                    f"give either windows or {', '.join(single)} (the single window), not both: "
                    "put them in an entry of windows"
                )
                problems.append((("windows",), problem))
            if not self.windows:
                problems.append((("windows",), "give at least one window: {requests, per}"))
            seen: dict[float, int] = {}
            for i, window in enumerate(self.windows):
                if window.per in seen:
                    problem = (
                        f"windows[{seen[window.per]}] has the same per "
                        f"({format_duration(window.per)}): one window per duration"
                    )
                    problems.append((("windows", i, "per"), problem))
                seen.setdefault(window.per, i)
        if problems:
            raise located_error(type(self).__name__, problems)
        return self

    def rate_windows(self) -> list[RateWindow]:
        """Every window, shortest `per` first (the single form is one)."""
        if self.windows is None:
            assert self.requests is not None and self.per is not None
            return [RateWindow(requests=self.requests, per=self.per, burst=self.burst)]
        return sorted(self.windows, key=lambda w: w.per)


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
        self.windows = config.rate_windows()
        windows = [
            Window(
                requests=w.requests,
                per=w.per,
                burst=w.burst,
                label=window_label(w.per),
                message=f"rate limit exceeded: {w.requests} requests per {format_duration(w.per)}",
            )
            for w in self.windows
        ]
        # the `ip` key's client behind the proxies the listener trusts (client_address)
        trusted = env.config.listeners.proxy.trusted_proxies
        proxies = ClientAddresses(trusted) if trusted else None
        # One window (the single form, or `windows` with one entry): the limiter of a dict get
        # and a dict set. Several: one that checks them all before it updates any. Kong's
        # per-window headers come with `windows:` (the form Kong's users write), whatever its
        # length; the single form's responses stay as they were (see LocalLimiter).
        self.limiter: LocalLimiter | WindowsLimiter = (
            LocalLimiter(
                window=windows[0],
                key=config.key,
                headers=config.headers,
                kong_headers=config.windows is not None,
                bind=self._bind,
                proxies=proxies,
            )
            if len(windows) == 1
            else WindowsLimiter(
                windows=windows,
                key=config.key,
                headers=config.headers,
                bind=self._bind,
                proxies=proxies,
            )
        )
        self.local_windows = windows  # the limiter's: ns settings and header bytes
        intervals_us = [-(-round(w.per * 1e6) // w.requests) for w in self.windows]
        self.script_args: list[int] = []  # T and τ (µs) of each window, as GCRA_SCRIPT reads
        for window, interval_us in zip(self.windows, intervals_us, strict=True):
            self.script_args += [interval_us, window.burst * interval_us]
        self.intervals_us = intervals_us
        # The Redis key of a window: the one-window key is the bucket's (as it always was);
        # several windows' keys add their `per` after a hash tag around the bucket. (A "}" in
        # the bucket itself, from a header value, ends the tag early, but at the same place in
        # every window's key: they still share a slot.)
        self.key_suffixes = (
            [""]
            if len(windows) == 1
            else ["}:" + str(format_duration(w.per)) for w in self.windows]
        )
        self._signature = json.dumps(self._settings(), sort_keys=True)
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

    def _settings(self) -> dict[str, Any]:
        """What keys the local table: every setting, with the windows as `rate_windows` gives
        them (so `windows: [one]` shares the single form's table)."""
        settings = self.cfg.model_dump(mode="json", exclude={"requests", "per", "burst", "windows"})
        settings["windows"] = [w.model_dump(mode="json") for w in self.windows]
        return settings

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
    def _bind(self, ctx: Any) -> dict[str, Any]:
        """First request: find this limiter's table (shared with the same limiter of earlier
        snapshots) and the key prefix. A route's own `rate_limit` is scoped to the route; the
        global one (a route without its own) is shared by every route; a consumer's own is
        shared by every route the consumer reaches (as Kong's), and scoped to the consumer:
        `@` and its name, quoted (no route name starts with `@` or holds `:` or `{`), so its
        counters and Redis keys are never a route's or the global limit's."""
        route = ctx.route
        consumer = self.env.consumer
        if consumer is not None:
            scope = "@" + quote(consumer, safe="")
        elif route is not None and "rate_limit" in route.config.plugins:
            scope = route.name
        else:
            scope = "*"
        # several windows: "{" starts the hash tag the key suffixes close (see __init__)
        self._prefix = (
            f"apigate:rl:{scope}:" if len(self.windows) == 1 else f"apigate:rl:{{{scope}:"
        )
        table: dict[str, Any] = self.env.shared.setdefault(
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
        bucket = self._prefix + self.limiter.key_of(ctx)
        return self._remote_check(ctx, [bucket + suffix for suffix in self.key_suffixes])

    async def _remote_check(self, ctx: Any, keys: list[str]) -> Response | None:
        assert self.redis is not None
        try:
            result = await self.redis.run_script(
                GCRA_SCRIPT, keys, self.script_args, timeout=self.cfg.store_timeout
            )
            if len(result) != len(keys) + 1:
                raise ValueError(f"{len(result)} values for {len(keys)} windows")
            admitted = int(result[0])
            # µs -> the local limiter's ns units, interval for interval
            behinds = [
                int(behind_us) * window.interval // interval_us
                for behind_us, window, interval_us in zip(
                    result[1:], self.local_windows, self.intervals_us, strict=True
                )
            ]
        except (StoreUnavailable, TypeError, ValueError, IndexError):
            return self._store_error(ctx)
        limiter = self.limiter
        if isinstance(limiter, LocalLimiter):
            if not admitted:
                return limiter.reject(ctx, behinds[0])
            ctx.vars["rate_limit"] = behinds[0]
            return None
        if not admitted:
            return limiter.reject(ctx, behinds)
        ctx.vars["rate_limit"] = behinds
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
        windows = ", ".join(
            f"{w.requests}/{format_duration(w.per)} burst={w.burst}" for w in self.windows
        )
        return f"<RateLimitPlugin {windows} key={self.cfg.key} {where}>"
