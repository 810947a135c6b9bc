"""Which member of a subset gets the next request: the load balancers.

A `Balancer` is built once per subset membership (endpoint -> weight) and then
asked, per request, for one member among those still `eligible` (healthy, not
ejected, not already tried by this request). Everything a pick needs is
computed at construction, because `pick` runs on every request. Like Envoy's
load balancers (and unlike nginx's), an endpoint that is not eligible keeps its
place in the precomputed structure and is skipped at pick time, so a retry or
an ejection costs no rebuild.

round_robin
    nginx's smooth weighted round robin, precomputed as one period of its
    sequence (5:1:1 -> a a b a c a a). Equal weights cycle the members in
    order. A pick walks the period from a cursor to the next eligible member,
    so each eligible member still gets its weight's share of every period.
    Envoy uses an EDF scheduler for the same shares; a precomputed period
    makes the common pick one index instead of a heap operation.
least_request
    Power of two choices, as Envoy's default LEAST_REQUEST: two distinct
    weighted draws among the eligible, the lower requests-in-flight per unit
    of weight wins, a tie goes to the first draw. Two draws instead of a scan
    keep it O(1) and avoid every client herding onto the one idle endpoint.
random
    Weighted random over the eligible.
ring_hash
    Consistent hashing on a ring of 64-bit blake2b points (Envoy's RING_HASH,
    which uses xxHash). A key goes to the first point clockwise whose member is
    eligible. Envoy gives the whole ring at least 1024 points and shares them
    by weight, so a member's point count changes whenever another member comes
    or goes, which moves keys between members that stayed. Here every unit of
    weight gets 1024 points of its own (a member's points depend on it alone),
    so removing one member of N moves only its ~1/N of the keys. The ring is
    capped at 65536 points (64 members of equal weight; 1 MB, ~30 ms to
    build): past that, shares are scaled down as by Envoy's max_ring_size, and
    a membership change moves about 1/N more keys.
maglev
    Google's Maglev lookup table (Envoy's MAGLEV, with its weighted fill and
    its prime size 65537): each member fills table slots in the order of its
    own permutation, so every member holds ~65537 * weight / total slots and
    a membership change moves few keys besides the ones that must. A key maps
    to a slot; an ineligible slot owner passes the key to the next slot with an
    eligible one. Building the table is a Python loop over the 65537 slots, a
    few tens of milliseconds, paid once per membership.

The hashing kinds fall back to weighted random when a request has no key.
Hashes depend on the endpoints alone (`str(endpoint)`), never on their order or
on the process, so every agent maps a key to the same endpoint.
"""

from __future__ import annotations

import hashlib
import random
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Collection, Mapping, Sequence
from itertools import accumulate
from math import gcd
from types import MappingProxyType
from typing import Literal, get_args

from agent.core.endpoint import Endpoint

BalancerKind = Literal["round_robin", "least_request", "random", "ring_hash", "maglev"]
BALANCERS: tuple[BalancerKind, ...] = get_args(BalancerKind)

#: Ring points per unit of weight (weights divided by their gcd). Envoy's
#: default min_ring_size is 1024 for the whole ring; a member alone gets as many.
RING_POINTS_PER_WEIGHT = 1024
#: Past this many points, the ring's shares are scaled down to fit (1 MB).
MAX_RING_POINTS = 1 << 16
#: Envoy's default Maglev table size: a prime, so every skip is a permutation.
MAGLEV_TABLE_SIZE = 65537
#: Past this many picks, a round-robin period is scaled down (weights rounded).
MAX_CYCLE = 1 << 14
#: Draws from all members before working out the eligible ones exactly: with
#: most members eligible the first draw almost always lands.
_REJECTION_TRIES = 4

Pick = Callable[
    [Collection[Endpoint], random.Random, Mapping[Endpoint, int] | None, bytes | None],
    Endpoint | None,
]


class Balancer:
    """Picks one endpoint among a subset's members (endpoint -> weight)."""

    def __init__(self, kind: BalancerKind, members: Mapping[Endpoint, int]) -> None:
        if kind not in BALANCERS:
            raise ValueError(f"unknown balancer {kind!r}: expected one of {', '.join(BALANCERS)}")
        for endpoint, weight in members.items():
            if type(weight) is not int or weight < 1:
                raise ValueError(f"endpoint {endpoint}: weight must be an integer >= 1")
        self.kind = kind
        self._weight = dict(members)  # read through this plain dict: the view is slower
        self.members: Mapping[Endpoint, int] = MappingProxyType(self._weight)
        self._order = tuple(self._weight)
        self._weights = tuple(self._weight.values())
        self._total = sum(self._weights)
        # None when the weights are equal: a uniform draw needs no bisect.
        self._cumulative = list(accumulate(self._weights)) if len(set(self._weights)) > 1 else None
        self._pick: Pick = getattr(self, f"_{kind}")
        if not self._order:
            self._pick = _nothing  # a subset with no members yet
        elif kind == "round_robin":
            self._cycle = _smooth_cycle(self._order, self._weights)
            self._cursor = 0
        elif kind == "ring_hash":
            self._ring, self._ring_owners, self._ring_shift = _ring(self._order, self._weights)
        elif kind == "maglev":
            self._table = _maglev_table(self.members, MAGLEV_TABLE_SIZE)

    def __repr__(self) -> str:
        return f"Balancer({self.kind!r}, {len(self._order)} members)"

    def pick(
        self,
        eligible: Collection[Endpoint],
        rng: random.Random,
        *,
        load: Mapping[Endpoint, int] | None = None,
        key: bytes | None = None,
    ) -> Endpoint | None:
        """A member that is in `eligible`, or None when there is none.

        `load` is the requests in flight per endpoint (least_request; absent
        means 0), `key` the request's hash key (ring_hash, maglev).
        """
        if not eligible:
            return None
        return self._pick(eligible, rng, load, key)

    # One method per kind, with the `Pick` signature.

    def _round_robin(
        self,
        eligible: Collection[Endpoint],
        rng: random.Random,
        load: Mapping[Endpoint, int] | None,
        key: bytes | None,
    ) -> Endpoint | None:
        cycle, at = self._cycle, self._cursor
        if cycle[at] not in eligible:
            at = self._next_eligible(cycle, at, eligible)
            if at < 0:
                return None
        self._cursor = at + 1 if at + 1 < len(cycle) else 0
        return cycle[at]

    def _least_request(
        self,
        eligible: Collection[Endpoint],
        rng: random.Random,
        load: Mapping[Endpoint, int] | None,
        key: bytes | None,
    ) -> Endpoint | None:
        first = self._draw(eligible, rng, None)
        if first is None or not load:
            return first  # no load anywhere: every pair is a tie the first draw wins
        second = self._draw(eligible, rng, first)
        if second is None:
            return first
        if self._cumulative is None:
            return second if load.get(second, 0) < load.get(first, 0) else first
        # load/weight compared without division: l2/w2 < l1/w1.
        weight = self._weight
        if load.get(second, 0) * weight[first] < load.get(first, 0) * weight[second]:
            return second
        return first

    def _random(
        self,
        eligible: Collection[Endpoint],
        rng: random.Random,
        load: Mapping[Endpoint, int] | None,
        key: bytes | None,
    ) -> Endpoint | None:
        return self._draw(eligible, rng, None)

    def _ring_hash(
        self,
        eligible: Collection[Endpoint],
        rng: random.Random,
        load: Mapping[Endpoint, int] | None,
        key: bytes | None,
    ) -> Endpoint | None:
        if key is None:
            return self._draw(eligible, rng, None)
        ring, owners = self._ring, self._ring_owners
        # Points carry their owner's index in the low bits; zeroing the key's
        # low bits finds the first point at or after the key's position.
        at = bisect_left(ring, _hash64(key) >> self._ring_shift << self._ring_shift)
        if at == len(ring):
            at = 0
        if owners[at] in eligible:
            return owners[at]
        at = self._next_eligible(owners, at, eligible)
        return owners[at] if at >= 0 else None

    def _maglev(
        self,
        eligible: Collection[Endpoint],
        rng: random.Random,
        load: Mapping[Endpoint, int] | None,
        key: bytes | None,
    ) -> Endpoint | None:
        if key is None:
            return self._draw(eligible, rng, None)
        table = self._table
        at = _hash64(key) % len(table)
        if table[at] in eligible:
            return table[at]
        at = self._next_eligible(table, at, eligible)
        if at >= 0:
            return table[at]
        # Only reached with more members than slots, some of which own none:
        # when only those are eligible they still get traffic, just not by key.
        return self._draw(eligible, rng, None)

    # Shared steps.

    def _next_eligible(
        self, ring: Sequence[Endpoint], start: int, eligible: Collection[Endpoint]
    ) -> int:
        """The first position after `start`, going round, holding an eligible member; -1 if none."""
        size, patience = len(ring), len(self._order)
        for step in range(1, size):
            at = start + step if start + step < size else start + step - size
            if ring[at] in eligible:
                return at
            # A long miss may mean nothing is eligible: find out before walking on.
            if step == patience and not any(endpoint in eligible for endpoint in self._order):
                return -1
        return -1

    def _draw(
        self, eligible: Collection[Endpoint], rng: random.Random, exclude: Endpoint | None
    ) -> Endpoint | None:
        """A weighted draw among the eligible members other than `exclude`."""
        order, cumulative = self._order, self._cumulative
        for _ in range(_REJECTION_TRIES):
            # random() * n < n for any n below 2**53, so the index stays in range.
            if cumulative is None:
                endpoint = order[int(rng.random() * len(order))]
            else:
                endpoint = order[bisect_right(cumulative, rng.random() * self._total)]
            # Identity: `exclude` is one of `order`, and dataclass == is slow.
            if endpoint is not exclude and endpoint in eligible:
                return endpoint
        return self._draw_among(eligible, rng, exclude)

    def _draw_among(
        self, eligible: Collection[Endpoint], rng: random.Random, exclude: Endpoint | None
    ) -> Endpoint | None:
        # Exact, for when most members are not eligible and rejection keeps missing.
        chosen = [i for i, e in enumerate(self._order) if e is not exclude and e in eligible]
        if not chosen:
            return None
        index = weighted_index([self._weights[i] for i in chosen], rng)
        return self._order[chosen[index]]


def weighted_index(weights: Sequence[int], rng: random.Random) -> int:
    """Index i with probability weights[i] / sum(weights) (a weight of 0 is never drawn)."""
    cumulative = list(accumulate(weights))
    if not cumulative or cumulative[-1] <= 0 or min(weights) < 0:
        raise ValueError("weights must be >= 0 with a positive sum")
    return bisect_right(cumulative, rng.random() * cumulative[-1])


def _nothing(
    eligible: Collection[Endpoint],
    rng: random.Random,
    load: Mapping[Endpoint, int] | None,
    key: bytes | None,
) -> None:
    return None


def _hash64(data: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def _shares(weights: Sequence[int], per_unit: int, budget: int) -> list[int]:
    """Slots per member: weights over their gcd, times `per_unit`, scaled down to `budget`."""
    divisor = gcd(*weights)
    units = [weight // divisor * per_unit for weight in weights]
    total = sum(units)
    if total <= budget:
        return units
    return [max(1, unit * budget // total) for unit in units]


def _smooth_cycle(order: Sequence[Endpoint], weights: Sequence[int]) -> tuple[Endpoint, ...]:
    """One period of nginx's smooth weighted round robin (ngx_http_upstream_get_peer)."""
    shares = _shares(weights, 1, MAX_CYCLE)
    if len(set(shares)) == 1:
        return tuple(order)  # equal weights: the members in order
    total = sum(shares)
    current = [0] * len(shares)
    cycle = []
    for _ in range(total):
        current = [c + s for c, s in zip(current, shares, strict=True)]
        best = current.index(max(current))  # ties go to the first member, as nginx
        current[best] -= total
        cycle.append(order[best])
    return tuple(cycle)


def _ring(
    order: Sequence[Endpoint], weights: Sequence[int]
) -> tuple[array[int], list[Endpoint], int]:
    """The sorted ring points (owner index in the low bits), their owners, and the index width."""
    shift = max(1, (len(order) - 1).bit_length())
    points: list[int] = []
    for index, (endpoint, count) in enumerate(
        zip(order, _shares(weights, RING_POINTS_PER_WEIGHT, MAX_RING_POINTS), strict=True)
    ):
        points.extend(p >> shift << shift | index for p in _points(endpoint, count))
    points.sort()
    mask = (1 << shift) - 1
    # 8 bytes a point instead of a list's 44: a full ring keeps 1 MB, not 3.5,
    # for 0.2 us more per bisect.
    return array("Q", points), [order[p & mask] for p in points], shift


def _points(endpoint: Endpoint, count: int) -> list[int]:
    """`count` pseudo-random 64-bit ring positions that depend on the endpoint alone."""
    name = str(endpoint).encode()
    words: list[int] = []
    for block in range(-(-count // 8)):  # one 64-byte digest is eight points
        digest = hashlib.blake2b(b"%s#%d" % (name, block), digest_size=64).digest()
        words.extend(struct.unpack("<8Q", digest))
    return words[:count]


def _maglev_table(members: Mapping[Endpoint, int], size: int) -> list[Endpoint]:
    """Maglev's lookup table, weighted as Envoy's MaglevTable (Eisenbud et al. 2016, 3.4)."""
    order = sorted(members, key=str)  # the table must not depend on the members' order
    weights = [members[endpoint] for endpoint in order]
    positions, skips = [], []
    for endpoint in order:
        digest = hashlib.blake2b(str(endpoint).encode(), digest_size=16).digest()
        offset, skip = struct.unpack("<2Q", digest)
        positions.append(offset % size)
        skips.append(skip % (size - 1) + 1)
    table = [-1] * size
    heaviest = max(weights)
    targets = [0] * len(order)
    filled = 0
    iteration = 0
    while True:
        for i, weight in enumerate(weights):
            # A member of weight w takes a slot in w of every `heaviest` rounds.
            if iteration * weight < targets[i]:
                continue
            targets[i] += heaviest
            at, skip = positions[i], skips[i]
            while table[at] >= 0:
                at += skip
                if at >= size:
                    at -= size
            table[at] = i
            positions[i] = at + skip - size if at + skip >= size else at + skip
            filled += 1
            if filled == size:
                return [order[i] for i in table]
        iteration += 1
