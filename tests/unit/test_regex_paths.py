"""Regex paths (`~/...`, Kong's): matching, parameters, precedence, strip_prefix and rewrite,
the route table, config errors, and the literal start the matcher tests before the regex."""

from __future__ import annotations

import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apigate.cli import main as cli_main
from apigate.config import ConfigError, parse_config, parse_path_pattern
from apigate.routing.matcher import Match, Matcher, NoMatch, RouteSpecError
from apigate.routing.regex_path import compile_path_regex, literal_prefix
from apigate.routing.rewrite import compile_template, strip
from tests.unit.test_matcher import matched, route

USER = r"~/api/v\d+/users/(?<id>\d+)$"


def match(
    matcher: Matcher,
    path: str,
    *,
    host: str = "gw.local",
    method: str = "GET",
    headers: Mapping[str, str] | None = None,
) -> Match | NoMatch:
    return matcher.match(host, method, path, (headers or {}).get)


# --- matching ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "params"),
    [
        ("/api/v1/users/42", {"id": "42"}),
        ("/api/v20/users/7", {"id": "7"}),
        ("/api/v1/users/42/orders", None),  # "$": the whole path
        ("/api/vx/users/42", None),
        ("/api/v1/users/", None),
        ("/x/api/v1/users/42", None),  # anchored at the start, as re.match is
    ],
)
def test_a_kong_regex_matches_and_its_named_group_is_a_param(
    path: str, params: dict[str, str] | None
) -> None:
    result = match(Matcher([route("user", USER)]), path)
    if params is None:
        assert result == NoMatch()
    else:
        assert isinstance(result, Match)
        assert result.params == params
        assert result.prefix == path and result.exact is False


def test_without_a_dollar_a_regex_is_a_prefix_not_bound_to_segments() -> None:
    """Kong's semantics: re.match, so `~/api/v\\d+` matches `/api/v1x` too; a segment boundary
    is the author's to write, `(?:/|$)`."""
    loose = Matcher([route("v", r"~/api/v\d+")])
    assert matched(loose, "/api/v1/users") == "v"
    assert matched(loose, "/api/v1x") == "v"
    bounded = Matcher([route("v", r"~/api/v\d+(?:/|$)")])
    assert matched(bounded, "/api/v1/users") == "v"
    assert matched(bounded, "/api/v1") == "v"
    assert matched(bounded, "/api/v1x") is None


def test_only_named_groups_are_params_and_python_names_work_too() -> None:
    matcher = Matcher([route("r", r"~/(v\d)/(?P<kind>[a-z]+)/(?<id>\d+)(/.*)?$")])
    result = match(matcher, "/v2/users/9/x")
    assert isinstance(result, Match)
    assert result.params == {"kind": "users", "id": "9"}


def test_a_named_group_that_takes_no_part_is_an_empty_param() -> None:
    result = match(Matcher([route("r", r"~/files(?:/(?<name>[^/]+))?$")]), "/files")
    assert isinstance(result, Match) and result.params == {"name": ""}


def test_a_regex_sees_the_normalised_path_and_params_are_decoded() -> None:
    """The path as the other matchers see it: dot segments gone, unreserved escapes decoded,
    others (`%2F`, non-ASCII) kept encoded; the param is decoded as a `{param}` is."""
    matcher = Matcher([route("f", r"~/files/(?<name>[^/]+)$"), route("c", "~/caf%C3%A9$")])
    result = match(matcher, "/files/a%2Fb%20c")
    assert isinstance(result, Match) and result.params == {"name": "a/b c"}
    assert matched(matcher, "/caf%C3%A9") == "c"


def test_look_behinds_are_left_alone_by_the_named_group_translation() -> None:
    matcher = Matcher([route("r", r"~/a/(?<=/)(?<!x)(?<rest>b+)")])
    result = match(matcher, "/a/bb")
    assert isinstance(result, Match) and result.params == {"rest": "bb"}


# --- precedence -------------------------------------------------------------------------------


def test_exact_beats_regex_beats_every_prefix() -> None:
    matcher = Matcher(
        [
            route("root", "/"),
            route("deep", "/api/v1/users/{id}"),
            route("regex", USER),
            route("exact", "=/api/v1/users/1"),
        ]
    )
    assert matched(matcher, "/api/v1/users/1") == "exact"
    assert matched(matcher, "/api/v1/users/2") == "regex"  # over the deeper param route
    assert matched(matcher, "/api/v1/users/2/x") == "deep"  # the regex does not match
    assert matched(matcher, "/other") == "root"


def test_regex_routes_order_by_priority_then_literal_start() -> None:
    matcher = Matcher(
        [
            route("any", r"~/users/\w+"),
            route("me", r"~/users/me$"),  # a longer literal start than "/users/"
            route("low", r"~/users/(?<id>\d+)$", priority=-1),
            route("high", r"~/users/(?<id>7\d*)$", priority=5),
        ]
    )
    assert matched(matcher, "/users/me") == "me"
    assert matched(matcher, "/users/42") == "any"  # "low" comes after every priority-0 route
    assert matched(matcher, "/users/77") == "high"
    assert matched(matcher, "/users/alice") == "any"


ORDER_ROUTES = [
    route("root", "/"),
    route("api", "/api"),
    route("me", "/api/v1/users/me"),
    route("exact", "=/api/v1/users/0"),
    route("user", USER),
    route("me-rx", r"~/api/v1/users/me$"),
    route("v1-users", r"~/api/v1/users/\w+$"),  # a longer literal start than "user"
    route("v1", r"~/api/v1/", priority=-1),
    route("admin", r"~/api/v\d+/admin", priority=1),
    route("hosted", "/api", hosts=["h.example"]),
    route("posts", r"~/api/v\d+/users/(?<id>\d+)$", methods=["POST"]),
]
ORDER_EXPECTED = {
    ("/api/v1/users/0", "GET", "gw.local"): "exact",
    ("/api/v2/users/5", "GET", "gw.local"): "user",
    ("/api/v2/users/5", "POST", "gw.local"): "posts",  # same pattern: a method list first
    ("/api/v1/users/5", "GET", "gw.local"): "v1-users",
    ("/api/v1/users/me", "GET", "gw.local"): "me-rx",
    ("/api/v1/users/me/x", "GET", "gw.local"): "v1",
    ("/api/v2/admin/x", "GET", "gw.local"): "admin",
    ("/api/v1/admin", "GET", "gw.local"): "admin",
    ("/api/x", "GET", "gw.local"): "api",
    ("/x", "GET", "gw.local"): "root",
    ("/api/v1/users/5", "GET", "h.example"): "hosted",  # the host group decides first
    ("/x", "GET", "h.example"): "root",
}


@pytest.mark.parametrize("seed", range(12))
def test_precedence_does_not_depend_on_file_order(seed: int) -> None:
    routes = list(ORDER_ROUTES)
    random.Random(seed).shuffle(routes)
    if seed == 0:
        routes.reverse()
    matcher = Matcher(routes)
    got = {key: matched(matcher, key[0], method=key[1], host=key[2]) for key in ORDER_EXPECTED}
    assert got == ORDER_EXPECTED


_REGEX_POOL = [
    r"~/api/v\d+/users/(?<id>\d+)$",
    r"~/api/",
    r"~/api",  # no whole first segment: not indexed by one
    r"~/api\w*/x",
    r"~/(?<t>[a-z]+)/x",
    r"~/(?:api|web)/x",
    r"~/web/(?<rest>.*)",
    r"~/w",
    r"~/",
    r"~/api/x$",
]
_PATHS = ["/", "/api", "/api/", "/api/x", "/apiv/x", "/web/x", "/web/a/b", "/api/v2/users/3", "/w"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(_REGEX_POOL), st.integers(-1, 1), st.booleans()),
        min_size=1,
        max_size=6,
    )
)
def test_regex_routes_agree_with_a_linear_scan_in_priority_order(
    choices: list[tuple[str, int, bool]],
) -> None:
    """The per-first-segment index only skips regexes that cannot match."""
    specs = [
        route(f"r{i}", pattern, priority=priority, hosts=["h.example"] if hosted else None)
        for i, (pattern, priority, hosted) in enumerate(choices)
    ]
    matcher = Matcher(specs)

    def model(path: str, host: str) -> str | None:
        for hosted in (True, False):
            ranked = sorted(
                (
                    (-spec.regex_priority, -len(literal_prefix(compile_path_regex(p))), i)
                    for i, spec in enumerate(specs)
                    for p in spec.paths
                    if bool(spec.hosts) == hosted and (not hosted or host == "h.example")
                    if compile_path_regex(p).match(path)
                ),
            )
            if ranked:
                return specs[ranked[0][2]].name
        return None

    for path in _PATHS:
        for host in ("h.example", "other"):
            assert matched(matcher, path, host=host) == model(path, host), (path, host)


def test_file_order_breaks_a_tie_between_regexes() -> None:
    a, b = route("a", r"~/x/\d"), route("b", r"~/x/[0-9]")
    assert matched(Matcher([a, b]), "/x/1") == "a"
    assert matched(Matcher([b, a]), "/x/1") == "b"


def test_hosts_headers_and_methods_constrain_a_regex_route() -> None:
    matcher = Matcher(
        [
            route("hosted", USER, hosts=["api.example.com"], methods=["DELETE"]),
            route("tenant", USER, headers={"x-tenant": "a"}),
            route("fallback", "/api"),
        ]
    )
    assert matched(matcher, "/api/v1/users/1", host="api.example.com", method="DELETE") == (
        "hosted"
    )
    assert matched(matcher, "/api/v1/users/1", method="DELETE") == "fallback"
    assert matched(matcher, "/api/v1/users/1", headers={"x-tenant": "a"}) == "tenant"
    assert matched(matcher, "/api/v1/users/1", headers={"x-tenant": "b"}) == "fallback"


def test_a_method_mismatch_on_a_regex_route_gives_the_allowed_methods() -> None:
    matcher = Matcher([route("r", USER, methods=["GET", "POST"])])
    assert match(matcher, "/api/v1/users/1", method="PUT") == NoMatch(
        frozenset({"GET", "HEAD", "POST"})
    )
    assert match(matcher, "/api/v1/users/x", method="PUT") == NoMatch()


def test_head_goes_to_the_regex_route_naming_it() -> None:
    matcher = Matcher([route("get", USER, methods=["GET"]), route("head", USER, methods=["HEAD"])])
    assert matched(matcher, "/api/v1/users/1", method="HEAD") == "head"
    assert matched(matcher, "/api/v1/users/1", method="GET") == "get"
    only_get = Matcher([route("get", USER, methods=["GET"]), route("other", r"~/api/")])
    assert matched(only_get, "/api/v1/users/1", method="HEAD") == "get"


def test_another_reading_of_the_path_is_matched_against_regexes_too() -> None:
    """`/admin%2Fusers` read as `/admin/users` by a WSGI back end selects the regex route."""
    matcher = Matcher([route("open", "/"), route("admin", r"~/admin/\w+$")])
    result = match(matcher, "/admin%2Fusers")
    assert isinstance(result, Match) and result.spec.name == "open"
    others = matcher.other_routes("h", "GET", "/admin%2Fusers", {}.get, result)
    assert [m.spec.name for m in others] == ["admin"]


# --- strip_prefix and rewrite -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "path", "upstream"),
    [
        (r"~/api/v\d+", "/api/v2/users/1", "/users/1"),
        (r"~/api/v\d+/", "/api/v2/users/1", "/users/1"),
        (USER, "/api/v2/users/1", "/"),  # the whole path matched: "/" is left
        (r"~/(?<tenant>[a-z]+)/svc", "/acme/svc/x?", "/x?"),
    ],
)
def test_strip_prefix_removes_what_the_regex_matched(
    pattern: str, path: str, upstream: str
) -> None:
    result = match(Matcher([route("r", pattern)]), path)
    assert isinstance(result, Match)
    assert strip(path, result.prefix) == upstream


def test_a_rewrite_uses_named_groups_as_params() -> None:
    path = "/api/v3/users/42"
    result = match(Matcher([route("r", USER)]), path)
    assert isinstance(result, Match)
    rewrite = compile_template("/users/{id}", params=result.params)
    assert rewrite(result.params, path[len(result.prefix) :]) == "/users/42"
    wide = Matcher([route("r", r"~/files/(?<rest>.+)$")]).match("h", "GET", "/files/a/b", {}.get)
    assert isinstance(wide, Match)
    # a value never adds a separator, whatever the group spans (as for a {param})
    assert compile_template("/f/{rest}")(wide.params, "") == "/f/a%2Fb"


# --- the table ----------------------------------------------------------------------------------


def test_the_table_lists_regex_paths_between_exact_and_prefix_ones() -> None:
    matcher = Matcher(
        [
            route("root", "/"),
            route("low", r"~/b", priority=-2),
            route("user", USER, methods=["GET"]),
            route("health", "=/health"),
        ]
    )
    table = matcher.table()
    assert [(row["name"], row["kind"]) for row in table] == [
        ("health", "exact"),
        ("user", "regex"),
        ("low", "regex,priority=-2"),
        ("root", "prefix"),
    ]
    assert table[1] == {
        "name": "user",
        "host": "*",
        "methods": "GET,HEAD",
        "path": USER,
        "kind": "regex",
        "headers": "",
    }


def test_apigate_routes_prints_regex_routes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "services: {s: {}}\n"
        "routes:\n"
        "  - {name: root, match: {paths: [/]}, service: s}\n"
        "  - name: user\n"
        "    match: {paths: ['~/api/v\\d+/users/(?<id>\\d+)$'], regex_priority: 3}\n"
        "    service: s\n"
    )
    assert cli_main(["routes", "-c", str(path)]) == 0
    header, *rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert header == ["ROUTE", "HOST", "METHODS", "PATH", "KIND", "HEADERS", "SERVICE", "PLUGINS"]
    assert rows == [
        ["user", "*", "*", USER, "regex,priority=3", "-", "s", "-"],
        ["root", "*", "*", "/", "prefix", "-", "s", "-"],
    ]


# --- errors -------------------------------------------------------------------------------------


def test_the_matcher_refuses_a_bad_regex_as_a_route_error() -> None:
    with pytest.raises(RouteSpecError) as info:
        Matcher([route("bad", "/ok", "~/a(")])
    assert (info.value.route, info.value.field) == ("bad", "paths")
    assert "missing ), unterminated subpattern at position 3" in info.value.message


def _config(match: dict[str, Any], **route_keys: Any) -> dict[str, Any]:
    return {
        "services": {"s": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [
            {"name": "ok", "match": {"paths": ["/"]}, "service": "s"},
            {"name": "r", "match": match, "service": "s", **route_keys},
        ],
    }


def _errors(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    return info.value.errors


@pytest.mark.parametrize(
    ("paths", "error"),
    [
        (["/a", r"~/a/(?<id>\d{3}"], "routes[1].match.paths[1]: invalid regex "),
        (["~api"], "routes[1].match.paths[0]: invalid path '~api': a regex path must start"),
        (["~/(?<1x>a)"], "routes[1].match.paths[0]: invalid regex '~/(?<1x>a)': bad character"),
        (["~/(?<x>a)(?<x>b)"], "routes[1].match.paths[0]: invalid regex "),
        (["~/a{2,1}"], "routes[1].match.paths[0]: invalid regex '~/a{2,1}': min repeat greater"),
    ],
)
def test_a_bad_regex_is_a_config_error_at_its_path(paths: list[str], error: str) -> None:
    (got,) = _errors(_config({"paths": paths}))
    assert got.startswith(error), got


def test_the_error_gives_re_s_message_and_the_position_as_written() -> None:
    (got,) = _errors(_config({"paths": [r"~/a/(?<id>\d)/(?<x>b"]}))
    # "(" of "(?<x>" is character 14 of the text as written, though re saw "(?P<id>" first
    assert got == (
        r"routes[1].match.paths[0]: invalid regex '~/a/(?<id>\d)/(?<x>b': "
        "missing ), unterminated subpattern at position 14"
    )


def test_regex_priority_is_an_error_on_a_route_without_regex_paths() -> None:
    assert _errors(_config({"paths": ["/a"], "regex_priority": 2})) == [
        "routes[1].match.regex_priority: only orders regex paths ('~/...'), and this route has none"
    ]
    config = parse_config(_config({"paths": ["/a", "~/b"], "regex_priority": 2}))
    assert config.routes[1].match.regex_priority == 2


def test_named_groups_are_the_params_a_rewrite_or_an_aggregate_may_use() -> None:
    assert parse_path_pattern(USER) == (USER, False, ("id",))
    parse_config(_config({"paths": [USER]}, rewrite="/users/{id}"))
    (got,) = _errors(_config({"paths": [r"~/api/(v\d+)"]}, rewrite="/users/{v}"))
    assert got.startswith("routes[1].rewrite: parameter {v} is not captured by the match path")
    aggregate = {"a": {"service": "s", "path": "/users/{id}"}}
    data = _config({"paths": [USER]}, aggregate=aggregate)
    del data["routes"][1]["service"]
    parse_config(data)


# --- the literal start --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "literal"),
    [
        (USER, "/api/v"),
        (r"~/a\.b\-c/x", "/a.b-c/x"),
        ("~/ab?c", "/a"),
        ("~/ab*", "/a"),
        ("~/ab+", "/a"),  # (one "b" is certain, but stopping early is always safe)
        ("~/ab{2}", "/a"),
        ("~/a|/b", ""),  # an alternation at the top: no common start
        ("~/a(b|c)", "/a"),
        ("~/a[|]b", "/a"),
        (r"~/a\|b", "/a|b"),
        (r"~/a\db", "/a"),
        (r"~/a\x41", "/a"),
        ("~/a(?i:B)", "/a"),
        ("~/a$", "/a"),
        ("~/a.b", "/a"),
    ],
)
def test_literal_prefix(pattern: str, literal: str) -> None:
    assert literal_prefix(compile_path_regex(pattern)) == literal


_PIECES = st.sampled_from(
    ["/", "a", "b", ".", r"\.", "a?", "b*", "(a|b)", "[ab]", r"\d", "|", "$", "(?:/|$)", "a{1,2}"]
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_PIECES, max_size=6), st.text("/ab.1", max_size=8))
def test_every_match_starts_with_the_literal_prefix(pieces: list[str], tail: str) -> None:
    try:
        regex = compile_path_regex("~/" + "".join(pieces))
    except ValueError:
        return
    literal = literal_prefix(regex)
    for path in ("/" + tail, "/" + "".join(p for p in pieces if p.isalnum()) + tail):
        if regex.match(path):
            assert path.startswith(literal), (regex.pattern, literal, path)


def test_compile_path_regex_translates_kong_named_groups_only() -> None:
    assert compile_path_regex(r"~/(?<a>x)[(?<]\(?<b").pattern == r"/(?P<a>x)[(?<]\(?<b"
    assert compile_path_regex(r"~/[]](?<a>x)").pattern == r"/[]](?P<a>x)"
    assert isinstance(compile_path_regex("~/(?<=a)"), re.Pattern)
