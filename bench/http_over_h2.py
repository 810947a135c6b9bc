"""Should agents carry the app's HTTP/1.1 to `http` upstreams over h2? Measured, not assumed.

    python -m bench.http_over_h2 [--seconds 8] [--rounds 2]

One server agent (`protocol: http` inbound, the 10-rule policy, nginx behind it)
and one client agent with two outbounds to it: `protocol: http` (HTTP/1.1 from the
app, HTTP/1.1 between the agents, what `http` upstreams do) and `protocol: http2`
(h2c from the app, h2 between the agents, each stream sent to nginx as HTTP/1.1 by
the server agent: what carrying HTTP/1.1 over h2 would cost the server side, plus
h2 on the client side). h2load drives both, pinned to CPU 0; rows alternate order
each round. Prints req/s and each agent's CPU microseconds per request. Not part of
`make bench`: the answer (HTTP/1.1 between agents, docs/agent.md) rests on it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from contextlib import ExitStack
from datetime import timedelta
from pathlib import Path

import yaml

from bench import peers
from bench.procs import cpu_seconds
from tests.mesh import agent_process, agent_yaml, inbound, outbound
from tests.support import ca_process, free_port, make_ca_setup

ROWS = [  # (title, outbound, HTTP/1.1 from the app, connections, streams each)
    ("HTTP/1.1 between agents: app HTTP/1.1, 50 connections", "h1", True, 50, 1),
    ("h2 between agents: app h2c, 50 connections x 1 stream", "h2", False, 50, 1),
    ("h2 between agents: app h2c, 1 connection x 50 streams", "h2", False, 1, 50),
]


def h2load(port: int, h1: bool, clients: int, streams: int, seconds: int) -> tuple[float, int]:
    """(req/s, 2xx answers) of a closed loop against the client agent's outbound."""
    command = ["taskset", "-c", "0", "h2load", *(["--h1"] if h1 else [])]
    command += [f"-c{clients}", f"-m{streams}", f"-D{seconds}", "--warm-up-time=1", "-T5"]
    command.append(f"http://127.0.0.1:{port}/api/items")
    done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 40)
    rate = re.search(r"finished in .*?, ([\d.]+) req/s", done.stdout)
    ok = re.search(r"status codes: (\d+) 2xx", done.stdout)
    if rate is None or ok is None:
        raise RuntimeError(f"h2load: {done.stdout}{done.stderr}")
    return float(rate[1]), int(ok[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="http-over-h2-")))
        setup = make_ca_setup(root)
        ca = stack.enter_context(ca_process(setup.config))
        backend_port, _ = peers.backend(stack, root / "backend")
        (root / "ca").mkdir(parents=True, exist_ok=True)
        (root / "ca" / "bundle.pem").write_bytes((setup.ca_dir / "bundle.pem").read_bytes())
        for name in ("client", "server"):
            token = setup.issuer.token("demo", name, lifetime=timedelta(hours=4))
            (root / f"{name}.token").write_text(token)
        common = {"ca_address": f"127.0.0.1:{ca.grpc_port}", "limits": {"drain_timeout": "2s"}}
        (root / "policy.yaml").write_text(yaml.safe_dump(peers.outrider_policy()))
        server_yaml = agent_yaml(
            root,
            "server",
            inbound=inbound(backend_port, protocol="http"),
            policy={"files": [str(root / "policy.yaml")]},
            **common,
        )
        server = stack.enter_context(agent_process(root, "server", server_yaml))
        upstreams = []
        for name, protocol in (("h1", "http"), ("h2", "http2")):
            [upstream] = outbound(server.bound["inbound[0]"], peers.SERVER, name=name)
            upstream |= {"protocol": protocol, "listen": f"127.0.0.1:{free_port()}"}
            upstreams.append(upstream)
        client_yaml = agent_yaml(root, "client", outbound=upstreams, **common)
        client = stack.enter_context(agent_process(root, "client", client_yaml))
        ports = {n: int(client.bound[f"outbound[{n}]"].rsplit(":", 1)[1]) for n in ("h1", "h2")}
        pids = {"client": client.process.pid, "server": server.process.pid}
        for round_ in range(args.rounds):
            for title, name, h1, clients, streams in ROWS if round_ % 2 == 0 else ROWS[::-1]:
                before = {k: sum(cpu_seconds(p)) for k, p in pids.items()}
                rate, answered = h2load(ports[name], h1, clients, streams, args.seconds)
                used = {k: sum(cpu_seconds(p)) - before[k] for k, p in pids.items()}
                per = {k: f"{v / max(answered, 1) * 1e6:.0f} us" for k, v in used.items()}
                print(f"{title:56s} {rate:7.0f} req/s  agent CPU per request {per}", flush=True)


if __name__ == "__main__":
    main()
