"""Header rules in both directions: hop-by-hop removal (RFC 9110 §7.6.1, including the names a
Connection header lists), forwarding headers, Via, Host, and the request id."""

from __future__ import annotations

import pytest

from tests.conformance.conftest import Env, proxied
from tests.support.client import RawClient, request
from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOP_BY_HOP_REQUEST = (
    b"GET /echo HTTP/1.1\r\n"
    b"Host: x\r\n"
    b"Connection: keep-alive, X-Foo, x-other\r\n"
    b"X-Foo: 1\r\n"
    b"X-Other: 2\r\n"
    b"Keep-Alive: timeout=5\r\n"
    b"TE: trailers\r\n"
    b"Trailer: X-Sum\r\n"
    b"Trailers: X-Sum\r\n"
    b"Proxy-Authorization: Basic c2VjcmV0\r\n"
    b"Proxy-Connection: keep-alive\r\n"
    b"Upgrade: h2c\r\n"
    b"X-Kept: yes\r\n"
    b"\r\n"
)


def _names(raw: bytes) -> set[str]:
    head = raw.partition(b"\r\n\r\n")[0].decode("latin-1")
    return {line.split(":", 1)[0].lower() for line in head.split("\r\n")[1:]}


# ------------------------------------------------------------------ request direction
async def test_hop_by_hop_request_headers_are_not_forwarded(env: Env) -> None:
    resp, got = await proxied(env, HOP_BY_HOP_REQUEST)
    names = _names(got.raw)
    for name in (
        "connection",
        "x-foo",
        "x-other",
        "keep-alive",
        "te",
        "trailer",
        "trailers",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
    ):
        assert name not in names, (name, got.raw)
    assert got.header("x-kept") == "yes"
    assert b"c2VjcmV0" not in got.raw
    assert resp.header("connection") is None  # keep-alive: the default for HTTP/1.1


async def test_connection_close_with_named_header(env: Env) -> None:
    data = b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close, X-Foo\r\nX-Foo: 1\r\n\r\n"
    resp, closed = await request(env.port, data)
    assert resp.status == 200 and resp.header("connection") == "close"
    assert closed
    got = env.up.received[0]
    assert got.header("x-foo") is None and got.header("connection") is None


async def test_upgrade_without_connection_upgrade_is_a_plain_request(env: Env) -> None:
    data = b"GET /echo HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"
    async with RawClient(env.port) as c:
        await c.send(data)
        resp = await c.response()
        assert resp.status == 200
        await c.send(b"GET /echo?again HTTP/1.1\r\nHost: x\r\n\r\n")  # still plain HTTP
        assert (await c.response()).json()["query"] == "again"
    assert env.up.received[0].header("upgrade") is None


async def test_many_connection_headers_are_combined(env: Env) -> None:
    data = (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: X-A\r\nConnection: X-B\r\n"
        b"X-A: 1\r\nX-B: 2\r\nX-C: 3\r\n\r\n"
    )
    _, got = await proxied(env, data)
    assert got.header("x-a") is None and got.header("x-b") is None
    assert got.header("x-c") == "3"


async def test_end_to_end_headers_keep_order_case_and_repeats(env: Env) -> None:
    data = (
        b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Multi: 1\r\naccept: */*\r\nX-Multi: 2\r\n"
        b"Cookie: a=1\r\nCookie: b=2\r\n\r\n"
    )
    _, got = await proxied(env, data)
    assert got.header_values("x-multi") == ["1", "2"]
    assert got.header_values("cookie") == ["a=1", "b=2"]
    assert b"\r\naccept: */*\r\n" in got.raw  # the client's spelling is kept
    assert got.raw.index(b"X-Multi: 1") < got.raw.index(b"accept") < got.raw.index(b"X-Multi: 2")


async def test_upstream_host_is_the_target_and_via_is_added(env: Env) -> None:
    data = b"GET /echo HTTP/1.1\r\nHost: public.example\r\nVia: 1.0 corp-proxy\r\n\r\n"
    _, got = await proxied(env, data)
    assert got.header_values("host") == [f"127.0.0.1:{env.up.port}"]
    assert got.header_values("via") == ["1.0 corp-proxy", "1.1 apigate"]


async def test_preserve_host_forwards_the_clients_host(env: Env) -> None:
    _, got = await proxied(env, b"GET /keep-host HTTP/1.1\r\nHost: Public.Example:8443\r\n\r\n")
    assert got.header_values("host") == ["public.example:8443"]


# ------------------------------------------------------------------ forwarding headers
async def test_forwarding_headers_from_an_untrusted_client_are_overwritten(env: Env) -> None:
    data = (
        b"GET /echo HTTP/1.1\r\nHost: public.example\r\n"
        b"X-Forwarded-For: 6.6.6.6\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"X-Forwarded-Host: evil.example\r\n"
        b"X-Forwarded-Port: 443\r\n"
        b"X-Forwarded-Prefix: //evil.example\r\n"
        b"Forwarded: for=6.6.6.6;proto=https\r\n"
        b"X-Real-IP: 6.6.6.6\r\n"
        b"x-forwarded-for: 7.7.7.7\r\n"
        b"\r\n"
    )
    _, got = await proxied(env, data)
    assert got.header_values("x-forwarded-for") == ["127.0.0.1"]
    assert got.header_values("x-forwarded-proto") == ["http"]
    assert got.header_values("x-forwarded-host") == ["public.example"]
    assert got.header_values("forwarded") == ['for=127.0.0.1;host="public.example";proto=http']
    assert got.header_values("x-forwarded-port") == [str(env.port)]  # the listener's
    assert got.header("x-forwarded-prefix") is None and got.header("x-real-ip") is None
    assert b"6.6.6.6" not in got.raw and b"7.7.7.7" not in got.raw
    assert b"evil.example" not in got.raw


@pytest.mark.parametrize(
    ("host", "name"),
    [
        (b"example.com:8443", "example.com"),
        (b"example.com", "example.com"),
        (b"[::1]:8080", "[::1]"),
        (b"[::1]", "[::1]"),
        (b"10.0.0.1:80", "10.0.0.1"),
        (b"t:", "t"),  # (an empty port is allowed by the grammar)
    ],
)
async def test_x_forwarded_host_is_the_host_without_its_port(
    env: Env, host: bytes, name: str
) -> None:
    """As Kong sends it (nginx's `$host`): the name the client asked for, without the port,
    which goes as X-Forwarded-Port (the listener's, Kong's `$server_port`). A framework that
    joins X-Forwarded-Host and -Port built `https://example.com:8443:8443/...`. Forwarded's
    `host=` is the Host field as received (RFC 7239 §5.3), port and all."""
    _, got = await proxied(env, b"GET /echo HTTP/1.1\r\nHost: %s\r\n\r\n" % host)
    assert got.header_values("x-forwarded-host") == [name]
    assert got.header_values("x-forwarded-port") == [str(env.port)]
    assert got.header_values("forwarded") == [f'for=127.0.0.1;host="{host.decode()}";proto=http']


async def test_forwarding_headers_from_a_trusted_proxy_are_extended() -> None:
    async with Upstream() as up:
        cfg = base_config(
            listeners={
                "proxy": {"address": "127.0.0.1:0", "trusted_proxies": ["127.0.0.0/8"]},
                "admin": None,
            },
            services={"up": {"targets": [up.url]}},
            routes=[
                {"name": "all", "match": {"paths": ["/"]}, "service": "up"},
                {
                    "name": "stripped",
                    "match": {"paths": ["/stripped"]},
                    "service": "up",
                    "strip_prefix": True,
                },
            ],
        )
        async with GatewayProcess(cfg) as gw:
            data = (
                b"GET /echo HTTP/1.1\r\nHost: inner.example:8080\r\n"
                b"X-Forwarded-For: 203.0.113.7\r\nX-Forwarded-For: 10.0.0.1\r\n"
                b"X-Forwarded-Proto: https\r\n\r\n"
            )
            resp, _ = await request(gw.port, data, close_wait=0.05)
            assert resp.status == 200
            data = (  # a load balancer that ends TLS on 443 for www.example and strips /api
                b"GET /stripped/orders HTTP/1.1\r\nHost: inner.example\r\n"
                b"X-Forwarded-Proto: https\r\nX-Forwarded-Host: www.example:8443\r\n"
                b"X-Forwarded-Port: 8443\r\nX-Forwarded-Prefix: /api/\r\n"
                b"Forwarded: for=203.0.113.7;proto=https\r\n\r\n"
            )
            resp, _ = await request(gw.port, data, close_wait=0.05)
            assert resp.status == 200
    got = up.received[0]
    assert got.header_values("x-forwarded-for") == ["203.0.113.7, 10.0.0.1, 127.0.0.1"]
    # the trusted proxy's proto stands instead of ours: one value, the client's side
    assert got.header_values("x-forwarded-proto") == ["https"]
    assert got.header_values("x-forwarded-host") == ["inner.example"]  # ours: none sent
    assert got.header_values("x-forwarded-port") == [str(gw.port)]
    got = up.received[1]
    assert got.path == "/orders"
    assert got.header_values("x-forwarded-proto") == ["https"]
    # theirs as they sent them (Kong's too): what a trusted proxy says of its client's side
    assert got.header_values("x-forwarded-host") == ["www.example:8443"]
    assert got.header_values("x-forwarded-port") == ["8443"]
    assert got.header_values("x-forwarded-prefix") == ["/api/stripped"]  # theirs, then ours
    assert got.header_values("forwarded") == [  # a list: theirs, then ours
        "for=203.0.113.7;proto=https",
        'for=127.0.0.1;host="inner.example";proto=http',
    ]


async def test_a_stripped_prefix_is_sent_as_x_forwarded_prefix(env: Env) -> None:
    _, got = await proxied(env, b"GET /stripped/a/b?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (got.path, got.query) == ("/a/b", "q=1")
    assert got.header_values("x-forwarded-prefix") == ["/stripped"]
    env.up.received.clear()
    _, got = await proxied(env, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.header("x-forwarded-prefix") is None  # nothing stripped


# ------------------------------------------------------------------ request id
async def test_valid_request_id_is_kept_and_returned(env: Env) -> None:
    data = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Request-Id: abc-123.DEF_4:5\r\n\r\n"
    resp, got = await proxied(env, data)
    assert got.header_values("x-request-id") == ["abc-123.DEF_4:5"]
    assert resp.header_values("x-request-id") == ["abc-123.DEF_4:5"]


@pytest.mark.parametrize(
    "value",
    [b"has spaces in it", b"a" * 200, b'quote"d', b"semi;colon", b"caf\xe9"],
    ids=["spaces", "200-chars", "quote", "semicolon", "8bit"],
)
async def test_invalid_request_id_is_replaced(env: Env, value: bytes) -> None:
    data = b"GET /echo HTTP/1.1\r\nHost: x\r\nX-Request-Id: " + value + b"\r\n\r\n"
    resp, got = await proxied(env, data)
    sent = got.header_values("x-request-id")
    assert len(sent) == 1 and sent[0].encode("latin-1") != value
    assert 8 <= len(sent[0]) <= 128 and sent[0].isalnum()
    assert resp.header_values("x-request-id") == sent


async def test_request_id_is_generated_and_unique(env: Env) -> None:
    ids = set()
    for _ in range(3):
        resp, _ = await request(env.port, b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n", close_wait=0.01)
        ids.add(resp.header("x-request-id"))
    assert len(ids) == 3 and None not in ids
    assert {r.header("x-request-id") for r in env.up.received} == ids


async def test_gateway_error_carries_the_clients_request_id(env: Env) -> None:
    data = b"GET /echo HTTP/9.9\r\nHost: x\r\nX-Request-Id: mine-1\r\n\r\n"
    resp, _ = await request(env.port, data)
    assert resp.status == 505
    assert resp.json()["request_id"] == "mine-1" == resp.header("x-request-id")


# ------------------------------------------------------------------ response direction
async def test_hop_by_hop_response_headers_are_not_forwarded(env: Env) -> None:
    async with RawClient(env.port) as c:
        await c.send(b"GET /hop HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await c.response()
        assert resp.status == 200 and resp.body == b"hop"
        names = {n.lower() for n, _ in resp.headers}
        for name in (
            "x-bar",
            "keep-alive",
            "proxy-authenticate",
            "te",
            "trailer",
            "trailers",
            "upgrade",
            "proxy-connection",
            "connection",
        ):
            assert name not in names, (name, resp.raw_head)
        assert resp.header("x-end-to-end") == "kept"
        assert b"secret" not in resp.raw_head
        # the upstream's "Connection: keep-alive" was not passed on, and we stay alive
        await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await c.response()).status == 200


async def test_upstream_connection_close_does_not_close_the_client(env: Env) -> None:
    env.up.state.canned["/closing"] = (
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok"
    )
    async with RawClient(env.port) as c:
        await c.send(b"GET /closing HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await c.response()
        assert resp.body == b"ok" and resp.header("connection") is None
        await c.send(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await c.response()).status == 200


async def test_upstream_request_id_is_not_duplicated(env: Env) -> None:
    env.up.state.canned["/rid"] = (
        b"HTTP/1.1 200 OK\r\nX-Request-Id: from-upstream\r\nContent-Length: 2\r\n\r\nok"
    )
    data = b"GET /rid HTTP/1.1\r\nHost: x\r\nX-Request-Id: from-client\r\n\r\n"
    resp, _ = await request(env.port, data, close_wait=0.01)
    assert resp.header_values("x-request-id") == ["from-client"]


async def test_response_content_length_and_date(env: Env) -> None:
    env.up.state.canned["/dated"] = (
        b"HTTP/1.1 201 Created\r\nDate: Tue, 01 Jan 2030 00:00:00 GMT\r\nServer: svc\r\n"
        b"Content-Length: 3\r\n\r\nnew"
    )
    resp, _ = await request(env.port, b"GET /dated HTTP/1.1\r\nHost: x\r\n\r\n", close_wait=0.01)
    assert (resp.status, resp.reason, resp.body) == (201, "Created", b"new")
    assert resp.header_values("date") == ["Tue, 01 Jan 2030 00:00:00 GMT"]
    assert resp.header_values("content-length") == ["3"]
    assert resp.header("server") == "svc"


async def test_response_gets_a_date_when_the_upstream_sends_none(env: Env) -> None:
    env.up.state.canned["/undated"] = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    resp, _ = await request(env.port, b"GET /undated HTTP/1.1\r\nHost: x\r\n\r\n", close_wait=0.01)
    assert resp.header("date") is not None and resp.header("date").endswith("GMT")


async def test_trailing_whitespace_is_not_part_of_a_field_value(env: Env) -> None:
    """RFC 9110 §5.5: llhttp hands the value over with its trailing OWS; "Host: x " was
    refused as an invalid Host, and other values went upstream with the blanks."""
    _resp, got = await proxied(
        env, b"GET /echo HTTP/1.1\r\nHost: api.example \t\r\nX-Tag: v2  \r\n\r\n"
    )
    assert got.header("x-forwarded-host") == "api.example"
    assert b"X-Tag: v2\r\n" in got.raw
