"""SPIFFE identity: IDs, X.509-SVID checks, trust bundles and rotation timing.

Pure code only: no sockets, no event loop, no file I/O. Everything here is a
value or a function over values, so the CA, the agent and the injector can
share it and tests can drive it with plain data.
"""

from __future__ import annotations

from identity.bundle import BundleError, TrustBundle
from identity.rotation import refresh_at
from identity.spiffe_id import InvalidSpiffeId, SpiffeId, TrustDomain
from identity.svid import SvidError, check_leaf, spiffe_id_of

__all__ = [
    "BundleError",
    "InvalidSpiffeId",
    "SpiffeId",
    "SvidError",
    "TrustBundle",
    "TrustDomain",
    "check_leaf",
    "refresh_at",
    "spiffe_id_of",
]
