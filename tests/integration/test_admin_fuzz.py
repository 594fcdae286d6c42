"""OpenAPI-driven fuzzing of the admin API (schemathesis): no input may produce a 500."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path

from tests.support.gateway import GatewayProcess, base_config
from tests.support.upstream import Upstream


async def test_schemathesis_finds_no_server_error(tmp_path: Path) -> None:
    cli = shutil.which("schemathesis") or str(Path(sys.executable).with_name("schemathesis"))
    async with Upstream() as up:
        cfg = base_config(
            listeners={"proxy": {"address": "127.0.0.1:0"}, "admin": {"address": "127.0.0.1:0"}},
            store=f"sqlite:///{tmp_path}/state.db",
            services={"hello": {"targets": [up.url]}},
            routes=[{"name": "hello", "match": {"paths": ["/"]}, "service": "hello"}],
        )
        async with GatewayProcess(cfg) as gw:
            proc = await asyncio.create_subprocess_exec(
                cli,
                "run",
                f"{gw.admin_url}/openapi.json",
                "--checks",
                "not_a_server_error",
                "--max-examples",
                "15",
                "--seed",
                "1234",
                "--request-timeout",
                "5",
                "--no-color",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                cwd=tmp_path,
            )
            out, _ = await asyncio.wait_for(proc.communicate(), 240)
            text = out.decode(errors="replace")
            assert proc.returncode == 0, text[-4000:]
            assert "Server error" not in text
            tested = re.search(r"Tested: (\d+)", text)
            generated = re.search(r"(\d+) generated", text)
            assert tested and int(tested.group(1)) >= 15, text[-2000:]
            assert generated and int(generated.group(1)) >= 500, text[-2000:]
            # the gateway is still healthy after the barrage
            health = [line for line in gw.stderr_lines if '"level": "error"' in line]
            assert health == [], health[:3]
