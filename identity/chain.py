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
self-signed root of the bundle, not at a CA certificate placed in it.

OpenSSL builds its own path and passes over a certificate of the chain it does
not need; the old walk refused a chain with one. So each certificate's issuer
must name the next one's subject, and each CA of the chain must itself lead to
the bundle. Those CA verdicts are cached: only the leaf changes from one SVID to
the next, so a rotation verifies its new chain once.
"""

from __future__ import annotations

import functools
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
    for index in range(len(chain) - 1, 0, -1):
        _raise_unless(_ca_verdict(tuple(chain[index:]), bundle.roots), chain[index])
    _raise_unless(_verdict(chain, bundle.roots), chain[0])


def _raise_unless(problem: str | None, cert: Cert) -> None:
    if problem is not None:
        raise ChainError(
            f"the chain does not lead to a root of the trust bundle from {cert.subject!r}: "
            f"{problem}"
        )


def _verdict(chain: Sequence[Cert], roots: Sequence[Cert]) -> str | None:
    """None if `chain` verifies up to one of `roots`, else OpenSSL's reason."""
    try:
        verify_chain(chain, roots)
    except ValueError as exc:
        return str(exc)
    return None


@functools.lru_cache(maxsize=64)
def _ca_verdict(chain: tuple[Cert, ...], roots: tuple[Cert, ...]) -> str | None:
    return _verdict(chain, roots)
