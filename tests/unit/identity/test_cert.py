"""identity.cert.Cert reads every field as cryptography does, refuses what is not a
certificate with a ValueError, and never crashes.

cryptography is the oracle: each certificate is made here (by the CA's own code, by
the crafted shapes of tests/certs.py, or by `build` below for what neither makes),
and every field of Cert must equal cryptography's reading of the same bytes. What
cryptography's builder refuses to make (repeated extensions, negative serials) is
made by patching a placeholder in the DER of one it did make.
"""

from __future__ import annotations

import contextlib
import random
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

from ca.signers.local import LocalSigner
from identity import openssl
from identity.cert import Cert
from tests.certs import CLIENT_AUTH, SERVER_AUTH, Shape, SigningCa, issue
from tests.unit.agent import pki

EC_KEY = ec.generate_private_key(ec.SECP256R1())
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ED_KEY = ed25519.Ed25519PrivateKey.generate()
START = datetime(2026, 1, 1, tzinfo=UTC)
KEY_USAGE_NAMES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "key_cert_sign",
    "crl_sign",
    "encipher_only",
    "decipher_only",
)
EKU_NAMES = {
    "server_auth": ExtendedKeyUsageOID.SERVER_AUTH,
    "client_auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "code_signing": ExtendedKeyUsageOID.CODE_SIGNING,
    "email_protection": ExtendedKeyUsageOID.EMAIL_PROTECTION,
    "time_stamping": ExtendedKeyUsageOID.TIME_STAMPING,
    "ocsp_signing": ExtendedKeyUsageOID.OCSP_SIGNING,
    "any_extended_key_usage": ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,
}
Extension = tuple[x509.ExtensionType, bool]


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def name(*attributes: tuple[ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attributes])


def build(
    extensions: Iterable[Extension] = (),
    *,
    subject: x509.Name | None = None,
    issuer: x509.Name | None = None,
    key: CertificatePublicKeyTypes | None = None,
    signer: CertificateIssuerPrivateKeyTypes = EC_KEY,
    serial: int = 1000,
    not_before: datetime = START,
    not_after: datetime = START + timedelta(days=365),
) -> bytes:
    """A DER certificate of any shape cryptography's builder makes."""
    subject = subject or name((NameOID.COMMON_NAME, "crafted"))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer or subject)
        .public_key(key or EC_KEY.public_key())
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    digest = None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return der(builder.sign(signer, digest))


def raw(oid: str, value: bytes, critical: bool = False) -> Extension:
    """An extension with `value` as its DER, whatever the OID says it should hold."""
    return x509.UnrecognizedExtension(ObjectIdentifier(oid), value), critical


def patched(certificate: bytes, placeholder: bytes, replacement: bytes) -> bytes:
    """`certificate` with the one occurrence of `placeholder` replaced (same length):
    what the builder refuses to make. The signature no longer verifies; parsing does
    not look at it."""
    assert certificate.count(placeholder) == 1 and len(placeholder) == len(replacement)
    return certificate.replace(placeholder, replacement)


def repeated(extension: Extension, oid_byte: int) -> bytes:
    """A certificate with `extension` twice: 2.5.29.99 renamed to 2.5.29.<oid_byte>."""
    copy = raw("2.5.29.99", extension[0].public_bytes(), extension[1])
    certificate = build([extension, copy])
    return patched(certificate, b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d" + bytes([oid_byte]))


def with_serial(content: bytes) -> bytes:
    """A certificate whose serial INTEGER has exactly `content` (6 bytes)."""
    certificate = build(serial=0x7F1122334455)
    return patched(certificate, bytes.fromhex("02067f1122334455"), b"\x02\x06" + content)


def key_usage(*names: str) -> x509.KeyUsage:
    return x509.KeyUsage(**{attribute: attribute in names for attribute in KEY_USAGE_NAMES})


# --- the oracle ---------------------------------------------------------------------


def oracle(certificate: bytes) -> dict[str, object]:
    """Cert's fields as cryptography reads them; `malformed` as a bool."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # negative serials: a deprecation warning
        cert = x509.load_der_x509_certificate(certificate)
        serial = cert.serial_number
    fields: dict[str, object] = {
        "der": certificate,
        "serial": serial,
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "not_before": cert.not_valid_before_utc,
        "not_after": cert.not_valid_after_utc,
        "spki": cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
    }
    try:
        extensions = cert.extensions
    except (ValueError, x509.DuplicateExtension):
        return {**fields, "malformed": True}
    values = {extension.oid: extension for extension in extensions}
    bc = values.get(x509.oid.ExtensionOID.BASIC_CONSTRAINTS)
    ku = values.get(x509.oid.ExtensionOID.KEY_USAGE)
    eku = values.get(x509.oid.ExtensionOID.EXTENDED_KEY_USAGE)
    san = values.get(x509.oid.ExtensionOID.SUBJECT_ALTERNATIVE_NAME)
    return {
        **fields,
        "malformed": False,
        "ca": None if bc is None else bc.value.ca,
        "key_usage": None if ku is None else frozenset(_set_bits(ku.value)),
        "key_usage_critical": ku is not None and ku.critical,
        "extended_key_usage": (
            None
            if eku is None
            else frozenset(name for name, oid in EKU_NAMES.items() if oid in eku.value)
        ),
        "uris": (
            ()
            if san is None
            else tuple(san.value.get_values_for_type(x509.UniformResourceIdentifier))
        ),
    }


def _set_bits(usage: x509.KeyUsage) -> Iterable[str]:
    for attribute in KEY_USAGE_NAMES:
        try:
            if getattr(usage, attribute):
                yield attribute
        except ValueError:  # encipher_only/decipher_only without key_agreement
            pass


def as_read(cert: Cert, expected: dict[str, object]) -> dict[str, object]:
    """Cert's fields, in the oracle's shape."""
    fields = {key: getattr(cert, key) for key in expected}
    fields["malformed"] = cert.malformed is not None
    return fields


def assert_reads_as_cryptography(certificate: bytes) -> None:
    expected = oracle(certificate)
    assert as_read(Cert.from_der(certificate), expected) == expected


# --- the corpus -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_chain(ca_dir: Path) -> tuple[bytes, ...]:
    """A leaf, the intermediate and the root, as the CA makes them."""
    signer = LocalSigner.load(ca_dir)
    return pki.sign_leaf(signer, pki.new_key()) + pki.bundle_der(signer)


def test_the_cas_leaf_intermediate_and_root(real_chain: tuple[bytes, ...]) -> None:
    for certificate in real_chain:
        assert_reads_as_cryptography(certificate)
    leaf, intermediate, root = (Cert.from_der(c) for c in real_chain)
    assert leaf.ca is False and intermediate.ca is True and root.ca is True
    assert leaf.key_usage == {"digital_signature"} and leaf.key_usage_critical
    assert root.key_usage == {"digital_signature", "key_cert_sign", "crl_sign"}
    assert leaf.extended_key_usage == {"server_auth", "client_auth"}
    assert leaf.uris == (str(pki.WEB),) and root.uris == ("spiffe://example.org",)
    assert leaf.malformed is None
    assert leaf.issuer == intermediate.subject and intermediate.issuer == root.subject


SHAPES = {
    "several URI SANs": Shape(uris=("spiffe://example.org/a", "spiffe://example.org/b", "x:y")),
    "DNS SANs only": Shape(dns=("spiffe://example.org/a", "example.org")),
    "a CA:TRUE leaf": Shape(uris=("spiffe://example.org/a",), ca=True),
    "serverAuth only": Shape(uris=("spiffe://example.org/a",), eku=(SERVER_AUTH,)),
    "clientAuth only": Shape(uris=("spiffe://example.org/a",), eku=(CLIENT_AUTH,)),
}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_crafted_leaves(ca_dir: Path, shape: Shape) -> None:
    chain = x509.load_pem_x509_certificates(issue(SigningCa.load(ca_dir), shape).chain_pem)
    assert_reads_as_cryptography(der(chain[0]))
    assert Cert.from_der(der(chain[0])).uris == shape.uris


BUILT = {
    "no extensions": lambda: build(),
    "non-critical keyUsage": lambda: build([(key_usage("digital_signature"), False)]),
    "every keyUsage bit": lambda: build([(key_usage(*KEY_USAGE_NAMES), True)]),
    "keyAgreement with encipherOnly": lambda: build(
        [(key_usage("key_agreement", "encipher_only"), True)]
    ),
    "every EKU, and one OpenSSL has no flag for": lambda: build(
        [(x509.ExtendedKeyUsage([*EKU_NAMES.values(), ObjectIdentifier("1.2.3.4")]), False)]
    ),
    "basicConstraints with a pathLen": lambda: build(
        [(x509.BasicConstraints(ca=True, path_length=3), True)]
    ),
    "basicConstraints cA false": lambda: build(
        [(x509.BasicConstraints(ca=False, path_length=None), False)]
    ),
    "a critical extension OpenSSL does not know": lambda: build(
        [raw("1.2.3.4", b"\x05\x00", True)]
    ),
    "URI, DNS, IP and email SANs mixed": lambda: build(
        [
            (
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("a.example"),
                        x509.UniformResourceIdentifier("spiffe://td/one"),
                        x509.RFC822Name("a@example.org"),
                        x509.UniformResourceIdentifier("https://two.example/?q=1#f"),
                    ]
                ),
                False,
            )
        ]
    ),
    "a UTF-8 URI SAN": lambda: build([raw("2.5.29.17", bytes.fromhex("3006860473c3a962"))]),
    "an RSA key": lambda: build(key=RSA_KEY.public_key(), signer=RSA_KEY),
    "an Ed25519 key": lambda: build(key=ED_KEY.public_key(), signer=ED_KEY),
    "a P-384 key": lambda: build(key=ec.generate_private_key(ec.SECP384R1()).public_key()),
    "UTCTime validity": lambda: build(
        not_before=datetime(1950, 1, 1, tzinfo=UTC), not_after=datetime(2049, 12, 31, 23, 59, 59)
    ),
    "GeneralizedTime validity": lambda: build(
        not_before=datetime(2050, 1, 1, tzinfo=UTC),
        not_after=datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC),
    ),
    "a 20-byte serial": lambda: build(serial=2**159 - 1),
    "a serial of 1": lambda: build(serial=1),
    "a negative serial": lambda: with_serial(bytes.fromhex("8f1122334455")),
    "the most negative 6-byte serial": lambda: with_serial(bytes.fromhex("800000000000")),
    "names RFC 4514 escapes": lambda: build(
        subject=name(
            (NameOID.COMMON_NAME, ' #lead, +"\\<>; trail '),
            (NameOID.ORGANIZATION_NAME, "Zürich 東京"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "#hash"),
            (NameOID.COUNTRY_NAME, "CH"),
            (NameOID.DOMAIN_COMPONENT, "example"),
            (NameOID.USER_ID, "uid=1"),
            (NameOID.LOCALITY_NAME, "L"),
            (NameOID.STATE_OR_PROVINCE_NAME, "ST"),
        ),
        issuer=name((NameOID.COMMON_NAME, "issuer")),
    ),
    "an empty subject": lambda: build(
        subject=x509.Name([]), issuer=name((NameOID.COMMON_NAME, "i"))
    ),
}


@pytest.mark.parametrize("make", BUILT.values(), ids=BUILT.keys())
def test_built_certificates(make: object) -> None:
    assert callable(make)
    assert_reads_as_cryptography(make())


def test_serials_beyond_64_bits_and_negative() -> None:
    assert Cert.from_der(build(serial=2**159 - 1)).serial == 2**159 - 1
    for content in ("ff1122334455", "800000000000", "8f0000000001"):
        negative = int.from_bytes(bytes.fromhex(content), "big", signed=True)
        assert Cert.from_der(with_serial(bytes.fromhex(content))).serial == negative < 0


def test_validity_is_aware_utc() -> None:
    cert = Cert.from_der(build(not_before=START, not_after=datetime(2050, 1, 1, tzinfo=UTC)))
    assert cert.not_before == START and cert.not_before.tzinfo is UTC
    assert cert.not_after == datetime(2050, 1, 1, tzinfo=UTC)  # GeneralizedTime from 2050


def test_an_impossible_date_is_refused_with_openssls_reason_for_it() -> None:
    """Not a reason left queued by an earlier step (the key decoder the parse skips)."""
    later = build(not_before=datetime(2050, 1, 1, tzinfo=UTC), not_after=datetime(2051, 1, 1))
    with pytest.raises(ValueError, match="invalid notBefore time") as refused:
        Cert.from_der(patched(later, b"20500101000000Z", b"20500230000000Z"))
    assert "unsupported" not in str(refused.value)


def test_a_year_0000_time_is_refused_naming_its_field() -> None:
    """RFC 5280's syntax allows year 0000 and OpenSSL's verifier takes it; Python's datetime
    has no year 0. A ValueError naming the field (a peer's leaf is read this way: anything
    else escaped the refusal path), and in privateKeyUsagePeriod a malformed extension."""
    later = build(not_before=datetime(2050, 1, 1, tzinfo=UTC), not_after=datetime(2051, 1, 1))
    with pytest.raises(ValueError, match="notBefore: year 0 is out of range"):
        Cert.from_der(patched(later, b"20500101000000Z", b"00000101000000Z"))
    period = bytes.fromhex("3022800f") + b"00000101000000Z" + bytes.fromhex("810f")
    cert = Cert.from_der(build([raw("2.5.29.16", period + b"20300101000000Z")]))
    assert cert.malformed is not None and "year 0 is out of range" in cert.malformed


# --- malformed extensions, as cryptography's cert.extensions refuses them -----------

SAN = (x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://td/w")]), False)
MALFORMED = {
    "a repeated SAN": lambda: repeated(SAN, 0x11),
    "a repeated basicConstraints": lambda: repeated(
        (x509.BasicConstraints(ca=False, path_length=None), True), 0x13
    ),
    "a repeated keyUsage": lambda: repeated((key_usage("digital_signature"), True), 0x0F),
    "a repeated extKeyUsage": lambda: repeated(
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False), 0x25
    ),
    "a repeated unknown extension": lambda: patched(
        build([raw("1.2.3.4", b"\x05\x00"), raw("1.2.3.5", b"\x05\x00")]),
        b"\x06\x03\x2a\x03\x05",
        b"\x06\x03\x2a\x03\x04",
    ),
    "an undecodable basicConstraints": lambda: build([raw("2.5.29.19", b"\x04\x01\xff", True)]),
    "an undecodable keyUsage": lambda: build([raw("2.5.29.15", b"\x04\x01\xff", True)]),
    "an undecodable extKeyUsage": lambda: build([raw("2.5.29.37", b"\x04\x01\xff")]),
    "an undecodable SAN": lambda: build([raw("2.5.29.17", b"\x04\x01\xff")]),
    "an undecodable authorityKeyIdentifier": lambda: build([raw("2.5.29.35", b"\x04\x01\xff")]),
    "undecodable certificatePolicies": lambda: build([raw("2.5.29.32", b"\x04\x01\xff")]),
    "an undecodable authorityInfoAccess": lambda: build([raw("1.3.6.1.5.5.7.1.1", b"\x04\x00")]),
    "undecodable CRL distribution points": lambda: build([raw("2.5.29.31", b"\x04\x00")]),
    "undecodable nameConstraints": lambda: build([raw("2.5.29.30", b"\x04\x00")]),
    "an undecodable OCSP noCheck": lambda: build([raw("1.3.6.1.5.5.7.48.1.5", b"\x04\x00")]),
    "a truncated subjectKeyIdentifier": lambda: build([raw("2.5.29.14", b"\x04\x01")]),
    "bytes after basicConstraints": lambda: build([raw("2.5.29.19", b"\x30\x00\x00", True)]),
    "basicConstraints with cA FALSE encoded": lambda: build(
        [raw("2.5.29.19", bytes.fromhex("3003010100"), True)]
    ),
    "basicConstraints with a long-form length": lambda: build(
        [raw("2.5.29.19", bytes.fromhex("30810101ff"), True)]
    ),
    "a negative pathLenConstraint": lambda: build(
        [raw("2.5.29.19", bytes.fromhex("30060101ff0201ff"), True)]
    ),
    "a negative pathLenConstraint beside a keyUsage": lambda: build(
        [
            raw("2.5.29.19", bytes.fromhex("30060101ff020180"), True),
            (key_usage("key_cert_sign"), True),
        ]
    ),
    "a keyUsage with a set unused bit": lambda: build(
        [raw("2.5.29.15", bytes.fromhex("03020181"), True)]
    ),
    "encipherOnly without keyAgreement": lambda: build(
        [raw("2.5.29.15", bytes.fromhex("03020081"), True)]
    ),
    "decipherOnly without keyAgreement": lambda: build(
        [raw("2.5.29.15", bytes.fromhex("0303008080"), True)]
    ),
    "an empty SAN": lambda: build([raw("2.5.29.17", b"\x30\x00")]),
    "an empty extKeyUsage": lambda: build([raw("2.5.29.37", b"\x30\x00")]),
    "empty certificatePolicies": lambda: build([raw("2.5.29.32", b"\x30\x00")]),
    "a URI SAN that is not UTF-8": lambda: build(
        [raw("2.5.29.17", bytes.fromhex("30058603c3a9ff"))]
    ),
    "a DNS SAN that is not UTF-8": lambda: build([raw("2.5.29.17", bytes.fromhex("30038201ff"))]),
    "an email SAN that is not UTF-8": lambda: build(
        [raw("2.5.29.17", bytes.fromhex("30038101ff"))]
    ),
    # once blind spots; tests/unit/identity/test_cert_parity.py has every class
    "a non-canonical BOOLEAN": lambda: build([raw("2.5.29.19", bytes.fromhex("3003010101"), True)]),
    "a negative inhibitAnyPolicy": lambda: build([raw("2.5.29.54", bytes.fromhex("0201ff"))]),
    "empty nameConstraints": lambda: build([raw("2.5.29.30", b"\x30\x00")]),
    "an undecodable TLS feature": lambda: build([raw("1.3.6.1.5.5.7.1.24", b"\x04\x00")]),
}
WELL_FORMED = {
    "an empty keyUsage": lambda: build([raw("2.5.29.15", b"\x03\x01\x00", True)]),
    "an empty basicConstraints": lambda: build([raw("2.5.29.19", b"\x30\x00", True)]),
    "an empty subjectKeyIdentifier": lambda: build([raw("2.5.29.14", b"\x04\x00")]),
    "an empty authorityKeyIdentifier": lambda: build([raw("2.5.29.35", b"\x30\x00")]),
    "an empty authorityInfoAccess": lambda: build([raw("1.3.6.1.5.5.7.1.1", b"\x30\x00")]),
    "an OCSP noCheck": lambda: build([raw("1.3.6.1.5.5.7.48.1.5", b"\x05\x00")]),
    "a keyUsage with padding bits": lambda: build([raw("2.5.29.15", b"\x03\x02\x01\x80", True)]),
    "an unknown OID holding anything": lambda: build([raw("1.2.3.4", b"\x04\x01\xff", True)]),
}


@pytest.mark.parametrize("make", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_extensions(make: object) -> None:
    assert callable(make)
    certificate = make()
    assert oracle(certificate)["malformed"] is True
    cert = Cert.from_der(certificate)
    assert cert.malformed, "cryptography refuses these extensions"
    assert_reads_as_cryptography(certificate)


@pytest.mark.parametrize("make", WELL_FORMED.values(), ids=WELL_FORMED.keys())
def test_well_formed_extensions_at_the_edges(make: object) -> None:
    assert callable(make)
    certificate = make()
    assert Cert.from_der(certificate).malformed is None
    assert_reads_as_cryptography(certificate)


def test_the_extensions_are_read_even_when_openssl_finds_them_invalid() -> None:
    """X509_get_key_usage answers 0 for such a certificate: Cert reads the extension.
    (An undecodable nsCertType: OpenSSL finds it invalid, cryptography ignores it.)"""
    cert = Cert.from_der(
        build(
            [
                raw("2.16.840.1.113730.1.1", b"\x05\x00"),
                (key_usage("digital_signature", "key_cert_sign"), True),
                (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), False),
            ]
        )
    )
    assert cert.malformed == "OpenSSL finds the extensions invalid"
    assert cert.key_usage == {"digital_signature", "key_cert_sign"} and cert.key_usage_critical
    assert cert.extended_key_usage == {"client_auth"}


def test_long_unknown_oids_are_told_apart() -> None:
    prefix = "1.2.3." + ".".join(["16383"] * 25)  # 150 characters, 52 bytes of DER
    certificate = build([raw(prefix + ".1", b"\x05\x00"), raw(prefix + ".2", b"\x05\x00")])
    assert Cert.from_der(certificate).malformed is None
    assert_reads_as_cryptography(certificate)


def test_malformed_says_which_extension() -> None:
    assert Cert.from_der(repeated(SAN, 0x11)).malformed == "duplicate extension 2.5.29.17"
    undecodable = Cert.from_der(build([raw("2.5.29.19", b"\x04\x01\xff", True)]))
    assert undecodable.malformed == "extension 2.5.29.19: undecodable"


def test_a_name_attribute_that_is_no_string_is_refused() -> None:
    """The documented difference: cryptography reads a CN that is an OCTET STRING as
    text; OpenSSL refuses the certificate, as it does in a TLS handshake."""
    issuer = name((NameOID.ORGANIZATION_NAME, "issuer"))
    certificate = patched(
        build(issuer=issuer), bytes.fromhex("06035504030c07"), bytes.fromhex("06035504030407")
    )
    assert oracle(certificate)["subject"] == "CN=crafted"
    with pytest.raises(ValueError, match="mstring wrong tag"):
        Cert.from_der(certificate)


def test_names_beyond_rfc_4514_go_by_openssls_short_names() -> None:
    """The documented difference: cryptography writes such attributes by dotted OID."""
    subject = name((NameOID.EMAIL_ADDRESS, "a@example.org"), (NameOID.SERIAL_NUMBER, "42"))
    cert = Cert.from_der(build(subject=subject))
    assert cert.subject == "serialNumber=42,emailAddress=a@example.org"
    street = Cert.from_der(build(subject=name((NameOID.STREET_ADDRESS, "1 Main St"))))
    assert street.subject == "street=1 Main St"  # cryptography: STREET=1 Main St


# --- what is not a certificate ------------------------------------------------------


def test_every_truncation_is_a_value_error(real_chain: tuple[bytes, ...]) -> None:
    leaf = real_chain[0]
    for length in range(len(leaf)):
        with pytest.raises(ValueError, match=r"not a DER X\.509 certificate"):
            Cert.from_der(leaf[:length])


def test_trailing_bytes_are_refused_as_cryptography_does(real_chain: tuple[bytes, ...]) -> None:
    for tail in (b"\x00", b"\x30\x00", real_chain[1]):
        with pytest.raises(ValueError):
            x509.load_der_x509_certificate(real_chain[0] + tail)
        with pytest.raises(ValueError, match="bytes after the DER"):
            Cert.from_der(real_chain[0] + tail)


def test_random_bytes_and_flipped_bits_never_crash(real_chain: tuple[bytes, ...]) -> None:
    """Whatever OpenSSL makes of damaged input is a Cert or a ValueError; where
    cryptography reads one, so does OpenSSL."""
    rng = random.Random(19)
    for _ in range(300):
        with contextlib.suppress(ValueError):
            Cert.from_der(rng.randbytes(rng.randrange(1, 600)))
    leaf = real_chain[0]
    for _ in range(1500):
        damaged = bytearray(leaf)
        for _ in range(rng.randrange(1, 4)):
            damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
        try:
            expected = oracle(bytes(damaged))
        except Exception:  # anything cryptography refuses to read
            expected = None
        try:
            Cert.from_der(bytes(damaged))
        except ValueError as exc:
            # OpenSSL refuses name attributes that are not strings; cryptography does not
            assert expected is None or "mstring wrong tag" in str(exc), "only OpenSSL refuses"


def test_errors_say_why_and_leave_no_trace_for_ssl() -> None:
    """A refused certificate's OpenSSL error is in our message, and gone from the
    thread's queue, where the ssl module would take it for its own."""
    with pytest.raises(ValueError, match="asn1 encoding routines"):
        Cert.from_der(b"\x30\x03\x02\x01\x01")
    assert openssl.ERR_get_error() == 0
    assert "EOF occurred in violation of protocol" in eof_in_handshake()


def eof_in_handshake() -> str:
    """The ssl module's error for a server that hangs up in the handshake."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).wrap_bio(incoming, outgoing, server_hostname="x")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    incoming.write_eof()
    with pytest.raises(ssl.SSLError) as refused:
        tls.do_handshake()
    return str(refused.value)


# --- PEM ------------------------------------------------------------------------------


def test_pem_round_trip_and_cryptographys_pem(real_chain: tuple[bytes, ...]) -> None:
    certs = [Cert.from_der(c) for c in real_chain]
    for cert in certs:
        expected = x509.load_der_x509_certificate(cert.der).public_bytes(serialization.Encoding.PEM)
        assert cert.to_pem() == expected
    assert Cert.all_from_pem(b"".join(c.to_pem() for c in certs)) == certs


def test_all_from_pem_skips_text_and_other_blocks(real_chain: tuple[bytes, ...]) -> None:
    leaf, intermediate = (Cert.from_der(c) for c in real_chain[:2])
    key = pki.new_key().private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    data = b"subject=leaf\r\n" + leaf.to_pem().replace(b"\n", b"\r\n") + key + b"\n# next\n"
    data += intermediate.to_pem() + b"trailing text"
    assert Cert.all_from_pem(data) == [leaf, intermediate]
    assert [der(c) for c in x509.load_pem_x509_certificates(data)] == [leaf.der, intermediate.der]


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"no PEM at all",
        b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        b"-----BEGIN CERTIFICATE-----\nMIIB\n",  # no END
        b"-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",  # not base64
        b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n",  # not X.509
        b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END PRIVATE KEY-----\n",
    ],
    ids=["empty", "no block", "no certificate block", "no END", "bad base64", "bad DER", "mixed"],
)
def test_all_from_pem_refuses(data: bytes) -> None:
    with pytest.raises(ValueError):
        Cert.all_from_pem(data)


@pytest.mark.parametrize(
    "data",
    [
        b"-----BEGIN CERTIFICATE-----\n" * 80_000,  # BEGINs without END: was quadratic
        b"-----BEGIN CERTIFICATE-----\n" + b"A" * 2_000_000,
        b"-----BEGIN " + b"A" * 2_000_000,
        b"-----BEGIN CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n" * 40_000
        + b"-----END CERTIFICATE-----\n",
    ],
    ids=["BEGIN lines", "one BEGIN, no END", "an endless label", "a BEGIN inside a block"],
)
def test_all_from_pem_refuses_2_mb_of_hostile_pem_at_once(data: bytes) -> None:
    assert len(data) >= 2_000_000
    started = time.monotonic()
    with pytest.raises(ValueError):
        Cert.all_from_pem(data)
    assert time.monotonic() - started < 1.0  # linear: milliseconds; quadratic: minutes


def test_a_begin_inside_a_block_is_refused(real_chain: tuple[bytes, ...]) -> None:
    good = Cert.from_der(real_chain[0]).to_pem()
    with pytest.raises(ValueError, match="begins inside another"):
        Cert.all_from_pem(b"-----BEGIN CERTIFICATE-----\n" + good)


@pytest.mark.parametrize("value", [10**10, "MIIB", None, [0x30, 0x00], 1.5])
def test_from_der_takes_only_bytes_like(value: object) -> None:
    """bytes(10**10) is 10 GB of zeros: no int, str or list ever reaches bytes()."""
    with pytest.raises(TypeError, match="bytes"):
        Cert.from_der(value)  # type: ignore[arg-type]


def test_from_der_takes_bytearray_and_memoryview(real_chain: tuple[bytes, ...]) -> None:
    leaf = Cert.from_der(real_chain[0])
    assert Cert.from_der(bytearray(real_chain[0])) == leaf
    assert Cert.from_der(memoryview(real_chain[0])) == leaf


def test_one_bad_block_refuses_all(real_chain: tuple[bytes, ...]) -> None:
    good = Cert.from_der(real_chain[0]).to_pem()
    bad = b"-----BEGIN CERTIFICATE-----\nMAMCAQE=\n-----END CERTIFICATE-----\n"
    with pytest.raises(ValueError, match="PEM certificate 2"):
        Cert.all_from_pem(good + bad)


# --- the value ------------------------------------------------------------------------


def test_equal_and_hashed_by_der(real_chain: tuple[bytes, ...]) -> None:
    a, b = Cert.from_der(real_chain[0]), Cert.from_der(bytes(real_chain[0]))
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert a != Cert.from_der(real_chain[1])
    assert a.sha256() == x509.load_der_x509_certificate(a.der).fingerprint(hashes.SHA256()).hex()
    with pytest.raises(AttributeError):
        a.serial = 1  # type: ignore[misc]
    assert "spiffe://example.org/ns/shop/sa/web" in repr(a)


def test_identity_cert_imports_no_cryptography() -> None:
    """In a fresh interpreter: identity.cert's own imports (identity/__init__.py's
    aside, stubbed here) bring no cryptography."""
    code = (
        "import sys, types; sys.modules['identity'] = types.ModuleType('identity');"
        "sys.modules['identity'].__path__ = [sys.argv[1]];"
        "import identity.cert;"
        "print(sorted(m for m in sys.modules if m.startswith(('cryptography', '_cffi'))))"
    )
    identity_dir = str(Path(__file__).parents[3] / "identity")
    result = subprocess.run(
        [sys.executable, "-c", code, identity_dir], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
