"""Passive ejection through a real gateway: `max_ejection_percent` keeps a lone instance that
answers 500 in rotation (the client gets the upstream's answer, not 503 no_healthy_instance);
at 100% the instance is ejected as before. The refusal shows once in `GET /events`."""

from __future__ import annotations

from typing import Any

from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import Reply, request
from tests.support.upstream import Upstream


def _config(target: str, **passive: Any) -> dict[str, Any]:
    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={
            "lone": {
                "targets": [target],
                "health": {"passive": {"failures": 5, "eject_for": "30s", **passive}},
            }
        },
        routes=[{"name": "lone", "match": {"paths": ["/"]}, "service": "lone"}],
    )


async def _six_500s_then_one_more(gw: GatewayProcess, up: Upstream) -> tuple[list[int], Reply]:
    """Six requests the upstream answers 500 (one past `failures`), then one it would answer
    200: the statuses the client saw, and the seventh reply."""
    up.state.override = "/status/500"
    statuses = [(await request(gw.port, "GET", "/app")).status for _ in range(6)]
    up.state.override = None
    return statuses, await request(gw.port, "GET", "/echo")


async def _cap_events(gw: GatewayProcess) -> list[dict[str, Any]]:
    events = (await request(gw.admin_port, "GET", "/events?limit=500")).json()["events"]
    return [e for e in events if e.get("reason") == "max_ejection_percent"]


async def test_a_lone_instance_answering_500_keeps_serving_at_the_default_cap() -> None:
    async with Upstream("lone") as up, GatewayProcess(_config(up.url)) as gw:
        statuses, seventh = await _six_500s_then_one_more(gw, up)
        assert statuses == [500] * 6
        assert seventh.status == 200, seventh.body
        assert seventh.json()["upstream"] == "lone" and seventh.json()["path"] == "/echo"
        assert len(up.received) == 7
        [event] = await _cap_events(gw)  # told once, not once per failure past the fifth
        assert event["instance"] == f"127.0.0.1:{up.port}" and event["healthy"] is True


async def test_at_100_percent_the_lone_instance_is_ejected() -> None:
    async with (
        Upstream("lone") as up,
        GatewayProcess(_config(up.url, max_ejection_percent="100%")) as gw,
    ):
        statuses, seventh = await _six_500s_then_one_more(gw, up)
        # the fifth failure ejects it: the sixth and seventh never reach the upstream
        assert statuses == [500] * 5 + [503]
        assert seventh.status == 503 and seventh.json()["error"] == "no_healthy_instance"
        assert len(up.received) == 5
        assert await _cap_events(gw) == []
