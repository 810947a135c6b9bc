"""HealthTable: active checks and outlier ejection follow the tables; usable() and panic."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import get_args

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.endpoint import Endpoint
from agent.core.health import (
    ActiveCheck,
    Event,
    HealthSettings,
    HealthTable,
    OutlierDetection,
    State,
    usable,
)

E = Endpoint("10.0.0.1", 15443)
A, B, C, D = (Endpoint(f"10.0.1.{i}", 15443) for i in range(1, 5))

CF: Event = "connect_failure"
RESET: Event = "reset"
TIMEOUT: Event = "timeout"
OK: Event = "success"
X5: Event = "server_error"
PASS: Event = "check_passed"
FAIL: Event = "check_failed"
LOOK = None  # no event: look at the state, and collect expired() transitions

OUTLIER_ONLY = HealthSettings()
WITH_CHECKS = HealthSettings(active=ActiveCheck())
NO_OUTLIER = HealthSettings(active=ActiveCheck(), outlier=None)

#: (now, event or LOOK, state after, reason of the transition it reports, or None)
Step = tuple[float, Event | None, State, str | None]


def repeat(times: int, now: float, event: Event, state: State = "healthy") -> list[Step]:
    return [(now, event, state, None)] * times


def eject(now: float, old: State = "healthy") -> list[Step]:
    """Five connect failures at `now`: the fifth ejects."""
    return [*repeat(4, now, CF, old), (now, CF, "ejected", "consecutive_failures")]


def back(at: float, state: State = "healthy") -> list[Step]:
    """The ejection is still on just before `at` and over at `at`."""
    return [(at - 0.001, LOOK, "ejected", None), (at, LOOK, state, "ejection_ended")]


# One endpoint alone in its upstream (so the ejection cap never refuses).
SCENARIOS: dict[str, tuple[HealthSettings, list[Step]]] = {
    "five-connect-failures-in-a-row-eject": (OUTLIER_ONLY, eject(0)),
    "resets-and-timeouts-are-gateway-failures-too": (
        OUTLIER_ONLY,
        [
            *repeat(1, 0, CF),
            *repeat(1, 0, RESET),
            *repeat(1, 0, TIMEOUT),
            *repeat(1, 0, RESET),
            (0, TIMEOUT, "ejected", "consecutive_failures"),
        ],
    ),
    "a-success-in-between-resets-the-run": (
        OUTLIER_ONLY,
        [*repeat(4, 0, CF), *repeat(1, 0, OK), *eject(0)],
    ),
    "five-5xx-in-a-row-eject": (
        OUTLIER_ONLY,
        [*repeat(4, 0, X5), (0, X5, "ejected", "consecutive_5xx")],
    ),
    "gateway-failures-count-toward-the-5xx-run": (
        OUTLIER_ONLY,
        [*repeat(3, 0, CF), *repeat(1, 0, X5), (0, X5, "ejected", "consecutive_5xx")],
    ),
    "a-5xx-ends-the-gateway-failure-run": (
        HealthSettings(outlier=OutlierDetection(consecutive_5xx=100)),
        [*repeat(4, 0, CF), *repeat(1, 0, X5), *eject(0)],
    ),
    "ejected-for-base-then-twice-base": (
        OUTLIER_ONLY,
        [*eject(0), *back(30), *eject(30), *back(90), *eject(90), *back(180)],
    ),
    "results-in-flight-while-ejected-are-ignored-and-the-run-starts-afresh": (
        OUTLIER_ONLY,
        [*eject(0), *repeat(4, 10, CF, "ejected"), *back(30), *eject(30)],
    ),
    "one-base-ejection-un-ejected-takes-one-step-off": (
        OUTLIER_ONLY,
        # Ejected twice (30 s, 60 s); 30 s back in service: the third lasts 60 s, not 90.
        [*eject(0), *back(30), *eject(30), *back(90), *eject(120), *back(180)],
    ),
    "less-than-a-base-ejection-un-ejected-takes-nothing-off": (
        OUTLIER_ONLY,
        [*eject(0), *back(30), *eject(30), *back(90), *eject(119.5), *back(209.5)],
    ),
    "long-enough-un-ejected-is-back-to-base": (
        OUTLIER_ONLY,
        [*eject(0), *back(30), *eject(30), *back(90), *eject(150), *back(180)],
    ),
    "unhealthy-after-three-failed-checks": (
        WITH_CHECKS,
        [*repeat(2, 0, FAIL), (0, FAIL, "unhealthy", "check_failed")],
    ),
    "a-passed-check-in-between-resets-the-failed-run": (
        WITH_CHECKS,
        [
            *repeat(2, 0, FAIL),
            *repeat(1, 0, PASS),
            *repeat(2, 0, FAIL),
            (0, FAIL, "unhealthy", "check_failed"),
        ],
    ),
    "healthy-again-after-two-passed-checks-in-a-row": (
        WITH_CHECKS,
        [
            *repeat(2, 0, FAIL),
            (0, FAIL, "unhealthy", "check_failed"),
            *repeat(1, 5, PASS, "unhealthy"),
            *repeat(1, 10, FAIL, "unhealthy"),
            *repeat(1, 15, PASS, "unhealthy"),
            (20, PASS, "healthy", "check_passed"),
        ],
    ),
    "check-results-are-ignored-without-active-checks": (OUTLIER_ONLY, repeat(10, 0, FAIL)),
    "request-results-are-ignored-without-outlier-detection": (NO_OUTLIER, repeat(20, 0, CF)),
    "an-unhealthy-endpoint-can-be-ejected-and-comes-back-unhealthy": (
        WITH_CHECKS,
        [
            *repeat(2, 0, FAIL),
            (0, FAIL, "unhealthy", "check_failed"),
            *eject(1, old="unhealthy"),
            *back(31, state="unhealthy"),
        ],
    ),
    "checks-go-on-under-an-ejection-and-show-when-it-ends": (
        WITH_CHECKS,
        [*eject(0), *repeat(3, 10, FAIL, "ejected"), *back(30, state="unhealthy")],
    ),
    "a-passed-check-does-not-end-an-ejection": (
        WITH_CHECKS,
        [*eject(0), *repeat(5, 10, PASS, "ejected"), *back(30)],
    ),
}


@pytest.mark.parametrize(("health", "steps"), SCENARIOS.values(), ids=SCENARIOS.keys())
def test_transitions_follow_the_table(health: HealthSettings, steps: list[Step]) -> None:
    table = HealthTable(health)
    table.update([E])
    before: State = "healthy"
    for i, (now, event, state, reason) in enumerate(steps):
        if event is None:
            assert table.state(E, now) == state, f"step {i}"
            reported = table.expired(now)
        else:
            transition = table.record(E, event, now)
            reported = [] if transition is None else [transition]
            assert table.state(E, now) == state, f"step {i}"
        assert [t.reason for t in reported] == ([] if reason is None else [reason]), f"step {i}"
        for transition in reported:
            assert (transition.endpoint, transition.old, transition.new) == (E, before, state)
        before = state


def eject_at(table: HealthTable, endpoint: Endpoint, now: float) -> None:
    for _ in range(5):
        table.record(endpoint, CF, now)


@pytest.mark.parametrize(
    ("base", "most", "lengths"),
    [
        pytest.param(
            30, 300, [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300], id="default"
        ),
        pytest.param(30, 70, [30, 60, 70, 70], id="cap-between-multiples"),
        pytest.param(10, 10, [10, 10, 10], id="cap-equals-base"),
    ],
)
def test_each_ejection_in_a_row_lasts_longer_up_to_the_cap(
    base: float, most: float, lengths: list[float]
) -> None:
    table = HealthTable(
        HealthSettings(outlier=OutlierDetection(base_ejection=base, max_ejection=most))
    )
    table.update([E])
    now = 0.0
    for length in lengths:
        eject_at(table, E, now)
        assert table.state(E, now + length - 0.001) == "ejected"
        assert table.state(E, now + length) == "healthy"
        now += length


def test_the_decay_starts_from_the_cap() -> None:
    """Ejected to the cap, then ten base ejections in service: back to base."""
    table = HealthTable(OUTLIER_ONLY)
    table.update([E])
    now = 0.0
    for length in [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300]:
        eject_at(table, E, now)
        now += length
    eject_at(table, E, now + 9 * 30)  # nine steps off the cap (10): lasts 2 * 30
    assert table.state(E, now + 9 * 30 + 59.9) == "ejected"
    assert table.state(E, now + 9 * 30 + 60) == "healthy"


@pytest.mark.parametrize(
    ("known", "percent", "most"),
    [
        pytest.param(3, 50, 1, id="3-at-50%-one-as-two-would-be-67%"),
        pytest.param(4, 50, 2, id="4-at-50%-two"),
        pytest.param(10, 25, 2, id="10-at-25%-two"),
        pytest.param(4, 100, 4, id="100%-all"),
        pytest.param(2, 10, 1, id="below-one-endpoint-still-one"),
        pytest.param(5, 0, 1, id="0%-still-one"),
        pytest.param(1, 50, 1, id="a-single-endpoint-can-be-ejected"),
    ],
)
def test_max_ejection_percent_caps_the_ejections(known: int, percent: int, most: int) -> None:
    table = HealthTable(HealthSettings(outlier=OutlierDetection(max_ejection_percent=percent)))
    endpoints = [Endpoint(f"10.0.2.{i}", 15443) for i in range(known)]
    table.update(endpoints)
    for endpoint in endpoints:
        eject_at(table, endpoint, 0)
    assert table.counts(0)["ejected"] == most
    assert table.ejections_refused == known - most


def test_a_refused_ejection_resets_the_run_and_a_later_one_is_allowed() -> None:
    table = HealthTable(OUTLIER_ONLY)  # 50%
    table.update([A, B, C])
    eject_at(table, A, 0)
    for _ in range(5):
        assert table.record(B, CF, 1) is None  # refused: 2 of 3 would be ejected
    assert table.ejections_refused == 1
    for _ in range(4):  # the run starts again from 0, so no second attempt yet
        assert table.record(B, CF, 2) is None
    assert table.ejections_refused == 1
    assert table.state(A, 30) == "healthy"  # A is back: room for one ejection again
    transition = table.record(B, CF, 30)
    assert transition is not None
    assert (transition.endpoint, transition.new, transition.reason) == (
        B,
        "ejected",
        "consecutive_failures",
    )


def test_available_leaves_out_ejected_and_unhealthy_endpoints_until_they_return() -> None:
    table = HealthTable(WITH_CHECKS)
    table.update([A, B, C])
    eject_at(table, A, 0)
    for _ in range(3):
        table.record(B, FAIL, 0)
    assert table.available(1) == {C}
    assert table.available(30) == {A, C}
    table.record(B, PASS, 31)
    table.record(B, PASS, 32)
    assert table.available(32) == {A, B, C}


def test_expired_reports_each_ended_ejection_once_whoever_noticed_it() -> None:
    table = HealthTable(OUTLIER_ONLY)
    table.update([A, B])
    assert table.expired(0) == []
    eject_at(table, A, 0)
    assert table.expired(29) == []
    assert A in table.available(30)  # available() ends the ejection ...
    [ended] = table.expired(30)  # ... and expired() still reports it
    assert (ended.endpoint, ended.old, ended.new, ended.reason) == (
        A,
        "ejected",
        "healthy",
        "ejection_ended",
    )
    assert table.expired(30) == []
    assert table.expired(100) == []


def test_unknown_endpoints_are_ignored() -> None:
    table = HealthTable(WITH_CHECKS)
    table.update([A])
    for event in get_args(Event):
        for _ in range(10):
            assert table.record(B, event, 0) is None
    assert table.counts(0) == {"healthy": 1, "unhealthy": 0, "ejected": 0}
    assert table.available(0) == {A}
    with pytest.raises(KeyError):
        table.state(B, 0)


def test_update_adds_new_endpoints_healthy_and_forgets_gone_ones() -> None:
    table = HealthTable(WITH_CHECKS)
    table.update([A, B, C])
    eject_at(table, A, 0)
    for _ in range(3):
        table.record(B, FAIL, 0)
    table.update([A, B, D])  # C gone, D new; A and B keep their state
    assert table.counts(1) == {"healthy": 1, "unhealthy": 1, "ejected": 1}
    assert table.available(1) == {D}
    with pytest.raises(KeyError):
        table.state(C, 1)
    table.update([B, D])  # A forgotten while ejected, then back: a new endpoint ...
    table.update([A, B, D])
    assert table.state(A, 1) == "healthy"
    eject_at(table, A, 2)  # ... whose next ejection is a first one again: 30 s
    assert table.state(A, 31.9) == "ejected"
    assert table.available(32) == {A, D}
    table.update([B, D])  # an ended ejection not yet collected, of a forgotten endpoint
    assert table.expired(40) == []


def test_a_forgotten_ejection_frees_its_place_under_the_cap() -> None:
    table = HealthTable(OUTLIER_ONLY)
    table.update([A, B, C, D])  # 50%: two may be ejected
    eject_at(table, A, 0)
    eject_at(table, B, 0)
    table.update([B, C, D])
    eject_at(table, C, 0)  # B alone is ejected now: one of three, room for none more
    assert table.counts(0)["ejected"] == 1
    table.update([A, B, C, D])
    eject_at(table, C, 0)
    assert table.counts(0)["ejected"] == 2


def test_counts_has_every_state() -> None:
    table = HealthTable(OUTLIER_ONLY)
    assert table.counts(0) == {"healthy": 0, "unhealthy": 0, "ejected": 0}
    table.update([A, B, C])
    eject_at(table, A, 0)
    assert table.counts(0) == {"healthy": 2, "unhealthy": 0, "ejected": 1}
    assert table.counts(30) == {"healthy": 3, "unhealthy": 0, "ejected": 0}


@pytest.mark.parametrize(
    ("members", "available", "threshold", "expected"),
    [
        pytest.param({A, B, C, D}, {A, B, C, D}, 50, ({A, B, C, D}, False), id="all-available"),
        pytest.param({A, B, C, D}, {A, B}, 50, ({A, B}, False), id="exactly-at-threshold"),
        pytest.param({A, B, C, D}, {A}, 50, ({A, B, C, D}, True), id="below-threshold-panics"),
        pytest.param({A, B, C, D}, set(), 50, ({A, B, C, D}, True), id="none-available-panics"),
        pytest.param({A, B, C, D}, {A}, 0, ({A}, False), id="0-turns-panic-off"),
        pytest.param({A, B, C, D}, set(), 0, (set(), False), id="0-and-none-available"),
        pytest.param({A, B, C, D}, {A, B, C}, 100, ({A, B, C, D}, True), id="100-panics-on-any"),
        pytest.param({A, B}, {A, C, D}, 50, ({A}, False), id="other-subsets-do-not-count"),
        pytest.param({A, B}, {C, D}, 50, ({A, B}, True), id="other-subsets-healthy-still-panics"),
        pytest.param(set(), {A}, 50, (set(), False), id="no-members"),
    ],
)
def test_usable_falls_back_to_every_member_in_panic(
    members: set[Endpoint],
    available: set[Endpoint],
    threshold: int,
    expected: tuple[set[Endpoint], bool],
) -> None:
    endpoints, panic = usable(members, frozenset(available), threshold)
    assert (set(endpoints), panic) == expected


@pytest.mark.parametrize(
    "make",
    [
        lambda: OutlierDetection(consecutive_failures=0),
        lambda: OutlierDetection(consecutive_5xx=0),
        lambda: OutlierDetection(base_ejection=0),
        lambda: OutlierDetection(base_ejection=60, max_ejection=30),
        lambda: OutlierDetection(max_ejection_percent=101),
        lambda: ActiveCheck(healthy_threshold=0),
        lambda: ActiveCheck(interval=0),
        lambda: ActiveCheck(path="healthz"),
        lambda: HealthSettings(panic_threshold=101),
    ],
)
def test_settings_are_checked_at_construction(make: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        make()


_EVENTS = st.sampled_from(get_args(Event))


@settings(max_examples=200, deadline=None)
@given(
    known=st.integers(1, 8),
    percent=st.integers(0, 100),
    thresholds=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    steps=st.lists(
        st.tuples(st.integers(0, 7), _EVENTS, st.sampled_from([0.0, 0.5, 5.0, 30.0])),
        max_size=120,
    ),
)
def test_the_ejection_cap_holds_for_any_sequence(
    known: int,
    percent: int,
    thresholds: tuple[int, int],
    steps: list[tuple[int, Event, float]],
) -> None:
    outlier = OutlierDetection(
        consecutive_failures=thresholds[0],
        consecutive_5xx=thresholds[1],
        base_ejection=10,
        max_ejection=40,
        max_ejection_percent=percent,
    )
    health = HealthSettings(
        active=ActiveCheck(healthy_threshold=1, unhealthy_threshold=2), outlier=outlier
    )
    table = HealthTable(health)
    endpoints = [Endpoint(f"10.0.3.{i}", 15443) for i in range(known)]
    table.update(endpoints)
    cap = max(1, math.floor(percent * known / 100))
    now = 0.0
    for index, event, wait in steps:
        now += wait
        transition = table.record(endpoints[index % known], event, now)
        if transition is not None:
            assert transition.old != transition.new
        states = [table.state(e, now) for e in endpoints]
        assert set(states) <= set(get_args(State))
        assert states.count("ejected") <= cap
        healthy = {e for e, state in zip(endpoints, states, strict=True) if state == "healthy"}
        assert table.available(now) == healthy
        assert sum(table.counts(now).values()) == known


def test_new_settings_on_reload_keep_what_the_table_knows() -> None:
    table = HealthTable(WITH_CHECKS)
    table.update([A, B, C])
    eject_at(table, A, 0)
    for _ in range(3):
        table.record(B, FAIL, 0)
    table.reconfigure(HealthSettings(active=ActiveCheck(interval=1.0)))  # another interval
    assert (table.state(A, 1), table.state(B, 1), table.state(C, 1)) == (
        "ejected",
        "unhealthy",
        "healthy",
    )


def test_turning_checks_or_ejection_off_clears_their_verdicts() -> None:
    table = HealthTable(WITH_CHECKS)
    table.update([A, B])
    eject_at(table, A, 0)
    for _ in range(3):
        table.record(B, FAIL, 0)
    table.reconfigure(OUTLIER_ONLY)  # no checks: nothing would ever pass B again
    assert (table.state(A, 1), table.state(B, 1)) == ("ejected", "healthy")
    table.reconfigure(HealthSettings(outlier=None))
    assert table.available(1) == {A, B}
    for _ in range(10):  # and nothing ejects any more
        table.record(A, CF, 2)
    assert table.state(A, 2) == "healthy"
