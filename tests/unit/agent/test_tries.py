"""next_step: what follows a try, over outcomes x methods x gRPC x tries x what is left."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest

from agent.core.resilience import IDEMPOTENT, RetryPolicy
from agent.core.tries import (
    DEADLINE_EXCEEDED,
    DELIVERED,
    UNAVAILABLE,
    Answer,
    Deliver,
    Outcome,
    Redial,
    Response,
    Retry,
    Step,
    event_of,
    next_step,
)

DEFAULT = RetryPolicy()  # 2 retries; connect-failure, refused-stream, reset; 503; gRPC 14
EVERYTHING = replace(
    DEFAULT, on=frozenset({"connect-failure", "refused-stream", "reset", "timeout"})
)
POST_TOO = replace(EVERYTHING, non_idempotent=True)
GRPC_MORE = replace(DEFAULT, grpc_statuses=frozenset({14, 8}))

RETRY = Retry()
DELIVER = Deliver()
CONNECT = Answer(503, "upstream_connect_failure", UNAVAILABLE)
REFUSED = Answer(503, "upstream_refused_stream", UNAVAILABLE)
RESET = Answer(502, "upstream_reset", UNAVAILABLE)
TIMEOUT = Answer(504, "upstream_timeout", DEADLINE_EXCEEDED)
OK, S503, S502, S504 = Response(200), Response(503), Response(502), Response(504)
GRPC_UNAVAILABLE = Response(200, UNAVAILABLE)


def step(
    policy: RetryPolicy,
    method: str | None,
    outcome: Outcome,
    tries: int = 1,
    *,
    grpc: bool = False,
    replayable: bool = True,
    untried: bool = True,
    room: bool = True,
    stale: bool = False,
    redialled: bool = False,
) -> Step:
    return next_step(
        policy,
        method=method,
        grpc=grpc,
        outcome=outcome,
        tries=tries,
        replayable=replayable,
        untried=lambda: untried,
        budget_room=lambda: room,
        stale=stale,
        redialled=redialled,
    )


@pytest.mark.parametrize(
    ("policy", "method", "outcome", "tries", "expected"),
    [
        # connect-failure and refused-stream: nothing was processed, any method
        pytest.param(DEFAULT, "GET", "connect-failure", 1, RETRY, id="get-connect-failure"),
        pytest.param(DEFAULT, "POST", "connect-failure", 1, RETRY, id="post-connect-failure"),
        pytest.param(DEFAULT, None, "connect-failure", 1, RETRY, id="tcp-connect-failure"),
        pytest.param(DEFAULT, "POST", "refused-stream", 1, RETRY, id="post-refused-stream"),
        pytest.param(DEFAULT, "PATCH", "refused-stream", 2, RETRY, id="patch-refused-second"),
        pytest.param(
            replace(DEFAULT, on=frozenset({"reset"})),
            "GET",
            "connect-failure",
            1,
            CONNECT,
            id="connect-failure-not-in-policy",
        ),
        pytest.param(
            replace(DEFAULT, on=frozenset({"connect-failure"})),
            "GET",
            "refused-stream",
            1,
            REFUSED,
            id="refused-stream-not-in-policy",
        ),
        # reset: in the policy, and idempotent (or non_idempotent)
        pytest.param(DEFAULT, "GET", "reset", 1, RETRY, id="get-reset"),
        pytest.param(DEFAULT, "PUT", "reset", 2, RETRY, id="put-reset-second-try"),
        pytest.param(DEFAULT, "DELETE", "reset", 1, RETRY, id="delete-reset"),
        pytest.param(DEFAULT, None, "reset", 1, RETRY, id="tcp-reset"),
        pytest.param(DEFAULT, "POST", "reset", 1, RESET, id="post-reset"),
        pytest.param(DEFAULT, "PATCH", "reset", 1, RESET, id="patch-reset"),
        pytest.param(DEFAULT, "get", "reset", 1, RESET, id="methods-are-case-sensitive"),
        pytest.param(POST_TOO, "POST", "reset", 1, RETRY, id="post-reset-non-idempotent"),
        # timeout: not in the default policy
        pytest.param(DEFAULT, "GET", "timeout", 1, TIMEOUT, id="timeout-not-in-policy"),
        pytest.param(EVERYTHING, "GET", "timeout", 1, RETRY, id="get-timeout"),
        pytest.param(EVERYTHING, "POST", "timeout", 1, TIMEOUT, id="post-timeout"),
        pytest.param(POST_TOO, "POST", "timeout", 1, RETRY, id="post-timeout-non-idempotent"),
        # a status: in policy.statuses, and idempotent (or non_idempotent); else delivered
        pytest.param(DEFAULT, "GET", S503, 1, RETRY, id="get-503"),
        pytest.param(DEFAULT, "HEAD", S503, 2, RETRY, id="head-503-second-try"),
        pytest.param(DEFAULT, "GET", S502, 1, DELIVER, id="get-502-not-in-policy"),
        pytest.param(DEFAULT, "GET", OK, 1, DELIVER, id="get-200"),
        pytest.param(DEFAULT, "POST", S503, 1, DELIVER, id="post-503"),
        pytest.param(POST_TOO, "POST", S503, 1, RETRY, id="post-503-non-idempotent"),
        pytest.param(
            replace(DEFAULT, statuses=frozenset({502, 504})),
            "OPTIONS",
            S504,
            1,
            RETRY,
            id="other-statuses",
        ),
        # delivered: something reached the app, nothing to decide
        pytest.param(DEFAULT, None, DELIVERED, 1, DELIVER, id="tcp-linked"),
        pytest.param(DEFAULT, "GET", DELIVERED, 3, DELIVER, id="delivered-past-retries"),
        # tries: at most policy.retries after the first
        pytest.param(DEFAULT, "GET", "connect-failure", 2, RETRY, id="last-retry"),
        pytest.param(DEFAULT, "GET", "connect-failure", 3, CONNECT, id="retries-used-up"),
        pytest.param(DEFAULT, "GET", S503, 3, DELIVER, id="retries-used-up-503"),
        pytest.param(POST_TOO, "POST", "reset", 3, RESET, id="retries-used-up-non-idempotent"),
        pytest.param(replace(DEFAULT, retries=0), "GET", "reset", 1, RESET, id="retries-0"),
        pytest.param(
            replace(DEFAULT, retries=5), "GET", "connect-failure", 5, RETRY, id="retries-5-fifth"
        ),
        pytest.param(
            replace(DEFAULT, retries=5), "GET", "connect-failure", 6, CONNECT, id="retries-5-sixth"
        ),
    ],
)
def test_next_step_for_http_and_tcp(
    policy: RetryPolicy, method: str | None, outcome: Outcome, tries: int, expected: Step
) -> None:
    assert step(policy, method, outcome, tries) == expected


@pytest.mark.parametrize(
    ("policy", "outcome", "tries", "expected"),
    [
        # a gRPC status in grpc_statuses retries any call (every gRPC call is a POST)
        pytest.param(DEFAULT, GRPC_UNAVAILABLE, 1, RETRY, id="unavailable"),
        pytest.param(DEFAULT, GRPC_UNAVAILABLE, 2, RETRY, id="unavailable-last-retry"),
        pytest.param(DEFAULT, GRPC_UNAVAILABLE, 3, DELIVER, id="unavailable-retries-used-up"),
        pytest.param(DEFAULT, Response(200, 8), 1, DELIVER, id="resource-exhausted-default"),
        pytest.param(GRPC_MORE, Response(200, 8), 1, RETRY, id="resource-exhausted-configured"),
        pytest.param(DEFAULT, Response(200, 0), 1, DELIVER, id="ok"),
        pytest.param(DEFAULT, Response(200, 7), 1, DELIVER, id="permission-denied"),
        pytest.param(
            replace(DEFAULT, grpc_statuses=frozenset()),
            GRPC_UNAVAILABLE,
            1,
            DELIVER,
            id="no-grpc-statuses",
        ),
        # a head without grpc-status (the messages follow): HTTP rules, POST is not replayed
        pytest.param(DEFAULT, OK, 1, DELIVER, id="headers-then-messages"),
        pytest.param(DEFAULT, S503, 1, DELIVER, id="http-503-post"),
        # failures: as for any POST; the answer carries the gRPC code
        pytest.param(DEFAULT, "refused-stream", 1, RETRY, id="refused-stream"),
        pytest.param(DEFAULT, "connect-failure", 1, RETRY, id="connect-failure"),
        pytest.param(DEFAULT, "reset", 1, RESET, id="reset-not-replayed"),
        pytest.param(POST_TOO, "reset", 1, RETRY, id="reset-non-idempotent"),
        pytest.param(DEFAULT, "timeout", 1, TIMEOUT, id="timeout-deadline-exceeded"),
    ],
)
def test_next_step_for_grpc_calls(
    policy: RetryPolicy, outcome: Outcome, tries: int, expected: Step
) -> None:
    assert step(policy, "POST", outcome, tries, grpc=True) == expected


def test_a_grpc_status_on_a_call_not_grpc_is_not_looked_at() -> None:
    assert step(DEFAULT, "POST", GRPC_UNAVAILABLE) == DELIVER


@pytest.mark.parametrize(
    ("outcome", "grpc", "fallback"),
    [
        ("connect-failure", False, CONNECT),
        ("reset", False, RESET),
        (S503, False, DELIVER),
        (GRPC_UNAVAILABLE, True, DELIVER),
    ],
)
def test_no_retry_without_a_replayable_request_or_an_endpoint_left(
    outcome: Outcome, grpc: bool, fallback: Step
) -> None:
    assert step(DEFAULT, "GET", outcome, grpc=grpc, replayable=False) == fallback
    assert step(DEFAULT, "GET", outcome, grpc=grpc, untried=False) == fallback


@pytest.mark.parametrize(
    ("outcome", "expected"),
    [
        ("connect-failure", replace(CONNECT, over_budget=True)),
        (S503, Deliver(over_budget=True)),
    ],
)
def test_a_retry_the_budget_has_no_room_for_is_counted_as_over_budget(
    outcome: Outcome, expected: Step
) -> None:
    assert step(DEFAULT, "GET", outcome, room=False) == expected


def test_the_budget_and_endpoints_are_looked_up_only_when_a_retry_is_due() -> None:
    def asked() -> bool:
        raise AssertionError("looked up for a response nobody retries")

    delivered = next_step(
        DEFAULT,
        method="GET",
        grpc=False,
        outcome=OK,
        tries=1,
        replayable=True,
        untried=asked,
        budget_room=asked,
    )
    assert delivered == DELIVER


def test_an_endpoint_left_is_needed_before_the_budget_is_counted() -> None:
    assert step(DEFAULT, "GET", "reset", untried=False, room=False) == RESET  # not over_budget


@pytest.mark.parametrize("method", sorted(IDEMPOTENT))
def test_every_idempotent_method_is_replayed_after_a_reset(method: str) -> None:
    assert step(DEFAULT, method, "reset") == RETRY


def test_tries_counts_the_attempts_made() -> None:
    with pytest.raises(ValueError, match="tries >= 1"):
        step(DEFAULT, "GET", "reset", 0)


@pytest.mark.parametrize(
    ("outcome", "event"),
    [
        ("connect-failure", "connect_failure"),
        ("refused-stream", "reset"),
        ("reset", "reset"),
        ("timeout", "timeout"),
        (OK, "success"),
        (Response(404), "success"),
        (S503, "server_error"),
        (GRPC_UNAVAILABLE, "server_error"),
        (Response(200, 13), "server_error"),
        (Response(200, 5), "success"),  # NOT_FOUND: the server answered
        (DELIVERED, "success"),
    ],
)
def test_what_a_try_tells_outlier_detection(outcome: Outcome, event: str) -> None:
    assert event_of(outcome) == event


REDIAL = Redial()
NO_RETRIES = replace(DEFAULT, retries=0, on=frozenset())


@pytest.mark.parametrize(
    ("policy", "method", "outcome", "kwargs", "expected"),
    [
        # A reused connection lost with nothing heard back: sent again on a new one, whatever
        # the budget, the endpoints left, the tries made or the policy's failures say.
        pytest.param(DEFAULT, "GET", "reset", {}, REDIAL, id="get-reset"),
        pytest.param(DEFAULT, "GET", "reset", {"room": False}, REDIAL, id="no-budget-room"),
        pytest.param(DEFAULT, "GET", "reset", {"untried": False}, REDIAL, id="no-endpoint-left"),
        pytest.param(DEFAULT, "GET", "reset", {"tries": 3}, REDIAL, id="past-the-retries"),
        pytest.param(NO_RETRIES, "GET", "reset", {}, REDIAL, id="policy-retries-nothing"),
        pytest.param(DEFAULT, "POST", "refused-stream", {}, REDIAL, id="post-refused-stream"),
        # a POST may have been processed: what a reset gets (today's behaviour)
        pytest.param(DEFAULT, "POST", "reset", {}, RESET, id="post-reset-answered"),
        pytest.param(POST_TOO, "POST", "reset", {}, REDIAL, id="post-with-non-idempotent"),
        # once per request: a second stale loss is a reset like any other
        pytest.param(DEFAULT, "GET", "reset", {"redialled": True}, RETRY, id="second-retried"),
        pytest.param(
            DEFAULT,
            "GET",
            "reset",
            {"redialled": True, "room": False},
            replace(RESET, over_budget=True),
            id="second-over-budget",
        ),
        # a body no longer held cannot be sent again
        pytest.param(DEFAULT, "GET", "reset", {"replayable": False}, RESET, id="not-replayable"),
        # not signs of a stale connection: the server had it, or it was never had
        pytest.param(DEFAULT, "GET", "timeout", {}, TIMEOUT, id="timeout"),
        pytest.param(DEFAULT, "GET", "connect-failure", {}, RETRY, id="connect-failure"),
        pytest.param(DEFAULT, "GET", S503, {}, RETRY, id="a-503-came-back"),
        pytest.param(DEFAULT, "GET", OK, {}, DELIVER, id="a-200-came-back"),
        pytest.param(DEFAULT, None, DELIVERED, {}, DELIVER, id="tcp-delivered"),
    ],
)
def test_a_request_lost_on_a_stale_pooled_connection_is_redialled_once(
    policy: RetryPolicy,
    method: str | None,
    outcome: Outcome,
    kwargs: dict[str, Any],
    expected: Step,
) -> None:
    assert step(policy, method, outcome, stale=True, **kwargs) == expected


def test_a_loss_on_a_new_connection_is_a_reset_as_before() -> None:
    assert step(DEFAULT, "GET", "reset", stale=False) == RETRY
    assert step(DEFAULT, "GET", "reset", stale=False, room=False) == replace(
        RESET, over_budget=True
    )
