"""Config changes in `GET /events` (README: "registrations, health transitions, breaker and
config events"): a reload of the file, taken or rejected, and a change through the admin API.
The review found none of them there: reloads went only to the log."""

from __future__ import annotations

import signal
from typing import Any

from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import request
from tests.support.upstream import Upstream


def _config(up: Upstream, path: str) -> dict[str, Any]:
    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={"up": {"targets": [up.url]}},
        routes=[{"name": "r", "match": {"paths": [path]}, "service": "up"}],
    )


async def _config_events(gw: GatewayProcess, since: int) -> list[dict[str, Any]]:
    reply = await request(gw.admin_port, "GET", f"/events?since={since}")
    assert reply.status == 200, reply.body
    return [e for e in reply.json()["events"] if e["kind"] == "config"]


async def test_reloads_and_admin_changes_are_events() -> None:
    async with Upstream() as up, GatewayProcess(_config(up, "/old")) as gw:
        reply = await request(gw.admin_port, "GET", "/events")
        seen = max((e["seq"] for e in reply.json()["events"]), default=0)

        gw.write_config(_config(up, "/new"))
        gw.signal(signal.SIGHUP)
        await gw.wait_for_log("config reloaded")
        broken = _config(up, "/newer")
        broken["routes"][0]["service"] = "nowhere"
        gw.write_config(broken)
        gw.signal(signal.SIGHUP)
        await gw.wait_for_log("reload rejected")
        put = await request(
            gw.admin_port,
            "PUT",
            "/routes/extra",
            json_body={"match": {"paths": ["/x"]}, "service": "up"},
        )
        assert put.status == 201, put.body
        assert (await request(gw.admin_port, "DELETE", "/routes/extra")).status == 200

        taken, rejected, created, deleted = await _config_events(gw, seen)
        assert taken["ok"] is True and taken["message"] == "config reloaded (from the file)"
        assert taken["generation"] >= 1
        assert rejected["ok"] is False
        assert "unknown service 'nowhere'" in rejected["message"]
        assert created["message"] == "route extra created through the admin API"
        assert deleted["message"] == "route extra deleted through the admin API"
        assert deleted["generation"] > created["generation"] > taken["generation"]
