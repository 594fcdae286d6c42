"""request_termination through a real gateway process and a real upstream that counts what
reaches it: terminated requests never do, triggers by header and query parameter, the echo
and its redactions, HEAD, keep-alive, global and route entries, an aggregate route.

One gateway serves every case (a route per setting), so the file costs one process start.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import pytest_asyncio

from tests.support.gateway import GatewayProcess, base_config, raw_request
from tests.support.http import KeepAliveClient, request
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

API_KEY = "k-77c1d0e5a94b3f28"
MAINTENANCE_PAGE = "<h1>Back soon</h1>"


def _config(upstream_url: str) -> dict[str, Any]:
    return base_config(
        services={"up": {"targets": [upstream_url]}},
        consumers=[{"name": "alice", "api_keys": ["${ALICE_KEY}"]}],
        # every route, unless it has its own entry: only requests that ask for it
        plugins={"request_termination": {"trigger": "X-Gw-Closed"}},
        routes=[
            {"name": "open", "match": {"paths": ["/open"]}, "service": "up"},
            {
                "name": "retired",  # its own entry replaces the global one
                "match": {"paths": ["/retired"]},
                "service": "up",
                "plugins": {
                    "request_termination": {"status_code": 410, "message": "v1 was retired"}
                },
            },
            {
                "name": "page",
                "match": {"paths": ["/page"]},
                "service": "up",
                "plugins": {
                    "request_termination": {
                        "body": MAINTENANCE_PAGE,
                        "content_type": "text/html; charset=utf-8",
                    }
                },
            },
            {
                "name": "debug",
                "match": {"paths": ["/debug"]},
                "service": "up",
                "plugins": {
                    "key_auth": {"hide_credentials": False},
                    "request_termination": {"status_code": 200, "echo": True, "trigger": "echo"},
                },
            },
            {
                "name": "fanout",
                "match": {"paths": ["/fanout"]},
                "aggregate": {"one": {"service": "up", "path": "/echo"}},
                "plugins": {"request_termination": {"status_code": 503}},
            },
        ],
    )


class Setup:
    def __init__(self, up: Upstream, gw: GatewayProcess) -> None:
        self.up = up
        self.gw = gw

    @contextmanager
    def upstream_untouched(self) -> Iterator[None]:
        """Asserts that not one byte reached the upstream meanwhile."""
        before = (len(self.up.received), self.up.state.bytes_received, self.up.state.connections)
        yield
        after = (len(self.up.received), self.up.state.bytes_received, self.up.state.connections)
        assert after == before, "the upstream was reached"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup() -> AsyncIterator[Setup]:
    async with Upstream() as up, GatewayProcess(_config(up.url), env={"ALICE_KEY": API_KEY}) as gw:
        yield Setup(up, gw)
        assert API_KEY not in gw.logs()


def split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, payload = raw.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in fields:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(status_line.split()[1]), headers, payload


async def test_a_terminated_route_never_reaches_the_upstream(setup: Setup) -> None:
    with setup.upstream_untouched():
        for method in ("GET", "POST", "DELETE"):
            reply = await request(setup.gw.port, method, "/retired/users", body=b"{}")
            assert reply.status == 410
            doc = reply.json()
            assert doc == {
                "error": "gone",
                "message": "v1 was retired",
                "request_id": reply.headers["x-request-id"],
            }
            assert reply.headers["content-type"] == "application/json"
            assert reply.headers["content-length"] == str(len(reply.body))


async def test_global_entry_terminates_only_triggered_requests(setup: Setup) -> None:
    reply = await request(setup.gw.port, "GET", "/open/a?x=1")
    assert reply.status == 200 and setup.up.received[-1].path == "/open/a"
    with setup.upstream_untouched():
        by_header = await request(setup.gw.port, "GET", "/open/a", headers={"X-Gw-Closed": "1"})
        by_query = await request(setup.gw.port, "GET", "/open/a?x=1&X-Gw-Closed")
        empty_value = await request(setup.gw.port, "GET", "/open/a", headers={"x-gw-closed": ""})
    for reply in (by_header, by_query, empty_value):
        assert reply.status == 503
        assert reply.json()["error"] == "service_unavailable"
        assert reply.json()["message"] == "Service Unavailable"
    # the route's own entry replaced the global one: no trigger, its own answer
    with setup.upstream_untouched():
        reply = await request(setup.gw.port, "GET", "/retired", headers={"X-Gw-Closed": "1"})
    assert reply.status == 410 and reply.json()["message"] == "v1 was retired"


async def test_body_is_answered_as_configured(setup: Setup) -> None:
    with setup.upstream_untouched():
        reply = await request(setup.gw.port, "GET", "/page")
    assert (reply.status, reply.body) == (503, MAINTENANCE_PAGE.encode())
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    assert reply.headers["content-length"] == str(len(MAINTENANCE_PAGE))


async def test_head_gets_the_head_alone(setup: Setup) -> None:
    def retired_body(request_id: str) -> bytes:  # (ids differ in length: not the GET's)
        doc = {"error": "gone", "message": "v1 was retired", "request_id": request_id}
        return json.dumps(doc, separators=(",", ":")).encode()

    for path in ("/retired", "/page"):
        get = await request(setup.gw.port, "GET", path)
        with setup.upstream_untouched():
            raw = await raw_request(
                setup.gw.port,
                f"HEAD {path} HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n".encode(),
                until_close=True,
            )
        status, headers, payload = split(raw)
        assert status == get.status and payload == b"", raw  # not one body byte
        assert headers["content-type"] == get.headers["content-type"]
        if path == "/retired":
            assert get.body == retired_body(get.headers["x-request-id"])
            length = len(retired_body(headers["x-request-id"]))
        else:
            length = len(MAINTENANCE_PAGE)
        assert headers["content-length"] == str(length)


async def test_echo_describes_the_request_with_credentials_redacted(setup: Setup) -> None:
    # authentication runs first: a terminated (or echoed) route still asks for a key
    with setup.upstream_untouched():
        reply = await request(setup.gw.port, "GET", "/debug/x?echo")
    assert reply.status == 401
    # untriggered: proxied
    reply = await request(setup.gw.port, "GET", "/debug/x", headers={"apikey": API_KEY})
    assert reply.status == 200 and setup.up.received[-1].path == "/debug/x"
    with setup.upstream_untouched():
        reply = await request(
            setup.gw.port,
            "POST",
            "/debug/x?echo&page=2&access_token=tok-sekrit",
            body=b'{"a": 1}',
            headers={
                "apikey": API_KEY,
                "Cookie": "session=cookie-sekrit",
                "Authorization": "Bearer bearer-sekrit",
                "X-Trace-Me": "yes",
            },
        )
    assert reply.status == 200, reply.body
    assert API_KEY.encode() not in reply.body and b"sekrit" not in reply.body
    doc = reply.json()
    assert doc["route"] == "debug" and doc["consumer"] == "alice"
    req = doc["request"]
    assert (req["method"], req["path"], req["client_ip"]) == ("POST", "/debug/x", "127.0.0.1")
    assert req["host"] == f"127.0.0.1:{setup.gw.port}"
    assert req["query"] == "echo&page=2&access_token=[redacted]"
    assert req["request_id"] == reply.headers["x-request-id"]
    headers = dict(req["headers"])
    assert headers["apikey"] == headers["Cookie"] == headers["Authorization"] == "[redacted]"
    assert headers["X-Trace-Me"] == "yes"
    assert "Content-Length" not in headers and "Connection" not in headers  # framing, hop


async def test_an_aggregate_route_is_terminated_before_its_parts_are_called(
    setup: Setup,
) -> None:
    with setup.upstream_untouched():
        reply = await request(setup.gw.port, "GET", "/fanout")
    assert reply.status == 503 and reply.json()["error"] == "service_unavailable"


async def test_a_bodiless_terminated_request_keeps_its_connection(setup: Setup) -> None:
    async with KeepAliveClient(setup.gw.port) as client:
        with setup.upstream_untouched():
            first = await client.get("/open/1", {"X-Gw-Closed": "1"})
        assert first.status == 503 and "connection" not in first.headers
        second = await client.get("/open/2")  # the same connection
        assert second.status == 200 and setup.up.received[-1].path == "/open/2"


async def test_a_terminated_request_with_a_body_keeps_its_connection(setup: Setup) -> None:
    """As nginx and Kong do: the body is read and dropped, and the connection goes on with the
    request pipelined after it. What the body holds (shaped as a request here) is never taken
    for a request."""
    smuggled = b"GET /open/smuggled HTTP/1.1\r\nHost: gw.test\r\n\r\n"
    data = (
        b"POST /retired HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n%s"
        b"GET /open/second HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
        % (len(smuggled), smuggled)
    )
    seen = len(setup.up.received)
    raw = await raw_request(setup.gw.port, data, until_close=True)
    first, second = raw.split(b"HTTP/1.1 ")[1:]  # two answers, then the connection ended
    status, headers, payload = split(b"HTTP/1.1 " + first)
    assert status == 410 and "connection" not in headers
    assert len(payload) == int(headers["content-length"])
    assert second.startswith(b"200 ")
    assert [r.path for r in setup.up.received[seen:]] == ["/open/second"]


@pytest.mark.parametrize(
    ("path", "status"),
    [("/debug", 401), ("/nowhere", 404)],  # a plugin's answer; the gateway's own error
    ids=["key_auth-401", "no-route-404"],
)
async def test_other_early_answers_to_a_body_keep_the_connection_too(
    setup: Setup, path: str, status: int
) -> None:
    body = b'{"a": 1}'
    data = (
        b"POST %s HTTP/1.1\r\nHost: gw.test\r\nContent-Length: %d\r\n\r\n%s"
        b"GET /open/after-%d HTTP/1.1\r\nHost: gw.test\r\nConnection: close\r\n\r\n"
        % (path.encode(), len(body), body, status)
    )
    seen = len(setup.up.received)
    raw = await raw_request(setup.gw.port, data, until_close=True)
    first, second = raw.split(b"HTTP/1.1 ")[1:]
    assert first.startswith(b"%d " % status) and b"\r\nConnection: close" not in first
    assert second.startswith(b"200 ")
    assert [r.path for r in setup.up.received[seen:]] == [f"/open/after-{status}"]


@pytest.mark.parametrize("path", ["/retired", "/nowhere"])  # a plugin's answer; a 404
async def test_an_http10_client_is_told_its_connection_stays(setup: Setup, path: str) -> None:
    """RFC 9112 §9.3: an HTTP/1.0 connection persists only when the answer says keep-alive.
    The gateway's own answers kept it open without saying so (review), as proxied ones do."""
    data = (
        b"GET %s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
        b"GET /open/after HTTP/1.0\r\n\r\n" % path.encode()
    )
    raw = await raw_request(setup.gw.port, data, until_close=True)
    first, second = raw.split(b"HTTP/1.1 ")[1:]
    assert b"\r\nConnection: keep-alive\r\n" in first
    assert second.startswith(b"200 ")


async def test_an_upload_waiting_for_100_continue_gets_the_answer_and_a_close(
    setup: Setup,
) -> None:
    """It may send no body after the answer (RFC 9110 §10.1.1): the connection closes (with
    a lingering close, reading what it still sends), or its next request would be read as the
    body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", setup.gw.port)
    try:
        writer.write(
            b"PUT /retired HTTP/1.1\r\nHost: gw.test\r\nContent-Length: 100000\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 410 ") and b"\r\nConnection: close\r\n" in head
        writer.write(b"x" * 100_000)  # read and discarded while the gateway lingers
        rest = await asyncio.wait_for(reader.read(), 5)  # then EOF, not a reset
        assert b"HTTP/1.1" not in rest
    finally:
        writer.close()
    reply = await request(setup.gw.port, "GET", "/open/after")  # the gateway is fine
    assert reply.status == 200
