"""CA issuance throughput: over gRPC on loopback beside raw in-process signing.

One run measures, on the same machine and in alternating rounds:
  raw     ECDSA P-256 certificate signing in process (template + sign only)
  issue   the CA's full in-process path (plan, sign, check what was signed)
  grpc    `outrider ca serve` as a real process, 16 concurrent clients each on
          its own TLS connection, every call with a fresh ServiceAccount token
          and CSR (token verification, CSR checks, audit log included)

Medians over rounds are printed with min-max, and grpc as a ratio of raw.
Every loop is bounded by count and by time. Results go to
bench/results/ca-issuance-<timestamp>.json.

    python bench/ca_issuance.py [--quick] [--clients 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ca.core import template
from ca.core.issuance import IssuancePolicy, plan_leaf
from ca.issuer import Issuer
from ca.signers.local import LocalSigner
from identity import SpiffeId
from identity.proto import ca_pb2
from tests.support import TRUST_DOMAIN, ca_process, grpcio_channel, grpcio_sign, make_ca_setup

RESULTS = Path(__file__).resolve().parent / "results"
WORKLOAD = SpiffeId.for_workload(TRUST_DOMAIN, "bench", "client")


@dataclass
class Round:
    raw_per_s: float
    issue_per_s: float
    grpc_per_s: float
    grpc_p50_ms: float
    grpc_p99_ms: float
    grpc_errors: int
    ca_cpu_ms_per_cert: float


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc (Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timed_loop(step, seconds: float, limit: int) -> float:
    """Calls per second of `step`, bounded by count and time."""
    count, start = 0, time.perf_counter()
    while count < limit and time.perf_counter() - start < seconds:
        step()
        count += 1
    return count / (time.perf_counter() - start)


def raw_signing_rate(signer: LocalSigner, seconds: float) -> float:
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    now = datetime.now(UTC)

    def step() -> None:
        request = plan_leaf(
            WORKLOAD,
            key,
            None,
            IssuancePolicy(),
            signer.issuer.not_valid_after_utc,
            now,
            x509.random_serial_number(),
        )
        template.leaf(request, signer.issuer).sign(signer._key, hashes.SHA256())

    return _timed_loop(step, seconds, 1_000_000)


def issue_rate(signer: LocalSigner, seconds: float) -> float:
    issuer = Issuer(signer, IssuancePolicy(), lambda: datetime.now(UTC))
    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    loop = asyncio.new_event_loop()
    try:
        return _timed_loop(
            lambda: loop.run_until_complete(issuer.issue(WORKLOAD, key)), seconds, 1_000_000
        )
    finally:
        loop.close()


def _csr() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


async def grpc_rate(setup, port: int, clients: int, seconds: float, per_client: int):
    """Closed loop: each client sends its next call when the last one returns."""
    bundle = setup.bundle_pem
    # Requests are prepared before the clock starts: the load generator's own
    # key generation must not be counted against the CA.
    work = [
        [
            (setup.issuer.token("bench", "client", lifetime=timedelta(hours=1)), _csr())
            for _ in range(per_client)
        ]
        for _ in range(clients)
    ]
    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + seconds

    async def client(jobs) -> None:
        nonlocal errors
        async with grpcio_channel(bundle, port) as channel:
            sign = grpcio_sign(channel)
            await channel.channel_ready()
            await ready.wait()
            for token, csr in jobs:
                if time.perf_counter() > deadline:
                    break
                started = time.perf_counter()
                try:
                    await sign(
                        ca_pb2.SignRequest(csr=csr),
                        metadata=[("authorization", f"Bearer {token}")],
                        timeout=10,
                    )
                except grpc.aio.AioRpcError:
                    errors += 1
                    continue
                latencies.append(time.perf_counter() - started)

    ready = asyncio.Event()
    tasks = [asyncio.create_task(client(jobs)) for jobs in work]
    await asyncio.sleep(0.5)  # let every channel finish its handshake
    start = time.perf_counter()
    deadline = start + seconds
    ready.set()
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - start
    latencies.sort()
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000  # noqa: E731
    return len(latencies) / elapsed, p(0.5), p(0.99), errors, len(latencies)


def summary(values: list[float]) -> str:
    return f"{statistics.median(values):9.1f}  ({min(values):.1f}-{max(values):.1f})"


def measure(rounds: int, seconds: float, clients: int, per_client: int) -> list[Round]:
    """Alternate raw, in-process and gRPC issuance for `rounds` rounds."""
    done: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="outrider-bench-") as tmp:
        setup = make_ca_setup(Path(tmp), audit_log="audit.log")
        signer = LocalSigner.load(setup.ca_dir)
        with ca_process(setup.config) as ca:
            for number in range(1, rounds + 1):
                raw = raw_signing_rate(signer, seconds)
                issue = issue_rate(signer, seconds)
                cpu_before = cpu_seconds(ca.process.pid)
                rate, p50, p99, errors, count = asyncio.run(
                    grpc_rate(setup, ca.grpc_port, clients, seconds, per_client)
                )
                cpu_ms = (cpu_seconds(ca.process.pid) - cpu_before) * 1000 / max(count, 1)
                done.append(Round(raw, issue, rate, p50, p99, errors, cpu_ms))
                print(
                    f"round {number}/{rounds} ca issuance: raw {raw:.0f}/s, issue {issue:.0f}/s,"
                    f" grpc {rate:.0f}/s p50 {p50:.1f} ms p99 {p99:.1f} ms, errors {errors}",
                    file=sys.stderr,
                )
    return done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s phases, 2 rounds")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    seconds, rounds = (1.0, 2) if args.quick else (args.seconds, args.rounds)
    rounds_done = measure(rounds, seconds, args.clients, 600 if args.quick else 4000)

    col = lambda name: [getattr(r, name) for r in rounds_done]  # noqa: E731
    raw_median = statistics.median(col("raw_per_s"))
    print(
        f"\nCA issuance, {rounds} rounds of {seconds:.0f} s, {os.cpu_count()} CPUs, "
        f"{args.clients} gRPC clients (median, min-max)"
    )
    print(f"  raw P-256 cert signing, in process  {summary(col('raw_per_s'))} certs/s")
    print(f"  full issuance path, in process      {summary(col('issue_per_s'))} certs/s")
    print(
        f"  ca serve over gRPC+TLS, loopback    {summary(col('grpc_per_s'))} certs/s"
        f"   = {statistics.median(col('grpc_per_s')) / raw_median:.2f} x raw"
    )
    print(f"  gRPC latency p50                    {summary(col('grpc_p50_ms'))} ms")
    print(f"  gRPC latency p99                    {summary(col('grpc_p99_ms'))} ms")
    print(f"  CA process CPU per issued SVID      {summary(col('ca_cpu_ms_per_cert'))} ms")
    print(f"  gRPC errors                         {sum(col('grpc_errors'))}")
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"ca-issuance-{stamp}.json"
    out.write_text(
        json.dumps(
            {
                "clients": args.clients,
                "seconds": seconds,
                "rounds": [asdict(r) for r in rounds_done],
            },
            indent=2,
        )
    )
    print(f"\nresults: {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out}")


if __name__ == "__main__":
    main()
