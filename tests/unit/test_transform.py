"""request_transform / response_transform: headers, path, query, JSON bodies, templates."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.http.errors import GatewayError
from apigate.http.response_head import ResponseHead
from apigate.plugins.transform import (
    RequestTransformPlugin,
    ResponseTransformPlugin,
    ValueTemplate,
    edit_query,
    is_json_type,
)
from tests.unit.test_plugin_fakes import build, make_request


class Ctx:
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.request = make_request(*args, **kwargs)
        self.request.host = "api.example.com"
        self.route = SimpleNamespace(name="r")
        self.consumer: Any = None
        self.vars: dict[str, Any] = {}
        self.params: dict[str, str] = {}
        self.upstream_path = self.request.path


def request_plugin(**config: Any) -> RequestTransformPlugin:
    plugin: RequestTransformPlugin = build("request_transform", config)
    return plugin


def response_plugin(**config: Any) -> ResponseTransformPlugin:
    plugin: ResponseTransformPlugin = build("response_transform", config)
    return plugin


def make_head(headers: list[tuple[bytes, bytes]], status: int = 200) -> ResponseHead:
    head = ResponseHead()
    head.status = status
    head.headers = headers
    return head


# ------------------------------------------------------------------------------ templates


def test_templates_resolve_every_source() -> None:
    ctx = Ctx("GET", "/u/42", [("X-User", "alice")], query=b"page=2&q=a+b")
    ctx.params = {"id": "42"}
    ctx.consumer = SimpleNamespace(name="acme")
    ctx.vars = {"jwt_claims": {"sub": "u-1", "admin": True, "n": 3}, "tenant": "t1"}
    text = (
        "{request_id}|{consumer}|{param.id}|{id}|{header.x-user}|{query.q}|{claim.sub}|"
        "{claim.admin}|{claim.n}|{var.tenant}|{method}|{path}|{host}|{client_ip}|{query.none}"
    )
    assert ValueTemplate(text).render(ctx) == (
        "req-1|acme|42|42|alice|a b|u-1|true|3|t1|GET|/u/42|api.example.com|203.0.113.7|"
    )


def test_text_that_is_not_a_placeholder_stays_literal() -> None:
    assert ValueTemplate('{"a": 1} {} {x y}').constant


def test_unknown_placeholder_source_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown placeholder"):
        ValueTemplate("{cookie.sid}")


# ------------------------------------------------------------------------------ headers


def test_request_header_operations_in_order() -> None:
    plugin = request_plugin(
        headers={
            "remove": ["Cookie"],
            "rename": {"X-Old": "X-New"},
            "set": {"X-Set": "set-{request_id}"},
            "add": {"X-Add": "added", "X-Keep": "not used"},
        }
    )
    ctx = Ctx(
        headers=[
            ("Cookie", "a=1"),
            ("X-Old", "o1"),
            ("X-New", "replaced"),
            ("X-Set", "old"),
            ("X-Keep", "kept"),
            ("X-Old", "o2"),
        ],
    )
    plugin.on_request(ctx)
    assert ctx.request.headers == [
        (b"X-Keep", b"kept"),
        (b"X-New", b"o1"),
        (b"X-New", b"o2"),
        (b"X-Set", b"set-req-1"),
        (b"X-Add", b"added"),
    ]


def test_header_values_cannot_smuggle_a_header() -> None:
    plugin = request_plugin(headers={"set": {"X-Sub": "{claim.sub}"}})
    ctx = Ctx()
    ctx.vars["jwt_claims"] = {"sub": "evil\r\nX-Admin: 1"}
    plugin.on_request(ctx)
    assert ctx.request.header("x-sub") == "evil  X-Admin: 1"
    assert ctx.request.header("x-admin") is None


def test_response_headers() -> None:
    plugin = response_plugin(
        headers={
            "remove": ["Server"],
            "set": {"X-Req": "{request_id}"},
            "add": {"Cache-Control": "no-store"},
        }
    )
    head = make_head([(b"Server", b"up"), (b"Cache-Control", b"max-age=5")])
    plugin.on_response(Ctx(), head)
    assert head.headers == [(b"Cache-Control", b"max-age=5"), (b"X-Req", b"req-1")]


@pytest.mark.parametrize(
    "name",
    [
        "Host",
        "Content-Length",
        "Transfer-Encoding",
        "Connection",
        "X-Forwarded-For",
        "X-Request-Id",
    ],
)
def test_gateway_managed_headers_cannot_be_transformed(name: str) -> None:
    with pytest.raises(ConfigError, match="managed by the gateway"):
        request_plugin(headers={"set": {name: "x"}})


def test_header_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError) as err:
        request_plugin(headers={"sett": {}})
    assert "did you mean 'set'" in str(err.value.errors)
    with pytest.raises(ConfigError, match="control character"):
        request_plugin(headers={"set": {"X-A": "a\nb"}})


@pytest.mark.parametrize("build_plugin", [request_plugin, response_plugin])
def test_a_misspelt_json_key_suggests_the_key_the_file_uses(build_plugin: Any) -> None:
    # the field is `json_` in Python (a pydantic name clash) and `json` in the file: the
    # suggestion must be what the user can write, not the attribute name
    with pytest.raises(ConfigError) as err:
        build_plugin(jsn={"remove": ["a"]})
    assert "did you mean 'json'?" in str(err.value.errors)


# ------------------------------------------------------------------------------ path


def test_path_rewrite_with_params_encoded() -> None:
    plugin = request_plugin(path="/v2/users/{param.id}/profile")
    ctx = Ctx("GET", "/users/a b")
    ctx.params = {"id": "a/b c"}
    plugin.on_request(ctx)
    assert ctx.upstream_path == "/v2/users/a%2Fb%20c/profile"


def test_path_rewrite_around_the_routed_path() -> None:
    plugin = request_plugin(path="/v2/{path}")
    ctx = Ctx("GET", "/users/1")
    plugin.on_request(ctx)
    assert ctx.upstream_path == "/v2/users/1"


def test_path_value_making_a_dot_segment_is_a_400() -> None:
    plugin = request_plugin(path="/files/{name}")
    ctx = Ctx()
    ctx.params = {"name": ".."}
    with pytest.raises(GatewayError) as err:
        plugin.on_request(ctx)
    assert err.value.status == 400


@pytest.mark.parametrize(
    ("template", "path", "sent"),
    [
        ("/v2{path}/index.html", "/docs/", "/v2/docs/index.html"),
        ("/v2{path}/x", "/", "/v2/x"),
        ("/v2/{path}", "/users/", "/v2/users/"),
    ],
)
def test_the_routed_path_joins_a_literal_slash_without_doubling_it(
    template: str, path: str, sent: str
) -> None:
    """A canonical path keeps its trailing slash: joined to a literal "/" it made "//",
    a 400 once empty segments were refused (the diff review)."""
    plugin = request_plugin(path=template)
    ctx = Ctx("GET", path)
    plugin.on_request(ctx)
    assert ctx.upstream_path == sent


@pytest.mark.parametrize("headers", [[], [("X-Tenant", "")]])
def test_path_value_leaving_an_empty_segment_is_a_400(headers: list[tuple[str, str]]) -> None:
    """`/tenants/{header.x-tenant}/orders` without the header went up as /tenants//orders,
    which an upstream that merges slashes reads as /tenants/orders, another resource."""
    plugin = request_plugin(path="/tenants/{header.x-tenant}/orders")
    ctx = Ctx(headers=headers)
    with pytest.raises(GatewayError) as err:
        plugin.on_request(ctx)
    assert err.value.status == 400 and "empty" in err.value.message
    ok = Ctx(headers=[("X-Tenant", "t1")])
    plugin.on_request(ok)
    assert ok.upstream_path == "/tenants/t1/orders"


@pytest.mark.parametrize("path", ["v2/x", "/a/../b", "/a?b=1", "/a/{foo.bar}", "/é"])
def test_invalid_path_templates(path: str) -> None:
    with pytest.raises(ConfigError):
        request_plugin(path=path)


# ------------------------------------------------------------------------------ query


def test_query_add_set_remove() -> None:
    plugin = request_plugin(
        query={"add": {"source": "gw", "page": "1"}, "set": {"v": "{param.v}"}, "remove": ["debug"]}
    )
    ctx = Ctx(query=b"page=3&debug=1&v=1&x=%2F&debug=2")
    ctx.params = {"v": "2 & 3"}
    plugin.on_request(ctx)
    assert ctx.request.query == b"page=3&x=%2F&v=2%20%26%203&source=gw"


def test_edit_query_on_an_empty_query() -> None:
    assert edit_query(b"", add=[("a", "1")]) == b"a=1"
    assert edit_query(b"a=1", remove=frozenset({"a"})) == b""


# ------------------------------------------------------------------------------ JSON bodies

JSON_HEAD = [(b"Content-Type", b"application/json; charset=utf-8")]


def edit(ops: dict[str, Any], doc: Any, ctx: Ctx | None = None) -> Any:
    plugin = response_plugin(json=ops)
    out = plugin.transform_response_body(
        ctx or Ctx(), make_head(list(JSON_HEAD)), json.dumps(doc).encode()
    )
    return json.loads(out)


def test_json_add_set_remove_rename_nested() -> None:
    doc = {"id": 1, "user": {"name": "a", "password": "x"}, "meta": {"v": 1}}
    ops = {
        "remove": ["user.password", "missing.field"],
        "rename": {"user.name": "profile.display_name", "absent": "never"},
        "set": {"meta.v": 2},
        "add": {"meta.v": 3, "meta.source": "apigate", "a.b.c": [1, 2]},
    }
    assert edit(ops, doc) == {
        "id": 1,
        "user": {},
        "meta": {"v": 2, "source": "apigate"},
        "profile": {"display_name": "a"},
        "a": {"b": {"c": [1, 2]}},
    }


def test_json_list_indexes_and_templates() -> None:
    ctx = Ctx()
    ctx.params = {"id": "42"}
    ops = {"set": {"items.0.owner": "{param.id}"}, "remove": ["items.1"]}
    assert edit(ops, {"items": [{"n": 1}, {"n": 2}]}, ctx) == {"items": [{"n": 1, "owner": "42"}]}


def test_json_config_values_are_not_shared_between_requests() -> None:
    plugin = response_plugin(json={"add": {"a": {"b": 1}, "a.c": 2}})
    head = make_head(list(JSON_HEAD))
    first = plugin.transform_response_body(Ctx(), head, b"{}")
    second = plugin.transform_response_body(Ctx(), head, b"{}")
    assert first == second == b'{"a":{"b":1,"c":2}}'
    assert plugin.config.json_.add == {"a": {"b": 1}, "a.c": 2}  # type: ignore[attr-defined]


def test_json_edit_on_non_object_document_is_harmless() -> None:
    assert edit({"add": {"a": 1}, "remove": ["b"]}, [1, 2]) == [1, 2]


def test_non_json_bodies_pass_through() -> None:
    plugin = response_plugin(json={"add": {"a": 1}})
    text = make_head([(b"Content-Type", b"text/plain")])
    gzip = make_head([*JSON_HEAD, (b"Content-Encoding", b"gzip")])
    empty = make_head(list(JSON_HEAD), status=204)
    for head in (text, gzip, empty):
        assert not plugin.wants_response_body(Ctx(), head)
        assert plugin.transform_response_body(Ctx(), head, b"{}") == b"{}"
    assert not plugin.wants_response_body(Ctx("HEAD"), make_head(list(JSON_HEAD)))


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"x":NaN}',  # Python's json extensions are not JSON: they were written back
        b'{"x":[Infinity,-Infinity]}',
        b'{"x":1e400}',  # valid, but a float overflows: it came back as Infinity
    ],
)
def test_json_that_cannot_be_edited_faithfully_passes_through_and_is_logged(
    caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    plugin = response_plugin(json={"add": {"a": 1}})
    with caplog.at_level(logging.WARNING, "apigate.plugins.transform"):
        out = plugin.transform_response_body(Ctx(), make_head(list(JSON_HEAD)), body)
    assert out == body
    assert "not valid JSON" in caplog.text


def test_over_cap_body_passes_through_and_logs_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plugin = response_plugin(json={"add": {"a": 1}}, max_body_bytes=16)
    body = json.dumps({"x": "y" * 100}).encode()
    with caplog.at_level(logging.WARNING, "apigate.plugins.transform"):
        for _ in range(3):
            plugin.body_too_large(Ctx())  # what the exchange calls for an over-cap body
        assert plugin.transform_response_body(Ctx(), make_head(list(JSON_HEAD)), body) == body
    assert len([r for r in caplog.records if "max_body_bytes" in r.getMessage()]) == 1


def test_buffer_flags_follow_the_config() -> None:
    assert not response_plugin(headers={"remove": ["Server"]}).buffer_response_body
    with_json = response_plugin(json={"remove": ["a"]}, max_body_bytes="64KiB")
    assert with_json.buffer_response_body and with_json.max_body_bytes == 65536
    assert not request_plugin(path="/x").buffer_request_body
    assert request_plugin(json={"remove": ["a"]}).buffer_request_body


def test_request_json_body() -> None:
    plugin = request_plugin(json={"rename": {"pwd": "password"}, "add": {"via": "{consumer}"}})
    ctx = Ctx("POST", "/", [("Content-Type", "application/vnd.api+json")], content_length=12)
    ctx.consumer = SimpleNamespace(name="acme")
    assert plugin.wants_request_body(ctx)
    out = plugin.transform_request_body(ctx, b'{"pwd":"s"}')
    assert json.loads(out) == {"password": "s", "via": "acme"}
    form = Ctx(
        "POST", "/", [("Content-Type", "application/x-www-form-urlencoded")], content_length=3
    )
    assert not plugin.wants_request_body(form)
    assert plugin.transform_request_body(form, b"a=1") == b"a=1"


def test_unicode_survives_a_json_edit() -> None:
    assert edit({"add": {"b": "é"}}, {"a": "日本"}) == {"a": "日本", "b": "é"}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("application/json", True),
        ("application/problem+json; charset=utf-8", True),
        ("text/json", False),
        ("application/jsonp", False),
        (None, False),
    ],
)
def test_is_json_type(value: str | None, expected: bool) -> None:
    assert is_json_type(value) is expected


def test_json_path_config_errors() -> None:
    with pytest.raises(ConfigError, match="invalid JSON field path"):
        response_plugin(json={"remove": ["a..b"]})
    with pytest.raises(ConfigError, match="did you mean 'rename'"):
        response_plugin(json={"renmae": {}})
