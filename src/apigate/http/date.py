"""The `Date` header, refreshed once a second rather than formatted per response (as uvicorn)."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate
from typing import Final

from apigate.periodic import Periodic


class DateHeader:
    __slots__ = ("_ticker", "value")

    def __init__(self) -> None:
        self.value = b""
        self._ticker = Periodic(self._refresh)
        self._refresh()

    def _refresh(self) -> None:
        self.value = b"Date: " + formatdate(time.time(), usegmt=True).encode() + b"\r\n"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._ticker.start(loop)

    def stop(self) -> None:
        self._ticker.stop()


DATE: Final = DateHeader()
