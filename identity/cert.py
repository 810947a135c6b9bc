"""X.509 certificates and private keys as plain values, read and made by OpenSSL.

The resident agent's certificate type. :class:`Cert` is what OpenSSL (the
libcrypto the ssl module loaded) reads in a DER certificate, taken once at
construction, through the ctypes binding :mod:`identity.openssl` and the modules
above it, the only modules that say ctypes: :mod:`identity.x509_parse` (with
:mod:`identity.x509_rules`), :mod:`identity.openssl_keys` and
:mod:`identity.x509_verify`. The checks of `identity.svid`
and `identity.chain` then read fields, never ASN.1. :class:`PrivateKey` is the
agent's own key as PKCS#8 bytes, and the CSR it sends. Neither imports
`cryptography`, whose 8.6 MiB an agent does not pay for; the CA, the
injector and the CLI go on using it, and the tests use it as the oracle.

The fields follow cryptography's reading of the same certificate, with these
differences, each outside what the X.509-SVID checks act on:

- ``subject`` and ``issuer`` are OpenSSL's RFC 2253 text (X509_NAME_print_ex,
  UTF-8 kept). For the attributes of RFC 4514 (CN, L, ST, O, OU, C, DC, UID)
  it is cryptography's ``rfc4514_string()``; other attributes go by OpenSSL's
  short name (``street=`` for STREET, ``emailAddress=`` where cryptography
  writes ``1.2.840.113549.1.9.1=``), an OID OpenSSL does not know is dumped as
  ``#``-hex DER, control characters are escaped as ``\\XX``, and the values of
  a multi-valued RDN come in reverse order.
- ``malformed`` is set (or from_der raises) exactly where cryptography refuses the
  certificate: at load (not DER, a version other than v1 or v3, a name or an
  algorithm's parameters it cannot read) or at ``cert.extensions``. Each extension
  cryptography decodes is decoded with the ASN.1 item of OpenSSL's own method for
  it, encoded back to the same bytes, and held to what cryptography's type adds
  (every GeneralName wherever it appears: no x400Address or ediPartyName, UTF-8
  IA5 names, an iPAddress of 4 or 16 bytes or a network of 8 or 32; a pathLen
  only with cA; unsigned integers; non-empty lists ...); the whole certificate is
  encoded back too. tests/unit/identity/test_cert_parity.py is the differential
  test, cryptography the oracle. Stricter than cryptography: what makes OpenSSL
  mark the certificate invalid (an undecodable nsCertType or proxyCertInfo, which
  cryptography ignores), except an empty keyUsage, which it reads as all false.
  Not compared: the inside of DSA, DH and RSA-PSS parameters (only their ASN.1
  type), and of a user notice beyond its strings' types.
- A name attribute that is not a string (an OCTET STRING, say) makes OpenSSL
  refuse the whole certificate, as it does in a TLS handshake; cryptography
  reads it.
- ``spki`` is the certificate's own SubjectPublicKeyInfo bytes; cryptography
  re-encodes the key it decodes from them (an EC point in hybrid form comes
  back uncompressed).
- ``extended_key_usage`` holds the purposes OpenSSL has a flag for: an OID
  outside ``_EXTENDED_KEY_USAGE`` is not in the set.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from identity import openssl_keys, x509_parse, x509_verify
from identity.openssl import EXFLAG_BCONS, EXFLAG_CA

__all__ = ["MAX_CERTIFICATES", "Cert", "PrivateKey", "distinct", "verify_chain"]

#: KU_* bits of X509_get_key_usage, by cryptography's KeyUsage attribute names.
_KEY_USAGE = (
    (0x0080, "digital_signature"),
    (0x0040, "content_commitment"),
    (0x0020, "key_encipherment"),
    (0x0010, "data_encipherment"),
    (0x0008, "key_agreement"),
    (0x0004, "key_cert_sign"),
    (0x0002, "crl_sign"),
    (0x0001, "encipher_only"),
    (0x8000, "decipher_only"),
)
#: OpenSSL's NIDs of the purposes it has an XKU_* flag for, by cryptography's
#: ExtendedKeyUsageOID names (lower case). Server-gated crypto and DVCS have no name
#: there; other purposes are left out of the set.
_EXTENDED_KEY_USAGE = {
    129: "server_auth",
    130: "client_auth",
    131: "code_signing",
    132: "email_protection",
    133: "time_stamping",
    180: "ocsp_signing",
    910: "any_extended_key_usage",
}
#: Meaningful only with keyAgreement: cryptography refuses a keyUsage without it.
_ONLY = frozenset({"encipher_only", "decipher_only"})
_CERTIFICATE_LABELS = (b"CERTIFICATE", b"X509 CERTIFICATE")
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----")
_PEM_END = re.compile(rb"-----END ([A-Z0-9 ]+)-----")
_WHITESPACE = re.compile(rb"\s+")


@dataclass(frozen=True, eq=False, repr=False)
class Cert:
    """A parsed X.509 certificate; equal and hashed by its DER.

    Made by :meth:`from_der` or :meth:`all_from_pem`, which read every field
    at once: a value that exists parsed.
    """

    der: bytes
    serial: int
    subject: str  # RFC 4514 text
    issuer: str
    not_before: datetime  # aware, UTC
    not_after: datetime
    ca: bool | None  # BasicConstraints cA; None: no BasicConstraints
    key_usage: frozenset[str] | None  # cryptography's KeyUsage names that are set; None: absent
    key_usage_critical: bool
    extended_key_usage: frozenset[str] | None  # {"server_auth", ...}; None: absent
    uris: tuple[str, ...]  # URI SANs, in order
    spki: bytes  # SubjectPublicKeyInfo DER
    malformed: str | None  # why the extensions are unusable, else None

    @classmethod
    def from_der(cls, der: bytes) -> Cert:
        """Read one DER certificate, and nothing after it; ValueError saying why not.

        TypeError unless `der` is bytes-like: bytes(10**10) would allocate 10 GB."""
        if not isinstance(der, bytes | bytearray | memoryview):
            raise TypeError(f"a DER certificate is bytes, not {type(der).__name__}")
        der = bytes(der)
        parsed = x509_parse.parse_certificate(der)
        flags, malformed = parsed.flags, parsed.malformed
        key_usage = None if parsed.key_usage is None else _names(parsed.key_usage, _KEY_USAGE)
        if key_usage is not None and _ONLY & key_usage and "key_agreement" not in key_usage:
            malformed = malformed or "keyUsage has encipherOnly/decipherOnly, no keyAgreement"
        return cls(
            der=der,
            serial=parsed.serial,
            subject=parsed.subject,
            issuer=parsed.issuer,
            not_before=parsed.not_before,
            not_after=parsed.not_after,
            ca=bool(flags & EXFLAG_CA) if flags & EXFLAG_BCONS else None,
            key_usage=key_usage,
            key_usage_critical=parsed.key_usage_critical,
            extended_key_usage=_purposes(parsed.extended_key_usage),
            uris=parsed.uris,
            spki=parsed.spki,
            malformed=malformed,
        )

    @classmethod
    def all_from_pem(cls, data: bytes) -> list[Cert]:
        """Every CERTIFICATE block of `data`, in order; text around them is skipped,
        as are blocks of other kinds. ValueError if there is none or one is bad."""
        blocks = _pem_blocks(data, _CERTIFICATE_LABELS)
        if not blocks:
            raise ValueError("no PEM CERTIFICATE block")
        read: dict[bytes, Cert] = {}  # each certificate read once, however often repeated
        for der, index in distinct(blocks).items():
            try:
                read[der] = cls.from_der(der)
            except ValueError as exc:
                raise ValueError(f"PEM certificate {index + 1}: {exc}") from None
        return [read[der] for der in blocks]

    def to_pem(self) -> bytes:
        return _pem(b"CERTIFICATE", self.der)

    def sha256(self) -> str:
        """The SHA-256 fingerprint of the DER, in lower-case hex."""
        return hashlib.sha256(self.der).hexdigest()

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Cert):
            return NotImplemented
        return self.der == other.der

    def __hash__(self) -> int:
        return hash(self.der)

    def __repr__(self) -> str:
        return f"Cert(subject={self.subject!r}, serial={self.serial:#x}, uris={self.uris!r})"


@dataclass(frozen=True, repr=False)
class PrivateKey:
    """The agent's own private key: PKCS#8 DER, never in a repr or a log."""

    der: bytes  # PKCS#8 DER
    spki: bytes  # its public key, SubjectPublicKeyInfo DER
    algorithm: str  # OpenSSL's name of the key type: "EC", "RSA", "ED25519", ...

    @classmethod
    def generate_p256(cls) -> PrivateKey:
        return cls(*openssl_keys.generate_p256())

    @classmethod
    def from_pem(cls, data: bytes) -> PrivateKey:
        """The first private key of `data`: unencrypted PKCS#8, SEC1 (EC) or PKCS#1 (RSA).

        An encrypted key is a ValueError; no passphrase is ever asked for.
        """
        return cls(*openssl_keys.key_from_pem(bytes(data)))

    def to_pem(self) -> bytes:
        """PKCS#8 PEM."""
        return _pem(b"PRIVATE KEY", self.der)

    def csr(self) -> bytes:
        """A DER CSR for this key, what the rotator sends: empty subject, no
        extensions, signed with SHA-256 (Ed25519 and Ed448 sign without a digest)."""
        return openssl_keys.sign_csr(self.der, digest=self.algorithm not in ("ED25519", "ED448"))

    def __repr__(self) -> str:
        return f"PrivateKey({self.algorithm}, ...)"


def verify_chain(chain: Sequence[Cert], roots: Sequence[Cert]) -> None:
    """Raise ValueError with OpenSSL's reason unless `chain` (leaf first) verifies up
    to one of `roots`.

    OpenSSL's own path validation (X509_verify_cert): each signature, each issuer
    a CA (basicConstraints cA, keyUsage keyCertSign where present) within its
    pathLenConstraint, and name constraints, URI ones included. With
    X509_V_FLAG_X509_STRICT, as the agent's TLS contexts verify: RFC 5280's rules
    too (a CA's basicConstraints critical and keyUsage present, subjectKeyIdentifier
    in a CA, authorityKeyIdentifier below the root, no empty subject without a
    critical SAN, matching signature algorithms...). Not checked: time
    (X509_V_FLAG_NO_CHECK_TIME; callers check validity against their own clock),
    purpose (no extended key usage is required of any certificate), policies,
    revocation. A root is a trust anchor only if it is self-signed, as in TLS
    here (no X509_V_FLAG_PARTIAL_CHAIN): a chain cannot stop at an intermediate
    placed among `roots`.
    """
    x509_verify.verify_certificate(
        [cert.der for cert in chain], [root.der for root in dict.fromkeys(roots)]
    )


def _names(bits: int, table: tuple[tuple[int, str], ...]) -> frozenset[str]:
    return frozenset(name for bit, name in table if bits & bit)


def _purposes(nids: frozenset[int] | None) -> frozenset[str] | None:
    if nids is None:
        return None
    return frozenset(_EXTENDED_KEY_USAGE[nid] for nid in nids if nid in _EXTENDED_KEY_USAGE)


def _pem(label: bytes, der: bytes) -> bytes:
    text = base64.b64encode(der)
    lines = b"\n".join(text[i : i + 64] for i in range(0, len(text), 64))
    return b"-----BEGIN %s-----\n%s\n-----END %s-----\n" % (label, lines, label)


#: More different certificates than this in one PEM or one bundle are refused before
#: any is read: a trust domain publishes a root or two (a few during rotations), a
#: chain is a leaf and its CAs. Reading one costs 0.2-0.3 ms with OpenSSL 3.0, on
#: the event loop when the bundle file changes.
MAX_CERTIFICATES = 100


def distinct(ders: Sequence[bytes]) -> dict[bytes, int]:
    """Each different DER of `ders` with the index where it first appears; ValueError
    if there are more than MAX_CERTIFICATES."""
    first: dict[bytes, int] = {}
    for index, der in enumerate(ders):
        first.setdefault(bytes(der), index)
    if len(first) > MAX_CERTIFICATES:
        raise ValueError(
            f"{len(first)} different certificates; at most {MAX_CERTIFICATES} are read"
            " (a trust bundle holds its trust domain's few roots, a chain a leaf and its CAs)"
        )
    return first


def _pem_blocks(data: bytes, labels: tuple[bytes, ...]) -> list[bytes]:
    """The DER of each PEM block of `data` whose label is one of `labels`.

    One pass, each byte looked at a bounded number of times: a BEGIN, then the
    next END after it (a lazy `BEGIN(.*?)END` regex is quadratic on a BEGIN
    with no END). A BEGIN without an END, or a second BEGIN before the END, is
    refused."""
    blocks = []
    position = 0
    while begin := _PEM_BEGIN.search(data, position):
        end = _PEM_END.search(data, begin.end())
        if end is None:
            raise ValueError("a PEM block has no END line")
        if data.find(b"-----BEGIN ", begin.end(), end.start()) >= 0:
            raise ValueError("a PEM block begins inside another")
        label = begin.group(1)
        if label != end.group(1):
            raise ValueError(f"PEM BEGIN {label.decode()} ends with END {end.group(1).decode()}")
        if label in labels:
            body = data[begin.end() : end.start()]
            try:
                blocks.append(base64.b64decode(_WHITESPACE.sub(b"", body), validate=True))
            except binascii.Error as exc:
                raise ValueError(f"PEM {label.decode()} block is not base64: {exc}") from None
        position = end.end()
    return blocks
