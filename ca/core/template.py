"""Certificate templates: what the CA puts in every certificate it makes.

Builders only; signing happens in a signer and checking in `issuance`. The
templates follow the X.509-SVID spec: one URI SAN, cA=false, keyUsage
critical digitalSignature, EKU serverAuth+clientAuth for leaves.

The intermediate carries no name constraint unless asked for: a critical URI
name constraint makes Python cryptography's verifier and rustls-webpki
(linkerd2-proxy, ztunnel, tonic clients) refuse the whole chain, and SPIRE
and Istio put none in theirs. What it protected, a root of one trust domain
vouching for an ID of another, is checked where an ID is taken from a
certificate: a peer's trust domain must be the one whose bundle verified it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from identity import SpiffeId, TrustDomain

ORGANIZATION = "Outrider"
ROOT_LIFETIME = timedelta(days=3650)
INTERMEDIATE_LIFETIME = timedelta(days=365)
#: How far before its making a CA certificate starts, as leaves are backdated
#: (`issuance.backdate`): a peer whose clock runs behind the CA's would otherwise
#: refuse every chain through a new root or intermediate until its clock caught up.
CA_BACKDATE = timedelta(seconds=60)

_LEAF_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=False,
    crl_sign=False,
    encipher_only=False,
    decipher_only=False,
)
_CA_USAGE = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


@dataclass(frozen=True)
class LeafRequest:
    """Everything the CA decided about one X.509-SVID, before it is signed."""

    spiffe_id: SpiffeId
    public_key: CertificatePublicKeyTypes
    not_before: datetime
    not_after: datetime
    serial: int
    # The workload's CSR, for signers that need proof of possession (Vault's
    # sign/<role>); its names are never used.
    csr: x509.CertificateSigningRequest | None = None


def _name(*parts: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in parts])


def _base(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: CertificatePublicKeyTypes,
    issuer_key: CertificatePublicKeyTypes,
    not_before: datetime,
    not_after: datetime,
    serial: int,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key),  # type: ignore[arg-type]
            critical=False,
        )
    )


def root(
    trust_domain: TrustDomain, public_key: CertificatePublicKeyTypes, now: datetime, serial: int
) -> x509.CertificateBuilder:
    """A self-signed root for the trust domain, carrying the trust domain's SPIFFE ID."""
    subject = _name(
        (NameOID.ORGANIZATION_NAME, ORGANIZATION),
        (NameOID.COMMON_NAME, f"{trust_domain} root CA"),
    )
    return (
        _base(
            subject, subject, public_key, public_key, now - CA_BACKDATE, now + ROOT_LIFETIME, serial
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(_uri_san(trust_domain.id), critical=False)
    )


def intermediate(
    trust_domain: TrustDomain,
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate,
    now: datetime,
    serial: int,
    lifetime: timedelta = INTERMEDIATE_LIFETIME,
    *,
    name_constraint: bool = False,
) -> x509.CertificateBuilder:
    """An issuing CA under `issuer`: pathlen 0; with `name_constraint`, a critical
    constraint that limits its URI names to the trust domain."""
    subject = _name(
        (NameOID.ORGANIZATION_NAME, ORGANIZATION),
        (NameOID.COMMON_NAME, f"{trust_domain} intermediate CA"),
    )
    not_after = min(now + lifetime, issuer.not_valid_after_utc)
    builder = (
        _base(
            subject,
            issuer.subject,
            public_key,
            issuer.public_key(),
            now - CA_BACKDATE,
            not_after,
            serial,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_CA_USAGE, critical=True)
        .add_extension(_uri_san(trust_domain.id), critical=False)
    )
    if name_constraint:
        builder = builder.add_extension(uri_name_constraint(trust_domain), critical=True)
    return builder


def uri_name_constraint(trust_domain: TrustDomain) -> x509.NameConstraints:
    """URIs in `trust_domain` only: the opt-in constraint of an intermediate."""
    return x509.NameConstraints(
        permitted_subtrees=[x509.UniformResourceIdentifier(trust_domain.name)],
        excluded_subtrees=None,
    )


def leaf(request: LeafRequest, issuer: x509.Certificate) -> x509.CertificateBuilder:
    """An X.509-SVID for `request.spiffe_id`; nothing from the CSR but its key is used."""
    subject = _name((NameOID.ORGANIZATION_NAME, ORGANIZATION))
    return (
        _base(
            subject,
            issuer.subject,
            request.public_key,
            issuer.public_key(),
            request.not_before,
            request.not_after,
            request.serial,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
        .add_extension(_uri_san(request.spiffe_id), critical=False)
    )


def serving(
    names: tuple[str, ...],
    public_key: CertificatePublicKeyTypes,
    issuer: x509.Certificate,
    not_before: datetime,
    not_after: datetime,
    serial: int,
) -> x509.CertificateBuilder:
    """The CA's own TLS server certificate: DNS (and IP) names from its config."""
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = _name((NameOID.ORGANIZATION_NAME, ORGANIZATION), (NameOID.COMMON_NAME, names[0]))
    return (
        _base(
            subject, issuer.subject, public_key, issuer.public_key(), not_before, not_after, serial
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_LEAF_USAGE, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )


def _uri_san(spiffe_id: SpiffeId) -> x509.SubjectAlternativeName:
    return x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))])
