"""The dashboard in a real headless Chromium, against a real gateway with an admin token.

The page asks for the token (without a failing request), then shows the services and their
instances, routes with live numbers and charts, and picks up an instance registered through
the admin API while it is open. Any console error, page error or failed request fails the
test. The screenshot is kept at test-artifacts/dashboard.png.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

from tests.integration.test_observability_metrics import (
    TOKEN,
    admin,
    admin_port,
    gateway_config,
    proxy,
)
from tests.support.browser import chromium_page
from tests.support.gateway import running_gateway
from tests.support.upstream import Upstream


def dashboard_config(upstream_url: str) -> dict[str, Any]:
    """The test sends 5xx on purpose (error-rate chart): no passive ejection."""
    cfg = gateway_config(upstream_url)
    cfg["services"]["up"]["health"] = {"passive": None}
    return cfg


async def test_page_and_assets_are_public_data_is_not(tmp_path: Path) -> None:
    async with (
        Upstream() as up,
        running_gateway(gateway_config(up.url), tmp_path) as gw,
    ):
        status, headers, body = await admin(gw, "GET", "/", token=None)
        assert status == 200 and headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in headers["content-security-policy"]
        assert b"/static/app.js" in body
        status, headers, _ = await admin(gw, "GET", "/static/app.js", token=None)
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        status, headers, _ = await admin(gw, "GET", "/static/app.css", token=None)
        assert status == 200 and headers["content-type"].startswith("text/css")
        status, _, body = await admin(gw, "GET", "/dashboard/auth", token=None)
        assert status == 200 and json.loads(body) == {"token_required": True}
        for path in ("/services", "/stats", "/events", "/static/other.js"):
            status, _, _ = await admin(gw, "GET", path, token=None)
            assert status == 401, path  # data (and unknown paths) still need the token


async def test_dashboard_in_a_real_browser(tmp_path: Path) -> None:
    async with (
        Upstream() as up,
        Upstream() as second,
        running_gateway(dashboard_config(up.url), tmp_path) as gw,
    ):
        status, _, _ = await admin(gw, "PUT", "/services/up/instances/reg-1", {"url": second.url})
        assert status == 201

        stop = asyncio.Event()

        async def traffic() -> None:  # live numbers for the charts while the page is open
            while not stop.is_set():
                await proxy(gw, "GET", "/api/echo")
                await proxy(gw, "GET", "/api/status/502")
                await asyncio.sleep(0.02)

        load = asyncio.create_task(traffic())
        try:
            async with chromium_page() as browser:
                page = browser.page
                await page.goto(f"http://127.0.0.1:{admin_port(gw)}/")
                await page.wait_for_selector("#token-panel:not([hidden])", timeout=5000)
                await page.fill("#token-input", TOKEN)
                await page.click("#token-form button[type=submit]")

                static = f'tr[data-instance="up/127.0.0.1:{up.port}"]'
                await page.wait_for_selector(static, timeout=5000)
                assert await page.inner_text(f"{static} .badge") == "healthy"
                assert "static" in await page.inner_text(static)
                registered = await page.inner_text('tr[data-instance="up/reg-1"]')
                assert "registered" in registered and second.url in registered
                assert "n/a" in await page.inner_text('article[data-service="up"] header')

                # registered while the page is open: shown at the next refresh (2 s)
                body = {"url": second.url, "weight": 3}
                status, _, _ = await admin(gw, "PUT", "/services/up/instances/late-2", body)
                assert status == 201
                late = await page.wait_for_selector('tr[data-instance="up/late-2"]', timeout=6000)
                assert late is not None and "3" in await late.inner_text()
                await page.wait_for_selector("#events li:has-text('late-2')", timeout=5000)

                route = await page.inner_text('#routes tr[data-route="api"]')
                assert "/api" in route and "up" in route
                await page.wait_for_function(
                    "document.querySelector('#routes tr[data-route=\"api\"] td:nth-child(4)')"
                    ".textContent !== '\\u2013'",  # the page's placeholder dash
                    timeout=5000,
                )
                assert await page.is_visible('#legend [data-legend="api"]')
                assert await page.evaluate("sessionStorage.getItem('apigate.admin.token')") == TOKEN
                shot = await browser.screenshot("dashboard.png")
                assert shot.stat().st_size > 10_000
                assert browser.problems == []
        finally:
            stop.set()
            await load
