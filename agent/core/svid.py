"""The agent's SVID, and the check of what the CA sent back before it is used.

The CA is trusted to sign, not to be right: a chain that does not lead to
the bundle, names another workload, carries another key or is already
expired is refused, and the agent goes on with the SVID it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from identity import BundleError, SpiffeId, SvidError, TrustBundle, check_leaf
from identity.chain import ChainError, check_chain


class SvidRejected(Exception):
    """The CA's answer is not a usable SVID for us; `reason` is a bounded label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, repr=False)
class Svid:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]  # leaf first
    key: ec.EllipticCurvePrivateKey
    bundle: TrustBundle

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> str:
        return f"{self.leaf.serial_number:x}"

    def chain_pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:  # never the key
        return f"Svid({self.spiffe_id}, serial={self.serial}, not_after={self.not_after}, key=...)"


def accept_svid(
    chain_der: Sequence[bytes],
    bundle_der: Sequence[bytes],
    key: ec.EllipticCurvePrivateKey,
    expected: SpiffeId,
    now: datetime,
) -> Svid:
    """The SVID in the CA's answer, or SvidRejected saying what is wrong with it."""
    try:
        chain = tuple(x509.load_der_x509_certificate(der) for der in chain_der)
        bundle = TrustBundle.from_der(expected.trust_domain, bundle_der)
    except (ValueError, BundleError) as exc:
        raise SvidRejected("malformed", f"the CA's answer does not parse: {exc}") from None
    if not chain:
        raise SvidRejected("malformed", "the CA returned no certificate")
    try:
        spiffe_id = check_leaf(chain[0], usage="both", now=now)
        check_chain(chain, bundle)
    except SvidError as exc:
        raise SvidRejected(exc.reason, f"the CA returned an invalid SVID: {exc}") from None
    except ChainError as exc:
        raise SvidRejected("untrusted_chain", str(exc)) from None
    if spiffe_id != expected:
        raise SvidRejected("wrong_id", f"the CA issued {spiffe_id}, but this agent is {expected}")
    if chain[0].public_key() != key.public_key():
        raise SvidRejected("wrong_key", "the CA's certificate is not for this agent's key")
    return Svid(spiffe_id, chain, key, bundle)


def svid_from_pem(
    chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, expected: SpiffeId, now: datetime
) -> Svid:
    """An SVID kept in files (`outrider ca mint`, or an agent's output_dir), checked as
    strictly as the CA's answer: SvidRejected if it is not a usable SVID for `expected`."""
    try:
        chain = x509.load_pem_x509_certificates(chain_pem)
        roots = x509.load_pem_x509_certificates(bundle_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise SvidRejected(
            "malformed", f"not PEM certificates and an unencrypted key: {exc}"
        ) from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise SvidRejected("malformed", "the key is not an EC key (outrider ca mint makes P-256)")
    der = serialization.Encoding.DER
    return accept_svid(
        [cert.public_bytes(der) for cert in chain],
        [root.public_bytes(der) for root in roots],
        key,
        expected,
        now,
    )
