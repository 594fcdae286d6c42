"""Gateway.shutdown without sockets: a second stop signal means "now", whenever it comes."""

from __future__ import annotations

import asyncio
import signal
from typing import Any

from apigate.config.schema import GatewayConfig
from apigate.server import Gateway


class BusyConnection:
    """A client connection with a request in flight (what the drain waits for)."""

    current = object()
    tunnel = None

    def __init__(self) -> None:
        self.aborted = False

    def close(self) -> None:
        raise AssertionError("a busy connection is not closed as idle")

    def abort(self) -> None:
        self.aborted = True


async def test_a_second_stop_signal_during_the_stop_hooks_is_not_lost() -> None:
    """The second signal came while the stop hooks ran (a cluster's Redis client closing, a
    worker's supervisor dying meanwhile): the drain deadline was set after the hooks, over
    the "now", and the gateway waited out the whole drain timeout."""
    doc: dict[str, Any] = {
        "listeners": {"proxy": {"address": "127.0.0.1:0"}, "admin": None},
        "limits": {"drain_timeout": "30s"},
    }
    gw = Gateway(GatewayConfig.model_validate(doc))
    busy = BusyConnection()
    gw.connections.add(busy)  # type: ignore[arg-type]
    gw.signals_ready()

    async def second_signal(gateway: Gateway) -> None:
        gateway._on_signal(signal.SIGTERM)  # draining already: "stop now"

    gw.on_stop.append(second_signal)
    gw._on_signal(signal.SIGTERM)
    await asyncio.wait_for(gw.wait_stopped(), 5)  # not the 30 s drain
    assert busy.aborted
