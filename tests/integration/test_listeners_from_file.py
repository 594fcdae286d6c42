"""Where and how the gateway listens is its file's to say, also once `POST /config` replaced
the rest: a restart listens where the file says, a reload that moves a listener is refused
with the reason, and a POSTed config may leave `listeners` out or send back what `GET
/config` showed (its token redacted), but not change them."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import request
from tests.support.redis_server import free_port
from tests.support.upstream import Upstream

TOKEN = "admin-token-for-the-listeners-test"


def _config(upstream_url: str, port: int, **extra: Any) -> dict[str, Any]:
    return base_config(
        listeners={
            "proxy": {"address": f"127.0.0.1:{port}"},
            "admin": {"address": "127.0.0.1:0", "token": TOKEN},
        },
        services={"s": {"targets": [upstream_url]}},
        routes=[{"name": "file", "match": {"paths": ["/file"]}, "service": "s"}],
        **extra,
    )


def _auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


async def _post_with_route(gw: GatewayProcess, name: str, **changes: Any) -> int:
    """GET /config, add a route `name`, POST it back as it was shown (token redacted)."""
    doc = (await request(gw.admin_port, "GET", "/config", headers=_auth())).json()["config"]
    doc["routes"].append({"name": name, "match": {"paths": [f"/{name}"]}, "service": "s"})
    doc.update(changes)
    posted = await request(gw.admin_port, "POST", "/config", json_body=doc, headers=_auth())
    return posted.status


async def test_a_restart_listens_where_the_file_says_after_a_post(tmp_path: Path) -> None:
    store = {"store": f"sqlite:///{tmp_path}/state.db"}
    async with Upstream() as up:
        first, second = free_port(), free_port()
        async with GatewayProcess(_config(up.url, first, **store)) as gw:
            assert gw.port == first
            assert await _post_with_route(gw, "posted") == 200
        # the POSTed config is the base now; the file moves the proxy listener
        async with GatewayProcess(_config(up.url, second, **store)) as gw:
            assert gw.port == second  # it kept listening on the POSTed config's port
            assert (await request(gw.port, "GET", "/posted")).status == 200
            assert (await request(gw.port, "GET", "/file")).status == 200


async def test_a_reload_moving_a_listener_is_refused_also_after_a_post() -> None:
    async with Upstream() as up:
        port = free_port()
        cfg = _config(up.url, port)
        async with GatewayProcess(cfg) as gw:
            assert await _post_with_route(gw, "posted") == 200
            gw.write_config(_config(up.url, free_port()))
            gw.signal(signal.SIGHUP)
            line = await gw.wait_for_log("reload rejected")
            assert "listeners.proxy.address" in gw.logs(), line
            assert (await request(gw.port, "GET", "/posted")).status == 200  # still in force

            # the refused reload left the listeners in force: a POST with them still goes
            assert await _post_with_route(gw, "posted-again") == 200
            gw.write_config(cfg)  # the file as it was: its routes are not the base any more
            gw.signal(signal.SIGHUP)
            line = await gw.wait_for_log("config reloaded")
            assert "the config POSTed through the admin API" in line


async def test_a_posted_config_does_not_change_the_listeners() -> None:
    async with Upstream() as up, GatewayProcess(_config(up.url, free_port())) as gw:
        doc = (await request(gw.admin_port, "GET", "/config", headers=_auth())).json()
        listeners = doc["config"]["listeners"]
        assert listeners["admin"]["token"] == "[redacted]"

        trusting = {**listeners, "proxy": {**listeners["proxy"], "trusted_proxies": ["::1"]}}
        status = await _post_with_route(gw, "trusting", listeners=trusting)
        assert status == 400
        refused = await request(
            gw.admin_port,
            "POST",
            "/config",
            json_body={**doc["config"], "listeners": trusting},
            headers=_auth(),
        )
        assert "listeners: " in refused.json()["message"]

        without = {k: v for k, v in doc["config"].items() if k != "listeners"}
        reply = await request(gw.admin_port, "POST", "/config", json_body=without, headers=_auth())
        assert reply.status == 200, reply.body
        assert await _post_with_route(gw, "posted") == 200  # as GET showed it
        assert (await request(gw.port, "GET", "/posted")).status == 200
