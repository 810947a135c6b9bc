"""Every refusal class of THREATS.md "The CA", against a real `ca serve` process.

Each case asserts the gRPC status, the bounded reason the CA counted, and that
nothing was issued (the audit log and the issued counter are unchanged).
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from ca.authn.fake_issuer import FakeTokenIssuer
from ca.core.issuance import IssuancePolicy
from ca.issuer import Issuer
from ca.signers.local import LocalSigner
from identity import SpiffeId
from tests import certs
from tests.support import (
    TRUST_DOMAIN,
    WORKLOAD,
    CaProcess,
    CaSetup,
    ca_client,
    ca_process,
    chain_pem,
    key_pem,
    make_ca_setup,
    make_csr,
    weak_rsa_key,
)


async def refused(
    setup: CaSetup, ca: CaProcess, csr: bytes, *, token: str | None, **tls: bytes
) -> GRPCError:
    issued_before = setup.issued_count()
    async with ca_client(setup, ca, **tls) as c:
        with pytest.raises(GRPCError) as error:
            await c.sign(csr, token=token)
    assert setup.issued_count() == issued_before, "a refused request was issued"
    entry = setup.audit()[-1]
    assert entry["result"] == "refused"
    assert str(entry["peer"]).startswith("127.0.0.1:")
    return error.value


def _unsigned(issuer: FakeTokenIssuer) -> str:
    _, payload, _ = issuer.token("shop", "web").split(".")
    none = base64.urlsafe_b64encode(json.dumps({"alg": "none", "typ": "JWT"}).encode())
    return f"{none.decode().rstrip('=')}.{payload}."


def _now() -> datetime:
    return datetime.now(UTC)


TOKENS: dict[str, tuple[Callable[[FakeTokenIssuer], str | None], str]] = {
    "no-credential": (lambda i: None, "no_credential"),
    "wrong-audience": (lambda i: i.token("shop", "web", audience="vault"), "wrong_audience"),
    "expired": (
        lambda i: i.token("shop", "web", now=_now() - timedelta(hours=2)),
        "expired",
    ),
    "not-yet-valid": (
        lambda i: i.token("shop", "web", now=_now() + timedelta(hours=1)),
        "not_yet_valid",
    ),
    "unknown-issuer": (
        lambda i: i.token("shop", "web", iss="https://evil.example"),
        "unknown_issuer",
    ),
    "bad-signature": (lambda i: FakeTokenIssuer(kid=i.kid).token("shop", "web"), "bad_signature"),
    "alg-none": (_unsigned, "unsigned"),
    "garbage": (lambda i: "not.a.jwt", "malformed"),
    "namespace-with-slash": (lambda i: i.token("a/b", "web"), "invalid_claims"),
    "sa-dot-dot": (lambda i: i.token("shop", ".."), "invalid_claims"),
    "sa-percent": (lambda i: i.token("shop", "%2e%2e"), "invalid_claims"),
    "namespace-uppercase": (lambda i: i.token("Shop", "web"), "invalid_claims"),
}


@pytest.mark.parametrize("case", TOKENS, ids=list(TOKENS))
async def test_token_refusals(setup: CaSetup, ca: CaProcess, case: str):
    make_token, reason = TOKENS[case]
    error = await refused(setup, ca, make_csr(), token=make_token(setup.issuer))
    assert error.status is Status.UNAUTHENTICATED
    assert reason in (error.message or "")


CSRS: dict[str, tuple[Callable[[], bytes], Status, str]] = {
    "other-identity": (
        lambda: make_csr(uris=(f"spiffe://{TRUST_DOMAIN}/ns/kube-system/sa/admin",)),
        Status.PERMISSION_DENIED,
        "identity_mismatch",
    ),
    "two-uris": (
        lambda: make_csr(uris=(WORKLOAD, f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/db")),
        Status.PERMISSION_DENIED,
        "identity_mismatch",
    ),
    "other-trust-domain": (
        lambda: make_csr(uris=("spiffe://evil.example/ns/shop/sa/web",)),
        Status.PERMISSION_DENIED,
        "identity_mismatch",
    ),
    "dns-san": (lambda: make_csr(dns=("web.shop.svc",)), Status.INVALID_ARGUMENT, "unexpected_san"),
    "ip-san": (lambda: make_csr(ips=("10.0.0.1",)), Status.INVALID_ARGUMENT, "unexpected_san"),
    "email-san": (lambda: make_csr(emails=("a@b.c",)), Status.INVALID_ARGUMENT, "unexpected_san"),
    "ca-true": (lambda: make_csr(ca=True), Status.INVALID_ARGUMENT, "ca_requested"),
    "rsa-1024": (lambda: make_csr(weak_rsa_key()), Status.INVALID_ARGUMENT, "weak_key"),
    "p-224": (
        lambda: make_csr(ec.generate_private_key(ec.SECP224R1())),
        Status.INVALID_ARGUMENT,
        "weak_key",
    ),
    "bad-signature": (lambda: _tampered_csr(), Status.INVALID_ARGUMENT, "bad_signature"),
    "garbage": (lambda: b"\x30\x03junk", Status.INVALID_ARGUMENT, "malformed"),
    "empty": (lambda: b"", Status.INVALID_ARGUMENT, "malformed"),
    "two-san-extensions": (
        lambda: certs.two_san_extensions_csr(WORKLOAD),
        Status.INVALID_ARGUMENT,
        "malformed",
    ),
    "x400-san": (certs.x400_san_csr, Status.INVALID_ARGUMENT, "malformed"),
}


def _tampered_csr() -> bytes:
    """A CSR whose signature no longer matches its body (a flipped signature byte)."""
    der = bytearray(make_csr())
    der[-5] ^= 0x01
    return bytes(der)


@pytest.mark.parametrize("case", CSRS, ids=list(CSRS))
async def test_csr_refusals(setup: CaSetup, ca: CaProcess, case: str):
    make, status, reason = CSRS[case]
    error = await refused(setup, ca, make(), token=setup.issuer.token("shop", "web"))
    assert error.status is status
    assert reason in (error.message or "")
    assert setup.audit()[-1]["reason"].startswith(f"{reason}:")
    assert not any("Traceback" in line for line in ca.stderr), "".join(ca.stderr)


async def test_an_audit_log_the_ca_cannot_write_stops_issuance_and_says_so(
    tmp_path: Path,
) -> None:
    """A certificate is handed out only once its line is written: on a full disk Sign
    answers UNAVAILABLE, naming the log, while refusals still go out as themselves; the
    CA's log says what to fix once, not a traceback per call."""
    setup = make_ca_setup(tmp_path, audit_log="/dev/full")
    with ca_process(setup.config) as ca:
        async with ca_client(setup, ca) as c:
            for _ in range(3):
                with pytest.raises(GRPCError) as error:
                    await c.sign(make_csr(), token=setup.issuer.token("shop", "web"))
                assert error.value.status is Status.UNAVAILABLE
                assert "audit_unavailable" in (error.value.message or "")
                assert "/dev/full" in (error.value.message or "")
            with pytest.raises(GRPCError) as error:
                await c.sign(make_csr(), token="not.a.jwt")
            assert error.value.status is Status.UNAUTHENTICATED
        said = [line for line in ca.stderr if "audit log" in line]
        assert len(said) == 1, "".join(ca.stderr)
        assert "free its disk or fix audit_log" in said[0]
        assert not any("Traceback" in line for line in ca.stderr), "".join(ca.stderr)


async def test_negative_ttl_refused(setup: CaSetup, ca: CaProcess):
    async with ca_client(setup, ca) as c:
        with pytest.raises(GRPCError) as error:
            await c.sign(make_csr(), token=setup.issuer.token("shop", "web"), ttl_seconds=-5)
    assert error.value.status is Status.INVALID_ARGUMENT


def _in_bundle_cert_without_uri(setup: CaSetup) -> tuple[bytes, bytes]:
    """A client certificate the bundle trusts (signed by the intermediate) but no SVID."""
    issuer_key = load_pem_private_key((setup.ca_dir / "intermediate.key").read_bytes(), None)
    issuer = x509.load_pem_x509_certificate((setup.ca_dir / "intermediate.pem").read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, WORKLOAD)]))
        .issuer_name(issuer.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("web.shop")]), critical=False)
        .sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    return chain_pem([cert.public_bytes(Encoding.DER), issuer.public_bytes(Encoding.DER)]), key_pem(
        key
    )


async def test_client_certificate_without_spiffe_id_refused(setup: CaSetup, ca: CaProcess):
    """CN and DNS names are never identity, even on a certificate the bundle trusts."""
    chain, key = _in_bundle_cert_without_uri(setup)
    error = await refused(
        setup, ca, make_csr(), token=None, client_chain_pem=chain, client_key_pem=key
    )
    assert error.status is Status.UNAUTHENTICATED
    assert "bad_svid" in (error.message or "")


async def test_client_certificate_from_another_trust_root_fails_handshake(
    setup: CaSetup, ca: CaProcess, tmp_path
):
    other = make_ca_setup(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    signer = LocalSigner.load(other.ca_dir)
    issued = await Issuer(signer, IssuancePolicy(), lambda: datetime.now(UTC)).issue(
        SpiffeId.parse(WORKLOAD), key.public_key()
    )
    chain = chain_pem([c.public_bytes(Encoding.DER) for c in issued.chain])
    issued_before = setup.issued_count()
    async with ca_client(setup, ca, client_chain_pem=chain, client_key_pem=key_pem(key)) as c:
        with pytest.raises((OSError, StreamTerminatedError)):
            await c.sign(make_csr(), deadline=5)
    assert setup.issued_count() == issued_before


async def test_renewal_with_our_roots_svid_for_another_trust_domain_refused(
    setup: CaSetup, ca: CaProcess
):
    """With no name constraint OpenSSL passes the chain; the CA's root vouches for its own
    trust domain only, so the caller is not spiffe://other.org/... here."""
    client = certs.cross_domain_svid(setup)
    error = await refused(
        setup,
        ca,
        make_csr(),
        token=None,
        client_chain_pem=client.chain_pem,
        client_key_pem=client.key_pem,
    )
    assert error.status is Status.UNAUTHENTICATED
    assert "bad_svid" in (error.message or "")


@pytest.mark.parametrize(
    ("audit_log", "said"),
    [
        ("-", "audit_log is '-' but stdout is closed"),
        ("no-such-directory/audit.log", "no-such-directory/audit.log: No such file or directory"),
    ],
)
def test_a_ca_that_could_not_write_its_audit_log_does_not_start(
    tmp_path: Path, audit_log: str, said: str
) -> None:
    """Said at start, exit 2, no traceback: with stdout closed, descriptor 1 would be the
    first socket the CA opens, and every line would go there."""
    setup = make_ca_setup(tmp_path, audit_log=audit_log)
    serve = [sys.executable, "-m", "outrider", "ca", "serve", "--config", str(setup.config)]
    closed = subprocess.run(
        ["sh", "-c", '"$@" >&-', "sh", *serve], capture_output=True, text=True, timeout=60
    )
    assert closed.returncode == 2, closed.stderr
    assert said in closed.stderr and "Traceback" not in closed.stderr
