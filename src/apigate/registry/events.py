"""Recent control-plane events (registrations, health transitions, reloads) for the admin API.

Each event is logged as structured JSON and kept in a bounded ring so that `GET /events` and the
dashboard can show what happened lately without a log pipeline.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

log = logging.getLogger("apigate.events")


class EventLog:
    def __init__(self, size: int = 500) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = 0

    def record(self, kind: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        self._seq += 1
        event = {"seq": self._seq, "time": time.time(), "kind": kind, "message": message, **fields}
        self._events.append(event)
        log.log(level, message, extra={"event": kind, **fields})

    def recent(self, since: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        out = [e for e in self._events if e["seq"] > since]
        return out[-limit:]

    def __len__(self) -> int:
        return len(self._events)


EVENTS = EventLog()
