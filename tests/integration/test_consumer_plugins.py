"""Consumers' own plugins in a real gateway process with a real upstream: two consumers with
key_auth on one route whose rate limit is small, one of them with a large limit of its own;
the same on an aggregate route; a consumer's own access log and request_transform; and admin
changes to consumers (`PUT /consumers/{name}`) taking effect, refused when they name a plugin
that runs before the consumer is known. The plugins' lifecycle across changes is checked on a
gateway in the test's own loop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from apigate.config.loader import parse_config
from tests.support.gateway import GatewayProcess, base_config, running_gateway
from tests.support.http import Reply, request
from tests.support.upstream import Upstream
from tests.unit.test_consumer_plugins import CALLS, RECORDER

SMALL = {"requests": 2, "per": "1m", "burst": 1}  # 2 at once, then one every 30 s
LARGE = {"requests": 100, "per": "1m", "burst": 99}  # 100 at once
ALICE_KEY, BOB_KEY = "key-alice-0123456789", "key-bob-0123456789"


def _config(up: Upstream, logs: Path) -> dict[str, Any]:
    route_plugins = {"key_auth": {}, "rate_limit": SMALL}
    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={"up": {"targets": [up.url]}},
        consumers=[
            {
                "name": "alice",
                "api_keys": [ALICE_KEY],
                "plugins": {
                    "rate_limit": LARGE,
                    "access_log": {"path": str(logs / "alice.log")},
                    "request_transform": {
                        "headers": {"add": {"X-Partner": "acme", "X-Partner-Token": "s3cret"}}
                    },
                },
            },
            {"name": "bob", "api_keys": [BOB_KEY]},
        ],
        routes=[
            {"name": "r", "match": {"paths": ["/r"]}, "service": "up", "plugins": route_plugins},
            {
                "name": "agg",
                "match": {"paths": ["/agg"]},
                "aggregate": {"one": {"service": "up", "path": "/echo"}},
                "plugins": route_plugins,
            },
        ],
        plugins={"access_log": {"path": str(logs / "all.log")}},
    )


async def _burst(port: int, path: str, key: str, n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        reply = await request(port, "GET", path, headers={"apikey": key})
        statuses.append(reply.status)
    return statuses


async def _admin(gw: GatewayProcess, method: str, path: str, body: Any = None) -> Reply:
    return await request(gw.admin_port, method, path, json_body=body)


def _log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


async def test_one_consumers_own_limit_and_plugins_and_admin_changes(tmp_path: Path) -> None:
    async with Upstream() as up, GatewayProcess(_config(up, tmp_path)) as gw:
        # the route's small limit holds bob to its burst; alice's own lets hers through
        assert await _burst(gw.port, "/r", BOB_KEY, 6) == [200, 200, 429, 429, 429, 429]
        assert await _burst(gw.port, "/r", ALICE_KEY, 20) == [200] * 20
        partners = [rec.header("x-partner") for rec in up.received]
        assert partners == [None, None] + ["acme"] * 20  # alice's request_transform only
        # an aggregate route: its own counters for bob, alice's limit across every route
        assert await _burst(gw.port, "/agg", BOB_KEY, 3) == [200, 200, 429]
        assert await _burst(gw.port, "/agg", ALICE_KEY, 10) == [200] * 10
        # (an aggregate's answer carries no plugin's response headers: asked on /r)
        reply = await request(gw.port, "GET", "/r", headers={"apikey": ALICE_KEY})
        assert reply.headers["ratelimit-limit"] == "100"  # alice's limiter answered
        # 31 of hers on both routes: 69 left, and one more each 0.6 s since the first
        assert int(reply.headers["ratelimit-remaining"]) <= 75
        assert (await request(gw.port, "GET", "/r")).status == 401  # no consumer: the route's

        # alice's requests went to her own access log, in place of the global one
        await asyncio.sleep(1.3)  # (lines are written once a second)
        alice_lines = _log_lines(tmp_path / "alice.log")
        all_lines = _log_lines(tmp_path / "all.log")
        assert len(alice_lines) == 31 and {line["consumer"] for line in alice_lines} == {"alice"}
        assert {line.get("consumer") for line in all_lines} == {"bob", None}
        assert len(all_lines) == 6 + 3 + 1

        # the admin API shows the consumer's plugins, credentials still redacted
        listed = (await _admin(gw, "GET", "/consumers")).json()["consumers"]
        alice = next(c for c in listed if c["name"] == "alice")
        assert alice["api_keys"] == "[redacted]"
        added = alice["plugins"]["request_transform"]["headers"]["add"]
        assert added == {"X-Partner": "acme", "X-Partner-Token": "[redacted]"}
        assert alice["plugins"]["rate_limit"]["requests"] == 100

        # bob gets a large limit of his own through the admin API: in force at once
        bob = {"api_keys": [BOB_KEY], "plugins": {"rate_limit": LARGE}}
        put = await _admin(gw, "PUT", "/consumers/bob", bob)
        assert put.status == 200, put.body
        assert put.json()["plugins"]["rate_limit"]["requests"] == 100
        assert await _burst(gw.port, "/r", BOB_KEY, 10) == [200] * 10

        # one that runs before the consumer is known is refused, naming both; nothing changed
        refused = await _admin(
            gw, "PUT", "/consumers/bob", {**bob, "plugins": {"cors": {"origins": ["*"]}}}
        )
        assert refused.status == 400
        assert (
            "consumers[1] (bob).plugins.cors: consumer 'bob' cannot have 'cors'"
            in (refused.json()["message"])
        )
        assert await _burst(gw.port, "/r", BOB_KEY, 1) == [200]

        # alice without plugins: the route's limit applies to her again (counted apart
        # from her own, so she starts with its whole burst)
        put = await _admin(gw, "PUT", "/consumers/alice", {"api_keys": [ALICE_KEY]})
        assert put.status == 200, put.body
        assert await _burst(gw.port, "/r", ALICE_KEY, 4) == [200, 200, 429, 429]


async def test_a_consumers_plugins_start_and_close_with_their_snapshot(tmp_path: Path) -> None:
    def doc(label: str) -> dict[str, Any]:
        return base_config(
            limits={"drain_timeout": "50ms"},
            services={"up": {"targets": ["http://127.0.0.1:9"]}},
            consumers=[
                {"name": "alice", "api_keys": ["k"], "plugins": {RECORDER: {"label": label}}}
            ],
            routes=[
                {
                    "name": "r",
                    "match": {"paths": ["/"]},
                    "service": "up",
                    "plugins": {"key_auth": {}},
                }
            ],
        )

    CALLS.clear()
    async with running_gateway(doc("one"), tmp_path) as gw:
        assert CALLS == [("one", "start")]
        await gw.apply_config(parse_config(doc("two")))
        assert CALLS == [("one", "start"), ("two", "start")]  # (one still drains)
        await asyncio.sleep(0.3)
        assert CALLS == [("one", "start"), ("two", "start"), ("one", "close")]
        await gw.apply_config(parse_config(base_config(services={}, routes=[])))
    assert CALLS[3:] == [("two", "close")]
