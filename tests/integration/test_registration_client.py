"""The `apigate.registration` client library against a real gateway, and instance failure."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from apigate.registration import Registration, SyncRegistration
from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import KeepAliveClient, request
from tests.support.upstream import Upstream


def _config(admin_port: int = 0) -> dict:
    return base_config(
        listeners={
            "proxy": {"address": "127.0.0.1:0"},
            "admin": {"address": f"127.0.0.1:{admin_port}"},
        },
        services={
            "hello": {
                "health": {"passive": {"failures": 1, "eject_for": "30s"}},
                "timeouts": {"connect": "500ms", "response": "5s"},
            }
        },
        routes=[{"name": "hello", "match": {"paths": ["/"]}, "service": "hello"}],
    )


async def _instances(gw: GatewayProcess) -> list[str]:
    doc = (await request(gw.admin_port, "GET", "/services/hello")).json()
    return sorted(i["id"] for i in doc["instances"])


async def test_async_client_registers_heartbeats_reregisters_and_deregisters() -> None:
    async with Upstream("a") as up:
        gw = GatewayProcess(_config())
        async with gw:
            admin = gw.admin_url
            reg = Registration(admin, "hello", url=up.url, instance_id="a", ttl=0.6)
            assert await reg.start()
            await asyncio.sleep(1.0)  # longer than the TTL: heartbeats keep it
            assert await _instances(gw) == ["a"]
            admin_port = gw.admin_port
        # the gateway restarts on the same admin port: the next heartbeat registers again
        async with GatewayProcess(_config(admin_port)) as gw2:
            for _ in range(40):
                if await _instances(gw2) == ["a"]:
                    break
                await asyncio.sleep(0.05)
            assert await _instances(gw2) == ["a"]
            assert (await request(gw2.port, "GET", "/echo")).status == 200
            await reg.stop()
            assert await _instances(gw2) == []


async def test_sync_client_in_a_thread() -> None:
    async with Upstream("a") as up, GatewayProcess(_config()) as gw:
        reg = SyncRegistration(gw.admin_url, "hello", url=up.url, instance_id="s1", ttl=5)
        assert await asyncio.to_thread(reg.start)
        assert await _instances(gw) == ["s1"]
        await asyncio.to_thread(reg.stop)
        assert await _instances(gw) == []


async def test_kill_9_under_load_is_ejected_passively() -> None:
    """A hard-killed instance costs at most the requests in flight on it."""
    async with GatewayProcess(_config()) as gw:
        script = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "hello_service.py")
        procs = []
        for name in ("k1", "k2"):
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                script,
                "--name",
                name,
                "--admin",
                gw.admin_url,
                "--ttl",
                "30",
                stdout=asyncio.subprocess.PIPE,
            )
            assert proc.stdout is not None
            await proc.stdout.readline()
            procs.append(proc)
        try:
            assert await _instances(gw) == ["k1", "k2"]
            stop = asyncio.Event()
            failures = 0
            answered: dict[str, int] = {}

            async def client() -> None:
                nonlocal failures
                while not stop.is_set():
                    try:
                        async with KeepAliveClient(gw.port) as c:
                            while not stop.is_set():
                                reply = await c.get("/")
                                if reply.status != 200:
                                    failures += 1
                                else:
                                    who = reply.json()["instance"]
                                    answered[who] = answered.get(who, 0) + 1
                    except (ConnectionError, OSError):
                        failures += 1

            clients = [asyncio.create_task(client()) for _ in range(4)]
            await asyncio.sleep(0.4)
            procs[1].send_signal(signal.SIGKILL)
            await procs[1].wait()
            before = dict(answered)
            await asyncio.sleep(0.6)
            stop.set()
            await asyncio.gather(*clients)
            assert failures <= 4, f"{failures} failures with 4 concurrent clients"
            assert answered.get("k1", 0) > before.get("k1", 0)
            doc = (await request(gw.admin_port, "GET", "/services/hello")).json()
            k2 = next(i for i in doc["instances"] if i["id"] == "k2")
            assert k2["healthy"] is False
        finally:
            for proc in procs:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
