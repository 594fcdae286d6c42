"""Self-registration through the admin API, end to end with real processes."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

from apigate.registry.registry import Registration, registry_of
from tests.support.gateway import GatewayProcess, base_config, running_gateway
from tests.support.http import KeepAliveClient, request
from tests.support.upstream import Upstream


def _config(**extra: object) -> dict:
    cfg = base_config(
        listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
        services={"hello": {"health": {"passive": {"failures": 2, "eject_for": "30s"}}}},
        routes=[{"name": "hello", "match": {"paths": ["/"]}, "service": "hello"}],
    )
    cfg.update(extra)
    return cfg


async def _register(gw: GatewayProcess, iid: str, url: str, ttl: str = "10s") -> int:
    reply = await request(
        gw.admin_port, "PUT", f"/services/hello/instances/{iid}", json_body={"url": url, "ttl": ttl}
    )
    return reply.status


async def test_registered_instance_gets_traffic_within_100ms() -> None:
    async with Upstream("a") as a, GatewayProcess(_config()) as gw:
        before = await request(gw.port, "GET", "/x")
        assert before.status == 503 and before.json()["error"] == "no_healthy_instance"
        assert await _register(gw, "a", a.url) == 201
        answered = time.monotonic()
        reply = await request(gw.port, "GET", "/x")
        assert reply.status == 200 and reply.json()["upstream"] == "a"
        assert time.monotonic() - answered < 0.1
        # a heartbeat is the same PUT: idempotent, 200 the second time
        assert await _register(gw, "a", a.url) == 200


async def test_deregister_under_load_loses_nothing_and_drains() -> None:
    async with Upstream("a") as a, Upstream("b") as b, GatewayProcess(_config()) as gw:
        assert await _register(gw, "a", a.url) == 201
        assert await _register(gw, "b", b.url) == 201
        stop = asyncio.Event()
        deleted_at: list[float] = []
        failures: list[str] = []
        late_to_b: list[float] = []

        async def client() -> int:
            done = 0
            async with KeepAliveClient(gw.port) as c:
                while not stop.is_set():
                    sent = time.monotonic()
                    reply = await c.get("/echo")
                    done += 1
                    if reply.status != 200:
                        failures.append(f"{reply.status} {reply.body[:100]!r}")
                    elif reply.json()["upstream"] == "b" and deleted_at and sent > deleted_at[0]:
                        late_to_b.append(sent - deleted_at[0])
            return done

        tasks = [asyncio.create_task(client()) for _ in range(8)]
        await asyncio.sleep(0.3)
        reply = await request(gw.admin_port, "DELETE", "/services/hello/instances/b")
        assert reply.status == 200
        deleted_at.append(time.monotonic())
        await asyncio.sleep(0.3)
        stop.set()
        total = sum(await asyncio.gather(*tasks))
        assert total > 50
        assert failures == []
        assert late_to_b == [], "requests sent after the DELETE answer reached b"
        services = (await request(gw.admin_port, "GET", "/services/hello")).json()
        assert [i["id"] for i in services["instances"]] == ["a"]


async def test_ttl_lapse_removes_instance_and_heartbeat_keeps_it() -> None:
    async with Upstream("a") as a, Upstream("b") as b, GatewayProcess(_config()) as gw:
        assert await _register(gw, "a", a.url, ttl="400ms") == 201
        assert await _register(gw, "b", b.url, ttl="400ms") == 201
        for _ in range(6):  # keep b alive only
            await asyncio.sleep(0.15)
            assert await _register(gw, "b", b.url, ttl="400ms") == 200
        doc = (await request(gw.admin_port, "GET", "/services/hello")).json()
        assert [i["id"] for i in doc["instances"]] == ["b"]
        events = (await request(gw.admin_port, "GET", "/events")).json()["events"]
        assert any("TTL lapsed" in e["message"] and e.get("instance") == "a" for e in events)


async def test_registration_for_unknown_service_creates_it() -> None:
    async with Upstream("a") as a, GatewayProcess(_config()) as gw:
        reply = await request(
            gw.admin_port,
            "PUT",
            "/services/fresh/instances/one",
            json_body={"url": a.url, "ttl": "5s", "metadata": {"zone": "z1"}},
        )
        assert reply.status == 201
        doc = (await request(gw.admin_port, "GET", "/services/fresh")).json()
        assert doc["instances"][0]["metadata"] == {"zone": "z1"}
        assert doc["instances"][0]["origin"] == "registered"
        route = {"match": {"paths": ["/fresh"]}, "service": "fresh", "strip_prefix": True}
        assert (await request(gw.admin_port, "PUT", "/routes/fresh", json_body=route)).status == 201
        proxied = await request(gw.port, "GET", "/fresh/echo")
        assert proxied.status == 200 and proxied.json()["path"] == "/echo"


async def test_the_file_declaring_a_service_a_registration_created_sets_its_settings(
    tmp_path: Path,
) -> None:
    """Instances that come up before the config names their service create it with the
    defaults; the file declaring it then must set it up. The registration's empty service
    was kept as an admin change, which wins over the file: the file's balancer and
    timeouts never applied (nor after a restart, with a sqlite store), silently."""
    store = f"sqlite:///{tmp_path}/state.db"
    declared = _config(store=store)
    declared["services"]["late"] = {"balancer": "least_connections"}

    async def balancer(gw: GatewayProcess) -> str:
        doc = (await request(gw.admin_port, "GET", "/services/late")).json()
        return str(doc["config"]["balancer"])

    async with Upstream("a") as a:
        async with GatewayProcess(_config(store=store)) as gw:
            body = {"url": a.url}
            reply = await request(
                gw.admin_port, "PUT", "/services/late/instances/one", json_body=body
            )
            assert reply.status == 201
            gw.write_config(declared)
            gw.signal(signal.SIGHUP)
            await gw.wait_for_log("config reloaded")
            assert await balancer(gw) == "least_connections"
        async with GatewayProcess(declared) as gw:  # a restart: the store read back
            assert await balancer(gw) == "least_connections"
        async with GatewayProcess(_config(store=store)) as gw:  # still declared, by default
            assert await balancer(gw) == "round_robin"


async def test_a_reload_keeps_a_deleted_file_service_a_registration_created_again(
    tmp_path: Path,
) -> None:
    """The file declares x; the admin deletes it, then a registration creates it again with
    the defaults and no static target (live). A SIGHUP with the file unchanged must serve
    the same: the registration's service was kept as an implicit declaration, which the
    file's x replaced, bringing back its balancer and the target the admin had deleted.
    A restart reads the same back."""
    store = f"sqlite:///{tmp_path}/state.db"
    async with Upstream("file") as static, Upstream("one") as one:
        config = _config(store=store)
        config["services"]["x"] = {"balancer": "least_connections", "targets": [static.url]}
        async with GatewayProcess(config) as gw:
            assert (await request(gw.admin_port, "DELETE", "/services/x")).status == 200
            body = {"url": one.url}
            reply = await request(gw.admin_port, "PUT", "/services/x/instances/one", json_body=body)
            assert reply.status == 201
            gw.signal(signal.SIGHUP)
            await gw.wait_for_log("config reloaded")
            doc = (await request(gw.admin_port, "GET", "/services/x")).json()
            assert doc["config"]["balancer"] == "round_robin"
            assert [i["id"] for i in doc["instances"]] == ["one"]
        async with GatewayProcess(config) as gw:  # a restart: the store read back, the same
            doc = (await request(gw.admin_port, "GET", "/services/x")).json()
            assert doc["config"]["balancer"] == "round_robin"
            assert doc["config"]["targets"] == []


async def test_bad_registrations_are_refused_with_reasons() -> None:
    async with GatewayProcess(_config()) as gw:
        port = gw.admin_port
        cases = [
            ({"url": f"http://127.0.0.1:{gw.port}"}, 400, "self_reference"),
            ({"url": f"http://127.0.0.1:{gw.admin_port}"}, 400, "self_reference"),
            ({"url": f"http://127.0.0.2:{gw.port}"}, 400, "self_reference"),
            ({"url": f"http://localhost:{gw.port}"}, 400, "self_reference"),
            ({"url": "ftp://x:1"}, 400, "invalid_url"),
            ({"url": "http://127.0.0.1:9", "ttl": "soon"}, 400, "invalid_body"),
            ({"url": "http://127.0.0.1:9", "ttl": True}, 400, "invalid_body"),
            ({"url": "http://127.0.0.1:9", "ttl": None}, 400, "invalid_body"),
            ({"url": "http://127.0.0.1:9", "weight": -1}, 400, "invalid_body"),
            ({"url": "http://127.0.0.1:9", "colour": "red"}, 400, "invalid_body"),
            ({}, 400, "invalid_body"),
        ]
        for body, status, code in cases:
            reply = await request(port, "PUT", "/services/hello/instances/x", json_body=body)
            assert (reply.status, reply.json()["error"]) == (status, code), body
        raw = await request(port, "PUT", "/services/hello/instances/x", body=b"{nope")
        assert raw.status == 400 and raw.json()["error"] == "invalid_json"
        deep = await request(port, "PUT", "/services/hello/instances/x", body=b"[" * 5000)
        assert deep.status == 400 and deep.json()["error"] == "invalid_json"
        big = await request(port, "PUT", "/services/hello/instances/x", body=b"x" * (2 << 20))
        assert big.status == 413


async def test_admin_token_is_required_on_every_method() -> None:
    cfg = _config()
    cfg["listeners"]["admin"]["token"] = "s3cret-token"
    async with GatewayProcess(cfg) as gw:
        for method, path in [
            ("GET", "/services"),
            ("GET", "/config"),
            ("POST", "/config"),
            ("PUT", "/services/hello/instances/a"),
            ("DELETE", "/routes/hello"),
            ("GET", "/healthz"),
            ("GET", "/nope"),
        ]:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": "s3cret-token"},
            ):
                reply = await request(gw.admin_port, method, path, headers=headers, json_body={})
                assert reply.status == 401, (method, path, headers)
                assert reply.headers["www-authenticate"].startswith("Bearer")
        ok = await request(
            gw.admin_port, "GET", "/services", headers={"Authorization": "Bearer s3cret-token"}
        )
        assert ok.status == 200
        shown = await request(
            gw.admin_port, "GET", "/config", headers={"Authorization": "Bearer s3cret-token"}
        )
        assert "s3cret-token" not in shown.body.decode()


async def test_config_etag_dry_run_and_memory_store_says_not_persisted() -> None:
    async with GatewayProcess(_config()) as gw:
        current = await request(gw.admin_port, "GET", "/config")
        assert current.json()["persisted"] is False
        etag = current.headers["etag"]
        doc = current.json()["config"]
        doc["routes"].append({"name": "extra", "match": {"paths": ["/extra"]}, "service": "hello"})
        dry = await request(
            gw.admin_port, "POST", "/config?dry_run=true", json_body=doc, headers={"If-Match": etag}
        )
        assert dry.status == 200 and dry.json()["dry_run"] is True
        routes = (await request(gw.admin_port, "GET", "/routes")).json()["routes"]
        assert [r["name"] for r in routes] == ["hello"]
        stale = await request(
            gw.admin_port, "POST", "/config", json_body=doc, headers={"If-Match": '"not-the-etag"'}
        )
        assert stale.status == 412
        applied = await request(
            gw.admin_port, "POST", "/config", json_body=doc, headers={"If-Match": etag}
        )
        assert applied.status == 200
        routes = (await request(gw.admin_port, "GET", "/routes")).json()["routes"]
        assert [r["name"] for r in routes] == ["hello", "extra"]
        bad = dict(doc, routes=[{"name": "x", "service": "nope"}])
        invalid = await request(gw.admin_port, "POST", "/config", json_body=bad)
        assert invalid.status == 400 and "unknown service 'nope'" in invalid.json()["message"]
        moved = dict(doc, listeners=dict(doc["listeners"], admin={"address": "127.0.0.1:1"}))
        for path in ("/config?dry_run=true", "/config"):
            refused = await request(gw.admin_port, "POST", path, json_body=moved)
            assert refused.status == 400  # listeners are the file's to say
            assert "listeners: " in refused.json()["message"]


async def test_a_config_nested_too_deeply_is_refused_and_the_api_keeps_working() -> None:
    """A 2 KB route whose plugin config nests 300 levels was applied and stored, answered 500,
    and from then on every admin call that dumps the config failed too (pydantic's
    serialization depth); a 10 KB `[[[...` body answered 500 with a RecursionError."""
    async with GatewayProcess(_config()) as gw:
        value: Any = 1
        for _ in range(300):
            value = {"a": value}
        plugins = {"request_transform": {"json": {"add": {"f": value}}}}
        route = {"match": {"paths": ["/deep"]}, "service": "hello", "plugins": plugins}
        deep = await request(gw.admin_port, "PUT", "/routes/deep", json_body=route)
        assert deep.status == 400, deep.json()
        assert "nested more than 64 levels deep" in deep.json()["message"]
        assert (await request(gw.port, "GET", "/deep")).status == 503  # "/": no instance yet
        assert (await request(gw.admin_port, "GET", "/config")).status == 200
        assert (await request(gw.admin_port, "GET", "/routes/deep")).status == 404
        nested = b"[" * 5000 + b"]" * 5000
        for method, path in (("POST", "/config"), ("PUT", "/services/x")):
            reply = await request(gw.admin_port, method, path, body=nested)
            assert (reply.status, reply.json()["error"]) == (400, "invalid_json")


async def test_a_service_in_use_cannot_be_deleted_whoever_uses_it() -> None:
    cfg = _config()
    cfg["services"] = {"a": {}, "b": {}, "c": {}}
    part = {"service": "b", "path": "/"}
    cfg["routes"] = [
        {"name": "plain", "match": {"paths": ["/a"]}, "service": "a"},
        {"name": "agg", "match": {"paths": ["/agg"]}, "aggregate": {"p": part}},
    ]
    async with GatewayProcess(cfg) as gw:
        for service, user in (("a", "plain"), ("b", "agg")):  # (an aggregate's part got 400)
            reply = await request(gw.admin_port, "DELETE", f"/services/{service}")
            assert (reply.status, reply.json()["error"]) == (409, "conflict"), reply.json()
            assert f"used by routes: {user}" in reply.json()["message"]
        assert (await request(gw.admin_port, "DELETE", "/services/c")).status == 200


async def test_sqlite_store_brings_admin_changes_back_after_restart(tmp_path) -> None:
    cfg = _config(store=f"sqlite:///{tmp_path}/state.db")
    async with Upstream("a") as a:
        async with GatewayProcess(cfg) as gw:
            svc = {"targets": [a.url]}
            assert (
                await request(gw.admin_port, "PUT", "/services/static", json_body=svc)
            ).status == 201
            route = {"match": {"paths": ["/static"]}, "service": "static", "strip_prefix": True}
            assert (
                await request(gw.admin_port, "PUT", "/routes/static", json_body=route)
            ).status == 201
            consumer = {"api_keys": ["k-123"], "groups": ["ops"]}
            assert (
                await request(gw.admin_port, "PUT", "/consumers/bob", json_body=consumer)
            ).status == 201
            assert (await request(gw.admin_port, "DELETE", "/routes/hello")).status == 200
        async with GatewayProcess(cfg) as gw:
            doc = await request(gw.admin_port, "GET", "/config")
            assert doc.json()["persisted"] is True
            names = [r["name"] for r in doc.json()["config"]["routes"]]
            assert names == ["static"]
            proxied = await request(gw.port, "GET", "/static/echo")
            assert proxied.status == 200 and proxied.json()["path"] == "/echo"
            consumers = (await request(gw.admin_port, "GET", "/consumers")).json()["consumers"]
            assert consumers[0]["name"] == "bob" and "k-123" not in str(consumers)


async def test_credentials_never_leave_through_the_api_nor_come_back_redacted() -> None:
    cfg = _config(store="redis://:hunter2@127.0.0.1:6390/0")
    cfg["routes"][0]["plugins"] = {
        "jwt": {"secret": "s" * 40, "algorithms": ["HS256"]},
        # a credential for the upstream, as a header value (any case of its name)
        "request_transform": {"headers": {"set": {"authorization": "Bearer up-secret-9"}}},
    }
    cfg["consumers"] = [{"name": "bob", "api_keys": ["k-123456"]}]
    async with GatewayProcess(cfg) as gw:
        for path in ("/config", "/routes", "/routes/hello", "/consumers", "/consumers/bob"):
            body = (await request(gw.admin_port, "GET", path)).body.decode()
            for secret in ("s" * 40, "k-123456", "hunter2", "up-secret-9"):
                assert secret not in body, (path, secret)
        shown = (await request(gw.admin_port, "GET", "/config")).json()["config"]
        assert shown["store"] == "redis://:[redacted]@127.0.0.1:6390/0"
        back = await request(gw.admin_port, "POST", "/config", json_body=shown)
        assert back.status == 400 and back.json()["error"] == "redacted_value"
        route = (await request(gw.admin_port, "GET", "/routes/hello")).json()
        again = await request(gw.admin_port, "PUT", "/routes/hello", json_body=route)
        assert again.status == 400 and "plugins.jwt.secret" in again.json()["message"]


async def test_a_lapsed_instance_leaves_the_balancer_when_its_ttl_runs_out(tmp_path: Path) -> None:
    """Not at the next sweep: one every 250 ms served an expired instance for up to that long
    after its TTL. (In-process, so that the check runs on the gateway's own clock: the lapse
    is due before the check's timer, which asyncio runs in order.)"""
    async with running_gateway(_config(), tmp_path) as gw:
        registry = registry_of(gw)
        loop = asyncio.get_running_loop()
        for n, ttl in enumerate((0.3, 0.2, 0.35)):
            reg = Registration("hello", f"i{n}", "http://127.0.0.1:9", ttl)
            inst, _ = await registry.register(reg)
            assert inst.expires_at is not None
            await asyncio.sleep(inst.expires_at - loop.time() + 0.005)
            assert f"i{n}" not in gw.services.services["hello"].instances, n


async def test_a_registration_that_moves_an_instance_is_200_and_says_it_moved() -> None:
    """The id exists: 201 is for a new one (README). Its new URL takes the traffic."""
    async with Upstream("a") as a, Upstream("b") as b, GatewayProcess(_config()) as gw:
        assert await _register(gw, "x", a.url) == 201
        assert await _register(gw, "x", b.url) == 200
        reply = await request(gw.port, "GET", "/x")
        assert reply.status == 200 and reply.json()["upstream"] == "b"
        events = (await request(gw.admin_port, "GET", "/events")).json()["events"]
        messages = [e["message"] for e in events if e.get("instance") == "x"]
        assert messages == [
            f"hello/x registered at {a.url}",
            f"hello/x moved to {b.url} (was {a.url})",
        ]


async def test_the_admin_api_creates_names_of_at_most_128_characters() -> None:
    """As its OpenAPI document says; names that exist already (the file's, state saved before
    the bound) stay usable: the bound once refused the gateway's own saved state at start."""
    known = "k" * 200
    cfg = _config(services={"hello": {}, known: {}})
    async with Upstream("a") as a, GatewayProcess(cfg) as gw:
        body = {"url": a.url, "ttl": "10s"}
        for path, json_body in (
            ("/services/" + "s" * 129 + "/instances/i", body),
            ("/services/" + "s" * 129, {}),
            ("/routes/" + "r" * 129, {"match": {"paths": ["/r"]}, "service": "hello"}),
        ):
            reply = await request(gw.admin_port, "PUT", path, json_body=json_body)
            assert reply.status == 400 and reply.json()["error"] == "invalid_name", path
        ok = await request(gw.admin_port, "PUT", "/services/" + "s" * 128, json_body={})
        assert ok.status == 201
        registered = f"/services/{known}/instances/i"
        assert (await request(gw.admin_port, "PUT", registered, json_body=body)).status == 201


async def test_heartbeats_do_not_grow_the_lapse_queue(tmp_path: Path) -> None:
    """One entry per registration and heartbeat stayed queued until its own expiry: a cluster
    resync renews every instance every 5 s, so with long TTLs the queue grew without bound
    (17,280 entries an instance at the 24 h maximum). Renewed instances still lapse."""
    async with running_gateway(_config(), tmp_path) as gw:
        registry = registry_of(gw)
        for _ in range(200):
            for n in range(3):
                await registry.register(Registration("hello", f"i{n}", "http://127.0.0.1:9", 0.3))
        assert len(registry._lapses) == 3
        await asyncio.sleep(0.35)
        assert not gw.services.services["hello"].instances
        assert not registry._lapses
