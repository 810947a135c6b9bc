"""Where a real agent pair's CPU goes, by agent module: what compiling a module can save.

    python -m bench.interp_share [--layer l4|l7|grpc] [--seconds 4] [--rate 200]

Starts the pair of bench/l7_pair_ab.py's `--layer` (from this checkout, or whatever
PYTHONPATH puts first: a build of bench/compiled_ab.py) and samples both agents with
`py-spy --native` while the load runs. For each sample the innermost Python frame is
its module; the sample is that module's own (interpreter) time when nothing below that
frame is outside the interpreter (CPython's eval loop and its helpers: what mypyc
replaces by C), and C time (OpenSSL, uvloop, the kernel's syscalls, llhttp) otherwise.
It prints, per agent, the share of samples that are each agent module's interpreter
time: the most that compiling that module can save of the agent's CPU at that layer
(mypyc keeps the calls it makes; a native class and direct calls save a part of the
rest), set beside bench.compiled_ab's A/B, which measures what it does save.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
from contextlib import ExitStack
from pathlib import Path

#: A native frame that is the interpreter itself (not a C library it calls).
_INTERPRETER = re.compile(r"\((?:python3?[.\d]*|libpython[^)]*)\)$|^_?Py|^PyEval|^_PyEval")
_PY_FRAME = re.compile(r"^(?P<name>\S+) \((?P<file>[^:()]+\.py):\d+\)$")


def shares(raw: str) -> tuple[int, collections.Counter[str]]:
    """Samples in all, and per module (`agent/...py`, or `other python` and `C`) the
    samples that were its interpreter time."""
    total, mine = 0, collections.Counter[str]()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        below_python = True
        module = "C"
        for frame in reversed(frames):  # innermost first
            match = _PY_FRAME.match(frame)
            if match is not None:
                file = match["file"]
                where = file[file.rfind("agent/") :] if "agent/" in file else "other python"
                module = where if below_python else "C"
                break
            if not _INTERPRETER.search(frame):
                below_python = False
        mine[module] += n
    return total, mine


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.interp_share", description=__doc__)
    parser.add_argument("--layer", choices=("l4", "l7", "grpc"), default="l4")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rate", type=int, default=200)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--keep", type=Path, help="a directory to keep py-spy's raw stacks in")
    args = parser.parse_args(argv)
    from bench import grpc_calls, peers
    from bench.load import Load, wrk
    from tests.support import ca_process, make_ca_setup

    pyspy = Path(sys.executable).parent / "py-spy"
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="outrider-share-") as tmp:
        root = Path(tmp)
        setup = make_ca_setup(root)
        ca = stack.enter_context(ca_process(setup.config))

        def load(at: int, seconds: float) -> Load:
            if args.layer == "grpc":
                return grpc_calls.load(at, seconds, grpc_calls.STREAMS)
            return wrk(at, seconds, 50)

        if args.layer == "grpc":
            port, _ = grpc_calls.backend(stack, root / "grpc-backend")
        else:
            port, _ = peers.backend(stack, root / "backend")
        pair = peers.outrider(stack, setup, ca, port, layer=args.layer)
        load(pair.port, 1)  # warm
        thread = threading.Thread(target=load, args=(pair.port, args.seconds + 2))
        thread.start()
        records = {}
        try:
            for role in ("client", "server"):
                out = (args.keep or root) / f"{args.layer}-{role}.txt"
                command = [str(pyspy), "record", "--native", "-r"]
                command += [str(args.rate), "-d", f"{args.seconds:.0f}", "--format", "raw"]
                command += ["-o", str(out), "-p", str(pair.pids[role])]
                records[role] = (subprocess.Popen(command, stdout=subprocess.DEVNULL), out)
            for process, _ in records.values():
                process.wait(timeout=args.seconds + 60)
        finally:
            thread.join(timeout=args.seconds + 60)
        for role, (_, out) in records.items():
            total, mine = shares(out.read_text())
            print(f"{args.layer} {role} agent: {total} samples ({os.path.basename(str(out))})")
            for module, n in mine.most_common(args.top):
                print(f"  {100 * n / max(total, 1):5.1f}%  {module}")


if __name__ == "__main__":
    main()
