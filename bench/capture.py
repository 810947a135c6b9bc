"""Transparent capture's added latency: the same requests by the captured and the explicit path.

On one pod pair (tests/mesh_cluster.py `capture_cluster`: pods as network namespaces,
real nftables rules from each pod's `outrider-capture` init container, agents as UID
1337, the control plane and the CA on the node), the frontend's app sends HTTP/1.1
GETs on one kept-alive connection each way:

    captured:  the app -> the backend Service's ClusterIP:8080 -> nft redirect ->
               its agent's outbound capture (SO_ORIGINAL_DST -> the upstream) -> mTLS
    explicit:  the app -> its agent's 127.0.0.1:15001 (`outrider.io/upstreams`) -> mTLS

Both reach the same upstream and the same backend agent (its inbound capture) and app.
The requests alternate between the two paths (which goes first alternates too), one at a
time, so both see the same machine; each request's time is from just before its write (or
its connect) to its last body byte. Two modes, one after the other: on a kept-alive
connection each way (capture's cost per request), and with a new connection for every
request (its cost per connection). Printed: median and p99 (nearest rank) of each, their
ratios, and the capture's added milliseconds. Needs root (network namespaces, nftables).
Bounded in count and time; every process is stopped on exit. The last line is
`RESULT {json}` for bench/run.py; the result also goes to
bench/results/capture-<timestamp>.json.

    python -m bench.capture [--quick] [--requests 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import report  # noqa: E402
from bench.control_plane import percentile  # noqa: E402
from tests.mesh_cluster import BACKEND_VIP, App, capture_cluster, wait_until  # noqa: E402
from tests.netns import pod_network  # noqa: E402

PATHS = ("captured", "explicit")
#: keepalive: one connection each way for every request (what capture costs per request);
#: new_connection: a connection per request (what it costs per connection: the redirect,
#: SO_ORIGINAL_DST, the lookup of the destination).
MODES = ("keepalive", "new_connection")
TITLES = {"keepalive": "kept-alive connection", "new_connection": "a connection per request"}
WARMUP = 200
#: Each mode's time cap, in seconds.
CAP = 60.0


def summarize(samples: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Per mode: median and p99 per path in ms, the ratios captured / explicit, the added ms."""
    result: dict[str, Any] = {}
    for mode, paths in samples.items():
        rows = {}
        for path, seconds in paths.items():
            ms = [s * 1000 for s in seconds]
            rows[path] = {
                "requests": len(ms),
                "p50_ms": round(statistics.median(ms), 3),
                "p99_ms": round(percentile(ms, 99), 3),
            }
        captured, explicit = rows["captured"], rows["explicit"]
        result[mode] = {
            "rows": rows,
            "p50_ratio": round(captured["p50_ms"] / explicit["p50_ms"], 3),
            "p99_ratio": round(captured["p99_ms"] / explicit["p99_ms"], 3),
            "added_p50_ms": round(captured["p50_ms"] - explicit["p50_ms"], 3),
            "added_p99_ms": round(captured["p99_ms"] - explicit["p99_ms"], 3),
        }
    return result


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| the app calls | connections | requests | p50 ms | p99 ms | x explicit p50 / p99"
        " | added p50 / p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    labels = {
        "captured": f"the Service `{BACKEND_VIP}:8080` (captured)",
        "explicit": "its agent's `127.0.0.1:15001` (explicit)",
    }
    for mode in MODES:
        if mode not in result:
            continue
        figures = result[mode]
        for path in PATHS:
            row = figures["rows"][path]
            line = (
                f"| {labels[path]} | {TITLES[mode]} | {row['requests']}"
                f" | {row['p50_ms']:.3f} | {row['p99_ms']:.3f}"
            )
            if path == "captured":
                line += (
                    f" | {figures['p50_ratio']:.2f} / {figures['p99_ratio']:.2f}"
                    f" | {figures['added_p50_ms']:+.3f} / {figures['added_p99_ms']:+.3f} |"
                )
            else:
                line += " | - | - |"
            lines.append(line)
    return lines


async def one_mode(clients: dict[str, App], mode: str, requests: int) -> dict[str, list[float]]:
    """`requests` timed GETs each way (after WARMUP untimed), alternating, within CAP."""
    samples: dict[str, list[float]] = {path: [] for path in PATHS}
    deadline = time.monotonic() + CAP
    for i in range(WARMUP + requests):
        if time.monotonic() > deadline:
            break
        for path in PATHS if i % 2 else reversed(PATHS):
            client = clients[path]
            started = time.perf_counter()
            code, _ = await client.request("GET", "/bench")
            took = time.perf_counter() - started
            if mode == "new_connection":
                client.close()  # the next request connects anew (timed with it)
            if code != 200:
                raise RuntimeError(f"{path}, {mode}: HTTP {code}")
            if i >= WARMUP:
                samples[path].append(took)
    if not samples["captured"]:
        raise RuntimeError(f"{mode}: no request measured within {CAP:.0f} s")
    return samples


async def measure(requests: int) -> dict[str, dict[str, list[float]]]:
    with tempfile.TemporaryDirectory(prefix="outrider-bench-capture-") as tmp, pod_network() as net:
        async with capture_cluster(Path(tmp), net) as cluster:
            a = cluster.frontend
            clients = {"captured": App(a, 8080, BACKEND_VIP), "explicit": App(a, 15001)}

            async def both_answer() -> bool:
                try:
                    codes = [(await c.request("GET", "/bench"))[0] for c in clients.values()]
                except (OSError, asyncio.IncompleteReadError, TimeoutError):
                    return False
                return codes == [200, 200]

            await wait_until(both_answer, 20, "both paths answer")
            try:
                return {mode: await one_mode(clients, mode, requests) for mode in MODES}
            finally:
                for client in clients.values():
                    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 requests each way and mode")
    parser.add_argument("--requests", type=int, default=5000, help="requests each way and mode")
    args = parser.parse_args()
    if args.requests < 1:
        parser.error("--requests: 1 or more")
    requests = 1000 if args.quick else args.requests
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    import uvloop

    samples = uvloop.run(measure(requests))
    result = summarize(samples)
    print("\n".join(table(result)))
    report.save("capture", result)


if __name__ == "__main__":
    main()
