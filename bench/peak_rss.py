"""One Outrider pair through the bench's scenarios: its RSS idle, after each phase, at peak.

    python -m bench.peak_rss [--pair l4|rotating|l7|logged|observed|resumed]
                             [--rounds 1] [--seconds 5] [--only new_conn,...]
                             [--probe basic|objects|tracemalloc|collect]

`make bench` starts every proxy and reports each process's RSS high-water mark (VmHWM)
once every scenario has run; this starts one pair only (bench/peers.py, as `make
bench` does: the CA, the nginx backend, the two agents) and runs what the bench runs
against it, in order (a second of warm-up, then each scenario of that pair's, for
`--rounds`), printing each agent's VmHWM and the CPU per request after each phase, so
the phase that makes the peak shows. With `--probe`, each agent runs inside
bench/peak_probe.py, and what its memory was made of at its peak is printed beside the
same at idle. RSS is what to compare here, on a busy machine too; CPU per request only
between runs on the same machine at the same time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from bench import peers
from bench.load import Load, fixed_rate, wrk
from bench.procs import cpu_seconds, peak_rss_mib, rss_mib
from tests.support import ca_process, make_ca_setup

MIB = 1024 * 1024
Phase = tuple[str, Callable[[int, float], Load]]

#: What `make bench` runs against each Outrider pair (bench/dataplane.py), in order.
PHASES: dict[str, list[Phase]] = {
    "l4": [
        ("keepalive", lambda port, s: wrk(port, s, 50)),
        ("floor", lambda port, s: wrk(port, s, 1)),
        ("fixed_rate", lambda port, s: fixed_rate(port, s, 1000)),
        ("new_conn", lambda port, s: wrk(port, s, 50, close=True)),
    ],
    "rotating": [("rotation", lambda port, s: wrk(port, max(s, 12.0), 50, close=True))],
    "resumed": [("new_conn_resumed", lambda port, s: wrk(port, s, 50, close=True))],
    "l7": [
        ("l7_keepalive", lambda port, s: wrk(port, s, 50)),
        ("l7_observed", lambda port, s: wrk(port, s, 50)),
        ("l7_new_conn", lambda port, s: wrk(port, s, 50, close=True)),
    ],
    "logged": [("l7_observed", lambda port, s: wrk(port, s, 50))],
    "observed": [("l7_observed", lambda port, s: wrk(port, s, 50))],
}


def start(stack: ExitStack, root: Path, name: str, probe: str | None) -> peers.Pair:
    setup = make_ca_setup(root)
    ca = stack.enter_context(ca_process(setup.config))
    backend_port, _ = peers.backend(stack, root / "backend")
    launcher: tuple[str, ...] = ("-m", "outrider")
    if probe is not None:
        launcher = ("-c", "import bench.peak_probe as m; m.run()", "-m", "outrider")
    kwargs: dict[str, Any] = {"launcher": launcher}
    if name == "rotating":
        kwargs["ttl"] = "20s"
    elif name == "resumed":
        kwargs["resumed"] = True
    elif name in ("l7", "logged", "observed"):
        kwargs["layer"] = "l7"
    if name in ("logged", "observed"):
        observe: dict[str, Any] = {"access_log": {"mode": "all"}}
        kwargs["observe"], kwargs["variant"] = observe, "logged"
        if name == "observed":
            port, _ = peers.otlp_sink(stack, root / "otlp")
            observe["tracing"] = {"otlp_endpoint": f"127.0.0.1:{port}"}
            kwargs["variant"] = "observed"
    return peers.outrider(stack, setup, ca, backend_port, **kwargs)


class Watch:
    """Each pid's VmRSS sampled every 10 ms: the highest since `reset`."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.high = dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for role, pid in self.pids.items():
                self.high[role] = max(self.high[role], rss_mib(pid))

    def reset(self) -> dict[str, float]:
        high, self.high = self.high, dict.fromkeys(self.pids, 0.0)
        return high

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(
    name: str, rounds: int, seconds: float, probe: str | None, only: frozenset[str] = frozenset()
) -> None:
    with tempfile.TemporaryDirectory(prefix="outrider-peak-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        if probe is not None:
            os.environ["OUTRIDER_PEAK_PROBE_MODE"] = probe
        files = {role: root / f"probe-{role}.json" for role in ("server", "client")}
        pair = _start_probed(stack, root, name, probe, files)
        pids = {r: p for r, p in pair.pids.items() if r in ("client", "server")}
        idle = {role: rss_mib(pid) for role, pid in pids.items()}
        for path in files.values() if probe is not None else ():
            path.with_name(path.name + ".mark").touch()
            deadline = time.monotonic() + 10
            while path.with_name(path.name + ".mark").exists() and time.monotonic() < deadline:
                time.sleep(0.01)
        print(f"pair {pair.name}: idle RSS " + _roles(idle))
        watch = Watch(pids)
        phases: list[Phase] = [("warm-up", lambda port, s: wrk(port, 1, 10))]
        for number in range(rounds):
            phases += [
                (f"{phase} #{number + 1}", load)
                for phase, load in PHASES[name]
                if not only or phase in only
            ]
        for phase, load in phases:
            before = {role: sum(cpu_seconds(pid)) for role, pid in pids.items()}
            done = load(pair.port, seconds)
            used = {role: sum(cpu_seconds(pid)) - before[role] for role, pid in pids.items()}
            per_request = {r: u * 1e6 / max(done.requests, 1) for r, u in used.items()}
            high = watch.reset()
            hwm = {role: peak_rss_mib(pid) for role, pid in pids.items()}
            print(
                f"  {phase:22} {done.per_s:8.0f}/s err {done.errors:<3}"
                f" RSS max {_roles(high)}  HWM {_roles(hwm)}"
                f"  CPU us/req {_roles(per_request)}"
            )
        watch.stop()
        peak = {role: peak_rss_mib(pid) for role, pid in pids.items()}
        print(
            f"peak RSS (VmHWM) {_roles(peak)}; above idle",
            _roles({r: peak[r] - idle[r] for r in pids}),
        )
        if probe is not None:
            for role, path in files.items():
                _print_probe(role, json.loads(path.read_text()))


def _start_probed(
    stack: ExitStack, root: Path, name: str, probe: str | None, files: dict[str, Path]
) -> peers.Pair:
    """The pair; each agent's probe writes to its file (the server starts first)."""
    if probe is None:
        return start(stack, root, name, None)
    original = peers.agent_process

    def probed(root_: Path, role: str, raw: dict[str, Any], **kwargs: Any) -> Any:
        os.environ["OUTRIDER_PEAK_PROBE"] = str(files[role])
        return original(root_, role, raw, **kwargs)

    peers.agent_process = probed  # type: ignore[assignment]
    try:
        return start(stack, root, name, probe)
    finally:
        peers.agent_process = original  # type: ignore[assignment]


def _roles(values: dict[str, float]) -> str:
    return " ".join(f"{role} {value:5.1f}" for role, value in values.items())


def _print_probe(role: str, record: dict[str, Any]) -> None:
    first, peak = record["idle"], record["peak"]
    print(f"\n{role}: idle  ->  at peak (MiB)")
    rows = [("RSS", first["rss"], peak["rss"])]
    for kind in sorted(set(first["mappings"]) | set(peak["mappings"])):
        rows.append((f"  {kind}", first["mappings"].get(kind, 0), peak["mappings"].get(kind, 0)))
    for key in ("arena", "hblkhd", "uordblks", "fordblks", "keepcost"):
        rows.append((f"malloc {key}", first["mallinfo2"][key], peak["mallinfo2"][key]))
    for label, before, after in rows:
        change = (after - before) / MIB
        print(f"  {label:18} {before / MIB:7.2f} -> {after / MIB:7.2f}  ({change:+.2f})")
    print(f"  python blocks      {first['python_blocks']} -> {peak['python_blocks']}")
    print(f"  malloc blocks mmapped {first['mallinfo2']['hblks']} -> {peak['mallinfo2']['hblks']}")
    print(f"  threads {first['threads']} -> {peak['threads']}")
    if "collected" in peak:
        print(
            f"  gc.collect() found {peak['collected']} objects: RSS"
            f" {peak['rss'] / MIB:.2f} -> {peak['rss_after_collect'] / MIB:.2f},"
            f" then malloc_trim -> {peak['rss_after_trim'] / MIB:.2f}"
        )
    if "traced" in peak:
        print(
            f"  tracemalloc traced {first.get('traced', 0) / MIB:.2f} -> {peak['traced'] / MIB:.2f}"
        )
    for key in ("objects", "top"):
        for row in peak.get(key, []):
            print("   ", *row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", choices=sorted(PHASES), default="l4")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--probe", choices=("basic", "objects", "tracemalloc", "collect"))
    parser.add_argument("--only", default="", help="comma-separated phases (e.g. new_conn)")
    args = parser.parse_args()
    started = time.monotonic()
    only = frozenset(filter(None, args.only.split(",")))
    run(args.pair, args.rounds, args.seconds, args.probe, only)
    print(f"took {time.monotonic() - started:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
