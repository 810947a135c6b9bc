"""Crafted client and server certificates, each wrong in exactly one way.

Every certificate is signed by a real CA: the test CA directory's
intermediate, so the chain verifies and only the crafted defect is left for
the peer to find, or a foreign CA of another trust domain. The intermediate
of `outrider ca init` has no name constraint, so OpenSSL passes a chain from
our root naming another trust domain: the refusal is the agent's own.
"""

from __future__ import annotations

import math
import ssl
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca.signers.local import init_ca
from identity import SpiffeId, TrustDomain
from identity.tlsfiles import load_cert_chain
from tests.support import CaSetup, key_pem

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
FOREIGN_DOMAIN = TrustDomain("other.org")


class Credential(NamedTuple):
    """A certificate chain (leaf first) and its key, both PEM."""

    chain_pem: bytes
    key_pem: bytes


def parsed(
    credential: Credential,
) -> tuple[tuple[x509.Certificate, ...], ec.EllipticCurvePrivateKey]:
    """`credential` as cryptography's objects: its chain, leaf first, and its EC key."""
    key = serialization.load_pem_private_key(credential.key_pem, None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return tuple(x509.load_pem_x509_certificates(credential.chain_pem)), key


@dataclass(frozen=True, repr=False)
class SigningCa:
    """An issuing CA: its certificate goes after every leaf it signs."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def load(cls, ca_dir: Path) -> SigningCa:
        cert = x509.load_pem_x509_certificate((ca_dir / "intermediate.pem").read_bytes())
        key = serialization.load_pem_private_key(
            (ca_dir / "intermediate.key").read_bytes(), password=None
        )
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        return cls(cert, key)


def foreign_ca(directory: Path, trust_domain: TrustDomain = FOREIGN_DOMAIN) -> SigningCa:
    """A fresh root and intermediate for another trust domain, in `directory`."""
    if not (directory / "intermediate.pem").exists():
        init_ca(directory, trust_domain, datetime.now(UTC), force=False)
    return SigningCa.load(directory)


@dataclass(frozen=True)
class Shape:
    """What goes into a leaf; the defaults make a valid X.509-SVID."""

    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()
    ca: bool = False
    eku: tuple[x509.ObjectIdentifier, ...] = (SERVER_AUTH, CLIENT_AUTH)
    valid_from: timedelta = timedelta(minutes=-1)  # relative to now
    valid_until: timedelta = timedelta(hours=1)

    def extensions(self) -> list[tuple[x509.ExtensionType, bool]]:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in self.uris]
        names += [x509.DNSName(d) for d in self.dns]
        return [
            (x509.BasicConstraints(ca=self.ca, path_length=None), True),
            (_key_usage(cert_sign=self.ca), True),
            (x509.ExtendedKeyUsage(list(self.eku)), False),
            (x509.SubjectAlternativeName(names), False),
        ]


def issue(ca: SigningCa, shape: Shape, now: datetime | None = None) -> Credential:
    """Sign `shape` with `ca`; the chain is the leaf, then `ca`'s certificate."""
    now = now or datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tests")]))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + shape.valid_from)
        .not_valid_after(now + shape.valid_until)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()),
            critical=False,
        )
    )
    for extension, critical in shape.extensions():
        builder = builder.add_extension(extension, critical=critical)
    leaf = builder.sign(ca.key, hashes.SHA256())
    pem = serialization.Encoding.PEM
    return Credential(leaf.public_bytes(pem) + ca.cert.public_bytes(pem), key_pem(key))


# --- the shapes the agent must accept or refuse ---------------------------------


def valid_svid(setup: CaSetup, spiffe_id: SpiffeId) -> Credential:
    """A good SVID from our CA: the control case, and what an impostor server presents."""
    return issue(SigningCa.load(setup.ca_dir), Shape(uris=(str(spiffe_id),)))


def foreign_svid(directory: Path, path: str = "/ns/demo/sa/frontend") -> Credential:
    """A good SVID of another trust domain, from that domain's own CA."""
    ca = foreign_ca(directory)
    return issue(ca, Shape(uris=(f"spiffe://{FOREIGN_DOMAIN}{path}",)))


def cross_domain_svid(setup: CaSetup, path: str = "/ns/demo/sa/frontend") -> Credential:
    """Our root vouching for another trust domain's ID: it may vouch for its own only."""
    return issue(SigningCa.load(setup.ca_dir), Shape(uris=(f"spiffe://{FOREIGN_DOMAIN}{path}",)))


def expired_svid(setup: CaSetup, spiffe_id: SpiffeId) -> Credential:
    shape = Shape(
        uris=(str(spiffe_id),), valid_from=timedelta(hours=-2), valid_until=timedelta(hours=-1)
    )
    return issue(SigningCa.load(setup.ca_dir), shape)


def year_zero_svid(setup: CaSetup, spiffe_id: SpiffeId) -> Credential:
    """A good SVID but for its notBefore, GeneralizedTime 0000-01-01: RFC 5280's syntax and
    OpenSSL's verifier take it, Python's datetime has no year 0. Signed again after the
    change, so the chain verifies and the date is all that is left to read."""
    ca = SigningCa.load(setup.ca_dir)
    # From 2050 on, times are GeneralizedTime, as long as the year 0000 put in its place.
    good = issue(ca, Shape(uris=(str(spiffe_id),)), now=datetime(2050, 1, 1, 0, 1, tzinfo=UTC))
    leaf = x509.load_pem_x509_certificate(good.chain_pem)
    before = leaf.not_valid_before_utc.strftime("%Y%m%d%H%M%SZ").encode()
    tbs = leaf.tbs_certificate_bytes
    assert tbs.count(before) == 1
    tbs = tbs.replace(before, b"00000101000000Z")
    return Credential(_signed(ca, tbs), good.key_pem)


def _signed(ca: SigningCa, tbs: bytes) -> bytes:
    """The chain (PEM) of a certificate made of `tbs` (DER), signed by `ca`."""
    signature = ca.key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    der = _tlv(0x30, tbs + _ECDSA_WITH_SHA256 + _tlv(0x03, b"\0" + signature))
    pem = ssl.DER_cert_to_PEM_cert(der).encode()
    return pem + ca.cert.public_bytes(serialization.Encoding.PEM)


_ECDSA_WITH_SHA256 = bytes.fromhex("300a06082a8648ce3d040302")  # its AlgorithmIdentifier


def _tlv(tag: int, content: bytes) -> bytes:
    """One DER element (a length of up to 65,535 bytes)."""
    size = len(content)
    length = (
        bytes([size])
        if size < 128
        else b"\x81" + bytes([size])
        if size < 256
        else b"\x82" + size.to_bytes(2, "big")
    )
    return bytes([tag]) + length + content


def two_uri_sans(setup: CaSetup, first: SpiffeId, second: SpiffeId) -> Credential:
    """Two identities in one certificate: which one is it?"""
    return issue(SigningCa.load(setup.ca_dir), Shape(uris=(str(first), str(second))))


def ca_certificate(setup: CaSetup, spiffe_id: SpiffeId) -> Credential:
    """A CA (cA=true, keyCertSign) that names a workload: it could mint others."""
    return issue(SigningCa.load(setup.ca_dir), Shape(uris=(str(spiffe_id),), ca=True))


def dns_san_only(setup: CaSetup, spiffe_id: SpiffeId) -> Credential:
    """A DNS SAN spelling a SPIFFE ID; only a URI SAN is an identity claim."""
    return issue(SigningCa.load(setup.ca_dir), Shape(dns=(str(spiffe_id),)))


def server_auth_only(setup: CaSetup, spiffe_id: SpiffeId) -> Credential:
    """An SVID whose EKU allows serving only, presented as a client certificate."""
    shape = Shape(uris=(str(spiffe_id),), eku=(SERVER_AUTH,))
    return issue(SigningCa.load(setup.ca_dir), shape)


# --- CSRs cryptography's builder will not make ------------------------------------


def two_san_extensions_csr(uri: str) -> bytes:
    """A CSR with two SubjectAlternativeName extensions (the first names `uri`, the
    second a DNS name): built with an IssuerAltName, whose OID is then made SAN's."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = _csr_builder().add_extension(
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False
    )
    builder = builder.add_extension(
        x509.IssuerAlternativeName([x509.DNSName("evil.example")]), critical=False
    )
    tbs = builder.sign(key, hashes.SHA256()).tbs_certrequest_bytes
    return _signed_csr(tbs.replace(b"\x06\x03\x55\x1d\x12", b"\x06\x03\x55\x1d\x11"), key)


def x400_san_csr() -> bytes:
    """A CSR whose SAN is an x400Address ([3]), which cryptography parses but cannot show."""
    key = ec.generate_private_key(ec.SECP256R1())
    dns = x509.SubjectAlternativeName([x509.DNSName("zzzzzzzz.example")])
    tbs = _csr_builder().add_extension(dns, critical=False).sign(key, hashes.SHA256())
    named = b"\x82\x10zzzzzzzz.example"  # the DNS name's [2] element; [3] of the same length
    return _signed_csr(tbs.tbs_certrequest_bytes.replace(named, b"\xa3" + named[1:]), key)


def rsa_key_with_exponent(exponent_bits: int) -> rsa.RSAPrivateKey:
    """An RSA-2048 key whose public exponent has `exponent_bits` bits (no generator makes
    one: its primes taken from a generated key, the rest computed)."""
    numbers = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_numbers()
    p, q = numbers.p, numbers.q
    phi = (p - 1) * (q - 1)
    e = (1 << (exponent_bits - 1)) + 1
    while math.gcd(e, phi) != 1:
        e += 2
    d = pow(e, -1, phi)
    public = rsa.RSAPublicNumbers(e, p * q)
    return rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public
    ).private_key()


def _csr_builder() -> x509.CertificateSigningRequestBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "crafted")])
    return x509.CertificateSigningRequestBuilder().subject_name(name)


def _signed_csr(tbs: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """The DER CSR of `tbs`, signed again by `key` (ecdsa-with-SHA256)."""
    signature = key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return _tlv(0x30, tbs + _ECDSA_WITH_SHA256 + _tlv(0x03, b"\0" + signature))


# --- TLS contexts around a credential --------------------------------------------


def client_context(bundle_pem: bytes, credential: Credential | None) -> ssl.SSLContext:
    """A client that trusts `bundle_pem` and presents `credential` (or nothing)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # SPIFFE names are URI SANs; the test checks what it needs
    context.load_verify_locations(cadata=bundle_pem.decode())
    if credential is not None:
        load_cert_chain(context, credential.chain_pem, credential.key_pem)
    return context


def server_context(bundle_pem: bytes, credential: Credential) -> ssl.SSLContext:
    """A server that presents `credential` and requires a client certificate from `bundle_pem`."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=bundle_pem.decode())
    load_cert_chain(context, credential.chain_pem, credential.key_pem)
    return context


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def explicit_curve_svid(setup: CaSetup, spiffe_id: SpiffeId) -> Credential:
    """A good SVID but for its key's curve, spelt out as explicit parameters instead of
    P-256's name: RFC 5480 forbids it and OpenSSL's strict verifier refuses it. Signed
    again after the change, so the chain verifies and the curve is all that is wrong."""
    ca = SigningCa.load(setup.ca_dir)
    good = issue(ca, Shape(uris=(str(spiffe_id),)))
    leaf = x509.load_pem_x509_certificate(good.chain_pem)
    named = leaf.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    spelt_out = subprocess.run(
        ["openssl", "pkey", "-pubin", "-inform", "DER", "-pubout", "-outform", "DER",
         "-ec_param_enc", "explicit"],
        input=named, capture_output=True, check=True,
    ).stdout  # fmt: skip
    tbs = leaf.tbs_certificate_bytes
    assert tbs.count(named) == 1 and tbs[1] == 0x82  # a SEQUENCE of 256 bytes or more
    tbs = _tlv(0x30, tbs[4:].replace(named, spelt_out))  # longer: its length again
    return Credential(_signed(ca, tbs), good.key_pem)
