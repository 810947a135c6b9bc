"""`outrider demo`: the CA part of the mesh on loopback, start to finish.

It creates a trust domain, serves the CA, and walks one workload through
what the agent will do in a pod: authenticate with its ServiceAccount token,
get an SVID, renew it with that SVID, and watch an impostor be refused.
The tokens come from a fake Kubernetes issuer, since no cluster runs here.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpclib.exceptions import GRPCError

from agent.adapters.ca_client import CaClient, tls_context
from ca import config as ca_config
from ca.app import Bound, serve
from ca.authn.fake_issuer import FakeTokenIssuer
from ca.signers.local import init_ca
from identity import TrustDomain

TRUST_DOMAIN = TrustDomain("demo.outrider.local")
SERVER_NAME = "localhost"


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _pem(ders: list[bytes]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(d).public_bytes(serialization.Encoding.PEM) for d in ders
    )


def _show(step: str, detail: str = "") -> None:
    print(f"\n== {step}" + (f"\n{detail}" if detail else ""))


def _openssl_summary(workdir: Path, chain: list[bytes]) -> str:
    """What an auditor sees: openssl's verdict and the identity fields of the leaf."""
    if shutil.which("openssl") is None:
        return "(openssl not installed; skipping its checks)"
    (workdir / "leaf.pem").write_bytes(_pem(chain[:1]))
    (workdir / "intermediate.pem").write_bytes(_pem(chain[1:]))
    # openssl from PATH on purpose: the auditor's own tool, not ours.
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-CAfile",
            "ca/root.pem",
            "-untrusted",
            "intermediate.pem",
            "leaf.pem",
        ],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    text = subprocess.run(
        ["openssl", "x509", "-in", "leaf.pem", "-noout", "-text"],
        cwd=workdir,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    wanted = ("Not Before", "Not After", "URI:", "CA:", "Digital Signature", "TLS Web")
    fields = [line.strip() for line in text if line.strip().startswith(wanted)]
    return "\n".join(
        [f"openssl verify -x509_strict: {verify.stdout.strip() or verify.stderr}", *fields]
    )


async def _walkthrough(workdir: Path, bound: Bound, issuer: FakeTokenIssuer) -> dict[str, str]:
    bundle_pem = (workdir / "ca" / "bundle.pem").read_bytes()
    host, port = bound.grpc
    key = ec.generate_private_key(ec.SECP256R1())
    token = issuer.token("shop", "web", pod_name="web-7d9f-abcde")
    async with CaClient(host, port, tls_context(bundle_pem), SERVER_NAME) as client:
        first = await client.sign(_csr(key), token=token)
    _show(f"1. pod shop/web authenticated with its ServiceAccount token -> {first.spiffe_id}")
    print(await asyncio.to_thread(_openssl_summary, workdir, list(first.cert_chain)))

    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    renewing = tls_context(bundle_pem, _pem(list(first.cert_chain)), key_pem)
    async with CaClient(host, port, renewing, SERVER_NAME) as client:
        renewed = await client.sign(_csr(ec.generate_private_key(ec.SECP256R1())))
    _show(f"2. renewed with its current SVID (new key, no token) -> {renewed.spiffe_id}")

    outcomes = {"issued": first.spiffe_id, "renewed": renewed.spiffe_id}
    async with CaClient(host, port, tls_context(bundle_pem), SERVER_NAME) as client:
        for label, bad_token in (
            ("a token for another audience", issuer.token("shop", "web", audience="vault")),
            ("a token signed by an unknown key", FakeTokenIssuer().token("shop", "web")),
        ):
            try:
                await client.sign(_csr(key), token=bad_token)
            except GRPCError as exc:
                outcomes[label] = f"{exc.status.name}: {exc.message}"
    _show("3. impostors refused", "\n".join(f"   {k}: {v}" for k, v in list(outcomes.items())[2:]))

    http_host, http_port = bound.http
    url = f"http://{http_host}:{http_port}/metrics"
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        metrics = await response.text()
    csr_lines = [line for line in metrics.splitlines() if line.startswith("outrider_ca_csr_total")]
    _show("4. CA metrics (/metrics)", "\n".join(f"   {line}" for line in csr_lines))
    return outcomes


async def _main(duration: float) -> None:
    with tempfile.TemporaryDirectory(prefix="outrider-demo-") as tmp:
        workdir = Path(tmp)
        init_ca(workdir / "ca", TRUST_DOMAIN, datetime.now(UTC), force=False)
        issuer = FakeTokenIssuer()
        (workdir / "jwks.json").write_text(json.dumps(issuer.jwks()))
        config = ca_config.parse(
            {
                "signer": {"dir": "ca"},
                "listen": {"grpc": "127.0.0.1:0", "http": "127.0.0.1:0"},
                "serving_cert": {"names": [SERVER_NAME, "127.0.0.1"]},
                "authn": {"kubernetes": {"issuer": issuer.issuer, "jwks_file": "jwks.json"}},
                "audit_log": "audit.log",
            },
            base=workdir,
        )
        _show(f"0. trust domain {TRUST_DOMAIN}: root and intermediate CA created in {workdir}/ca")
        stop = asyncio.Event()
        ready: asyncio.Future[Bound] = asyncio.get_running_loop().create_future()
        server = asyncio.create_task(serve(config, stop, on_ready=ready))
        try:
            bound = await asyncio.wait_for(asyncio.shield(ready), timeout=30)
            outcomes = await _walkthrough(workdir, bound, issuer)
            audit = (workdir / "audit.log").read_text().splitlines()
            _show("5. audit log (one JSON line per decision)", "\n".join(audit))
            if duration > 0:
                _show(f"CA keeps serving on {bound.grpc} for {duration:.0f}s (Ctrl-C to stop)")
                await asyncio.sleep(duration)
        finally:
            stop.set()
            await server
    refused = len(outcomes) - 2
    print(f"\nsummary: 2 SVIDs issued for {outcomes['issued']}, {refused} impostors refused")


def run(duration: float = 0.0) -> None:
    asyncio.run(_main(duration))
