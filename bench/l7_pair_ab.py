"""CPU per request of the real L7 agent pair, two checkouts compared in the same run.

    python -m bench.l7_pair_ab BEFORE_DIR AFTER_DIR [--rounds 8] [--seconds 4]

Each DIR is a checkout of this repository (e.g. `git worktree add /tmp/before main`).
For each, a child process started in that checkout runs the `l7_keepalive` setup
(bench/peers.py: CA, nginx backend, a client and a server agent with the 10-rule
policy) with that checkout's code; then wrk's 50 keep-alive connections (bench/load.py)
go to one pair and then the other, round after round, in alternating order, so
whatever else the machine runs falls on both alike. It prints each run and the
median CPU (user + system, and user alone) per request of each agent.

`l7_keepalive` in bench.run compares proxies' requests per second; on a shared
machine that moves with everything else running, and CPU per request moves with the
request rate too (fewer requests per wake-up cost more each). Alternating two
checkouts in one run is what tells a change to the agents' own cost from that noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import IO

ROLES = ("client", "server")


def serve() -> None:
    """The child: start the pair from this checkout, then answer `go SECONDS` lines."""
    from bench import peers
    from bench.load import wrk
    from bench.procs import cpu_seconds
    from tests.support import ca_process, make_ca_setup

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="outrider-l7ab-") as tmp:
        root = Path(tmp)
        setup = make_ca_setup(root)
        ca = stack.enter_context(ca_process(setup.config))
        backend_port, _ = peers.backend(stack, root / "backend")
        pair = peers.outrider(stack, setup, ca, backend_port, layer="l7")
        wrk(pair.port, 1, 50)  # warm: the pool's connections made
        print("ready", flush=True)
        for line in sys.stdin:
            seconds = float(line.split()[1])
            before = {role: cpu_seconds(pair.pids[role]) for role in ROLES}
            load = wrk(pair.port, seconds, 50)
            result: dict[str, float] = {"per_s": load.per_s, "errors": load.errors}
            for role in ROLES:
                user, system = cpu_seconds(pair.pids[role])
                requests = max(load.requests, 1)
                result[role] = (user + system - sum(before[role])) * 1e6 / requests
                result[f"{role}_user"] = (user - before[role][0]) * 1e6 / requests
            print(json.dumps(result), flush=True)


def _child(checkout: Path) -> subprocess.Popen[str]:
    # This file, run as a script, so a checkout from before it existed can be compared:
    # everything it imports comes from `checkout`.
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    return subprocess.Popen(
        command, cwd=checkout, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _line(stream: IO[str] | None) -> str:
    assert stream is not None
    return stream.readline()


def compare(checkouts: list[Path], rounds: int, seconds: float) -> None:
    names = [f"{i}:{c.name}" for i, c in enumerate(checkouts)]
    children = [_child(c) for c in checkouts]
    try:
        for name, child in zip(names, children, strict=True):
            if not _line(child.stdout).startswith("ready"):
                raise RuntimeError(f"{name}: the pair did not start")
        runs: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for number in range(rounds):
            order = list(zip(names, children, strict=True))
            for name, child in order if number % 2 == 0 else reversed(order):
                assert child.stdin is not None
                child.stdin.write(f"go {seconds}\n")
                child.stdin.flush()
                run = json.loads(_line(child.stdout))
                runs[name].append(run)
                print(
                    f"{name:24} {run['per_s']:8.0f} req/s  client {run['client']:6.1f} us"
                    f" (user {run['client_user']:5.1f})  server {run['server']:6.1f} us"
                    f" (user {run['server_user']:5.1f})  errors {run['errors']:.0f}",
                    flush=True,
                )
        first = names[0]
        for key in ("client", "server", "client_user", "server_user", "per_s"):
            base = statistics.median(run[key] for run in runs[first])
            cells = [
                f"{name} {statistics.median(r[key] for r in runs[name]):8.1f}"
                f" ({statistics.median(r[key] for r in runs[name]) / base:.3f})"
                for name in names
            ]
            print(f"median {key:12} " + "  ".join(cells))
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.l7_pair_ab", description=__doc__)
    parser.add_argument("checkouts", nargs="*", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve()
        return
    if len(args.checkouts) < 2:
        parser.error("give two checkouts (or more) to compare")
    compare([c.resolve() for c in args.checkouts], args.rounds, args.seconds)


if __name__ == "__main__":
    main()
