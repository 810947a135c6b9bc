"""The attempts loop and its Try: each try ends once, its budget slot and load given back
once, whatever ends it (a delivered response, a retry, a cancel, a reload), with fakes for
the upstream's I/O."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.adapters.attempts import LocalAnswer, Try, attempts
from agent.adapters.upstreams import LiveUpstream
from agent.core.health import HealthSettings
from agent.core.resilience import RetryBudget, RetryPolicy
from agent.core.tries import DELIVERED, Deliver, Outcome, Response, Retry
from agent.core.upstream import Endpoint, Upstream

A, B, C = (Endpoint(name, 15443) for name in "abc")
DEFAULT = RetryPolicy()
EVERYTHING = RetryPolicy(on=frozenset({"connect-failure", "refused-stream", "reset", "timeout"}))


class Counter:
    def __init__(self) -> None:
        self.value = 0

    def inc(self) -> None:
        self.value += 1


class Counted:
    def __init__(self) -> None:
        self.retries = Counter()
        self.overflows: list[str] = []

    def overflow(self, reason: str) -> None:
        self.overflows.append(reason)


class FakeLive:
    """What the attempts loop uses of a LiveUpstream: a real core, recorded side effects."""

    def __init__(self, endpoints: list[Endpoint], policy: RetryPolicy = DEFAULT) -> None:
        self.core = Upstream("round_robin", {"default": 1}, HealthSettings())
        self.core.update("default", dict.fromkeys(endpoints, 1))
        self.config = SimpleNamespace(retries=policy)
        self.budget = RetryBudget(policy.budget_percent, policy.min_retry_concurrency)
        self.counted = Counted()
        self.records: list[tuple[Endpoint, str]] = []

    def record(self, endpoint: Endpoint, event: str) -> None:
        self.records.append((endpoint, event))

    def load(self) -> dict[Endpoint, int]:
        return {e: n for e, n in self.core.load.items() if n}


class Connection:
    def __init__(self) -> None:
        self.aborted = 0

    def abort(self) -> None:
        self.aborted += 1


Run = Callable[[Try[Connection, None]], Awaitable[Outcome | None]]


def scripted(
    *outcomes: Outcome | None, hanging: asyncio.Event | None = None
) -> tuple[Run, list[Connection]]:
    """A run that gives each try a connection and ends it in the next outcome (None: never
    decided, `hanging` set once it waits)."""
    connections: list[Connection] = []
    left = list(outcomes)

    async def run(attempt: Try[Connection, None]) -> Outcome | None:
        attempt.connection = Connection()
        connections.append(attempt.connection)
        outcome = left.pop(0)
        if outcome is None:
            attempt.sent()
            if hanging is not None:
                hanging.set()
            await attempt.decided()  # until cancelled, or the per-try timeout
            return None
        return outcome

    return run, connections


async def attempt(live: FakeLive, run: Run, **kwargs: Any) -> Try[Connection, None]:
    kwargs.setdefault("method", "GET")
    return await attempts(cast(LiveUpstream, live), run, random.Random(1), **kwargs)


async def test_a_retry_holds_its_budget_slot_until_the_delivered_try_ends() -> None:
    live = FakeLive([A, B])
    run, connections = scripted("connect-failure", Response(200))
    delivered = await attempt(live, run)
    assert (delivered.endpoint, delivered.number, delivered.step) == (B, 2, Deliver())
    assert live.budget.retries == 1  # the retry's slot, while its response is delivered
    assert live.load() == {B: 1}
    assert connections[0].aborted == 1  # the failed try's connection was dropped
    delivered.end(200)
    delivered.end(200)  # again: nothing more is given back or recorded
    assert live.budget.retries == 0
    assert live.load() == {}
    assert live.records == [(A, "connect_failure"), (B, "success")]
    assert live.counted.retries.value == 1
    assert connections[1].aborted == 1  # still held at the end: dropped


async def test_a_connection_released_whole_is_not_dropped_by_the_end() -> None:
    live = FakeLive([A])
    run, connections = scripted(DELIVERED)
    delivered = await attempt(live, run, method=None)
    assert delivered.release() is connections[0]
    delivered.end()
    assert connections[0].aborted == 0
    assert live.records == [(A, "success")]


async def test_the_status_the_app_got_is_what_outlier_detection_records() -> None:
    live = FakeLive([A])
    run, _ = scripted(Response(200))
    delivered = await attempt(live, run)
    delivered.end(502)  # a truncated body, say
    assert live.records == [(A, "server_error")]


async def test_a_cancelled_retry_gives_its_slot_and_load_back_once() -> None:
    live = FakeLive([A, B])
    retrying = asyncio.Event()
    run, connections = scripted("reset", None, hanging=retrying)
    task = asyncio.create_task(attempt(live, run))
    await retrying.wait()
    assert live.budget.retries == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert live.budget.retries == 0
    assert live.load() == {}
    assert [c.aborted for c in connections] == [1, 1]
    assert live.records == [(A, "reset")]  # a cancelled try is no endpoint's failure


async def test_a_slot_goes_back_to_the_budget_it_came_from_after_a_reload() -> None:
    live = FakeLive([A, B])
    run, _ = scripted("connect-failure", Response(200))
    delivered = await attempt(live, run)
    old, live.budget = live.budget, RetryBudget(20.0, 3)  # a reload changed the retry policy
    delivered.end(200)
    assert (old.retries, live.budget.retries) == (0, 0)


async def test_a_try_decided_to_retry_then_cancelled_gives_the_next_ones_slot_back() -> None:
    live = FakeLive([A, B])

    decided = asyncio.Event()

    async def run(attempt: Try[Connection, None]) -> Outcome | None:
        assert attempt.decide("reset") == Retry()  # from a callback, say
        decided.set()
        await asyncio.Event().wait()
        return None

    task = asyncio.create_task(attempt(live, run))
    await decided.wait()
    assert live.budget.retries == 1  # taken for the next try
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert live.budget.retries == 0
    assert live.load() == {}


async def test_a_response_head_decided_in_a_callback() -> None:
    live = FakeLive([A, B])
    heads = iter([503, 200])

    async def run(attempt: Try[Connection, None]) -> Outcome | None:
        attempt.connection = Connection()
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: attempt.decide(Response(next(heads))))  # the parser's callback
        return await attempt.decided()

    delivered = await attempt(live, run)
    assert (delivered.endpoint, delivered.number) == (B, 2)
    delivered.end(200)
    assert live.records == [(A, "server_error"), (B, "success")]
    assert live.budget.retries == 0


async def test_decided_once_a_late_timeout_changes_nothing() -> None:
    live = FakeLive([A, B])
    attempt_ = Try[Connection, None](
        cast(LiveUpstream, live), A, [A], None, method="GET", grpc=False, replayable=lambda: True
    )
    assert attempt_.decide(Response(200)) == Deliver()
    assert attempt_.decide("timeout") == Deliver()
    assert live.records == []  # a delivered try is recorded when it ends
    attempt_.end()
    assert live.records == [(A, "success")]


async def test_a_per_try_timeout_is_a_failure_the_policy_may_retry() -> None:
    live = FakeLive([A, B], EVERYTHING)
    run, connections = scripted(None, Response(200))
    delivered = await attempt(live, run, per_try=0.01)
    assert delivered.endpoint == B
    delivered.end(200)
    assert live.records == [(A, "timeout"), (B, "success")]
    assert connections[0].aborted == 1


async def test_a_timeout_not_retried_is_answered_504() -> None:
    live = FakeLive([A, B])
    run, _ = scripted(None)
    with pytest.raises(LocalAnswer) as answer:
        await attempt(live, run, per_try=0.01)
    assert (answer.value.status, answer.value.error, answer.value.grpc_status) == (
        504,
        "upstream_timeout",
        4,
    )
    assert live.load() == {}


async def test_the_last_failure_is_the_answer_when_no_endpoint_is_left() -> None:
    live = FakeLive([A, B])
    run, _ = scripted("connect-failure", "connect-failure")
    with pytest.raises(LocalAnswer) as answer:
        await attempt(live, run)
    assert (answer.value.status, answer.value.error) == (503, "upstream_connect_failure")
    assert live.counted.retries.value == 1  # no retry counted where there was nowhere to go
    assert (live.budget.retries, live.load()) == (0, {})


async def test_no_budget_room_answers_and_counts_the_overflow() -> None:
    live = FakeLive([A, B], replace(RetryPolicy(), budget_percent=0, min_retry_concurrency=0))
    run, _ = scripted("connect-failure")
    with pytest.raises(LocalAnswer) as answer:
        await attempt(live, run)
    assert answer.value.error == "upstream_connect_failure"
    assert live.counted.overflows == ["retry_budget"]
    assert live.counted.retries.value == 0


async def test_an_upstream_with_no_endpoints_is_answered_503() -> None:
    live = FakeLive([])
    run, connections = scripted()
    with pytest.raises(LocalAnswer) as answer:
        await attempt(live, run)
    assert (answer.value.status, answer.value.error) == (503, "no_endpoints")
    assert connections == []


async def test_a_request_that_cannot_be_replayed_is_tried_once() -> None:
    live = FakeLive([A, B])
    run, _ = scripted("reset")
    with pytest.raises(LocalAnswer) as answer:
        await attempt(live, run, replayable=lambda: False)
    assert answer.value.error == "upstream_reset"
    assert live.counted.retries.value == 0


async def test_the_per_try_timeout_runs_from_the_request_sent_not_from_the_dial() -> None:
    live = FakeLive([A])
    dialled = asyncio.Event()

    async def run(attempt: Try[Connection, None]) -> Outcome | None:
        loop = asyncio.get_running_loop()
        await dialled.wait()  # a dial longer than the per-try timeout
        started = loop.time()
        attempt.sent()
        loop.call_later(0.01, attempt.decide, Response(200))  # a head within the per-try
        await attempt.decided()
        assert loop.time() - started < 0.05
        return None

    task = asyncio.create_task(attempt(live, run, per_try=0.05))
    loop = asyncio.get_running_loop()
    loop.call_later(0.08, dialled.set)
    delivered = await task
    assert delivered.step == Deliver()
    delivered.end(200)


def stale_then(*outcomes: Outcome) -> tuple[Run, list[Try[Connection, None]]]:
    """A run whose first try is lost on a stale pooled connection; the next tries end in
    `outcomes`. It keeps the tries, to see which were fresh."""
    tries: list[Try[Connection, None]] = []
    left = list(outcomes)

    async def run(attempt: Try[Connection, None]) -> Outcome | None:
        tries.append(attempt)
        attempt.connection = Connection()
        if len(tries) == 1:
            attempt.decide("reset", stale=True)
            return None
        return left.pop(0)

    return run, tries


async def test_a_request_lost_on_a_stale_connection_is_redialled_elsewhere_for_free() -> None:
    live = FakeLive([A, B])
    run, tries = stale_then(Response(200))
    delivered = await attempt(live, run)
    assert [(t.endpoint, t.fresh, t.number) for t in tries] == [(A, False, 1), (B, True, 1)]
    assert live.budget.retries == 0  # no slot taken
    assert live.counted.retries.value == 0  # not one of the policy's retries
    delivered.end(200)
    assert live.records == [(B, "success")]  # nothing recorded against A
    assert live.load() == {}


async def test_a_redial_goes_to_the_same_endpoint_when_none_other_is_left() -> None:
    live = FakeLive([A])
    run, tries = stale_then(Response(200))
    delivered = await attempt(live, run)
    assert [(t.endpoint, t.fresh) for t in tries] == [(A, False), (A, True)]
    delivered.end(200)
    assert live.records == [(A, "success")]


async def test_a_dead_endpoints_redial_fails_as_a_connect_failure_recorded_and_retried() -> None:
    live = FakeLive([A])
    run, _ = stale_then("connect-failure")
    with pytest.raises(LocalAnswer) as answer:
        await attempt(live, run)
    assert (answer.value.status, answer.value.error) == (503, "upstream_connect_failure")
    assert live.records == [(A, "connect_failure")]  # what ejects it


async def test_a_redial_is_made_once_and_the_policys_retries_are_still_there() -> None:
    live = FakeLive([A, B, C])
    run, tries = stale_then("reset", Response(200))
    delivered = await attempt(live, run)
    # the redial's reset is retried as any reset: a budget slot, on an endpoint not tried
    assert [(t.endpoint, t.fresh, t.number) for t in tries] == [
        (A, False, 1),
        (B, True, 1),
        (C, False, 2),
    ]
    assert live.budget.retries == 1
    delivered.end(200)
    assert live.budget.retries == 0
    assert live.records == [(B, "reset"), (C, "success")]


async def test_a_redial_with_no_budget_room_still_goes_out() -> None:
    live = FakeLive([A, B])
    live.budget = RetryBudget(0, 0)  # no retry at all
    run, _ = stale_then(Response(200))
    delivered = await attempt(live, run)
    delivered.end(200)
    assert live.counted.overflows == []


async def test_a_retry_redialled_keeps_its_slot_until_it_ends() -> None:
    live = FakeLive([A, B, C])
    tries: list[Try[Connection, None]] = []

    async def run(attempt: Try[Connection, None]) -> Outcome | None:
        tries.append(attempt)
        attempt.connection = Connection()
        if len(tries) == 1:
            return "connect-failure"  # a retry, on a slot
        if len(tries) == 2:
            attempt.decide("reset", stale=True)
            return None
        return Response(200)

    delivered = await attempt(live, run)
    assert [t.endpoint for t in tries] == [A, B, C]
    assert live.budget.retries == 1  # the retry's one slot, carried to its redial
    delivered.end(200)
    assert live.budget.retries == 0


async def test_a_post_lost_on_a_stale_connection_is_answered_as_a_reset() -> None:
    live = FakeLive([A, B])
    run, tries = stale_then(Response(200))
    with pytest.raises(LocalAnswer) as answer:
        await attempt(live, run, method="POST")
    assert (answer.value.status, answer.value.error) == (502, "upstream_reset")
    assert len(tries) == 1
    assert live.records == [(A, "reset")]
