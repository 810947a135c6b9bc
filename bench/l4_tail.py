"""Where the L4 keep-alive p99 comes from: wrk's figure, taken apart per request.

    python -m bench.l4_tail [--rounds 4] [--seconds 5] [--pairs outrider,envoy]

wrk (the `keepalive` scenario's load) corrects its latencies for coordinated
omission: at the end of a run it adds, for every request that took L, samples
at L - i, L - 2i, ... down to 2i, where i is the run's time divided by the
requests per connection (about 2 ms at 24k req/s over 50 connections). Its
p99 is then the value V at which the requests' time above V, summed and
divided by i, makes 1% of all samples: in a 5 s run, about 2.7 s of
request-time above V. A few long waits move it as much as a thousand short
ones do.

The longest waits of a keep-alive run are its first requests: wrk opens its 50
connections at once, and each first request waits for its connection's two
mTLS handshakes (client agent to server agent), 50 of each side at once. This
runs the same closed loop with h2load, whose log has every request, applies
wrk's correction to it, and prints wrk's p99 as wrk would have, the same
without each connection's first request, and those first requests' latency
(mean, max): how much of the p99 is that burst of handshakes and how much the
steady state. Each pair's proxies are started as `make bench` starts them
(bench/peers.py); rounds alternate the pairs. Figures are wall-clock: on a
busy machine compare pairs of the same round.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from bench import peers
from bench.load import wrk
from tests.support import ca_process, make_ca_setup

CONNECTIONS = 50


def wrk_p99(latencies_us: list[int], connections: int, runtime_us: int) -> float:
    """wrk's p99 (ms) of these latencies, with its coordinated-omission correction
    (wrk.c's `stats_correct`: synthetic samples for every latency of twice the
    expected interval or more)."""
    counts = Counter(latencies_us)
    interval = runtime_us // max(len(latencies_us) // connections, 1)
    added: Counter[int] = Counter()
    for value, count in counts.items():
        synthetic = value - interval
        while synthetic > interval:
            added[synthetic] += count
            synthetic -= interval
    counts.update(added)
    wanted, seen = 0.99 * sum(counts.values()), 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= wanted:
            return value / 1000
    return 0.0


@dataclass(frozen=True)
class Run:
    per_s: float
    wrk_p99_ms: float  # as wrk would print it
    steady_p99_ms: float  # the same without each connection's first request
    raw_p99_ms: float  # without the correction
    first_mean_ms: float  # each connection's first request
    first_max_ms: float


def closed_loop(port: int, seconds: int, connections: int = CONNECTIONS) -> Run:
    """`connections` connections, one request at a time each (as wrk), every request logged."""
    with tempfile.TemporaryDirectory(prefix="outrider-l4-tail-") as tmp:
        log = Path(tmp) / "requests.tsv"
        command = ["h2load", "--h1", f"-c{connections}", "-m1", f"-D{seconds}", "-T5"]
        command += [f"--log-file={log}", f"http://127.0.0.1:{port}/api/items"]
        done = subprocess.run(
            ["taskset", "-c", "0", *command], capture_output=True, text=True, timeout=seconds + 30
        )
        if done.returncode != 0:
            raise RuntimeError(f"h2load exited {done.returncode}:\n{done.stdout}{done.stderr}")
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    by_start = sorted(
        (int(start), int(took)) for start, status, took, *_ in rows if status == "200"
    )
    if len(by_start) <= connections:
        raise RuntimeError(f"h2load completed {len(by_start)} requests:\n{done.stdout}")
    latencies = [took for _, took in by_start]
    first = [took / 1000 for took in latencies[:connections]]  # every connection starts at once
    runtime = seconds * 1_000_000
    return Run(
        len(latencies) / seconds,
        wrk_p99(latencies, connections, runtime),
        wrk_p99(latencies[connections:], connections, runtime),
        statistics.quantiles(latencies, n=100)[98] / 1000,
        statistics.mean(first),
        max(first),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.l4_tail", description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--pairs", default="outrider,envoy")
    args = parser.parse_args(argv)
    names = args.pairs.split(",")
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="outrider-l4-tail-") as tmp:
        root = Path(tmp)
        setup = make_ca_setup(root)
        ca = stack.enter_context(ca_process(setup.config))
        backend, _ = peers.backend(stack, root / "backend")
        ports = {}
        for name in names:
            pair = (
                peers.outrider(stack, setup, ca, backend)
                if name == "outrider"
                else peers.envoy(stack, setup, backend, "l4")
            )
            wrk(pair.port, 1, 10)  # first connections and handshakes, not counted
            ports[name] = pair.port
        runs: dict[str, list[Run]] = {name: [] for name in names}
        for number in range(args.rounds):
            for name in names if number % 2 == 0 else names[::-1]:
                run = closed_loop(ports[name], args.seconds)
                runs[name].append(run)
                print(f"round {number + 1} {name:9} {_row(run)}", file=sys.stderr, flush=True)
    print("medians:")
    for name, done in runs.items():
        fields = Run.__dataclass_fields__
        median = Run(*(statistics.median(getattr(run, f) for run in done) for f in fields))
        print(f"{name:9} {_row(median)}")


def _row(run: Run) -> str:
    return (
        f"{run.per_s:7.0f} req/s  p99 as wrk {run.wrk_p99_ms:7.2f} ms, without first requests"
        f" {run.steady_p99_ms:6.2f}, uncorrected {run.raw_p99_ms:6.2f} | first requests"
        f" mean {run.first_mean_ms:6.1f} max {run.first_max_ms:6.1f} ms"
    )


if __name__ == "__main__":
    main()
