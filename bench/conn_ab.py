"""CPU per new connection of the real agent pair, two checkouts compared in the same run.

    python -m bench.conn_ab BEFORE_DIR AFTER_DIR [--rounds 6] [--seconds 3]
                            [--kinds full,resumed] [--connections 50]

Each DIR is a checkout of this repository, built as it ships (hot path compiled). For
each, a child process started in that checkout runs the `new_conn` pair and the
`new_conn_resumed` pair (bench/peers.py: CA, nginx backend, a client and a server agent,
TLS resumption off and on) with that checkout's code; then wrk's new connection per
request (bench/load.py, `Connection: close`) goes to one pair and then the other, round
after round, in alternating order, so whatever else the machine runs falls on both
alike. Each run prints conn/s and each agent's CPU (user + system) per connection, in
microseconds: everything one connection costs it (accept, handshake, peer checks,
the app's or the upstream's dial, the relayed request, the close); the medians at the
end.

conn/s on a shared 2-CPU machine moves with everything else running; CPU per
connection is what tells a change to the agents' own cost from that noise.
`--pids` prints each pair's agent PIDs as it starts, to profile them meanwhile
(`py-spy record --native --pid PID`, `perf record -g -p PID`).
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
KINDS = ("full", "resumed")


def serve(kinds: list[str], connections: int) -> None:
    """The child: start the pairs from this checkout, then answer `go KIND SECONDS` lines."""
    from bench import peers
    from bench.load import wrk
    from bench.procs import cpu_seconds
    from tests.support import ca_process, make_ca_setup

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="outrider-connab-") as tmp:
        root = Path(tmp)
        setup = make_ca_setup(root)
        ca = stack.enter_context(ca_process(setup.config))
        backend_port, _ = peers.backend(stack, root / "backend")
        pairs = {
            kind: peers.outrider(stack, setup, ca, backend_port, resumed=kind == "resumed")
            for kind in kinds
        }
        for pair in pairs.values():
            wrk(pair.port, 1, connections, close=True)  # warm: first handshakes, sessions
        pids = {kind: {role: pair.pids[role] for role in ROLES} for kind, pair in pairs.items()}
        print("ready " + json.dumps(pids), flush=True)
        for line in sys.stdin:
            _, kind, seconds = line.split()
            pair = pairs[kind]
            before = {role: cpu_seconds(pair.pids[role]) for role in ROLES}
            load = wrk(pair.port, float(seconds), connections, close=True)
            result: dict[str, float] = {"per_s": load.per_s, "errors": load.errors}
            for role in ROLES:
                user, system = cpu_seconds(pair.pids[role])
                made = max(load.requests, 1)
                result[role] = (user + system - sum(before[role])) * 1e6 / made
                result[f"{role}_user"] = (user - before[role][0]) * 1e6 / made
            print(json.dumps(result), flush=True)


def _child(checkout: Path, kinds: list[str], connections: int) -> subprocess.Popen[str]:
    # This file, run as a script, so a checkout from before it existed can be compared:
    # everything it imports comes from `checkout`.
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, str(Path(__file__).resolve()), "--serve"]
    command += ["--kinds", ",".join(kinds), "--connections", str(connections)]
    return subprocess.Popen(
        command, cwd=checkout, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def _line(stream: IO[str] | None) -> str:
    assert stream is not None
    return stream.readline()


def compare(
    checkouts: list[Path],
    rounds: int,
    seconds: float,
    kinds: list[str],
    connections: int = 50,
    show_pids: bool = False,
) -> dict[str, dict[str, float]]:
    """Print each run and the medians; return the medians by "kind i:checkout" then key."""
    names = [f"{i}:{c.name}" for i, c in enumerate(checkouts)]
    children = [_child(c, kinds, connections) for c in checkouts]
    medians: dict[str, dict[str, float]] = {}
    try:
        for name, child in zip(names, children, strict=True):
            ready = _line(child.stdout)
            if not ready.startswith("ready"):
                raise RuntimeError(f"{name}: the pairs did not start")
            if show_pids:
                print(f"{name:24} pids {ready.split(maxsplit=1)[1].strip()}", flush=True)
        runs: dict[str, list[dict[str, float]]] = {f"{k} {n}": [] for k in kinds for n in names}
        for number in range(rounds):
            order = list(zip(names, children, strict=True))
            for kind in kinds:
                for name, child in order if number % 2 == 0 else reversed(order):
                    assert child.stdin is not None
                    child.stdin.write(f"go {kind} {seconds}\n")
                    child.stdin.flush()
                    run = json.loads(_line(child.stdout))
                    runs[f"{kind} {name}"].append(run)
                    print(
                        f"{kind:8} {name:20} {run['per_s']:7.0f} conn/s  client"
                        f" {run['client']:6.0f} us (user {run['client_user']:5.0f})  server"
                        f" {run['server']:6.0f} us (user {run['server_user']:5.0f})"
                        f"  errors {run['errors']:.0f}",
                        flush=True,
                    )
        keys = ("client", "server", "client_user", "server_user", "per_s")
        for label, done in runs.items():
            medians[label] = {k: statistics.median(r[k] for r in done) for k in keys}
        print(f"medians of {rounds} rounds (CPU: us per connection; ratio to {names[0]}):")
        for kind in kinds:
            base = medians[f"{kind} {names[0]}"]
            for key in keys:
                cells = [
                    f"{name} {medians[f'{kind} {name}'][key]:7.0f}"
                    f" ({medians[f'{kind} {name}'][key] / base[key]:.3f})"
                    for name in names
                ]
                print(f"{kind:8} {key:12} " + "  ".join(cells))
        return medians
    finally:
        for child in children:
            if child.stdin is not None:
                child.stdin.close()
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.conn_ab", description=__doc__)
    parser.add_argument("checkouts", nargs="*", type=Path)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--pids", action="store_true", help="print the agents' PIDs")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    for kind in kinds:
        if kind not in KINDS:
            parser.error(f"--kinds {kind}: one of {', '.join(KINDS)}")
    if args.serve:
        serve(kinds, args.connections)
        return
    if not args.checkouts:
        parser.error("give one checkout or more to compare")
    checkouts = [c.resolve() for c in args.checkouts]
    compare(checkouts, args.rounds, args.seconds, kinds, args.connections, args.pids)


if __name__ == "__main__":
    main()
