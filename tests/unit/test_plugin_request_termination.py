"""The request_termination plugin: its settings, its answers and when it answers (no sockets;
tests/integration/test_request_termination.py runs it in a gateway)."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.config.schema import GatewayConfig
from apigate.plugins.base import PluginEnv
from apigate.plugins.chain import PluginChain
from apigate.plugins.request_termination import error_code
from tests.unit.test_plugin_fakes import body, build, make_ctx, make_route, resolve


def answer(raw: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
    plugin = build("request_termination", raw)
    ctx = make_ctx(*args, route=make_route("closed"), **kwargs)
    return resolve(plugin.on_request(ctx))


# ---------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    ("raw", "problem"),
    [
        ({"status_code": 100}, "status_code: 100 is an interim (1xx) status"),
        ({"status_code": 101}, "status_code: 101 is an interim (1xx) status"),
        ({"status_code": 99}, "status_code: invalid status 99: use 200 to 599"),
        ({"status_code": 600}, "status_code: invalid status 600: use 200 to 599"),
        ({"message": "m", "body": "b"}, "body: give message or body, not both"),
        ({"echo": True, "body": "b"}, "echo: echo answers with the request"),
        ({"content_type": "text/plain"}, "content_type: content_type is the type of body"),
        ({"status_code": 204, "message": "m"}, "message: a 204 response has no content"),
        ({"status_code": 304, "echo": True}, "echo: a 304 response has no content"),
        ({"status_code": 205, "body": ""}, "body: a 205 response has no content"),
        ({"body": "x", "content_type": "text/plain\r\nX-Evil: 1"}, "invalid content type"),
        ({"body": "x", "content_type": "plain"}, "invalid content type 'plain'"),
        ({"trigger": "x debug"}, "trigger: invalid name 'x debug'"),
        ({"trigger": ""}, "trigger: invalid name ''"),
        ({"trigger": "Connection"}, "'Connection' is a header the gateway consumes"),
        ({"trigger": "x-forwarded-for"}, "the gateway consumes before plugins run"),
        ({"status": 503}, "status: unknown key; did you mean 'status_code'?"),
    ],
)
def test_settings_that_cannot_work_are_refused(raw: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build("request_termination", raw)
    text = "\n".join(caught.value.errors)
    assert text.startswith("routes[0].plugins.request_termination."), text
    assert problem in text, text


def test_settings_that_work() -> None:
    build("request_termination", {})
    build("request_termination", {"status_code": 200, "echo": True, "message": "debug"})
    build("request_termination", {"status_code": 204, "trigger": "X-Maintenance"})
    build("request_termination", {"body": "<p>down</p>", "content_type": "text/html"})
    build("request_termination", {"status_code": 599, "message": "m"})


# ---------------------------------------------------------------------- answers


def test_default_answer_is_the_gateways_json_error_from_the_reason_phrase() -> None:
    response = answer({}, "GET", "/x")
    assert response.status == 503
    assert response.content_type == b"application/json"
    assert body(response) == {
        "error": "service_unavailable",
        "message": "Service Unavailable",
        "request_id": "req-1",
    }
    teapot = answer({"status_code": 418}, "GET", "/x")
    assert teapot.status == 418 and body(teapot)["error"] == "i_m_a_teapot"


def test_error_codes_follow_the_reason_phrase() -> None:
    assert error_code(403) == ("forbidden", "Forbidden")
    assert error_code(410) == ("gone", "Gone")
    assert error_code(414) == ("request_uri_too_long", "Request-URI Too Long")
    assert error_code(599) == ("request_terminated", "request terminated")


def test_message_replaces_the_reason_phrase() -> None:
    response = answer({"status_code": 410, "message": "this API was retired"}, "GET", "/x")
    assert response.status == 410
    assert body(response) == {
        "error": "gone",
        "message": "this API was retired",
        "request_id": "req-1",
    }


def test_body_is_sent_as_given() -> None:
    response = answer({"body": '{"down": true}'}, "POST", "/x", content_length=10)
    assert (response.status, response.body) == (503, b'{"down": true}')
    assert response.content_type == b"application/json; charset=utf-8"
    html = answer({"status_code": 200, "body": "<p>é</p>", "content_type": "text/html"}, "GET")
    assert (html.body, html.content_type) == ("<p>é</p>".encode(), b"text/html")


def test_no_content_statuses_have_no_body_nor_type() -> None:
    response = answer({"status_code": 204}, "GET", "/x")
    assert (response.status, response.body, response.content_type) == (204, b"", None)


def test_echo_describes_the_request_with_credentials_redacted() -> None:
    consumer = SimpleNamespace(name="alice")
    plugin = build("request_termination", {"status_code": 200, "echo": True, "message": "hi"})
    ctx = make_ctx(
        "PUT",
        "/orders/7",
        [
            ("User-Agent", "curl/8"),
            ("Authorization", "Bearer sekrit-jwt"),
            ("Cookie", "session=sekrit-cookie"),
            ("X-API-Key", "sekrit-key"),
            ("apikey", "sekrit-key2"),
            ("X-Upstream-Token", "sekrit-token"),
            ("X-Idempotency-Key", "not-a-secret"),
            ("user-agent", "second"),
        ],
        query=b"page=2&api_key=sekrit-q&access%5Ftoken=sekrit-q2&flag",
        client_ip="198.51.100.9",
        route=make_route("orders"),
    )
    ctx.request.host = "gw.test"
    ctx.consumer = consumer
    response = resolve(plugin.on_request(ctx))
    assert response is not None and response.status == 200
    assert response.content_type == b"application/json"
    assert b"sekrit" not in response.body
    assert body(response) == {
        "message": "hi",
        "route": "orders",
        "consumer": "alice",
        "request": {
            "method": "PUT",
            "host": "gw.test",
            "path": "/orders/7",
            "query": "page=2&api_key=[redacted]&access%5Ftoken=[redacted]&flag",
            "headers": [
                ["User-Agent", "curl/8"],
                ["Authorization", "[redacted]"],
                ["Cookie", "[redacted]"],
                ["X-API-Key", "[redacted]"],
                ["apikey", "[redacted]"],
                ["X-Upstream-Token", "[redacted]"],
                ["X-Idempotency-Key", "not-a-secret"],
                ["user-agent", "second"],
            ],
            "client_ip": "198.51.100.9",
            "request_id": "req-1",
        },
    }


def test_echo_redacts_the_credential_fields_the_files_auth_plugins_read() -> None:
    """A key_auth header or a jwt query parameter of any name is a credential too."""
    config = GatewayConfig.model_validate(
        {
            "services": {"up": {"targets": ["http://127.0.0.1:9"]}},
            "plugins": {"jwt": {"secret": "s" * 32, "algorithms": ["HS256"], "query_param": "t"}},
            "routes": [
                {
                    "name": "r",
                    "match": {"paths": ["/"]},
                    "service": "up",
                    "plugins": {"key_auth": {"header_names": ["X-Gw-Credential"]}},
                }
            ],
        }
    )
    plugin = build("request_termination", {"echo": True}, PluginEnv(config=config))
    ctx = make_ctx("GET", "/", [("x-gw-credential", "sekrit1")], query=b"t=sekrit2&x=1")
    response = resolve(plugin.on_request(ctx))
    assert response is not None and b"sekrit" not in response.body
    request = json.loads(response.body)["request"]
    assert request["headers"] == [["x-gw-credential", "[redacted]"]]
    assert request["query"] == "t=[redacted]&x=1"


# ---------------------------------------------------------------------- trigger


def test_without_trigger_every_request_is_answered() -> None:
    assert answer({}, "GET", "/") is not None
    assert answer({}, "POST", "/", content_length=3) is not None


@pytest.mark.parametrize(
    ("headers", "query", "answered"),
    [
        ([], b"", False),
        ([("X-Other", "1")], b"other=1", False),
        ([("X-Debug", "")], b"", True),  # present, whatever its value
        ([("x-debug", "1")], b"", True),  # any case
        ([], b"x-debug", False),  # a query parameter's name is exact
        ([], b"X-Debug", True),
        ([], b"a=1&X-Debug=", True),
        ([], b"X-Debug=0&b", True),
        ([], b"X%2DDebug=1", True),  # decoded
        ([], b"X-Debugger=1&aX-Debug=1", False),
    ],
)
def test_trigger_by_header_or_query_parameter(
    headers: list[tuple[str, str]], query: bytes, answered: bool
) -> None:
    outcome = answer({"trigger": "X-Debug"}, "GET", "/", headers, query=query)
    assert (outcome is not None) is answered


# ---------------------------------------------------------------------- place in the chain


def test_runs_after_auth_acl_and_rate_limit_and_before_transform_and_cache() -> None:
    plugins = [
        build("request_termination", {}),
        build("cache", {"ttl": "1s"}),
        build("rate_limit", {"requests": 10, "per": "1s", "store": "local"}),
        build("request_transform", {"headers": {"add": {"X-A": "1"}}}),
        build("acl", {"allow": ["admins"]}),
        build("key_auth", {}),
        build("jwt", {"secret": "s" * 32, "algorithms": ["HS256"]}),
        build("basic_auth", {}),
        build("request_size", {"max_bytes": 10}),
        build("cors", {"origins": ["*"]}),
    ]
    order = [p.name for p in PluginChain(plugins).plugins]
    at = order.index("request_termination")
    assert {"jwt", "key_auth", "basic_auth", "acl", "rate_limit", "cors"} <= set(order[:at])
    assert {"request_transform", "cache"} == set(order[at + 1 :])


def test_an_auth_refusal_comes_first() -> None:
    """key_auth's 401 is the answer a client without a key gets on a terminated route."""
    env_config = GatewayConfig.model_validate({"consumers": [{"name": "a", "api_keys": ["k"]}]})
    env = PluginEnv(config=env_config)
    chain = PluginChain([build("request_termination", {}, env), build("key_auth", {}, env)])
    ctx = make_ctx("GET", "/")
    outcomes = [resolve(hook(ctx)) for hook in chain.request_hooks]
    assert outcomes[0] is not None and outcomes[0].status == 401
    ctx = make_ctx("GET", "/", [("apikey", "k")])
    outcomes = [resolve(hook(ctx)) for hook in chain.request_hooks]
    assert outcomes[0] is None and outcomes[1] is not None and outcomes[1].status == 503
