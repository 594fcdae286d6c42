"""Review fixes on the operations side, end to end: a broken certificate file on disk does not
block reloads and admin changes, a re-registration's new base path survives a Redis restart
in a cluster, and `apigate check` probes what the gateway's active health checks probe."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from apigate.config.schema import GatewayConfig
from apigate.ops import probe_target
from apigate.registry.health import http_probe
from apigate.server import Gateway
from apigate.store.cluster_scripts import INSTANCES
from apigate.store.redis import RedisStore
from tests.integration.test_cluster import _cluster, _instances, _nodes, _register
from tests.integration.test_tls import TLSClient, handshake_serial, tls_config
from tests.support.certs import TestCA
from tests.support.gateway import GatewayProcess
from tests.support.http import request
from tests.support.redis_server import RedisServer
from tests.support.traffic import until
from tests.support.upstream import Upstream


async def test_an_expired_sni_file_blocks_neither_a_sighup_reload_nor_an_admin_change(
    tmp_path: Path,
) -> None:
    ca = TestCA(tmp_path)
    default, sni = ca.issue("gw", ["test.local"]), ca.issue("a", ["a.test"])
    env = {"APIGATE_TLS_WATCH_INTERVAL": "0"}  # no watcher: the files are only read on SIGHUP
    async with Upstream() as up:
        cfg = tls_config(
            up.url, default, certificates=[{"certificate": str(sni.cert), "key": str(sni.key)}]
        )
        cfg["listeners"]["admin"] = {"address": "127.0.0.1:0"}
        async with GatewayProcess(cfg, env=env) as gw:
            ca.expired("a", ["a.test"])  # replaced on disk by an expired pair
            cfg["routes"].append({"name": "new", "match": {"paths": ["/new"]}, "service": "up"})
            gw.write_config(cfg)
            gw.signal(signal.SIGHUP)
            await gw.wait_for_log("config reloaded", within=5)
            assert "reload rejected (from" not in gw.logs()
            assert "expired on" in await gw.wait_for_log("certificate files of", within=5)
            route = {"match": {"paths": ["/admin-made"]}, "service": "up"}
            reply = await request(gw.admin_port, "PUT", "/routes/admin-made", json_body=route)
            assert reply.status == 201, reply.body
            # the SNI certificate loaded before keeps serving, and so do both new routes
            assert await handshake_serial(gw.port, ca, "a.test") == sni.serial
            async with TLSClient(gw.port, ca) as client:
                assert (await client.get("/new/echo"))[0] == 200
                assert (await client.get("/admin-made/echo"))[0] == 200

            # a reload that changes the tls section is still checked, and refused
            cfg["listeners"]["proxy"]["tls"]["min_version"] = "1.3"
            gw.write_config(cfg)
            gw.signal(signal.SIGHUP)
            line = await gw.wait_for_log("reload rejected (from", within=5)
            assert "expired on" in line


async def test_a_base_path_moved_by_re_registration_survives_an_emptied_redis() -> None:
    async with RedisServer() as redis, Upstream("a") as a, _nodes(redis, 2) as (one, two):
        assert (await _register(one, "a1", f"{a.url}/v1", ttl="60s")).status == 201
        moved = await _register(one, "a1", f"{a.url}/v2", ttl="60s")
        assert moved.status == 200 and moved.json()["url"] == f"{a.url}/v2"
        for node in (one, two):
            await until(
                lambda n=node: _instances(n),
                lambda found: found.get("a1", {}).get("url") == f"{a.url}/v2",
                what="the new url shown",
            )

        await redis.kill()
        await until(lambda: _cluster(one), lambda c: not c["connected"], what="disconnected")
        await redis.start()  # on the same port, empty: node one writes its registration back
        await until(lambda: _shared_urls(redis), lambda urls: urls != [], within=8.0)
        assert await _shared_urls(redis) == [f"{a.url}/v2"]
        for node in (one, two):
            assert (await _instances(node))["a1"]["url"] == f"{a.url}/v2"
            reply = await request(node.port, "GET", "/echo")
            assert reply.status == 200 and reply.json()["path"] == "/v2/echo"


async def _shared_urls(redis: RedisServer) -> list[str]:
    """The URLs of the instances kept in Redis."""
    client = RedisStore(redis.url, timeout=1.0)
    try:
        docs = await client.call("HVALS", INSTANCES)
    finally:
        await client.close()
    return [json.loads(doc)["url"] for doc in docs]


async def test_check_and_the_active_checks_probe_the_same_path() -> None:
    async with Upstream() as up:
        doc = {
            "version": 1,
            "services": {
                "s": {
                    "targets": [f"{up.url}/status"],  # a base path: where the service's API is
                    "health": {"active": {"path": "/status/503", "timeout": "1s"}},
                }
            },
            "routes": [{"name": "r", "match": {"paths": ["/"]}, "service": "s"}],
        }
        config = GatewayConfig.model_validate(doc)
        service = config.services["s"]
        active = service.health.active
        assert active is not None
        gw = Gateway(config)
        try:  # the gateway's own probe of its instance, as its checker sends it
            inst = next(iter(gw.services.services["s"].instances.values()))
            assert await http_probe(inst, active) == (False, "HTTP 503")
        finally:
            gw.pools.close()
        checked = await probe_target(service, "s", service.targets[0])  # `apigate check`'s
        assert checked.request == "GET /status/503" and checked.up is False
        assert [r.path for r in up.received] == ["/status/503", "/status/503"]


def test_run_names_an_invalid_file_once_as_validate_does(tmp_path: Path) -> None:
    """`apigate run` (and its supervisor, with --workers 2) printed the file twice: in its own
    words, then as the schema error's source."""
    path = tmp_path / "gw.yaml"
    path.write_text("routes:\n  - {name: r, match: {paths: [/]}}\n")
    for workers in ("1", "2"):
        done = subprocess.run(
            [sys.executable, "-m", "apigate", "run", "-c", str(path), "--workers", workers],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.splitlines() == [
            f"{path}: invalid",
            "  routes[0].service: required: a route needs a service or an aggregate",
        ]
