"""The `Date` header, refreshed once a second rather than formatted per response (as uvicorn),
and with it the wall clock's offset from the monotonic one, so that a request's wall-clock
start (for its log line) costs no clock reading of its own."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from typing import Final

from apigate.periodic import Periodic


class DateHeader:
    __slots__ = ("_ticker", "ticking", "value", "wall_offset")

    def __init__(self) -> None:
        self.value = b""
        self.wall_offset = 0.0  # time.time() - time.monotonic(), as of the latest refresh
        self.ticking = False  # refreshed every second (only then is wall_offset current)
        self._ticker = Periodic(self._refresh)
        self._refresh()

    def _refresh(self) -> None:
        now = time.time()
        self.wall_offset = now - time.monotonic()
        self.value = b"Date: " + formatdate(now, usegmt=True).encode() + b"\r\n"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._refresh()
        self._ticker.start(loop)
        self.ticking = True

    def stop(self) -> None:
        self._ticker.stop()
        self.ticking = False


DATE: Final = DateHeader()
