"""The response cache (`cache`, priority 800): RFC 9111 for a shared cache, with coalescing.

    routes:
      - name: catalog
        plugins:
          cache: {ttl: 30s, max_bytes: 64MiB, max_entry_bytes: 1MiB, stale_if_error: 1m}

Keys: route, GET (HEAD shares GET's entry), path?query, Host, the path sent upstream when it
is not the client's (a route rewrite, `strip_prefix`, `request_transform`), who is asking
(`key_include_consumer`, default true: the authenticated consumer's name, or for a JWT that
names no consumer, as an outside identity provider's users' do, its issuer and subject; see
`identity.principal`. Credentials outside `Authorization`, such as an API key header, a query
key or a JWT cookie, are invisible to the §3.5 rule below and, with `hide_credentials`, to the
upstream's `Vary`, so without it one caller's response would reach another), and the values
of the request headers the response's `Vary` names.
`key_include_consumer: false` shares entries between consumers (for routes whose responses
do not depend on who asks). Whatever the key, a response to a request with `Authorization`
is stored only when it says `public`, `s-maxage` or `must-revalidate` (RFC 9111 §3.5): a
consumer may stand for many users (an application's key, its users' tokens).
The key describes the request as it goes upstream (RFC 9111 §2: the request that produced
the response): `request_transform` (priority 801) runs before this plugin, as Kong's
request-transformer runs before its proxy-cache, so the query, the path and the Vary'd
request headers are the ones it sent (a tenant it put in the path from a header is another
entry), and the §3.5 rule above sees the Authorization it sent. A hit costs its edits then.
The rules themselves are the pure functions of `cache_rules.py`; the stores are in
`cache_store.py`. Every response the route proxies or answers from the cache carries
`X-Cache: HIT | MISS | BYPASS` (or `STALE`, see below); an error the gateway makes itself
(a connect error's 502, a timeout's 504, a plugin's 401 or 429) carries none unless a stale
entry replaces it, as Kong's X-Cache-Status, but `ctx.cache_status` holds the word for the
access log whenever this plugin ran.

What is stored is the response as the client received it: the head after every `on_response`
hook (a lower-priority `response_transform` included, read when the body ends) and the body
chunks as sent. A hit is answered from `on_request`, so the plugins below this one do not run
for it; a plugin that makes a response depend on a request header must add that header to
`Vary` (the CORS plugin adds `Vary: Origin`).

## The hook contract this plugin relies on (the exchange's side)

- `on_request(ctx)` returns a `Response` on a hit (synchronously with the memory store), an
  awaitable for a coalesced miss or a Redis lookup (it resolves to a `Response` or None), or
  None to proxy.
- `on_response(ctx, head)` runs with the upstream head before it is written.
- `on_response_chunk(ctx, chunk)` runs for every response body chunk, decoded (no chunked
  framing), exactly as sent to the client (after any `transform_response_body`).
- `on_response_end(ctx)` runs once when the response is over and *before* `on_log`;
  `ctx.error is None` there must mean the client received the complete body. If the response
  was cut off (upstream reset or timeout mid-body, client gone), the exchange sets `ctx.error`
  first or does not call it at all. Nothing is stored without `on_response_end` and
  `ctx.error is None`; `on_log` releases (or hands over) coalesced waiters in every case.
- **replace_response**: after all `on_response` hooks, if `ctx.vars.get("replace_response")`
  is a `Response`, the exchange discards the upstream response (closing or draining the
  upstream connection) and sends that `Response` instead, as it does for `ctx.respond`.
  The cache sets it when the upstream answered 5xx and a stale entry is within its
  stale-if-error window.
- **stale_response**: when the exchange is about to answer a gateway error of status >= 500
  before any response head was sent (connect error, upstream timeout, no healthy instance,
  open breaker), it calls `ctx.vars.get("stale_response")` if present: a zero-argument callable
  returning a `Response` (sets `ctx.cache_status = "STALE"` itself) or None when the stale
  window has passed since; a `Response` is sent instead of the error.
- **on_client_lost**: a leader sets `ctx.on_client_lost`, which the exchange calls when the
  client goes away before the response is over (before `on_response_end`): its flight is
  then handed over (see Coalescing).
- Both stale answers go out without the exchange's decoration, so the plugin applies the
  response hooks of the plugins above it itself (`chain.decorators_of(plugin)`), as the
  exchange does for a HIT: CORS headers are on a STALE answer too.

## Coalescing

The first miss for a key becomes the *leader* and goes upstream; concurrent misses for the
same key wait (at most `coalesce_timeout`) for the leader's outcome and are answered from the
entry it stored (HIT), or, when it stores nothing (uncacheable, too large, cut off, failed),
go upstream themselves: as soon as that is known (as nginx's proxy_cache_lock and Varnish's
hit-for-miss do), i.e. when the head says the response will not be stored, when the body
passes `max_entry_bytes`, or else when the response ends. A HEAD never leads (its response
has no body to store).

One impatient client does not undo that: when the leader's client leaves (the exchange cuts
its upstream request), the oldest waiter that can lead (a GET whose client is still there)
becomes the leader and goes upstream, and the others wait on it, within their
`coalesce_timeout` (nginx's proxy_cache_lock hands its lock on the same way). A leader whose
upstream failed or was cut releases every waiter, as above: each goes on to its own answer
(a stale entry, an error) at once, not after one timeout per waiter.

## Invalidation

A 2xx or 3xx response to an unsafe method (POST, PUT, PATCH, DELETE, any method but GET,
HEAD, OPTIONS and TRACE) removes what is stored for the same route, path?query and Host:
every consumer's entry and every Vary variant (RFC 9111 §4.4: the target URI's stored
responses, whatever their secondary keys; alice's PUT must not leave bob reading the old
item), in either store. The stores find those entries through an index by target that they
keep when they store an entry (see `cache_store.py`): a hit does no more work for it. (It
costs the requests of the routes that have this plugin only; a GET in flight at that moment
may still store the answer it had from before the change.)

## Purge

`await CachePlugin.purge(route=..., prefix=...)` removes the entries of its store whose route
is `route` and whose path?query starts with `prefix` (None = any) and returns how many
responses it removed (Vary markers are bookkeeping: removed, not counted);
`await purge_all(route=..., prefix=...)` does it for every live cache store (the admin API's
`DELETE /cache?route=&prefix=`). Memory stores are shared by the cache plugins of a process
that have the same `max_bytes` (so they survive reloads); purge by route to target one.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from pydantic import ConfigDict, field_validator

from apigate.config.errors import located_error
from apigate.config.units import NonNegativeDuration, PositiveDuration, PositiveSize
from apigate.http.response_head import ResponseHead
from apigate.plugins.base import Plugin, PluginConfig, PluginEnv, Response
from apigate.plugins.cache_hit import (
    STATE_KEY,
    X_CACHE_HIT,
    MemoryHits,
    base_key,
    request_fields,
    same_vary,
    variant_key,
)
from apigate.plugins.cache_rules import (
    UNSTORED_FIELDS,
    RequestPolicy,
    StorePolicy,
    invalidates,
    is_fresh,
    is_unsafe,
    not_modified,
    request_policy,
    response_policy,
    stale_usable,
    vary_names,
)
from apigate.plugins.cache_store import (
    KEY_SEP,
    CacheEntry,
    MemoryStore,
    RedisCacheStore,
    target_of,
)

__all__ = ["STATE_KEY", "CacheConfig", "CachePlugin", "live_plugins", "purge_all"]

_X_CACHE = {word: (b"X-Cache", word.encode()) for word in ("MISS", "BYPASS", "STALE")}
_X_CACHE["HIT"] = X_CACHE_HIT
_NOT_MODIFIED_FIELDS = frozenset(
    {b"cache-control", b"content-location", b"etag", b"expires", b"vary"}
)
_INVALIDATE_KEY = "cache_invalidate"  # ctx.vars: the target key an unsafe request may invalidate

_LIVE: weakref.WeakSet[CachePlugin] = weakref.WeakSet()


class CacheConfig(PluginConfig):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ttl: PositiveDuration | None = None  # for responses that give no freshness; None: not stored
    key_include_consumer: bool = True  # false: one entry for every consumer (an explicit opt-in)
    max_entry_bytes: PositiveSize = 1 << 20
    max_bytes: PositiveSize = 64 << 20
    store: str = "memory"  # memory | redis (the top-level redis store) | redis://host:port/db
    stale_if_error: NonNegativeDuration = 0.0
    coalesce_timeout: PositiveDuration = 30.0
    redis_timeout: PositiveDuration = 0.1

    @field_validator("store")
    @classmethod
    def _check_store(cls, value: str) -> str:
        if value in ("memory", "redis") or value.startswith(("redis://", "rediss://")):
            return value
        raise ValueError(
            f"invalid cache store {value!r}: use memory, redis or redis://host:port/db"
        )


class _Flight:
    """A leader's request in progress; waiters create the future and the list of who waits
    only when they exist. Once it is `over`, `outcome` is what it stored (an entry, or None):
    a waiter's wait may begin after that (see `_outcome`)."""

    __slots__ = ("future", "key", "outcome", "over", "waiting")

    def __init__(self, key: str) -> None:
        self.key = key
        self.future: asyncio.Future[CacheEntry | None] | None = None
        self.waiting: list[Any] | None = None  # the waiters' exchanges, oldest first
        self.over = False
        self.outcome: CacheEntry | None = None

    def __repr__(self) -> str:
        waiting = f"waited on by {len(self.waiting)}" if self.waiting else "alone"
        return f"<Flight {self.key!r} {waiting}>"


class _State:
    """One request's cache bookkeeping, in `ctx.vars["cache"]`."""

    __slots__ = (
        "auth",
        "base",
        "chunks",
        "ended",
        "flight",
        "head",
        "key",
        "left",
        "policy",
        "size",
        "stale",
        "started",
        "store_policy",
    )

    def __init__(self, base: str, policy: RequestPolicy, auth: bool, started: float) -> None:
        self.base = base
        self.key = base  # the variant key once a Vary marker told us the names
        self.policy = policy
        self.auth = auth  # carries Authorization: only `auth_ok` entries serve or are stored
        self.started = started
        self.flight: _Flight | None = None
        self.stale: CacheEntry | None = None
        self.store_policy: StorePolicy | None = None
        self.head: Any = None
        self.chunks: list[bytes] | None = None  # collecting the body when not None
        self.size = 0
        self.left = False  # its client left while it led a flight (`client_left`)
        self.ended = False  # its exchange is over (`on_log` ran): it can lead no flight

    def client_left(self) -> None:
        """The exchange's `on_client_lost`: the leader's flight goes to one of its waiters."""
        self.left = True


def _joined(headers: list[tuple[bytes, bytes]], lname: bytes) -> str | None:
    """All values of a field, comma-joined (Cache-Control and Vary may repeat)."""
    values = [v for n, v in headers if len(n) == len(lname) and n.lower() == lname]
    if not values:
        return None
    return b", ".join(values).decode("latin-1")


def _can_lead(ctx: Any) -> bool:
    """May this waiting request take a flight over: a GET (its response is stored) whose
    exchange is not over?"""
    state: _State | None = ctx.vars.get(STATE_KEY)
    return state is not None and state.policy.store and not state.ended


class CachePlugin(Plugin):
    name = "cache"
    priority = 800
    Config = CacheConfig

    def __init__(self, config: PluginConfig, env: PluginEnv) -> None:
        super().__init__(config, env)
        assert isinstance(config, CacheConfig)
        if env.consumer is not None and not config.key_include_consumer:
            # its entries are this consumer's answers (its own request_transform's, say): in
            # a key without the consumer, the route's cache would serve them to everyone
            problem = (
                "a consumer's cache keeps its entries under its consumer: false would "
                "share them with every consumer of the route"
            )
            raise located_error(type(config).__name__, [(("key_include_consumer",), problem)])
        self.cfg = config
        self.clock: Callable[[], float] = time.time  # tests move time by replacing this
        self.store: MemoryStore | RedisCacheStore = self._make_store(config, env)
        self._flights: dict[str, _Flight] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        _LIVE.add(self)
        if isinstance(self.store, MemoryStore):
            # A hit is answered compiled (cache_hit); the rest comes back to these methods,
            # bound here before the instance attributes hide them (as the jwt plugin does).
            hits = MemoryHits(
                self,
                self.store,
                config.key_include_consumer,
                self.on_request,
                self.on_response_end,
                self.on_log,
            )
            self.on_request = hits.on_request  # type: ignore[method-assign]
            self.on_response_end = hits.on_response_end  # type: ignore[method-assign]
            self.on_log = hits.on_log  # type: ignore[method-assign]

    @staticmethod
    def _make_store(config: CacheConfig, env: PluginEnv) -> MemoryStore | RedisCacheStore:
        if config.store == "memory":
            key = f"cache:memory:{config.max_bytes}"
            store = env.shared.get(key)
            if not isinstance(store, MemoryStore):
                store = env.shared[key] = MemoryStore(config.max_bytes)
            return store
        url = config.store if config.store != "redis" else env.config.store
        if not url.startswith(("redis://", "rediss://")):
            # located relative to this config: build_plugin prefixes the plugin's own path
            problem = (
                "'redis' needs a top-level `store: redis://...` "
                "(or give the URL here: store: redis://host:6379/0)"
            )
            raise located_error(type(config).__name__, [(("store",), problem)])
        from apigate.store.redis import shared_redis

        return RedisCacheStore(shared_redis(env.shared, url), timeout=config.redis_timeout)

    # ------------------------------------------------------------------ request side
    def on_request(self, ctx: Any) -> Response | Awaitable[Response | None] | None:
        req = ctx.request
        # `auth`: the request carries Authorization. RFC 9111 §3.5 applies with the consumer
        # in the key too: one consumer may stand for many users (an app's key, their tokens).
        cache_control, pragma, auth, _ = request_fields(req.headers)
        policy = request_policy(req.method, cache_control, pragma)
        if not policy.lookup and not policy.store:
            ctx.cache_status = "BYPASS"
            if is_unsafe(req.method):  # its non-error response invalidates the target (§4.4)
                ctx.vars[_INVALIDATE_KEY] = target_of(self._base_key(ctx))
            return None
        base = self._base_key(ctx)
        now = self.clock()
        store = self.store
        if isinstance(store, RedisCacheStore):
            return self._lookup_async(ctx, _State(base, policy, auth, now), store)
        key = base
        entry = store.get(base, now)
        if entry is not None and entry.is_marker:
            key = variant_key(base, entry.vary, req)
            entry = same_vary(store.get(key, now), entry)
        if entry is not None and policy.lookup and (entry.auth_ok or not auth):
            age = entry.age(now)
            if is_fresh(entry.lifetime, age, policy):  # a hit: no state to keep at all
                return self._hit(ctx, entry, age)
        state = _State(base, policy, auth, now)
        state.key = key
        return self._after_lookup(ctx, state, entry, now)

    def _base_key(self, ctx: Any) -> str:
        return base_key(ctx, ctx.request, self.cfg.key_include_consumer)

    async def _lookup_async(
        self, ctx: Any, state: _State, store: RedisCacheStore
    ) -> Response | None:
        now = self.clock()
        entry = await store.get(state.base, now)
        if entry is not None and entry.is_marker:
            state.key = variant_key(state.base, entry.vary, ctx.request)
            entry = same_vary(await store.get(state.key, now), entry)
        outcome = self._after_lookup(ctx, state, entry, now)
        if outcome is None or isinstance(outcome, Response):
            return outcome
        return await outcome

    def _after_lookup(
        self, ctx: Any, state: _State, entry: CacheEntry | None, now: float
    ) -> Response | Awaitable[Response | None] | None:
        policy = state.policy
        if entry is not None and not (entry.auth_ok or not state.auth):
            entry = None  # not for a request with credentials (RFC 9111 §3.5)
        age = entry.age(now) if entry is not None else 0.0
        if entry is not None and policy.lookup and is_fresh(entry.lifetime, age, policy):
            # (no state kept: the response hooks of a hit have nothing to do)
            return self._hit(ctx, entry, age)
        ctx.vars[STATE_KEY] = state
        if (
            entry is not None
            and policy.stale_ok  # no-cache, max-age, min-fresh: the client wants it fresh
            and stale_usable(entry.lifetime, age, entry.stale_window)
        ):
            stale = entry
            state.stale = stale
            ctx.vars["stale_response"] = lambda: self._stale_response(ctx, stale)
        ctx.cache_status = "MISS" if policy.lookup else "BYPASS"
        flight = self._flights.get(state.key)
        if flight is not None:
            return self._wait(ctx, state, flight) if policy.lookup else None
        if policy.store:
            state.flight = self._flights[state.key] = _Flight(state.key)
            ctx.on_client_lost = state.client_left  # (see `_hand_over`)
        return None

    async def _wait(self, ctx: Any, state: _State, flight: _Flight) -> Response | None:
        """Wait for `flight`'s entry (None: go upstream, leading it if it was handed over)."""
        waiting = flight.waiting
        if waiting is None:
            waiting = flight.waiting = []
        waiting.append(ctx)
        try:
            async with asyncio.timeout(self.cfg.coalesce_timeout):
                entry = await self._outcome(state, flight)
        except TimeoutError:
            if ctx in waiting:
                waiting.remove(ctx)
            return None
        if entry is None or not (entry.auth_ok or not state.auth):
            return None
        wanted = variant_key(state.base, entry.vary, ctx.request) if entry.vary else state.base
        if entry.key != wanted:
            return None  # the leader's response varies on a header whose value differs here
        age = entry.age(self.clock())
        if not is_fresh(entry.lifetime, age, state.policy):
            return None
        return self._hit(ctx, entry, age)

    async def _outcome(self, state: _State, flight: _Flight) -> CacheEntry | None:
        """The entry `flight` stored, or None when it stored nothing or was handed over to
        this request (then `state.flight` is it). A flight handed over to another waiter is
        waited on again: its new leader's outcome is the one to wait for."""
        while True:
            if flight.over:
                # Over before this wait began: the exchange runs a hook's awaitable in a task,
                # and the leader's whole response may have come in between. A future made now
                # would never be resolved.
                return flight.outcome
            future = flight.future
            if future is None:
                future = flight.future = asyncio.get_running_loop().create_future()
            entry = await asyncio.shield(future)
            if entry is not None or state.flight is flight or state.ended:
                return entry
            if self._flights.get(flight.key) is not flight:
                return None  # over, with nothing stored

    def _hit(self, ctx: Any, entry: CacheEntry, age: float) -> Response:
        ctx.cache_status = "HIT"
        req = ctx.request
        if (entry.etag is not None or entry.last_modified is not None) and not_modified(
            entry.status,
            req.header("if-none-match"),
            req.header("if-modified-since"),
            entry.etag,
            entry.last_modified,
        ):
            kept = [h for h in entry.headers if h[0].lower() in _NOT_MODIFIED_FIELDS]
            return Response(304, b"", [*kept, (b"Age", b"%d" % int(age)), _X_CACHE["HIT"]])
        headers = [*entry.headers, (b"Age", b"%d" % int(age)), _X_CACHE["HIT"]]
        return Response(entry.status, entry.body, headers, entry.content_type)

    def _stale_response(self, ctx: Any, entry: CacheEntry) -> Response | None:
        age = entry.age(self.clock())
        if not stale_usable(entry.lifetime, age, entry.stale_window):
            return None
        ctx.cache_status = "STALE"
        headers = [*entry.headers, (b"Age", b"%d" % int(age)), _X_CACHE["STALE"]]
        return Response(
            entry.status,
            entry.body,
            self._decorated(ctx, entry.status, headers),
            entry.content_type,
        )

    def _decorated(
        self, ctx: Any, status: int, headers: list[tuple[bytes, bytes]]
    ) -> list[tuple[bytes, bytes]]:
        """`headers` after the response hooks of the plugins above this one (CORS, rate-limit
        headers), as the exchange decorates a HIT this plugin returned from `on_request`. A
        stale answer replaces a response or an error and goes out undecorated otherwise (a
        cross-origin client lost its Access-Control-Allow-Origin)."""
        chain = getattr(getattr(ctx, "route", None), "chain", None)
        if chain is None:
            return headers
        decorators = chain.decorators_of(self)
        if not decorators:
            return headers
        head = ResponseHead()
        head.status = status
        head.headers = headers
        for decorate in decorators:
            decorate(ctx, head)
        return head.headers

    # ------------------------------------------------------------------ response side
    def on_response(self, ctx: Any, head: Any) -> None:
        word = ctx.cache_status or "BYPASS"
        head.headers = [h for h in head.headers if h[0].lower() != b"x-cache"]
        head.headers.append(_X_CACHE.get(word, _X_CACHE["BYPASS"]))
        state: _State | None = ctx.vars.get(STATE_KEY)
        if state is None:
            target = ctx.vars.get(_INVALIDATE_KEY)
            if target is not None and invalidates(ctx.request.method, head.status):
                self._invalidate(target)
            return
        if head.status >= 500 and state.stale is not None:
            stale = self._stale_response(ctx, state.stale)
            if stale is not None:
                ctx.vars["replace_response"] = stale
            self._release(state, None)  # an error where an entry was: nothing to store
            return
        if not state.policy.store:
            return
        headers = head.headers
        policy = response_policy(
            status=head.status,
            cache_control=_joined(headers, b"cache-control"),
            expires=head.header("expires"),
            date=head.header("date"),
            age=head.header("age"),
            vary=_joined(headers, b"vary"),
            set_cookie=head.header("set-cookie") is not None,
            authorization=state.auth,
            default_ttl=self.cfg.ttl,
            stale_if_error=self.cfg.stale_if_error,
            now=self.clock(),
            request_time=state.started,
        )
        if not policy.store:
            # Waiters go upstream now, not after a body that will not be stored.
            self._release(state, None)
            return
        state.store_policy = policy
        state.head = head
        state.chunks = []

    def on_response_chunk(self, ctx: Any, chunk: bytes) -> None:
        state: _State | None = ctx.vars.get(STATE_KEY)
        if state is None or state.chunks is None:
            return
        state.size += len(chunk)
        if state.size > self.cfg.max_entry_bytes:
            state.chunks = None  # too large to keep: stop collecting, store nothing,
            self._release(state, None)  # and let the waiters go without the rest of it
        else:
            state.chunks.append(chunk)

    def on_response_end(self, ctx: Any) -> None:
        state: _State | None = ctx.vars.get(STATE_KEY)
        if state is None:
            return
        entry = None
        if state.chunks is not None and ctx.error is None:
            entry = self._store(ctx, state)
        state.chunks = None
        self._release(state, entry)

    def on_log(self, ctx: Any) -> None:
        state: _State | None = ctx.vars.get(STATE_KEY)
        if state is not None:
            state.chunks = None
            state.ended = True
            if state.flight is not None:
                self._release(state, None)

    def _release(self, state: _State, entry: CacheEntry | None) -> None:
        flight, state.flight = state.flight, None
        if flight is None:
            return
        if entry is None and state.left and self._hand_over(flight):
            return
        if self._flights.get(flight.key) is flight:
            del self._flights[flight.key]
        flight.over, flight.outcome = True, entry
        if flight.future is not None and not flight.future.done():
            flight.future.set_result(entry)

    def _hand_over(self, flight: _Flight) -> bool:
        """Make the oldest waiter that can lead `flight` its leader (it goes upstream, the
        others keep waiting, for its outcome now); False when no waiter can (a HEAD has no
        body to store, a waiter whose client left will send nothing).

        For a leader whose client left (the exchange aborted its upstream request): one
        impatient client must not send every waiter upstream at once. nginx's
        proxy_cache_lock hands its lock on the same way. An upstream that failed is not
        handed over: each waiter goes on to its own answer (a stale entry, an error) at once
        rather than after one timeout per waiter."""
        future = flight.future
        if not flight.waiting or future is None or future.done():
            return False
        successor = next((c for c in flight.waiting if _can_lead(c)), None)
        if successor is None:
            return False
        flight.waiting.remove(successor)
        state: _State = successor.vars[STATE_KEY]
        state.flight = flight
        state.started = self.clock()  # its request goes upstream now (RFC 9111 §4.2.3)
        successor.on_client_lost = state.client_left
        flight.future = None  # the others wait on a new one
        future.set_result(None)
        return True

    def _store(self, ctx: Any, state: _State) -> CacheEntry | None:
        """Build the entry (and a Vary marker) from the final head and the collected body."""
        policy, head, chunks = state.store_policy, state.head, state.chunks
        assert policy is not None and chunks is not None
        req = ctx.request
        names = vary_names(_joined(head.headers, b"vary"))  # lower plugins may have added some
        if names is None:
            return None
        content_type: bytes | None = None
        headers: list[tuple[bytes, bytes]] = []
        for name, value in head.headers:
            lname = name.lower()
            if lname == b"content-type":
                content_type = value
            elif lname not in UNSTORED_FIELDS and lname not in policy.strip:
                headers.append((name, value))
        key = variant_key(state.base, names, req) if names else state.base
        route, _, target = state.base.split(KEY_SEP, 3)[:3]
        now = self.clock()
        entry = CacheEntry(
            key=key,
            route=route,
            target=target,
            status=head.status,
            headers=headers,
            body=b"".join(chunks),
            content_type=content_type,
            stored_at=now,
            initial_age=policy.initial_age,
            lifetime=policy.lifetime,
            stale_window=policy.stale_window,
            auth_ok=policy.auth_ok,
            vary=names,
            etag=head.header("etag"),
            last_modified=head.header("last-modified"),
        )
        marker = None
        if names:
            marker = CacheEntry(
                key=state.base,
                route=route,
                target=target,
                status=0,
                headers=[],
                body=b"",
                content_type=None,
                stored_at=now,
                initial_age=policy.initial_age,
                lifetime=policy.lifetime,
                stale_window=policy.stale_window,
                vary=names,
            )
        store = self.store
        if isinstance(store, RedisCacheStore):
            self._spawn(self._put_async(store, entry, marker))
            return entry
        if marker is not None:
            old = store.get(state.base, now)
            if old is None or not old.is_marker or old.retain_until <= marker.retain_until:
                store.put(marker)
        return entry if store.put(entry) else None

    def _invalidate(self, target: str) -> None:
        """Every consumer's entries for the target, every Vary variant (RFC 9111 §4.4)."""
        store = self.store
        if isinstance(store, RedisCacheStore):
            self._spawn(store.invalidate(target))
        else:
            store.invalidate(target)

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        """Run a Redis write in the background (`close` waits for it)."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _put_async(
        self, store: RedisCacheStore, entry: CacheEntry, marker: CacheEntry | None
    ) -> None:
        now = self.clock()
        if marker is not None:
            await store.put(marker, now)
        await store.put(entry, now)

    # ------------------------------------------------------------------ admin
    async def purge(self, prefix: str | None = None, route: str | None = None) -> int:
        store = self.store
        if isinstance(store, RedisCacheStore):
            return await store.purge(route=route, prefix=prefix)
        return store.purge(route=route, prefix=prefix)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<CachePlugin {self.store!r} {len(self._flights)} in flight>"


def live_plugins() -> list[CachePlugin]:
    return list(_LIVE)


async def purge_all(route: str | None = None, prefix: str | None = None) -> int:
    """Purge every live cache store once (stores are shared); returns responses removed."""
    removed = 0
    seen: list[object] = []
    for plugin in live_plugins():
        if any(plugin.store is store for store in seen):
            continue
        seen.append(plugin.store)
        removed += await plugin.purge(prefix=prefix, route=route)
    return removed
