"""Recent control-plane events (registrations, health transitions, breaker changes, DNS
answers, config changes) for the admin API.

Each event is kept in a bounded ring so that `GET /events` and the dashboard can show what
happened lately without a log pipeline, and logged as structured JSON through the logger of
the component it is about, so that per-component levels (`--log-level
warning,apigate.registry=debug`) reach it:

    registration, service   apigate.registry
    health                  apigate.registry.health (as the active checker's own lines)
    breaker                 apigate.resilience
    dns                     apigate.dns (DNS discovery of a service's instances)
    upstream_dns            apigate.upstream.dns (names in a service's targets)
    config                  apigate.server (reloads of the file or the shared store, admin
                            API changes)
    anything else           apigate.events
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any

log = logging.getLogger("apigate.events")

# event kind -> the logger of its component (README, "Observability", lists these names)
EVENT_LOGGERS: dict[str, logging.Logger] = {
    kind: logging.getLogger(name)
    for kind, name in {
        "registration": "apigate.registry",
        "service": "apigate.registry",
        "health": "apigate.registry.health",
        "breaker": "apigate.resilience",
        "dns": "apigate.dns",
        "upstream_dns": "apigate.upstream.dns",
        "config": "apigate.server",
    }.items()
}


class EventLog:
    def __init__(self, size: int = 500) -> None:
        self._events: deque[dict[str, Any]] = deque(maxlen=size)
        self._seq = 0

    def record(self, kind: str, message: str, level: int = logging.INFO, **fields: Any) -> None:
        self._seq += 1
        event = {"seq": self._seq, "time": time.time(), "kind": kind, "message": message, **fields}
        self._events.append(event)
        logger = EVENT_LOGGERS.get(kind, log)
        logger.log(level, message, extra={"event": kind, **fields})

    def recent(self, since: int = 0, limit: int = 100) -> list[dict[str, Any]]:
        out = [e for e in self._events if e["seq"] > since]
        return out[-limit:]

    def __len__(self) -> int:
        return len(self._events)


EVENTS = EventLog()
