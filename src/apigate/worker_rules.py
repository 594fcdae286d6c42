"""When `apigate run --workers N` may run N worker processes, and how many `auto` means.

N workers are N gateways on one port. Whatever a gateway keeps in its own memory is then kept N
times, once per worker, each seeing only the connections the kernel gave it. For most of that
state this is harmless (a cache answers a little less often, a circuit breaker learns a little
later), but two kinds would make the gateway wrong rather than slower:

- the in-memory store: an instance registered or a route changed through the admin API would
  reach the one worker that serves the admin listener, and the others would never hear of it;
- a rate limit counted in process: each worker would admit the limit's requests, so the node
  would admit N times what the config says.

`store: redis://` shares registrations, admin changes and (by default) rate-limit counters
between workers exactly as it does between the nodes of a cluster, so N > 1 requires it and
refuses any `rate_limit` whose own `store:` keeps its counters in process.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import Any

from apigate.config.schema import GatewayConfig

AUTO = "auto"


def parse_workers(text: str) -> int:
    """`--workers` value: a whole number >= 1, or `auto` (one per CPU this process may use)."""
    if text.strip().lower() == AUTO:
        return usable_cpus()
    try:
        count = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is neither a number nor 'auto'") from None
    if count < 1:
        raise ValueError(f"{count} workers: at least 1")
    return count


def usable_cpus() -> int:
    """CPUs this process may run on (a container's cpuset or `taskset` narrows it), else the
    machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # (not Linux)
        return max(1, os.cpu_count() or 1)


def multi_worker_problems(config: GatewayConfig, workers: int) -> list[str]:
    """Why `config` cannot run as `workers` processes (empty: it can), with what to do."""
    if workers <= 1:
        return []
    problems = []
    if not config.store.startswith(("redis://", "rediss://")):
        problems.append(
            f"--workers {workers} needs `store: redis://host:port/db` (this config has "
            f"store: {config.store}): each worker would keep its own registrations, admin "
            "changes and rate-limit counters, so an instance registered through the admin "
            f"API would reach one worker of {workers} and a rate limit would admit "
            f"{workers} times its requests. Point `store:` at a Redis (the workers then "
            "share all of it, as the nodes of a cluster do) or run with --workers 1."
        )
        return problems  # (every rate limit is in process then: one reason is enough)
    for where in local_rate_limits(config):
        problems.append(
            f"{where}: a rate_limit with `store: local` keeps its counters in each worker, "
            f"so with --workers {workers} it would admit {workers} times its requests. "
            "Remove its `store:` (it then counts in the gateway's Redis, shared by every "
            "worker) or run with --workers 1."
        )
    return problems


def local_rate_limits(config: GatewayConfig) -> Iterator[str]:
    """Where each `rate_limit` plugin that counts in process is (global, a route's, a
    consumer's), in the file's terms."""
    yield from _local_limits(config.plugins, config.store, "plugins")
    for index, route in enumerate(config.routes):
        yield from _local_limits(route.plugins, config.store, f"routes[{index}] ({route.name})")
    for consumer in config.consumers:
        yield from _local_limits(consumer.plugins, config.store, f"consumers.{consumer.name}")


def _local_limits(plugins: Mapping[str, Any], store: str, where: str) -> Iterator[str]:
    # The plugin's own rule decides where it counts (rate_limit.redis_url), so this check
    # cannot drift from what the plugin does.
    from apigate.config.errors import ConfigError
    from apigate.plugins.chain import plugin_class
    from apigate.plugins.rate_limit import RateLimitConfig, RateLimitPlugin, redis_url

    for name, raw in plugins.items():
        try:
            if not issubclass(plugin_class(name, where), RateLimitPlugin):
                continue
            if redis_url(RateLimitConfig.model_validate(dict(raw or {})), store) is None:
                yield f"{where}.{name}"
        except (ConfigError, ValueError):
            continue  # an invalid entry: compiling the config reports it, with its reasons
