"""The per-request half of the `cache` plugin (apigate.plugins.cache) for the memory store:
a fresh hit answered without leaving native code, compiled with the data plane
(apigate.buildinfo).

The chain calls `MemoryHits.on_request` directly. It answers the usual hit: a GET or HEAD
without Cache-Control, Pragma or a precondition (If-None-Match, If-Modified-Since) whose entry
is in the store, fresh, and (for a request with Authorization) allowed to serve it. Anything
else goes to the plugin's own `on_request` (`full`) as it came: this path has changed nothing
by then (looking an entry up only moves it in the LRU order, as the plugin's lookup does
again), so the plugin decides from the start, with all of RFC 9111 that this path leaves out.

The plugin's `on_response_end` and `on_log` have work only for a request that kept cache
state (a miss, a bypass that may store): a hit skips them here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final

from apigate.http.headers import is_name
from apigate.http.request import Request
from apigate.plugins.cache_store import KEY_SEP, VARIANT_SEP, CacheEntry, MemoryStore
from apigate.plugins.identity import principal
from apigate.plugins.response import Response

STATE_KEY: Final = "cache"  # ctx.vars key of the plugin's per-request state
X_CACHE_HIT: Final = (b"X-Cache", b"HIT")

# A Vary'd field the request does not carry: RFC 9111 §4.1 has an absent field match only
# its absence, never an empty value. llhttp refuses NUL in a field value, so no request
# carries this one.
_ABSENT: Final = "\x00"


def _request_values(req: Any, name: str) -> str:
    if name == "host":
        return str(req.host)
    values = req.header_values(name)
    if not values:
        return _ABSENT
    return ", ".join(v.strip() for v in values)


def variant_key(base: str, names: tuple[str, ...], req: Any) -> str:
    """The key of the variant of `base` that `req` selects by the values of `names`."""
    return base + VARIANT_SEP + KEY_SEP.join(_request_values(req, n) for n in names)


def same_vary(variant: CacheEntry | None, marker: CacheEntry) -> CacheEntry | None:
    """`variant` when its own Vary names the fields the marker names, else None. The key
    holds the values of the marker's fields only: a response stored before the origin
    changed its Vary matched those values on other fields (RFC 9111 §4.1)."""
    if variant is None or variant.vary == marker.vary:
        return variant
    return None


def request_fields(
    headers: list[tuple[bytes, bytes]],
) -> tuple[str | None, str | None, bool, bool]:
    """Cache-Control, Pragma, whether Authorization is present and whether a precondition
    (If-None-Match, If-Modified-Since) is, in one pass over the headers (a `Request.header`
    scan per field cost as much again for each, on every request of the route)."""
    cache_control = pragma = None
    authorization = precondition = False
    for name, value in headers:
        size = len(name)
        if size == 13:
            lname = name.lower()
            if lname == b"cache-control":
                text = value.decode("latin-1")
                cache_control = text if cache_control is None else cache_control + ", " + text
            elif lname == b"authorization":
                authorization = True
            elif lname == b"if-none-match":
                precondition = True
        elif size == 6:
            if is_name(name, b"pragma"):
                pragma = value.decode("latin-1")
        elif size == 17 and is_name(name, b"if-modified-since"):
            precondition = True
    return cache_control, pragma, authorization, precondition


def base_key(ctx: Any, req: Request, include_consumer: bool) -> str:
    """The key of the target's entry (or Vary marker): route, GET, path?query, Host (the
    target key, `cache_store.target_of`), the path sent upstream when it is not the client's
    (a rewrite, `strip_prefix`, `request_transform`), and who asks (`identity.principal`: the
    consumer, or a JWT's issuer and subject) when the config puts the consumer in the key.
    The query is the one sent upstream (`request_transform` runs before)."""
    who = ""
    if include_consumer and (ctx.consumer is not None or "jwt_claims" in ctx.vars):
        who = principal(ctx)  # (an anonymous request has none: "", without the call)
    path = req.path
    target = path + "?" + req.query.decode("latin-1") if req.query else path
    sent: str = ctx.upstream_path
    if sent == path:
        sent = ""
    return KEY_SEP.join((ctx.route.name, "GET", target, req.host, sent, who))


class MemoryHits:
    """The hooks of one memory-store cache plugin that a hit runs (see the module doc)."""

    def __init__(
        self,
        owner: Any,
        store: MemoryStore,
        include_consumer: bool,
        full: Callable[[Any], Any],
        response_end: Callable[[Any], None],
        log: Callable[[Any], None],
    ) -> None:
        self.owner = owner  # the plugin: its `clock` (tests move time by replacing it)
        self.store = store
        self.include_consumer = include_consumer
        self.full = full
        self.response_end = response_end
        self.log = log

    def on_request(self, ctx: Any) -> Any:
        req: Request = ctx.request
        method = req.method
        if method != "GET" and method != "HEAD":
            return self.full(ctx)
        cache_control, pragma, auth, precondition = request_fields(req.headers)
        if cache_control is not None or pragma is not None or precondition:
            return self.full(ctx)
        base = base_key(ctx, req, self.include_consumer)
        now: float = self.owner.clock()
        store = self.store
        entry: CacheEntry | None = store.get(base, now)
        if entry is None:
            return self.full(ctx)
        if entry.status == 0:  # a Vary marker: the variant this request selects
            entry = same_vary(store.get(variant_key(base, entry.vary, req), now), entry)
            if entry is None:
                return self.full(ctx)
        if auth and not entry.auth_ok:  # not for a request with credentials (RFC 9111 §3.5)
            return self.full(ctx)
        age: float = entry.initial_age + max(0.0, now - entry.stored_at)
        if not age < entry.lifetime:  # (no request directive moves the bound: fresh or not)
            return self.full(ctx)
        ctx.cache_status = "HIT"
        headers: list[tuple[bytes, bytes]] = list(entry.headers)
        headers.append((b"Age", b"%d" % int(age)))
        headers.append(X_CACHE_HIT)
        return Response(entry.status, entry.body, headers, entry.content_type)

    def on_response_end(self, ctx: Any) -> None:
        if STATE_KEY in ctx.vars:
            self.response_end(ctx)

    def on_log(self, ctx: Any) -> None:
        if STATE_KEY in ctx.vars:
            self.log(ctx)
