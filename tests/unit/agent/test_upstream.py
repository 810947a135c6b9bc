"""StaticUpstream: round robin over a fixed list, skipping what already failed."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.upstream import Endpoint, StaticUpstream

A, B, C = Endpoint("a", 1), Endpoint("b", 1), Endpoint("c", 1)


def test_round_robin_in_list_order() -> None:
    upstream = StaticUpstream([A, B, C])
    assert [upstream.choose(()) for _ in range(7)] == [A, B, C, A, B, C, A]


@pytest.mark.parametrize(
    ("tried", "expected"),
    [
        pytest.param(set(), A, id="nothing-tried"),
        pytest.param({A}, B, id="skips-the-next-if-tried"),
        pytest.param({A, B}, C, id="skips-several"),
        pytest.param({B}, A, id="other-tried-does-not-matter"),
        pytest.param({A, B, C}, None, id="all-tried"),
        pytest.param({Endpoint("a", 2)}, A, id="same-host-other-port-is-another-endpoint"),
    ],
)
def test_choose_skips_tried_endpoints(tried: set[Endpoint], expected: Endpoint | None) -> None:
    assert StaticUpstream([A, B, C]).choose(tried) == expected


def test_a_retry_goes_to_the_next_untried_endpoint() -> None:
    upstream = StaticUpstream([A, B, C])
    tried: list[Endpoint] = []
    while (endpoint := upstream.choose(tried)) is not None:
        tried.append(endpoint)
        assert len(tried) <= 3
    assert tried == [A, B, C]


def test_a_single_endpoint() -> None:
    upstream = StaticUpstream([A])
    assert [upstream.choose(()) for _ in range(3)] == [A, A, A]
    assert upstream.choose([A]) is None


def test_an_empty_list_is_rejected() -> None:
    with pytest.raises(ValueError, match="at least one endpoint"):
        StaticUpstream([])


@pytest.mark.parametrize(
    ("endpoint", "text"),
    [
        (A, "a:1"),
        (Endpoint("10.0.0.1", 443), "10.0.0.1:443"),
        (Endpoint("::1", 15443), "[::1]:15443"),
    ],
)
def test_endpoint_text(endpoint: Endpoint, text: str) -> None:
    assert str(endpoint) == text


_ENDPOINTS = st.lists(
    st.builds(Endpoint, st.sampled_from("abcdef"), st.integers(1, 3)),
    min_size=1,
    max_size=8,
    unique=True,
)


@given(endpoints=_ENDPOINTS, data=st.data())
def test_never_returns_a_tried_endpoint(endpoints: list[Endpoint], data: st.DataObject) -> None:
    upstream = StaticUpstream(endpoints)
    for _ in range(len(endpoints) + 2):
        tried = data.draw(st.sets(st.sampled_from(endpoints)))
        chosen = upstream.choose(tried)
        if set(endpoints) <= tried:
            assert chosen is None
        else:
            assert chosen in endpoints
            assert chosen not in tried


@given(endpoints=_ENDPOINTS, rounds=st.integers(1, 5))
def test_each_endpoint_gets_an_equal_share(endpoints: list[Endpoint], rounds: int) -> None:
    upstream = StaticUpstream(endpoints)
    counts = Counter(upstream.choose(()) for _ in range(rounds * len(endpoints)))
    assert counts == dict.fromkeys(endpoints, rounds)
