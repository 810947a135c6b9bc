"""An idle agent's memory, and what its imports cost in RSS and in time.

    python -m bench.agent_memory [--top 25] [--settle 2] [--workers 2]

Starts `outrider ca serve` and the two agents of the L7 bench pair (bench/peers.py:
the server with an inbound `protocol: http` port and the 10-rule policy, the client
with an outbound `protocol: http` upstream), and the L4 pair's server (an inbound
`protocol: tcp` port), each as `outrider agent run` the way
tests/mesh.py starts one, with its SVID from the CA. Once each is ready and has sat
idle `--settle` seconds: its footprint (`footprint`): VmRSS, split into anonymous
memory (the heap, Python's objects) and file pages (the interpreter and the shared
libraries, which every agent on a node shares), PSS (each shared page divided among
the processes mapping it), USS (pages of its own) and threads. With `--workers N`,
the server agent again with `workers: N`, and each worker's footprint beside the
main process's. Then the server agent twice more, once under
`python -X importtime` and once with every import's RSS noted (bench/import_rss.py),
and prints the top entries of each table: RSS by top-level package (each module's own
share, summed), RSS and time of the biggest imports (with what they pulled in).
Bounded: every process is stopped on exit; nothing but loopback.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import procs  # noqa: E402
from bench.peers import POLICY_RULES, SERVER, outrider_policy  # noqa: E402
from tests.mesh import agent_process, inbound, outbound, served_agent_yaml  # noqa: E402
from tests.support import CaProcess, CaSetup, ca_process, free_port, make_ca_setup  # noqa: E402

MIB = 1024 * 1024
_IMPORT_TIME = re.compile(r"import time:\s+(\d+) \|\s+(\d+) \| (\s*)(\S+)")
_RSS_HOOK = ("-c", "import bench.import_rss as m; m.run()", "-m", "outrider")


def agent_configs(setup: CaSetup, ca: CaProcess) -> dict[str, dict[str, Any]]:
    """The L7 bench pair's agent.yaml files (the app and the upstream need not answer), and
    the L4 pair's server (`protocol: tcp`): what an agent loads depends on what its config
    uses (h2 for an http port, say: agent.app.import_used)."""
    policy = setup.root / "policy.yaml"
    policy.write_text(yaml.safe_dump(outrider_policy(POLICY_RULES)))
    server = served_agent_yaml(
        setup,
        ca,
        "server",
        inbound=inbound(free_port(), protocol="http"),
        policy={"files": [str(policy)]},
    )
    upstream = outbound(f"127.0.0.1:{free_port()}", SERVER)
    upstream[0]["protocol"] = "http"
    client = served_agent_yaml(setup, ca, "client", outbound=upstream)
    l4_server = served_agent_yaml(setup, ca, "l4-server", inbound=inbound(free_port()))
    return {"server": server, "client": client, "l4 server": l4_server}


def footprint(pid: int) -> dict[str, float]:
    """A process's memory in MiB (rss = anon + file; pss; uss) and its thread count.

    RSS counts every page mapped, shared or not; PSS divides each shared page among
    the processes that map it, so PSS summed over processes is what they take
    together; USS is what ending this process alone would give back.
    """
    status = _fields(Path(f"/proc/{pid}/status").read_text().splitlines())
    rollup = _fields(Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    return {
        "rss": int(status["VmRSS"].split()[0]) / 1024,
        "anon": int(status["RssAnon"].split()[0]) / 1024,
        "file": int(status["RssFile"].split()[0]) / 1024,
        "pss": int(rollup["Pss"].split()[0]) / 1024,
        "uss": sum(int(rollup[key].split()[0]) for key in ("Private_Clean", "Private_Dirty"))
        / 1024,
        "threads": int(status["Threads"]),
    }


def _fields(lines: list[str]) -> dict[str, str]:
    return dict(line.split(":", 1) for line in lines if ":" in line)


def children(pid: int) -> list[int]:
    """A process's child processes (an agent's workers), oldest first."""
    return sorted(int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split())


def idle_footprints(
    root: Path,
    name: str,
    raw: dict[str, Any],
    settle: float,
    launcher: Sequence[str] = ("-m", "outrider"),
    env: dict[str, str] | None = None,
) -> tuple[dict[str, dict[str, float]], list[str]]:
    """Once ready and idle `settle` seconds: the footprint of the agent (`name`) and of
    each of its workers (`name worker N`), and the agent's log."""
    with agent_process(root, name, raw, launcher=launcher, env=env) as agent:
        time.sleep(settle)  # idle on purpose: what a quiet sidecar holds
        pid = agent.process.pid
        found = {name: footprint(pid)}
        for index, child in enumerate(children(pid)):
            found[f"{name} worker {index}"] = footprint(child)
        agent.stop()
        return found, list(agent.log)


def idle_rss(
    root: Path,
    name: str,
    raw: dict[str, Any],
    settle: float,
    launcher: Sequence[str] = ("-m", "outrider"),
    env: dict[str, str] | None = None,
) -> tuple[float, list[str]]:
    """An agent's VmRSS (MiB) once ready and idle `settle` seconds, and its log."""
    found, log = idle_footprints(root, name, raw, settle, launcher, env)
    return found[name]["rss"], log


def import_times(log: list[str]) -> list[tuple[str, int, int, int]]:
    """(module, self us, cumulative us, nesting) from `-X importtime` lines."""
    rows = []
    for line in log:
        if match := _IMPORT_TIME.search(line):
            rows.append((match[4], int(match[1]), int(match[2]), len(match[3]) // 2))
    return rows


def by_package(records: list[dict[str, Any]]) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for record in records:
        totals[record["module"].split(".")[0]] += record["self"]
    return dict(totals)


def report(
    rss: dict[str, dict[str, float]], times: list[tuple[str, int, int, int]], hook: Any, top: int
) -> None:
    print("idle footprint (MiB):")
    print(f"  {'process':24} {'RSS':>6} {'anon':>6} {'file':>6} {'PSS':>6} {'USS':>6} threads")
    for name, f in rss.items():
        print(
            f"  {name:24} {f['rss']:6.1f} {f['anon']:6.1f} {f['file']:6.1f}"
            f" {f['pss']:6.1f} {f['uss']:6.1f} {f['threads']:7d}"
        )
    records = hook["records"]
    loaded = sum(r["new_modules"] for r in records if r["depth"] == 0)
    print(
        f"\nserver agent, RSS hook: {hook['start'] / MIB:.1f} MiB before any import,"
        f" {hook['end'] / MIB:.1f} MiB at exit; {loaded} modules loaded by import statements"
    )
    print(f"\nRSS by top-level package (own share of each module, summed), top {top}:")
    for package, grown in sorted(by_package(records).items(), key=lambda kv: -kv[1])[:top]:
        print(f"  {grown / MIB:6.2f} MiB  {package}")
    print(f"\nbiggest imports by RSS, with what they loaded (inclusive), top {top}:")
    for record in sorted(records, key=lambda r: -r["inclusive"])[:top]:
        print(
            f"  {record['inclusive'] / MIB:6.2f} MiB  self {record['self'] / MIB:5.2f}"
            f"  {'  ' * record['depth']}{record['module']} (+{record['new_modules']} modules)"
        )
    total = sum(row[1] for row in times)
    print(f"\n-X importtime: {total / 1000:.0f} ms in {len(times)} imports; top {top} cumulative:")
    for module, own, cumulative, depth in sorted(times, key=lambda r: -r[2])[:top]:
        print(f"  {cumulative / 1000:7.1f} ms  self {own / 1000:6.1f}  {'  ' * depth}{module}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--settle", type=float, default=2.0)
    parser.add_argument(
        "--workers", type=int, default=0, help="also the server agent with `workers: N`"
    )
    args = parser.parse_args()
    procs.bytecode()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        root = Path(tmp)
        setup = make_ca_setup(root)
        ca = stack.enter_context(ca_process(setup.config))
        configs = agent_configs(setup, ca)
        rss: dict[str, dict[str, float]] = {}
        for name, raw in configs.items():
            rss.update(idle_footprints(root, name, raw, args.settle)[0])
        if args.workers > 1:
            raw = {**configs["server"], "workers": args.workers}
            named = f"server.workers{args.workers}"
            rss.update(idle_footprints(root, named, raw, args.settle)[0])
        _, log = idle_rss(
            root, "server", configs["server"], 0, ("-X", "importtime", "-m", "outrider")
        )
        hook_file = root / "import_rss.json"
        hook_env = {"OUTRIDER_IMPORT_RSS": str(hook_file)}
        idle_rss(root, "server", configs["server"], 0, _RSS_HOOK, hook_env)
        report(rss, import_times(log), json.loads(hook_file.read_text()), args.top)


if __name__ == "__main__":
    main()
