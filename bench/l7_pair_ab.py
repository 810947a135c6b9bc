"""CPU per request of the real agent pair, two checkouts compared in the same run.

    python -m bench.l7_pair_ab BEFORE_DIR AFTER_DIR [--rounds 8] [--seconds 4]
                               [--layer l7|l4|grpc|full|resumed] [--pids]

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

`--layer l4`: the `l4_keepalive` pair instead (TCP relayed over mTLS, wrk's keep-alive
requests through it); `--layer grpc`: the `grpc_streams` pair (bench/grpc_calls.py:
nghttpd behind two agents with `protocol: grpc` and the gRPC policy, h2load's 50 calls in
flight on one connection), CPU per call. `--layer full` / `resumed`: the `new_conn` /
`new_conn_resumed` pair (TLS resumption off / on) and a new connection per request
(wrk's `Connection: close`), CPU per connection: everything one costs each agent
(accept, handshake, peer checks, the dial, the relayed request, the close).
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
#: The layers that open a new connection per request: whether the agents resume sessions.
NEW_CONNECTIONS = {"full": False, "resumed": True}


def serve(layer: str) -> None:
    """The child: start the pair from this checkout, then answer `go SECONDS` lines."""
    from bench import peers
    from bench.load import Load, wrk
    from bench.procs import cpu_seconds
    from tests.support import ca_process, make_ca_setup

    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="outrider-l7ab-") as tmp:
        root = Path(tmp)
        setup = make_ca_setup(root)
        ca = stack.enter_context(ca_process(setup.config))
        if layer == "grpc":
            from bench import grpc_calls

            backend_port, _ = grpc_calls.backend(stack, root / "grpc-backend")

            def run(port: int, seconds: float) -> Load:
                return grpc_calls.load(port, seconds, grpc_calls.STREAMS)

        else:
            backend_port, _ = peers.backend(stack, root / "backend")
            close = layer in NEW_CONNECTIONS

            def run(port: int, seconds: float) -> Load:
                return wrk(port, seconds, 50, close=close)

        resumed = NEW_CONNECTIONS.get(layer, False)
        pair_layer = "l4" if layer in NEW_CONNECTIONS else layer
        pair = peers.outrider(stack, setup, ca, backend_port, layer=pair_layer, resumed=resumed)
        run(pair.port, 1)  # warm: the pool's connections made, sessions saved
        print("ready " + json.dumps(pair.pids), flush=True)
        for line in sys.stdin:
            seconds = float(line.split()[1])
            before = {role: cpu_seconds(pair.pids[role]) for role in ROLES}
            load = run(pair.port, seconds)
            result: dict[str, float] = {"per_s": load.per_s, "errors": load.errors}
            for role in ROLES:
                user, system = cpu_seconds(pair.pids[role])
                requests = max(load.requests, 1)
                result[role] = (user + system - sum(before[role])) * 1e6 / requests
                result[f"{role}_user"] = (user - before[role][0]) * 1e6 / requests
            print(json.dumps(result), flush=True)


def _child(checkout: Path, layer: str) -> subprocess.Popen[str]:
    # This file, run as a script, so a checkout from before it existed can be compared:
    # everything it imports comes from `checkout`.
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", "--layer", layer]
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
    layer: str = "l7",
    show_pids: bool = False,
) -> dict[str, dict[str, float]]:
    """Print each run and the medians; return the medians, by checkout's name then key."""
    names = [f"{i}:{c.name}" for i, c in enumerate(checkouts)]
    children = [_child(c, layer) for c in checkouts]
    unit = "conn/s" if layer in NEW_CONNECTIONS else "req/s"
    try:
        for name, child in zip(names, children, strict=True):
            ready = _line(child.stdout)
            if not ready.startswith("ready"):
                raise RuntimeError(f"{name}: the pair did not start")
            if show_pids:
                print(f"{name:24} pids {ready.split(maxsplit=1)[1].strip()}", flush=True)
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
                    f"{name:24} {run['per_s']:8.0f} {unit}  client {run['client']:6.1f} us"
                    f" (user {run['client_user']:5.1f})  server {run['server']:6.1f} us"
                    f" (user {run['server_user']:5.1f})  errors {run['errors']:.0f}",
                    flush=True,
                )
        keys = ("client", "server", "client_user", "server_user", "per_s")
        medians = {n: {k: statistics.median(r[k] for r in runs[n]) for k in keys} for n in names}
        first = names[0]
        for key in keys:
            base = medians[first][key]
            cells = [
                f"{name} {medians[name][key]:8.1f} ({medians[name][key] / base:.3f})"
                for name in names
            ]
            print(f"median {key:12} " + "  ".join(cells))
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
    parser = argparse.ArgumentParser(prog="python -m bench.l7_pair_ab", description=__doc__)
    parser.add_argument("checkouts", nargs="*", type=Path)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=4.0)
    layers = ("l7", "l4", "grpc", *NEW_CONNECTIONS)
    parser.add_argument("--layer", choices=layers, default="l7")
    parser.add_argument("--pids", action="store_true", help="print the agents' PIDs")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.layer)
        return
    if len(args.checkouts) < 2:
        parser.error("give two checkouts (or more) to compare")
    checkouts = [c.resolve() for c in args.checkouts]
    compare(checkouts, args.rounds, args.seconds, args.layer, args.pids)


if __name__ == "__main__":
    main()
