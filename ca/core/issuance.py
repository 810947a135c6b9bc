"""Issuance decisions: the lifetime of a new SVID, and the check of what was signed.

Pure: the clock value and serial come in as arguments. A signer (local key or
Vault) turns a `LeafRequest` into a chain; `check_issued` then verifies that
the chain is exactly what was asked for before anything leaves the CA.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ca.core.template import LeafRequest
from identity import SpiffeId, SvidError, TrustBundle, check_leaf


@dataclass(frozen=True)
class IssuancePolicy:
    default_ttl: timedelta = timedelta(hours=1)
    max_ttl: timedelta = timedelta(hours=24)
    # Backdating NotBefore lets a peer whose clock runs slow accept a fresh SVID.
    backdate: timedelta = timedelta(seconds=60)


class IssuanceError(Exception):
    """The signed result is not what was asked for; nothing may be returned."""


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
    ttl = requested_ttl or policy.default_ttl
    not_after = min(now + min(ttl, policy.max_ttl), issuer_not_after)
    if not_after <= now:
        raise IssuanceError("the issuing certificate has expired")
    return LeafRequest(spiffe_id, public_key, now - policy.backdate, not_after, serial)


def check_issued(
    request: LeafRequest, chain: Sequence[x509.Certificate], bundle: TrustBundle, now: datetime
) -> None:
    """Raise IssuanceError unless `chain` is a valid SVID for `request` under `bundle`."""
    if not chain:
        raise IssuanceError("signer returned an empty chain")
    leaf = chain[0]
    try:
        spiffe_id = check_leaf(leaf, usage="both", now=now)
    except SvidError as exc:
        raise IssuanceError(f"signed certificate is not a valid X.509-SVID: {exc}") from None
    if spiffe_id != request.spiffe_id:
        raise IssuanceError(f"signed certificate names {spiffe_id}, not {request.spiffe_id}")
    if leaf.public_key() != request.public_key:
        raise IssuanceError("signed certificate carries a different public key")
    if leaf.not_valid_after_utc > request.not_after:
        raise IssuanceError("signed certificate outlives what was asked for")
    _check_links(chain, bundle)


def _check_links(chain: Sequence[x509.Certificate], bundle: TrustBundle) -> None:
    """Each certificate is signed by the next, and the last by a root of the bundle.

    Full path validation (with name constraints) is OpenSSL's job at the peer;
    this confirms the signer returned a chain that links up at all. Only the
    leaf is new on each call: verdicts on the CA links above it are cached,
    which halves the verification cost of an issuance.
    """
    for index, (child, parent) in enumerate(itertools.pairwise(chain)):
        if not (_ca_signed_by if index else _signed_by)(child, parent):
            raise IssuanceError(f"{child.subject.rfc4514_string()} is not signed by the next cert")
    anchored = _ca_signed_by if len(chain) > 1 else _signed_by
    if not any(anchored(chain[-1], root) for root in bundle.roots):
        raise IssuanceError("chain does not lead to a root of the trust bundle")


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@functools.lru_cache(maxsize=64)
def _ca_signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    return _signed_by(child, parent)
