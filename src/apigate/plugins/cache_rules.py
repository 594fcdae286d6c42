"""RFC 9111 decisions for a shared cache, as pure functions of header values and a clock.

Nothing here touches a request object, a store or the time of day: callers pass header values
(`str | None`) and `now`, so every rule is unit-testable in isolation. `cache.py` wires them.

What we implement, and where we are stricter than the RFC allows (a shared cache may always
decline to store or to serve):

- only GET and HEAD are answered from the cache, and only a GET's response is stored (a HEAD's
  response has no body to store);
- statuses "heuristically cacheable" by RFC 9110 §15.1 minus 206 (no range support):
  200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501;
- request `no-store` → neither served nor stored; request `no-cache` (or `Pragma: no-cache`
  without Cache-Control) and `max-age=0` → not served (we do not revalidate), the fresh answer
  is stored; request `max-age=N` / `min-fresh=N` tighten freshness;
- a request with `no-cache`, `max-age` or `min-fresh` never gets a stale answer in place of an
  error (§4.2.4; §5.2.1.1: with max-age the client "does not wish to receive a stale
  response"; we do not implement `max-stale`, which could allow one);
- a non-error (2xx, 3xx) response to an unsafe method (anything but GET, HEAD, OPTIONS, TRACE)
  invalidates what is stored for its target URI (§4.4);
- response `no-store`, `private`, `no-cache` → not stored (we cannot revalidate, so a `no-cache`
  entry could never be served); their qualified forms (`private="Set-Cookie"`) strip the named
  fields and store the rest (§5.2.2.4, §5.2.2.7);
- freshness lifetime: `s-maxage` (shared caches only) > `max-age` > `Expires - Date` > the
  route's `ttl` (our heuristic, used only when the response says nothing); zero → not stored;
- `Vary: *` → never stored; other Vary names become part of the key;
- a request with `Authorization` is only stored when the response says `public`, `s-maxage` or
  `must-revalidate` (§3.5), and only served from entries stored that way;
- `Age` = the upstream's Age corrected by apparent age (§4.2.3) plus the time in our store;
- stale-if-error (RFC 5861): a stale entry may replace a 5xx / connect failure for a window,
  never when the response said `must-revalidate`, `proxy-revalidate` or `s-maxage` (§5.2.2.2);
- a hit answers `If-None-Match` / `If-Modified-Since` with 304 only when it is a 2xx
  (RFC 9110 §13.2.1: preconditions are ignored for any other status);
- stricter than the RFC: a response with `Set-Cookie` is not stored (nginx and Varnish default:
  one user's session must never reach another).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = [
    "CACHEABLE_STATUSES",
    "UNSTORED_FIELDS",
    "RequestPolicy",
    "StorePolicy",
    "current_age",
    "etag_matches",
    "freshness_lifetime",
    "invalidates",
    "is_fresh",
    "is_unsafe",
    "not_modified",
    "parse_cache_control",
    "parse_delta",
    "parse_http_date",
    "request_policy",
    "response_policy",
    "stale_usable",
    "vary_names",
]

CACHEABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})  # RFC 9110 §9.2.1

# Never stored with an entry: framing and per-response fields the gateway writes itself.
UNSTORED_FIELDS = frozenset(
    {
        b"age",
        b"connection",
        b"content-length",
        b"date",
        b"keep-alive",
        b"server",
        b"set-cookie",
        b"transfer-encoding",
        b"x-cache",
        b"x-request-id",
    }
)

_DELTA_MAX = 2**31  # RFC 9111 §1.2.2: a delta larger than any parser holds means 2^31


def parse_cache_control(value: str | None) -> dict[str, str | None]:
    """`max-age=60, private="a, b", no-store` → {"max-age": "60", "private": "a, b", ...}.

    Directive names are lower-cased; quoted values are unquoted; the first occurrence wins.
    """
    directives: dict[str, str | None] = {}
    if not value:
        return directives
    for item in _split_commas(value):
        name, eq, arg = item.partition("=")
        name = name.strip().lower()
        if not name or name in directives:
            continue
        if not eq:
            directives[name] = None
            continue
        arg = arg.strip()
        if len(arg) >= 2 and arg[0] == '"' and arg[-1] == '"':
            arg = arg[1:-1].replace('\\"', '"')
        directives[name] = arg
    return directives


def _split_commas(value: str) -> list[str]:
    """Split on commas outside quoted strings (`private="a, b"` is one directive)."""
    items: list[str] = []
    start = 0
    quoted = False
    for index, char in enumerate(value):
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append(value[start:index])
            start = index + 1
    items.append(value[start:])
    return [item.strip() for item in items if item.strip()]


def parse_delta(value: str | None) -> int | None:
    """A delta-seconds value (`max-age=60`), or None when absent or malformed."""
    if value is None:
        return None
    value = value.strip()
    if not value.isdigit():  # isdigit also refuses "-1" and "1.5", as §1.2.2 wants
        return None
    return min(int(value), _DELTA_MAX)


def parse_http_date(value: str | None) -> float | None:
    """An HTTP-date as a Unix timestamp, or None when absent or invalid (e.g. `Expires: 0`)."""
    if not value:
        return None
    try:
        parsed = parsedate_to_datetime(value.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:  # RFC 850 and asctime dates are GMT by definition
        return parsed.replace(tzinfo=UTC).timestamp()
    return parsed.timestamp()


def _field_names(arg: str | None) -> tuple[bytes, ...]:
    if not arg:
        return ()
    return tuple(n.strip().lower().encode("latin-1") for n in arg.split(",") if n.strip())


# ------------------------------------------------------------------------------ requests


@dataclass(frozen=True, slots=True)
class RequestPolicy:
    """What a request allows: may it be answered from the cache, may its response be stored."""

    lookup: bool
    store: bool
    max_age: float | None = None  # the request's max-age: older entries are not served
    min_fresh: float = 0.0  # the entry must stay fresh this much longer
    reason: str = ""
    stale_ok: bool = True  # may a stale entry replace an error (stale-if-error)?


_NOT_CACHED_METHOD = RequestPolicy(False, False, reason="method")
_PLAIN = RequestPolicy(True, True)


def request_policy(method: str, cache_control: str | None, pragma: str | None) -> RequestPolicy:
    if method != "GET" and method != "HEAD":
        return _NOT_CACHED_METHOD
    store = method == "GET"
    if not cache_control:
        if pragma and "no-cache" in pragma.lower():  # §5.4: Pragma only counts without C-C
            return RequestPolicy(False, store, reason="no-cache", stale_ok=False)
        return _PLAIN if store else RequestPolicy(True, False)
    cc = parse_cache_control(cache_control)
    if "no-store" in cc:
        return RequestPolicy(False, False, reason="no-store")
    if "no-cache" in cc:
        return RequestPolicy(False, store, reason="no-cache", stale_ok=False)
    max_age = parse_delta(cc["max-age"]) if "max-age" in cc else None
    if max_age == 0:
        return RequestPolicy(False, store, reason="max-age=0", stale_ok=False)
    min_fresh = parse_delta(cc.get("min-fresh")) or 0
    return RequestPolicy(
        True,
        store,
        None if max_age is None else float(max_age),
        float(min_fresh),
        # the client bounded the age it accepts: a stale entry is past that bound
        stale_ok="max-age" not in cc and "min-fresh" not in cc,
    )


def is_unsafe(method: str) -> bool:
    """RFC 9110 §9.2.1: a method not known to be safe may change the target resource."""
    return method not in SAFE_METHODS


def invalidates(method: str, status: int) -> bool:
    """§4.4: a non-error response to an unsafe method invalidates the target URI's entries."""
    return 200 <= status < 400 and is_unsafe(method)


# ------------------------------------------------------------------------------ responses


@dataclass(frozen=True, slots=True)
class StorePolicy:
    """Whether and how a response may be stored."""

    store: bool
    reason: str = ""
    lifetime: float = 0.0  # freshness lifetime in seconds (§4.2.1)
    initial_age: float = 0.0  # its age when it reached us (§4.2.3)
    stale_window: float = 0.0  # how long past expiry it may replace an error (RFC 5861)
    auth_ok: bool = False  # may answer requests that carry Authorization
    vary: tuple[str, ...] = ()  # lower-cased request header names, sorted
    strip: tuple[bytes, ...] = ()  # fields named by qualified private / no-cache


def vary_names(value: str | None) -> tuple[str, ...] | None:
    """Lower-cased, sorted, de-duplicated names from Vary; None for `Vary: *`."""
    if not value:
        return ()
    names = {name.strip().lower() for name in value.split(",") if name.strip()}
    if "*" in names:
        return None
    return tuple(sorted(names))


def freshness_lifetime(
    cc: dict[str, str | None],
    expires: str | None,
    date: str | None,
    default_ttl: float | None,
    now: float,
) -> float | None:
    """§4.2.1 for a shared cache; None when the response gives nothing and no ttl is set."""
    if "s-maxage" in cc:
        s_maxage = parse_delta(cc["s-maxage"])
        return float(s_maxage) if s_maxage is not None else 0.0
    if "max-age" in cc:
        max_age = parse_delta(cc["max-age"])
        return float(max_age) if max_age is not None else 0.0
    if expires is not None:
        expires_at = parse_http_date(expires)
        if expires_at is None:
            return 0.0  # an invalid Expires (e.g. "0") means "already expired" (§5.3)
        date_at = parse_http_date(date)
        return max(0.0, expires_at - (date_at if date_at is not None else now))
    return default_ttl


def response_policy(
    *,
    status: int,
    cache_control: str | None,
    expires: str | None = None,
    date: str | None = None,
    age: str | None = None,
    vary: str | None = None,
    set_cookie: bool = False,
    authorization: bool = False,
    default_ttl: float | None = None,
    stale_if_error: float = 0.0,
    now: float,
    request_time: float | None = None,
) -> StorePolicy:
    """May a shared cache store this response to a GET, and for how long (§3, §4.2)."""
    if status not in CACHEABLE_STATUSES:
        return StorePolicy(False, f"status {status}")
    cc = parse_cache_control(cache_control)
    if "no-store" in cc:
        return StorePolicy(False, "no-store")
    strip: tuple[bytes, ...] = ()
    if "private" in cc:
        strip = _field_names(cc["private"])
        if not strip:
            return StorePolicy(False, "private")
    if "no-cache" in cc:
        named = _field_names(cc["no-cache"])
        if not named:
            return StorePolicy(False, "no-cache")
        strip += named
    names = vary_names(vary)
    if names is None:
        return StorePolicy(False, "vary *")
    explicit_share = "public" in cc or "s-maxage" in cc or "must-revalidate" in cc
    if authorization and not explicit_share:
        return StorePolicy(False, "authorization")
    if set_cookie and b"set-cookie" not in strip:
        return StorePolicy(False, "set-cookie")
    lifetime = freshness_lifetime(cc, expires, date, default_ttl, now)
    if lifetime is None:
        return StorePolicy(False, "no freshness")
    initial_age = _initial_age(age, date, now, request_time)
    if lifetime <= initial_age:
        return StorePolicy(False, "expired")
    no_stale = "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
    window = 0.0
    if not no_stale:
        own = parse_delta(cc.get("stale-if-error"))
        window = float(own) if own is not None else stale_if_error
    return StorePolicy(
        True,
        lifetime=lifetime,
        initial_age=initial_age,
        stale_window=window,
        auth_ok=explicit_share,
        vary=names,
        strip=strip,
    )


def _initial_age(
    age: str | None, date: str | None, now: float, request_time: float | None
) -> float:
    """§4.2.3: max(apparent age, Age + response delay)."""
    date_at = parse_http_date(date)
    apparent = max(0.0, now - date_at) if date_at is not None else 0.0
    age_value = parse_delta(age) or 0
    delay = now - request_time if request_time is not None else 0.0
    return max(apparent, age_value + max(0.0, delay))


# ------------------------------------------------------------------------------ serving


def current_age(stored_at: float, initial_age: float, now: float) -> float:
    return initial_age + max(0.0, now - stored_at)


def is_fresh(lifetime: float, age: float, policy: RequestPolicy) -> bool:
    """Fresh for this request: within its lifetime and the request's max-age / min-fresh."""
    if policy.max_age is not None and age > policy.max_age:
        return False
    return age + policy.min_fresh < lifetime


def stale_usable(lifetime: float, age: float, stale_window: float) -> bool:
    """May a stale entry replace an error (RFC 5861 stale-if-error)?"""
    return stale_window > 0 and age < lifetime + stale_window


def etag_matches(if_none_match: str, etag: str) -> bool:
    """Weak comparison of an If-None-Match list against one ETag (RFC 9110 §13.1.2)."""
    if if_none_match.strip() == "*":
        return True
    ours = etag.strip().removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == ours for tag in if_none_match.split(","))


def not_modified(
    status: int,
    if_none_match: str | None,
    if_modified_since: str | None,
    etag: str | None,
    last_modified: str | None,
) -> bool:
    """Should a hit of this status be answered 304? Only a 2xx one: RFC 9110 §13.2.1 has
    preconditions ignored when the response would be anything else (a cached 404 stays a
    404). If-None-Match wins over If-Modified-Since (§13.2.2)."""
    if not 200 <= status < 300:
        return False
    if if_none_match is not None:
        return etag is not None and etag_matches(if_none_match, etag)
    if if_modified_since is None or last_modified is None:
        return False
    since = parse_http_date(if_modified_since)
    modified = parse_http_date(last_modified)
    return since is not None and modified is not None and modified <= since
