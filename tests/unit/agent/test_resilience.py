"""should_retry over methods x failures x tries; the retry budget; the circuit breaker's limits."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.core.resilience import (
    IDEMPOTENT,
    BreakerLimits,
    CircuitBreaker,
    Failure,
    RetryBudget,
    RetryPolicy,
    should_retry,
)

DEFAULT = RetryPolicy()  # 2 retries, on connect-failure and reset, status 503
EVERYTHING = RetryPolicy(on=frozenset({"connect-failure", "reset", "timeout"}))
POST_TOO = replace(EVERYTHING, non_idempotent=True)


@pytest.mark.parametrize(
    ("policy", "method", "failure", "tries", "retry"),
    [
        # connect-failure: nothing reached the server, any method
        pytest.param(DEFAULT, "GET", "connect-failure", 1, True, id="get-connect-failure"),
        pytest.param(DEFAULT, "POST", "connect-failure", 1, True, id="post-connect-failure"),
        pytest.param(DEFAULT, None, "connect-failure", 1, True, id="tcp-connect-failure"),
        pytest.param(
            replace(DEFAULT, on=frozenset({"reset"})),
            "GET",
            "connect-failure",
            1,
            False,
            id="connect-failure-not-in-policy",
        ),
        # reset: in the policy, and idempotent (or non_idempotent)
        pytest.param(DEFAULT, "GET", "reset", 1, True, id="get-reset"),
        pytest.param(DEFAULT, "PUT", "reset", 2, True, id="put-reset-second-try"),
        pytest.param(DEFAULT, "DELETE", "reset", 1, True, id="delete-reset"),
        pytest.param(DEFAULT, None, "reset", 1, True, id="tcp-reset"),
        pytest.param(DEFAULT, "POST", "reset", 1, False, id="post-reset"),
        pytest.param(DEFAULT, "PATCH", "reset", 1, False, id="patch-reset"),
        pytest.param(DEFAULT, "get", "reset", 1, False, id="methods-are-case-sensitive"),
        pytest.param(POST_TOO, "POST", "reset", 1, True, id="post-reset-non-idempotent"),
        # timeout: not in the default policy
        pytest.param(DEFAULT, "GET", "timeout", 1, False, id="timeout-not-in-policy"),
        pytest.param(EVERYTHING, "GET", "timeout", 1, True, id="get-timeout"),
        pytest.param(EVERYTHING, "POST", "timeout", 1, False, id="post-timeout"),
        pytest.param(POST_TOO, "POST", "timeout", 1, True, id="post-timeout-non-idempotent"),
        # a status: in policy.statuses, and idempotent (or non_idempotent)
        pytest.param(DEFAULT, "GET", 503, 1, True, id="get-503"),
        pytest.param(DEFAULT, "HEAD", 503, 2, True, id="head-503-second-try"),
        pytest.param(DEFAULT, "GET", 502, 1, False, id="get-502-not-in-policy"),
        pytest.param(DEFAULT, "GET", 200, 1, False, id="get-200"),
        pytest.param(DEFAULT, "POST", 503, 1, False, id="post-503"),
        pytest.param(POST_TOO, "POST", 503, 1, True, id="post-503-non-idempotent"),
        pytest.param(
            replace(DEFAULT, statuses=frozenset({502, 504})),
            "OPTIONS",
            504,
            1,
            True,
            id="other-statuses",
        ),
        # tries: at most policy.retries after the first
        pytest.param(DEFAULT, "GET", "connect-failure", 2, True, id="last-retry"),
        pytest.param(DEFAULT, "GET", "connect-failure", 3, False, id="retries-used-up"),
        pytest.param(DEFAULT, "GET", 503, 3, False, id="retries-used-up-503"),
        pytest.param(POST_TOO, "POST", "reset", 3, False, id="retries-used-up-non-idempotent"),
        pytest.param(
            replace(DEFAULT, retries=0), "GET", "connect-failure", 1, False, id="retries-0"
        ),
        pytest.param(
            replace(DEFAULT, retries=5), "GET", "connect-failure", 5, True, id="retries-5-fifth"
        ),
        pytest.param(
            replace(DEFAULT, retries=5), "GET", "connect-failure", 6, False, id="retries-5-sixth"
        ),
    ],
)
def test_should_retry(
    policy: RetryPolicy, method: str | None, failure: Failure | int, tries: int, retry: bool
) -> None:
    assert should_retry(policy, method, failure, tries) is retry


@pytest.mark.parametrize("method", sorted(IDEMPOTENT))
def test_every_idempotent_method_is_replayed_after_a_reset(method: str) -> None:
    assert should_retry(DEFAULT, method, "reset", 1)


def test_tries_counts_the_attempts_made() -> None:
    with pytest.raises(ValueError, match="tries >= 1"):
        should_retry(DEFAULT, "GET", "reset", 0)


@pytest.mark.parametrize(
    "changes",
    [
        {"retries": -1},
        {"on": frozenset({"5xx"})},
        {"statuses": frozenset({99})},
        {"budget_percent": -1.0},
        {"min_retry_concurrency": -1},
    ],
)
def test_retry_policy_is_checked_at_construction(changes: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        replace(DEFAULT, **changes)


def granted(budget: RetryBudget, asked: int) -> int:
    return sum(budget.try_retry() for _ in range(asked))


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
