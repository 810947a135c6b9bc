"""Does a chain link up to the trust bundle?

OpenSSL's path validation (`identity.cert.verify_chain`: X509_verify_cert with
X509_STRICT, time not checked) from the leaf through the chain's CAs to a
root of the bundle. It confirms that a chain handed over by a signer or a CA
leads to the trust we hold at all; the validity window is the leaf checks'
business (`identity.svid.check_leaf`), which say which certificate expired.

This is stricter than the signature-only walk it replaced: each CA above the
leaf must be a CA (BasicConstraints cA, keyCertSign where KeyUsage is present)
within its pathLenConstraint; name constraints, URI ones included, hold; an
issuer is found by name and key identifier; unknown critical extensions are
refused; X509_STRICT adds RFC 5280's rules (a CA's BasicConstraints critical
and its KeyUsage present, a subjectKeyIdentifier in a CA, an
authorityKeyIdentifier below the root, ...); and the chain must end at a
self-signed root of the bundle, not at a CA certificate placed in it. OpenSSL
would pass over a certificate of the chain its path does not use: each one's
issuer must name the next one's subject, so a stray certificate is refused as
the old walk refused it.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

from identity.bundle import TrustBundle
from identity.cert import Cert, verify_chain

__all__ = ["ChainError", "check_chain"]


class ChainError(ValueError):
    """The chain does not link up to a root of the bundle."""


def check_chain(chain: Sequence[Cert], bundle: TrustBundle) -> None:
    """Raise ChainError unless `chain` (leaf first) leads to a root of `bundle`."""
    if not chain:
        raise ChainError("the chain is empty")
    for child, parent in pairwise(chain):
        if child.issuer != parent.subject:
            raise ChainError(f"{child.subject!r} is not issued by the next cert {parent.subject!r}")
    try:
        verify_chain(chain, bundle.roots)
    except ValueError as exc:
        raise ChainError(f"the chain does not lead to a root of the trust bundle: {exc}") from None
