"""Gateway nodes sharing one real Redis (`store: redis://`): registrations and admin changes made
on one node reach the others, a node started later begins with them, and a Redis outage (even
one that loses every key) neither stops proxying nor loses what the nodes know."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from collections.abc import AsyncIterator
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from apigate.store.cluster_scripts import (
    DEREGISTER,
    EXPIRY,
    GONE,
    INSTANCES,
    OVERLAY,
    REGISTER,
    RESYNC_INTERVAL,
    channel,
    field,
)
from apigate.store.redis import RedisStore
from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import Reply, request
from tests.support.redis_server import RedisServer
from tests.support.relay import Relay
from tests.support.traffic import until
from tests.support.upstream import Upstream


def _config(redis: RedisServer) -> dict[str, Any]:
    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        store=redis.url,
        services={"hello": {}},
        routes=[{"name": "hello", "match": {"paths": ["/"]}, "service": "hello"}],
    )


@contextlib.asynccontextmanager
async def _nodes(redis: RedisServer, count: int) -> AsyncIterator[list[GatewayProcess]]:
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(GatewayProcess(_config(redis))) for _ in range(count)
        ]
        for node in nodes:
            await until(lambda n=node: _cluster(n), lambda c: c["connected"], what="connected")
        yield nodes


async def _cluster(node: GatewayProcess) -> dict[str, Any]:
    doc: dict[str, Any] = (await request(node.admin_port, "GET", "/config")).json()["cluster"]
    return doc


async def _register(node: GatewayProcess, iid: str, url: str, ttl: str = "10s") -> Reply:
    body = {"url": url, "ttl": ttl, "metadata": {"zone": "z1"}}
    return await request(node.admin_port, "PUT", f"/services/hello/instances/{iid}", json_body=body)


async def _instances(node: GatewayProcess, service: str = "hello") -> dict[str, dict[str, Any]]:
    reply = await request(node.admin_port, "GET", f"/services/{service}")
    if reply.status != 200:
        return {}
    return {i["id"]: i for i in reply.json()["instances"]}


async def _samples(node: GatewayProcess, prefix: str = "apigate_cluster_") -> dict[str, float]:
    """The node's metric samples whose family starts with `prefix`, by name and labels."""
    text = (await request(node.admin_port, "GET", "/metrics")).body.decode()
    return {
        sample.name + "".join(f",{k}={v}" for k, v in sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith(prefix)
        for sample in family.samples
    }


async def _answered_by(node: GatewayProcess, path: str = "/") -> str | None:
    reply = await request(node.port, "GET", path)
    return str(reply.json()["upstream"]) if reply.status == 200 else None


async def test_a_registration_serves_on_every_node_heartbeats_renew_and_delete_removes() -> None:
    async with RedisServer() as redis, Upstream("a") as a, _nodes(redis, 2) as (one, two):
        assert (await _register(one, "a", a.url, ttl="2s")).status == 201
        loop = asyncio.get_running_loop()
        registered = loop.time()
        await until(lambda: _answered_by(two), lambda up: up == "a", what="served by node two")
        assert loop.time() - registered < RESYNC_INTERVAL / 2  # announced, not found by a resync
        seen = (await _instances(two))["a"]
        assert seen["origin"] == "registered" and seen["metadata"] == {"zone": "z1"}

        for _ in range(10):  # heartbeats to node one keep it alive on node two past its 2 s TTL
            await asyncio.sleep(0.3)
            assert (await _register(one, "a", a.url, ttl="2s")).status == 200
        assert "a" in await _instances(two)

        deleted = await request(two.admin_port, "DELETE", "/services/hello/instances/a")
        assert deleted.status == 200
        await until(lambda: _instances(one), lambda found: "a" not in found, within=2.0)
        assert (await request(one.port, "GET", "/")).status == 503
        events = (await request(one.admin_port, "GET", "/events")).json()["events"]
        assert any("deregistered (through node" in e["message"] for e in events)


async def test_a_delete_reaches_a_registration_this_node_has_not_heard_of_yet() -> None:
    """Announcements take a few ms: a DELETE made on another node in that window answered 404
    and the instance stayed registered (served everywhere until its TTL ran out). Here node two
    never hears the registration (written straight into Redis, announced on no channel), so
    only Redis can tell it the instance exists."""
    async with RedisServer() as redis, Upstream("a") as a, _nodes(redis, 2) as (one, two):
        client = RedisStore(redis.url, timeout=1.0)
        try:
            doc = json.dumps({"url": a.url, "weight": 1, "metadata": {}})
            args = [field("hello", "unheard"), doc, "30", "nowhere", "{}", "fresh"]
            await client.run_script(REGISTER, [INSTANCES, EXPIRY, GONE], args)
            assert "unheard" not in await _instances(two)
            deleted = await request(two.admin_port, "DELETE", "/services/hello/instances/unheard")
            assert deleted.status == 200, deleted.body
            assert await client.call("HEXISTS", INSTANCES, field("hello", "unheard")) == 0
            # and no later resync brings it back on either node
            await asyncio.sleep(RESYNC_INTERVAL + 0.5)
            for node in (one, two):
                assert "unheard" not in await _instances(node)
            missing = await request(two.admin_port, "DELETE", "/services/hello/instances/never")
            assert missing.status == 404
        finally:
            await client.close()


async def test_a_registration_written_late_replaces_an_older_one_but_not_a_deregistration() -> None:
    """A heartbeat a node took while cut off from Redis (an instance that moved, say) is
    written once Redis is back. It was written as a restore, which never replaces a different
    entry: the newer address was dropped on every node, and the instance expired everywhere
    on its older heartbeat. A late write replaces an entry that expires sooner; a restore (a
    registration written back into a Redis that lost it) still does not."""
    async with RedisServer() as redis:
        client = RedisStore(redis.url, timeout=1.0)
        key = field("hello", "z2")

        async def register(url: str, ttl: float, mode: str) -> int:
            doc = json.dumps({"url": url, "weight": 1, "metadata": {}})
            args = [key, doc, repr(ttl), "nowhere", "{}", mode]
            return int(await client.run_script(REGISTER, [INSTANCES, EXPIRY, GONE], args))

        async def kept() -> str:
            return str(json.loads(await client.call("HGET", INSTANCES, key))["url"])

        try:
            assert await register("http://old:1", 2.0, "fresh") == 1
            assert await register("http://moved:1", 6.0, "restore") == 0
            assert await kept() == "http://old:1"
            assert await register("http://moved:1", 6.0, "late") == 1
            assert await kept() == "http://moved:1"
            assert await register("http://older:1", 1.0, "late") == 0  # expires sooner
            assert await kept() == "http://moved:1"
            await client.run_script(
                DEREGISTER, [INSTANCES, EXPIRY, GONE], [key, "nowhere", "{}", "30", "known"]
            )
            assert await register("http://moved:1", 6.0, "late") == 0  # the tombstone wins
            assert await client.call("HEXISTS", INSTANCES, key) == 0
        finally:
            await client.close()


async def test_a_heartbeat_taken_by_a_node_cut_off_from_redis_reaches_every_node_after() -> None:
    """The end to end of the test above: an instance registered through node one moves
    (heartbeats with a new address) through node two while two cannot reach Redis. Once two
    is back, every node has the new address, and keeps the instance for the new heartbeat's
    TTL (it expired everywhere on the old one, its new address dropped)."""
    async with RedisServer() as redis, Upstream("a") as a, Upstream("b") as b:
        relay = Relay(redis.port)
        await relay.start()
        config = _config(redis)
        config["store"] = relay.url
        async with (
            GatewayProcess(_config(redis)) as one,
            GatewayProcess(config) as two,
        ):
            for node in (one, two):
                await until(lambda n=node: _cluster(n), lambda c: c["connected"], what="up")
            assert (await _register(one, "z2", a.url, ttl="3s")).status == 201
            await until(lambda: _instances(two), lambda found: "z2" in found, within=2.0)
            await relay.cut()
            await until(lambda: _cluster(two), lambda c: not c["connected"], what="cut off")
            assert (await _register(two, "z2", b.url, ttl="5s")).status == 200
            loop = asyncio.get_running_loop()
            moved = loop.time()
            await relay.start()
            for node in (one, two):
                await until(
                    lambda n=node: _instances(n),
                    lambda found: found.get("z2", {}).get("url") == b.url,
                    within=4.0,
                    what="the new address",
                )
            await asyncio.sleep(max(0.0, moved + 3.5 - loop.time()))  # past the old TTL
            for node in (one, two):
                assert await _answered_by(node) == "b"
        await relay.cut()


async def test_a_delete_of_an_instance_nobody_registered_leaves_no_trace() -> None:
    """A DELETE of an id neither this node nor Redis knows answers 404, and must not write a
    tombstone or announce a deregistration: a node that holds the instance outside Redis
    (kept after Redis lost its state) would drop it behind that 404."""
    async with RedisServer() as redis, _nodes(redis, 2) as (one, two):
        client = RedisStore(redis.url, timeout=1.0)
        pubsub = client.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(channel(client.db))
            missing = await request(two.admin_port, "DELETE", "/services/hello/instances/ghost")
            assert missing.status == 404, missing.body
            assert await client.call("ZSCORE", GONE, field("hello", "ghost")) is None
            assert await client.call("HEXISTS", INSTANCES, field("hello", "ghost")) == 0
            heard = []
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 0.5
            while loop.time() < deadline:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
                if message is not None and message.get("type") == "message":
                    heard.append(json.loads(message["data"]))
            assert not [e for e in heard if e.get("id") == "ghost"], heard
            events = (await request(one.admin_port, "GET", "/events")).json()["events"]
            assert not [e for e in events if e.get("instance") == "ghost"], events
        finally:
            await pubsub.aclose()
            await client.close()


async def test_a_lapsed_ttl_removes_the_instance_everywhere_and_from_redis() -> None:
    async with RedisServer() as redis, Upstream("a") as a, _nodes(redis, 2) as (one, two):
        assert (await _register(one, "a", a.url, ttl="1500ms")).status == 201
        await until(lambda: _instances(two), lambda found: "a" in found, within=2.0)
        for node in (one, two):
            await until(lambda n=node: _instances(n), lambda found: not found, within=3.0)
        client = RedisStore(redis.url, timeout=1.0)
        try:  # the next resync (every 5 s) removes the lapsed entry from Redis itself
            await until(lambda: client.call("HLEN", INSTANCES), lambda n: n == 0, within=7.0)
        finally:
            await client.close()


async def test_admin_changes_reach_every_node_and_a_node_started_later_has_them() -> None:
    async with RedisServer() as redis, Upstream("a") as a, _nodes(redis, 2) as (one, two):
        route = {"match": {"paths": ["/extra"]}, "service": "extra", "strip_prefix": True}
        service = {"targets": [a.url]}
        assert (
            await request(one.admin_port, "PUT", "/services/extra", json_body=service)
        ).status == 201
        assert (
            await request(one.admin_port, "PUT", "/routes/extra", json_body=route)
        ).status == 201
        await until(lambda: _answered_by(two, "/extra/x"), lambda up: up == "a", within=2.0)
        # another node's change is a reload of node two's config, and counted as one
        reloads = await _samples(two, "apigate_config_reloads")
        assert reloads["apigate_config_reloads_total,result=ok"] >= 1
        assert reloads["apigate_config_reloads_total,result=failed"] == 0
        # an implicit service: created by a registration on node two, routed on node one
        assert (
            await request(
                two.admin_port,
                "PUT",
                "/services/fresh/instances/f1",
                json_body={"url": a.url, "ttl": "30s"},
            )
        ).status == 201
        fresh = {"match": {"paths": ["/fresh"]}, "service": "fresh"}
        assert (
            await request(two.admin_port, "PUT", "/routes/fresh", json_body=fresh)
        ).status == 201
        await until(lambda: _answered_by(one, "/fresh"), lambda up: up == "a", within=2.0)

        async with GatewayProcess(_config(redis)) as three:
            await until(lambda: _answered_by(three, "/extra/x"), lambda up: up == "a", within=2.0)
            assert "f1" in await _instances(three, "fresh")
            config = (await request(three.admin_port, "GET", "/config")).json()
            assert config["store"]["kind"] == "redis" and config["store"]["shared"] is True
            gone = await request(three.admin_port, "DELETE", "/routes/extra")
            assert gone.status == 200
            await until(
                lambda: request(one.admin_port, "GET", "/routes/extra"),
                lambda reply: reply.status == 404,
                within=2.0,
                what="route removed on node one",
            )


async def test_a_redis_outage_keeps_serving_and_a_redis_that_lost_everything_is_refilled() -> None:
    async with (
        RedisServer() as redis,
        Upstream("a") as a,
        Upstream("b") as b,
        _nodes(redis, 2) as (one, two),
    ):
        route = {"match": {"paths": ["/kept"]}, "service": "hello"}
        assert (await request(one.admin_port, "PUT", "/routes/kept", json_body=route)).status == 201
        assert (await _register(one, "a", a.url, ttl="60s")).status == 201
        await until(lambda: _answered_by(two, "/kept"), lambda up: up == "a", within=2.0)

        await redis.kill()
        await until(lambda: _cluster(two), lambda c: not c["connected"], what="disconnected")
        assert (await _samples(two))["apigate_cluster_connected"] == 0
        # registrations still work where they are made; config changes are refused, undone
        assert (await _register(two, "b", b.url, ttl="60s")).status == 201
        assert set(await _instances(two)) == {"a", "b"}
        refused = await request(one.admin_port, "PUT", "/routes/new", json_body=route)
        assert refused.status == 503 and refused.json()["error"] == "store_unavailable"
        assert refused.headers["retry-after"] == "1"
        assert (await request(one.port, "GET", "/new")).status == 200  # served by "/"
        assert "new" not in [
            r["name"] for r in (await request(one.admin_port, "GET", "/routes")).json()["routes"]
        ]
        assert await _answered_by(one, "/kept") == "a"  # nothing dropped meanwhile

        await redis.start()  # on the same port, empty: nothing was saved
        await until(lambda: _instances(one), lambda found: set(found) == {"a", "b"}, within=6.0)
        client = RedisStore(redis.url, timeout=1.0)
        try:
            assert await client.call("HLEN", INSTANCES) == 2
        finally:
            await client.close()
        assert set(await _instances(two)) == {"a", "b"}
        expected = {"apigate_cluster_connected": 1, "apigate_cluster_unshared_changes": 0}
        await until(lambda: _samples(two), lambda gauges: gauges == expected)
        for node in (one, two):
            assert await _answered_by(node, "/kept") in ("a", "b")
        # and the cluster works as before: a change on one node reaches the other
        route2 = {"match": {"paths": ["/after"]}, "service": "hello"}
        assert (
            await request(two.admin_port, "PUT", "/routes/after", json_body=route2)
        ).status == 201
        await until(
            lambda: request(one.admin_port, "GET", "/routes/after"),
            lambda reply: reply.status == 200,
            within=2.0,
        )


async def _route_names(node: GatewayProcess) -> set[str]:
    routes = (await request(node.admin_port, "GET", "/routes")).json()["routes"]
    return {r["name"] for r in routes}


async def test_simultaneous_admin_changes_on_two_nodes_all_take_and_every_node_agrees() -> None:
    """A change is written only over the version it was computed on; the node that loses the
    race takes the other change and redoes its own (the loser once missed the winner's change
    for good)."""
    async with RedisServer() as redis, _nodes(redis, 2) as (one, two):
        for i in range(5):
            replies = await asyncio.gather(
                *(
                    request(node.admin_port, "PUT", f"/routes/{name}{i}", json_body=route)
                    for node, name in ((one, "one"), (two, "two"))
                    for route in [{"match": {"paths": [f"/{name}{i}"]}, "service": "hello"}]
                )
            )
            assert [r.status for r in replies] == [201, 201]
        expected = {"hello"} | {f"{n}{i}" for n in ("one", "two") for i in range(5)}
        for node in (one, two):
            await until(lambda n=node: _route_names(n), lambda names: names == expected)


async def test_changes_that_contradict_each_other_cannot_both_take() -> None:
    """Deleting a service on one node while a route that needs it is added on another: one of
    them is refused, every node agrees, and a node started afterwards starts (an invalid
    shared config once stopped it)."""
    async with RedisServer() as redis, _nodes(redis, 2) as (one, two):
        assert (await request(one.admin_port, "PUT", "/services/s", json_body={})).status == 201
        await until(
            lambda: request(two.admin_port, "GET", "/services/s"), lambda r: r.status == 200
        )
        route = {"match": {"paths": ["/r"]}, "service": "s"}
        deleted, added = await asyncio.gather(
            request(one.admin_port, "DELETE", "/services/s"),
            request(two.admin_port, "PUT", "/routes/r", json_body=route),
        )
        assert (deleted.status, added.status) in ((200, 400), (409, 201))
        async with GatewayProcess(_config(redis)) as three:
            for node in (one, two, three):
                await until(
                    lambda n=node: _route_names(n),
                    lambda names: ("r" in names) == (added.status == 201),
                )


async def test_an_admin_change_right_after_redis_restarted_empty_is_taken() -> None:
    """Before any node's resync has restored an emptied Redis, and over pooled connections the
    restart closed: the change restores the shared state itself and is taken (it was 503
    until the resync, and once more for the stale connection)."""
    async with RedisServer() as redis, _nodes(redis, 2) as (one, two):
        route = {"match": {"paths": ["/kept"]}, "service": "hello"}
        assert (await request(one.admin_port, "PUT", "/routes/kept", json_body=route)).status == 201
        await until(lambda: _route_names(two), lambda names: "kept" in names)
        for node in (one, two):
            node.signal(signal.SIGSTOP)  # no resync, no announcement: only the change below
        try:
            await redis.kill()
            await redis.start()  # empty
        finally:
            for node in (one, two):
                node.signal(signal.SIGCONT)
        added = await request(two.admin_port, "PUT", "/routes/added", json_body=route)
        assert added.status == 201, added.json()
        for node in (one, two):
            await until(lambda n=node: _route_names(n), lambda names: {"kept", "added"} <= names)
        client = RedisStore(redis.url, timeout=1.0)
        try:
            assert await client.call("HLEN", OVERLAY) == 2
        finally:
            await client.close()


async def test_a_node_that_knew_less_does_not_wipe_what_an_emptied_redis_forgot() -> None:
    async with RedisServer() as redis, _nodes(redis, 1) as (one,):
        route = {"match": {"paths": ["/kept"]}, "service": "hello"}
        assert (await request(one.admin_port, "PUT", "/routes/kept", json_body=route)).status == 201
        await redis.kill()
        async with GatewayProcess(_config(redis)) as late:  # knows only the file
            one.signal(signal.SIGSTOP)  # node one comes back last
            try:
                await redis.start()  # empty
                await until(lambda: _cluster(late), lambda c: c["connected"], what="late back")
            finally:
                one.signal(signal.SIGCONT)
            for node in (one, late):
                await until(lambda n=node: _route_names(n), lambda names: "kept" in names)


async def test_a_deregistration_made_while_redis_was_down_stands_when_it_comes_back() -> None:
    """Node one takes a heartbeat of x and node two deregisters x while Redis is down; two
    comes back first. Node one, which took x's registration and that heartbeat, must not
    write x back (a tombstone says it is gone)."""
    async with RedisServer() as redis, Upstream("a") as a, _nodes(redis, 2) as (one, two):
        assert (await _register(one, "x", a.url, ttl="60s")).status == 201
        await until(lambda: _instances(two), lambda found: "x" in found)
        await redis.kill()
        await until(lambda: _cluster(two), lambda c: not c["connected"], what="two cut off")
        assert (await _register(one, "x", a.url, ttl="60s")).status == 200
        gone = await request(two.admin_port, "DELETE", "/services/hello/instances/x")
        assert gone.status == 200
        one.signal(signal.SIGSTOP)
        try:
            await redis.start()  # empty
            await until(lambda: _cluster(two), lambda c: c["connected"], what="two back")
        finally:
            one.signal(signal.SIGCONT)
        await until(lambda: _cluster(one), lambda c: c["connected"], what="one back")
        for node in (one, two):
            await until(lambda n=node: _instances(n), lambda found: "x" not in found)
        await asyncio.sleep(1.0)  # and it stays gone
        assert "x" not in await _instances(one) and "x" not in await _instances(two)


async def test_a_redis_restored_from_an_old_save_gets_the_changes_it_lost() -> None:
    """Redis comes back with a snapshot taken before the last admin change (same epoch, older
    version): the nodes write the newer config back instead of rolling back to it."""
    async with RedisServer() as redis, _nodes(redis, 2) as (one, two):
        first = {"match": {"paths": ["/first"]}, "service": "hello"}
        assert (
            await request(one.admin_port, "PUT", "/routes/first", json_body=first)
        ).status == 201
        client = RedisStore(redis.url, timeout=2.0)
        try:
            await client.call("SAVE")  # dump.rdb in the server's directory, loaded at start
        finally:
            await client.close()
        second = {"match": {"paths": ["/second"]}, "service": "hello"}
        assert (
            await request(two.admin_port, "PUT", "/routes/second", json_body=second)
        ).status == 201
        await until(lambda: _route_names(one), lambda names: "second" in names)
        await redis.kill()
        for node in (one, two):
            await until(lambda n=node: _cluster(n), lambda c: not c["connected"], what="cut")
        await redis.start()  # with the save: "first" only, at the older version
        for node in (one, two):  # (connected again: it has taken in the state it found)
            await until(lambda n=node: _cluster(n), lambda c: c["connected"], what="back")
        for node in (one, two):
            await until(lambda n=node: _route_names(n), lambda names: "second" in names)
        late = {"match": {"paths": ["/late"]}, "service": "hello"}
        assert (await request(one.admin_port, "PUT", "/routes/late", json_body=late)).status == 201
        await until(lambda: _route_names(two), lambda names: {"first", "second", "late"} <= names)
