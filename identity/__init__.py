"""SPIFFE identity: IDs, X.509-SVID checks, trust bundles and rotation timing.

Values and pure functions over them, so the CA, the agent and the injector
can share them and tests can drive them with plain data. The exceptions are
what more than one of them needs and they may not import from each other:
`renewal` (the one loop that keeps a credential fresh, around its pure
plan), `files` (atomic writes of one file or a set), `tlsfiles` (in-memory
keys into ssl), `configfile` (YAML config reading), `serving` (the
bounded accept loop, the TLS server context and the fd limit of every
server), `grpcserving` (grpclib bounded before authentication: the CA's and
the control plane's) and `kubewatch` (blocking Kubernetes client calls in
daemon threads: the agent's discovery and the control plane's informers).
Three contracts between the injector and the agent live here too, pure:
`capture` (the nft rules the init container applies, whose flags the
injector writes), `probes` (the app's probes the injector moves into the
agent's bootstrap and the agent performs) and `injected` (the agent's
containers, ports and UID in every pod, which the control plane reads too).
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
