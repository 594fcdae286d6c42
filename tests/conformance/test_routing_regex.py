"""Regex paths (`~/...`) through a real gateway and a recording upstream: which route a request
takes beside a catch-all, exact and prefix routes, and the path the upstream receives after
`rewrite` with named groups, `strip_prefix` (the regex's match removed) and an aggregate."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.conftest import assert_rejected, proxied
from tests.support.client import request
from tests.support.env import Env, env_fixture, shared_env_fixture
from tests.support.gateway import base_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")


def _config(up: Upstream) -> dict[str, Any]:
    return base_config(
        services={"up": {"targets": [up.url]}, "based": {"targets": [up.url + "/base"]}},
        routes=[
            {"name": "all", "match": {"paths": ["/"]}, "service": "up"},
            {  # deeper than the regex's literal start, yet the regex comes first
                "name": "deep",
                "match": {"paths": ["/api/v1/users"]},
                "service": "up",
                "rewrite": "/deep",
            },
            {
                "name": "user",
                "match": {"paths": [r"~/api/v\d+/users/(?<id>\d+)$"]},
                "service": "up",
                "rewrite": "/users/{id}",
            },
            {
                "name": "exact",
                "match": {"paths": ["=/api/v1/users/0"]},
                "service": "up",
                "rewrite": "/exact",
            },
            {
                "name": "strip",
                "match": {"paths": [r"~/svc/v\d+"]},
                "service": "up",
                "strip_prefix": True,
            },
            {
                "name": "catch-some",
                "match": {"paths": [r"~/p/\w+"], "regex_priority": -1},
                "service": "up",
                "rewrite": "/low",
            },
            {
                "name": "numbers",
                "match": {"paths": [r"~/p/(?<n>\d+)$"], "regex_priority": 1},
                "service": "up",
                "rewrite": "/number/{n}",
            },
            {
                "name": "fixed",
                "match": {"paths": [r"~/rw"]},
                "service": "up",
                "rewrite": "/internal/public",
            },
            {
                "name": "based",
                "match": {"paths": [r"~/b\d"]},
                "service": "based",
                "strip_prefix": True,
            },
            {
                "name": "dashboard",
                "match": {"paths": [r"~/dash/(?<user_id>\d+)$"]},
                "aggregate": {"profile": {"service": "up", "path": "/profile/{user_id}"}},
            },
        ],
    )


shared_env = shared_env_fixture(_config)
env = env_fixture()


@pytest.mark.parametrize(
    ("target", "sent"),
    [
        (b"/api/v7/users/42", "/users/42"),
        (b"/api/v1/users/42", "/users/42"),  # not the deeper prefix route
        (b"/api/v1/users/%34%32", "/users/42"),  # the regex sees the normalised path
        (b"/api/v1/users/0", "/exact"),  # an exact path comes first
        (b"/api/v1/users/42/orders", "/deep/42/orders"),  # "$" fails: the prefix route
        (b"/api/v1/users/x", "/deep/x"),
        (b"/svc/v2/things", "/things"),  # strip_prefix: what the regex matched goes
        (b"/svc/v2", "/"),
        (b"/svc/v2x/a", "/x/a"),  # (no segment boundary, as in Kong)
        (b"/p/17", "/number/17"),  # regex_priority 1 before -1
        (b"/p/abc", "/low"),
        (b"/other/x", "/other/x"),
    ],
)
async def test_the_upstream_gets_the_path_the_regex_route_makes(
    env: Env, target: bytes, sent: str
) -> None:
    _, got = await proxied(env, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.path == sent


async def test_strip_prefix_sends_the_matched_text_as_the_forwarded_prefix(env: Env) -> None:
    _, got = await proxied(env, b"GET /svc/v12/things?q=1 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (got.path, got.query) == ("/things", "q=1")
    assert got.header("x-forwarded-prefix") == "/svc/v12"


async def test_an_aggregate_part_path_uses_a_named_group(env: Env) -> None:
    resp, _ = await request(env.port, b"GET /dash/42 HTTP/1.1\r\nHost: x\r\n\r\n", close_wait=0.05)
    assert resp.status == 200, resp.body
    assert [r.path for r in env.up.received] == ["/profile/42"]


@pytest.mark.parametrize(
    "target",
    [b"/svc/v1../secret", b"/svc/v1%2e%2e/x", b"/svc/v1./x", b"/rw../admin", b"/b1../secret"],
)
async def test_a_regex_that_ends_inside_a_segment_makes_no_dot_segment_upstream(
    env: Env, target: bytes
) -> None:
    """A regex match may end inside a segment: what follows it starts a segment of its own
    upstream after strip_prefix or a rewrite, and `..` there climbed out of the service's
    base path (`/b1../secret` reached the upstream as `/base/../secret`)."""
    await assert_rejected(
        env, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, closed=False
    )


async def test_a_regex_that_ends_inside_a_segment_may_still_strip(env: Env) -> None:
    _, got = await proxied(env, b"GET /b1x/y HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.path == "/base/x/y"
