"""RFC 9111 decisions (`apigate.plugins.cache_rules`): pure functions, no clock, no I/O."""

from __future__ import annotations

from email.utils import formatdate
from typing import Any

import pytest

from apigate.plugins.cache_rules import (
    CACHEABLE_STATUSES,
    RequestPolicy,
    current_age,
    etag_matches,
    freshness_lifetime,
    invalidates,
    is_fresh,
    is_unsafe,
    not_modified,
    parse_cache_control,
    parse_delta,
    parse_http_date,
    request_policy,
    response_policy,
    stale_usable,
    vary_names,
)

NOW = 1_700_000_000.0


def http_date(ts: float) -> str:
    return formatdate(ts, usegmt=True)


def store(**kwargs: Any) -> Any:
    kwargs.setdefault("status", 200)
    kwargs.setdefault("cache_control", None)
    return response_policy(now=NOW, **kwargs)


# ------------------------------------------------------------------------------ parsing


def test_parse_cache_control() -> None:
    cc = parse_cache_control('Max-Age=60, private="Set-Cookie, X-A", no-store,public')
    assert cc == {"max-age": "60", "private": "Set-Cookie, X-A", "no-store": None, "public": None}
    assert parse_cache_control(None) == {}
    assert parse_cache_control("max-age=1, max-age=100") == {"max-age": "1"}  # first wins


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60", 60),
        (" 0 ", 0),
        ("-1", None),
        ("1.5", None),
        ("abc", None),
        (None, None),
        ("99999999999999", 2**31),
    ],
)
def test_parse_delta(text: str | None, expected: int | None) -> None:
    assert parse_delta(text) == expected


def test_parse_http_date_formats() -> None:
    assert parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT") == 784111777.0
    assert parse_http_date("Sunday, 06-Nov-94 08:49:37 GMT") == 784111777.0
    assert parse_http_date("Sun Nov  6 08:49:37 1994") == 784111777.0
    assert parse_http_date("0") is None
    assert parse_http_date(None) is None


# ------------------------------------------------------------------------------ requests


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS"])
def test_only_get_and_head_use_the_cache(method: str) -> None:
    policy = request_policy(method, None, None)
    assert not policy.lookup and not policy.store


def test_get_looks_up_and_stores_head_only_looks_up() -> None:
    assert request_policy("GET", None, None) == RequestPolicy(True, True)
    head = request_policy("HEAD", None, None)
    assert head.lookup and not head.store


def test_request_no_store_bypasses_everything() -> None:
    policy = request_policy("GET", "no-store", None)
    assert not policy.lookup and not policy.store


@pytest.mark.parametrize(
    ("cc", "pragma"), [("no-cache", None), ("max-age=0", None), (None, "no-cache")]
)
def test_request_no_cache_goes_upstream_but_refreshes_the_entry(
    cc: str | None, pragma: str | None
) -> None:
    policy = request_policy("GET", cc, pragma)
    assert not policy.lookup and policy.store


@pytest.mark.parametrize(
    ("cc", "pragma"),
    [
        ("no-cache", None),
        ("max-age=0", None),
        (None, "no-cache"),
        ("max-age=30", None),  # "does not wish to receive a stale response" (§5.2.1.1)
        ("min-fresh=5", None),
    ],
)
def test_a_request_that_demands_a_fresh_answer_takes_no_stale_one(
    cc: str | None, pragma: str | None
) -> None:
    assert not request_policy("GET", cc, pragma).stale_ok


@pytest.mark.parametrize(("method", "cc"), [("GET", None), ("HEAD", None), ("GET", "no-transform")])
def test_other_requests_take_a_stale_answer_for_an_error(method: str, cc: str | None) -> None:
    assert request_policy(method, cc, None).stale_ok


@pytest.mark.parametrize(
    ("method", "status", "expected"),
    [
        ("POST", 200, True),
        ("PUT", 201, True),
        ("DELETE", 204, True),
        ("PATCH", 303, True),
        ("PURGE", 200, True),  # an unknown method is not known to be safe (RFC 9110 §9.2.1)
        ("POST", 199, False),
        ("POST", 400, False),
        ("DELETE", 404, False),
        ("PUT", 500, False),
        ("GET", 200, False),
        ("HEAD", 200, False),
        ("OPTIONS", 200, False),
        ("TRACE", 200, False),
    ],
)
def test_a_non_error_response_to_an_unsafe_method_invalidates(
    method: str, status: int, expected: bool
) -> None:
    """RFC 9111 §4.4."""
    assert is_unsafe(method) is (method not in ("GET", "HEAD", "OPTIONS", "TRACE"))
    assert invalidates(method, status) is expected


def test_pragma_is_ignored_when_cache_control_is_present() -> None:
    assert request_policy("GET", "max-age=60", "no-cache").lookup


def test_request_max_age_and_min_fresh() -> None:
    policy = request_policy("GET", "max-age=10, min-fresh=5", None)
    assert policy.max_age == 10 and policy.min_fresh == 5
    assert is_fresh(lifetime=100, age=9, policy=policy)
    assert not is_fresh(lifetime=100, age=11, policy=policy)  # older than the client accepts
    assert not is_fresh(lifetime=12, age=8, policy=policy)  # would not stay fresh 5 s longer


# ------------------------------------------------------------------------------ statuses


@pytest.mark.parametrize("status", sorted(CACHEABLE_STATUSES))
def test_cacheable_statuses_are_stored(status: int) -> None:
    assert store(status=status, cache_control="max-age=60").store


@pytest.mark.parametrize("status", [201, 202, 206, 302, 303, 304, 307, 400, 401, 403, 500, 503])
def test_other_statuses_are_not_stored(status: int) -> None:
    policy = store(status=status, cache_control="max-age=60")
    assert not policy.store and policy.reason == f"status {status}"


# ------------------------------------------------------------------------------ directives


@pytest.mark.parametrize(
    ("cc", "reason"),
    [
        ("no-store, max-age=60", "no-store"),
        ("private, max-age=60", "private"),
        ("no-cache, max-age=60", "no-cache"),
        ("public, no-store", "no-store"),
    ],
)
def test_response_directives_that_forbid_storing(cc: str, reason: str) -> None:
    policy = store(cache_control=cc)
    assert not policy.store and policy.reason == reason


def test_qualified_private_and_no_cache_strip_the_named_fields() -> None:
    policy = store(cache_control='max-age=60, private="X-User", no-cache="X-Token"')
    assert policy.store and set(policy.strip) == {b"x-user", b"x-token"}


def test_s_maxage_wins_over_max_age_for_a_shared_cache() -> None:
    assert store(cache_control="max-age=10, s-maxage=300").lifetime == 300
    assert store(cache_control="s-maxage=300, max-age=10").lifetime == 300


def test_max_age_wins_over_expires() -> None:
    cc = "max-age=10"
    policy = store(cache_control=cc, expires=http_date(NOW + 3600), date=http_date(NOW))
    assert policy.lifetime == 10


def test_expires_is_the_fallback() -> None:
    policy = store(expires=http_date(NOW + 120), date=http_date(NOW))
    assert policy.store and policy.lifetime == 120


def test_invalid_expires_means_already_expired() -> None:
    policy = store(expires="0")
    assert not policy.store and policy.reason == "expired"


def test_malformed_max_age_is_stale_not_forever() -> None:
    assert not store(cache_control="max-age=abc").store


def test_zero_max_age_is_not_stored() -> None:
    assert not store(cache_control="max-age=0").store


def test_route_ttl_only_when_the_response_says_nothing() -> None:
    assert not store().store  # no freshness information and no ttl
    assert store(default_ttl=30).lifetime == 30
    assert store(cache_control="max-age=5", default_ttl=30).lifetime == 5
    assert not store(cache_control="max-age=0", default_ttl=30).store


def test_freshness_lifetime_directly() -> None:
    cc = parse_cache_control("public")
    assert freshness_lifetime(cc, None, None, None, NOW) is None
    assert freshness_lifetime(cc, http_date(NOW + 60), None, None, NOW) == 60  # no Date: now


# ------------------------------------------------------------------------------ Vary


def test_vary_names_are_normalised() -> None:
    assert vary_names("Accept-Encoding, accept-language,ACCEPT-ENCODING") == (
        "accept-encoding",
        "accept-language",
    )
    assert vary_names(None) == ()
    assert vary_names("Accept, *") is None


def test_vary_star_is_never_stored() -> None:
    policy = store(cache_control="max-age=60", vary="*")
    assert not policy.store and policy.reason == "vary *"


def test_vary_names_travel_with_the_policy() -> None:
    assert store(cache_control="max-age=60", vary="Accept-Language").vary == ("accept-language",)


# ------------------------------------------------------------------------------ Authorization


def test_authorization_is_not_shared_by_default() -> None:
    policy = store(cache_control="max-age=60", authorization=True)
    assert not policy.store and policy.reason == "authorization"


@pytest.mark.parametrize("cc", ["public, max-age=60", "s-maxage=60", "must-revalidate, max-age=60"])
def test_authorization_is_shared_when_the_response_allows_it(cc: str) -> None:
    policy = store(cache_control=cc, authorization=True)
    assert policy.store and policy.auth_ok


def test_entries_without_explicit_sharing_are_not_for_authorized_requests() -> None:
    assert not store(cache_control="max-age=60").auth_ok


def test_set_cookie_is_not_stored_unless_stripped() -> None:
    assert not store(cache_control="max-age=60", set_cookie=True).store
    assert store(cache_control='max-age=60, no-cache="Set-Cookie"', set_cookie=True).store


# ------------------------------------------------------------------------------ age


def test_upstream_age_counts_against_freshness() -> None:
    policy = store(cache_control="max-age=60", age="20")
    assert policy.initial_age == 20
    assert not store(cache_control="max-age=60", age="60").store  # arrived already stale


def test_apparent_age_from_date_and_response_delay() -> None:
    assert store(cache_control="max-age=60", date=http_date(NOW - 5)).initial_age == 5
    delayed = store(cache_control="max-age=60", age="2", request_time=NOW - 3)
    assert delayed.initial_age == 5


def test_current_age_grows_with_residence_time() -> None:
    assert current_age(stored_at=NOW, initial_age=3, now=NOW + 10) == 13
    assert current_age(stored_at=NOW, initial_age=0, now=NOW - 1) == 0  # clock went back


def test_freshness_boundary() -> None:
    plain = RequestPolicy(True, True)
    assert is_fresh(lifetime=60, age=59.9, policy=plain)
    assert not is_fresh(lifetime=60, age=60, policy=plain)


# ------------------------------------------------------------------------------ stale-if-error


def test_stale_if_error_window() -> None:
    policy = store(cache_control="max-age=60", stale_if_error=30)
    assert policy.stale_window == 30
    assert stale_usable(60, 89, policy.stale_window)
    assert not stale_usable(60, 91, policy.stale_window)
    assert not stale_usable(60, 61, 0)


def test_response_stale_if_error_directive_overrides_the_route() -> None:
    assert store(cache_control="max-age=60, stale-if-error=5", stale_if_error=30).stale_window == 5


@pytest.mark.parametrize(
    "cc", ["max-age=60, must-revalidate", "max-age=60, proxy-revalidate", "s-maxage=60"]
)
def test_revalidation_directives_forbid_serving_stale(cc: str) -> None:
    assert store(cache_control=cc, stale_if_error=30).stale_window == 0


# ------------------------------------------------------------------------------ conditionals


def test_etag_weak_comparison() -> None:
    assert etag_matches('"a", W/"b"', '"b"')
    assert etag_matches("*", '"x"')
    assert not etag_matches('"a"', '"b"')


def test_not_modified() -> None:
    modified = http_date(NOW - 100)
    assert not_modified(200, '"v1"', None, '"v1"', None)
    assert not not_modified(200, '"v2"', http_date(NOW), '"v1"', modified)  # INM wins over IMS
    assert not_modified(200, None, http_date(NOW), None, modified)
    assert not not_modified(200, None, http_date(NOW - 200), None, modified)
    assert not not_modified(200, None, None, '"v1"', modified)


@pytest.mark.parametrize("status", [204, 203])
def test_not_modified_for_any_2xx(status: int) -> None:
    assert not_modified(status, '"v1"', None, '"v1"', None)


@pytest.mark.parametrize("status", [300, 301, 308, 404, 405, 410, 414, 501])
def test_preconditions_apply_to_2xx_responses_only(status: int) -> None:
    """RFC 9110 §13.2.1: a precondition is ignored when the response would not be 2xx."""
    assert not not_modified(status, '"v1"', None, '"v1"', None)
    assert not not_modified(status, None, http_date(NOW), None, http_date(NOW - 100))
