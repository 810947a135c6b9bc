"""`make bench`: Outrider beside Envoy, HAProxy and nginx in one run, and the CA's rates.

    python -m bench.run [--quick] [--rounds 3] [--seconds 10] [--connections 50]

Installs what it needs (bench/procs.py), runs the data-plane scenarios
(bench/dataplane.py; gRPC's in bench/grpc_calls.py), then CA issuance over gRPC, in
process and from OpenBao (bench/ca_issuance.py, bench/ca_vault.py) and admission latency
(bench/admission.py), then how fast an API change reaches 1, 100 and 2,000 agents
through the control plane (bench/control_plane.py), then transparent capture's added
latency beside the explicit 127.0.0.1:15001 path on one pod pair (bench/capture.py).
Prints the tables with ratios of Envoy; writes bench/results/<timestamp>.json and .md,
and docs/bench/latest.md and latest.png, the chart the README shows, and the table into
the README. Every run is bounded in time; every process started is stopped on exit,
Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import ca_issuance, ca_vault, dataplane, procs, report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
LATEST = ROOT / "docs" / "bench"


def machine() -> str:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "unknown CPU",
    )
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // (1024 * 1024)
    return (
        f"{os.cpu_count()} CPUs ({model}), {memory} GiB, {platform.system()} {platform.release()}"
    )


def agent_build() -> str:
    """How the agents measured here run their hot path: compiled (`make compiled`) or not."""
    import agent.core.http1

    if str(agent.core.http1.__file__).endswith(".so"):
        return "compiled by mypyc"
    print("bench: the agent's hot path runs as pure Python (`make compiled` builds it)")
    return "pure Python"


def commit() -> str | None:
    """The checkout's commit (short, `+` when it has uncommitted changes): the README's
    table names it, since the table outlives the code it measured."""
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (a tarball): the date alone
    return head + ("+" if dirty else "")


def ca_rows(quick: bool) -> list[tuple[str, list[float], str, str]]:
    """CA issuance (ours over gRPC, raw in process, OpenBao's pki/sign) and admission."""
    seconds, rounds = (1.0, 1) if quick else (5.0, 3)
    local = ca_issuance.measure(rounds, seconds, 16, 600 if quick else 4000)
    vault = ca_vault.measure(rounds, seconds, 16, 600 if quick else 3000)

    def ms(values: list[float]) -> str:
        return f"{statistics.median(values):.1f}"

    rows = [
        ("raw P-256 signing in process, certs/s", [r.raw_per_s for r in local], "", ""),
        (
            "`ca serve` local key over gRPC, SVIDs/s",
            [r.grpc_per_s for r in local],
            ms([r.grpc_p50_ms for r in local]),
            ms([r.grpc_p99_ms for r in local]),
        ),
    ]
    labels = {"vault-inter": "Vault intermediate", "vault-percert": "Vault per-certificate"}
    for name, label in labels.items():
        runs = vault[name]
        rows.append(
            (
                f"`ca serve` {label} over gRPC, SVIDs/s",
                [r["rate"] for r in runs],
                ms([r["p50"] for r in runs]),
                ms([r["p99"] for r in runs]),
            )
        )
    rows.append(
        ("OpenBao `pki/sign`, 8 threads, certs/s", [r["rate"] for r in vault["openbao"]], "", "")
    )
    rows.append(admission(quick))
    return rows


def admission(quick: bool) -> tuple[str, list[float], str, str]:
    label = "injector, 200 concurrent AdmissionReviews, reviews/s"
    script = ROOT / "bench" / "admission.py"
    if not script.exists():
        return (f"{label}: {dataplane.NOT_MEASURED}", [0.0], "", "")
    command = [sys.executable, str(script), *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    found = re.search(r"^RESULT (.*)$", done.stdout, re.M)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"bench/admission.py failed:\n{done.stdout}{done.stderr}")
    result = json.loads(found[1])
    return (label, [result["per_s"]], f"{result['p50_ms']:.1f}", f"{result['p99_ms']:.1f}")


def control_plane(quick: bool) -> dict[str, Any]:
    """Propagation from an API change to every agent's ACK, at 1, 100 and 2,000 agents."""
    command = [sys.executable, "-m", "bench.control_plane", *(["--quick"] if quick else [])]
    pipe = subprocess.PIPE
    process = subprocess.Popen(command, stdout=pipe, stderr=pipe, text=True, cwd=ROOT)
    try:
        out, err = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM, not SIGKILL: it stops the processes it started
        out, err = process.communicate(timeout=30)
        raise RuntimeError(f"bench/control_plane.py took over 600 s:\n{out}{err}") from None
    found = re.search(r"^RESULT (.*)$", out, re.M)
    if process.returncode != 0 or not found:
        raise RuntimeError(f"bench/control_plane.py failed:\n{out}{err}")
    return dict(json.loads(found[1]))


def capture(quick: bool) -> dict[str, Any]:
    """Transparent capture's added latency beside the explicit 127.0.0.1:15001 path."""
    command = [sys.executable, "-m", "bench.capture", *(["--quick"] if quick else [])]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT)
    found = re.search(r"^RESULT (.*)$", done.stdout, re.M)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"bench/capture.py failed:\n{done.stdout}{done.stderr}")
    return dict(json.loads(found[1]))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds every `with`, which stops every process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 s per run, 1 round: < 3 minutes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument(
        "--only",
        default="",
        help="comma-separated data-plane scenarios (e.g. l7_new_conn): no CA rows, and the "
        "README and docs/bench are left as they are",
    )
    args = parser.parse_args()
    only = frozenset(filter(None, args.only.split(",")))
    unknown = only - {s.name for s in dataplane.scenarios(args.connections)}
    if unknown:
        parser.error(f"no scenario named {', '.join(sorted(unknown))}")
    seconds, rounds = (3.0, 1) if args.quick else (args.seconds, args.rounds)
    procs.ensure_packages()
    procs.bytecode()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    started = datetime.now(UTC)
    try:
        with tempfile.TemporaryDirectory(prefix="outrider-bench-") as tmp:
            plane = dataplane.run(Path(tmp), rounds, seconds, args.connections, only)
        ca = {"rows": [] if only else ca_rows(args.quick)}
        control = {} if only else control_plane(args.quick)
        captured = {} if only else capture(args.quick)
    except KeyboardInterrupt:
        sys.exit("interrupted; every process started here has been stopped")
    record: dict[str, Any] = {
        "date": started.strftime("%Y-%m-%d"),
        "commit": commit(),
        "machine": machine(),
        "agent": agent_build(),
        "command": "make bench QUICK=1" if args.quick else "make bench",
        "rounds": rounds,
        "seconds": seconds,
        "connections": args.connections,
        "dataplane": plane,
        "summary": dataplane.summarize(plane),
        "ca": ca,
        "control": control,
        "capture": captured,
        "minutes": (datetime.now(UTC) - started).total_seconds() / 60,
    }
    text = report.markdown(record)
    print("\n" + text)
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stamp}.json").write_text(json.dumps(record, indent=2))
    (RESULTS / f"{stamp}.md").write_text(text)
    if only:
        print(f"results: bench/results/{stamp}.json (a partial run: README left as it is)")
        return
    LATEST.mkdir(parents=True, exist_ok=True)
    (LATEST / "latest.md").write_text(text)
    report.chart(record, LATEST / "latest.png")
    readme = ROOT / "README.md"
    readme.write_text(report.into_readme(readme.read_text(), text))
    print(f"results: bench/results/{stamp}.json; table and chart: docs/bench/latest.md, latest.png")
    print(f"took {record['minutes']:.1f} minutes")


if __name__ == "__main__":
    main()
