"""Review fixes on the control plane, end to end: a refused SIGHUP reload leaves registrations
working, admin-saved routes keep their place across a reload and a restart, `store` is
restart-only, `--watch` follows included files, a SIGHUP during start-up, IPv6 route hosts and
percent-encoded admin names."""

from __future__ import annotations

import asyncio
import signal
import sys
import textwrap
from pathlib import Path
from typing import Any

from tests.support.gateway import GatewayProcess, base_config
from tests.support.http import request
from tests.support.traffic import eventually, who
from tests.support.upstream import Upstream

ADMIN = {"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}}


def _route(name: str, service: str, path: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"name": name, "match": {"paths": [path or f"/{name}"]}, "service": service, **extra}


async def test_a_refused_reload_leaves_registrations_reaching_the_traffic() -> None:
    """The refused file drops `orders` (its instance had deregistered) and has a plugin
    typo: the registration made afterwards used to land in a rebuilt service nothing served
    (503 for ever); and a file that changes `store` is refused as needing a restart."""
    async with Upstream("u0") as u0, Upstream("u1") as u1:
        good = base_config(
            listeners=ADMIN,
            services={"a": {"targets": [u0.url]}, "orders": {}},
            routes=[_route("a", "a", "/"), _route("orders", "orders", "/orders")],
        )
        async with GatewayProcess(good) as gw:
            reg = {"url": u1.url, "ttl": "60s"}
            put = await request(
                gw.admin_port, "PUT", "/services/orders/instances/o1", json_body=reg
            )
            assert put.status == 201
            assert (await request(gw.admin_port, "DELETE", "/services/orders/instances/o1")).status
            bad = base_config(
                listeners=ADMIN,
                services={"a": {"targets": [u0.url]}},
                routes=[
                    _route(
                        "a",
                        "a",
                        "/",
                        plugins={"rate_limit": {"requests": 10, "per": "1m", "key": "nobody"}},
                    )
                ],
            )
            gw.write_config(bad)
            gw.signal(signal.SIGHUP)
            await gw.wait_for_log("reload rejected")
            put = await request(
                gw.admin_port, "PUT", "/services/orders/instances/o2", json_body=reg
            )
            assert put.status == 201
            reply = await request(gw.port, "GET", "/orders/echo")
            assert reply.status == 200 and reply.json()["upstream"] == "u1"
            shown = (await request(gw.admin_port, "GET", "/services/orders")).json()
            assert shown["routes"] == ["orders"]

            gw.write_config(dict(good, store="sqlite:///state.db"))
            gw.signal(signal.SIGHUP)

            async def store_refused() -> bool:
                return "store: memory -> sqlite:///state.db needs a restart" in gw.logs()

            await eventually(store_refused, 5.0)
            config = (await request(gw.admin_port, "GET", "/config")).json()
            assert config["config"]["store"] == "memory" and config["store"]["kind"] == "memory"


async def test_an_admin_saved_route_keeps_its_place_across_reload_and_restart(
    tmp_path: Path,
) -> None:
    """Two equally specific routes: the first in the file wins. Saving it again through the
    admin API used to move it last at the next reload or restart, and the other one won."""
    async with Upstream("u0") as u0, Upstream("u1") as u1:
        cfg = base_config(
            listeners=ADMIN,
            store=f"sqlite:///{tmp_path}/state.db",
            services={"a": {"targets": [u0.url]}, "b": {"targets": [u1.url]}},
            routes=[_route("first", "a", "/"), _route("second", "b", "/")],
        )
        for restart in (False, True):
            async with GatewayProcess(cfg) as gw:
                assert await who(gw.port) == "u0"
                if not restart:
                    saved = {"match": {"paths": ["/"]}, "service": "a", "preserve_host": False}
                    reply = await request(gw.admin_port, "PUT", "/routes/first", json_body=saved)
                    assert reply.status == 200
                    gw.signal(signal.SIGHUP)
                    await gw.wait_for_log("config reloaded")
                routes = (await request(gw.admin_port, "GET", "/routes")).json()["routes"]
                assert [r["name"] for r in routes] == ["first", "second"]
                assert await who(gw.port) == "u0"


async def test_watch_follows_included_files_and_new_glob_matches() -> None:
    async with Upstream("u0") as u0, Upstream("u1") as u1:
        cfg = base_config(include=["conf.d/*.yaml"], routes=[_route("r", "s", "/")])
        gw = GatewayProcess(cfg, args=("--watch",))
        conf_d = gw.config_path.parent / "conf.d"
        conf_d.mkdir()
        (conf_d / "svc.yaml").write_text(f"services:\n  s: {{targets: [{u0.url}]}}\n")
        async with gw:
            assert await who(gw.port) == "u0"
            (conf_d / "svc.yaml").write_text(f"services:\n  s: {{targets: [{u1.url}]}}\n")

            async def moved() -> bool:
                return await who(gw.port) == "u1"

            await eventually(moved, 5.0)
            (conf_d / "new.yaml").write_text(
                "routes:\n  - {name: n, match: {paths: [/new]}, service: s, strip_prefix: true}\n"
            )

            async def new_route() -> bool:
                return (await request(gw.port, "GET", "/new/echo")).status == 200

            await eventually(new_route, 5.0)


SIGHUP_DURING_START = textwrap.dedent(
    """\
    import asyncio, os, signal, sys

    from apigate import extensions
    from apigate.server import serve

    attach = extensions.attach_extensions

    async def attach_and_hang_up(gateway):
        await attach(gateway)

        async def hang_up(_gateway):  # the proxy listener accepts already: a deploy's SIGHUP
            os.kill(os.getpid(), signal.SIGHUP)
            await asyncio.sleep(0.05)  # (delivered while start-up goes on)

        gateway.on_start.append(hang_up)

    extensions.attach_extensions = attach_and_hang_up

    def ready(gateway):
        async def stop_once_reloaded():
            while gateway.reloads_ok == 0:
                await asyncio.sleep(0.02)
            print("reloaded", gateway.reloads_ok, flush=True)
            await gateway.shutdown(0)

        gateway.loop.create_task(stop_once_reloaded())

    asyncio.run(serve(sys.argv[1], ready=ready))
    """
)


async def _run_script(tmp_path: Path, script: str) -> asyncio.subprocess.Process:
    """Run `script` (a gateway started its own way) on a minimal config; stdout and stderr
    together on the process's stdout."""
    (tmp_path / "gw.yaml").write_text(
        "listeners: {proxy: {address: 127.0.0.1:0}, admin: null}\nservices: {s: {}}\n"
    )
    (tmp_path / "run.py").write_text(script)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        str(tmp_path / "run.py"),
        str(tmp_path / "gw.yaml"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )


SIGHUP_DURING_IMPORTS = textwrap.dedent(
    """\
    import os, signal, sys

    class HangUpOnServerImport:  # the moment `apigate run` imports its server (~0.7 s)
        def find_spec(self, name, path=None, target=None):
            if name == "apigate.server":
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGHUP)
            return None  # (the usual finders import it)

    sys.meta_path.insert(0, HangUpOnServerImport())
    from apigate.cli import main

    sys.exit(main(["run", "-c", sys.argv[1], "--plain-logs"]))
    """
)


async def test_a_sighup_while_run_imports_is_a_reload_once_started(tmp_path: Path) -> None:
    """`kill -HUP` in the first ~0.7 s of `apigate run` found SIGHUP's default action and
    ended the process (docs audit): the imports came before any handler."""
    proc = await _run_script(tmp_path, SIGHUP_DURING_IMPORTS)
    assert proc.stdout is not None
    seen: list[str] = []

    async def until_reloaded() -> None:
        assert proc.stdout is not None
        while not any("config reloaded" in line for line in seen):
            line = await proc.stdout.readline()
            if not line:
                return
            seen.append(line.decode(errors="replace"))

    await asyncio.wait_for(until_reloaded(), 20)
    assert any("config reloaded" in line for line in seen), "".join(seen)[-2000:]
    proc.send_signal(signal.SIGTERM)
    await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0


async def test_a_sighup_during_start_up_is_a_reload_once_started(tmp_path: Path) -> None:
    """The default action of SIGHUP is to terminate: before the handlers were installed at
    the end of start-up, a reload sent as soon as the port answered killed the gateway."""
    proc = await _run_script(tmp_path, SIGHUP_DURING_START)
    out, _ = await asyncio.wait_for(proc.communicate(), 20)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-2000:]
    assert "reloaded 1" in text


async def test_an_ipv6_route_host_and_percent_encoded_admin_names() -> None:
    async with Upstream("u0") as u0:
        cfg = base_config(
            listeners=ADMIN,
            services={"s": {"targets": [u0.url]}},
            routes=[{"name": "v6", "match": {"paths": ["/"], "hosts": ["::1"]}, "service": "s"}],
            consumers=[{"name": "alice@example.com", "api_keys": ["k1"]}],
        )
        async with GatewayProcess(cfg) as gw:
            for host in ("[::1]", "[::1]:8080"):
                reply = await request(gw.port, "GET", "/echo", headers={"Host": host})
                assert reply.status == 200, (host, reply.body)
            assert (await request(gw.port, "GET", "/echo")).status == 404  # Host 127.0.0.1:...
            route = {"match": {"paths": ["/v6b"], "hosts": ["[::1]"]}, "service": "s"}
            assert (
                await request(gw.admin_port, "PUT", "/routes/v6b", json_body=route)
            ).status == 201

            path = "/consumers/alice%40example.com"
            reply = await request(gw.admin_port, "GET", path)
            assert reply.status == 200 and reply.json()["name"] == "alice@example.com"
            assert (await request(gw.admin_port, "DELETE", path)).status == 200
            reply = await request(
                gw.admin_port,
                "PUT",
                "/services/s/instances/10.0.0.5:9000",
                json_body={"url": u0.url},
            )
            assert reply.status == 400 and reply.json()["message"].startswith("instance id")
