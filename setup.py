"""The build of the `outrider` package: pyproject.toml says everything but this.

The agent's per-request modules (pyproject.toml, `[tool.outrider] compiled`) are
compiled to C extensions by mypyc: the same code, type-checked as it is, run without
the interpreter's per-call cost (bench/compiled_ab.py measures what that saves). An
extension imports in place of its .py file, which ships beside it. One small C
extension, identity/_ec_methods.c, is the callback identity.openssl_engine gives
OpenSSL. The build needs mypy (it brings mypyc) and a C compiler; OUTRIDER_PURE=1
builds pure Python, as does a machine without a C compiler (with a warning: the agent
works, at more CPU per request and handshake).
"""

from __future__ import annotations

import os
import shutil
import sys
import sysconfig
import tomllib
from pathlib import Path

from setuptools import Extension, setup

ROOT = Path(__file__).resolve().parent


def compiled_modules() -> list[str]:
    """The .py files mypyc compiles, as pyproject.toml lists them."""
    with open(ROOT / "pyproject.toml", "rb") as f:
        return list(tomllib.load(f)["tool"]["outrider"]["compiled"])


def extensions() -> list[object]:
    if os.environ.get("OUTRIDER_PURE"):
        return []
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        print(
            f"outrider: no C compiler ({compiler}): the agent is built as pure Python, which "
            "costs more CPU per request (install gcc, or set OUTRIDER_PURE=1 to say so)",
            file=sys.stderr,
        )
        return []
    from mypyc.build import mypycify

    hot_path: list[object] = mypycify(compiled_modules(), group_name="agent.hotpath")
    # identity.openssl_engine's callback, which OpenSSL calls without the GIL
    return [*hot_path, Extension("identity._ec_methods", ["identity/_ec_methods.c"])]


setup(ext_modules=extensions())
