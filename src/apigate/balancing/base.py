"""Upstream instances and the balancer interface.

An `Instance` is one address of a service (static target, self-registered, or found by DNS).
Its mutable fields (health, draining, in-flight, latency) change in place: the data plane reads
them on every pick, the control plane (registry, health checks) writes them. A `Balancer` keeps
the list of *available* instances (healthy, not draining, weight > 0); whoever changes health or
membership calls `refresh()` so that `pick()` stays a cheap operation on a precomputed list.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable
from typing import Any, ClassVar, Literal

Origin = Literal["static", "registered", "dns"]


class Instance:
    """One reachable address of a service."""

    __slots__ = (
        "_ewma_stamp",
        "base_path",
        "draining",
        "ewma_latency",
        "expires_at",
        "failures",
        "healthy",
        "held_out",
        "host",
        "id",
        "in_flight",
        "metadata",
        "origin",
        "port",
        "registered_at",
        "scheme",
        "url",
        "weight",
    )

    def __init__(
        self,
        id: str,
        url: str,
        host: str,
        port: int,
        *,
        weight: int = 1,
        origin: Origin = "static",
        scheme: str = "http",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.id = id
        self.url = url
        self.host = host
        self.port = port
        self.scheme = scheme
        self.weight = weight
        self.origin: Origin = origin
        self.metadata: dict[str, Any] = metadata or {}
        self.healthy = True
        self.draining = False
        self.in_flight = 0
        self.failures = 0  # consecutive failed requests (passive health)
        self.held_out = False  # active health checks say unhealthy: passive timers must not readmit
        self.base_path = ""  # a target URL's path ("http://h:1/api" -> "/api"), put before paths
        self.expires_at: float | None = None  # monotonic deadline for a registered TTL
        self.registered_at = time.time()
        # Peak-EWMA state (seconds); 0 means "no sample yet".
        self.ewma_latency = 0.0
        self._ewma_stamp = 0.0

    @property
    def available(self) -> bool:
        return self.healthy and not self.draining and self.weight > 0

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "unhealthy"
        if self.draining:
            state += ", draining"
        return (
            f"<Instance {self.id} {self.host}:{self.port} w={self.weight} "
            f"{state} in_flight={self.in_flight} origin={self.origin}>"
        )


class Balancer(ABC):
    """Chooses an instance per request among the available ones.

    `pick` is on the hot path and must not allocate more than it needs; `refresh` runs on the
    control plane whenever membership, weight or health changes.
    """

    name: ClassVar[str] = "base"  # (ClassVar: compiled by mypyc, a plain default is per instance)

    def __init__(self, instances: Iterable[Instance] = ()) -> None:
        self.instances: list[Instance] = list(instances)
        self.available: list[Instance] = []
        self.refresh()

    def set_instances(self, instances: Iterable[Instance]) -> None:
        self.instances = list(instances)
        self.refresh()

    def refresh(self) -> None:
        """Recompute the available set; subclasses extend this to rebuild their own tables."""
        self.available = [i for i in self.instances if i.available]

    @abstractmethod
    def pick(self, key: str | None = None, exclude: Collection[Instance] = ()) -> Instance | None:
        """Return an available instance not in `exclude`, or None when there is none.

        `key` is the hash key for consistent hashing (ignored by the others).
        """

    def on_start(self, instance: Instance) -> None:
        """A request was sent to `instance`."""
        instance.in_flight += 1

    def on_finish(self, instance: Instance, latency: float, ok: bool) -> None:
        """A request to `instance` finished after `latency` seconds (ok = no transport error)."""
        instance.in_flight -= 1

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {len(self.available)} available of {len(self.instances)}>"
