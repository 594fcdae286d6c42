"""The route matcher: path semantics, precedence, hosts, headers, methods, scale."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.routing.matcher import Match, Matcher, NoMatch, RouteSpec


def no_headers(name: str) -> str | None:
    return None


def headers_of(values: Mapping[str, str]) -> Callable[[str], str | None]:
    return values.get


def route(
    name: str,
    *paths: str,
    methods: Sequence[str] | None = None,
    hosts: Sequence[str] | None = None,
    headers: Mapping[str, str] | None = None,
    priority: int = 0,
) -> RouteSpec:
    return RouteSpec(
        name=name,
        paths=paths,
        methods=frozenset(methods) if methods is not None else None,
        hosts=tuple(hosts) if hosts is not None else None,
        headers=tuple(headers.items()) if headers is not None else None,
        regex_priority=priority,
    )


def matched(
    matcher: Matcher,
    path: str,
    *,
    host: str = "gw.local",
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
) -> str | None:
    """The name of the route chosen, or None."""
    result = matcher.match(host, method, path, headers_of(headers or {}))
    return result.spec.name if isinstance(result, Match) else None


# --- path semantics ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/hello_service", "hello"),
        ("/hello_service/", "hello"),
        ("/hello_service/x", "hello"),
        ("/hello_service/x/y/z", "hello"),
        ("/hello_servicex", None),
        ("/hello", None),
        ("/", None),
    ],
)
def test_a_path_is_a_prefix_on_segment_boundaries(path: str, expected: str | None) -> None:
    matcher = Matcher([route("hello", "/hello_service")])
    assert matched(matcher, path) == expected


def test_root_matches_everything_and_is_the_last_resort() -> None:
    matcher = Matcher([route("root", "/"), route("api", "/api")])
    assert matched(matcher, "/") == "root"
    assert matched(matcher, "/anything/at/all") == "root"
    assert matched(matcher, "/apix") == "root"
    assert matched(matcher, "/api/v1") == "api"


def test_a_trailing_slash_on_a_prefix_pattern_changes_nothing() -> None:
    matcher = Matcher([route("a", "/a/")])
    assert matched(matcher, "/a") == "a"
    assert matched(matcher, "/a/b") == "a"
    assert matcher.table()[0]["path"] == "/a"


def test_params_capture_one_non_empty_segment() -> None:
    matcher = Matcher([route("orders", "/api/{user_id}/orders")])
    result = matcher.match("h", "GET", "/api/42/orders/7", no_headers)
    assert isinstance(result, Match)
    assert result.params == {"user_id": "42"}
    assert result.prefix == "/api/42/orders"
    assert result.exact is False
    assert matched(matcher, "/api/42/orders") == "orders"
    assert matched(matcher, "/api/42/ordersx") is None
    assert matched(matcher, "/api/42") is None
    assert matched(matcher, "/api/42/x/orders") is None


def test_a_param_does_not_capture_an_empty_segment() -> None:
    matcher = Matcher([route("user", "/users/{id}"), route("users", "/users")])
    assert matched(matcher, "/users/") == "users"
    assert matched(matcher, "/users/7") == "user"


def test_param_values_are_percent_decoded() -> None:
    matcher = Matcher([route("file", "/files/{name}/{rest}")])
    result = matcher.match("h", "GET", "/files/a%2Fb/c%20d%FF", no_headers)
    assert isinstance(result, Match)
    assert result.params == {"name": "a/b", "rest": "c d\udcff"}
    assert result.prefix == "/files/a%2Fb/c%20d%FF"  # the concrete request text


def test_routes_may_name_the_same_position_differently() -> None:
    matcher = Matcher([route("a", "/u/{id}/a"), route("b", "/u/{uid}/b")])
    first = matcher.match("h", "GET", "/u/1/a", no_headers)
    second = matcher.match("h", "GET", "/u/2/b", no_headers)
    assert isinstance(first, Match) and first.params == {"id": "1"}
    assert isinstance(second, Match) and second.params == {"uid": "2"}


@pytest.mark.parametrize(
    ("path", "expected"),
    [("/health", "exact"), ("/health/", "prefix"), ("/health/x", "prefix"), ("/healthz", None)],
)
def test_an_exact_path_matches_only_itself(path: str, expected: str | None) -> None:
    matcher = Matcher([route("prefix", "/health/"), route("exact", "=/health")])
    assert matched(matcher, path) == expected


def test_exact_root_and_exact_trailing_slash() -> None:
    matcher = Matcher([route("home", "=/"), route("dir", "=/docs/"), route("docs", "/docs/x")])
    assert matched(matcher, "/") == "home"
    assert matched(matcher, "/x") is None
    assert matched(matcher, "/docs/") == "dir"
    assert matched(matcher, "/docs") is None


def test_match_prefix_and_exact_flag() -> None:
    matcher = Matcher(
        [route("root", "/"), route("hello", "/hello_service"), route("health", "=/health")]
    )
    cases = {
        "/hello_service/x": ("hello", "/hello_service", False),
        "/hello_service": ("hello", "/hello_service", False),
        "/health": ("health", "/health", True),
        "/other": ("root", "/", False),
    }
    for path, (name, prefix, exact) in cases.items():
        result = matcher.match("h", "GET", path, no_headers)
        assert isinstance(result, Match)
        assert (result.spec.name, result.prefix, result.exact, result.params) == (
            name,
            prefix,
            exact,
            {},
        )


def test_a_route_with_several_paths_uses_the_one_that_matched() -> None:
    matcher = Matcher([route("multi", "/a", "/b/{id}", "=/c")])
    for path, prefix in [("/a/x", "/a"), ("/b/1/x", "/b/1"), ("/c", "/c")]:
        result = matcher.match("h", "GET", path, no_headers)
        assert isinstance(result, Match)
        assert result.prefix == prefix


# --- precedence -------------------------------------------------------------------------------

PRECEDENCE_ROUTES = [
    route("root", "/"),
    route("api", "/api"),
    route("api-user", "/api/{user_id}"),
    route("api-me", "/api/me"),
    route("api-user-orders", "/api/{user_id}/orders"),
    route("api-me-orders", "/api/me/orders"),
    route("any-orders", "/{section}/{id}/orders/{order}"),
    route("exact-me", "=/api/me"),
    route("orders-post", "/api/{user_id}/orders", methods=["POST"]),
    route("orders-beta", "/api/{user_id}/orders", headers={"x-beta": "1"}),
    route("orders-beta-eu", "/api/{user_id}/orders", headers={"x-beta": "1", "x-region": "*"}),
]

PRECEDENCE_CASES: list[tuple[str, str, dict[str, str], str]] = [
    ("GET", "/api/me", {}, "exact-me"),  # exact beats prefix
    ("GET", "/api/me/", {}, "api-me"),  # literal beats param at the same depth
    ("GET", "/api/you", {}, "api-user"),
    ("GET", "/api/me/orders", {}, "api-me-orders"),
    ("GET", "/api/you/orders", {}, "api-user-orders"),
    ("POST", "/api/you/orders", {}, "orders-post"),  # a method list beats method-any
    ("GET", "/api/you/orders", {"x-beta": "1"}, "orders-beta"),  # headers beat methods
    ("POST", "/api/you/orders", {"x-beta": "1"}, "orders-beta"),
    ("GET", "/api/you/orders", {"x-beta": "1", "x-region": "eu"}, "orders-beta-eu"),
    ("GET", "/api/you/orders", {"x-beta": "2"}, "api-user-orders"),
    ("GET", "/api/you/orders/5", {}, "any-orders"),  # deeper beats literal-first
    ("GET", "/api/me/orders/5", {}, "any-orders"),
    ("GET", "/api", {}, "api"),
    ("GET", "/apix", {}, "root"),
    ("GET", "/web/1/orders", {}, "root"),  # any-orders needs a 4th segment
]


@pytest.mark.parametrize("seed", range(8))
def test_the_most_specific_route_wins_whatever_the_file_order(seed: int) -> None:
    routes = list(PRECEDENCE_ROUTES)
    random.Random(seed).shuffle(routes)
    matcher = Matcher(routes)
    for method, path, headers, expected in PRECEDENCE_CASES:
        assert matched(matcher, path, method=method, headers=headers) == expected, (
            method,
            path,
            headers,
        )


def test_file_order_breaks_ties() -> None:
    first, second = route("first", "/same"), route("second", "/same")
    assert matched(Matcher([first, second]), "/same") == "first"
    assert matched(Matcher([second, first]), "/same") == "second"


def test_a_more_specific_route_that_fails_a_condition_falls_through() -> None:
    matcher = Matcher(
        [route("users-get", "/api/users", methods=["GET"]), route("api", "/api", methods=["POST"])]
    )
    assert matched(matcher, "/api/users", method="POST") == "api"
    assert matched(matcher, "/api/users", method="GET") == "users-get"


def test_literal_beats_param_from_the_left_at_equal_depth() -> None:
    matcher = Matcher([route("param-first", "/{x}/b"), route("literal-first", "/a/{y}")])
    assert matched(matcher, "/a/b") == "literal-first"
    assert matched(matcher, "/c/b") == "param-first"


# --- hosts ------------------------------------------------------------------------------------

HOST_ROUTES = [
    route("any", "/"),
    route("any-api", "/api/v1"),
    route("wild", "/", hosts=["*.example.com"]),
    route("wild-deep", "/", hosts=["*.eu.example.com"]),
    route("exact", "/", hosts=["api.example.com"]),
    route("exact-admin", "/admin", hosts=["api.example.com", "admin.example.com"]),
]


@pytest.mark.parametrize(
    ("host", "path", "expected"),
    [
        ("api.example.com", "/x", "exact"),
        ("api.example.com:8443", "/x", "exact"),  # the port is ignored
        ("api.example.com.", "/x", "exact"),  # and so is a final dot
        ("api.example.com", "/admin/x", "exact-admin"),
        ("admin.example.com", "/admin", "exact-admin"),
        ("admin.example.com", "/x", "wild"),  # its exact routes fail: wildcards next
        ("api.example.com", "/api/v1/x", "exact"),  # host first, then path specificity
        ("shop.example.com", "/x", "wild"),
        ("a.b.example.com:80", "/x", "wild"),
        ("shop.eu.example.com", "/x", "wild-deep"),  # longest wildcard suffix first
        ("example.com", "/x", "any"),  # "*.example.com" needs a label in front
        ("other.org", "/api/v1", "any-api"),
        ("", "/x", "any"),
        ("[::1]:8080", "/x", "any"),
        ("[::1]", "/x", "any"),
    ],
)
def test_host_selects_routes_first(host: str, path: str, expected: str) -> None:
    routes = list(HOST_ROUTES)
    random.Random(host).shuffle(routes)
    assert matched(Matcher(routes), path, host=host) == expected


def test_host_specific_routes_fall_back_to_host_less_ones() -> None:
    matcher = Matcher([route("exact", "/private", hosts=["api.example.com"]), route("any", "/")])
    assert matched(matcher, "/public", host="api.example.com") == "any"
    assert matched(matcher, "/private", host="api.example.com") == "exact"
    assert matched(matcher, "/private", host="www.example.com") == "any"


def test_without_host_less_routes_an_unknown_host_is_not_found() -> None:
    matcher = Matcher([route("exact", "/", hosts=["api.example.com"])])
    assert matcher.match("evil.com", "GET", "/", no_headers) == NoMatch()


def test_repeated_host_values_are_cached_and_bounded() -> None:
    matcher = Matcher([route("exact", "/", hosts=["api.example.com"]), route("any", "/")])
    for i in range(5000):
        assert matched(matcher, "/", host=f"h{i}.example.org") == "any"
        assert matched(matcher, "/", host="api.example.com:8080") == "exact"


@pytest.mark.parametrize("host", ["api.example.com:80", "a*.example.com", "*example.com", "x/y"])
def test_bad_host_patterns_are_rejected(host: str) -> None:
    with pytest.raises(ValueError):
        Matcher([route("bad", "/", hosts=[host])])


def test_a_star_host_means_any_host() -> None:
    matcher = Matcher([route("star", "/", hosts=["*"])])
    assert matched(matcher, "/", host="whatever.org") == "star"


# --- headers and methods ----------------------------------------------------------------------


def test_header_conditions() -> None:
    matcher = Matcher(
        [
            route("present", "/", headers={"x-debug": "*"}),
            route("value", "/", headers={"x-version": "2"}),
            route("plain", "/"),
        ]
    )
    assert matched(matcher, "/", headers={"x-debug": ""}) == "present"
    assert matched(matcher, "/", headers={"x-version": "2"}) == "value"
    assert matched(matcher, "/", headers={"x-version": "3"}) == "plain"
    assert matched(matcher, "/", headers={"x-version": "2 "}) == "plain"  # values compare exactly


def test_headers_are_looked_up_only_for_routes_with_conditions() -> None:
    asked: list[str] = []

    def header(name: str) -> str | None:
        asked.append(name)
        return None

    matcher = Matcher([route("plain", "/a"), route("cond", "/b", headers={"x-a": "1"})])
    assert isinstance(matcher.match("h", "GET", "/a/x", header), Match)
    assert asked == []
    matcher.match("h", "GET", "/b", header)
    assert asked == ["x-a"]


def test_method_mismatch_gives_the_allowed_methods() -> None:
    matcher = Matcher(
        [
            route("read", "/items", methods=["GET", "HEAD"]),
            route("write", "/items", methods=["POST"]),
            route("beta", "/items", methods=["DELETE"], headers={"x-beta": "1"}),
            route("other", "/other", methods=["PUT"]),
        ]
    )
    result = matcher.match("h", "PATCH", "/items/1", no_headers)
    assert result == NoMatch(frozenset({"GET", "HEAD", "POST"}))  # "beta" failed its header
    result = matcher.match("h", "PATCH", "/items/1", headers_of({"x-beta": "1"}))
    assert isinstance(result, NoMatch)
    assert result.allowed_methods == {"GET", "HEAD", "POST", "DELETE"}
    missing = matcher.match("h", "GET", "/nothing", no_headers)
    assert isinstance(missing, NoMatch)
    assert missing.allowed_methods == frozenset()


def test_a_method_any_route_avoids_the_405() -> None:
    matcher = Matcher([route("read", "/items", methods=["GET"]), route("root", "/")])
    assert matched(matcher, "/items", method="DELETE") == "root"


def test_allowed_methods_gather_across_host_groups() -> None:
    matcher = Matcher(
        [
            route("a", "/x", methods=["GET"], hosts=["api.example.com"]),
            route("b", "/x", methods=["PUT"]),
        ]
    )
    result = matcher.match("api.example.com", "POST", "/x", no_headers)
    assert isinstance(result, NoMatch)
    assert result.allowed_methods == {"GET", "HEAD", "PUT"}


# --- table, repr, validation ------------------------------------------------------------------


def test_table_lists_routes_in_priority_order() -> None:
    matcher = Matcher(
        [
            route("root", "/"),
            route("user", "/api/{id}", methods=["GET", "POST"]),
            route("me", "/api/me"),
            route("health", "=/health"),
            route("wild", "/w", hosts=["*.example.com"]),
            route("exact", "/e", hosts=["api.example.com"], headers={"x-a": "1"}),
        ]
    )
    table = matcher.table()
    assert [row["name"] for row in table] == ["exact", "wild", "health", "me", "user", "root"]
    assert table[0] == {
        "name": "exact",
        "host": "api.example.com",
        "methods": "*",
        "path": "/e",
        "kind": "prefix",
        "headers": "x-a=1",
    }
    assert table[2]["kind"] == "exact"
    assert table[4]["methods"] == "GET,HEAD,POST"
    assert table[4]["path"] == "/api/{id}"
    assert table[5]["host"] == "*"


def test_repr() -> None:
    matcher = Matcher(
        [
            route("a", "/a", hosts=["a.example.com", "*.example.com"]),
            route("b", "/b", hosts=["b.example.com"]),
            route("c", "/c"),
        ]
    )
    assert repr(matcher) == "<Matcher 3 routes, 3 hosts>"
    assert repr(Matcher([])) == "<Matcher 0 routes, 0 hosts>"


def test_no_routes_means_not_found() -> None:
    assert Matcher([]).match("h", "GET", "/", no_headers) == NoMatch()


def test_patterns_are_normalised_like_requests() -> None:
    matcher = Matcher([route("cafe", "/caf\u00e9", "/caf%c3%a9s"), route("tilde", "/%7Euser")])
    assert matched(matcher, "/caf%C3%A9/x") == "cafe"
    assert matched(matcher, "/caf%C3%A9s") == "cafe"
    assert matched(matcher, "/~user") == "tilde"


@pytest.mark.parametrize(
    "paths",
    [(), ("api",), ("/a/{x",), ("/a/x}",), ("/a/{x}y",), ("/a/{}",), ("/{x}/{x}",), ("/a%zz",)],
)
def test_bad_patterns_are_rejected(paths: tuple[str, ...]) -> None:
    with pytest.raises(ValueError):
        Matcher([RouteSpec(name="bad", paths=paths)])


# --- against a brute-force model --------------------------------------------------------------

SEGMENTS = ["a", "b", "{p}", "{q}"]
REQUEST_SEGMENTS = ["a", "b", "c", ""]
HOST_CHOICES: list[tuple[str, ...] | None] = [
    None,
    None,
    ("x.example.com",),
    ("*.example.com",),
    ("*.x.example.com",),
    ("x.example.com", "*.example.com"),
]


@st.composite
def route_specs(draw: st.DrawFn, index: int) -> RouteSpec:
    patterns = []
    for _ in range(draw(st.integers(1, 2))):
        segments = draw(st.lists(st.sampled_from(SEGMENTS), max_size=3))
        # Parameter names are unique within a pattern and vary between routes.
        segments = [
            s[:2] + str(i) + "}" if s.startswith("{") else s for i, s in enumerate(segments)
        ]
        exact = draw(st.booleans())
        patterns.append(("=" if exact else "") + "/" + "/".join(segments))
    methods = draw(st.sampled_from([None, frozenset({"GET"}), frozenset({"POST", "PUT"})]))
    headers = draw(
        st.sampled_from([None, (("x-h", "1"),), (("x-h", "*"),), (("x-h", "1"), ("x-i", "*"))])
    )
    hosts = draw(st.sampled_from(HOST_CHOICES))
    return RouteSpec(f"r{index}", tuple(dict.fromkeys(patterns)), methods, hosts, headers)


def _path_key(pattern: str, request: list[str]) -> tuple[object, ...] | None:
    """Priority key of a path pattern for a request's segments, or None when it does not match."""
    exact = pattern.startswith("=")
    text = pattern[1:] if exact else pattern
    segments = text[1:].split("/") if (text != "/" or exact) else []
    if not exact and segments and segments[-1] == "":
        segments = segments[:-1]
    if len(segments) > len(request) or (exact and len(segments) != len(request)):
        return None
    for wanted, got in zip(segments, request, strict=False):
        if wanted.startswith("{"):
            if not got:
                return None
        elif wanted != got:
            return None
    shape = tuple(1 if s.startswith("{") else 0 for s in segments)
    return (0 if exact else 1, -len(segments), shape)


def _host_rank(hosts: tuple[str, ...] | None, host: str) -> tuple[int, int] | None:
    if hosts is None:
        return (2, 0)
    ranks = []
    for pattern in hosts:
        if pattern == host:
            ranks.append((0, 0))
        elif (
            pattern.startswith("*.") and host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
        ):
            ranks.append((1, -len(pattern)))
    return min(ranks) if ranks else None


def model(
    specs: list[RouteSpec], host: str, method: str, path: str, headers: dict[str, str]
) -> tuple[str, str] | frozenset[str]:
    """(route name, pattern) chosen by brute force, or the allowed methods when none is."""
    request = path[1:].split("/")
    best: tuple[object, ...] | None = None
    winner: tuple[str, str] | None = None
    allowed: set[str] = set()
    for index, spec in enumerate(specs):
        rank = _host_rank(spec.hosts, host)
        if rank is None:
            continue
        if any(
            headers.get(n) is None or (v != "*" and headers[n] != v) for n, v in spec.headers or ()
        ):
            continue
        for pattern in spec.paths:
            key = _path_key(pattern, request)
            if key is None:
                continue
            methods = spec.methods
            if methods is not None and "GET" in methods:
                methods = methods | {"HEAD"}  # a GET route serves HEAD
            if methods is not None and method not in methods:
                allowed |= methods
                continue
            full = (rank, *key, -len(spec.headers or ()), spec.methods is None, index)
            if best is None or full < best:
                best, winner = full, (spec.name, pattern)
    return winner if winner is not None else frozenset(allowed)


@settings(max_examples=300, deadline=None)
@given(
    data=st.data(),
    count=st.integers(1, 12),
    request_segments=st.lists(st.sampled_from(REQUEST_SEGMENTS), min_size=1, max_size=4),
    host=st.sampled_from(["x.example.com", "y.example.com", "a.x.example.com", "example.com"]),
    method=st.sampled_from(["GET", "HEAD", "POST", "DELETE"]),
    headers=st.sampled_from([{}, {"x-h": "1"}, {"x-h": "2", "x-i": "z"}, {"x-h": "1", "x-i": ""}]),
)
def test_agrees_with_a_brute_force_model(
    data: st.DataObject,
    count: int,
    request_segments: list[str],
    host: str,
    method: str,
    headers: dict[str, str],
) -> None:
    specs = [data.draw(route_specs(i)) for i in range(count)]
    if any("" in r for r in request_segments[:-1]):
        request_segments = [s for s in request_segments if s] or [""]  # a normalised path
    path = "/" + "/".join(request_segments)
    expected = model(specs, host, method, path, headers)
    matcher = Matcher(specs)
    result = matcher.match(host, method, path, headers_of(headers))
    # the second time the answer may come from the match cache: the same answer
    assert matcher.match(host, method, path, headers_of(headers)) == result
    if isinstance(expected, frozenset):
        assert result == NoMatch(expected)
    else:
        assert isinstance(result, Match)
        name, pattern = expected
        exact = pattern.startswith("=")
        text = pattern.lstrip("=")
        pattern_segments = [s for s in text[1:].split("/") if s] if text != "/" else []
        if exact:
            pattern_segments = text[1:].split("/")
        assert (result.spec.name, result.exact) == (name, exact)
        assert result.params == {
            s[1:-1]: request_segments[i] for i, s in enumerate(pattern_segments) if s[:1] == "{"
        }
        depth = len(pattern_segments)
        assert result.prefix == (path if exact else "/" + "/".join(request_segments[:depth]))


# --- the match cache --------------------------------------------------------------------------


def test_matches_are_cached_by_method_and_path() -> None:
    matcher = Matcher(
        [route("orders", "/orders/{id}"), route("posts", "/orders", methods=["POST"])]
    )
    first = matcher.match("gw.local", "GET", "/orders/7", no_headers)
    assert isinstance(first, Match) and first.params == {"id": "7"}
    assert (
        matcher.match("other.host", "GET", "/orders/7", no_headers) is first
    )  # no route names hosts
    assert matcher.match("gw.local", "GET", "/orders/8", no_headers).params == {"id": "8"}
    assert matched(matcher, "/orders", method="POST") == "posts"
    assert matched(matcher, "/orders", method="GET") is None  # a 405, not a cached POST match
    assert matched(matcher, "/orders", method="POST") == "posts"


def test_with_host_routes_the_cache_is_by_host_too() -> None:
    matcher = Matcher([route("api", "/", hosts=["api.example.com"]), route("any", "/")])
    for _ in range(2):
        assert matched(matcher, "/x", host="api.example.com") == "api"
        assert matched(matcher, "/x", host="www.example.com") == "any"


def test_no_cache_where_a_route_matches_on_a_header_field() -> None:
    matcher = Matcher([route("v2", "/", headers={"x-version": "2"}), route("v1", "/")])
    for _ in range(2):
        assert matched(matcher, "/x", headers={"x-version": "2"}) == "v2"
        assert matched(matcher, "/x") == "v1"
    assert matcher.match("gw.local", "GET", "/x", no_headers) is not matcher.match(
        "gw.local", "GET", "/x", no_headers
    )


def test_the_match_cache_is_bounded_and_keeps_no_misses() -> None:
    from apigate.routing.matcher import _MATCH_CACHE_SIZE

    matcher = Matcher([route("users", "/users")])
    for i in range(_MATCH_CACHE_SIZE + 10):
        assert matched(matcher, f"/users/{i}") == "users"
        assert matched(matcher, f"/nowhere/{i}") is None
    cached = matcher._matches["GET"]
    assert 0 < len(cached) <= _MATCH_CACHE_SIZE
    assert all(isinstance(found, Match) for found in cached.values())


# --- scale ------------------------------------------------------------------------------------


def _microseconds_per_match(matcher: Matcher, path: str, iterations: int) -> float:
    match = matcher._match  # the walk itself: a repeated path is answered from the cache
    start = time.perf_counter()
    for _ in range(iterations):
        match("gw.local", "GET", path, no_headers)
    return (time.perf_counter() - start) / iterations * 1e6


def _routes(count: int) -> list[RouteSpec]:
    specs = []
    for i in range(count):
        if i % 3 == 0:
            specs.append(route(f"svc{i}", f"/svc{i}"))
        elif i % 3 == 1:
            specs.append(route(f"svc{i}", f"/svc{i}/{{id}}/orders", methods=["GET", "POST"]))
        else:
            specs.append(route(f"svc{i}", f"=/svc{i}/health"))
    return specs


def test_ten_thousand_routes_match_as_fast_as_ten() -> None:
    small, large = Matcher(_routes(10)), Matcher(_routes(10_000))
    paths = ["/svc3/x/y", "/svc4/42/orders/7", "/svc5/health", "/nowhere/at/all"]
    for path in paths:
        assert small.match("gw.local", "GET", path, no_headers) == large.match(
            "gw.local", "GET", path, no_headers
        )
    # Interleaved, best of several runs: the machine may be busy with other work.
    timings: dict[str, list[float]] = {"small": [], "large": []}
    for _ in range(7):
        for name, matcher in (("small", small), ("large", large)):
            timings[name].append(
                sum(_microseconds_per_match(matcher, p, 2_000) for p in paths) / len(paths)
            )
    ten, ten_thousand = min(timings["small"]), min(timings["large"])
    print(f"\nmatch: {ten:.2f} µs with 10 routes, {ten_thousand:.2f} µs with 10,000 routes")
    assert ten_thousand < 5 * ten


# ------------------------------------------------------------------ review: other readings
def test_a_get_route_serves_head() -> None:
    matcher = Matcher([route("open", "/"), route("admin", "/admin", methods=["GET"])])
    found = matcher.match("", "HEAD", "/admin", headers_of({}))
    assert isinstance(found, Match) and found.spec.name == "admin"
    refused = Matcher([route("admin", "/admin", methods=["GET"])]).match(
        "", "POST", "/admin", headers_of({})
    )
    assert isinstance(refused, NoMatch) and refused.allowed_methods == {"GET", "HEAD"}


@pytest.mark.parametrize(
    ("path", "others"),
    [
        ("/admin%2Fusers", ["admin"]),  # the open route; read as /admin/users, the admin route
        ("/admin;x", ["admin"]),
        ("/admin;%2F..", ["admin"]),  # Tomcat: /admin; decoded first: / (the open route)
        ("/files/a%2Fb", []),  # the files route either way
        ("/other%2Fthing", []),  # the open route either way
    ],
)
def test_other_routes_a_path_reads_as(path: str, others: list[str]) -> None:
    matcher = Matcher([route("open", "/"), route("admin", "/admin"), route("files", "/files")])
    found = matcher.match("", "GET", path, headers_of({}))
    assert isinstance(found, Match)
    got = matcher.other_routes("", "GET", path, headers_of({}), found)
    assert [m.spec.name for m in got] == others


def test_an_other_reading_no_route_matches_is_no_way_around_one() -> None:
    matcher = Matcher([route("files", "/files/{name}"), route("admin", "/admin")])
    path = "/files/a%2Fb"  # /files/a/b matches nothing
    found = matcher.match("", "GET", path, headers_of({}))
    assert isinstance(found, Match) and found.params == {"name": "a/b"}
    assert matcher.other_routes("", "GET", path, headers_of({}), found) == []


def test_routing_fields_are_those_routes_match_on_with_their_underscore_spellings() -> None:
    matcher = Matcher(
        [route("a", "/", headers={"X-Tenant": "internal"}), route("b", "/", headers={"x-v": "*"})]
    )
    assert matcher.routing_fields == {b"x-tenant", b"x-v"}
    assert matcher.routing_field_spellings == {b"x_tenant", b"x_v"}
    assert Matcher([route("a", "/")]).routing_fields == frozenset()


def test_a_route_naming_head_wins_it_over_a_get_route_of_the_same_pattern() -> None:
    """GET routes serve HEAD; one that lists HEAD itself still gets it, whatever the order."""
    for order in (1, -1):
        specs = [route("get", "/x", methods=["GET"]), route("head", "/x", methods=["HEAD"])]
        matcher = Matcher(specs[::order])
        found = matcher.match("", "HEAD", "/x", headers_of({}))
        assert isinstance(found, Match) and found.spec.name == "head"
        got = matcher.match("", "GET", "/x", headers_of({}))
        assert isinstance(got, Match) and got.spec.name == "get"
