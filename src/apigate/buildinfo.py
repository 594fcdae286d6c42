"""Which build of apigate is running: the mypyc-compiled data plane or pure Python.

setup.py compiles the hot-path modules with mypyc when `APIGATE_COMPILE=1` (`make build`). In a
source checkout the compiled modules sit next to their .py files and Python prefers them, so a
.py edited after the last build is silently not what runs: `stale_modules()` finds those, the
gateway warns at start-up, and the test suite refuses to run on them.
"""

from __future__ import annotations

import importlib.util
import os
from importlib.machinery import EXTENSION_SUFFIXES

# The modules setup.py compiles (it reads this list): the per-request path.
HOT_PATH_MODULES = (
    "apigate.balancing.base",
    "apigate.balancing.consistent_hash",
    "apigate.balancing.ewma",
    "apigate.balancing.least_conn",
    "apigate.balancing.random_choice",
    "apigate.balancing.round_robin",
    "apigate.http.date",
    "apigate.http.errors",
    "apigate.http.headers",
    "apigate.http.output",
    "apigate.http.pool",
    "apigate.http.protocol",
    "apigate.http.request",
    "apigate.http.response_head",
    "apigate.http.status",
    "apigate.http.upstream",
    "apigate.observability.access_log_lines",
    "apigate.observability.series",
    "apigate.observability.trace_context",
    "apigate.plugins.cache_hit",
    "apigate.plugins.cache_store",
    "apigate.plugins.chain",
    "apigate.plugins.jwt_cache",
    "apigate.plugins.rate_limit_local",
    "apigate.plugins.response",
    "apigate.proxy.aggregate",
    "apigate.proxy.exchange",
    "apigate.proxy.heads",
    "apigate.registry.service",
    "apigate.resilience.circuit_breaker",
    "apigate.resilience.retry",
    "apigate.routing.matcher",
    "apigate.routing.normalize",
    "apigate.runtime",
)


def _origin(module: str) -> str | None:
    spec = importlib.util.find_spec(module)
    return spec.origin if spec is not None else None


def compiled_modules() -> list[str]:
    """The hot-path modules that will be (or were) imported from a compiled extension."""
    return [m for m in HOT_PATH_MODULES if (_origin(m) or "").endswith(tuple(EXTENSION_SUFFIXES))]


def build_name() -> str:
    """'compiled (mypyc)', 'partly compiled (n of m modules)' or 'pure Python'."""
    n = len(compiled_modules())
    if n == len(HOT_PATH_MODULES):
        return "compiled (mypyc)"
    if n:
        return f"partly compiled ({n} of {len(HOT_PATH_MODULES)} modules)"
    return "pure Python"


def stale_modules() -> list[str]:
    """Compiled modules whose .py source changed after they were built (source checkouts)."""
    stale = []
    for module in compiled_modules():
        origin = _origin(module)
        if origin is None:
            continue
        source = os.path.join(os.path.dirname(origin), module.rsplit(".", 1)[1] + ".py")
        if os.path.exists(source) and os.path.getmtime(source) > os.path.getmtime(origin):
            stale.append(module)
    return stale
