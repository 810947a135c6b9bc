"""Every component reports the version the package is built as: pyproject.toml reads it
from identity.build, its one home (looking it up in the installed metadata at run time cost
each agent 0.7 MiB of imports)."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_reported_version_is_the_packages() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "identity.build.VERSION"
    }
