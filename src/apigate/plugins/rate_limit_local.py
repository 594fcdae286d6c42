"""The per-request half of the `rate_limit` plugin (apigate.plugins.rate_limit): the bucket
key of a request, GCRA over an in-process table, and the rate-limit headers. Compiled with the
data plane (apigate.buildinfo); the chain calls the limiter's `on_request` and `on_response`
directly, so a local limit costs no interpreted frame per request.

The algorithm and its bound are explained in apigate.plugins.rate_limit. Here, in integer ns:
with the emission interval T and the tolerance τ, a request at `now` is admitted iff
TAT - now ≤ τ, and then TAT ← max(TAT, now) + T. `LocalLimiter` is one window (the common
case, kept to a dict get and a dict set); `WindowsLimiter` is several at once (`windows:`):
it admits only when every window does, and only then moves every window's TAT on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from itertools import islice
from typing import Any, Final

from apigate.http.request import Request
from apigate.plugins.client_address import ClientAddresses
from apigate.plugins.identity import reject
from apigate.plugins.response import Response

_SWEEP_MIN: Final = 10_000  # keys before the first sweep of expired entries
# `ctx.vars` key of a request this limiter refused (what /metrics counts as a rejection)
REJECTED: Final = "rate_limited"
_MAX_KEYS: Final = 1_000_000  # hard cap on the table (then the oldest half is forgotten)
_REMAINING: Final = b"RateLimit-Remaining"
_RESET: Final = b"RateLimit-Reset"
# Kong's per-window pair, `X-RateLimit-Limit-Minute` and `X-RateLimit-Remaining-Minute`
_X_LIMIT: Final = b"X-RateLimit-Limit-"
_X_REMAINING: Final = b"X-RateLimit-Remaining-"

RateHeaders = tuple[tuple[bytes, bytes], ...]


# ============================================================================ keys
KeyFunc = Callable[[Any], str]


def client_ip(ctx: Any, proxies: ClientAddresses | None = None) -> str:
    """The client's address: the one ip_filter resolved (its own trusted_proxies) when it did,
    else the TCP peer, or the client a proxy in `proxies` (the listener's trusted_proxies)
    names for it (apigate.plugins.client_address)."""
    # the typed locals make native dict and Request operations of what would be generic
    # calls on Any
    scratch: dict[str, Any] = ctx.vars
    ip: str | None = scratch.get("client_ip")
    if ip:
        return ip
    req: Request = ctx.request
    forwarded_for = req.forwarded_for
    # None unless the listener trusts the peer (it drops anyone else's X-Forwarded-For): the
    # common case is the peer, with no parsing
    if forwarded_for is None or proxies is None:
        return req.client_ip
    return proxies.client(req.client_ip, forwarded_for)


def _address(proxies: ClientAddresses | None) -> KeyFunc:
    if proxies is None:
        return client_ip

    def key(ctx: Any) -> str:
        return client_ip(ctx, proxies)

    return key


def _consumer(address: KeyFunc) -> KeyFunc:
    def key(ctx: Any) -> str:
        consumer = ctx.consumer
        if consumer is None:
            return "ip:" + address(ctx)  # unauthenticated: limited per address
        name: str = consumer.name
        return name

    return key


def _route(ctx: Any) -> str:
    route = ctx.route
    if route is None:
        return "-"
    name: str = route.name
    return name


def _header(lname: str, address: KeyFunc) -> KeyFunc:
    def key(ctx: Any) -> str:
        value: str | None = ctx.request.header(lname)
        return "h:" + value if value else "ip:" + address(ctx)

    return key


def key_function(spec: str | list[str], proxies: ClientAddresses | None = None) -> KeyFunc:
    """The bucket key of a request for a `key:` setting (ip, consumer, route, header:NAME, or
    a list of them, joined); `proxies` are those trusted to name the client (see client_ip)."""
    parts = [spec] if isinstance(spec, str) else spec
    address = _address(proxies)
    funcs: list[KeyFunc] = []
    for part in parts:
        if part == "ip":
            funcs.append(address)
        elif part == "consumer":
            funcs.append(_consumer(address))
        elif part == "route":
            funcs.append(_route)
        else:
            funcs.append(_header(part.partition(":")[2].lower(), address))
    if len(funcs) == 1:
        return funcs[0]
    return lambda ctx: "\x1f".join([f(ctx) for f in funcs])


# ============================================================================ the limiter
def is_rate_limit_field(name: bytes) -> bool:
    """RateLimit-Limit, -Remaining, -Reset (this gateway's), -Policy, the later drafts' single
    `RateLimit` field, and Kong's per-window `X-RateLimit-Limit-*` / `X-RateLimit-Remaining-*`
    (this gateway's too): whatever a client could read as the gateway's limit."""
    if name[:9].lower() == b"ratelimit":
        return len(name) == 9 or name[9] == 45  # "-"
    lower = name[:22].lower()
    return lower[:18] == b"x-ratelimit-limit-" or lower == b"x-ratelimit-remaining-"


class Window:
    """One window's GCRA settings in ns, and its headers, precomputed where they are few:
    `label` names it in Kong's per-window headers (`Minute`, `30s`)."""

    def __init__(self, *, requests: int, per: float, burst: int, label: str, message: str) -> None:
        per_ns = round(per * 1e9)
        self.interval: int = -(-per_ns // requests)  # ns, rounded up
        self.tolerance: int = burst * self.interval
        self.message = message  # the 429's, when this window refuses
        self.limit_header = (b"RateLimit-Limit", b"%d" % requests)
        self.x_limit_header = (_X_LIMIT + label.encode(), b"%d" % requests)
        self.x_remaining_name = _X_REMAINING + label.encode()
        self.remaining_cache = [(_REMAINING, b"%d" % n) for n in range(min(burst + 2, 1024))]
        self.x_remaining_cache = [
            (self.x_remaining_name, b"%d" % n) for n in range(len(self.remaining_cache))
        ]
        longest = -(-(self.tolerance + self.interval) // 1_000_000_000) + 1
        self.reset_cache = [(_RESET, b"%d" % n) for n in range(min(longest, 4096))]

    def remaining(self, behind: int) -> int:
        """The requests admissible right now with the TAT `behind` ns ahead."""
        return max(0, (self.tolerance - behind) // self.interval + 1)

    def remaining_header(self, remaining: int) -> tuple[bytes, bytes]:
        # Both values are small and bounded, so their headers are built once (formatting two
        # ints as bytes per response cost ~0.5 µs, a third of the plugin's whole cost).
        cache = self.remaining_cache
        return cache[remaining] if remaining < len(cache) else (_REMAINING, b"%d" % remaining)

    def x_remaining_header(self, remaining: int) -> tuple[bytes, bytes]:
        cache = self.x_remaining_cache
        if remaining < len(cache):
            return cache[remaining]
        return (self.x_remaining_name, b"%d" % remaining)

    def reset_header(self, behind: int) -> tuple[bytes, bytes]:
        """`RateLimit-Reset`: the seconds until the window's allowance is whole again."""
        reset = -(-behind // 1_000_000_000)  # ceil, in ints
        cache = self.reset_cache
        return cache[reset] if reset < len(cache) else (_RESET, b"%d" % reset)

    def retry_after(self, behind: int) -> int:
        """The seconds until a request refused `behind` ns behind would be admitted."""
        return max(1, math.ceil((behind - self.tolerance) / 1e9))


def own_headers(head: Any) -> list[tuple[bytes, bytes]]:
    """The response's headers, without the upstream's own rate-limit fields (they would
    contradict the gateway's): only names starting with R/r or X/x pay for the comparison."""
    headers: list[tuple[bytes, bytes]] = head.headers
    for name, _ in headers:
        # `| 32` lower-cases the first byte: 114 is "r", 120 "x"
        if name and name[0] | 32 in (114, 120) and is_rate_limit_field(name):
            headers = [h for h in headers if not is_rate_limit_field(h[0])]
            head.headers = headers
            break
    return headers


def _forget(table: dict[str, Any], stale: list[str]) -> int:
    """Drop the `stale` keys of a limiter's table, and its oldest half past _MAX_KEYS; the
    table size at which the next sweep comes."""
    for key in stale:
        del table[key]
    if len(table) > _MAX_KEYS:
        for key in list(islice(table, len(table) // 2)):
            del table[key]
    return max(2 * len(table), _SWEEP_MIN)


class LocalLimiter:
    """One window's limiter: its settings, its table of TATs (bound on the first request, see
    `bind`) and its headers, precomputed where they are few."""

    def __init__(
        self,
        *,
        window: Window,
        key: str | list[str],
        headers: bool,
        kong_headers: bool,
        bind: Callable[[Any], dict[str, int]],
        proxies: ClientAddresses | None = None,
    ) -> None:
        self.window = window
        # Kong's X-RateLimit-*-<W> pair too (`windows:`, not the single form: formatting two
        # more header lines into every response head measured +2,200 instructions per
        # request, +2.6%, on bench/micro.py --config plugins, compiled, under callgrind)
        self.kong_headers = kong_headers
        self.interval: int = window.interval
        self.tolerance: int = window.tolerance
        # the proxies trusted to name the client (listeners.proxy.trusted_proxies), or None
        self.proxies = proxies
        self.key_of = key_function(key, proxies)
        self.by_ip = key == "ip"  # the default key, called natively rather than through key_of
        self.headers = headers
        self.message = window.message
        # the table of this limiter's settings and scope, found on the first request (it is
        # shared with the same limiter of earlier snapshots: counters survive reloads)
        self.bind = bind
        self.table: dict[str, int] | None = None
        self.sweep_at = _SWEEP_MIN
        self.clock: Callable[[], int] = time.monotonic_ns  # replaceable in tests
        # The headers of a request that found its bucket empty (behind == interval): every
        # request of a client slower than the limit, so they are built once, not per response.
        self.idle_headers = self.rate_headers(self.interval)

    def on_request(self, ctx: Any) -> Response | None:
        """The plugin's `on_request` hook (local store)."""
        key = client_ip(ctx, self.proxies) if self.by_ip else self.key_of(ctx)
        table = self.table
        if table is None:
            table = self.table = self.bind(ctx)
        now = self.clock()
        tat = table.get(key, now)
        if tat < now:
            tat = now
        behind = tat - now
        if behind > self.tolerance:
            return self.reject(ctx, behind)
        table[key] = tat + self.interval
        if len(table) > self.sweep_at:
            self.sweep(table, now)
        scratch: dict[str, Any] = ctx.vars
        scratch["rate_limit"] = behind + self.interval
        return None

    def on_response(self, ctx: Any, head: Any) -> None:
        """The plugin's `on_response` hook (both stores): this request's rate-limit headers,
        in place of any the upstream sent."""
        if not self.headers:
            return
        headers = own_headers(head)
        scratch: dict[str, Any] = ctx.vars
        behind: int | None = scratch.get("rate_limit")
        if behind is None:
            # No decision to report (a Redis store down with `on_store_error: allow`): the
            # upstream's headers are gone all the same, or the client would take them for
            # the gateway's limit.
            return
        headers.extend(self.idle_headers if behind == self.interval else self.rate_headers(behind))

    def rate_headers(self, behind: int) -> RateHeaders:
        w = self.window
        remaining = w.remaining(behind)
        if not self.kong_headers:
            return (w.limit_header, w.remaining_header(remaining), w.reset_header(behind))
        return (
            w.limit_header,
            w.remaining_header(remaining),
            w.reset_header(behind),
            w.x_limit_header,
            w.x_remaining_header(remaining),
        )

    def reject(self, ctx: Any, behind: int) -> Response:
        """The 429 for a request `behind` ns behind its bucket."""
        scratch: dict[str, Any] = ctx.vars
        scratch[REJECTED] = True
        headers = [(b"Retry-After", b"%d" % self.window.retry_after(behind))]
        if self.headers:
            headers.extend(self.rate_headers(behind))
        return reject(ctx, 429, "rate_limited", self.message, headers)

    def sweep(self, table: dict[str, int], now: int) -> None:
        """Forget the keys whose bucket is empty again (and the oldest half past _MAX_KEYS)."""
        self.sweep_at = _forget(table, [k for k, tat in table.items() if tat <= now])


class WindowsLimiter:
    """Several windows over one key (`windows:`), each its own GCRA: a request is admitted
    only when every window admits it, and only then is every window's TAT moved on, so a
    refused request consumes nothing anywhere. The table maps a key to its TATs, one per
    window in `windows` order."""

    def __init__(
        self,
        *,
        windows: list[Window],
        key: str | list[str],
        headers: bool,
        bind: Callable[[Any], dict[str, list[int]]],
        proxies: ClientAddresses | None = None,
    ) -> None:
        self.windows = windows
        self.proxies = proxies
        self.key_of = key_function(key, proxies)
        self.by_ip = key == "ip"
        self.headers = headers
        self.bind = bind
        self.table: dict[str, list[int]] | None = None
        self.sweep_at = _SWEEP_MIN
        self.clock: Callable[[], int] = time.monotonic_ns  # replaceable in tests
        # As LocalLimiter's: the headers of a request that found every window empty, built
        # once (a client slower than every limit gets them on every response).
        self.idle_behinds = [w.interval for w in windows]
        self.idle_headers = tuple(self.rate_headers(self.idle_behinds))

    def on_request(self, ctx: Any) -> Response | None:
        """The plugin's `on_request` hook (local store)."""
        key = client_ip(ctx, self.proxies) if self.by_ip else self.key_of(ctx)
        table = self.table
        if table is None:
            table = self.table = self.bind(ctx)
        now = self.clock()
        windows = self.windows
        tats = table.get(key)
        if tats is None:
            tats = [now] * len(windows)
        # check every window first, then update them all: a refusal must not consume
        behinds: list[int] = []  # each window's TAT - now once this request is admitted
        for tat, window in zip(tats, windows, strict=True):
            behind = tat - now if tat > now else 0
            if behind > window.tolerance:
                return self.reject(ctx, [t - now if t > now else 0 for t in tats])
            behinds.append(behind + window.interval)
        table[key] = [now + behind for behind in behinds]
        if len(table) > self.sweep_at:
            self.sweep(table, now)
        scratch: dict[str, Any] = ctx.vars
        scratch["rate_limit"] = behinds
        return None

    def on_response(self, ctx: Any, head: Any) -> None:
        """The plugin's `on_response` hook (both stores): as LocalLimiter's, for every window."""
        if not self.headers:
            return
        headers = own_headers(head)
        scratch: dict[str, Any] = ctx.vars
        behinds: list[int] | None = scratch.get("rate_limit")
        if behinds is None:
            return  # no decision to report (see LocalLimiter.on_response)
        headers.extend(
            self.idle_headers if behinds == self.idle_behinds else self.rate_headers(behinds)
        )

    def rate_headers(self, behinds: list[int]) -> list[tuple[bytes, bytes]]:
        """`RateLimit-*` of the window closest to refusing (the fewest remaining; on a tie the
        longest reset), then every window's `X-RateLimit-Limit-*` / `-Remaining-*` pair."""
        windows = self.windows
        remainings = [w.remaining(behinds[i]) for i, w in enumerate(windows)]
        closest = 0
        for i in range(1, len(windows)):
            fewer = remainings[i] < remainings[closest]
            if fewer or (remainings[i] == remainings[closest] and behinds[i] > behinds[closest]):
                closest = i
        w = windows[closest]
        headers = [
            w.limit_header,
            w.remaining_header(remainings[closest]),
            w.reset_header(behinds[closest]),
        ]
        for i, w in enumerate(windows):
            headers.append(w.x_limit_header)
            headers.append(w.x_remaining_header(remainings[i]))
        return headers

    def reject(self, ctx: Any, behinds: list[int]) -> Response:
        """The 429 for a request whose TATs are `behinds` ns ahead: `Retry-After` is when every
        refusing window admits again, and the message names the window that refuses longest."""
        scratch: dict[str, Any] = ctx.vars
        scratch[REJECTED] = True
        retry = 0
        message = ""
        for i, window in enumerate(self.windows):
            if behinds[i] > window.tolerance and window.retry_after(behinds[i]) > retry:
                retry = window.retry_after(behinds[i])
                message = window.message
        headers = [(b"Retry-After", b"%d" % retry)]
        if self.headers:
            headers.extend(self.rate_headers(behinds))
        return reject(ctx, 429, "rate_limited", message, headers)

    def sweep(self, table: dict[str, list[int]], now: int) -> None:
        """Forget the keys whose every window is empty again (and the oldest half past
        _MAX_KEYS)."""
        self.sweep_at = _forget(table, [k for k, tats in table.items() if max(tats) <= now])
