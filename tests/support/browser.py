"""A real headless browser for page tests: Debian's Chromium driven by Playwright for Python.

Playwright's own browser download (`playwright install`) is never used: the wheel's driver
launches `/usr/bin/chromium` (installed by `scripts/install-browser`) with the flags this
machine needs (no sandbox as root, no GPU, and no background networking, whose connections a
closed network refuses). A missing browser fails the test with what to run; it never skips.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = os.environ.get("APIGATE_CHROMIUM", "/usr/bin/chromium")
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


@dataclass
class BrowserPage:
    page: Any  # playwright.async_api.Page
    problems: list[str] = field(default_factory=list)  # console errors, page errors, failures

    async def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / name
        await self.page.screenshot(path=str(path), full_page=True)
        return path


def _require_browser() -> None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        found = shutil.which("chromium")
        hint = f" (a chromium is on PATH at {found}: set APIGATE_CHROMIUM)" if found else ""
        pytest.fail(
            f"Chromium not found at {CHROMIUM}{hint}: run scripts/install-browser "
            "(installs Debian's chromium package) and run the tests again",
            pytrace=False,
        )


@asynccontextmanager
async def chromium_page(width: int = 1280, height: int = 900) -> AsyncIterator[BrowserPage]:
    """A fresh page in a fresh headless Chromium that records every console error."""
    _require_browser()
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.fail(
            "playwright is not installed: pip install -e '.[test]' (the wheel brings its "
            "driver; the browser is the system's, never `playwright install`)",
            pytrace=False,
        )
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = await browser.new_page(viewport={"width": width, "height": height})
            result = BrowserPage(page)

            def on_console(message: Any) -> None:
                if message.type in ("error", "assert"):
                    result.problems.append(f"console.{message.type}: {message.text}")

            page.on("console", on_console)
            page.on("pageerror", lambda exc: result.problems.append(f"page error: {exc}"))
            page.on(
                "requestfailed",
                lambda req: result.problems.append(f"request failed: {req.method} {req.url}"),
            )
            yield result
        finally:
            await browser.close()
