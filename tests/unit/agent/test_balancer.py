"""Balancer.pick and weighted_index: the orders, shares and key mappings a user relies on.

Every statistical test draws from a seeded RNG over a fixed set of keys, so a
result is the same on every run; the tolerances are what the algorithm
promises, not what one seed happened to give.
"""

from __future__ import annotations

import functools
import random
from collections import Counter
from collections.abc import Mapping
from unittest import mock

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core import balancer as balancer_module
from agent.core.balancer import BALANCERS, Balancer, BalancerKind, weighted_index
from agent.core.endpoint import Endpoint

A, B, C = Endpoint("a", 1), Endpoint("b", 1), Endpoint("c", 1)
OUTSIDER = Endpoint("not-a-member", 1)
HASHING: tuple[BalancerKind, ...] = ("ring_hash", "maglev")
KEYS = [b"user-%d" % i for i in range(10_000)]
PICKS = 10_000


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i}", 8080) for i in range(n)]


def picks(
    balancer: Balancer,
    eligible: frozenset[Endpoint] | None = None,
    *,
    load: Mapping[Endpoint, int] | None = None,
    seed: int = 1,
) -> Counter[Endpoint | None]:
    rng = random.Random(seed)
    eligible = frozenset(balancer.members) if eligible is None else eligible
    return Counter(balancer.pick(eligible, rng, load=load) for _ in range(PICKS))


@functools.cache
def hashing(kind: BalancerKind, members: tuple[Endpoint, ...]) -> Balancer:
    """An equal-weight ring_hash or maglev balancer, built once (a table takes ~20 ms)."""
    return Balancer(kind, dict.fromkeys(members, 1))


def by_key(
    balancer: Balancer, eligible: frozenset[Endpoint], seed: int = 1
) -> dict[bytes, Endpoint]:
    rng = random.Random(seed)
    mapping = {key: balancer.pick(eligible, rng, key=key) for key in KEYS}
    assert None not in mapping.values()
    return mapping  # type: ignore[return-value]


# round_robin


def test_equal_weights_cycle_the_members_in_their_order() -> None:
    balancer = Balancer("round_robin", {C: 1, A: 1, B: 1})
    rng = random.Random(1)
    assert [balancer.pick({A, B, C}, rng) for _ in range(7)] == [C, A, B, C, A, B, C]


def test_round_robin_skips_the_ineligible_and_keeps_the_order() -> None:
    balancer = Balancer("round_robin", {A: 1, B: 1, C: 1})
    rng = random.Random(1)
    assert [balancer.pick({A, C}, rng) for _ in range(4)] == [A, C, A, C]
    assert [balancer.pick({A, B, C}, rng) for _ in range(3)] == [A, B, C]


def test_a_retry_gets_the_next_member_and_the_next_request_the_one_after() -> None:
    balancer = Balancer("round_robin", {A: 1, B: 1, C: 1})
    rng = random.Random(1)
    first = balancer.pick({A, B, C}, rng)
    retry = balancer.pick({B, C}, rng)  # A failed: tried
    assert (first, retry, balancer.pick({A, B, C}, rng)) == (A, B, C)


def test_smooth_weighted_round_robin_gives_nginx_sequence() -> None:
    # nginx's ngx_http_upstream_round_robin.c: weights 5, 1, 1 -> a a b a c a a.
    balancer = Balancer("round_robin", {A: 5, B: 1, C: 1})
    rng = random.Random(1)
    assert [balancer.pick({A, B, C}, rng) for _ in range(21)] == [A, A, B, A, C, A, A] * 3


def test_round_robin_weights_hold_among_the_eligible() -> None:
    balancer = Balancer("round_robin", {A: 5, B: 1, C: 1})
    rng = random.Random(1)
    # C out: each period of the sequence still gives A five picks and B one.
    assert Counter(balancer.pick({A, B}, rng) for _ in range(12)) == {A: 10, B: 2}


# 90/10 splits


def test_weighted_index_splits_90_10() -> None:
    rng = random.Random(1)
    counts = Counter(weighted_index([90, 10], rng) for _ in range(PICKS))
    assert abs(counts[0] / PICKS - 0.9) <= 0.02
    assert counts[0] + counts[1] == PICKS


def test_weighted_index_never_draws_a_zero_weight() -> None:
    rng = random.Random(1)
    assert {weighted_index([0, 3, 0, 1, 0], rng) for _ in range(1000)} == {1, 3}


@pytest.mark.parametrize("weights", [pytest.param([], id="empty"), [0, 0], [5, -1]])
def test_weighted_index_rejects_weights_that_cannot_be_drawn(weights: list[int]) -> None:
    with pytest.raises(ValueError, match="positive sum"):
        weighted_index(weights, random.Random(1))


@pytest.mark.parametrize(
    ("kind", "load"),
    [
        pytest.param("random", None, id="random"),
        pytest.param("round_robin", None, id="round_robin"),
        pytest.param("least_request", None, id="least_request-idle"),
        pytest.param("least_request", {A: 9, B: 1}, id="least_request-load-follows-weight"),
        *(pytest.param(kind, None, id=f"{kind}-without-key") for kind in HASHING),
    ],
)
def test_a_90_10_weighting_gives_a_90_10_split(
    kind: BalancerKind, load: dict[Endpoint, int] | None
) -> None:
    counts = picks(Balancer(kind, {A: 90, B: 10}), load=load)
    assert abs(counts[A] / PICKS - 0.9) <= 0.02
    assert counts[A] + counts[B] == PICKS


# least_request: power of two choices


@pytest.mark.parametrize("n", [5, 10])
def test_the_idle_endpoint_wins_whenever_it_is_one_of_the_two_draws(n: int) -> None:
    members = endpoints(n)
    load = {e: 10 for e in members} | {members[3]: 0}
    counts = picks(Balancer("least_request", dict.fromkeys(members, 1)), load=load)
    # Two distinct draws miss it with probability (n-1)/n * (n-2)/(n-1).
    assert abs(counts[members[3]] / PICKS - 2 / n) <= 0.02


def test_the_more_loaded_draw_never_wins() -> None:
    n = 5
    members = endpoints(n)
    load = {e: rank for rank, e in enumerate(members)}  # all different: no ties
    counts = picks(Balancer("least_request", dict.fromkeys(members, 1)), load=load)
    assert counts[members[-1]] == 0  # the most loaded loses every pair it is in
    for rank, endpoint in enumerate(members):
        # It wins the pairs with a more loaded endpoint: n-1-rank of n(n-1)/2.
        expected = (n - 1 - rank) / (n * (n - 1) / 2)
        assert abs(counts[endpoint] / PICKS - expected) <= 0.02, rank


@pytest.mark.parametrize(
    ("load", "winner"),
    [
        pytest.param({A: 3, B: 1}, A, id="3-per-4-weight-beats-1-per-1"),
        pytest.param({A: 5, B: 1}, B, id="5-per-4-weight-loses-to-1-per-1"),
        pytest.param({B: 1}, A, id="absent-load-is-zero"),
    ],
)
def test_load_is_compared_per_unit_of_weight(load: dict[Endpoint, int], winner: Endpoint) -> None:
    balancer = Balancer("least_request", {A: 4, B: 1, C: 1})
    # With two eligible both are drawn every time: the comparison alone decides.
    assert set(picks(balancer, frozenset({A, B}), load=load)) == {winner}


def test_a_lone_eligible_endpoint_is_picked_however_loaded() -> None:
    balancer = Balancer("least_request", {A: 1, B: 1, C: 1})
    assert set(picks(balancer, frozenset({C}), load={A: 0, B: 0, C: 1000})) == {C}


# ring_hash and maglev


@pytest.mark.parametrize("kind", HASHING)
def test_a_key_maps_to_the_same_endpoint_every_time_in_every_agent(kind: BalancerKind) -> None:
    members = endpoints(7)
    here = hashing(kind, tuple(members))
    elsewhere = hashing(kind, tuple(reversed(members)))  # listed in another order
    # Also while one is out: its keys go to the same stand-in every time.
    for eligible in (frozenset(members), frozenset(members[1:])):
        first = by_key(here, eligible, seed=1)
        assert by_key(here, eligible, seed=2) == first
        assert by_key(elsewhere, eligible, seed=3) == first


@pytest.mark.parametrize("n", [5, 10])
@pytest.mark.parametrize("kind", HASHING)
def test_keys_spread_evenly(kind: BalancerKind, n: int) -> None:
    members = endpoints(n)
    mapping = by_key(hashing(kind, tuple(members)), frozenset(members))
    counts = Counter(mapping.values())
    assert set(counts) == set(members)
    for endpoint in members:
        assert abs(counts[endpoint] / len(KEYS) * n - 1) <= 0.25, endpoint


@pytest.mark.parametrize("how", ["rebuilt-without-it", "made-ineligible"])
@pytest.mark.parametrize("n", [5, 10])
@pytest.mark.parametrize("kind", HASHING)
def test_removing_one_of_n_moves_about_one_nth_of_the_keys(
    kind: BalancerKind, n: int, how: str
) -> None:
    members = endpoints(n)
    gone, rest = members[2], frozenset(members) - {members[2]}
    before = by_key(hashing(kind, tuple(members)), frozenset(members))
    if how == "rebuilt-without-it":
        after = by_key(hashing(kind, tuple(e for e in members if e != gone)), rest)
    else:
        after = by_key(hashing(kind, tuple(members)), rest)
    moved = [key for key in KEYS if after[key] != before[key]]
    assert len(moved) / len(KEYS) <= 1 / n + 0.03
    elsewhere = [key for key in KEYS if before[key] != gone]
    stayed = sum(after[key] == before[key] for key in elsewhere) / len(elsewhere)
    # Skipping an ineligible endpoint moves its keys alone; a rebuilt Maglev
    # table may also move a few others (the paper's "minimal disruption").
    assert stayed == 1.0 if how == "made-ineligible" else stayed >= 0.99
    # The orphaned keys spread over the others instead of piling onto one.
    orphans = Counter(after[key] for key in KEYS if before[key] == gone)
    fair = sum(orphans.values()) / (n - 1)
    assert set(orphans) == rest
    assert min(orphans.values()) >= 0.5 * fair


@pytest.mark.parametrize("kind", HASHING)
def test_a_heavier_endpoint_gets_more_keys(kind: BalancerKind) -> None:
    members = endpoints(4)
    weights = dict.fromkeys(members, 1) | {members[0]: 3}
    counts = Counter(by_key(Balancer(kind, weights), frozenset(members)).values())
    assert abs(counts[members[0]] / len(KEYS) - 3 / 6) <= 0.05
    for endpoint in members[1:]:
        assert abs(counts[endpoint] / len(KEYS) - 1 / 6) <= 0.05


def test_maglev_members_without_a_table_slot_still_get_picked() -> None:
    members = endpoints(10)
    # More members than slots: three hold none, and a key has to fall back.
    with mock.patch.object(balancer_module, "MAGLEV_TABLE_SIZE", 7):
        balancer = Balancer("maglev", dict.fromkeys(members, 1))
    rng = random.Random(1)
    for endpoint in members:
        assert balancer.pick({endpoint}, rng, key=b"k") == endpoint


# What every kind does


@pytest.mark.parametrize("kind", BALANCERS)
@pytest.mark.parametrize(
    "eligible",
    [
        pytest.param(frozenset(), id="none-eligible"),
        pytest.param(frozenset({OUTSIDER}), id="only-non-members-eligible"),
    ],
)
def test_nothing_eligible_picks_nothing(kind: BalancerKind, eligible: frozenset[Endpoint]) -> None:
    balancer = Balancer(kind, {A: 1, B: 2, C: 1})
    rng = random.Random(1)
    for key in (None, b"k1", b"k2"):
        assert balancer.pick(eligible, rng, load={A: 1}, key=key) is None


@pytest.mark.parametrize("kind", BALANCERS)
def test_a_subset_without_members_picks_nothing(kind: BalancerKind) -> None:
    assert Balancer(kind, {}).pick({A, B}, random.Random(1), key=b"k") is None


@pytest.mark.parametrize("kind", BALANCERS)
def test_eligible_endpoints_outside_the_members_are_ignored(kind: BalancerKind) -> None:
    balancer = Balancer(kind, {A: 1, B: 1})
    rng = random.Random(1)
    assert {balancer.pick([OUTSIDER, B], rng, key=key) for key in KEYS[:200]} == {B}


@pytest.mark.parametrize("kind", BALANCERS)
def test_a_single_member_is_always_picked(kind: BalancerKind) -> None:
    balancer = Balancer(kind, {A: 3})
    rng = random.Random(1)
    got = {balancer.pick({A}, rng, load={A: 7}, key=key) for key in [None, *KEYS[:100]]}
    assert got == {A}


def test_members_are_kept_as_given_and_cannot_change_under_the_balancer() -> None:
    members = {C: 2, A: 1}
    balancer = Balancer("round_robin", members)
    members[B] = 1
    assert list(balancer.members.items()) == [(C, 2), (A, 1)]
    with pytest.raises(TypeError):
        balancer.members[B] = 1  # type: ignore[index]


@pytest.mark.parametrize(
    ("kind", "members", "match"),
    [
        pytest.param("fastest", {A: 1}, "unknown balancer 'fastest'", id="unknown-kind"),
        pytest.param("random", {A: 0}, "a:1: weight must be", id="zero-weight"),
    ],
)
def test_a_bad_balancer_is_refused(kind: str, members: dict[Endpoint, int], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Balancer(kind, members)  # type: ignore[arg-type]


POOL = [*endpoints(6), OUTSIDER]


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from(BALANCERS),
    members=st.dictionaries(st.sampled_from(POOL[:-1]), st.integers(1, 4), max_size=6),
    requests=st.lists(
        st.tuples(
            st.frozensets(st.sampled_from(POOL)),
            st.none() | st.binary(max_size=8),
            st.dictionaries(st.sampled_from(POOL), st.integers(0, 5)),
        ),
        min_size=1,
        max_size=8,
    ),
    seed=st.integers(0, 2**32),
)
def test_a_pick_is_an_eligible_member_or_none_when_there_is_none(
    kind: BalancerKind,
    members: dict[Endpoint, int],
    requests: list[tuple[frozenset[Endpoint], bytes | None, dict[Endpoint, int]]],
    seed: int,
) -> None:
    # A small Maglev table: the property does not depend on its size, the run time does.
    with mock.patch.object(balancer_module, "MAGLEV_TABLE_SIZE", 251):
        balancer = Balancer(kind, members)
    rng = random.Random(seed)
    for eligible, key, load in requests:
        choosable = eligible & members.keys()
        endpoint = balancer.pick(eligible, rng, load=load, key=key)
        assert endpoint in choosable if choosable else endpoint is None
