"""identity.cert.verify_chain: OpenSSL's path validation up to the roots, without time.

Chains come from the CA's own code: its directory (`outrider ca init`), its signer
and its certificate templates.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.core import template
from ca.core.template import LeafRequest
from ca.signers.local import LocalSigner, init_ca
from identity import SpiffeId, TrustDomain, openssl
from identity.cert import Cert, verify_chain
from tests.certs import SigningCa
from tests.unit.agent import pki

NOW = pki.NOW  # a fixed day that is already past: the chains below have expired


def certs(ders: tuple[bytes, ...] | list[bytes]) -> list[Cert]:
    return [Cert.from_der(der) for der in ders]


def signed(builder: x509.CertificateBuilder, key: ec.EllipticCurvePrivateKey) -> Cert:
    return Cert.from_der(pki.der(builder.sign(key, hashes.SHA256())))


def leaf_request(
    spiffe_id: SpiffeId = pki.WEB, start: datetime = NOW
) -> tuple[LeafRequest, ec.EllipticCurvePrivateKey]:
    key = pki.new_key()
    request = LeafRequest(
        spiffe_id, key.public_key(), start, start + timedelta(hours=1), x509.random_serial_number()
    )
    return request, key


@pytest.fixture(scope="module")
def roots(signer: LocalSigner) -> list[Cert]:
    return certs(pki.bundle_der(signer))


@pytest.fixture(scope="module")
def chain(signer: LocalSigner) -> list[Cert]:
    """Leaf and intermediate, as the CA sends them."""
    return certs(pki.sign_leaf(signer, pki.new_key()))


def refusal(chain: list[Cert], roots: list[Cert]) -> str:
    with pytest.raises(ValueError) as refused:
        verify_chain(chain, roots)
    assert openssl.ERR_get_error() == 0, "the error queue is left empty"
    return str(refused.value)


def test_root_intermediate_leaf(chain: list[Cert], roots: list[Cert]) -> None:
    verify_chain(chain, roots)
    verify_chain(chain, roots + roots)  # a root twice is one root


def test_root_leaf() -> None:
    root_key = pki.new_key()
    root = signed(template.root(pki.TD, root_key.public_key(), NOW, 1), root_key)
    request, _ = leaf_request()
    issuer = x509.load_der_x509_certificate(root.der)
    verify_chain([signed(template.leaf(request, issuer), root_key)], [root])


def test_time_is_not_checked(signer: LocalSigner, chain: list[Cert], roots: list[Cert]) -> None:
    assert chain[0].not_after < datetime.now(UTC), "expired"
    verify_chain(chain, roots)
    request, _ = leaf_request(start=datetime(2090, 1, 1, tzinfo=UTC))
    not_yet_valid = certs([pki.der(c) for c in signer.sign_leaf_now(request)])
    verify_chain(not_yet_valid, roots)


def test_a_wrong_root(chain: list[Cert], tmp_path: Path) -> None:
    other = certs(pki.bundle_der(pki.make_signer(tmp_path)))
    assert refusal(chain, other) == "unable to get local issuer certificate"


def test_a_missing_intermediate(chain: list[Cert], roots: list[Cert]) -> None:
    assert refusal(chain[:1], roots) == "unable to get local issuer certificate"


def test_a_broken_signature(chain: list[Cert], roots: list[Cert]) -> None:
    damaged = bytearray(chain[0].der)
    damaged[-5] ^= 0x01  # inside the signature value
    broken = Cert.from_der(bytes(damaged))
    assert refusal([broken, chain[1]], roots) == "certificate signature failure"


def test_a_leaf_signed_by_a_leaf(signer: LocalSigner, roots: list[Cert]) -> None:
    request, key = leaf_request()
    leaf, intermediate = signer.sign_leaf_now(request)
    below, _ = leaf_request(SpiffeId.parse("spiffe://example.org/ns/shop/sa/mallory"))
    forged = signed(template.leaf(below, leaf), key)
    assert refusal([forged, *certs([pki.der(leaf), pki.der(intermediate)])], roots) == (
        "invalid CA certificate"
    )


def test_an_intermediate_is_no_trust_anchor(chain: list[Cert]) -> None:
    """No X509_V_FLAG_PARTIAL_CHAIN, as in the agent's TLS: roots must be self-signed."""
    assert refusal(chain[:1], chain[1:]) == "unable to get issuer certificate"


def test_name_constraints_are_checked(tmp_path: Path) -> None:
    init_ca(tmp_path, pki.TD, NOW, force=False, name_constraint=True)
    constrained = LocalSigner.load(tmp_path)
    roots = certs(pki.bundle_der(constrained))
    inside, _ = leaf_request()
    verify_chain(certs([pki.der(c) for c in constrained.sign_leaf_now(inside)]), roots)
    outside, _ = leaf_request(SpiffeId.parse("spiffe://other.org/ns/shop/sa/web"))
    chain = certs([pki.der(c) for c in constrained.sign_leaf_now(outside)])
    assert refusal(chain, roots) == "permitted subtree violation"


def test_strict_rules_apply(ca_dir: Path, roots: list[Cert]) -> None:
    """X509_V_FLAG_X509_STRICT: a leaf without an authorityKeyIdentifier is refused."""
    ca = SigningCa.load(ca_dir)
    key = pki.new_key()
    no_akid = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tests")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    chain = [signed(no_akid, ca.key), Cert.from_der(pki.der(ca.cert))]
    assert refusal(chain, roots) == "Missing Authority Key Identifier"


def test_an_empty_chain(roots: list[Cert]) -> None:
    assert refusal([], roots) == "the chain is empty"


def test_no_roots(chain: list[Cert]) -> None:
    assert refusal(chain, []) == "unable to get local issuer certificate"


def test_a_foreign_trust_domain_is_not_verify_chains_business(tmp_path: Path) -> None:
    """A root vouching for another trust domain's ID passes here (no name constraint):
    the trust domain check is the caller's, as the module docstring of template says."""
    init_ca(tmp_path, TrustDomain("example.org"), NOW, force=False)
    ca = LocalSigner.load(tmp_path)
    request, _ = leaf_request(SpiffeId.parse("spiffe://other.org/ns/a/sa/b"))
    verify_chain(certs([pki.der(c) for c in ca.sign_leaf_now(request)]), certs(pki.bundle_der(ca)))
