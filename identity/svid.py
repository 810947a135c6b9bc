"""X.509-SVID leaf checks: what makes a certificate a SPIFFE identity document.

These are the rules of the X.509-SVID specification for leaf certificates,
written as small pure checks over the facts OpenSSL read from a certificate
(:class:`~identity.cert.Cert`). They do not verify a signature or build a
chain; the TLS stack does that against a :class:`~identity.bundle.TrustBundle`.
What they add is the part TLS does not know about: which name in the
certificate *is* the identity, and that the certificate cannot be used as a
CA to mint other identities.

Every failure raises :class:`SvidError` with a short, bounded ``reason``
(safe as a metrics label) and a message for humans.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, get_args

from identity.cert import Cert
from identity.spiffe_id import InvalidSpiffeId, SpiffeId

__all__ = ["SvidError", "SvidErrorReason", "Usage", "check_leaf", "spiffe_id_of"]

Usage = Literal["client", "server", "both"]

SvidErrorReason = Literal[
    "malformed_extensions",
    "no_uri_san",
    "multiple_uri_sans",
    "invalid_spiffe_id",
    "missing_basic_constraints",
    "is_ca",
    "missing_key_usage",
    "key_usage_not_critical",
    "no_digital_signature",
    "ca_key_usage",
    "missing_server_auth",
    "missing_client_auth",
    "not_yet_valid",
    "expired",
    "foreign_trust_domain",
]


class SvidError(ValueError):
    """A certificate that is not a valid X.509-SVID leaf.

    ``reason`` is one of :data:`SvidErrorReason`, so it can label a metric
    without letting peer-controlled text into label values.
    """

    def __init__(self, reason: SvidErrorReason, message: str) -> None:
        super().__init__(message)
        self.reason: SvidErrorReason = reason


def spiffe_id_of(cert: Cert) -> SpiffeId:
    """The SPIFFE ID carried by ``cert``: its one and only URI SAN.

    DNS, email and other SAN types are ignored even when their text looks
    like ``spiffe://...``, and so is the subject CN: only a URI SAN is an
    identity claim, and there must be exactly one so the identity is never
    ambiguous.
    """
    uris = _facts(cert).uris
    if not uris:
        raise SvidError("no_uri_san", "certificate has no URI SAN; an X.509-SVID needs exactly one")
    if len(uris) > 1:
        raise SvidError(
            "multiple_uri_sans",
            f"certificate has {len(uris)} URI SANs {list(uris)!r}; an X.509-SVID has exactly one",
        )
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise SvidError(
            "invalid_spiffe_id", f"URI SAN {uris[0]!r} is not a SPIFFE ID: {exc}"
        ) from exc


def check_leaf(
    cert: Cert,
    *,
    usage: Usage = "both",
    now: datetime | None = None,
) -> SpiffeId:
    """Check ``cert`` against the X.509-SVID leaf rules and return its SPIFFE ID.

    The ID must have a path: a bare trust domain ID belongs to a CA.

    ``usage`` says which TLS role the certificate is about to play; an
    ExtendedKeyUsage extension, when present, must allow it. ``now`` is an
    aware datetime; when given, the validity window is checked too (callers
    that let the TLS stack check time pass ``None``).
    """
    if usage not in get_args(Usage):
        raise ValueError(f"usage must be one of {get_args(Usage)}, not {usage!r}")
    if now is not None and now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    spiffe_id = spiffe_id_of(cert)
    if not spiffe_id.path:
        # X.509-SVID section 5.2: a trust domain's own ID names its signing
        # authority, which must never authenticate as a workload.
        raise SvidError(
            "invalid_spiffe_id", f"leaf SVID {spiffe_id} must have a path, not only a trust domain"
        )
    _check_basic_constraints(cert)
    _check_key_usage(cert)
    _check_extended_key_usage(cert, usage)
    if now is not None:
        _check_validity(cert, now)
    return spiffe_id


def _facts(cert: Cert) -> Cert:
    """``cert`` itself, once its extensions are known to be usable."""
    if cert.malformed is not None:  # undecodable or repeated
        raise SvidError("malformed_extensions", f"certificate extensions: {cert.malformed}")
    return cert


def _check_basic_constraints(cert: Cert) -> None:
    if _facts(cert).ca is None:
        raise SvidError("missing_basic_constraints", "leaf SVID has no BasicConstraints extension")
    if cert.ca:
        raise SvidError("is_ca", "leaf SVID must not be a CA (BasicConstraints ca=True)")


def _check_key_usage(cert: Cert) -> None:
    key_usage = _facts(cert).key_usage
    if key_usage is None:
        raise SvidError("missing_key_usage", "leaf SVID has no KeyUsage extension")
    if not cert.key_usage_critical:
        raise SvidError("key_usage_not_critical", "leaf SVID KeyUsage must be marked critical")
    if "digital_signature" not in key_usage:
        raise SvidError("no_digital_signature", "leaf SVID KeyUsage lacks digitalSignature")
    if "key_cert_sign" in key_usage or "crl_sign" in key_usage:
        raise SvidError(
            "ca_key_usage", "leaf SVID KeyUsage must not include keyCertSign or cRLSign"
        )


def _check_extended_key_usage(cert: Cert, usage: Usage) -> None:
    """An absent EKU allows every use; a present one must allow the requested role."""
    purposes = _facts(cert).extended_key_usage
    if purposes is None:
        return
    if usage in ("server", "both") and "server_auth" not in purposes:
        raise SvidError(
            "missing_server_auth", "leaf SVID ExtendedKeyUsage lacks serverAuth (TLS server)"
        )
    if usage in ("client", "both") and "client_auth" not in purposes:
        raise SvidError(
            "missing_client_auth", "leaf SVID ExtendedKeyUsage lacks clientAuth (TLS client)"
        )


def _check_validity(cert: Cert, now: datetime) -> None:
    not_before = cert.not_before
    not_after = cert.not_after
    if now < not_before:
        raise SvidError(
            "not_yet_valid",
            f"leaf SVID is not valid until {not_before.isoformat()} (now {now.isoformat()})",
        )
    if now >= not_after:
        raise SvidError(
            "expired", f"leaf SVID expired at {not_after.isoformat()} (now {now.isoformat()})"
        )
