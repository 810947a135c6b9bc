"""CA issuance with the root in Vault, beside the local signer and Vault's own issuance.

One run, on the same machine, in alternating rounds:
  local            `ca serve` with the local intermediate key
  vault-inter      `ca serve`, signer vault, mode intermediate (leaves signed locally)
  vault-percert    `ca serve`, signer vault, mode per-certificate (Vault signs each leaf)
  openbao-sign     OpenBao's own `pki/sign/<role>` on a CSR, from 8 threads
all against one real OpenBao dev server on loopback. The three CAs are
measured like bench/ca_issuance.py: 16 gRPC clients, a fresh token and CSR
per call. Medians with min-max; ratios are of the local signer.

    python bench/ca_vault.py [--quick] [--clients 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.ca_issuance import RESULTS, grpc_rate
from tests.openbao import OUTRIDER_CA_POLICY, SVID_ROLE, OpenBao
from tests.support import CaSetup, ca_process, make_ca_setup

SIGNERS = ("local", "vault-inter", "vault-percert")


def vault_setup(root: Path, bao: OpenBao, mode: str) -> CaSetup:
    role_id, secret_id = bao.setup_approle(OUTRIDER_CA_POLICY, role=f"bench-{mode}")
    root.mkdir(parents=True)
    (root / "secret-id").write_text(secret_id)
    auth = {"method": "approle", "role_id": role_id, "secret_id_file": "secret-id"}
    signer = {"kind": "vault", "mode": mode, "address": bao.address, "auth": auth}
    setup = make_ca_setup(root, signer=signer, audit_log="audit.log")
    root_pem = bao.client().secrets.pki.read_ca_certificate().strip() + "\n"
    (setup.ca_dir / "bundle.pem").write_text(root_pem)
    return setup


def openbao_sign_rate(bao: OpenBao, seconds: float, threads: int = 8) -> float:
    """Certificates per second from Vault's own pki/sign, each thread with its own CSR."""
    count, lock = 0, threading.Lock()
    deadline = time.perf_counter() + seconds

    def worker() -> None:
        nonlocal count
        client, csr = bao.client(), _csr_pem()
        while time.perf_counter() < deadline:
            client.write_data(
                f"pki/sign/{SVID_ROLE}",
                data={"csr": csr, "uri_sans": "spiffe://example.org/ns/bench/sa/client"},
            )
            with lock:
                count += 1

    started = time.perf_counter()
    workers = [threading.Thread(target=worker) for _ in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(seconds + 30)
    return count / (time.perf_counter() - started)


def _csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def summary(values: list[float], unit: str = "") -> str:
    return f"{statistics.median(values):8.0f}{unit} ({min(values):.0f}-{max(values):.0f})"


def measure(
    rounds: int, seconds: float, clients: int, per_client: int
) -> dict[str, list[dict[str, float]]]:
    """Each signer's rate per round: our three CAs over gRPC, then OpenBao's pki/sign."""
    results: dict[str, list[dict[str, float]]] = {name: [] for name in (*SIGNERS, "openbao")}
    with tempfile.TemporaryDirectory(prefix="outrider-bench-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        bao = stack.enter_context(OpenBao(root / "openbao", kind="dev"))
        bao.setup_pki()
        setups = {
            "local": make_ca_setup(root / "local", audit_log="audit.log"),
            "vault-inter": vault_setup(root / "inter", bao, "intermediate"),
            "vault-percert": vault_setup(root / "percert", bao, "per-certificate"),
        }
        cas = {name: stack.enter_context(ca_process(s.config)) for name, s in setups.items()}
        for number in range(1, rounds + 1):
            for name in SIGNERS:
                rate, p50, p99, errors, _ = asyncio.run(
                    grpc_rate(setups[name], cas[name].grpc_port, clients, seconds, per_client)
                )
                results[name].append({"rate": rate, "p50": p50, "p99": p99, "errors": errors})
                print(
                    f"round {number}/{rounds} {name:13}: {rate:6.0f}/s p50 {p50:.1f} ms "
                    f"p99 {p99:.1f} ms errors {errors}",
                    file=sys.stderr,
                )
            rate = openbao_sign_rate(bao, seconds)
            results["openbao"].append({"rate": rate})
            print(f"round {number}/{rounds} openbao-sign:  {rate:6.0f}/s", file=sys.stderr)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s phases, 1 round")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    seconds, rounds = (2.0, 1) if args.quick else (args.seconds, args.rounds)
    results = measure(rounds, seconds, args.clients, 600 if args.quick else 3000)

    local = statistics.median(r["rate"] for r in results["local"])
    print(
        f"\nCA issuance with Vault (OpenBao dev, loopback), {rounds} round(s) of {seconds:.0f} s, "
        f"{os.cpu_count()} CPUs, {args.clients} gRPC clients; median (min-max)"
    )
    print(f"  {'signer':28} {'SVIDs/s':>22}  {'p50 ms':>7} {'p99 ms':>7} {'x local':>8} errors")
    labels = {
        "local": "ca serve, local key",
        "vault-inter": "ca serve, vault intermediate",
        "vault-percert": "ca serve, vault per-cert",
    }
    for name in SIGNERS:
        runs = results[name]
        rates = [r["rate"] for r in runs]
        print(
            f"  {labels[name]:28} {summary(rates)}  "
            f"{statistics.median(r['p50'] for r in runs):7.1f} "
            f"{statistics.median(r['p99'] for r in runs):7.1f} "
            f"{statistics.median(rates) / local:8.2f} {sum(int(r['errors']) for r in runs)}"
        )
    rates = [r["rate"] for r in results["openbao"]]
    print(
        f"  {'OpenBao pki/sign, 8 threads':28} {summary(rates)}  {'':7} {'':7} "
        f"{statistics.median(rates) / local:8.2f}"
    )
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = RESULTS / f"ca-vault-{stamp}.json"
    record: dict[str, Any] = {"clients": args.clients, "seconds": seconds, "results": results}
    out.write_text(json.dumps(record, indent=2))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
