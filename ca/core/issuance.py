"""Issuance decisions: the lifetime of a new SVID, and the check of what was signed.

Pure: the clock value and serial come in as arguments. A signer (local key or
Vault) turns a `LeafRequest` into a chain; `check_issued` then verifies that
the chain is exactly what was asked for before anything leaves the CA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ca.core.certs import as_certs
from ca.core.template import LeafRequest
from identity import SpiffeId, SvidError, TrustBundle, check_leaf
from identity.chain import ChainError, check_chain


@dataclass(frozen=True)
class IssuancePolicy:
    default_ttl: timedelta = timedelta(hours=1)
    max_ttl: timedelta = timedelta(hours=24)
    # Backdating NotBefore lets a peer whose clock runs slow accept a fresh SVID.
    backdate: timedelta = timedelta(seconds=60)


class IssuanceError(Exception):
    """The signed result is not what was asked for; nothing may be returned."""


class IssuerExpired(IssuanceError):
    """The issuing certificate's life is over: nothing can be signed until it is renewed."""


class TtlRejected(ValueError):
    """The requested lifetime is not a lifetime."""


@dataclass(frozen=True)
class IssuedSvid:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first
    bundle: TrustBundle

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def plan_leaf(
    spiffe_id: SpiffeId,
    public_key: CertificatePublicKeyTypes,
    requested_ttl: timedelta | None,
    policy: IssuancePolicy,
    issuer_not_after: datetime,
    now: datetime,
    serial: int,
) -> LeafRequest:
    """Decide validity: default or requested TTL, capped by max_ttl and the issuer's life."""
    if requested_ttl is not None and requested_ttl < timedelta(0):
        raise TtlRejected(f"requested TTL {requested_ttl} is negative")
    ttl = min(requested_ttl or policy.default_ttl, policy.max_ttl)
    not_before, not_after = validity(now, ttl, issuer_not_after, policy.backdate)
    return LeafRequest(spiffe_id, public_key, not_before, not_after, serial)


def validity(
    now: datetime, ttl: timedelta, issuer_not_after: datetime, backdate: timedelta
) -> tuple[datetime, datetime]:
    """NotBefore and NotAfter of anything the CA signs (SVIDs, its serving certificate).

    The one place that decides both that the issuer can still sign (IssuerExpired
    if not) and that nothing outlives it.
    """
    not_after = min(now + ttl, issuer_not_after)
    if not_after <= now:
        raise IssuerExpired("the issuing certificate has expired")
    return now - backdate, not_after


def check_issued(
    request: LeafRequest, chain: Sequence[x509.Certificate], bundle: TrustBundle, now: datetime
) -> None:
    """Raise IssuanceError unless `chain` is a valid SVID for `request` under `bundle`."""
    if not chain:
        raise IssuanceError("signer returned an empty chain")
    leaf = chain[0]
    certs = as_certs(chain)
    try:
        spiffe_id = check_leaf(certs[0], usage="both", now=now)
    except SvidError as exc:
        raise IssuanceError(f"signed certificate is not a valid X.509-SVID: {exc}") from None
    if spiffe_id != request.spiffe_id:
        raise IssuanceError(f"signed certificate names {spiffe_id}, not {request.spiffe_id}")
    if leaf.public_key() != request.public_key:
        raise IssuanceError("signed certificate carries a different public key")
    if leaf.not_valid_after_utc > request.not_after:
        raise IssuanceError("signed certificate outlives what was asked for")
    try:
        check_chain(certs, bundle)
    except ChainError as exc:
        raise IssuanceError(str(exc)) from None
