"""Admission latency: `outrider injector serve` answering concurrent AdmissionReviews.

A real injector process on loopback (HTTPS, a self-signed certificate), and
200 concurrent clients, each request a recorded Deployment pod
(tests/fixtures/admission/deployment_pod.json) with its own uid, in rounds of
200 after one warm-up round (TLS handshakes, keep-alive as the API server
does). Every answer is checked: 200, an AdmissionReview for that uid, a
patch. Bounded by rounds and by time. Prints p50/p99 latency, throughput and
the injector's CPU per admission, the latency of requests sent one at a
time; also how fast a 10 MB and a 10 000-deep
body are refused. The last line is `RESULT {json}` for the harness; the full
result goes to bench/results/admission-<timestamp>.json.

    python bench/admission.py [--quick] [--concurrency 200] [--rounds 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.support import loopback_tls, wait_for_line  # noqa: E402

RESULTS = ROOT / "bench" / "results"
LOG: list[str] = []
REVIEW = json.loads((ROOT / "tests/fixtures/admission/deployment_pod.json").read_text())
READY = re.compile(r"serving /mutate on https://[^ ]+:(\d+)")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def body(uid: str) -> bytes:
    review = {**REVIEW, "request": {**REVIEW["request"], "uid": uid}}
    return json.dumps(review).encode()


async def one(session: aiohttp.ClientSession, url: str) -> float:
    uid = str(uuid.uuid4())
    data = body(uid)
    started = time.perf_counter()
    async with session.post(url, data=data, headers={"Content-Type": "application/json"}) as r:
        answer = await r.read()
        seconds = time.perf_counter() - started
    response = json.loads(answer)["response"]
    if r.status != 200 or response["uid"] != uid or "patch" not in response:
        raise AssertionError(f"bad answer: HTTP {r.status} {answer[:200]!r}")
    return seconds


async def refusal_ms(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, float]:
    started = time.perf_counter()
    async with session.post(url, data=data) as r:
        await r.read()
        return r.status, (time.perf_counter() - started) * 1000


async def load(port: int, context: ssl.SSLContext, concurrency: int, rounds: int, cap: float):
    url = f"https://127.0.0.1:{port}/mutate"
    connector = aiohttp.TCPConnector(ssl=context, limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session, url) for _ in range(concurrency)))  # warm-up
        latencies: list[float] = []
        elapsed, deadline = 0.0, time.monotonic() + cap
        for _ in range(rounds):
            if time.monotonic() > deadline:
                break
            started = time.perf_counter()
            latencies += await asyncio.gather(*(one(session, url) for _ in range(concurrency)))
            elapsed += time.perf_counter() - started
        # One at a time: the latency without queueing behind the other 199.
        serial = [await one(session, url) for _ in range(concurrency)]
        large = await refusal_ms(session, url, b"{" + b" " * 10_000_000 + b"}")
        deep = await refusal_ms(session, url, b"[" * 10_000 + b"]" * 10_000)
    return latencies, elapsed, serial, large, deep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=60.0, help="time cap for the rounds")
    args = parser.parse_args()
    rounds, cap = (3, 10.0) if args.quick else (args.rounds, args.seconds)

    with tempfile.TemporaryDirectory(prefix="outrider-bench-") as tmp:
        root = Path(tmp)
        tls = loopback_tls(root, "injector")
        config = root / "injector.yaml"
        config.write_text(
            yaml.safe_dump(
                {"listen": "127.0.0.1:0", "tls": {"cert_file": "cert.pem", "key_file": "key.pem"}}
            )
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "outrider", "injector", "serve", "--config", str(config)],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        try:
            port = int(wait_for_line(process, READY, LOG, 20.0, "injector")[1])
            context = ssl.create_default_context(cafile=tls.ca_file)
            cpu_before = cpu_seconds(process.pid)
            latencies, elapsed, serial, large, deep = asyncio.run(
                load(port, context, args.concurrency, rounds, cap)
            )
            cpu = cpu_seconds(process.pid) - cpu_before
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                print("".join(LOG), file=sys.stderr)
                raise

    ms = sorted(x * 1000 for x in latencies)
    n = len(ms)
    result = {
        "p50_ms": round(statistics.median(ms), 2),
        "p99_ms": round(ms[min(n - 1, int(n * 0.99))], 2),
        "per_s": round(n / elapsed, 1),
        "n": n,
    }
    extra = {
        "concurrency": args.concurrency,
        "max_ms": round(ms[-1], 2),
        "serial_p50_ms": round(statistics.median(serial) * 1000, 2),
        "injector_cpu_ms_per_admission": round(cpu * 1000 / (n + 2 * args.concurrency + 2), 3),
        "too_large_10mb": {"status": large[0], "ms": round(large[1], 1)},
        "too_deep_10000": {"status": deep[0], "ms": round(deep[1], 1)},
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    print(f"{n} admissions at concurrency {args.concurrency} over HTTPS on loopback")
    print(
        f"  latency p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, max {extra['max_ms']} ms"
    )
    print(f"  throughput {result['per_s']} admissions/s")
    print(f"  one at a time: p50 {extra['serial_p50_ms']} ms")
    print(f"  injector CPU per admission {extra['injector_cpu_ms_per_admission']} ms")
    print(f"  10 MB body: HTTP {large[0]} in {large[1]:.1f} ms")
    print(f"  10 000-deep JSON: HTTP {deep[0]} in {deep[1]:.1f} ms")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    (RESULTS / f"admission-{stamp}.json").write_text(json.dumps(result | extra, indent=2) + "\n")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
