"""The agent's SVID, and the check of what the CA sent back before it is used.

The CA is trusted to sign, not to be right: a chain that does not lead to
the bundle, names another workload, carries another key or is already
expired is refused, and the agent goes on with the SVID it has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from identity import BundleError, SpiffeId, SvidError, TrustBundle, check_leaf
from identity.cert import Cert, PrivateKey
from identity.chain import ChainError, check_chain


class SvidRejected(Exception):
    """The CA's answer is not a usable SVID for us; `reason` is a bounded label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, repr=False)
class Svid:
    spiffe_id: SpiffeId
    chain: tuple[Cert, ...]  # leaf first
    key: PrivateKey
    bundle: TrustBundle

    @property
    def leaf(self) -> Cert:
        return self.chain[0]

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_before

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_after

    @property
    def serial(self) -> str:
        return f"{self.leaf.serial:x}"

    def chain_pem(self) -> bytes:
        return b"".join(c.to_pem() for c in self.chain)

    def key_pem(self) -> bytes:
        return self.key.to_pem()

    def __repr__(self) -> str:  # never the key
        return f"Svid({self.spiffe_id}, serial={self.serial}, not_after={self.not_after}, key=...)"


def accept_svid(
    chain_der: Sequence[bytes],
    bundle_der: Sequence[bytes],
    key: PrivateKey,
    expected: SpiffeId,
    now: datetime,
) -> Svid:
    """The SVID in the CA's answer, or SvidRejected saying what is wrong with it."""
    try:
        chain = tuple(Cert.from_der(der) for der in chain_der)
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
    # Peers' handshakes check every certificate's time; check_chain does not. An expired
    # one is refused; one that starts after this agent's now is not (a CA's new
    # intermediate starts at its creation, and this clock may run behind the peers').
    for cert in chain[1:]:
        if now >= cert.not_after:
            raise SvidRejected(
                "expired_chain",
                f"the CA's chain holds {cert.subject!r}, which expired"
                f" {cert.not_after.isoformat(timespec='seconds')}: every peer would refuse it",
            )
    if spiffe_id != expected:
        raise SvidRejected("wrong_id", f"the CA issued {spiffe_id}, but this agent is {expected}")
    if chain[0].spki != key.spki:
        raise SvidRejected("wrong_key", "the CA's certificate is not for this agent's key")
    return Svid(spiffe_id, chain, key, bundle)


def svid_from_pem(
    chain_pem: bytes, key_pem: bytes, bundle_pem: bytes, expected: SpiffeId, now: datetime
) -> Svid:
    """An SVID kept in files (`outrider ca mint`, or an agent's output_dir), checked as
    strictly as the CA's answer: SvidRejected if it is not a usable SVID for `expected`."""
    try:
        chain = Cert.all_from_pem(chain_pem)
        roots = Cert.all_from_pem(bundle_pem)
        key = PrivateKey.from_pem(key_pem)
    except ValueError as exc:
        raise SvidRejected(
            "malformed", f"not PEM certificates and an unencrypted key: {exc}"
        ) from None
    if key.algorithm != "EC":
        raise SvidRejected("malformed", "the key is not an EC key (outrider ca mint makes P-256)")
    return accept_svid(
        [cert.der for cert in chain], [root.der for root in roots], key, expected, now
    )
