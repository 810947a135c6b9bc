"""A copy of this checkout with the L7 hot path compiled by mypyc, to measure what that buys.

    python -m bench.l7_compiled OUT_DIR
    python -m bench.l7_pair_ab . OUT_DIR          # the real pair, CPU per request
    (cd OUT_DIR && PYTHONPATH=. python -m bench.l7_micro)

The agent ships as pure Python. Of its L7 CPU per request about a quarter is the
kernel's (loopback reads and writes); of the rest, in a py-spy profile under load,
about 58% is the interpreter running agent/ (the per-request work of HTTP_MODULES),
20% TLS, 8% llhttp, 7% the event loop. mypyc (it comes
with mypy, a dev dependency; gcc and the Python headers build the result) compiles
those modules, type-checked as they are, to C extensions that import in place of
the .py files. This makes such a build in OUT_DIR, from the committed tree (`git
archive HEAD`), for measurement only: nothing here changes how the agent is built
or shipped, and OUT_DIR's extensions are stale as soon as a .py file changes.

What differs when compiled: mypyc checks annotated types at run time, so a wrong
type passed where the annotation forbids it raises TypeError where Python ran on
(tests/unit/agent/test_balancer.py's float and bool weights: 2 of tests/unit/agent's
1,237 tests); module-level Final constants are inlined (a test patching one sees no
effect); tracebacks stop at compiled frames.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What one HTTP/1.1 request runs through on the client and server agents.
HTTP_MODULES = (
    "agent/core/http1.py",
    "agent/core/httppath.py",
    "agent/core/policy.py",
    "agent/core/tries.py",
    "agent/core/health.py",
    "agent/core/upstream.py",
    "agent/core/balancer.py",
    "agent/core/resilience.py",
    "agent/adapters/http.py",
    "agent/adapters/outbound_http.py",
    "agent/adapters/attempts.py",
    "agent/adapters/pool.py",
)


def build(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out} is not empty: give a new directory")
    out.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "HEAD"], capture_output=True, check=True, timeout=120
    )
    subprocess.run(["tar", "-x", "-C", str(out)], input=archive.stdout, check=True, timeout=120)
    command = [sys.executable, "-c", "from mypyc.__main__ import main; main()", *HTTP_MODULES]
    env = {**os.environ, "PYTHONPATH": str(out)}
    subprocess.run(command, cwd=out, env=env, check=True, timeout=1200, capture_output=True)
    built = sorted(p.relative_to(out) for p in out.glob("agent/**/*.so"))
    print(f"{len(built)} modules compiled in {out}:", *built, sep="\n  ")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.l7_compiled", description=__doc__)
    parser.add_argument("out", type=Path)
    build(parser.parse_args(argv).out.resolve())


if __name__ == "__main__":
    main()
