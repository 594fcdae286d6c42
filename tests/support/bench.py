"""Loading bench/'s modules in tests: bench/ is scripts run from their own directory, not a
package, so a module is loaded by its path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCH = Path(__file__).resolve().parents[2] / "bench"


def bench_module(name: str) -> ModuleType:
    """bench/NAME.py as a module named bench_NAME."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses and NamedTuples look their module up while they are made
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
