"""Cluster review fixes against a real Redis: clusters on two databases of one server stay
apart, every node merges admin-created routes in the same order, acknowledged changes survive
a node that comes back knowing more of a history Redis lost, a new node accepts traffic only
once it has the registrations, a Redis password in the URL's query never shows, and a
registry write cut short holds back no announcement."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from apigate.registry.registry import Registration
from apigate.store.cluster import ClusterSync
from apigate.store.cluster_scripts import INSTANCES, OVERLAY, field
from apigate.store.redis import RedisStore
from apigate.store.redis_config_store import RedisConfigStore
from tests.integration.test_cluster import (
    _cluster,
    _config,
    _instances,
    _nodes,
    _register,
    _route_names,
)
from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import request
from tests.support.redis_server import RedisServer
from tests.support.relay import Relay
from tests.support.traffic import until
from tests.support.upstream import Upstream


def _node_config(store: str, **extra: Any) -> dict[str, Any]:
    return base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        store=store,
        services={"hello": {}},
        routes=[{"name": "hello", "match": {"paths": ["/"]}, "service": "hello"}],
        **extra,
    )


async def _connected(node: GatewayProcess) -> None:
    await until(lambda: _cluster(node), lambda c: c["connected"], what="connected")


# ------------------------------------------------------------------ 1: databases stay apart
async def test_clusters_on_two_databases_of_one_redis_hear_nothing_of_each_other() -> None:
    """Pub/sub is server-wide: on one channel, a registration on db 0 appeared on db 1's
    nodes and db 1's deregistration of the same id removed db 0's instance."""
    async with RedisServer() as redis, Upstream("prod") as prod, Upstream("staging") as staging:
        db1 = redis.url.rsplit("/", 1)[0] + "/1"
        async with (
            GatewayProcess(_node_config(redis.url)) as zero,
            GatewayProcess(_node_config(db1)) as one,
        ):
            for node in (zero, one):
                await _connected(node)
            assert (await _register(zero, "i1", prod.url, ttl="60s")).status == 201
            await asyncio.sleep(0.5)  # an announcement takes milliseconds
            assert await _instances(one) == {}
            assert (await _register(one, "i1", staging.url, ttl="60s")).status == 201
            assert (await request(one.admin_port, "DELETE", "/services/hello/instances/i1")).status
            await asyncio.sleep(0.5)
            assert (await _instances(zero))["i1"]["url"] == prod.url
            client = RedisStore(redis.url, timeout=1.0)
            try:
                channels = {c.decode() for c in await client.call("PUBSUB", "CHANNELS")}
            finally:
                await client.close()
            assert channels == {"apigate:cluster:events:0", "apigate:cluster:events:1"}


# ------------------------------------------------------------------ 2: one route order
def _tied(number: int) -> dict[str, Any]:
    """Routes equal but for their name (the order decides), with documents longer than a
    listpack keeps (64 bytes), so that Redis keeps the overlay as a hash table."""
    add = {"x-route-name": f"route-number-{number}-" + "x" * 40}
    return {
        "match": {"paths": ["/same"]},
        "service": "hello",
        "plugins": {"request_transform": {"headers": {"add": add}}},
    }


async def test_every_node_merges_admin_created_routes_in_their_creation_order() -> None:
    """HGETALL answered a hash table's order; and a route deleted and created again kept its
    old place in Redis while it went last on the node that made the change: other nodes
    broke ties between equally specific routes differently (and served other ETags)."""
    async with RedisServer() as redis, contextlib.AsyncExitStack() as stack:
        one = await stack.enter_async_context(GatewayProcess(_config(redis)))
        two = await stack.enter_async_context(GatewayProcess(_config(redis)))
        for node in (one, two):
            await _connected(node)
        for i in range(8):
            put = await request(one.admin_port, "PUT", f"/routes/r{i}", json_body=_tied(i))
            assert put.status == 201
        assert (await request(two.admin_port, "DELETE", "/routes/r2")).status == 200
        assert (await request(one.admin_port, "PUT", "/routes/r2", json_body=_tied(2))).status
        # a route of the file, replaced through the admin API, keeps its place
        hello = {"match": {"paths": ["/"]}, "service": "hello", "strip_prefix": False}
        assert (await request(two.admin_port, "PUT", "/routes/hello", json_body=hello)).status

        async def view(node: GatewayProcess) -> tuple[list[str], str, int]:
            reply = await request(node.admin_port, "GET", "/config")
            names = [r["name"] for r in reply.json()["config"]["routes"]]
            return names, reply.headers["etag"], reply.json()["cluster"]["config_version"]

        expected = ["hello", "r0", "r1", "r3", "r4", "r5", "r6", "r7", "r2"]
        last = (await _cluster(two))["config_version"]  # (two made the last change)
        await until(lambda: view(one), lambda v: v[2] == last, what="node one caught up")
        written = await view(one)
        assert written[0] == expected
        async with GatewayProcess(_config(redis)) as late:
            for node in (two, late):
                assert await view(node) == written


async def test_the_stored_overlay_reads_back_in_creation_order() -> None:
    """The store alone: what one node put, another reads in the same order."""
    async with RedisServer() as redis:
        writer, reader = RedisConfigStore(redis.url), RedisConfigStore(redis.url)
        try:
            await writer.open()
            await writer.seed()
            await writer.refresh(force=True)
            # an entry an older apigate wrote, with no creation sequence: older than any other
            legacy = json.dumps({"doc": "l" * 80})
            await writer.redis.call("HSET", OVERLAY, field("routes", "legacy"), legacy)
            writer.overlay[("routes", "legacy")] = json.loads(legacy)
            for name in ("zeta", "alpha", "mid", "beta"):
                await writer.put("routes", name, {"doc": "d" * 80, "name_": name})
            await writer.put("routes", "zeta", None)
            await writer.put("routes", "alpha", {"doc": "changed" * 20})  # keeps its place
            await writer.put("routes", "zeta", {"doc": "again" * 20})  # created again: last
            await reader.open()
            assert list(reader.overlay) == list(writer.overlay)
            assert [name for _, name in reader.overlay] == [
                "legacy",
                "alpha",
                "mid",
                "beta",
                "zeta",
            ]
        finally:
            await writer.close()
            await reader.close()


# ------------------------------------------------------------------ 3: epochs
async def test_a_node_back_from_a_lost_history_does_not_wipe_changes_redis_took_since() -> None:
    """Node A knows version 3; Redis restarts empty; node B (restarted with it, knowing only
    the file) seeds a new epoch and takes two changes (versions 1, 2); A comes back. A used to
    compare its 3 with Redis's 2 and re-seed its old config, wiping B's acknowledged changes."""
    async with RedisServer() as redis, Relay(redis.port) as relay:
        a_config = _node_config(relay.url)
        async with GatewayProcess(a_config) as a:
            async with GatewayProcess(_node_config(redis.url)) as b:
                for node in (a, b):
                    await _connected(node)
                for i in range(3):
                    route = {"match": {"paths": [f"/old{i}"]}, "service": "hello"}
                    assert (
                        await request(a.admin_port, "PUT", f"/routes/old{i}", json_body=route)
                    ).status == 201
                await until(lambda: _route_names(b), lambda names: "old2" in names)
                await relay.cut()
                await until(lambda: _cluster(a), lambda c: not c["connected"], what="A cut")
            await redis.kill()
            await redis.start()  # empty
            async with GatewayProcess(_node_config(redis.url)) as b:
                await _connected(b)
                for i in range(2):
                    route = {"match": {"paths": [f"/new{i}"]}, "service": "hello"}
                    assert (
                        await request(b.admin_port, "PUT", f"/routes/new{i}", json_body=route)
                    ).status == 201
                taken = await _cluster(b)
                await relay.start()  # A is back
                await until(
                    lambda: _cluster(a),
                    lambda c: c["connected"] and c["epoch"] == taken["epoch"],
                    within=8.0,
                    what="A took the epoch in force",
                )
                wanted = {"hello", "new0", "new1"}
                for node in (a, b):
                    await until(lambda n=node: _route_names(n), lambda names: names == wanted)
                await asyncio.sleep(1.5)  # and it stays so
                for node in (a, b):
                    assert await _route_names(node) == wanted
                line = await a.wait_for_log("was dropped")
                assert all(f"routes/old{i}" in line for i in range(3))


async def test_a_change_taken_by_a_restarted_redis_begins_another_history() -> None:
    """Redis comes back from an old save (version 1), and a node that never read version 2
    writes over it: that change is version 2 too. The node that knew the lost version 2 used
    to see the same epoch and version and never read the change; and a node knowing more
    would have re-seeded over it."""
    async with RedisServer() as redis:
        one, two = RedisConfigStore(redis.url), RedisConfigStore(redis.url)
        try:
            await one.open()
            await one.seed()
            await one.refresh(force=True)
            await one.put("routes", "first", {"n": 1})
            await two.open()  # version 1
            await one.redis.call("SAVE", timeout=2.0)
            await one.put("routes", "lost", {"n": 2})  # version 2, lost below
            await redis.kill()
            await redis.start()  # from the save: version 1
            await two.put("routes", "taken", {"n": 3})  # version 2 of another history
            assert two.epoch != one.epoch
            seeded = await one.seed()
            assert not seeded.ours  # Redis's change stands
            assert await one.refresh()
            assert ("routes", "taken") in one.overlay and ("routes", "lost") not in one.overlay
            # while over the old save itself, untouched since, the node that knows more wins
            await one.put("routes", "again", {"n": 4})
            await one.redis.call("SAVE", timeout=2.0)
            await one.put("routes", "later", {"n": 5})
            await redis.kill()
            await redis.start()
            assert (await one.seed()).ours
            await two.refresh()
            assert ("routes", "later") in two.overlay
        finally:
            await one.close()
            await two.close()


async def test_a_redis_user_that_may_not_run_info_still_changes_the_config() -> None:
    """Telling a restarted Redis takes INFO (ACL @dangerous): without it, changes still go."""
    async with RedisServer() as redis:
        admin = RedisStore(redis.url, timeout=1.0)
        try:
            await admin.call(
                "ACL", "SETUSER", "app", "on", ">app-pw", "~*", "&*", "+@all", "-@dangerous"
            )
        finally:
            await admin.close()
        url = f"redis://app:app-pw@127.0.0.1:{redis.port}/0"
        one, two = RedisConfigStore(url), RedisConfigStore(url)
        try:
            await one.open()
            assert (await one.seed()).ours
            await one.refresh(force=True)
            await one.put("routes", "r", {"n": 1})
            await one.put("routes", "s", {"n": 2})
            await two.open()
            assert list(two.overlay) == [("routes", "r"), ("routes", "s")]
            assert (two.epoch, two.version) == (one.epoch, one.version)
        finally:
            await one.close()
            await two.close()


# ------------------------------------------------------------------ 8: one instance, two nodes
async def test_one_instance_registered_on_two_nodes_at_once_ends_the_same_everywhere() -> None:
    """Each node applied its own registration, then the other's announcement: the node that
    wrote last took the earlier one's URL, and the nodes served each other's until a resync."""
    async with (
        RedisServer() as redis,
        Upstream("a") as a,
        Upstream("b") as b,
        _nodes(redis, 2) as (one, two),
    ):
        client = RedisStore(redis.url, timeout=1.0)
        try:
            for trial in range(5):
                iid = f"dup{trial}"
                replies = await asyncio.gather(
                    _register(one, iid, a.url), _register(two, iid, b.url)
                )
                assert {r.status for r in replies} <= {200, 201}
                stored = json.loads(await client.call("HGET", INSTANCES, field("hello", iid)))
                for node in (one, two):
                    await until(
                        lambda n=node: _instances(n),
                        lambda found, i=iid, url=stored["url"]: found.get(i, {}).get("url") == url,
                        within=1.0,  # announcements, not the resync every 5 s
                        what=f"{iid} at {stored['url']}",
                    )
        finally:
            await client.close()


# ------------------------------------------------------------------ 4: ready when it is
async def test_a_new_node_accepts_only_once_it_has_the_registrations() -> None:
    """With Redis 60 ms away, a node's first resync takes a while: it used to accept
    connections meanwhile and answer 503 no_healthy_instance for a registered service, while
    /readyz said 200."""
    async with (
        RedisServer() as redis,
        Upstream("a") as a,
        Relay(redis.port, 0.03) as slow,
        GatewayProcess(_config(redis)) as one,
    ):
        await _connected(one)
        assert (await _register(one, "a", a.url, ttl="60s")).status == 201
        config = _node_config(slow.url)
        proxy_port = _unused_port_outside_the_ephemeral_range()
        config["listeners"]["proxy"]["address"] = f"127.0.0.1:{proxy_port}"
        answers: list[tuple[str, int]] = []
        node = GatewayProcess(config)
        starting = asyncio.create_task(node.__aenter__())
        rounds_after = 0
        try:
            while rounds_after < 5:
                rounds_after += starting.done()
                polls = [(proxy_port, "/x", "proxy")]
                if node.admin_port:  # (printed as soon as it listens)
                    polls.insert(0, (node.admin_port, "/readyz", "ready"))
                for port, path, what in polls:
                    with contextlib.suppress(OSError):
                        answers.append((what, (await request(port, "GET", path)).status))
                await asyncio.sleep(0.01)
            await starting
        finally:
            await node.stop()
        proxied = [status for what, status in answers if what == "proxy"]
        assert proxied and set(proxied) == {200}, answers
        ready = [status for what, status in answers if what == "ready"]
        assert 503 in ready, answers  # the admin listener answered before the proxy's
        first_ready = ready.index(200)
        assert set(ready[first_ready:]) == {200}


def _unused_port_outside_the_ephemeral_range() -> int:
    """A port to poll before anything listens on it: one in the ephemeral range could become
    the polling connection's own source port (a TCP self-connect), and then the gateway
    cannot bind it."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(10_000, low), 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port below the ephemeral range")


# ------------------------------------------------------------------ 6, 7: passwords
async def test_a_password_in_the_store_url_query_never_shows_and_round_trips() -> None:
    """redis-py authenticates with `?password=`: it showed in GET /config, /routes and the
    logs; and GET /config then POST /config of the same document was refused for the store
    (redacted), which always comes from the file anyway."""
    secret = "s3cr3t-pw-77"
    async with RedisServer() as redis:
        client = RedisStore(redis.url, timeout=1.0)
        try:
            await client.call("CONFIG", "SET", "requirepass", secret)
        finally:
            await client.close()
        store = f"{redis.url}?password={secret}"
        limited = {
            "requests": 100,
            "per": "1s",
            "store": f"redis://127.0.0.1:1/0?password={secret}",
        }
        config = _node_config(store)
        config["routes"][0]["plugins"] = {"rate_limit": limited}
        async with GatewayProcess(config) as node:
            await _connected(node)
            await node.wait_for_log("redis store unavailable")  # the plugin's store
            for path in ("/config", "/routes", "/routes/hello"):
                body = (await request(node.admin_port, "GET", path)).body.decode()
                assert secret not in body, path
            assert secret not in node.logs()
            shown = (await request(node.admin_port, "GET", "/config")).json()["config"]
            assert shown["store"] == f"{redis.url}?password=[redacted]"
            # the plugin's own store is no file-only setting: it must come back in full
            shown["routes"][0]["plugins"]["rate_limit"]["store"] = limited["store"]
            shown["routes"].append(
                {"name": "more", "match": {"paths": ["/more"]}, "service": "hello"}
            )
            back = await request(node.admin_port, "POST", "/config", json_body=shown)
            assert back.status == 200, back.json()
            assert "more" in await _route_names(node)
            other = {**shown, "store": "redis://:[redacted]@10.0.0.1:6379/0"}
            refused = await request(node.admin_port, "POST", "/config", json_body=other)
            assert refused.status == 400 and refused.json()["error"] == "redacted_value"


# ------------------------------------------------------------------ a write cut short
async def test_a_registry_write_cancelled_midway_holds_back_no_announcement() -> None:
    """A node counts its registry writes in flight and skips other nodes' announcements of
    the key meanwhile (they were published before its own). A write cancelled while Redis
    had not answered (an admin request cut short) kept its count: every later announcement
    of that instance from another node was ignored until the next resubscribe."""
    async with RedisServer() as redis, Relay(redis.port, delay=5.0) as slow:
        store = RedisConfigStore(slow.url)
        try:
            ops = SimpleNamespace(store=store)
            sync = ClusterSync(SimpleNamespace(), ops, SimpleNamespace())  # type: ignore[arg-type]
            reg = Registration("hello", "i1", "http://127.0.0.1:1", ttl=60.0)
            write = asyncio.create_task(sync.instance_up(reg))
            await asyncio.sleep(0.1)  # sent; the relay holds Redis's answer for 5 s
            assert sync.in_flight == {("hello", "i1"): 1}
            write.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await write
            assert sync.in_flight == {}
        finally:
            await store.close()
