"""What build is running: one home for the version every component reports.

`outrider --version`, `outrider_build_info` and `outrider_agent_info` all read
it here, so a binary never reports two versions.

The version is written here, not looked up in the installed package's metadata:
`importlib.metadata` brings zipfile, csv, email and importlib.resources with it,
0.7 MiB of every agent's idle RSS for one string. pyproject.toml reads it from here
(`[tool.setuptools.dynamic]`).
"""

from __future__ import annotations

import platform

VERSION = "0.1.0"
PYTHON = platform.python_version()
