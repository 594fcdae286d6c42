"""The per-request half of the `rate_limit` plugin (apigate.plugins.rate_limit): the bucket
key of a request, GCRA over an in-process table, and the RateLimit-* headers. Compiled with the
data plane (apigate.buildinfo); the chain calls `LocalLimiter.on_request` and `.on_response`
directly, so a local limit costs no interpreted frame per request.

The algorithm and its bound are explained in apigate.plugins.rate_limit. Here, in integer ns:
with the emission interval T and the tolerance τ, a request at `now` is admitted iff
TAT - now ≤ τ, and then TAT ← max(TAT, now) + T.
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
    """RateLimit-Limit, -Remaining, -Reset (this gateway's), -Policy, and the later drafts'
    single `RateLimit` field: whatever a client could read as the gateway's limit."""
    return name[:9].lower() == b"ratelimit" and (len(name) == 9 or name[9] == 45)  # "-"


class Window:
    """One window's GCRA settings in ns, and its headers, precomputed where they are few."""

    def __init__(self, *, requests: int, per: float, burst: int, message: str) -> None:
        per_ns = round(per * 1e9)
        self.interval: int = -(-per_ns // requests)  # ns, rounded up
        self.tolerance: int = burst * self.interval
        self.message = message  # the 429's, when this window refuses
        self.limit_header = (b"RateLimit-Limit", b"%d" % requests)
        self.remaining_cache = [(_REMAINING, b"%d" % n) for n in range(min(burst + 2, 1024))]
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

    def reset_header(self, behind: int) -> tuple[bytes, bytes]:
        """`RateLimit-Reset`: the seconds until the window's allowance is whole again."""
        reset = -(-behind // 1_000_000_000)  # ceil, in ints
        cache = self.reset_cache
        return cache[reset] if reset < len(cache) else (_RESET, b"%d" % reset)

    def retry_after(self, behind: int) -> int:
        """The seconds until a request refused `behind` ns behind would be admitted."""
        return max(1, math.ceil((behind - self.tolerance) / 1e9))


class LocalLimiter:
    """One window's limiter: its settings, its table of TATs (bound on the first request, see
    `bind`) and its headers, precomputed where they are few."""

    def __init__(
        self,
        *,
        window: Window,
        key: str | list[str],
        headers: bool,
        bind: Callable[[Any], dict[str, int]],
        proxies: ClientAddresses | None = None,
    ) -> None:
        self.window = window
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
        headers: list[tuple[bytes, bytes]] = head.headers
        for name, _ in headers:
            # the upstream's own RateLimit-* would contradict ours; `| 32` lower-cases the
            # first byte, so only names starting with R/r pay for the comparison
            if name and name[0] | 32 == 114 and is_rate_limit_field(name):
                headers = [h for h in headers if not is_rate_limit_field(h[0])]
                head.headers = headers
                break
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
        return (w.limit_header, w.remaining_header(remaining), w.reset_header(behind))

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
        for key in [k for k, tat in table.items() if tat <= now]:
            del table[key]
        if len(table) > _MAX_KEYS:
            for key in list(islice(table, len(table) // 2)):
                del table[key]
        self.sweep_at = max(2 * len(table), _SWEEP_MIN)
