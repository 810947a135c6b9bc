"""Upstream: subsets by weight, health before balancing, retries elsewhere, panic, fallback."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from agent.core.health import HealthSettings, OutlierDetection
from agent.core.upstream import Endpoint, Upstream

A, B, C, D = (Endpoint(name, 15443) for name in "abcd")
OUTLIER = HealthSettings(outlier=OutlierDetection(consecutive_failures=1, max_ejection_percent=100))


def upstream(subsets: dict[str, list[Endpoint]], health: HealthSettings = OUTLIER) -> Upstream:
    """Subsets named NAME_WEIGHT, each member of weight 1."""
    weights = {name: int(name.rsplit("_", 1)[-1]) for name in subsets}
    built = Upstream("round_robin", weights, health)
    for name, members in subsets.items():
        built.update(name, dict.fromkeys(members, 1))
    return built


def eject(built: Upstream, endpoint: Endpoint) -> None:
    assert built.health.record(endpoint, "connect_failure", now=0.0) is not None


def test_a_90_10_split_lands_within_two_points_over_10k_requests() -> None:
    built = upstream({"v1_90": [A, B], "v2_10": [C]})
    rng = random.Random(7)
    picks = Counter(built.subset(rng) for _ in range(10_000))
    assert abs(picks["v2_10"] / 10_000 - 0.10) <= 0.02
    assert picks.keys() == {"v1_90", "v2_10"}


def test_round_robin_within_a_subset_and_a_retry_goes_elsewhere() -> None:
    built = upstream({"default_1": [A, B, C]})
    rng = random.Random(1)
    assert [built.choose("default_1", (), 0.0, rng) for _ in range(4)] == [A, B, C, A]
    assert built.choose("default_1", [B, C], 0.0, rng) == A
    assert built.choose("default_1", [A, B, C], 0.0, rng) is None


def test_a_subset_with_nothing_left_falls_back_to_the_others_heaviest_first() -> None:
    built = upstream({"canary_1": [A], "small_2": [B], "main_9": [C]})
    rng = random.Random(1)
    assert built.choose("canary_1", [A], 0.0, rng) == C
    assert built.choose("canary_1", [A, C], 0.0, rng) == B
    assert not built.untried([A, B, C], 0.0)
    assert built.untried([A, B], 0.0)


def test_an_ejected_endpoint_is_skipped_until_its_ejection_ends() -> None:
    no_panic = HealthSettings(outlier=OUTLIER.outlier, panic_threshold=0)
    built = upstream({"default_1": [A, B]}, no_panic)
    rng = random.Random(1)
    eject(built, A)
    assert {built.choose("default_1", (), 1.0, rng) for _ in range(5)} == {B}
    assert built.choose("default_1", (), 31.0, rng) in (A, B)  # 30 s later it is back
    assert {built.choose("default_1", (), 31.0, rng) for _ in range(4)} == {A, B}


def test_panic_balances_over_every_member_when_too_few_are_healthy() -> None:
    built = upstream({"default_1": [A, B, C, D]})  # panic below 50% healthy
    rng = random.Random(1)
    eject(built, A)
    eject(built, B)
    assert {built.choose("default_1", (), 1.0, rng) for _ in range(8)} == {C, D}  # 50%: no panic
    eject(built, C)  # 25% healthy: panic
    assert {built.choose("default_1", (), 1.0, rng) for _ in range(8)} == {A, B, C, D}


def test_update_reports_the_endpoints_that_left_and_health_forgets_them() -> None:
    built = upstream({"v1_1": [A, B], "v2_1": [B, C]})
    eject(built, A)
    assert built.update("v1_1", {B: 1}) == {A}
    assert built.update("v2_1", {C: 1}) == set()  # B is still in v1
    assert built.endpoints() == {B, C}
    assert built.health.counts(0.0)["ejected"] == 0


@pytest.mark.parametrize(
    ("members", "expected"),
    [
        pytest.param({"v1_0": [A], "v2_0": []}, "v1_0", id="only-weight-0-with-members"),
        pytest.param({"v1_0": [A], "v2_5": [B]}, "v2_5", id="weight-0-never-drawn"),
        pytest.param({"v1_5": [], "v2_5": []}, None, id="no-members-anywhere"),
        pytest.param({"v1_5": [], "v2_1": [B]}, "v2_1", id="empty-subset-skipped"),
    ],
)
def test_the_subset_for_a_request(members: dict[str, list[Endpoint]], expected: str | None) -> None:
    built = upstream(members)
    assert {built.subset(random.Random(seed)) for seed in range(20)} == {expected}


def test_least_request_reads_the_load_the_adapter_keeps() -> None:
    built = Upstream("least_request", {"default": 1}, HealthSettings())
    built.update("default", {A: 1, B: 1})
    built.load[A] = 10
    rng = random.Random(3)
    assert {built.choose("default", (), 0.0, rng) for _ in range(20)} == {B}


@pytest.mark.parametrize(
    ("endpoint", "text"),
    [
        (Endpoint("a", 1), "a:1"),
        (Endpoint("10.0.0.1", 443), "10.0.0.1:443"),
        (Endpoint("::1", 15443), "[::1]:15443"),
    ],
)
def test_endpoint_text(endpoint: Endpoint, text: str) -> None:
    assert str(endpoint) == text
