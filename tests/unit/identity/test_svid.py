"""X.509-SVID leaf rules, each exercised with a certificate built for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, timezone

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity.cert import Cert
from identity.spiffe_id import SpiffeId
from identity.svid import SvidError, Usage, check_leaf, spiffe_id_of

KEY = ec.generate_private_key(ec.SECP256R1())
NOT_BEFORE = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)
NOT_AFTER = NOT_BEFORE + timedelta(hours=1)
DURING = NOT_BEFORE + timedelta(minutes=30)
WORKLOAD = "spiffe://example.org/ns/payments/sa/api"

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH


@dataclass(frozen=True)
class Leaf:
    """What goes into a test certificate; the defaults make a valid leaf SVID."""

    uris: Sequence[str] = (WORKLOAD,)
    dns: Sequence[str] = ()
    common_name: str | None = None
    basic_constraints: bool = True
    ca: bool = False
    key_usage: bool = True
    key_usage_critical: bool = True
    digital_signature: bool = True
    key_cert_sign: bool = False
    crl_sign: bool = False
    eku: Sequence[x509.ObjectIdentifier] | None = (SERVER_AUTH, CLIENT_AUTH)
    not_before: datetime = NOT_BEFORE
    not_after: datetime = NOT_AFTER
    extra: list[x509.ExtensionType] = field(default_factory=list)

    def build(self) -> Cert:
        """The certificate as the checks read it: built by cryptography, read by OpenSSL."""
        return Cert.from_der(self.signed().public_bytes(Encoding.DER))

    def signed(self) -> x509.Certificate:
        name = [x509.NameAttribute(NameOID.COMMON_NAME, self.common_name or "leaf")]
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name(name))
            .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
            .public_key(KEY.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(self.not_before)
            .not_valid_after(self.not_after)
        )
        for extension, critical in self._extensions():
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(KEY, hashes.SHA256())

    def _extensions(self) -> list[tuple[x509.ExtensionType, bool]]:
        extensions: list[tuple[x509.ExtensionType, bool]] = []
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in self.uris]
        names += [x509.DNSName(d) for d in self.dns]
        if names:
            extensions.append((x509.SubjectAlternativeName(names), False))
        if self.basic_constraints:
            extensions.append((x509.BasicConstraints(ca=self.ca, path_length=None), True))
        if self.key_usage:
            extensions.append((self._key_usage(), self.key_usage_critical))
        if self.eku is not None:
            extensions.append((x509.ExtendedKeyUsage(list(self.eku)), False))
        extensions += [(extension, False) for extension in self.extra]
        return extensions

    def _key_usage(self) -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=self.digital_signature,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=self.key_cert_sign,
            crl_sign=self.crl_sign,
            encipher_only=False,
            decipher_only=False,
        )


VALID = Leaf()


def test_valid_leaf_returns_its_spiffe_id() -> None:
    cert = VALID.build()
    assert check_leaf(cert) == SpiffeId.parse(WORKLOAD)
    assert check_leaf(cert, usage="client", now=DURING) == SpiffeId.parse(WORKLOAD)
    assert check_leaf(cert, usage="server", now=DURING) == SpiffeId.parse(WORKLOAD)


ACCEPTED = [
    pytest.param(replace(VALID, eku=None), "both", id="no-eku-allows-every-use"),
    pytest.param(replace(VALID, eku=(CLIENT_AUTH,)), "client", id="client-only-eku-as-client"),
    pytest.param(replace(VALID, eku=(SERVER_AUTH,)), "server", id="server-only-eku-as-server"),
    pytest.param(replace(VALID, dns=("api.example.org",)), "both", id="extra-dns-san"),
    pytest.param(
        replace(VALID, common_name="spiffe://example.org/ns/x/sa/admin"), "both", id="cn-ignored"
    ),
]


@pytest.mark.parametrize(("leaf", "usage"), ACCEPTED)
def test_accepted(leaf: Leaf, usage: Usage) -> None:
    assert check_leaf(leaf.build(), usage=usage, now=DURING) == SpiffeId.parse(WORKLOAD)


REJECTED = [
    pytest.param(replace(VALID, uris=()), "both", "no_uri_san", "no URI SAN", id="no-san"),
    pytest.param(
        replace(VALID, uris=(), dns=("spiffe://example.org/ns/a/sa/b",)),
        "both",
        "no_uri_san",
        "no URI SAN",
        id="dns-san-that-looks-like-spiffe-id",
    ),
    pytest.param(
        replace(VALID, uris=(WORKLOAD, "spiffe://example.org/ns/a/sa/b")),
        "both",
        "multiple_uri_sans",
        "2 URI SANs",
        id="two-uri-sans",
    ),
    pytest.param(
        replace(VALID, uris=("https://example.org/a",)),
        "both",
        "invalid_spiffe_id",
        "scheme 'https' is not 'spiffe'",
        id="uri-san-not-spiffe",
    ),
    pytest.param(
        replace(VALID, uris=("spiffe://example.org/a/../b",)),
        "both",
        "invalid_spiffe_id",
        "path segment '..' is not allowed",
        id="uri-san-dot-dot",
    ),
    pytest.param(
        replace(VALID, uris=("spiffe://example.org",)),
        "both",
        "invalid_spiffe_id",
        "must have a path",
        id="trust-domain-id-is-not-a-workload",
    ),
    pytest.param(
        replace(VALID, basic_constraints=False),
        "both",
        "missing_basic_constraints",
        "no BasicConstraints",
        id="no-basic-constraints",
    ),
    pytest.param(replace(VALID, ca=True), "both", "is_ca", "must not be a CA", id="ca-true"),
    pytest.param(
        replace(VALID, key_usage=False),
        "both",
        "missing_key_usage",
        "no KeyUsage",
        id="no-key-usage",
    ),
    pytest.param(
        replace(VALID, key_usage_critical=False),
        "both",
        "key_usage_not_critical",
        "must be marked critical",
        id="key-usage-not-critical",
    ),
    pytest.param(
        replace(VALID, digital_signature=False, key_cert_sign=False),
        "both",
        "no_digital_signature",
        "lacks digitalSignature",
        id="no-digital-signature",
    ),
    pytest.param(
        replace(VALID, key_cert_sign=True),
        "both",
        "ca_key_usage",
        "keyCertSign",
        id="key-cert-sign",
    ),
    pytest.param(replace(VALID, crl_sign=True), "both", "ca_key_usage", "cRLSign", id="crl-sign"),
    pytest.param(
        replace(VALID, eku=(SERVER_AUTH,)),
        "client",
        "missing_client_auth",
        "lacks clientAuth",
        id="eku-without-client-auth-as-client",
    ),
    pytest.param(
        replace(VALID, eku=(SERVER_AUTH,)),
        "both",
        "missing_client_auth",
        "lacks clientAuth",
        id="eku-without-client-auth-as-both",
    ),
    pytest.param(
        replace(VALID, eku=(CLIENT_AUTH,)),
        "server",
        "missing_server_auth",
        "lacks serverAuth",
        id="eku-without-server-auth-as-server",
    ),
    pytest.param(
        replace(VALID, eku=(ExtendedKeyUsageOID.CODE_SIGNING,)),
        "both",
        "missing_server_auth",
        "lacks serverAuth",
        id="eku-code-signing-only",
    ),
]


@pytest.mark.parametrize(("leaf", "usage", "reason", "message"), REJECTED)
def test_rejected(leaf: Leaf, usage: Usage, reason: str, message: str) -> None:
    with pytest.raises(SvidError, match=message) as caught:
        check_leaf(leaf.build(), usage=usage, now=DURING)
    assert caught.value.reason == reason


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        pytest.param(NOT_BEFORE - timedelta(microseconds=1), "not_yet_valid", id="before"),
        pytest.param(NOT_AFTER, "expired", id="at-not-after"),
        pytest.param(NOT_AFTER + timedelta(days=1), "expired", id="after"),
    ],
)
def test_validity_window(now: datetime, reason: str) -> None:
    with pytest.raises(SvidError, match=r"not valid until|expired at") as caught:
        check_leaf(VALID.build(), now=now)
    assert caught.value.reason == reason


def test_validity_window_bounds() -> None:
    cert = VALID.build()
    assert check_leaf(cert, now=NOT_BEFORE) == SpiffeId.parse(WORKLOAD)
    assert check_leaf(cert, now=NOT_AFTER - timedelta(seconds=1)) == SpiffeId.parse(WORKLOAD)


def test_validity_not_checked_without_now() -> None:
    expired = replace(VALID, not_after=NOT_BEFORE + timedelta(seconds=1)).build()
    assert check_leaf(expired) == SpiffeId.parse(WORKLOAD)


def test_now_must_be_aware() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        check_leaf(VALID.build(), now=DURING.replace(tzinfo=None))


def test_now_in_another_zone_is_compared_as_an_instant() -> None:
    plus_two = timezone(timedelta(hours=2))
    assert check_leaf(VALID.build(), now=DURING.astimezone(plus_two)) == SpiffeId.parse(WORKLOAD)


def test_unknown_usage_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="usage must be one of"):
        check_leaf(VALID.build(), usage="peer")  # type: ignore[arg-type]


def test_spiffe_id_of_checks_only_the_san() -> None:
    ca_cert = replace(VALID, uris=("spiffe://example.org",), ca=True, key_usage=False).build()
    assert spiffe_id_of(ca_cert) == SpiffeId.parse("spiffe://example.org")
    with pytest.raises(SvidError) as caught:
        spiffe_id_of(replace(VALID, uris=(WORKLOAD, WORKLOAD + "2")).build())
    assert caught.value.reason == "multiple_uri_sans"


def test_malformed_extensions_are_an_svid_error() -> None:
    # Rewrite the SubjectKeyIdentifier OID (2.5.29.14) into a second KeyUsage
    # OID (2.5.29.15): a certificate with duplicate extensions is unusable.
    ski = x509.SubjectKeyIdentifier.from_public_key(KEY.public_key())
    der = replace(VALID, extra=[ski]).build().der
    ski_oid, ku_oid = bytes.fromhex("0603551d0e"), bytes.fromhex("0603551d0f")
    assert der.count(ski_oid) == 1
    cert = Cert.from_der(der.replace(ski_oid, ku_oid))
    with pytest.raises(SvidError, match="certificate extensions") as caught:
        check_leaf(cert)
    assert caught.value.reason == "malformed_extensions"


def test_svid_error_is_a_value_error_with_a_reason() -> None:
    error = SvidError("expired", "leaf SVID expired")
    assert isinstance(error, ValueError)
    assert error.reason == "expired"
    assert str(error) == "leaf SVID expired"
