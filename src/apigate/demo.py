"""`apigate demo`: the whole story on one machine, with nothing to install or configure.

1. start a gateway (in this process) from `examples/apigate.yaml`, on free ports;
2. start three `hello_service` processes that register themselves through the admin API;
3. send requests and show how the balancer spread them;
4. stop one instance while traffic flows and show that no request failed;
5. clean up everything it started.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from apigate.config.loader import parse_config
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


def demo_config() -> dict[str, Any]:
    text = resources.files("apigate.examples").joinpath("apigate.yaml").read_text()
    doc: dict[str, Any] = yaml.safe_load(text)
    doc["listeners"]["proxy"]["address"] = "127.0.0.1:0"
    doc["listeners"]["admin"]["address"] = "127.0.0.1:0"
    return doc


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


async def run_demo(requests: int = 30) -> int:
    from apigate.extensions import attach_extensions

    gateway = Gateway(parse_config(demo_config(), source="examples/apigate.yaml"))
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
        ok = failed + failed_during + failed_after == 0 and "hello-3" not in counts_after
        _say(
            "\n"
            + (
                "OK: no request failed and traffic moved to the remaining instances."
                if ok
                else "Something went wrong: see the counts above."
            )
        )
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
        _say("cleaned up: gateway and instances stopped.")
