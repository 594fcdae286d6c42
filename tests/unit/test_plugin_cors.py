"""The cors plugin: preflights answered at the gateway, headers added to actual responses."""

from __future__ import annotations

from typing import Any

import pytest

from apigate.config.errors import ConfigError
from apigate.plugins.cors import CorsPlugin
from tests.unit.test_plugin_fakes import build, header, make_ctx, resolve, upstream_head

ORIGINS = ["https://app.example.com", "https://*.example.org", "http://localhost:3000"]


def cors(**raw: Any) -> CorsPlugin:
    built: CorsPlugin = build("cors", {"origins": ORIGINS, **raw})
    return built


def preflight(plugin: CorsPlugin, origin: str, method: str = "PUT", asked: str = "") -> Any:
    headers = [("Origin", origin), ("Access-Control-Request-Method", method)]
    if asked:
        headers.append(("Access-Control-Request-Headers", asked))
    return resolve(plugin.on_request(make_ctx("OPTIONS", headers=headers)))


def actual(
    plugin: CorsPlugin, origin: str | None, upstream: tuple[tuple[bytes, bytes], ...] = ()
) -> dict[str, str]:
    ctx = make_ctx(headers=[("Origin", origin)] if origin else [])
    assert resolve(plugin.on_request(ctx)) is None  # actual requests always go upstream
    head = upstream_head(upstream)
    plugin.on_response(ctx, head)
    return {n.decode(): v.decode() for n, v in head.headers}


def test_preflight_is_answered_with_204() -> None:
    plugin = cors(credentials=True, max_age="10m", headers=["Content-Type", "X-Trace"])
    outcome = preflight(plugin, "https://app.example.com", "PUT", "content-type, x-trace")
    assert outcome is not None and outcome.status == 204 and outcome.body == b""
    assert header(outcome, "Access-Control-Allow-Origin") == "https://app.example.com"
    assert header(outcome, "Access-Control-Allow-Methods") == "GET, HEAD, PUT, PATCH, POST, DELETE"
    assert header(outcome, "Access-Control-Allow-Headers") == "Content-Type, X-Trace"
    assert header(outcome, "Access-Control-Allow-Credentials") == "true"
    assert header(outcome, "Access-Control-Max-Age") == "600"
    assert "Origin" in (header(outcome, "Vary") or "")


def test_preflight_refusals_are_403() -> None:
    plugin = cors(methods=["GET", "POST"], headers=["Content-Type"])
    assert preflight(plugin, "https://evil.example.com").status == 403
    assert preflight(plugin, "https://app.example.com", "DELETE").status == 403
    assert preflight(plugin, "https://app.example.com", "POST", "X-Secret").status == 403
    ok = preflight(plugin, "https://app.example.com", "POST", "content-type")
    assert ok.status == 204


def test_preflight_echoes_asked_headers_when_none_are_configured() -> None:
    outcome = preflight(cors(), "http://localhost:3000", "POST", "X-A, x-b")
    assert header(outcome, "Access-Control-Allow-Headers") == "X-A, x-b"
    assert header(outcome, "Access-Control-Allow-Credentials") is None


def test_plain_options_and_requests_without_origin_pass() -> None:
    plugin = cors()
    assert (
        resolve(plugin.on_request(make_ctx("OPTIONS", headers=[("Origin", "https://x")]))) is None
    )
    assert actual(plugin, None) == {"Vary": "Origin"}


def test_actual_response_headers() -> None:
    plugin = cors(expose_headers=["X-Total"], credentials=True)
    got = actual(
        plugin,
        "https://app.example.com",
        ((b"Vary", b"Accept-Encoding"), (b"Access-Control-Allow-Origin", b"*")),
    )
    assert got == {
        "Vary": "Accept-Encoding, Origin",
        "Access-Control-Allow-Origin": "https://app.example.com",
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Expose-Headers": "X-Total",
    }


def test_disallowed_origin_gets_no_cors_headers() -> None:
    got = actual(cors(), "https://app.example.com.evil.net", ((b"X-Up", b"1"),))
    assert got == {"X-Up": "1", "Vary": "Origin"}


UPSTREAM_CORS = (
    (b"X-Up", b"1"),
    (b"Access-Control-Allow-Origin", b"*"),
    (b"access-control-allow-credentials", b"true"),
    (b"Access-Control-Allow-Methods", b"DELETE"),
    (b"Access-Control-Allow-Headers", b"X-Secret"),
    (b"Access-Control-Allow-Private-Network", b"true"),
    (b"Access-Control-Expose-Headers", b"X-Secret"),
    (b"Access-Control-Max-Age", b"86400"),
)


@pytest.mark.parametrize("origin", ["https://evil.com", "null", None])
def test_the_upstreams_cors_headers_never_reach_a_disallowed_or_absent_origin(
    origin: str | None,
) -> None:
    # The gateway's policy is authoritative: an upstream's `*` + credentials must not
    # reach https://evil.com behind the gateway's back.
    assert actual(cors(), origin, UPSTREAM_CORS) == {"X-Up": "1", "Vary": "Origin"}


@pytest.mark.parametrize("origin", ["https://evil.com", None, "https://app.example.com"])
@pytest.mark.parametrize(
    "upstream_vary, expected",
    [
        ((), "Origin"),
        ((b"Accept-Encoding",), "Accept-Encoding, Origin"),
        ((b"Accept-Encoding", b"Accept-Language"), "Accept-Encoding, Accept-Language, Origin"),
        ((b"accept-encoding, origin",), "accept-encoding, origin"),
        ((b"*",), "*"),
    ],
)
def test_vary_origin_on_every_response(
    origin: str | None, upstream_vary: tuple[bytes, ...], expected: str
) -> None:
    # What the gateway answers depends on Origin (the origin echoed, or no CORS header), so
    # a shared cache must not serve one origin's answer to another, or to a request without.
    plugin = cors()
    ctx = make_ctx(headers=[("Origin", origin)] if origin else [])
    assert resolve(plugin.on_request(ctx)) is None
    head = upstream_head([(b"Vary", v) for v in upstream_vary])
    plugin.on_response(ctx, head)
    assert [v.decode() for n, v in head.headers if n.lower() == b"vary"] == [expected]


def test_vary_origin_with_star_origins_too() -> None:
    # `*` echoes the request's origin (and refuses `null`): the answer still depends on it.
    plugin = cors(origins=["*"])
    assert actual(plugin, None) == {"Vary": "Origin"}
    assert actual(plugin, "null", UPSTREAM_CORS) == {"X-Up": "1", "Vary": "Origin"}
    assert actual(plugin, "https://any.test")["Access-Control-Allow-Origin"] == "https://any.test"


@pytest.mark.parametrize(
    "origin, allowed",
    [
        ("https://app.example.com", True),
        ("https://APP.example.com", True),
        ("http://app.example.com", False),  # scheme matters
        ("https://app.example.com:8443", False),  # so does the port
        ("https://a.example.org", True),
        ("https://a.b.example.org", True),
        ("https://example.org", False),  # the wildcard needs a subdomain
        ("https://evilexample.org", False),
        ("http://a.example.org", False),
        ("http://localhost:3000", True),
        ("http://localhost:3001", False),
        ("null", False),
        ("https://app.example.com/path", False),
    ],
)
def test_origin_matching(origin: str, allowed: bool) -> None:
    assert cors().rules.allows(origin) is allowed


def test_star_allows_any_origin_but_null() -> None:
    plugin = cors(origins=["*"])
    assert plugin.rules.allows("https://anything.test")
    assert not plugin.rules.allows("null")
    assert cors(origins=["null"]).rules.allows("null")


def test_config_errors() -> None:
    with pytest.raises(ConfigError, match="credentials: true needs explicit origins"):
        build("cors", {"origins": ["*"], "credentials": True})
    with pytest.raises(ConfigError, match=r"invalid origin 'app\.example\.com'"):
        build("cors", {"origins": ["app.example.com"]})
    with pytest.raises(ConfigError, match="origins: required"):
        build("cors", {})


# ============================================================================ security review
def test_credentials_cannot_allow_the_null_origin() -> None:
    # any page can send `Origin: null` (a sandboxed iframe): with credentials that is `*`
    for origins in (["null"], ["https://app.example.com", "NULL"]):
        with pytest.raises(ConfigError, match="credentials: true cannot allow the origin 'null'"):
            build("cors", {"origins": origins, "credentials": True})
    assert cors(origins=["null"]).rules.allows("null")  # without credentials it is allowed
    assert cors(credentials=True).rules.allows("https://app.example.com")
