"""Control-plane propagation: from an API change to every subscribed agent's ACK.

For each fleet size (1, 100 and 2,000 agents by default), on loopback:

    fake API server (a thread here, tests/apiserver.py) holding N pods bench/pod-<i>
      -> `outrider control serve` (its own process)
      -> N simulated agents (bench/control_agents.py, its own process): one Subscribe
         stream each over mTLS, Hello(pod), an Ack for every Snapshot

A change is an AuthorizationPolicy selecting every pod, applied with one path
flipped (/v1/* <-> /v2/*), so every agent gets a new version. The time of a
change runs from just before the apply to the moment the last agent wrote its
Ack for the new version (time.monotonic is system-wide, so the two processes
share it). Changes are 100 ms apart, each measured on its own. Reported per
fleet: p50 and p99 over the changes (nearest rank: with 20 changes the p99 is
the slowest), the control plane's RSS (VmRSS at the end, VmHWM) and CPU seconds
(utime + stime) during the changes and over its whole run. A fresh API server
and control plane per fleet, so each fleet's memory is its own. Bounded by
count and time; every process is stopped on exit. The last line is
`RESULT {json}` for bench/run.py; the full result also goes to
bench/results/control-plane-<timestamp>.json.

With `--captured` every pod is captured (the injector's capture init container)
and the mesh has `--services` Services (500 by default), each selecting its
share of the pods, with ClusterIPs and EndpointSlices: every snapshot then
holds an outbound entry per Service, so a change pushes that much to every
agent. The row also records one snapshot's size and the control plane's
compile time (outrider_control_compile_seconds, mean over the run).

    python -m bench.control_plane [--quick] [--agents 1,100,2000] [--changes 20]
        [--captured [--services 500]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import procs, report  # noqa: E402
from ca.signers.local import init_ca  # noqa: E402
from identity import TrustDomain  # noqa: E402
from tests.apiserver import FakeApiServer, fake_api_server_thread  # noqa: E402
from tests.certs import Shape, SigningCa, issue  # noqa: E402
from tests.support import free_port  # noqa: E402

TRUST_DOMAIN = "example.org"
NAMESPACE = "bench"
POLICY = "bench-reads"
AGENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/{NAMESPACE}/sa/bench"
CONTROL_ID = f"spiffe://{TRUST_DOMAIN}/ns/outrider-system/sa/outrider-control"
PATHS = ("/v1/*", "/v2/*")
CONTROL_COMMAND = [sys.executable, "-m", "outrider", "control", "serve"]
#: The aim the issue sets, in milliseconds, at the largest fleet.
AIM_P99_MS = 1000.0
AIM_AGENTS = 2000

#: Istio's published figures, the rival. Istio publishes no push or convergence time;
#: what it does publish is what one istiod needs for a mesh of this size, and the
#: debounce every push waits for. Nothing here is measured by us.
RIVAL = {
    "text": (
        "Istio publishes no push-to-ACK time. Its published figures: one istiod with namespace"
        " isolation supports 1000 services and 2000 sidecars with 1 vCPU and 1.5 GB of memory"
        " (Istio load tests, 70,000 mesh-wide requests/s); every push waits at least"
        " PILOT_DEBOUNCE_AFTER = 100 ms (default, up to PILOT_DEBOUNCE_MAX = 10 s) after a change."
    ),
    "sources": [
        "https://istio.io/latest/docs/ops/deployment/performance-and-scalability/",
        "https://istio.io/latest/docs/reference/commands/pilot-discovery/",
    ],
    "istiod_memory_mib": 1.5 * 1024,
    "istiod_vcpu": 1.0,
    "debounce_ms": 100.0,
}


# --- pure parts -------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: a value that was measured, never an interpolation."""
    if not values:
        raise ValueError("no values to take a percentile of")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summarize(agents: int, seconds: Sequence[float]) -> dict[str, Any]:
    """p50 (median), p99 (nearest rank) and max of one fleet's changes, in ms."""
    ms = [s * 1000 for s in seconds]
    return {
        "agents": agents,
        "changes": len(ms),
        "p50_ms": round(statistics.median(ms), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1),
    }


def pods_yaml(count: int, services: int = 0) -> str:
    """The bench namespace, its Service, and `count` injected pods of one Deployment;
    with `services`, every pod is captured and belongs to one of that many Services."""
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}},
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "bench", "namespace": NAMESPACE},
            "spec": {
                "selector": {"app": "bench"},
                "ports": [
                    {"name": "http", "port": 8080, "targetPort": 8080, "appProtocol": "http"}
                ],
            },
        },
    ]
    for s in range(services):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": f"svc-{s}", "namespace": NAMESPACE},
                "spec": {
                    "selector": {"svc": f"svc-{s}"},
                    "ports": [
                        {"name": "http", "port": 80, "targetPort": 8080, "appProtocol": "http"}
                    ],
                },
            }
        )
    for i in range(count):
        labels = {"app": "bench"}
        spec: dict[str, Any] = {
            "serviceAccountName": "bench",
            "containers": [
                {"name": "app", "image": "app:1", "ports": [{"containerPort": 8080}]},
                {"name": "outrider-agent", "image": "outrider-agent:1"},
            ],
        }
        if services:
            labels["svc"] = f"svc-{i % services}"
            spec["initContainers"] = [{"name": "outrider-capture", "image": "outrider-agent:1"}]
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": f"pod-{i}", "namespace": NAMESPACE, "labels": labels},
                "spec": spec,
                "status": {"phase": "Running", "podIP": pod_ip(i)},
            }
        )
    for s in range(services):
        members = range(s, count, services)
        docs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"svc-{s}-0",
                    "namespace": NAMESPACE,
                    "labels": {"kubernetes.io/service-name": f"svc-{s}"},
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                "endpoints": [
                    {
                        "addresses": [pod_ip(i)],
                        "conditions": {"ready": True},
                        "targetRef": {"kind": "Pod", "name": f"pod-{i}", "namespace": NAMESPACE},
                    }
                    for i in members
                ],
            }
        )
    return yaml.safe_dump_all(docs)


def pod_ip(i: int) -> str:
    return f"10.{i // 65536}.{i // 256 % 256}.{i % 256}"


def pods_running(api: FakeApiServer, count: int) -> None:
    """What the kubelet writes: each pod's IP (an endpoint counts only at its pod's IP)."""
    for i in range(count):
        status = {"phase": "Running", "podIP": pod_ip(i), "podIPs": [{"ip": pod_ip(i)}]}
        api.set_status("v1", "Pod", NAMESPACE, f"pod-{i}", status)


def policy_yaml(path: str) -> str:
    """The policy a change flips: GET `path` from the bench identity, on every pod."""
    return yaml.safe_dump(
        {
            "apiVersion": "security.outrider.io/v1alpha1",
            "kind": "AuthorizationPolicy",
            "metadata": {"name": POLICY, "namespace": NAMESPACE},
            "spec": {
                "selector": {"matchLabels": {"app": "bench"}},
                "rules": [
                    {
                        "from": {"principals": [AGENT_ID]},
                        "to": {"methods": ["GET"], "paths": [path]},
                    }
                ],
            },
        }
    )


# --- processes --------------------------------------------------------------------


def credentials(root: Path) -> dict[str, Path]:
    """A CA, the control plane's SVID and the simulated agents' SVID, as files."""
    ca_dir = root / "ca"
    init_ca(ca_dir, TrustDomain(TRUST_DOMAIN), datetime.now(UTC), force=False)
    ca = SigningCa.load(ca_dir)
    files = {"bundle": ca_dir / "bundle.pem"}
    for name, spiffe_id, dns in (("control", CONTROL_ID, ("localhost",)), ("agent", AGENT_ID, ())):
        credential = issue(ca, Shape(uris=(spiffe_id,), dns=dns))
        files[f"{name}_cert"] = root / f"{name}.pem"
        files[f"{name}_key"] = root / f"{name}.key"
        files[f"{name}_cert"].write_bytes(credential.chain_pem)
        files[f"{name}_key"].write_bytes(credential.key_pem)
    return files


def wait_ready(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            break
        try:
            with urllib.request.urlopen(url, timeout=1) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"the control plane was not ready at {url} within {timeout:.0f} s:\n{tail}")


@contextmanager
def stopping(process: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    """SIGTERM on the way out, SIGKILL if it does not go within 10 s."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@contextmanager
def control_plane(
    root: Path, kubeconfig: Path, files: dict[str, Path]
) -> Iterator[tuple[int, int, str]]:
    """`outrider control serve` until the block exits; yields (pid, gRPC port, debug URL)
    once ready."""
    port, debug = free_port(), free_port()
    config = root / "control.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "trust_domain": TRUST_DOMAIN,
                "listen": f"127.0.0.1:{port}",
                "debug": f"127.0.0.1:{debug}",
                "tls": {
                    "cert_file": str(files["control_cert"]),
                    "key_file": str(files["control_key"]),
                    "bundle_file": str(files["bundle"]),
                },
                "kubeconfig": str(kubeconfig),
            }
        )
    )
    log = root / "control.log"
    command = [*CONTROL_COMMAND, "--config", str(config)]
    with log.open("ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
    with stopping(process):
        wait_ready(f"http://127.0.0.1:{debug}/ready", process, log, 60.0)
        try:
            yield process.pid, port, f"http://127.0.0.1:{debug}"
        except RuntimeError as exc:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{exc}\n-- the control plane's log:\n{tail}") from None


class Agents:
    """The simulated agents' process, asked one JSON line at a time, each answer bounded."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: queue.Queue[str] = queue.Queue()
        assert process.stdout is not None
        threading.Thread(target=self._read, args=(process.stdout,), daemon=True).start()

    def _read(self, stream: Any) -> None:
        for line in stream:
            self.lines.put(line)
        self.lines.put("")

    def answer(self, timeout: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(
                f"the simulated agents did not answer within {timeout:.0f} s"
            ) from None
        if not line:
            raise RuntimeError(f"the simulated agents exited with {self.process.wait()}")
        return dict(json.loads(line))

    def ask(self, command: dict[str, Any], timeout: float) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        return self.answer(timeout)


@contextmanager
def simulated_agents(
    port: int, count: int, files: dict[str, Path], timeout: float
) -> Iterator[Agents]:
    """bench/control_agents.py with `count` subscribed agents, once each has its first ACK."""
    command = [
        sys.executable, "-m", "bench.control_agents", "--address", f"127.0.0.1:{port}",
        "--agents", str(count), "--cert", str(files["agent_cert"]),
        "--key", str(files["agent_key"]), "--bundle", str(files["bundle"]),
        "--timeout", str(timeout),
    ]  # fmt: skip
    pipe = subprocess.PIPE
    process = subprocess.Popen(command, stdin=pipe, stdout=pipe, text=True, cwd=ROOT)
    with stopping(process):
        agents = Agents(process)
        ready = agents.answer(timeout + 10)
        if ready["errors"] or ready["ready"] != count:
            raise RuntimeError(
                f"{ready['ready']} of {count} agents got a first snapshot; ended: {ready['errors']}"
            )
        try:
            yield agents
        finally:
            assert process.stdin is not None
            process.stdin.close()  # EOF: the agents close their streams and exit


def cpu(pid: int) -> float:
    user, system = procs.cpu_seconds(pid)
    return user + system


def check_synced(debug_url: str, count: int, timeout: float = 10.0) -> None:
    """The control plane's own view (/debug/agents, what `outrider proxy-status` prints)
    agrees: every agent acknowledged the latest version. Asked once, after the timing."""
    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(f"{debug_url}/debug/agents", timeout=10) as answer:
            agents = json.loads(answer.read())
        lagging = [a["pod"] for a in agents if a["acked"] != a["latest"]]
        if len(agents) == count and not lagging:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"/debug/agents lists {len(agents)} of {count} agents; not synced: {lagging[:5]}"
            )
        time.sleep(0.1)


def check_accepted(api: FakeApiServer, timeout: float = 10.0) -> None:
    """The policy the changes edit is in force (status Accepted=True): an invalid one
    would leave every agent's config as it was, and there would be nothing to time."""
    deadline = time.monotonic() + timeout
    while True:
        policy = api.get("security.outrider.io/v1alpha1", "AuthorizationPolicy", NAMESPACE, POLICY)
        conditions = policy.get("status", {}).get("conditions", [])
        accepted = next((c for c in conditions if c["type"] == "Accepted"), None)
        if accepted is not None and accepted["status"] == "True":
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the control plane did not accept the bench's policy: {accepted}")
        time.sleep(0.05)


def change(api: FakeApiServer, agents: Agents, path: str, per_change: float) -> float:
    """Apply the policy with `path`; seconds until the last agent ACKed the new version."""
    agents.ask({"mark": True}, 10)
    sent = time.monotonic()
    api.apply(policy_yaml(path))
    done = agents.ask({"wait": per_change}, per_change + 10)
    if not done["done"]:
        raise RuntimeError(f"the policy with {path} did not reach every agent: {done}")
    return float(done["last_ack"]) - sent


def snapshot_bytes(debug_url: str) -> int:
    """The size of pod-0's snapshot as sent (JSON, keys sorted, no spaces)."""
    with urllib.request.urlopen(f"{debug_url}/debug/config?pod={NAMESPACE}/pod-0") as answer:
        config = json.loads(answer.read())["config"]
    return len(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())


def compile_seconds(debug_url: str) -> float:
    """outrider_control_compile_seconds: the mean compile, from /metrics."""
    with urllib.request.urlopen(f"{debug_url}/metrics") as answer:
        text = answer.read().decode()
    found = dict(
        line.split(" ", 1)
        for line in text.splitlines()
        if line.startswith("outrider_control_compile_seconds_")
    )
    count = float(found.get("outrider_control_compile_seconds_count", "0"))
    return float(found.get("outrider_control_compile_seconds_sum", "0")) / max(count, 1.0)


def measure_fleet(
    count: int, changes: int, cap: float, per_change: float, services: int = 0
) -> dict[str, Any]:
    """One fleet size: fresh API server, control plane and agents; one untimed change (the
    first after 2,000 connections is not typical), then `changes` timed ones."""
    with tempfile.TemporaryDirectory(prefix="outrider-bench-control-") as tmp:
        root = Path(tmp)
        files = credentials(root)
        with fake_api_server_thread(root / "api") as api:
            api.apply(pods_yaml(count, services))
            if services:
                pods_running(api, count)
            api.apply(policy_yaml(PATHS[0]))
            kubeconfig = api.kubeconfig(root / "kubeconfig")
            with control_plane(root, kubeconfig, files) as (pid, port, debug_url):
                check_accepted(api)
                started = time.monotonic()
                with simulated_agents(port, count, files, timeout=60.0) as agents:
                    connect_s = time.monotonic() - started
                    change(api, agents, PATHS[1], per_change)
                    before, agents_before = cpu(pid), cpu(agents.process.pid)
                    seconds: list[float] = []
                    deadline = time.monotonic() + cap
                    while len(seconds) < changes and time.monotonic() < deadline:
                        seconds.append(change(api, agents, PATHS[len(seconds) % 2], per_change))
                        time.sleep(0.1)  # the next change starts after this one's ACKs settled
                    during = cpu(pid) - before
                    agents_during = cpu(agents.process.pid) - agents_before
                    rss, peak, total = procs.rss_mib(pid), procs.peak_rss_mib(pid), cpu(pid)
                    check_synced(debug_url, count)
                    size, compile_s = snapshot_bytes(debug_url), compile_seconds(debug_url)
    return summarize(count, seconds) | {
        "services": services,
        "snapshot_bytes": size,
        "compile_ms_mean": round(compile_s * 1000, 1),
        "rss_mib": round(rss, 1),
        "peak_rss_mib": round(peak, 1),
        "cpu_s_changes": round(during, 2),
        "cpu_s_total": round(total, 2),
        "first_snapshots_s": round(connect_s, 2),
        # The load generator's own cost, and how busy the (shared) machine was.
        "agents_cpu_s_changes": round(agents_during, 2),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 changes per fleet")
    parser.add_argument("--agents", default="1,100,2000", help="comma-separated fleet sizes")
    parser.add_argument("--changes", type=int, default=20, help="timed changes per fleet")
    parser.add_argument("--seconds", type=float, default=60.0, help="time cap per fleet")
    parser.add_argument("--captured", action="store_true", help="captured pods, --services")
    parser.add_argument("--services", type=int, default=500, help="Services, with --captured")
    args = parser.parse_args()
    fleets = [int(n) for n in args.agents.split(",") if n]
    if not fleets or min(fleets) < 1:
        parser.error("--agents: comma-separated counts of 1 or more, e.g. 1,100,2000")
    changes, cap = (5, 20.0) if args.quick else (args.changes, args.seconds)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    services = args.services if args.captured else 0
    per_change = 30.0 if services else 10.0
    rows = [measure_fleet(n, changes, cap, per_change, services) for n in fleets]
    print("\n".join(report.control_table(rows)))
    print(report.rival_line(RIVAL))
    result = {"rows": rows, "rival": RIVAL, "aim": {"agents": AIM_AGENTS, "p99_ms": AIM_P99_MS}}
    report.save("control-plane", result)


if __name__ == "__main__":
    main()
