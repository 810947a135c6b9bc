"""Where the L4 keep-alive p99 comes from: wrk's figure, taken apart per request.

    python -m bench.l4_tail [--rounds 4] [--seconds 5] [--pairs outrider,envoy]
                            [--detail] [--bursts N]

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

The steady state taken apart (`--detail`, one line per pair and round):
  stalls    of the requests above the steady p99, the share that ended in a 2 ms
            window with at least half the connections' requests as late: the
            whole pipeline held up at once (a process off its CPU, a GC pass, a
            long loop turn), against requests late one by one
  per 1k    each proxy process's CPU ms, and its voluntary (it slept: its loop
            ran dry) and involuntary (preempted while it had work) context
            switches, per 1,000 requests
  foreign   CPUs busy with what is not this bench (another session's load): a
            round with much of it says little about latency

`--bursts N`: the first requests alone, N times per pair: 50 new connections at
once, one request each (h2load -n50), each request's latency from its connect
to its answer: the handshakes' share of the p99, measured without the rest; and
what each connection (accepted, two handshakes, a request, closed) cost each
proxy in CPU, which is what sets those latencies.

`--resumed`: both pairs resume TLS 1.3 sessions between their proxies, as in the
`new_conn_resumed` scenario (bench/peers.py): with `--rounds 0 --bursts 20`, what a
resumed connection costs each proxy, Outrider's beside Envoy's, from one run.

On a machine others share, Linux's autogroups give each session an equal share
of the CPUs, so another session's load takes half of them from this one. Run
in a session of its own with its group's nice value lowered, other sessions
fall mostly outside its rounds (as root; `foreign` says how much did not):

    setsid sh -c 'echo -15 > /proc/$$/autogroup; exec python -m bench.l4_tail --detail'
"""

from __future__ import annotations

import argparse
import os
import resource
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
from bench.procs import cpu_seconds, machine_busy_seconds
from tests.support import ca_process, make_ca_setup

CONNECTIONS = 50
#: Width (µs) of the windows requests are grouped in by when they ended (`stalled_share`).
WINDOW_US = 2000


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
    steady_p50_ms: float = 0.0  # uncorrected, without the first requests
    steady_p999_ms: float = 0.0
    stalled: float = 0.0  # share of the steady tail late all at once (stalled_share)
    foreign_cpus: float = 0.0  # CPUs busy with other sessions' work meanwhile


@dataclass(frozen=True)
class Cost:
    """A proxy process's CPU and context switches per 1,000 requests."""

    cpu_ms: float
    voluntary: float
    involuntary: float


def stalled_share(requests: list[tuple[int, int]], connections: int) -> float:
    """Of `requests` ((start, took) µs) above their p99, the share that ended in a
    WINDOW_US window where at least half of `connections` requests ended as late:
    the whole pipeline held up at once, not requests late one by one."""
    if len(requests) < 100:
        return 0.0
    threshold = sorted(took for _, took in requests)[int(0.99 * len(requests))]
    late = Counter((start + took) // WINDOW_US for start, took in requests if took >= threshold)
    total = sum(late.values())
    return sum(n for n in late.values() if n >= connections // 2) / total


def switches(pid: int) -> tuple[int, int]:
    """(voluntary, involuntary) context switches of a process, all its threads."""
    voluntary = involuntary = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            status = (task / "status").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        for line in status.splitlines():
            if line.startswith("voluntary_ctxt_switches:"):
                voluntary += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                involuntary += int(line.split()[1])
    return voluntary, involuntary


def _usage(pids: dict[str, int]) -> dict[str, tuple[float, int, int]]:
    return {role: (sum(cpu_seconds(pid)), *switches(pid)) for role, pid in pids.items()}


def closed_loop(
    port: int, seconds: int, connections: int = CONNECTIONS, ours: dict[str, int] | None = None
) -> tuple[Run, dict[str, Cost]]:
    """`connections` connections, one request at a time each (as wrk), every request logged;
    with the cost per request of each of `ours` (role -> pid: the proxies and backend,
    whose CPU, with the load generator's, is not foreign)."""
    ours = ours or {}
    before, machine = _usage(ours), machine_busy_seconds()
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = os.times().elapsed
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
    wall = os.times().elapsed - started
    after, machine = _usage(ours), machine_busy_seconds() - machine
    done_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_cpu = sum(
        getattr(done_children, f) - getattr(children, f) for f in ("ru_utime", "ru_stime")
    )
    by_start = sorted(
        (int(start), int(took)) for start, status, took, *_ in rows if status == "200"
    )
    if len(by_start) <= connections:
        raise RuntimeError(f"h2load completed {len(by_start)} requests:\n{done.stdout}")
    latencies = [took for _, took in by_start]
    first = [took / 1000 for took in latencies[:connections]]  # every connection starts at once
    runtime = seconds * 1_000_000
    steady = sorted(latencies[connections:])
    requests = len(latencies)
    costs = {
        role: Cost(
            (after[role][0] - before[role][0]) * 1e6 / requests,
            (after[role][1] - before[role][1]) * 1000 / requests,
            (after[role][2] - before[role][2]) * 1000 / requests,
        )
        for role in ours
    }
    ours_cpu = sum(after[role][0] - before[role][0] for role in ours)
    run = Run(
        requests / seconds,
        wrk_p99(latencies, connections, runtime),
        wrk_p99(steady, connections, runtime),
        statistics.quantiles(latencies, n=100)[98] / 1000,
        statistics.mean(first),
        max(first),
        steady[len(steady) // 2] / 1000,
        steady[int(0.999 * len(steady))] / 1000,
        stalled_share(by_start[connections:], connections),
        max(machine - ours_cpu - load_cpu, 0.0) / wall,
    )
    return run, costs


@dataclass(frozen=True)
class Burst:
    """`connections` new connections at once, one request each: their latencies (ms), and
    the CPU (ms) each connection (accepted, two handshakes, a request, closed) cost the
    client-side and the server-side proxy, and of it the kernel's (system time)."""

    mean_ms: float
    p50_ms: float
    max_ms: float
    client_ms: float = 0.0
    server_ms: float = 0.0
    client_kernel_ms: float = 0.0
    server_kernel_ms: float = 0.0


def burst(port: int, pids: dict[str, int], connections: int = CONNECTIONS) -> Burst:
    before = {role: cpu_seconds(pids[role]) for role in ("client", "server")}
    with tempfile.TemporaryDirectory(prefix="outrider-l4-tail-") as tmp:
        log = Path(tmp) / "requests.tsv"
        command = ["h2load", "--h1", f"-c{connections}", f"-n{connections}", "-m1", "-T5"]
        command += [f"--log-file={log}", f"http://127.0.0.1:{port}/api/items"]
        done = subprocess.run(
            ["taskset", "-c", "0", *command], capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            raise RuntimeError(f"h2load exited {done.returncode}:\n{done.stdout}{done.stderr}")
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    took = sorted(int(row[2]) / 1000 for row in rows if row[1] == "200")
    if len(took) < connections:
        raise RuntimeError(f"h2load answered {len(took)} of {connections}:\n{done.stdout}")
    user, kernel = (
        {
            role: (cpu_seconds(pids[role])[i] - before[role][i]) * 1000 / connections
            for role in before
        }
        for i in (0, 1)
    )
    return Burst(
        statistics.mean(took),
        took[len(took) // 2],
        took[-1],
        user["client"] + kernel["client"],
        user["server"] + kernel["server"],
        kernel["client"],
        kernel["server"],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.l4_tail", description=__doc__)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--pairs", default="outrider,envoy")
    parser.add_argument("--detail", action="store_true", help="the steady state taken apart")
    parser.add_argument("--bursts", type=int, default=0, help="bursts of new connections")
    parser.add_argument(
        "--resumed", action="store_true", help="both pairs resume TLS 1.3 sessions (`resumed`)"
    )
    args = parser.parse_args(argv)
    names = args.pairs.split(",")
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="outrider-l4-tail-") as tmp:
        root = Path(tmp)
        setup = make_ca_setup(root)
        ca = stack.enter_context(ca_process(setup.config))
        backend, backend_pid = peers.backend(stack, root / "backend")
        pairs = {}
        for name in names:
            pair = (
                peers.outrider(stack, setup, ca, backend, resumed=args.resumed)
                if name == "outrider"
                else peers.envoy(stack, setup, backend, "l4", resumed=args.resumed)
            )
            wrk(pair.port, 1, 10)  # first connections and handshakes, not counted
            pairs[name] = pair
        runs: dict[str, list[Run]] = {name: [] for name in names}
        costs: dict[str, list[dict[str, Cost]]] = {name: [] for name in names}
        for number in range(args.rounds):
            for name in names if number % 2 == 0 else names[::-1]:
                ours = {**pairs[name].pids, "backend": backend_pid}
                run, cost = closed_loop(pairs[name].port, args.seconds, ours=ours)
                runs[name].append(run)
                costs[name].append(cost)
                print(f"round {number + 1} {name:9} {_row(run)}", file=sys.stderr, flush=True)
                if args.detail:
                    print(f"        {name:9} {_detail(run, cost)}", file=sys.stderr, flush=True)
        bursts: dict[str, list[Burst]] = {name: [] for name in names}
        for number in range(args.bursts):
            for name in names if number % 2 == 0 else names[::-1]:
                bursts[name].append(burst(pairs[name].port, pairs[name].pids))
    if args.rounds:
        print("medians:")
    for name, done in runs.items():
        if not done:
            continue
        fields = Run.__dataclass_fields__
        median = Run(*(statistics.median(getattr(run, f) for run in done) for f in fields))
        print(f"{name:9} {_row(median)}")
        if args.detail:
            roles = costs[name][0]
            cost = {
                role: Cost(
                    *(
                        statistics.median(getattr(c[role], f) for c in costs[name])
                        for f in Cost.__dataclass_fields__
                    )
                )
                for role in roles
            }
            print(f"          {_detail(median, cost)}")
    for name, made in bursts.items():
        if made:
            # Latencies: the median burst. CPU: the mean (clock ticks of 10 ms are coarse
            # against one burst's; summed over all, they are not).
            print(
                f"{name:9} {len(made)} bursts of {CONNECTIONS} new connections, one request each:"
                f" mean {statistics.median(b.mean_ms for b in made):6.1f}"
                f" p50 {statistics.median(b.p50_ms for b in made):6.1f}"
                f" max {statistics.median(b.max_ms for b in made):6.1f} ms; CPU per connection"
                f" client {statistics.mean(b.client_ms for b in made):.2f}"
                f" (kernel {statistics.mean(b.client_kernel_ms for b in made):.2f})"
                f" server {statistics.mean(b.server_ms for b in made):.2f}"
                f" (kernel {statistics.mean(b.server_kernel_ms for b in made):.2f}) ms"
            )


def _row(run: Run) -> str:
    return (
        f"{run.per_s:7.0f} req/s  p99 as wrk {run.wrk_p99_ms:7.2f} ms, without first requests"
        f" {run.steady_p99_ms:6.2f}, uncorrected {run.raw_p99_ms:6.2f} | first requests"
        f" mean {run.first_mean_ms:6.1f} max {run.first_max_ms:6.1f} ms"
    )


def _detail(run: Run, costs: dict[str, Cost]) -> str:
    per = " ".join(
        f"{role} {c.cpu_ms:.1f}/{c.voluntary:.0f}/{c.involuntary:.0f}" for role, c in costs.items()
    )
    return (
        f"steady p50 {run.steady_p50_ms:5.2f} p99.9 {run.steady_p999_ms:6.2f} ms,"
        f" stalls {100 * run.stalled:3.0f}% of the tail, foreign {run.foreign_cpus:.2f} CPUs"
        f" | per 1k (CPU ms/vol/invol) {per}"
    )


if __name__ == "__main__":
    main()
