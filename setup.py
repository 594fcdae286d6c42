"""Optional ahead-of-time compilation of the data plane with mypyc.

Everything else about the package is in pyproject.toml. With `APIGATE_COMPILE=1`, the modules
listed in `apigate.buildinfo.HOT_PATH_MODULES` are compiled to C extensions by mypyc (mypy's
compiler: the same typed Python source, run as native code). They are the per-request path;
compiling them roughly halves the gateway's own Python cost per request (bench/micro.py)
without a second implementation to keep in step. Without the variable apigate is pure Python
and behaves the same; the Makefile's test target runs the tests on both builds.

    APIGATE_COMPILE=1 python setup.py build_ext --inplace   # what `make build` does
    APIGATE_COMPILE=1 pip wheel .                           # a compiled wheel
"""

from __future__ import annotations

import os
import sys

from setuptools import setup


def compiled_sources() -> list[str]:
    """The per-request path, listed in apigate.buildinfo (one list for the build and for
    `apigate --version`). These modules must type-check under mypy --strict (mypyc enforces the
    annotations at run time) and avoid what mypyc cannot compile (see
    https://mypyc.readthedocs.io/en/stable/differences_from_python.html)."""
    sys.path.insert(0, "src")
    from apigate.buildinfo import HOT_PATH_MODULES

    return ["src/" + module.replace(".", "/") + ".py" for module in HOT_PATH_MODULES]


def ext_modules() -> list[object]:
    if os.environ.get("APIGATE_COMPILE", "") not in ("1", "true", "yes"):
        return []
    from mypyc.build import mypycify  # only needed (and installed) when compiling

    return list(mypycify(compiled_sources(), opt_level="3"))


setup(ext_modules=ext_modules())
