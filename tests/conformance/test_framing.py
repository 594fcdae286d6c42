"""Request line and header section syntax: line endings, folding, invalid bytes, versions, Host,
methods and request targets. Refusals are JSON errors, close the connection, and reach nothing
upstream; accepted oddities (absolute-form, dot segments) are normalised before routing."""

from __future__ import annotations

import pytest

from tests.conformance.conftest import Env, assert_rejected, proxied
from tests.support.client import RawClient

pytestmark = pytest.mark.asyncio(loop_scope="module")


# ------------------------------------------------------------------ line endings and folding
@pytest.mark.parametrize(
    "data",
    [
        b"GET /echo HTTP/1.1\nHost: x\r\n\r\n",  # bare LF ends the request line
        b"GET /echo HTTP/1.1\r\nHost: x\nX-A: 1\r\n\r\n",  # bare LF ends a header line
        b"GET /echo HTTP/1.1\r\nHost: x\r\n\n",  # bare LF ends the head
        b"GET /echo HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n",  # bare CR
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n  folded\r\n\r\n",  # obs-fold (space)
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tfolded\r\n\r\n",  # obs-fold (tab)
        b"GET /echo HTTP/1.1\r\n Host: x\r\n\r\n",  # whitespace before the first header
    ],
    ids=["lf-request-line", "lf-header", "lf-end", "bare-cr", "fold-space", "fold-tab", "ws-first"],
)
async def test_bad_line_endings_and_folding(env: Env, data: bytes) -> None:
    await assert_rejected(env, data, 400, "bad_request")


async def test_leading_empty_line_is_ignored(env: Env) -> None:
    # RFC 9112 §2.2: a server SHOULD ignore at least one empty line before the request line
    _, got = await proxied(env, b"\r\nGET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.path == "/echo"


# ------------------------------------------------------------------ invalid bytes
@pytest.mark.parametrize(
    "header",
    [
        b"X-A: a\x00b",  # NUL in a value
        b"X-A: a\x01b",  # CTL in a value
        b"X-A: a\x7fb",  # DEL in a value
        b"X-A: a\rb",  # CR inside a value
        b"X\x00A: 1",  # NUL in a name
        b"X A: 1",  # space in a name
        b"X-A : 1",  # space before the colon (RFC 9112 §5.1: MUST reject)
        b"X(A): 1",  # separator in a name
        b": 1",  # empty name
        b"X-A",  # no colon
        b"X-\xe9: 1",  # non-token byte in a name
    ],
    ids=[
        "nul",
        "ctl",
        "del",
        "cr",
        "name-nul",
        "name-space",
        "space-colon",
        "name-sep",
        "empty-name",
        "no-colon",
        "name-8bit",
    ],
)
async def test_invalid_header_bytes(env: Env, header: bytes) -> None:
    data = b"GET /echo HTTP/1.1\r\nHost: x\r\n" + header + b"\r\n\r\n"
    await assert_rejected(env, data, 400, "bad_request")


async def test_obs_text_in_a_value_is_forwarded_unchanged(env: Env) -> None:
    # bytes 0x80-0xFF are obs-text, allowed in values (RFC 9110 §5.5)
    _, got = await proxied(env, b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Name: caf\xe9\r\n\r\n")
    assert b"\r\nX-Name: caf\xe9\r\n" in got.raw


# ------------------------------------------------------------------ versions
@pytest.mark.parametrize("version", [b"2.0", b"1.2", b"0.9", b"3.0"])
async def test_unsupported_http_version(env: Env, version: bytes) -> None:
    data = b"GET /echo HTTP/" + version + b"\r\nHost: x\r\n\r\n"
    doc = await assert_rejected(env, data, 505, "http_version_not_supported")
    assert version.decode() in doc["message"]


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /echo HTTP/1.1.1",
        b"GET /echo HTTP/11",
        b"GET /echo http/1.1",
        b"GET /echo HTTP/1.1 extra",
        b"GET /echo HTTP/1.1\x00",
    ],
    ids=["three-part", "no-dot", "lower-case", "extra", "nul"],
)
async def test_malformed_request_line(env: Env, request_line: bytes) -> None:
    await assert_rejected(env, request_line + b"\r\nHost: x\r\n\r\n", 400, "bad_request")


async def test_request_line_without_version_is_http09(env: Env) -> None:
    await assert_rejected(env, b"GET /echo\r\nHost: x\r\n\r\n", 505)


async def test_request_line_with_extra_spaces_is_reserialised(env: Env) -> None:
    # RFC 9112 §3 lets a recipient split on whitespace; what goes upstream is our own line
    _, got = await proxied(env, b"GET  /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.raw.startswith(b"GET /echo HTTP/1.1\r\n")


# ------------------------------------------------------------------ Host
async def test_missing_host_in_http11(env: Env) -> None:
    doc = await assert_rejected(env, b"GET /echo HTTP/1.1\r\n\r\n", 400, "bad_request")
    assert "Host" in doc["message"]


async def test_missing_host_in_http10_is_allowed(env: Env) -> None:
    """A 1.0 request without Host has no client host to pass on: X-Forwarded-Host and the
    Forwarded host were sent empty (and the upstream's Host with preserve_host, which many
    servers answer with a 400); the upstream's own authority is its Host then."""
    resp, got = await proxied(env, b"GET /echo HTTP/1.0\r\n\r\n")
    assert got.header("x-forwarded-host") is None
    assert got.header("forwarded") == "for=127.0.0.1;proto=http"
    assert resp.version == "HTTP/1.1"
    env.up.received.clear()
    _, got = await proxied(env, b"GET /keep-host HTTP/1.0\r\n\r\n")
    assert got.header_values("host") == [f"127.0.0.1:{env.up.port}"]


async def test_duplicate_host(env: Env) -> None:
    doc = await assert_rejected(env, b"GET /echo HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400)
    assert "Host" in doc["message"]


async def test_duplicate_host_same_value(env: Env) -> None:
    await assert_rejected(env, b"GET /echo HTTP/1.1\r\nHost: x\r\nhost: x\r\n\r\n", 400)


@pytest.mark.parametrize(
    "value", [b"a b", b"user@other.example", b"a/b", b"a\\b", b'"a"', b"a?b", b"a#b"]
)
async def test_invalid_host_value(env: Env, value: bytes) -> None:
    data = b"GET /echo HTTP/1.1\r\nHost: " + value + b"\r\n\r\n"
    doc = await assert_rejected(env, data, 400, "bad_request")
    assert "Host" in doc["message"]


async def test_host_with_port_and_ipv6_literal_are_valid(env: Env) -> None:
    _, got = await proxied(env, b"GET /echo HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n")
    assert got.header("x-forwarded-host") == "[::1]"  # (without the port, as Kong)
    assert 'host="[::1]:8080"' in (got.header("forwarded") or "")


# ------------------------------------------------------------------ methods
async def test_connect_is_refused(env: Env) -> None:
    data = b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n"
    await assert_rejected(env, data, 405, "method_not_allowed")


async def test_trace_is_refused_so_nothing_the_gateway_adds_is_echoed(env: Env) -> None:
    data = b"TRACE /echo HTTP/1.1\r\nHost: x\r\n\r\n"
    await assert_rejected(env, data, 405, "method_not_allowed")


@pytest.mark.parametrize("method", [b"get", b"FOO", b"G\x00T"])
async def test_unknown_or_lower_case_method(env: Env, method: bytes) -> None:
    await assert_rejected(env, method + b" /echo HTTP/1.1\r\nHost: x\r\n\r\n", 400)


# ------------------------------------------------------------------ request targets
async def test_absolute_form_routes_by_its_authority(env: Env) -> None:
    """RFC 9112 §3.2.2: the authority of an absolute-form target replaces Host; the upstream
    gets origin-form."""
    data = b"GET http://other.example/echo?q=1 HTTP/1.1\r\nHost: ignored.example\r\n\r\n"
    _, got = await proxied(env, data)
    assert got.raw.startswith(b"GET /routed-by-host/echo?q=1 HTTP/1.1\r\n")
    assert got.header("x-forwarded-host") == "other.example"
    assert b"ignored.example" not in got.raw


async def test_absolute_form_without_path(env: Env) -> None:
    _, got = await proxied(env, b"GET http://x.example HTTP/1.1\r\nHost: x.example\r\n\r\n")
    assert got.raw.startswith(b"GET / HTTP/1.1\r\n")


@pytest.mark.parametrize(
    "target",
    [b"ftp://x/echo", b"http://user@other.example/echo", b"echo", b"*"],
    ids=["other-scheme", "userinfo", "relative", "asterisk-not-options"],
)
async def test_bad_request_target(env: Env, target: bytes) -> None:
    await assert_rejected(env, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400)


async def test_options_asterisk_is_answered_by_the_gateway(env: Env) -> None:
    """`OPTIONS *` asks about the server, not a resource (RFC 9110 §9.3.7): the gateway answers
    it, with Content-Length: 0 as that section requires, and keeps the connection. It used to
    be routed as "/" and sent upstream as `OPTIONS *`."""
    async with RawClient(env.port) as c:
        await c.send(b"OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200
        assert resp.header("allow") == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
        assert resp.header("content-length") == "0" and resp.header("x-request-id")
        assert env.up.received == []
        await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection
        assert (await c.response()).status == 200
    assert [r.path for r in env.up.received] == ["/echo"]


@pytest.mark.parametrize(
    "path",
    [
        b"/public/../admin",
        b"/public/%2e%2e/admin",
        b"/public/%2E%2E/admin",
        b"/./admin",
        b"/%61dmin",
        b"//admin",
        b"/public/..%2fadmin/../../admin",
    ],
)
async def test_dot_segments_and_escapes_are_normalised_before_routing(
    env: Env, path: bytes
) -> None:
    """Each spelling of /admin reaches the admin route (which rewrites to /admin-route): the
    router and the upstream agree on what the path means."""
    _, got = await proxied(env, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.path == "/admin-route", (path, got.path)


async def test_traversal_above_root_stays_at_root(env: Env) -> None:
    _, got = await proxied(env, b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.path == "/etc/passwd"


async def test_encoded_slash_is_not_a_separator(env: Env) -> None:
    _, got = await proxied(env, b"GET /public/..%2Fother HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.path == "/public/..%2Fother"


async def test_encoded_slash_read_as_a_route_asking_for_nothing_more_is_forwarded(
    env: Env,
) -> None:
    """Read as /admin (WSGI, ASGI decode %2F), another route, but one without plugins: the
    back end serves its path under as much as that route asks (a protected one is refused:
    see test_routing_review)."""
    _, got = await proxied(env, b"GET /public/..%2Fadmin HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.path == "/public/..%2Fadmin"


@pytest.mark.parametrize(
    "target",
    [b"/echo#frag", b"/echo?q=1#frag", b"/a\\..\\admin", b"/a%zz", b"/a%2", b"/\xc3\xa9"],
    ids=["fragment", "fragment-after-query", "backslash", "bad-escape", "short-escape", "raw-utf8"],
)
async def test_invalid_path(env: Env, target: bytes) -> None:
    await assert_rejected(env, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400)


async def test_query_is_forwarded_verbatim(env: Env) -> None:
    _, got = await proxied(env, b"GET /echo?a=%2e%2e/&b=1+2&c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.raw.startswith(b"GET /echo?a=%2e%2e/&b=1+2&c HTTP/1.1\r\n")
