"""Backoff.delay: exponential up to the cap, jittered downwards, never overflowing."""

from __future__ import annotations

import random
from datetime import timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.backoff import JITTER, Backoff

SECOND = timedelta(seconds=1)


class FixedRandom(random.Random):
    """uniform() returns a chosen point of the range: 0 = low end, 1 = high end."""

    def __init__(self, position: float) -> None:
        super().__init__(0)
        self.position = position

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.position


def test_jitter_constant() -> None:
    assert JITTER == 0.5


@pytest.mark.parametrize(
    ("failures", "ceiling"),
    [
        pytest.param(1, 1, id="first-failure-waits-initial"),
        pytest.param(2, 2, id="doubles"),
        pytest.param(3, 4, id="doubles-again"),
        pytest.param(5, 16, id="last-below-cap"),
        pytest.param(6, 30, id="capped"),
        pytest.param(40, 30, id="stays-capped"),
    ],
)
def test_the_ceiling_grows_exponentially_up_to_the_cap(failures: int, ceiling: int) -> None:
    backoff = Backoff()
    assert backoff.delay(failures, FixedRandom(1.0)) == ceiling * SECOND
    assert backoff.delay(failures, FixedRandom(0.0)) == ceiling * SECOND * (1 - JITTER)


def test_a_seeded_rng_gives_the_same_delays_and_they_never_leave_the_band() -> None:
    backoff = Backoff(timedelta(milliseconds=100), timedelta(seconds=5))
    first = [backoff.delay(n, random.Random(42)) for n in range(1, 30)]
    again = [backoff.delay(n, random.Random(42)) for n in range(1, 30)]
    assert first == again
    rng = random.Random(7)
    for n in range(1, 30):
        ceiling = min(timedelta(milliseconds=100) * 2 ** (n - 1), timedelta(seconds=5))
        assert (1 - JITTER) * ceiling <= backoff.delay(n, rng) <= ceiling


def test_jitter_spreads_a_fleet_that_failed_together() -> None:
    backoff = Backoff()
    delays = {backoff.delay(10, random.Random(seed)) for seed in range(50)}
    assert len(delays) == 50


def test_a_multiplier_of_one_is_a_constant_delay() -> None:
    backoff = Backoff(2 * SECOND, 10 * SECOND, multiplier=1)
    assert {backoff.delay(n, FixedRandom(1.0)) for n in (1, 2, 10, 1000)} == {2 * SECOND}


@pytest.mark.parametrize(
    "failures",
    [
        pytest.param(47, id="last-before-overflow"),
        pytest.param(48, id="48"),
        pytest.param(65, id="past-the-exponent-cap"),
        pytest.param(10**9, id="a-billion"),
    ],
)
def test_huge_failure_counts_stay_at_the_cap(failures: int) -> None:
    assert Backoff().delay(failures, FixedRandom(1.0)) == 30 * SECOND


def check_band(initial_ms: int, spread: int, failures: int, seed: int) -> None:
    initial = timedelta(milliseconds=initial_ms)
    maximum = timedelta(milliseconds=initial_ms + spread)
    delay = Backoff(initial, maximum).delay(failures, random.Random(seed))
    # 2**64 ms is past any maximum drawn here, so capping the exponent there is exact.
    ceiling = timedelta(
        milliseconds=min(initial_ms * 2 ** min(failures - 1, 64), initial_ms + spread)
    )
    assert (1 - JITTER) * ceiling <= delay <= ceiling <= maximum


PROPERTY = {
    "initial_ms": st.integers(1, 10**7),
    "spread": st.integers(0, 10**7),
    "seed": st.integers(0, 2**32),
}


@given(failures=st.integers(1, 30), **PROPERTY)  # 10**7 ms * 2**29 still fits a timedelta
def test_delay_is_within_the_jitter_band_of_the_ceiling(
    initial_ms: int, spread: int, failures: int, seed: int
) -> None:
    check_band(initial_ms, spread, failures, seed)


@given(failures=st.integers(1, 10**9), **PROPERTY)
def test_delay_is_within_the_jitter_band_for_any_failure_count(
    initial_ms: int, spread: int, failures: int, seed: int
) -> None:
    check_band(initial_ms, spread, failures, seed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"initial": timedelta(0)}, "0 < initial <= maximum", id="zero-initial"),
        pytest.param({"initial": -SECOND}, "0 < initial <= maximum", id="negative-initial"),
        pytest.param(
            {"initial": 2 * SECOND, "maximum": SECOND}, "0 < initial <= maximum", id="over-max"
        ),
        pytest.param({"multiplier": 0.5}, "multiplier must be at least 1", id="shrinking"),
    ],
)
def test_invalid_construction_raises(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Backoff(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("failures", [0, -1])
def test_delay_is_only_for_after_a_failure(failures: int) -> None:
    with pytest.raises(ValueError, match="failures >= 1"):
        Backoff().delay(failures, random.Random(0))
