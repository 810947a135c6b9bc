"""Where an outbound listener sends a connection or a request: one upstream's endpoints.

An upstream is one or more subsets (one, "default", unless the config splits
traffic, e.g. v1: 90 and v2: 10 for a canary), each with its members as
discovery last published them. A request is given a subset once, by weight;
then each try asks `choose` for an endpoint of it that is usable (healthy, or
any member while the subset is in panic: agent/core/health.py) and not tried
yet. A subset with nothing left falls back to the others, heaviest first, so
a failing canary costs a retry, not an error. Within a subset the balancer
picks (agent/core/balancer.py).

Nothing here reads a clock or a random source: `now` and `rng` are arguments.
"""

from __future__ import annotations

import random
from collections.abc import Collection, Mapping

from agent.core.balancer import Balancer, BalancerKind, weighted_index
from agent.core.endpoint import Endpoint
from agent.core.health import HealthSettings, HealthTable, usable

__all__ = ["Endpoint", "Upstream"]


class Upstream:
    """The subsets of one upstream, their members' health, and the choice of an endpoint."""

    def __init__(
        self,
        kind: BalancerKind,
        weights: Mapping[str, int],
        health: HealthSettings | HealthTable,
    ) -> None:
        self.kind = kind
        self.weights = dict(weights)  # subset name -> weight, in config order
        self.subsets = {name: Balancer(kind, {}) for name in weights}
        # A reload that keeps the health settings keeps the table: ejections carry over.
        self.health = health if isinstance(health, HealthTable) else HealthTable(health)
        self.panic_threshold = self.health.settings.panic_threshold
        self.load: dict[Endpoint, int] = {}  # requests in flight, for least_request
        self._order: dict[str, list[str]] = {}  # each subset's fallback order

    def update(self, subset: str, members: Mapping[Endpoint, int]) -> frozenset[Endpoint]:
        """A subset's members (endpoint -> weight) as discovered; returns the endpoints gone."""
        return self.update_all({subset: members})

    def update_all(self, members: Mapping[str, Mapping[Endpoint, int]]) -> frozenset[Endpoint]:
        """Several subsets' members at once; the health table sees the membership once, whole.

        A reload fills a new Upstream that shares the old health table: told the
        membership subset by subset, the table would forget every later subset's
        endpoints and take them back as new, their ejections lost.
        """
        before = self.endpoints()
        for subset, subset_members in members.items():
            self.subsets[subset] = Balancer(self.kind, subset_members)
        after = self.endpoints()
        self.health.update(after)
        return before - after

    def endpoints(self) -> frozenset[Endpoint]:
        return frozenset(e for balancer in self.subsets.values() for e in balancer.members)

    def subset(self, rng: random.Random) -> str | None:
        """The subset for a new request: by weight among those with members."""
        names = [n for n, b in self.subsets.items() if b.members and self.weights[n]]
        if not names:  # only weight-0 subsets have members: better them than nothing
            names = [n for n, b in self.subsets.items() if b.members]
            return names[0] if names else None
        if len(names) == 1:
            return names[0]
        return names[weighted_index([self.weights[n] for n in names], rng)]

    def choose(
        self,
        subset: str,
        tried: Collection[Endpoint],
        now: float,
        rng: random.Random,
        key: bytes | None = None,
    ) -> Endpoint | None:
        """An endpoint of `subset` (then of the others) not in `tried`; None when none is left."""
        available = self.health.available(now)
        for name in self._fallback(subset):
            balancer = self.subsets[name]
            eligible, _ = usable(balancer.members, available, self.panic_threshold)
            if tried:
                eligible = eligible.difference(tried)
            endpoint = balancer.pick(eligible, rng, load=self.load, key=key)
            if endpoint is not None:
                return endpoint
        return None

    def untried(self, tried: Collection[Endpoint], now: float) -> bool:
        """Whether `choose` could still find an endpoint not in `tried` (without picking one)."""
        available = self.health.available(now)
        for balancer in self.subsets.values():
            eligible, _ = usable(balancer.members, available, self.panic_threshold)
            if not eligible.issubset(tried):
                return True
        return False

    def _fallback(self, subset: str) -> list[str]:
        order = self._order.get(subset)
        if order is None:  # once per subset: this is on every request's path
            others = sorted(
                (n for n in self.weights if n != subset), key=lambda n: -self.weights[n]
            )
            # A subset a reload removed (a request given it before) has only the others.
            first = [subset] if subset in self.subsets else []
            order = self._order[subset] = [*first, *others]
        return order
