"""A callback every N seconds on the event loop, for once-a-second housekeeping.

The `Date` header, the access log and trace flushes, and the metrics snapshots all tick once a
second; a rescheduling `call_later` costs less than a task sleeping in a loop and stops with one
`cancel`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Periodic:
    __slots__ = ("_fn", "_handle", "_interval", "_loop")

    def __init__(self, fn: Callable[[], None], interval: float = 1.0) -> None:
        self._fn = fn
        self._interval = interval
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop()
        self._loop = loop
        self._handle = loop.call_later(self._interval, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        self._handle = self._loop.call_later(self._interval, self._tick)
        self._fn()

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    @property
    def running(self) -> bool:
        return self._handle is not None
