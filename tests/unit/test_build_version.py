"""Every component reports the version the package is built as: identity.build's, which
is pyproject.toml's (written in both, or pyproject reading it from identity.build; looking
it up in the installed metadata at run time cost each agent 0.7 MiB of imports)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from identity.build import VERSION

ROOT = Path(__file__).resolve().parents[2]


def test_the_reported_version_is_the_packages() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    if "version" in pyproject["project"].get("dynamic", []):
        dynamic = pyproject["tool"]["setuptools"]["dynamic"]["version"]
        assert dynamic == {"attr": "identity.build.VERSION"}
    else:
        assert pyproject["project"]["version"] == VERSION
