"""`apigate demo`: the whole story on one machine, with nothing to install or configure.

1. start a gateway (in this process) from `examples/apigate.yaml`, on free ports;
2. start three `hello_service` processes that register themselves through the admin API;
3. send requests and show how the balancer spread them;
4. stop one instance while traffic flows and show that no request failed;
5. call the JWT-protected route: no token → 401, a signed token → 200, a burst → 429s;
6. clean up everything it started.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import signal
import sys
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

from apigate.config.loader import load_config
from apigate.config.schema import GatewayConfig
from apigate.examples.client import make_token
from apigate.server import Gateway


async def http_get(
    port: int, path: str, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, dict[str, Any] | None]:
    """One GET on a fresh connection: (status, JSON body or None)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: demo\r\n{extra}Connection: close\r\n\r\n".encode()
        )
        raw = await asyncio.wait_for(reader.read(-1), timeout)
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    try:
        return status, json.loads(body) if body else None
    except ValueError:
        return status, None


def _say(text: str = "") -> None:
    print(text, flush=True)


def demo_config(env: dict[str, str]) -> GatewayConfig:
    """examples/apigate.yaml, read as `apigate run` reads it, on free ports."""
    with resources.as_file(resources.files("apigate.examples") / "apigate.yaml") as path:
        config = load_config(path, env=env)
    config.listeners.proxy.address = "127.0.0.1:0"
    assert config.listeners.admin is not None
    config.listeners.admin.address = "127.0.0.1:0"
    return config


async def start_instance(name: str, admin_url: str) -> asyncio.subprocess.Process:
    script = Path(str(resources.files("apigate.examples").joinpath("hello_service.py")))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(script),
        "--name",
        name,
        "--admin",
        admin_url,
        "--ttl",
        "6",
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 10)
    _say(f"  started {line.decode().strip()}")
    return proc


async def wait_registered(gateway: Gateway, service: str, count: int, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        svc = gateway.services.services.get(service)
        if svc is not None and len(svc.balancer.available) >= count:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"only some instances of {service} registered in {timeout}s")


async def send(
    port: int, n: int, path: str = "/hello_service"
) -> tuple[collections.Counter[str], int]:
    """n requests, 5 at a time; returns answers per instance and the number of failures."""
    counts: collections.Counter[str] = collections.Counter()
    failed = 0
    sem = asyncio.Semaphore(5)

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                status, body = await http_get(port, path)
            except (TimeoutError, OSError):
                failed += 1
                return
            if status == 200 and body:
                counts[str(body.get("instance"))] += 1
            else:
                failed += 1

    await asyncio.gather(*(one() for _ in range(n)))
    return counts, failed


def _show(counts: collections.Counter[str], failed: int) -> None:
    for name in sorted(counts):
        _say(f"    {name:<10} {counts[name]:>3}  {'#' * counts[name]}")
    _say(f"    failed     {failed:>3}")


async def jwt_story(port: int, secret: str) -> bool:
    """No token → 401; a signed token → 200; a burst past the route's limit → 429s."""
    path = "/secure/hello_service"
    status, body = await http_get(port, path)
    _say(f"   without a token:      {status} {(body or {}).get('error', '')}")
    token = make_token(secret)
    auth = {"Authorization": f"Bearer {token}"}
    ok_status, ok_body = await http_get(port, path, auth)
    instance = (ok_body or {}).get("instance", "")
    _say(f"   with a signed token:  {ok_status} (answered by {instance})")
    burst = [(await http_get(port, path, auth))[0] for _ in range(8)]
    _say(f"   a burst of 8 more:    {' '.join(map(str, burst))}")
    _say("   (rate_limit: 5 per 10s with a burst of 4, per consumer)")
    return status == 401 and ok_status == 200 and 429 in burst and burst[0] == 200


async def run_demo(requests: int = 30) -> int:
    from apigate.extensions import attach_extensions

    log_dir = tempfile.TemporaryDirectory(prefix="apigate-demo-")
    secret = os.environ.get("APIGATE_DEMO_JWT_SECRET") or secrets.token_hex(32)
    env = {
        **os.environ,
        "APIGATE_DEMO_JWT_SECRET": secret,
        "APIGATE_ACCESS_LOG": str(Path(log_dir.name) / "access.log"),
    }
    gateway = Gateway(demo_config(env))
    await attach_extensions(gateway)
    await gateway.start()
    port = gateway.proxy_port
    admin_url = f"http://{gateway.admin_address}"
    _say(f"apigate demo: gateway on http://127.0.0.1:{port}, admin API on {admin_url}")
    procs: list[asyncio.subprocess.Process] = []
    try:
        _say("\n1. three instances of the hello service start and register themselves")
        for name in ("hello-1", "hello-2", "hello-3"):
            procs.append(await start_instance(name, admin_url))
        await wait_registered(gateway, "hello", 3)

        _say(f"\n2. {requests} requests to GET /hello_service, answered per instance:")
        counts, failed = await send(port, requests)
        _show(counts, failed)

        _say("\n3. hello-3 stops (it deregisters and drains) while requests keep flowing:")
        traffic = asyncio.create_task(send(port, requests))
        await asyncio.sleep(0.05)
        procs[2].send_signal(signal.SIGTERM)
        await procs[2].wait()
        counts_during, failed_during = await traffic
        counts_after, failed_after = await send(port, requests)
        _say("   during the stop:")
        _show(counts_during, failed_during)
        _say("   after it:")
        _show(counts_after, failed_after)
        moved = failed + failed_during + failed_after == 0 and "hello-3" not in counts_after
        if moved:
            _say("   no request failed; traffic moved to the remaining instances.")
        else:
            _say("   something went wrong: see the counts above.")

        _say("\n4. the JWT-protected route /secure/hello_service:")
        secured = await jwt_story(port, secret)
        ok = moved and secured
        _say("\n" + ("OK: the demo ran as expected." if ok else "FAILED: see above."))
        return 0 if ok else 1
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                proc.kill()
        await gateway.shutdown(drain_timeout=1)
        log_dir.cleanup()
        _say("cleaned up: gateway and instances stopped.")
