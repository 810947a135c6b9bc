"""`outrider ca serve` as a real process on loopback, checked with openssl.

Kubernetes tokens come from FakeTokenIssuer, whose JWKS the CA trusts as a
file: no API server runs here, and offline JWKS verification is exactly what
the CA does in a cluster.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from pathlib import Path

import aiohttp
import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from identity import TrustBundle
from identity.proto import ca_pb2
from tests.support import (
    TRUST_DOMAIN,
    WORKLOAD,
    CaProcess,
    CaSetup,
    ca_client,
    chain_pem,
    grpcio_channel,
    grpcio_sign,
    key_pem,
    make_csr,
)


async def test_issued_svid_verifies_with_openssl(setup: CaSetup, ca: CaProcess, tmp_path: Path):
    token = setup.issuer.token("shop", "web")
    csr = make_csr(uris=(WORKLOAD,), dns=(), common_name="ignored")
    async with ca_client(setup, ca) as c:
        response = await c.sign(csr, token=token)

    assert response.spiffe_id == WORKLOAD
    assert len(response.cert_chain) == 2
    leaf, intermediate = (tmp_path / "leaf.pem", tmp_path / "intermediate.pem")
    leaf.write_bytes(chain_pem(response.cert_chain[:1]))
    intermediate.write_bytes(chain_pem(response.cert_chain[1:]))
    root = setup.ca_dir / "root.pem"
    verify = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", root, "-untrusted", intermediate, leaf],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    assert verify.stdout.strip().endswith(": OK")

    text = subprocess.run(
        ["openssl", "x509", "-in", leaf, "-noout", "-text"], capture_output=True, text=True
    ).stdout
    assert text.count("URI:") == 1
    assert f"URI:{WORKLOAD}" in text
    assert "DNS:" not in text and "ignored" not in text
    assert "CA:FALSE" in text
    assert "X509v3 Key Usage: critical\n                Digital Signature\n" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text

    bundle = TrustBundle.from_der(TRUST_DOMAIN, response.trust_bundle)
    assert bundle.to_pem() == root.read_bytes()
    leaf_cert = x509.load_der_x509_certificate(response.cert_chain[0])
    assert response.not_after == int(leaf_cert.not_valid_after_utc.timestamp())
    entry = setup.audit()[-1]
    assert entry["result"] == "issued"
    assert entry["spiffe_id"] == WORKLOAD
    assert entry["caller"] == "system:serviceaccount:shop:web"
    assert entry["serial"] == f"{leaf_cert.serial_number:x}"
    assert entry["reason"] == "token"
    assert token.split(".")[2] not in setup.audit_log.read_text(), "the token reached the log"


@pytest.mark.parametrize(
    ("requested", "expected"),
    [(0, 3600), (7200, 7200), (60, 60), (10 * 86400, 86400)],
    ids=["default-1h", "requested-2h", "requested-1m", "capped-at-max-ttl"],
)
async def test_ttl_default_requested_and_capped(
    setup: CaSetup, ca: CaProcess, requested: int, expected: int
):
    async with ca_client(setup, ca) as c:
        response = await c.sign(
            make_csr(), token=setup.issuer.token("shop", "web"), ttl_seconds=requested
        )
    leaf = x509.load_der_x509_certificate(response.cert_chain[0])
    backdate = 60
    lifetime = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
    assert lifetime == pytest.approx(expected + backdate, abs=2)


async def test_renewal_with_current_svid_keeps_the_identity(setup: CaSetup, ca: CaProcess):
    key = ec.generate_private_key(ec.SECP256R1())
    async with ca_client(setup, ca) as c:
        first = await c.sign(make_csr(key), token=setup.issuer.token("shop", "web"))
    tls = {"client_chain_pem": chain_pem(first.cert_chain), "client_key_pem": key_pem(key)}
    async with ca_client(setup, ca, **tls) as c:
        renewed = await c.sign(make_csr())  # a fresh key, no token: the SVID authenticates
    assert renewed.spiffe_id == first.spiffe_id == WORKLOAD
    assert setup.audit()[-1]["reason"] == "svid"

    async with ca_client(setup, ca, **tls) as c:
        with pytest.raises(GRPCError) as refused:
            await c.sign(make_csr(uris=(f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/admin",)))
    assert refused.value.status is Status.PERMISSION_DENIED


async def test_http_bundle_health_and_metrics(setup: CaSetup, ca: CaProcess):
    base = f"http://127.0.0.1:{ca.http_port}"
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/bundle") as r:
            assert r.status == 200
            assert await r.read() == setup.bundle_pem
        async with http.get(f"{base}/bundle?format=spiffe") as r:
            spiffe = TrustBundle.from_spiffe_json(TRUST_DOMAIN, await r.read())
        async with http.get(f"{base}/bundle", headers={"Accept": "application/json"}) as r:
            assert json.loads(await r.read())["keys"][0]["use"] == "x509-svid"
        async with http.get(f"{base}/healthz") as r:
            assert r.status == 200
        async with http.get(f"{base}/metrics") as r:
            metrics = await r.text()
    assert spiffe.to_pem() == setup.bundle_pem
    for name in (
        "outrider_ca_csr_total",
        "outrider_ca_sign_duration_seconds",
        "outrider_ca_issued_ttl_seconds",
        "outrider_ca_root_expiry_timestamp_seconds",
        "outrider_ca_intermediate_expiry_timestamp_seconds",
    ):
        assert name in metrics


async def test_reference_grpc_client_interoperates(setup: CaSetup, ca: CaProcess):
    """grpcio (the C-core implementation other languages share) speaks to our server."""
    async with grpcio_channel(setup.bundle_pem, ca.grpc_port) as channel:
        sign = grpcio_sign(channel)
        token = setup.issuer.token("shop", "web")
        response = await sign(
            ca_pb2.SignRequest(csr=make_csr()), metadata=[("authorization", f"Bearer {token}")]
        )
        assert response.spiffe_id == WORKLOAD
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await sign(ca_pb2.SignRequest(csr=make_csr()))
    assert refused.value.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_sighup_does_not_stop_the_ca(setup: CaSetup, ca: CaProcess) -> None:
    """A config reloader's or a closing terminal's SIGHUP: the CA says it reloads nothing
    and goes on signing (SIGHUP's default action would have ended it)."""
    ca.process.send_signal(signal.SIGHUP)
    async with ca_client(setup, ca) as c:
        response = await c.sign(make_csr(), token=setup.issuer.token("shop", "web"))
    assert response.spiffe_id == WORKLOAD
    assert ca.process.poll() is None
    for _ in range(100):  # its stderr is read by a thread
        if any("SIGHUP: nothing is reloaded" in line for line in ca.stderr):
            break
        await asyncio.sleep(0.02)
    assert any("SIGHUP: nothing is reloaded" in line for line in ca.stderr)
