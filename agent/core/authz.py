"""Who may connect to this workload: an allow-list of SPIFFE IDs and trust domains.

The policy issue replaces this with the YAML policy engine; until then the
inbound listener asks `AllowList.decide` about every authenticated peer.
Matching is exact: `td` never matches `td.evil`, and an ID matches only the
very same ID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from identity import SpiffeId, TrustDomain

Decision = Literal["allow", "deny"]


@dataclass(frozen=True)
class AllowList:
    spiffe_ids: frozenset[SpiffeId] = frozenset()
    trust_domains: frozenset[TrustDomain] = frozenset()

    def decide(self, peer: SpiffeId) -> Decision:
        if peer in self.spiffe_ids or peer.trust_domain in self.trust_domains:
            return "allow"
        return "deny"
