"""The path a service's base path (`http://up:8080/base`) receives after `strip_prefix`, a
`~` regex path's strip, a `rewrite`, or none: Kong's `strip_path` onto a service `path`
(`spec/fixtures/router_path_handling_tests.lua`, the same with `path_handling` v0 and v1 for
these cases). A request for the root of the service (nothing after the prefix) goes to the base
path itself, `/base`, not `/base/`; a slash the client sent after the prefix stays."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.conftest import proxied
from tests.support.env import Env, env_fixture, shared_env_fixture
from tests.support.gateway import base_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _config(up: Upstream) -> dict[str, Any]:
    return base_config(
        services={
            "based": {"targets": [up.url + "/base"]},
            "rooted": {"targets": [up.url + "/"]},  # a base path of "/" is none
        },
        routes=[
            {"name": "all", "match": {"paths": ["/"]}, "service": "based"},
            {"name": "api", "match": {"paths": ["/api"]}, "service": "based", "strip_prefix": True},
            {"name": "plain", "match": {"paths": ["/plain"]}, "service": "based"},
            {
                "name": "regex",
                "match": {"paths": [r"~/re/v\d+"]},
                "service": "based",
                "strip_prefix": True,
            },
            {"name": "to-root", "match": {"paths": ["/rw"]}, "service": "based", "rewrite": "/"},
            {"name": "to-v2", "match": {"paths": ["/rw2"]}, "service": "based", "rewrite": "/v2"},
            {
                "name": "user",
                "match": {"paths": ["/users/{id}"]},
                "service": "based",
                "rewrite": "/u/{id}",
            },
            {
                "name": "exact",
                "match": {"paths": ["=/exact"]},
                "service": "based",
                "strip_prefix": True,
            },
            {
                "name": "root",
                "match": {"paths": ["/root"]},
                "service": "rooted",
                "strip_prefix": True,
            },
        ],
    )


shared_env = shared_env_fixture(_config)
env = env_fixture()


@pytest.mark.parametrize(
    ("target", "sent"),
    [
        # strip_prefix: Kong sends /base for /api, /base/ for /api/
        ("/api", "/base"),
        ("/api/", "/base/"),
        ("/api/x", "/base/x"),
        ("/api/x/", "/base/x/"),
        # a `~` path strips what the regex matched, the same way
        ("/re/v1", "/base"),
        ("/re/v1/", "/base/"),
        ("/re/v1/x", "/base/x"),
        ("/re/v1x/y", "/base/x/y"),
        # an exact path is all prefix
        ("/exact", "/base"),
        # a rewrite replaces the prefix: "/" like strip_prefix, else its own path
        ("/rw", "/base"),
        ("/rw/", "/base/"),
        ("/rw/x", "/base/x"),
        ("/rw2", "/base/v2"),
        ("/rw2/", "/base/v2/"),
        ("/rw2/x", "/base/v2/x"),
        ("/users/7", "/base/u/7"),
        ("/users/7/", "/base/u/7/"),
        # without strip_prefix the path is kept; `/` alone is the root (Kong: /base)
        ("/plain", "/base/plain"),
        ("/plain/", "/base/plain/"),
        ("/", "/base"),
        ("/x", "/base/x"),
        # a base path of "/": the root is "/" itself
        ("/root", "/"),
        ("/root/", "/"),
        ("/root/x", "/x"),
    ],
)
async def test_the_base_path_gets_what_follows_the_prefix(env: Env, target: str, sent: str) -> None:
    _, got = await proxied(env, b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % target.encode())
    assert got.path == sent


@pytest.mark.parametrize(("target", "sent"), [("/api", "/base"), ("/api/", "/base/")])
async def test_the_query_stays_on_the_base_path(env: Env, target: str, sent: str) -> None:
    _, got = await proxied(env, b"GET %s?q=1&r HTTP/1.1\r\nHost: x\r\n\r\n" % target.encode())
    assert (got.path, got.query) == (sent, "q=1&r")
    assert got.raw.startswith(b"GET %s?q=1&r HTTP/1.1\r\n" % sent.encode())
    assert got.header("x-forwarded-prefix") == "/api"
