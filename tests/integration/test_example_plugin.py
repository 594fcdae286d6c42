"""The README's "Writing a plugin": `apigate/examples/tenant_plugin.py` loaded by its dotted
path into a real gateway, each hook seen doing its job, and the CLI finding a module of the
user's own on PYTHONPATH (or saying it cannot)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from apigate.examples import tenant_plugin
from apigate.server import Gateway
from tests.integration.test_observability_metrics import admin, gateway_config, key, samples
from tests.support.gateway import raw_request, running_gateway
from tests.support.upstream import Upstream

PLUGIN = "apigate.examples.tenant_plugin:TenantPlugin"
OWN_PLUGIN = "mytenant:TenantPlugin"  # the same code as a user's module, outside the package


def config(upstream_url: str, allowed: list[str], plugin: str = PLUGIN) -> dict[str, Any]:
    return gateway_config(
        upstream_url,
        services={"orders": {"targets": [upstream_url]}},
        routes=[
            {
                "name": "orders",
                "match": {"paths": ["/orders"]},
                "service": "orders",
                "plugins": {
                    plugin: {"allowed": allowed},
                    # one request per tenant: the second one's 429 is made by a later plugin
                    "rate_limit": {"requests": 1, "per": "1m", "key": "header:X-Tenant"},
                },
            }
        ],
    )


async def get(gw: Gateway, tenant: str | None) -> tuple[int, dict[str, str], bytes]:
    head = "GET /orders HTTP/1.1\r\nHost: shop\r\nConnection: close\r\n"
    if tenant is not None:
        head += f"X-Tenant: {tenant}\r\n"
    raw = await raw_request(gw.proxy_port, head.encode() + b"\r\n", until_close=True)
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


async def test_each_hook_of_the_example_plugin_works_in_a_real_gateway(tmp_path: Path) -> None:
    async with Upstream() as up, running_gateway(config(up.url, ["acme"]), tmp_path) as gw:
        status, headers, body = await get(gw, None)
        assert status == 400  # on_request answered: the gateway's JSON error, with its id
        error = json.loads(body)
        assert error["error"] == "tenant_required"
        assert error["message"] == "the X-Tenant header is required"
        assert error["request_id"] == headers["x-request-id"]

        status, _, body = await get(gw, "initech")
        assert status == 403 and json.loads(body)["error"] == "unknown_tenant"
        assert up.received == []  # nothing refused reached the upstream

        status, headers, _ = await get(gw, "acme")
        assert status == 200
        assert headers["x-tenant"] == "acme"  # on_response
        assert up.received[-1].header("X-Gateway-Route") == "orders"  # on_upstream_request
        assert up.received[-1].header("X-Tenant") == "acme"

        status, headers, _ = await get(gw, "acme")
        assert status == 429  # rate_limit's own response, decorated by the plugin before it
        assert headers["x-tenant"] == "acme"
        assert len(up.received) == 1

        served = gw.env.shared["tenant.served"]
        assert served == Counter({"acme": 1})  # on_log: the 429 is no served request
        _, _, text = await admin(gw, "GET", "/metrics")
        refused = samples(text.decode())["apigate_tenant_refused_total"]
        assert refused == {key(route="orders", service=""): 2}

        # a reload builds a new instance of the plugin; its counts carry on (env.shared)
        assert gw.config_path is not None
        gw.config_path.write_text(yaml.safe_dump(config(up.url, ["acme", "globex"])))
        assert await gw.reload()
        status, headers, _ = await get(gw, "globex")
        assert status == 200 and headers["x-tenant"] == "globex"
        assert gw.env.shared["tenant.served"] is served
        assert served == Counter({"acme": 1, "globex": 1})


async def validate(config_path: Path, pythonpath: str | None) -> tuple[int, str]:
    """`apigate validate -c FILE` as a user runs it (the console script), from a directory
    that is not the repository."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    script = Path(sys.executable).parent / "apigate"
    proc = await asyncio.create_subprocess_exec(
        str(script),
        "validate",
        "-c",
        str(config_path),
        cwd=config_path.parent,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    return await proc.wait(), out.decode()


@pytest.mark.parametrize(
    ("on_path", "settings", "rc", "says"),
    [
        (True, {"allowed": ["acme"]}, 0, "ok (1 routes, 1 services)"),
        (
            False,
            {"allowed": ["acme"]},
            2,
            f"routes[0].plugins['{OWN_PLUGIN}']: cannot load plugin '{OWN_PLUGIN}': "
            "No module named 'mytenant'",
        ),
        (
            True,
            {"alowed": ["acme"]},
            2,
            f"routes[0].plugins['{OWN_PLUGIN}'].alowed: unknown key; did you mean 'allowed'?",
        ),
    ],
)
async def test_the_cli_loads_a_users_own_plugin_from_pythonpath(
    tmp_path: Path, on_path: bool, settings: dict[str, Any], rc: int, says: str
) -> None:
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    shutil.copy(tenant_plugin.__file__, plugins / "mytenant.py")
    cfg = config("http://127.0.0.1:9", [])
    cfg["routes"][0]["plugins"] = {OWN_PLUGIN: settings}
    path = tmp_path / "apigate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    status, output = await validate(path, str(plugins) if on_path else None)
    assert status == rc, output
    assert says in output
