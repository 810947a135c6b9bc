"""The data-plane scenarios: every pair under the same load, pairs alternating.

    keepalive   50 keep-alive connections, closed loop (wrk): req/s, p50, p99
    keepalive_workers
                the same, Outrider's agents of one process beside agents of
                `workers: 2` (docs/agent.md#workers says what it can show on 2 CPUs)
    workers_capped
                the same, each agent held to CAPPED_CORES of CPU per worker (a cgroup
                quota), so the load generator and the backend always have CPU left:
                how throughput scales with workers where cores are free
    floor       one connection, closed loop: the latency floor
    fixed_rate  1000 req/s open loop (h2load): latency added over the direct path
    new_conn    a new connection per request (full mTLS handshakes): conn/s
    new_conn_resumed
                the same with TLS 1.3 session resumption on (Outrider and Envoy only)
    rotation    Outrider agents whose SVIDs live 20 s (so rotate every ~10 s) under
                new-connection load: errors must be 0
    grpc_unary, grpc_streams
                gRPC on one connection, one call or 50 at a time (bench/grpc_calls.py)

L4 scenarios run the L4 pairs; the L7 ones (`l7_keepalive` with Envoy's 10-rule RBAC
policy, `l7_new_conn` where the upstream side is pooled) run the L7 pairs.
Within a round every scenario runs each of its pairs in turn, in an order that
reverses every round, so drift in the machine's speed falls on all of them alike.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import grpc_calls, peers
from bench.load import Load, fixed_rate, wrk
from bench.peers import Pair
from bench.procs import (
    cpu_quota_unavailable,
    cpu_seconds,
    machine_busy_seconds,
    peak_rss_mib,
    rss_mib,
)
from tests.support import CaProcess, CaSetup, ca_process, make_ca_setup

NOT_MEASURED = "not measured"
#: CPUs per worker in `workers_capped`: with 2 workers both agents take 1.2 of 2 CPUs,
#: and wrk and the backend need about 0.4 at the throughput that gives.
CAPPED_CORES = 0.3


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    pairs: tuple[str, ...]  # Pair.name, "direct" first when it is the baseline
    load: Callable[[int, float], Load]
    unit: str = "req/s"


def scenarios(connections: int) -> list[Scenario]:
    l4 = ("direct", "outrider l4", "envoy l4", "haproxy l4", "nginx l4")
    l7 = ("direct", "outrider l7", "envoy l7", "haproxy l7", "nginx l7")
    h2 = ("direct grpc", "outrider grpc", "envoy grpc")
    return [
        Scenario(
            "keepalive",
            f"L4, {connections} keep-alive connections",
            l4,
            lambda port, s: wrk(port, s, connections),
        ),
        Scenario(
            "keepalive_workers",
            f"L4, {connections} keep-alive connections: agents of one process, and of"
            " `workers: 2` (both sides)",
            ("outrider l4", "outrider l4 2 workers"),
            lambda port, s: wrk(port, s, connections),
        ),
        Scenario(
            "workers_capped",
            f"L4, {connections} keep-alive connections: each agent held to {CAPPED_CORES} CPU"
            " per worker (cgroup quota), one worker and `workers: 2`",
            ("outrider l4 capped", "outrider l4 2 workers capped"),
            lambda port, s: wrk(port, s, connections),
        ),
        Scenario("floor", "L4, one connection (latency floor)", l4, lambda p, s: wrk(p, s, 1)),
        Scenario(
            "fixed_rate",
            "L4, 1000 req/s open loop (latency added over direct)",
            l4,
            lambda port, s: fixed_rate(port, s, 1000),
        ),
        Scenario(
            "new_conn",
            "L4, new connection per request (full mTLS handshakes)",
            l4,
            lambda port, s: wrk(port, s, connections, close=True),
            unit="conn/s",
        ),
        Scenario(
            "new_conn_resumed",
            "L4, new connection per request, TLS 1.3 sessions resumed between the proxies",
            ("outrider l4 resumed", "envoy l4 resumed"),
            lambda port, s: wrk(port, s, connections, close=True),
            unit="conn/s",
        ),
        Scenario(
            "l7_keepalive",
            f"L7 with a 10-rule policy, {connections} keep-alive connections",
            l7,
            lambda port, s: wrk(port, s, connections),
        ),
        Scenario(
            "l7_observed",
            f"L7 as l7_keepalive: off, access log (all) alone, access log and tracing (OTLP);"
            f" {connections} keep-alive connections",
            ("outrider l7", "outrider l7 logged", "outrider l7 observed"),
            lambda port, s: wrk(port, s, connections),
        ),
        Scenario(
            "l7_new_conn",
            "L7, new client connection per request, upstream pooled",
            l7,
            lambda port, s: wrk(port, s, connections, close=True),
            unit="conn/s",
        ),
        Scenario(
            "rotation",
            "Outrider, SVIDs rotating every ~10 s, new connection per request",
            ("outrider rotating",),
            lambda port, s: wrk(port, s, connections, close=True),
            unit="conn/s",
        ),
        Scenario(
            "grpc_unary",
            "gRPC with a 10-rule policy, unary calls one at a time on one connection",
            h2,
            lambda port, s: grpc_calls.load(port, s, 1),
            unit="calls/s",
        ),
        Scenario(
            "grpc_streams",
            f"gRPC with a 10-rule policy, {grpc_calls.STREAMS} concurrent streams on one"
            " connection",
            h2,
            lambda port, s: grpc_calls.load(port, s, grpc_calls.STREAMS),
            unit="calls/s",
        ),
    ]


@dataclass
class Cost:
    cpu_ms_per_1k: float  # CPU time per 1000 requests, user + kernel
    cores: float  # CPU seconds / wall seconds while loaded: 1.0 is one core


@dataclass
class Run:
    scenario: str
    pair: str
    round: int
    load: Load
    costs: dict[str, Cost]  # role -> cost
    machine_cores: float  # every process, the load generator included
    handshakes: int | None  # full TLS handshakes during the run, when the pair counts them
    rotations: int | None = None


def measure(scenario: Scenario, pair: Pair, number: int, seconds: float) -> Run:
    before = {role: sum(cpu_seconds(pid)) for role, pid in pair.pids.items()}
    handshakes = pair.handshakes() if pair.handshakes else None
    rotations = _rotations(pair)
    machine = machine_busy_seconds()
    started = time.perf_counter()
    load = scenario.load(pair.port, seconds)
    wall = time.perf_counter() - started
    machine = machine_busy_seconds() - machine
    costs = {}
    for role, pid in pair.pids.items():
        used = sum(cpu_seconds(pid)) - before[role]
        costs[role] = Cost(used * 1e6 / max(load.requests, 1), used / wall)
    return Run(
        scenario.name,
        pair.name,
        number,
        load,
        costs,
        machine / wall,
        pair.handshakes() - handshakes if pair.handshakes and handshakes is not None else None,
        _rotations(pair) - rotations if rotations is not None else None,
    )


def _rotations(pair: Pair) -> int | None:
    if not pair.agents:
        return None
    return sum(
        int(peers.agent_counter(a, "outrider_svid_rotations_total", result="success"))
        for a in pair.agents
    )


def agent_handshakes(pair: Pair) -> Callable[[], int]:
    def count() -> int:
        server = pair.agents[1]
        return int(peers.agent_counter(server, "outrider_tls_handshakes_total", result="ok"))

    return count


def start_pairs(stack: ExitStack, root: Path) -> tuple[dict[str, Pair], int]:
    """Every pair, each proxy idle and ready; also the backend's pid."""
    setup = make_ca_setup(root)
    ca = stack.enter_context(ca_process(setup.config))
    backend_port, backend_pid = peers.backend(stack, root / "backend")
    grpc_port, _ = grpc_calls.backend(stack, root / "grpc-backend")
    pairs = [
        Pair("direct", "l4", backend_port),
        peers.outrider(stack, setup, ca, backend_port),
        peers.outrider(stack, setup, ca, backend_port, ttl="20s"),
        peers.outrider(stack, setup, ca, backend_port, layer="l7"),
        peers.outrider(stack, setup, ca, backend_port, workers=2),
        peers.outrider(stack, setup, ca, backend_port, resumed=True),
        peers.envoy(stack, setup, backend_port, "l4", resumed=True),
        observed(stack, setup, ca, root, backend_port, tracing=False),
        observed(stack, setup, ca, root, backend_port, tracing=True),
        *(
            start(stack, setup, backend_port, layer)
            for start in (peers.envoy, peers.haproxy, peers.nginx)
            for layer in ("l4", "l7")
        ),
        Pair("direct", "grpc", grpc_port),
        peers.outrider(stack, setup, ca, grpc_port, layer="grpc"),
        peers.envoy(stack, setup, grpc_port, "grpc"),
    ]
    if cpu_quota_unavailable() is None:
        pairs += [
            peers.outrider(stack, setup, ca, backend_port, workers=n, cores_per_worker=CAPPED_CORES)
            for n in (1, 2)
        ]
    else:
        print(f"workers_capped not measured: {cpu_quota_unavailable()}", file=sys.stderr)
    pairs[2].proxy, pairs[2].layer = "outrider", "rotating"
    for pair in pairs[1:5]:
        pair.handshakes = agent_handshakes(pair)
    return {pair.name: pair for pair in pairs}, backend_pid


def observed(
    stack: ExitStack, setup: CaSetup, ca: CaProcess, root: Path, backend_port: int, *, tracing: bool
) -> Pair:
    """An L7 pair for `l7_observed`: every request logged (to the agents' stdout, a
    regular file here, `<role>.log`, shared with stderr; "logged"), and with `tracing`
    every span also sent to an OTLP/HTTP receiver that decodes and counts them
    (bench/otlp_sink.py; "observed")."""
    observe: dict[str, Any] = {"access_log": {"mode": "all"}}
    if not tracing:
        return peers.outrider(
            stack, setup, ca, backend_port, layer="l7", observe=observe, variant="logged"
        )
    port, spans = peers.otlp_sink(stack, root / "otlp")
    observe["tracing"] = {"otlp_endpoint": f"127.0.0.1:{port}"}
    pair = peers.outrider(stack, setup, ca, backend_port, layer="l7", observe=observe)
    pair.spans = spans
    return pair


def run(
    root: Path, rounds: int, seconds: float, connections: int, only: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Start every pair, run every scenario (or `only` those) for `rounds` rounds."""
    chosen = [s for s in scenarios(connections) if not only or s.name in only]
    with ExitStack() as stack:
        pairs, backend_pid = start_pairs(stack, root)
        idle = {name: {r: rss_mib(pid) for r, pid in p.pids.items()} for name, p in pairs.items()}
        for pair in pairs.values():  # first connections and handshakes, not counted
            if pair.layer == "grpc":
                grpc_calls.load(pair.port, 1, 10)
            else:
                wrk(pair.port, 1, 10)
        runs: list[Run] = []
        for number in range(1, rounds + 1):
            for scenario in chosen:
                order = [n for n in scenario.pairs if n in pairs]
                for name in order if number % 2 else reversed(order):
                    runs.append(measure(scenario, pairs[name], number, _seconds(scenario, seconds)))
                    _progress(runs[-1], rounds, scenario)
        peak = {
            name: {r: peak_rss_mib(pid) for r, pid in p.pids.items()} for name, p in pairs.items()
        }
        backend_ms = sum(cpu_seconds(backend_pid)) * 1000
        spans = {n: p.spans() for n, p in pairs.items() if p.spans is not None}
    return {
        "scenarios": [
            {"name": s.name, "title": s.title, "pairs": s.pairs, "unit": s.unit} for s in chosen
        ],
        "runs": [asdict(r) for r in runs],
        "rss_idle_mib": idle,
        "rss_peak_mib": peak,
        "backend_cpu_ms": backend_ms,
        "otlp_spans": spans,  # received by the observed pair's receiver, warm-up included
        "available": sorted(pairs),
    }


def _seconds(scenario: Scenario, seconds: float) -> float:
    # A rotation every ~10 s: give the run time for at least one on each agent.
    return max(seconds, 12.0) if scenario.name == "rotation" else seconds


def _progress(run: Run, rounds: int, scenario: Scenario) -> None:
    load = run.load
    extra = f", {run.rotations} rotations" if run.rotations is not None else ""
    print(
        f"round {run.round}/{rounds} {scenario.name:12} {run.pair:18}"
        f" {load.per_s:8.0f} {scenario.unit:6} p50 {load.p50_ms:6.2f} ms"
        f" p99 {load.p99_ms:6.2f} ms errors {load.errors}{extra}",
        file=sys.stderr,
    )


def summarize(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Medians over rounds per scenario and pair, with min-max and ratios of Envoy."""
    rows = []
    for scenario in record["scenarios"]:
        mine = [r for r in record["runs"] if r["scenario"] == scenario["name"]]
        by_pair: dict[str, dict[str, Any]] = {}
        for name in scenario["pairs"]:
            runs = [r for r in mine if r["pair"] == name]
            if not runs:
                by_pair[name] = {"pair": name, "status": NOT_MEASURED}
                continue
            rates = [r["load"]["per_s"] for r in runs]
            handshakes = [r["handshakes"] for r in runs if r["handshakes"] is not None]
            by_pair[name] = {
                "pair": name,
                "per_s": statistics.median(rates),
                "per_s_min": min(rates),
                "per_s_max": max(rates),
                "p50_ms": statistics.median(r["load"]["p50_ms"] for r in runs),
                "p99_ms": statistics.median(r["load"]["p99_ms"] for r in runs),
                "errors": sum(r["load"]["errors"] for r in runs),
                "requests": sum(r["load"]["requests"] for r in runs),
                "handshakes": sum(handshakes) if handshakes else None,
                "rotations": sum(r["rotations"] or 0 for r in runs)
                if runs[0]["rotations"] is not None
                else None,
                "cpu_ms_per_1k": {
                    role: statistics.median(r["costs"][role]["cpu_ms_per_1k"] for r in runs)
                    for role in runs[0]["costs"]
                },
                "machine_cores": statistics.median(r["machine_cores"] for r in runs),
            }
        envoy = next(
            (p for n, p in by_pair.items() if n.startswith("envoy") and "per_s" in p), None
        )
        direct = by_pair.get("direct")
        first = by_pair.get(scenario["pairs"][0], {})
        for row in by_pair.values():
            if "per_s" not in row:
                continue
            if scenario["name"] == "l7_observed" and "per_s" in first:
                row["per_s_vs_off"] = row["per_s"] / first["per_s"]  # the same run's
            if envoy:
                row["per_s_vs_envoy"] = row["per_s"] / envoy["per_s"]
                row["p99_vs_envoy"] = row["p99_ms"] / envoy["p99_ms"]
            if direct and "p50_ms" in direct and scenario["name"] == "fixed_rate":
                row["added_p50_ms"] = row["p50_ms"] - direct["p50_ms"]
                row["added_p99_ms"] = row["p99_ms"] - direct["p99_ms"]
        rows.append({**scenario, "rows": list(by_pair.values())})
    return rows
