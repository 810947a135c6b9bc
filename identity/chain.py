"""Does a chain link up to the trust bundle?

Each certificate must be signed by the next one, and the last by a root of
the bundle. This is not full path validation: name constraints, which
cryptography's verifier does not support for URIs, are OpenSSL's job at the
TLS peer. It confirms that a chain handed over by a signer or a CA leads to
the trust we hold at all. Verdicts on CA-to-CA links are cached, since only
the leaf changes from one SVID to the next.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from identity.bundle import TrustBundle

__all__ = ["ChainError", "check_chain"]


class ChainError(ValueError):
    """The chain does not link up to a root of the bundle."""


def check_chain(chain: Sequence[x509.Certificate], bundle: TrustBundle) -> None:
    """Raise ChainError unless `chain` (leaf first) leads to a root of `bundle`."""
    if not chain:
        raise ChainError("the chain is empty")
    for index, (child, parent) in enumerate(itertools.pairwise(chain)):
        if not (_ca_signed_by if index else _signed_by)(child, parent):
            raise ChainError(f"{child.subject.rfc4514_string()} is not signed by the next cert")
    anchored = _ca_signed_by if len(chain) > 1 else _signed_by
    if not any(anchored(chain[-1], root) for root in bundle.roots):
        raise ChainError("the chain does not lead to a root of the trust bundle")


def _signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@functools.lru_cache(maxsize=64)
def _ca_signed_by(child: x509.Certificate, parent: x509.Certificate) -> bool:
    return _signed_by(child, parent)
