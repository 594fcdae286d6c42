"""The `Date` header, refreshed once a second rather than formatted per response (as uvicorn)."""

from __future__ import annotations

import asyncio
import time
from email.utils import formatdate


class DateHeader:
    __slots__ = ("_handle", "value")

    def __init__(self) -> None:
        self.value = b""
        self._handle: asyncio.TimerHandle | None = None
        self._refresh()

    def _refresh(self) -> None:
        self.value = b"Date: " + formatdate(time.time(), usegmt=True).encode() + b"\r\n"

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        def tick() -> None:
            self._refresh()
            self._handle = loop.call_later(1.0, tick)

        self._handle = loop.call_later(1.0, tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


DATE = DateHeader()
