"""Attach the control-plane subsystems to a gateway before it starts.

Each subsystem (config store + admin API, metrics, the node view of `--workers N`, dashboard,
registry TTLs, the cluster sync of `store: redis://`, DNS discovery, active health checks)
registers its start/stop hooks on the `Gateway` here, so `server.py` stays about listeners and
snapshots. Order matters: the admin store first (it may change the effective config), then the
registry and the cluster sync that shares it, then discovery and health, which watch the
services the others create.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apigate.server import Gateway

Attach = Callable[["Gateway"], Awaitable[None]]


def _attachers() -> list[Attach]:
    from apigate.admin.dashboard import attach_dashboard
    from apigate.admin.server import attach_admin
    from apigate.admin.workers import attach_workers
    from apigate.observability.metrics import attach_metrics
    from apigate.registry.dns import attach_dns
    from apigate.registry.health import attach_health
    from apigate.registry.registry import attach_registry
    from apigate.store.cluster import attach_cluster

    return [
        attach_admin,
        attach_metrics,
        attach_workers,
        attach_dashboard,
        attach_registry,
        attach_cluster,
        attach_dns,
        attach_health,
    ]


async def attach_extensions(gateway: Gateway) -> None:
    """Wire every control-plane subsystem into `gateway`."""
    for attach in _attachers():
        await attach(gateway)
