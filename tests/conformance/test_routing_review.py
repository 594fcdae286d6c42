"""Ways around a protected route, from the routing review: a path or field the router reads
one way and a back end another. Beside a protected `/admin` (key_auth, GET) and a protected
header route (`X-Tenant: internal`), an open catch-all goes to the same upstream; each case
checks what the client gets and what, if anything, reached the upstream."""

from __future__ import annotations

from typing import Any

import pytest

from tests.conformance.conftest import assert_error, proxied
from tests.support.client import request
from tests.support.env import Env, env_fixture, shared_env_fixture
from tests.support.gateway import base_config
from tests.support.upstream import Upstream

pytestmark = pytest.mark.asyncio(loop_scope="module")

_KEY = {"key_auth": {}}


def _config(up: Upstream) -> dict[str, Any]:
    return base_config(
        services={"up": {"targets": [up.url]}},
        consumers=[{"name": "ops", "api_keys": ["k-ops-0123456789"]}],
        routes=[
            {"name": "open", "match": {"paths": ["/"]}, "service": "up"},
            {
                "name": "admin",
                "match": {"paths": ["/admin"], "methods": ["GET"]},
                "service": "up",
                "plugins": _KEY,
            },
            {
                "name": "files",
                "match": {"paths": ["/files"]},
                "service": "up",
            },
            {  # GitLab's project ids: `group%2Fproject` is one segment
                "name": "projects",
                "match": {"paths": ["/projects/{id}/merge_requests"]},
                "service": "up",
            },
            {
                "name": "tenant",
                "match": {"paths": ["/"], "headers": {"x-tenant": "internal"}},
                "service": "up",
                "plugins": _KEY,
            },
        ],
    )


shared_env = shared_env_fixture(_config)
env = env_fixture()


async def _refused(env: Env, data: bytes, status: int, code: str) -> dict[str, Any]:
    resp, _ = await request(env.port, data, close_wait=0.3)
    doc = assert_error(resp, status, code)
    assert env.up.received == [], env.up.received
    return doc


# ------------------------------------------------ paths other back ends read as another route's
@pytest.mark.parametrize(
    "target",
    [
        b"/admin%2Fusers",  # Werkzeug, wsgiref, uvicorn: PATH_INFO /admin/users
        b"/admin%2f",
        b"/x/..%2Fadmin",
        b"/admin%5Cusers",  # a backslash is a separator for some
        b"/admin;x",  # Tomcat, Jetty, Spring drop ";" parameters: /admin
        b"/x/..;/admin",
        b"/admin;jsessionid=1/users",
        b"/admin;%2F..",  # Tomcat: /admin (parameters dropped before decoding); decoded: /
        b"/admin;%2F..%2Fx/users",  # Tomcat: /admin/users
    ],
)
async def test_a_path_that_reads_as_a_protected_route_is_refused(env: Env, target: bytes) -> None:
    """These matched the open catch-all and went upstream unauthenticated."""
    doc = await _refused(
        env, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n", 400, "ambiguous_path"
    )
    assert "another route" in doc["message"]


@pytest.mark.parametrize(
    ("target", "sent"),
    [
        (b"/files/group%2Fproject", "/files/group%2Fproject"),  # same route either way
        (b"/open%2Fthing", "/open%2Fthing"),  # /open/thing is the catch-all's as well
        (b"/data;v=1/a", "/data;v=1/a"),  # /data/a is the catch-all's too
        (b"/a%20b", "/a%20b"),
        # read as /projects/group/project/merge_requests: the open route's, which asks for
        # nothing the projects route does not (the diff review: this was a 400)
        (b"/projects/group%2Fproject/merge_requests", "/projects/group%2Fproject/merge_requests"),
    ],
)
async def test_an_encoded_slash_or_parameter_within_one_route_is_forwarded(
    env: Env, target: bytes, sent: str
) -> None:
    _, got = await proxied(env, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.path == sent


# ------------------------------------------------ methods
async def test_head_is_served_by_the_get_route_and_its_plugins(env: Env) -> None:
    """HEAD fell through from the GET-only /admin to the open catch-all: a back end that runs
    its GET view for HEAD answered it (headers, side effects) without the key check."""
    head = b"HEAD /admin HTTP/1.1\r\nHost: x\r\n"
    resp, _ = await request(env.port, head + b"\r\n", method="HEAD")
    assert resp.status == 401 and env.up.received == []
    resp, _ = await request(
        env.port,
        head + b"ApiKey: k-ops-0123456789\r\n\r\n",
        method="HEAD",
    )
    assert resp.status == 200
    assert [(r.method, r.path) for r in env.up.received] == [("HEAD", "/admin")]


# ------------------------------------------------ fields a route matches on
async def test_an_underscore_spelling_of_a_routing_field_is_dropped(env: Env) -> None:
    """`X_Tenant: internal` went to the open route and upstream as it was: WSGI reads it as
    X-Tenant (HTTP_X_TENANT), the field the protected route matches on."""
    _, got = await proxied(
        env, b"GET /data HTTP/1.1\r\nHost: x\r\nX_Tenant: internal\r\nX_Other: kept\r\n\r\n"
    )
    names = [name.lower() for name, _ in got.headers]
    assert "x_tenant" not in names and "x-tenant" not in names
    assert got.header("x_other") == "kept"


async def test_a_routing_field_sent_twice_is_refused(env: Env) -> None:
    """Routed on the first value (the open route), while a back end may read the last."""
    doc = await _refused(
        env,
        b"GET /data HTTP/1.1\r\nHost: x\r\nX-Tenant: other\r\nx-tenant: internal\r\n\r\n",
        400,
        "bad_request",
    )
    assert "X-Tenant" in doc["message"] or "x-tenant" in doc["message"]


async def test_a_routing_field_sent_twice_with_one_value_is_taken(env: Env) -> None:
    """(Fields such as Accept may come on several lines.)"""
    _, got = await proxied(
        env, b"GET /data HTTP/1.1\r\nHost: x\r\nX-Tenant: other\r\nX-Tenant: other\r\n\r\n"
    )
    assert got.header_values("x-tenant") == ["other", "other"]


async def test_a_routing_field_sent_once_routes_as_before(env: Env) -> None:
    await _refused(
        env, b"GET /data HTTP/1.1\r\nHost: x\r\nX-Tenant: internal\r\n\r\n", 401, "unauthorized"
    )
    _, got = await proxied(env, b"GET /data HTTP/1.1\r\nHost: x\r\nX-Tenant: other\r\n\r\n")
    assert got.header("x-tenant") == "other"


# ------------------------------------------------ authorities
@pytest.mark.parametrize(
    "head",
    [
        b"GET http://x/data#/../admin HTTP/1.1\r\nHost: x\r\n\r\n",  # dropped in silence
        b"GET http://x/data# HTTP/1.1\r\nHost: x\r\n\r\n",  # (httptools: no fragment)
        b"GET http://[fe80::1%25eth0]/data HTTP/1.1\r\nHost: x\r\n\r\n",  # Host says 400
        b"GET http://a..example/data HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /data HTTP/1.1\r\nHost: admin.example..\r\n\r\n",  # an empty label (nginx)
    ],
)
async def test_an_authority_or_target_refused_in_one_form_is_refused_in_the_other(
    env: Env, head: bytes
) -> None:
    await _refused(env, head, 400, "bad_request")
