"""Which roots verify peers: those that both the CA and the bundle file list.

The bundle file (a ConfigMap the operator edits) and the CA (which sends its
bundle with every SVID and on GetBundle) each say which roots are current.
A root either of them has dropped is no longer trusted, and a new root is
trusted once both list it: an operator removing a compromised root from the
ConfigMap is obeyed without restarting the CA, and a CA that stopped issuing
under a root is obeyed before every ConfigMap copy is edited. The CA's
connection is verified against the file, so it cannot add a root the file
does not hold.
"""

from __future__ import annotations

from identity import BundleError, TrustBundle


def peer_bundle(from_ca: TrustBundle, from_file: TrustBundle) -> TrustBundle:
    """The roots both list, in the CA's order; BundleError if they share none."""
    if from_ca.trust_domain != from_file.trust_domain:
        raise BundleError(
            f"the CA's bundle is for {from_ca.trust_domain}, the file's for "
            f"{from_file.trust_domain}"
        )
    shared = tuple(root for root in from_ca.roots if root in from_file.roots)
    if not shared:
        raise BundleError("no root is in both")
    return TrustBundle(from_ca.trust_domain, shared)
