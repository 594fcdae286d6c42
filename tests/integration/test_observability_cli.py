"""`apigate check` and `apigate status` against real upstreams and a real gateway."""

from __future__ import annotations

import asyncio
import io
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from apigate.ops import cmd_check, cmd_status
from tests.integration.test_observability_metrics import (
    TOKEN,
    admin,
    gateway_config,
    proxy,
)
from tests.support.gateway import running_gateway
from tests.support.upstream import Upstream


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def write(tmp_path: Path, services: dict[str, Any]) -> Path:
    path = tmp_path / "check.yaml"
    routes = [{"name": n, "match": {"paths": [f"/{n}"]}, "service": n} for n in services]
    path.write_text(yaml.safe_dump({"version": 1, "services": services, "routes": routes}))
    return path


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "apigate", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_routes_prints_the_compiled_table_with_names_and_services(tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    doc = {
        "version": 1,
        "services": {"s": {"targets": ["http://127.0.0.1:9"]}},
        "routes": [
            {"name": "api", "match": {"paths": ["/api"], "methods": ["GET"]}, "service": "s"},
            {
                "name": "agg",
                "match": {"paths": ["/agg"]},
                "aggregate": {"a": {"service": "s", "path": "/a"}},
                "plugins": {"key_auth": {}, "request_termination": {"status_code": 410}},
            },
        ],
        "consumers": [{"name": "c", "api_keys": ["k" * 32]}],
        "plugins": {"cors": {"origins": ["*"]}},
    }
    path.write_text(yaml.safe_dump(doc))
    code, out, err = await run_cli("routes", "-c", str(path))
    assert code == 0, err
    header, *rows = [line.split() for line in out.splitlines()]
    assert header == ["ROUTE", "HOST", "METHODS", "PATH", "KIND", "HEADERS", "SERVICE", "PLUGINS"]
    # the plugins in the order they run (priority), global ones included
    chain = "cors,key_auth,request_termination"
    assert sorted(rows) == [
        ["agg", "*", "*", "/agg", "prefix", "-", "(aggregate)", chain],
        ["api", "*", "GET,HEAD", "/api", "prefix", "-", "s", "cors"],
    ]


def test_a_reader_that_stops_early_gets_a_quiet_exit_141(tmp_path: Path) -> None:
    """`apigate routes | head -1`: no BrokenPipeError traceback, and the status a shell gives a
    tool killed by SIGPIPE (128 + 13), as for `yes | head -1`."""
    path = tmp_path / "many.yaml"
    # far more than a pipe holds (64 KiB), so the CLI is still writing when the reader goes
    routes = [
        {
            "name": f"route-{i:05d}",
            "match": {"paths": [f"/a-rather-long-path/{i:05d}"]},
            "service": "s",
        }
        for i in range(3000)
    ]
    doc = {"version": 1, "services": {"s": {"targets": ["http://127.0.0.1:9"]}}, "routes": routes}
    path.write_text(yaml.safe_dump(doc))
    command = [sys.executable, "-m", "apigate", "routes", "-c", str(path)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith(b"ROUTE")
        proc.stdout.close()  # what `head -1` does once it has its line
        _, err = proc.communicate(timeout=30)
    assert err.decode() == ""
    assert proc.returncode == 141


async def test_check_reports_each_target_and_fails_when_one_is_down(tmp_path: Path) -> None:
    dead = closed_port()
    async with Upstream() as up:
        path = write(
            tmp_path,
            {
                "plain": {"targets": [up.url]},
                "based": {"targets": [up.url + "/base"]},  # the root of the service: /base
                "checked": {
                    "targets": [up.url],
                    "health": {"active": {"path": "/status/503"}},
                },
                "gone": {"targets": [f"http://127.0.0.1:{dead}"]},
            },
        )
        out = io.StringIO()
        code = await asyncio.to_thread(cmd_check, str(path), out)
    text = out.getvalue()
    assert code == 1, text
    rows = {line.split()[0]: line for line in text.splitlines()[2:] if line.strip()}
    assert "GET /" in rows["plain"] and " up " in rows["plain"] and "status 200" in rows["plain"]
    assert "GET /status/503" in rows["checked"] and "DOWN" in rows["checked"]
    assert "GET /base " in rows["based"] and " up " in rows["based"]
    assert "DOWN" in rows["gone"] and "refused" in rows["gone"]
    assert "2 of 4 targets down" in text
    assert sorted(r.path for r in up.received) == ["/", "/base", "/status/503"]  # in parallel


async def test_check_passes_and_rejects_invalid_configs(tmp_path: Path) -> None:
    async with Upstream() as up:
        good = write(tmp_path, {"a": {"targets": [up.url]}})
        code, out, _ = await run_cli("check", "-c", str(good))  # the real command line
        assert code == 0, out
        assert "config ok (1 routes, 1 services)" in out
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({"version": 1, "servces": {}}))
        code, _, err = await run_cli("check", "-c", str(bad))
        assert code == 2 and "servces" in err


async def test_status_prints_services_instances_and_routes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with Upstream() as up, running_gateway(gateway_config(up.url), tmp_path) as gw:
        assert await proxy(gw, "GET", "/api/echo") == 200
        await admin(gw, "PUT", "/services/up/instances/extra-1", {"url": up.url})
        gw.extensions["metrics"].snapshot()
        url = f"http://127.0.0.1:{gw.admin_server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        out = io.StringIO()
        assert await asyncio.to_thread(cmd_status, url, TOKEN, out) == 0
        text = out.getvalue()
        assert f"127.0.0.1:{up.port}" in text and "extra-1" in text and "registered" in text
        assert "healthy" in text and "n/a" in text  # no breaker yet
        route_line = next(line for line in text.splitlines() if line.startswith("api "))
        assert "/api" in route_line and " up " in route_line

        assert await asyncio.to_thread(cmd_status, url, "wrong", io.StringIO()) == 1
        assert "refused the token given" in capsys.readouterr().err
        assert await asyncio.to_thread(cmd_status, url, "", io.StringIO()) == 1
        assert "needs a token: pass --token" in capsys.readouterr().err

        code, cli_out, _ = await run_cli("status", "--admin", url, "--token", TOKEN)
        assert code == 0 and "extra-1" in cli_out


async def test_status_when_the_gateway_is_not_there(capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    assert await asyncio.to_thread(cmd_status, url, "", io.StringIO()) == 1
    assert "cannot reach the admin API" in capsys.readouterr().err
