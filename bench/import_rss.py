"""Resident memory per import: run a command with every first import's RSS growth noted.

    python -c "import bench.import_rss as m; m.run()" -m outrider agent run --config A.yaml

(bench/agent_memory.py runs the agent this way.) Wraps `builtins.__import__`: each
import statement that loads something new is timed in RSS (/proc/self/statm) from
its start to its end; a module's own share is that minus what the imports inside it
loaded. At exit (SIGTERM ends the agent cleanly) the records go, as JSON, to the file
named by OUTRIDER_IMPORT_RSS. `importlib.import_module` calls are not wrapped: what
they load counts towards the import statement around them.
"""

from __future__ import annotations

import atexit
import builtins
import json
import os
import runpy
import sys
from typing import Any

_PAGE = os.sysconf("SC_PAGE_SIZE")
_original = builtins.__import__
_open: list[list[int]] = []  # per import in progress: [RSS its child imports added]
_records: list[dict[str, Any]] = []  # in the order each import ended


def _rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * _PAGE


def _absolute(name: str, globals_: Any, level: int) -> str:
    if level == 0 or not globals_:
        return name
    package = globals_.get("__package__") or globals_.get("__name__", "")
    base = package.rsplit(".", level - 1)[0] if level > 1 else package
    return f"{base}.{name}" if name else base


def _import(
    name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0
) -> Any:
    loaded = len(sys.modules)
    before = _rss()
    _open.append([0])
    try:
        return _original(name, globals, locals, fromlist, level)
    finally:
        children = _open.pop()[0]
        if len(sys.modules) > loaded:
            grown = _rss() - before
            _records.append(
                {
                    "module": _absolute(name, globals, level),
                    "depth": len(_open),
                    "inclusive": grown,
                    "self": grown - children,
                    "new_modules": len(sys.modules) - loaded,
                }
            )
            if _open:
                _open[-1][0] += grown


def _dump() -> None:
    path = os.environ.get("OUTRIDER_IMPORT_RSS")
    if path:
        with open(path, "w") as out:
            json.dump(
                {
                    "start": _START,
                    "records": _records,
                    "end": _rss(),
                    "modules": sorted(sys.modules),
                },
                out,
            )


_START = _rss()


def run() -> None:
    """Run `-m MODULE ARGS...` (what follows in sys.argv) with imports measured."""
    builtins.__import__ = _import
    atexit.register(_dump)
    if sys.argv[1:2] != ["-m"] or len(sys.argv) < 3:
        raise SystemExit("usage: ... -m MODULE [ARGS...]")
    module = sys.argv[2]
    sys.argv = [module, *sys.argv[3:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
