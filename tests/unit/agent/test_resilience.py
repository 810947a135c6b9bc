"""The retry policy's checks, the retry budget, the circuit breaker's limits (the retry
decision itself: test_tries.py)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.core.resilience import BreakerLimits, CircuitBreaker, RetryBudget, RetryPolicy

DEFAULT = RetryPolicy()


@pytest.mark.parametrize(
    "changes",
    [
        {"retries": -1},
        {"on": frozenset({"5xx"})},
        {"statuses": frozenset({99})},
        {"grpc_statuses": frozenset({17})},
        {"grpc_statuses": frozenset({-1})},
        {"budget_percent": -1.0},
        {"min_retry_concurrency": -1},
    ],
)
def test_retry_policy_is_checked_at_construction(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(DEFAULT, **changes)


def granted(budget: RetryBudget, asked: int) -> int:
    """Slots taken of `asked`; `room()` says beforehand whether each would be."""
    taken = 0
    for _ in range(asked):
        room = budget.room()
        assert budget.try_retry() is room
        taken += room
    return taken


def test_the_budget_grants_its_percent_of_the_requests_in_flight() -> None:
    budget = RetryBudget(20.0, 3)
    for _ in range(100):
        budget.request_started()
    assert granted(budget, 50) == 20
    budget.retry_finished()  # a retry ends: its slot is free again
    assert granted(budget, 5) == 1
    for _ in range(50):  # fewer requests: a lower ceiling, and no new retry above it
        budget.request_finished()
    assert budget.limit() == 10
    for _ in range(10):
        budget.retry_finished()
    assert granted(budget, 5) == 0
    budget.retry_finished()
    assert granted(budget, 5) == 1


def test_the_budget_grants_min_concurrency_when_that_is_more() -> None:
    budget = RetryBudget(20.0, 3)
    budget.request_started()
    budget.request_started()
    assert granted(budget, 10) == 3
    budget.retry_finished()
    assert granted(budget, 10) == 1


def test_a_zero_budget_grants_nothing() -> None:
    budget = RetryBudget(0.0, 0)
    for _ in range(100):
        budget.request_started()
    assert granted(budget, 10) == 0


def test_the_budget_counts_do_not_go_below_zero() -> None:
    budget = RetryBudget(20.0, 3)
    with pytest.raises(RuntimeError):
        budget.retry_finished()
    with pytest.raises(RuntimeError):
        budget.request_finished()


def test_the_breaker_acquires_up_to_the_limit_then_fails_fast() -> None:
    breaker = CircuitBreaker(BreakerLimits(max_connections=2, max_pending=1, max_requests=3))
    assert [breaker.acquire("max_requests") for _ in range(5)] == [True, True, True, False, False]
    assert breaker.open() == {"max_requests"}
    assert breaker.acquire("max_connections")  # each limit is its own
    assert breaker.acquire("max_pending")
    assert breaker.open() == {"max_requests", "max_pending"}
    breaker.release("max_requests")  # closes as soon as something is released
    assert breaker.open() == {"max_pending"}
    assert breaker.acquire("max_requests")
    assert not breaker.acquire("max_requests")
    assert breaker.in_use("max_requests") == 3


def test_a_zero_limit_refuses_everything() -> None:
    breaker = CircuitBreaker(BreakerLimits(max_pending=0))
    assert breaker.open() == {"max_pending"}
    assert not breaker.acquire("max_pending")
    assert breaker.acquire("max_connections")


def test_release_without_acquire_is_an_error() -> None:
    breaker = CircuitBreaker(BreakerLimits())
    with pytest.raises(RuntimeError, match="max_connections"):
        breaker.release("max_connections")
    assert breaker.open() == set()
