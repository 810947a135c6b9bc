"""Refusal lines are bounded: one per kind per interval, the next one saying how many it
stands for (identity/throttle.py)."""

from __future__ import annotations

from identity.throttle import MAX_KINDS, LogThrottle, held_back


def test_a_flood_of_one_refusal_is_one_line_per_interval_with_the_count_of_the_rest() -> None:
    throttle = LogThrottle(interval=10.0)
    said = [throttle.admit("loop", t / 10) for t in range(1000)]  # 1,000 in 100 s
    lines = [(t, held) for t, held in enumerate(said) if held is not None]
    assert len(lines) == 10
    assert lines[0] == (0, 0)
    assert all(held == 99 for _, held in lines[1:])  # each line stands for the 99 before it
    assert throttle.admit("loop", 100.0) == 99


def test_kinds_are_said_apart_and_a_quiet_kind_speaks_at_once() -> None:
    throttle = LogThrottle(interval=10.0)
    assert throttle.admit("loop", 0.0) == 0
    assert throttle.admit("registry_only", 0.5) == 0  # another kind: not held back
    assert throttle.admit("loop", 1.0) is None
    assert throttle.admit("loop", 20.0) == 1


def test_the_kinds_remembered_are_bounded() -> None:
    throttle = LogThrottle()
    for kind in range(MAX_KINDS * 3):
        assert throttle.admit(kind, 0.0) == 0
    assert len(throttle._kinds) <= MAX_KINDS


def test_the_line_says_how_many_it_stands_for() -> None:
    assert held_back(0) == ""
    assert held_back(5) == " (and 5 more like it since the last line)"
