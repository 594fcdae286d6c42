"""A token-less admin API against a web page the operator happens to open: the review's
cross-site POST /config (text/plain, no preflight) and a DNS-rebound Host, on a real gateway."""

from __future__ import annotations

import json

from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import request
from tests.support.upstream import Upstream


def _config(up: Upstream) -> dict[str, object]:
    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={"up": {"targets": [up.url]}},
        routes=[{"name": "r", "match": {"paths": ["/"]}, "service": "up"}],
    )


async def test_a_web_page_cannot_replace_the_config_of_a_token_less_admin_api() -> None:
    async with Upstream() as up, GatewayProcess(_config(up)) as gw:
        doc = (await request(gw.admin_port, "GET", "/config")).json()["config"]
        doc["routes"].append({"name": "evil", "match": {"paths": ["/evil"]}, "service": "up"})
        page = {"Origin": "http://localhost:3000", "Content-Type": "text/plain"}
        sent = await request(
            gw.admin_port, "POST", "/config", body=json.dumps(doc).encode(), headers=page
        )
        assert sent.status == 403, sent.body
        rebound = await request(
            gw.admin_port, "GET", "/routes", headers={"Host": f"attacker.example:{gw.admin_port}"}
        )
        assert rebound.status == 403
        routes = (await request(gw.admin_port, "GET", "/routes")).json()
        assert "evil" not in json.dumps(routes)
        ok = await request(gw.admin_port, "POST", "/config", json_body=doc)
        assert ok.status == 200, ok.body  # the same change from curl or the CLI


async def test_a_service_target_on_the_gateways_own_listener_is_refused() -> None:
    """A service pointed at the admin listener plus a route to it served the admin API on
    the proxy listener (`GET <proxy>/adm/config` answered 200): registrations of such an
    address were refused, service targets not."""
    async with Upstream() as up, GatewayProcess(_config(up)) as gw:
        for port in (gw.admin_port, gw.port):
            for spelling in ("127.0.0.1", "localhost", "127.0.0.2"):
                url = f"http://{spelling}:{port}"
                put = await request(
                    gw.admin_port, "PUT", "/services/adm", json_body={"targets": [url]}
                )
                assert put.status == 400, (url, put.body)
                assert "own listener" in put.body.decode()
        doc = (await request(gw.admin_port, "GET", "/config")).json()["config"]
        doc["services"]["adm"] = {"targets": [f"http://127.0.0.1:{gw.admin_port}"]}
        assert (await request(gw.admin_port, "POST", "/config", json_body=doc)).status == 400
        elsewhere = await request(
            gw.admin_port, "PUT", "/services/adm", json_body={"targets": [up.url]}
        )
        assert elsewhere.status in (200, 201), elsewhere.body
