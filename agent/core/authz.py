"""Who may connect to this workload at all: an allow-list of SPIFFE IDs and trust domains.

Every inbound peer must pass it before the authorization policy
(agent.core.policy) decides what the peer may do; the policy's default
action, allow-authenticated, trusts the domains this list names. Matching is
exact: `td` never matches `td.evil`, and an ID matches only the very same ID.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

from identity import SpiffeId, TrustDomain

Decision = Literal["allow", "deny"]


@dataclass(frozen=True)
class AllowList:
    spiffe_ids: frozenset[SpiffeId] = frozenset()
    trust_domains: frozenset[TrustDomain] = frozenset()

    @cached_property
    def trusted_domains(self) -> frozenset[TrustDomain]:
        """The listed trust domains and those of the listed IDs (made once: every request
        the policy decides reads it)."""
        return self.trust_domains | {peer.trust_domain for peer in self.spiffe_ids}

    def decide(self, peer: SpiffeId) -> Decision:
        if peer in self.spiffe_ids or peer.trust_domain in self.trust_domains:
            return "allow"
        return "deny"
