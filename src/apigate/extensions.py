"""Attach the control-plane subsystems to a gateway before it starts.

Each subsystem (admin API, registry TTLs, health checks, DNS discovery, metrics) registers its
start/stop hooks on the `Gateway` here, so `server.py` stays about listeners and snapshots.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apigate.server import Gateway


async def attach_extensions(gateway: Gateway) -> None:
    """Wire every control-plane subsystem the config asks for into `gateway`."""
    for attach in _ATTACHERS:
        await attach(gateway)


_ATTACHERS: list = []  # type: ignore[type-arg]
