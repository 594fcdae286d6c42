"""request_transform / response_transform through a real gateway: what the upstream receives
(headers, path, query, JSON body and its Content-Length) and what the client receives, with
bodies over `max_body_bytes` passed through byte for byte (and the fact logged)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from tests.support.client import RawClient, Response
from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Received, Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

REQUEST_TRANSFORM = {
    "headers": {
        "add": {"X-Team": "core", "X-Present": "added"},
        "set": {"X-User": "{param.user_id}", "X-Method": "{method}"},
        "remove": ["X-Secret"],
        "rename": {"X-Old": "X-New"},
    },
    "path": "/v2/accounts/{param.user_id}/items",
    "query": {
        "add": {"source": "gateway", "keep": "not-this"},
        "set": {"v": "2"},
        "remove": ["debug"],
    },
    "json": {
        "remove": ["password", "profile.ssn"],
        "rename": {"user": "account", "profile.nick": "profile.alias"},
        "set": {"profile.id": "{param.user_id}", "flags.0": False},
        "add": {"meta.via": "apigate", "meta.tags": ["a", "b"]},
    },
}

RESPONSE_TRANSFORM = {
    "headers": {
        "add": {"X-Added": "yes"},
        "set": {"X-Request": "{request_id}"},
        "remove": ["X-Internal"],
        "rename": {"X-Old": "X-New"},
    },
    "json": {
        "remove": ["internal.debug"],
        "rename": {"id": "user_id"},
        "set": {"items.0.name": "first"},
        "add": {"meta.source": "gateway"},
    },
}

SMALL = {"json": {"add": {"edited": True}}, "max_body_bytes": 100}

UPSTREAM_DOC = {
    "id": 7,
    "internal": {"debug": True, "keep": 1},
    "items": [{"name": "a"}, {"name": "b"}],
}
EDITED_DOC = {
    "internal": {"keep": 1},
    "items": [{"name": "first"}, {"name": "b"}],
    "user_id": 7,
    "meta": {"source": "gateway"},
}


def _config(up: Upstream) -> dict[str, Any]:
    return base_config(
        services={"up": {"targets": [up.url], "health": {"passive": None}}},
        routes=[
            {
                "name": "req",
                "match": {"paths": ["/users/{user_id}"]},
                "service": "up",
                "plugins": {"request_transform": REQUEST_TRANSFORM},
            },
            {
                "name": "resp",
                "match": {"paths": ["/resp"]},
                "service": "up",
                "strip_prefix": True,
                "plugins": {"response_transform": RESPONSE_TRANSFORM},
            },
            {
                "name": "prefixed",
                "match": {"paths": ["/api"]},
                "service": "up",
                "strip_prefix": True,
                "plugins": {
                    "request_transform": {
                        "path": "/v2{path}",
                        "query": {"add": {"who": "{header.x-user}", "odd": "a b&c=d"}},
                        "json": {"add": {"seen": True}},
                    }
                },
            },
            {
                "name": "small",
                "match": {"paths": ["/small"]},
                "service": "up",
                "strip_prefix": True,
                "plugins": {"request_transform": SMALL, "response_transform": SMALL},
            },
        ],
    )


@dataclass
class Setup:
    gw: GatewayProcess
    up: Upstream

    async def send(self, data: bytes) -> Response:
        async with RawClient(self.gw.port) as client:
            await client.send(data)
            return await client.response()

    def last(self) -> Received:
        assert self.up.received, "nothing reached the upstream"
        return self.up.received[-1]

    def can(self, path: str, body: bytes, *headers: str, chunked: bool = False) -> None:
        """The upstream answers `path` with this body (with a length, or chunked)."""
        head = "".join(f"{h}\r\n" for h in headers).encode()
        if chunked:
            half = len(body) // 2
            framed = b"".join(
                b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:half], body[half:])
            )
            raw = b"HTTP/1.1 200 OK\r\n%sTransfer-Encoding: chunked\r\n\r\n%s0\r\n\r\n" % (
                head,
                framed,
            )
        else:
            raw = b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)
        self.up.state.canned[path] = raw


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def setup() -> AsyncIterator[Setup]:
    async with Upstream() as up, GatewayProcess(_config(up)) as gw:
        yield Setup(gw, up)


def _post(path: str, body: bytes, *headers: str, chunked: bool = False) -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: x\r\n" + "".join(f"{h}\r\n" for h in headers)
    if chunked:
        framed = b"".join(
            b"%x\r\n%s\r\n" % (len(body[i : i + 7]), body[i : i + 7])
            for i in range(0, len(body), 7)
        )
        return head.encode() + b"Transfer-Encoding: chunked\r\n\r\n" + framed + b"0\r\n\r\n"
    return head.encode() + b"Content-Length: %d\r\n\r\n" % len(body) + body


# ------------------------------------------------------------------------------ requests

REQUEST_DOC = {
    "user": "ann",
    "password": "pw",
    "profile": {"ssn": "123", "name": "Ann", "nick": "annie"},
    "flags": [True, True],
}
REQUEST_EDITED = (
    b'{"profile":{"name":"Ann","alias":"annie","id":"42"},"flags":[false,true],'
    b'"account":"ann","meta":{"tags":["a","b"],"via":"apigate"}}'
)  # (the test harness writes the config with sorted keys: meta.tags is added first)


@pytest.mark.parametrize("chunked", [False, True])
async def test_request_transform_as_received_by_the_upstream(setup: Setup, chunked: bool) -> None:
    body = json.dumps(REQUEST_DOC).encode()
    resp = await setup.send(
        _post(
            "/users/42/ignored?debug=1&keep=yes&v=1",
            body,
            "Content-Type: application/json",
            "X-Secret: s3cret",
            "X-Old: moved",
            "X-New: overwritten",
            "X-Present: original",
            "X-User: spoofed",
            chunked=chunked,
        )
    )
    assert resp.status == 200, resp.body
    rec = setup.last()
    assert rec.path == "/v2/accounts/42/items"
    assert rec.query == "keep=yes&v=2&source=gateway"
    assert rec.body == REQUEST_EDITED
    assert rec.header("content-length") == str(len(REQUEST_EDITED))
    assert rec.header("transfer-encoding") is None
    assert rec.header("x-secret") is None and rec.header("x-old") is None
    assert rec.header_values("x-new") == ["moved"]
    assert rec.header_values("x-present") == ["original"]  # add: only when absent
    assert rec.header_values("x-team") == ["core"]
    assert rec.header_values("x-user") == ["42"]  # set: replaces what the client sent
    assert rec.header_values("x-method") == ["POST"]


async def test_request_path_capture_is_encoded_into_one_segment(setup: Setup) -> None:
    resp = await setup.send(b"GET /users/a%2Fb%20c HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    assert setup.last().path == "/v2/accounts/a%2Fb%20c/items"


async def test_request_body_that_is_not_json_passes_untouched(setup: Setup) -> None:
    body = b'{"user": "ann", "password": "pw"}'
    await setup.send(_post("/users/7", body, "Content-Type: text/plain"))
    assert setup.last().body == body
    broken = b'{"user": "ann", "password": '
    await setup.send(_post("/users/7", broken, "Content-Type: application/json"))
    assert setup.last().body == broken
    assert setup.last().header("content-length") == str(len(broken))


@pytest.mark.parametrize("chunked", [False, True])
async def test_request_body_over_the_cap_passes_untouched(setup: Setup, chunked: bool) -> None:
    small = b'{"a": 1}'
    await setup.send(_post("/small/echo", small, "Content-Type: application/json"))
    assert setup.last().body == b'{"a":1,"edited":true}'  # under the cap: edited
    big = json.dumps({"a": "x" * 300}).encode()
    resp = await setup.send(
        _post("/small/echo", big, "Content-Type: application/json", chunked=chunked)
    )
    assert resp.status == 200
    rec = setup.last()
    assert rec.body == big
    assert resp.json()["body_sha256"] == hashlib.sha256(big).hexdigest()
    await setup.gw.wait_for_log("body over max_body_bytes on route small")


async def test_path_template_with_the_routed_path_and_templated_query(setup: Setup) -> None:
    resp = await setup.send(b"GET /api/items/1?q=x HTTP/1.1\r\nHost: x\r\nX-User: ann\r\n\r\n")
    assert resp.status == 200
    rec = setup.last()
    assert (rec.path, rec.query) == ("/v2/items/1", "q=x&odd=a%20b%26c%3Dd&who=ann")


async def test_json_body_sent_after_100_continue_and_in_pieces(setup: Setup) -> None:
    body = b'{"n": 1, "text": "' + b"t" * 200 + b'"}'
    expected = json.dumps({"n": 1, "text": "t" * 200, "seen": True}, separators=(",", ":"))
    async with RawClient(setup.gw.port) as client:
        await client.send(
            b"POST /api/echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Expect: 100-continue\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        interim = await client.response(interim=True)
        assert interim.status == 100
        for i in range(0, len(body), 50):  # in four reads, 50 ms apart
            await client.send(body[i : i + 50])
            await asyncio.sleep(0.05)
        resp = await client.response()
    assert resp.status == 200
    rec = setup.last()
    assert rec.body == expected.encode()
    assert rec.header("content-length") == str(len(expected))


# ------------------------------------------------------------------------------ responses


@pytest.mark.parametrize("chunked", [False, True])
async def test_response_transform_as_received_by_the_client(setup: Setup, chunked: bool) -> None:
    setup.can(
        "/doc",
        json.dumps(UPSTREAM_DOC).encode(),
        "Content-Type: application/json",
        "X-Internal: secret",
        "X-Old: moved",
        "X-Added: upstream",
        "X-Request: upstream",
        chunked=chunked,
    )
    resp = await setup.send(b"GET /resp/doc HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    expected = json.dumps(EDITED_DOC, separators=(",", ":")).encode()
    assert resp.body == expected
    assert resp.header("content-length") == str(len(expected))
    assert not resp.chunked
    assert resp.header("x-internal") is None and resp.header("x-old") is None
    assert resp.header_values("x-new") == ["moved"]
    assert resp.header_values("x-added") == ["upstream"]
    assert resp.header_values("x-request") == [resp.header("x-request-id")]


async def test_head_on_a_json_edited_route_does_not_claim_the_upstreams_length(
    setup: Setup,
) -> None:
    """The GET's body is edited, so the upstream's Content-Length is not its length: a HEAD
    leaves it out (RFC 9110 §8.6) rather than state a wrong one."""
    original = json.dumps(UPSTREAM_DOC).encode()
    setup.up.state.canned["/head-doc"] = (
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(original)
    )  # (canned answers go out verbatim: this one as a HEAD answer should)
    async with RawClient(setup.gw.port) as client:
        await client.send(b"HEAD /resp/head-doc HTTP/1.1\r\nHost: x\r\n\r\n")
        resp = await client.response(method="HEAD")
    assert resp.status == 200 and resp.header("content-length") is None


async def test_upstream_reset_while_the_body_is_held_for_editing_is_a_502(setup: Setup) -> None:
    """Nothing has reached the client while the body is collected for its edit: an upstream
    that resets then gets the client a 502, as before any response (not a cut connection)."""
    resp = await setup.send(b"GET /resp/reset-mid-json HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 502 and resp.json()["error"] == "upstream_reset"


async def test_response_that_is_not_json_passes_untouched(setup: Setup) -> None:
    text = json.dumps(UPSTREAM_DOC).encode()
    setup.can("/text", text, "Content-Type: text/plain", "X-Internal: secret")
    resp = await setup.send(b"GET /resp/text HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.body == text
    assert resp.header("x-internal") is None  # header edits still apply


@pytest.mark.parametrize("chunked", [False, True])
async def test_response_over_the_cap_passes_untouched(setup: Setup, chunked: bool) -> None:
    setup.can("/tiny", b'{"b": 2}', "Content-Type: application/json")
    small = await setup.send(b"GET /small/tiny HTTP/1.1\r\nHost: x\r\n\r\n")
    assert small.body == b'{"b":2,"edited":true}'
    big = json.dumps({"b": "y" * 300}).encode()
    setup.can("/huge", big, "Content-Type: application/json", chunked=chunked)
    resp = await setup.send(b"GET /small/huge HTTP/1.1\r\nHost: x\r\n\r\n")
    assert resp.status == 200
    assert resp.body == big
    assert resp.chunked == chunked
    if not chunked:
        assert resp.header("content-length") == str(len(big))


# ------------------------------------------------------------------------------ with slow auth


def _pbkdf2(password: str, iterations: int) -> str:
    salt = "pepper"
    digest = hashlib.pbkdf2_hmac("sha256", password.encode(), salt.encode(), iterations)
    return f"pbkdf2_sha256${iterations}${salt}${base64.b64encode(digest).decode()}"


def _basic(user: str, password: str) -> str:
    return "Authorization: Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("size", "chunked"),
    [(50, True), (1000, False), (1000, True)],  # under / over request_transform's cap
)
async def test_body_waits_for_a_slow_auth_check(size: int, chunked: bool) -> None:
    """basic_auth checks a pbkdf2 hash in a worker thread (an awaited hook) while the JSON body
    arrives. Whatever its size and framing, the body must wait for the verdict: a wrong password
    is a 401 that never reaches the upstream, a right one reaches it exactly once."""
    async with Upstream() as up:
        config = base_config(
            services={"up": {"targets": [up.url], "health": {"passive": None}}},
            consumers=[
                {
                    "name": "ann",
                    "basic_auth": {"username": "ann", "password": _pbkdf2("right", 100_000)},
                }
            ],
            routes=[
                {
                    "name": "guarded",
                    "match": {"paths": ["/guarded"]},
                    "service": "up",
                    "plugins": {"basic_auth": {}, "request_transform": SMALL},
                }
            ],
        )
        async with GatewayProcess(config) as gw:
            body = json.dumps({"a": "z" * size}).encode()
            for password, status in (("wrong", 401), ("right", 200)):
                async with RawClient(gw.port) as client:
                    await client.send(
                        _post(
                            "/guarded/echo",
                            body,
                            "Content-Type: application/json",
                            _basic("ann", password),
                            chunked=chunked,
                        )
                    )
                    resp = await client.response()
                    assert resp.status == status, (password, resp.body)
                if status == 401:
                    assert up.received == [], "a request that failed auth reached the upstream"
            await asyncio.sleep(0.3)  # a duplicate would arrive in this time
            assert len(up.received) == 1, "the authorised request must reach the upstream once"
            expected = (
                body
                if size > 100
                else json.dumps({"a": "z" * size, "edited": True}, separators=(",", ":")).encode()
            )
            assert up.received[0].body == expected
