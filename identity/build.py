"""What build is running: one home for the version every component reports.

`outrider --version`, `outrider_build_info` and `outrider_agent_info` all read
it here, so a binary never reports two versions.
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version


def _version() -> str:
    try:
        return version("outrider")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


VERSION = _version()
PYTHON = platform.python_version()
