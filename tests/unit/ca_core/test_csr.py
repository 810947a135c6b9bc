"""CSR rules as a table: what the CA signs and what it refuses (pure)."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from ca.core import csr
from identity import SpiffeId, TrustDomain
from tests import certs
from tests.support import make_csr

BAD_PEM = b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
WEB = SpiffeId.for_workload(TrustDomain("example.org"), "shop", "web")


def check(der: bytes):
    return csr.check(csr.parse(der), WEB)


@pytest.mark.parametrize(
    "der",
    [
        make_csr(),
        make_csr(uris=(str(WEB),)),
        make_csr(ec.generate_private_key(ec.SECP384R1())),
        make_csr(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        make_csr(common_name="spiffe://example.org/ns/kube-system/sa/admin"),
    ],
    ids=["no-names", "own-id", "p-384", "rsa-2048", "cn-ignored"],
)
def test_accepted(der: bytes):
    assert check(der) is not None


def test_pem_and_der_are_the_same_request():
    der = make_csr()
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    assert check(pem) == check(der)


@pytest.mark.parametrize(
    ("der", "reason"),
    [
        (make_csr(uris=("spiffe://example.org/ns/shop/sa/admin",)), "identity_mismatch"),
        (make_csr(uris=(str(WEB), str(WEB) + "2")), "identity_mismatch"),
        (make_csr(uris=("https://example.org/ns/shop/sa/web",)), "identity_mismatch"),
        (make_csr(dns=("spiffe.example.org",)), "unexpected_san"),
        (make_csr(uris=(str(WEB),), dns=("web",)), "unexpected_san"),
        (make_csr(ips=("127.0.0.1",)), "unexpected_san"),
        (make_csr(emails=("spiffe@example.org",)), "unexpected_san"),
        (make_csr(ca=True), "ca_requested"),
        (make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)), "weak_key"),
        (make_csr(ec.generate_private_key(ec.SECP224R1())), "weak_key"),
        (make_csr(ed25519.Ed25519PrivateKey.generate()), "weak_key"),
        (b"", "malformed"),
        (BAD_PEM, "malformed"),
        (b"\x00" * (csr.MAX_CSR_BYTES + 1), "malformed"),
        (certs.two_san_extensions_csr(str(WEB)), "malformed"),
        (certs.x400_san_csr(), "malformed"),
        (make_csr(certs.rsa_key_with_exponent(2000)), "weak_key"),
        (make_csr(certs.rsa_key_with_exponent(32)), "weak_key"),
    ],
    ids=[
        "other-id", "two-uris", "https-uri", "dns", "uri-and-dns", "ip", "email", "ca",
        "rsa-1024", "p-224", "ed25519", "empty", "bad-pem", "oversized", "two-san-extensions",
        "x400-san", "rsa-huge-exponent", "rsa-32-bit-exponent",
    ],
)  # fmt: skip
def test_refused(der: bytes, reason: str):
    with pytest.raises(csr.CsrRejected) as refused:
        check(der)
    assert refused.value.reason == reason
    assert str(refused.value)


def test_a_refusal_quotes_at_most_a_bounded_piece_of_what_the_caller_asked_for():
    """A caller chooses its CSR's names: the message (sent back, and audited) does not."""
    asked = f"spiffe://example.org/{'a' * 15_000}"
    with pytest.raises(csr.CsrRejected) as refused:
        check(make_csr(uris=(asked,)))
    assert refused.value.reason == "identity_mismatch"
    assert len(str(refused.value)) < 200
    assert str(WEB) in str(refused.value)


@settings(max_examples=200, deadline=None)
@given(position=st.integers(min_value=0), bit=st.integers(min_value=0, max_value=7))
def test_any_flipped_bit_is_refused_or_harmless(position: int, bit: int):
    """A corrupted CSR never yields a key other than the one that signed it."""
    key = ec.generate_private_key(ec.SECP256R1())
    der = bytearray(make_csr(key))
    der[position % len(der)] ^= 1 << bit
    try:
        accepted = check(bytes(der))
    except csr.CsrRejected:
        return
    assert accepted == key.public_key()
