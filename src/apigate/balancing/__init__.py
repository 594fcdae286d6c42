"""Load balancers: choose an upstream instance per request.

`make_balancer(kind, instances)` builds one by its config name; every balancer keeps its
decision tables precomputed in `refresh()` so that `pick()` stays O(1) or O(log n)
(least connections scans, O(n), see its module).
"""

from __future__ import annotations

from collections.abc import Iterable

from apigate.balancing.base import Balancer, Instance
from apigate.balancing.consistent_hash import ConsistentHashBalancer
from apigate.balancing.ewma import EwmaBalancer
from apigate.balancing.least_conn import LeastConnectionsBalancer
from apigate.balancing.random_choice import RandomBalancer
from apigate.balancing.round_robin import RoundRobinBalancer

BALANCERS: dict[str, type[Balancer]] = {
    cls.name: cls
    for cls in (
        RoundRobinBalancer,
        LeastConnectionsBalancer,
        RandomBalancer,
        EwmaBalancer,
        ConsistentHashBalancer,
    )
}


def make_balancer(kind: str, instances: Iterable[Instance]) -> Balancer:
    """A balancer of `kind` ("round_robin", "least_connections", "random", "ewma",
    "consistent_hash") over `instances`."""
    try:
        cls = BALANCERS[kind]
    except KeyError:
        known = ", ".join(sorted(BALANCERS))
        raise ValueError(f"unknown balancer {kind!r}; expected one of: {known}") from None
    return cls(instances)


__all__ = [
    "BALANCERS",
    "Balancer",
    "ConsistentHashBalancer",
    "EwmaBalancer",
    "Instance",
    "LeastConnectionsBalancer",
    "RandomBalancer",
    "RoundRobinBalancer",
    "make_balancer",
]
