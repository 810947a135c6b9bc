"""refresh_at: half-life renewal with jitter, never in the past."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.rotation import JITTER, refresh_at

NOT_BEFORE = datetime(2030, 1, 1, tzinfo=UTC)
HOUR = timedelta(hours=1)
ONE_US = timedelta(microseconds=1)


class FixedRandom(random.Random):
    """An RNG whose uniform() returns a chosen point of the range: 0 = low end, 1 = high end."""

    def __init__(self, position: float) -> None:
        super().__init__(0)
        self.position = position
        self.calls: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.calls.append((a, b))
        return a + (b - a) * self.position


def test_jitter_constant() -> None:
    assert JITTER == 0.1


@pytest.mark.parametrize(
    ("position", "expected"),
    [
        pytest.param(0.0, timedelta(minutes=27), id="earliest-0.45"),
        pytest.param(0.5, timedelta(minutes=30), id="middle-0.5"),
        pytest.param(1.0, timedelta(minutes=33), id="latest-0.55"),
    ],
)
def test_band_edges(position: float, expected: timedelta) -> None:
    rng = FixedRandom(position)
    now = NOT_BEFORE
    assert refresh_at(NOT_BEFORE, NOT_BEFORE + HOUR, now, rng) == NOT_BEFORE + expected
    [bounds] = rng.calls
    assert bounds == pytest.approx((0.9, 1.1))


def test_past_refresh_point_means_now() -> None:
    now = NOT_BEFORE + timedelta(minutes=50)
    assert refresh_at(NOT_BEFORE, NOT_BEFORE + HOUR, now, FixedRandom(0.5)) == now


def test_refresh_point_equal_to_now_means_now() -> None:
    now = NOT_BEFORE + timedelta(minutes=30)
    assert refresh_at(NOT_BEFORE, NOT_BEFORE + HOUR, now, FixedRandom(0.5)) == now


def test_expired_svid_refreshes_now() -> None:
    now = NOT_BEFORE + 2 * HOUR
    assert refresh_at(NOT_BEFORE, NOT_BEFORE + HOUR, now, random.Random(1)) == now


def test_seeded_rng_is_deterministic() -> None:
    first = refresh_at(NOT_BEFORE, NOT_BEFORE + HOUR, NOT_BEFORE, random.Random(42))
    second = refresh_at(NOT_BEFORE, NOT_BEFORE + HOUR, NOT_BEFORE, random.Random(42))
    assert first == second


@pytest.mark.parametrize(
    "lifetime", [timedelta(0), -HOUR, -ONE_US], ids=["zero", "negative", "negative-tiny"]
)
def test_empty_lifetime_rejected(lifetime: timedelta) -> None:
    with pytest.raises(ValueError, match="must be later than not_before"):
        refresh_at(NOT_BEFORE, NOT_BEFORE + lifetime, NOT_BEFORE, random.Random(0))


def test_mixing_naive_and_aware_rejected() -> None:
    naive_now = NOT_BEFORE.replace(tzinfo=None)
    with pytest.raises(ValueError, match="timezone-aware"):
        refresh_at(NOT_BEFORE, NOT_BEFORE + HOUR, naive_now, random.Random(0))


def test_all_naive_is_accepted() -> None:
    naive = NOT_BEFORE.replace(tzinfo=None)
    moment = refresh_at(naive, naive + HOUR, naive, FixedRandom(0.5))
    assert moment == naive + timedelta(minutes=30)


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------

# Lifetimes from two microseconds (the least that has a moment strictly
# inside it) up to ten years.
lifetimes = st.integers(min_value=2, max_value=10 * 365 * 86400 * 10**6).map(
    lambda us: timedelta(microseconds=us)
)
not_befores = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
seeds = st.integers(min_value=0, max_value=2**32)


def _bounds(not_before: datetime, lifetime: timedelta) -> tuple[datetime, datetime]:
    """The 0.45-0.55 band, widened by the microsecond datetime rounds to."""
    low = not_before + lifetime * ((1 - JITTER) / 2) - ONE_US
    high = not_before + lifetime * ((1 + JITTER) / 2) + ONE_US
    return low, high


@given(not_befores, lifetimes, seeds)
def test_in_band_and_strictly_inside_when_now_is_before_it(
    not_before: datetime, lifetime: timedelta, seed: int
) -> None:
    not_after = not_before + lifetime
    moment = refresh_at(not_before, not_after, not_before, random.Random(seed))
    low, high = _bounds(not_before, lifetime)
    assert low <= moment <= high
    assert not_before < moment < not_after


@given(not_befores, lifetimes, seeds, st.floats(min_value=-1.0, max_value=3.0))
def test_never_before_now(
    not_before: datetime, lifetime: timedelta, seed: int, now_fraction: float
) -> None:
    not_after = not_before + lifetime
    now = not_before + lifetime * now_fraction
    moment = refresh_at(not_before, not_after, now, random.Random(seed))
    assert moment >= now
    # Either the planned point (still ahead of now, so strictly inside) or now itself.
    assert moment == now or (moment > now and not_before < moment < not_after)


@given(not_befores, lifetimes, seeds, st.floats(min_value=0.0, max_value=0.449))
def test_now_before_the_band_never_changes_the_plan(
    not_before: datetime, lifetime: timedelta, seed: int, now_fraction: float
) -> None:
    not_after = not_before + lifetime
    now = not_before + lifetime * now_fraction - ONE_US
    planned = refresh_at(not_before, not_after, not_before - HOUR, random.Random(seed))
    assert refresh_at(not_before, not_after, now, random.Random(seed)) == planned
