"""Load generators, pinned to CPU 0: wrk (closed loop) and h2load (a fixed request rate)."""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Load:
    requests: int
    per_s: float
    p50_ms: float
    p99_ms: float
    errors: int
    detail: dict[str, int] = field(default_factory=dict)  # error kind -> count


def _pinned(command: list[str]) -> list[str]:
    return ["taskset", "-c", "0", *command] if shutil.which("taskset") else command


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def parse_wrk(output: str) -> Load:
    # wrk pads a time of a second or more: "99%    1.30s ".
    percentile = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", output, re.M))
    requests = re.search(r"^\s*(\d+) requests in", output, re.M)
    per_s = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    if not (requests and per_s and "50" in percentile and "99" in percentile):
        raise RuntimeError(f"unexpected wrk output:\n{output}")
    detail = {}
    if non_2xx := re.search(r"Non-2xx or 3xx responses: (\d+)", output):
        detail["non_2xx"] = int(non_2xx[1])
    if sockets := re.search(r"Socket errors: (.*)$", output, re.M):
        detail |= {k: int(v) for k, v in re.findall(r"(\w+) (\d+)", sockets[1]) if int(v)}
    return Load(
        int(requests[1]),
        float(per_s[1]),
        _ms(percentile["50"]),
        _ms(percentile["99"]),
        sum(detail.values()),
        detail,
    )


def wrk(port: int, seconds: float, connections: int, *, close: bool = False) -> Load:
    """Closed loop: `connections` keep-alive connections, or one connection per request."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{max(seconds, 1):.0f}s", "--latency"]
    command += ["--timeout", "5s", f"http://127.0.0.1:{port}/api/items"]
    if close:
        command[1:1] = ["-H", "Connection: close"]
    done = subprocess.run(_pinned(command), capture_output=True, text=True, timeout=seconds + 30)
    if done.returncode != 0:
        raise RuntimeError(f"wrk exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return parse_wrk(done.stdout)


def fixed_rate(port: int, seconds: float, rate: int, connections: int = 50) -> Load:
    """Open loop at `rate` requests/s spread over `connections` (h2load --rps, HTTP/1.1).

    h2load prints no percentiles, so each request's latency comes from its log file.
    """
    per_client = max(rate // connections, 1)
    with tempfile.TemporaryDirectory(prefix="outrider-h2load-") as tmp:
        log = Path(tmp) / "requests.tsv"
        command = ["h2load", "--h1", f"-c{connections}", f"--rps={per_client}"]
        # The first request on each connection waits for the proxies' handshakes (50 at
        # once): a warm-up second keeps them out of the measured latencies.
        command += [f"-D{max(seconds, 1):.0f}", "--warm-up-time=1", f"--log-file={log}", "-T5"]
        command.append(f"http://127.0.0.1:{port}/api/items")
        done = subprocess.run(
            _pinned(command), capture_output=True, text=True, timeout=seconds + 31
        )
        if done.returncode != 0:
            raise RuntimeError(f"h2load exited {done.returncode}:\n{done.stdout}{done.stderr}")
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    latencies = sorted(int(row[2]) / 1000 for row in rows if row[1] == "200")
    counts = re.search(r"requests: (\d+) total, .* (\d+) succeeded", done.stdout)
    errors = int(counts[1]) - len(latencies) if counts else len(rows) - len(latencies)
    if not latencies:
        raise RuntimeError(f"h2load completed no request:\n{done.stdout}")
    cut = statistics.quantiles(latencies, n=100, method="inclusive")
    return Load(len(latencies), len(latencies) / seconds, cut[49], cut[98], errors)
