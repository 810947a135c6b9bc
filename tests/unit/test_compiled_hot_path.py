"""The agent's hot path runs compiled where it ships: pyproject.toml lists the modules
mypyc compiles (setup.py), and `make test` builds them before the suite, so CI tests
the code the images run."""

from __future__ import annotations

import importlib
import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPILED = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["outrider"]["compiled"]


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


@pytest.mark.parametrize("path", COMPILED)
def test_each_compiled_module_is_an_agent_module_that_exists(path: str) -> None:
    assert path.startswith("agent/") and path.endswith(".py")
    assert (ROOT / path).is_file(), f"pyproject.toml lists {path}, which does not exist"


@pytest.mark.skipif(not os.environ.get("CI"), reason="a checkout may run pure (`make pure`)")
@pytest.mark.parametrize("path", COMPILED)
def test_ci_runs_the_hot_path_compiled(path: str) -> None:
    module = importlib.import_module(module_name(path))
    assert str(module.__file__).endswith(".so"), f"{path} ran as Python: run `make compiled`"
