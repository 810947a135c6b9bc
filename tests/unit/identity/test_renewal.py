"""The renewal plan (pure, table and property tests) and the loop, on a fake clock."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from identity.backoff import Backoff
from identity.renewal import (
    Moment,
    Renew,
    RenewalPolicy,
    Renewer,
    Standing,
    Validity,
    Wait,
    plan,
)
from tests.clock import FakeClock

T0 = datetime(2030, 1, 1, tzinfo=UTC)
POLICY = RenewalPolicy()
S = timedelta(seconds=1)


def at(seconds: float, mono: float | None = None) -> Moment:
    return Moment(T0 + seconds * S, seconds if mono is None else mono)


def held(life: float, renew_in: float | None = None) -> Standing:
    """A credential issued at T0 for `life` seconds, due at `renew_in` (half its life)."""
    due = life / 2 if renew_in is None else renew_in
    return Standing(Validity(T0, T0 + life * S), T0 + due * S)


def failed(standing: Standing, failures: int, when: float, draw: float = 0.0) -> Standing:
    return Standing(standing.held, standing.renew_at, failures, when, draw)


@pytest.mark.parametrize(
    ("now", "standing", "expected"),
    [
        pytest.param(at(0), Standing(), Renew("no credential yet"), id="nothing-held"),
        pytest.param(at(0), held(3600), Wait(60, "renewal due"), id="1h-rechecks-every-60s"),
        pytest.param(at(0), held(30), Wait(3, "renewal due"), id="30s-rechecks-every-3s"),
        pytest.param(at(14), held(30), Wait(1, "renewal due"), id="30s-due-in-1s"),
        pytest.param(at(15), held(30), Renew("due"), id="30s-due-now"),
        pytest.param(at(30), held(30), Renew("expired"), id="expired-renews-at-once"),
        pytest.param(at(0), held(0.5), Wait(0.1, "renewal due"), id="recheck-floor"),
        pytest.param(
            at(20), failed(held(30), 1, 20), Wait(1, "backing off"), id="first-failure-1s"
        ),
        pytest.param(
            at(20), failed(held(30), 5, 20), Wait(3, "backing off"), id="backoff-capped-by-recheck"
        ),
        pytest.param(
            at(28), failed(held(30), 5, 20), Wait(2, "backing off"), id="backoff-cut-at-expiry"
        ),
        pytest.param(
            at(31),
            failed(held(30), 5, 20),
            Renew("retry: nothing valid held"),
            id="expired-during-a-16s-backoff",
        ),
        pytest.param(
            at(40),
            failed(held(30), 9, 39.5),
            Wait(1.5, "backing off (nothing valid held)"),
            id="expired-retries-within-2s",
        ),
        pytest.param(
            at(-3600, mono=21),
            failed(held(30), 1, 20),
            Renew("retry"),
            id="a-wall-step-back-does-not-stretch-a-backoff",
        ),
    ],
)
def test_plan(now: Moment, standing: Standing, expected: Wait | Renew) -> None:
    step = plan(now, standing, POLICY)
    assert type(step) is type(expected)
    if isinstance(expected, Wait):
        assert isinstance(step, Wait)
        assert step.seconds == pytest.approx(expected.seconds)
    assert step.reason == expected.reason


def test_installing_draws_the_renewal_point_in_the_life_left() -> None:
    # Issuers backdate NotBefore: half of the life left from now, not from NotBefore.
    validity = Validity(T0 - 60 * S, T0 + 30 * S)
    standing = Standing().installed(validity, at(0), random.Random(1))
    assert standing.renew_at is not None
    assert T0 + 13 * S <= standing.renew_at <= T0 + 17 * S
    assert standing.failures == 0


def test_installing_an_expired_credential_is_a_failure() -> None:
    standing = Standing().installed(Validity(T0 - 60 * S, T0), at(0), random.Random(1))
    assert standing.failures == 1
    step = plan(at(0), standing, POLICY)
    assert isinstance(step, Wait) and step.seconds <= 1


moments = st.floats(min_value=-1e6, max_value=1e6)
lives = st.floats(min_value=0.01, max_value=1e6)


@given(moments, lives, st.integers(0, 10**6), st.floats(0, 0.999), st.floats(0, 1e6), moments)
def test_a_wait_is_positive_bounded_and_fast_once_nothing_valid_is_held(
    now: float, life: float, failures: int, draw: float, since: float, mono: float
) -> None:
    standing = Standing(Validity(T0, T0 + life * S), T0 + life / 2 * S, failures, mono, draw)
    step = plan(at(now, mono=mono + since), standing, POLICY)
    if isinstance(step, Renew):
        return
    assert 0 < step.seconds <= POLICY.recheck(standing.held).total_seconds() + 1e-6
    if failures and not standing.usable(T0 + now * S):
        assert since + step.seconds <= POLICY.fast_retry.total_seconds() + 1e-6


@given(st.integers(1, 10**6), st.floats(0, 0.999))
def test_retries_without_a_valid_credential_are_jittered_within_a_bound(
    failures: int, draw: float
) -> None:
    delay = POLICY.retry_delay(failures, usable=False, draw=draw)
    assert 0.5 * S <= delay <= 2 * S
    assert delay <= POLICY.retry_delay(failures, usable=True, draw=draw)


# -- the loop ---------------------------------------------------------------------------


class Credential:
    """A renew coroutine issuing `life`-second credentials, failing while `down`.

    The issuer's clock is right: T0 plus the monotonic time, whatever steps the
    wall clock of the loop takes."""

    def __init__(self, clock: FakeClock, life: float) -> None:
        self.clock, self.life, self.down, self.calls = clock, life, False, 0

    async def renew(self) -> Validity:
        self.calls += 1
        if self.down:
            raise ConnectionRefusedError("issuer down")
        now = T0 + self.clock.monotonic() * S
        return Validity(now - 60 * S, now + self.life * S)


async def start(clock: FakeClock, credential: Credential, **policy: object) -> Renewer:
    renewer = Renewer(
        "test credential",
        credential.renew,
        clock=clock,
        rng=random.Random(3),
        policy=RenewalPolicy(**policy),  # type: ignore[arg-type]
    )
    task = asyncio.create_task(renewer.run())
    renewer.task = task  # type: ignore[attr-defined]
    await clock.settle(1)
    return renewer


async def test_the_loop_renews_at_half_life_and_keeps_the_credential_through_an_outage() -> None:
    clock = FakeClock(T0)
    credential = Credential(clock, life=30)
    renewer = await start(clock, credential)
    try:
        assert credential.calls == 1
        await clock.advance(13)
        assert credential.calls == 1
        await clock.advance(4)  # 13.5-16.5 s: due
        assert credential.calls == 2
        credential.down = True
        await clock.advance(25)  # an outage, within the life of the credential held
        assert renewer.standing.failures >= 3
        assert renewer.standing.usable(clock.now())
    finally:
        renewer.task.cancel()  # type: ignore[attr-defined]


async def test_after_expiry_the_loop_retries_within_two_seconds_and_recovers_at_once() -> None:
    clock = FakeClock(T0)
    credential = Credential(clock, life=30)
    renewer = await start(clock, credential, backoff=Backoff(S, 300 * S))
    try:
        credential.down = True
        await clock.advance(120)  # long past expiry; the backoff alone would be at 64 s
        calls = credential.calls
        await clock.advance(2)
        assert credential.calls > calls, "no retry within 2 s of an expired credential"
        credential.down = False
        await clock.advance(2)
        assert renewer.standing.usable(clock.now())
    finally:
        renewer.task.cancel()  # type: ignore[attr-defined]


async def test_a_wall_clock_step_past_expiry_and_back_is_noticed_within_a_tenth_of_the_life() -> (
    None
):
    clock = FakeClock(T0)
    credential = Credential(clock, life=30)
    renewer = await start(clock, credential)
    try:
        clock.step(3600)  # a wrong NTP step: by this wall clock everything has expired
        await clock.advance(3)
        assert credential.calls == 2, "the loop did not look at the wall clock within 3 s"
        assert not renewer.standing.usable(clock.now())  # the answer is expired by this clock
        clock.step(-3600)  # the clock is right again
        await clock.advance(2)
        assert renewer.standing.usable(clock.now()), "still no valid credential 2 s later"
        assert renewer.standing.failures == 0
    finally:
        renewer.task.cancel()  # type: ignore[attr-defined]


async def test_ever_shorter_credentials_are_renewed_no_faster_than_failures_are_retried() -> None:
    """An issuer whose own certificate ends in 10 ms caps every credential there."""
    clock = FakeClock(T0)
    credential = Credential(clock, life=0.01)
    renewer = await start(clock, credential)
    try:
        await clock.advance(5)
        assert credential.calls <= 12, f"{credential.calls} renewals in 5 s"
        assert renewer.standing.failures >= 1
    finally:
        renewer.task.cancel()  # type: ignore[attr-defined]


async def test_renew_now_cuts_a_wait_short() -> None:
    clock = FakeClock(T0)
    credential = Credential(clock, life=3600)
    renewer = await start(clock, credential)
    try:
        renewer.renew_now()
        await clock.settle(1)
        assert credential.calls == 2
    finally:
        renewer.task.cancel()  # type: ignore[attr-defined]


async def test_an_error_that_is_not_retriable_ends_the_loop() -> None:
    clock = FakeClock(T0)

    async def broken() -> Validity:
        raise KeyError("a bug")

    renewer = Renewer("x", broken, clock=clock, rng=random.Random(1), retriable=(OSError,))
    with pytest.raises(KeyError):
        await asyncio.wait_for(renewer.run(), 5)


async def test_on_expired_is_told_once_at_expiry() -> None:
    clock = FakeClock(T0)
    credential = Credential(clock, life=30)
    expired: list[float] = []
    renewer = Renewer(
        "x",
        credential.renew,
        clock=clock,
        rng=random.Random(3),
        on_expired=lambda: expired.append(clock.monotonic()),
    )
    task = asyncio.create_task(renewer.run())
    try:
        await clock.settle(1)
        credential.down = True
        await clock.advance(40)
        assert expired == [30.0]
    finally:
        task.cancel()


async def test_the_next_attempt_said_is_when_the_loop_will_ask() -> None:
    """What /certs says as next_renewal: the renewal point while all is well; while failing,
    the next retry, never later than the expiry the loop wakes at, never in the past."""
    clock = FakeClock(T0)
    credential = Credential(clock, life=30)
    renewer = await start(clock, credential, backoff=Backoff(20 * S, 300 * S))
    try:
        assert renewer.next_attempt == renewer.standing.renew_at
        credential.down = True
        await clock.advance(17)  # due at 13.5-16.5 s: it failed; the backoff says 10-20 s
        assert renewer.standing.failures == 1
        said = renewer.next_attempt
        assert said is not None and clock.now() <= said
        held = renewer.standing.held
        assert held is not None and said <= held.not_after
        calls = credential.calls
        await clock.advance((said - clock.now()).total_seconds() + 0.5)
        assert credential.calls > calls, "no attempt when next_attempt said"
    finally:
        renewer.task.cancel()  # type: ignore[attr-defined]
