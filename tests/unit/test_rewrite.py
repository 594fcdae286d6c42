"""strip_prefix and rewrite templates."""

from __future__ import annotations

import pytest

from apigate.routing.normalize import normalize_path
from apigate.routing.rewrite import compile_template, encode_param, strip


@pytest.mark.parametrize(
    ("path", "prefix", "expected"),
    [
        ("/hello_service/x", "/hello_service", "/x"),
        ("/hello_service/x/y", "/hello_service", "/x/y"),
        ("/hello_service", "/hello_service", "/"),
        ("/hello_service/", "/hello_service", "/"),
        ("/api/42/orders/7", "/api/42/orders", "/7"),
        ("/anything", "/", "/anything"),
        ("/", "/", "/"),
        ("/health", "/health", "/"),
        ("/x/", "/x/", "/"),  # an exact "=/x/" route's prefix is the whole path
    ],
)
def test_strip(path: str, prefix: str, expected: str) -> None:
    assert strip(path, prefix) == expected


@pytest.mark.parametrize(
    ("template", "params", "rest", "expected"),
    [
        ("/v2/users/{user_id}", {"user_id": "42"}, "", "/v2/users/42"),
        ("/v2/users/{user_id}", {"user_id": "42"}, "/extra", "/v2/users/42/extra"),
        ("/v2/users/{user_id}", {"user_id": "42"}, "/", "/v2/users/42/"),
        ("/v2/users/{user_id}/", {"user_id": "42"}, "/extra", "/v2/users/42/extra"),
        ("/v2/users/{user_id}/", {"user_id": "42"}, "", "/v2/users/42/"),
        ("/u/{a}/o/{b}", {"a": "1", "b": "2"}, "/x", "/u/1/o/2/x"),
        ("/u/{a}.json", {"a": "1"}, "", "/u/1.json"),
        ("/u/{a}{b}", {"a": "x", "b": "y"}, "", "/u/xy"),
        ("/v2", {}, "/extra", "/v2/extra"),
        ("/v2/", {}, "/extra", "/v2/extra"),
        ("/v2", {}, "", "/v2"),
        ("/", {}, "", "/"),
        ("/", {}, "/x/y", "/x/y"),
        ("/v2", {}, "extra", "/v2/extra"),
    ],
)
def test_template(template: str, params: dict[str, str], rest: str, expected: str) -> None:
    assert compile_template(template)(params, rest) == expected


@pytest.mark.parametrize(
    ("value", "encoded"),
    [
        ("42", "42"),
        ("john.doe-1_x~", "john.doe-1_x~"),
        ("a/b", "a%2Fb"),
        ("../admin", "..%2Fadmin"),
        ("a b", "a%20b"),
        ("100%", "100%25"),
        ("x?y#z", "x%3Fy%23z"),
        ("caf\u00e9", "caf%C3%A9"),
        ("a:b@c", "a:b@c"),
        ("\udcff", "%FF"),  # a non-UTF-8 byte, decoded by the matcher as a surrogate escape
    ],
)
def test_param_values_stay_inside_one_segment(value: str, encoded: str) -> None:
    assert encode_param(value) == encoded
    path = compile_template("/users/{id}/profile")({"id": value}, "")
    assert path == f"/users/{encoded}/profile"
    assert normalize_path(path) == path  # no separator, no dot segment, nothing to resolve


@pytest.mark.parametrize(
    ("template", "params"),
    [
        ("/users/{id}/profile", {"id": ".."}),
        ("/users/{id}/profile", {"id": "."}),
        ("/users/{id}", {"id": ".."}),
        ("/users/{a}{b}/x", {"a": ".", "b": "."}),
        ("/users/{a}./x", {"a": "."}),
    ],
)
def test_a_value_that_would_make_a_dot_segment_is_refused(
    template: str, params: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match="dot segment"):
        compile_template(template)(params, "/rest")


def test_dots_inside_a_segment_are_fine() -> None:
    rewrite = compile_template("/files/{name}")
    assert rewrite({"name": "..."}, "") == "/files/..."
    assert rewrite({"name": "a..b"}, "") == "/files/a..b"
    assert rewrite({"name": ".hidden"}, "") == "/files/.hidden"


def test_unknown_parameter_is_rejected_at_compile_time() -> None:
    with pytest.raises(ValueError, match="unknown parameter"):
        compile_template("/v2/users/{user}", params={"user_id"})
    compile_template("/v2/users/{user_id}", params={"user_id"})


@pytest.mark.parametrize(
    "template",
    [
        "v2/users",
        "/v2/{}",
        "/v2/{user",
        "/v2/user}",
        "/v2/}{x}",
        "/{a-b}",
        "/{1x}",
        "/v2/../admin",
        "/v2//users",
        "/v2/./{id}",
        "/v2/%7euser",
        "/v2/%zz",
        "/v2\\users",
    ],
)
def test_malformed_templates_are_rejected(template: str) -> None:
    with pytest.raises(ValueError):
        compile_template(template)
