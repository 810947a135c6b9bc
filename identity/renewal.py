"""Keeping a credential fresh: one pure plan and one loop, for every credential.

The agent's SVID, the CA's serving certificate, the Vault token and the Vault
intermediate all follow the same rules, decided here and nowhere else:

* renew at the point `refresh_at` drew once for the credential (half of the
  life left when it arrived, jittered);
* after a failure, keep the current credential and back off exponentially
  with jitter;
* once nothing valid is held (expired, or none yet), retry fast: the backoff
  capped at `fast_retry` (1-2 s), jittered, because every moment without a
  credential is an outage and the only way out is to succeed;
* never wait long without looking at the wall clock again, since credentials
  expire by the wall clock and a suspend or an NTP step moves it without
  moving the monotonic clock the loop sleeps on: the longest wait is a tenth
  of the credential's life, at most a minute.

`plan` is pure (a moment in, `Wait` or `Renew` out) and table-tested with
plain values; `Renewer` is the thin async shell that sleeps, calls the renew
coroutine and records the outcome. Backoffs are measured on the monotonic
clock (a wall-clock step must not stretch or cut one), validity on the wall.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import NoReturn, Protocol

from identity.backoff import JITTER, Backoff
from identity.rotation import refresh_at

__all__ = [
    "Clock",
    "Moment",
    "Renew",
    "RenewalPolicy",
    "Renewer",
    "Standing",
    "SystemClock",
    "Validity",
    "Wait",
    "plan",
]

log = logging.getLogger("outrider.renewal")

#: A difference between wall and monotonic elapsed time larger than this is a clock step.
STEP_TOLERANCE = timedelta(seconds=1)


@dataclass(frozen=True)
class Validity:
    not_before: datetime
    not_after: datetime

    def holds_at(self, now: datetime) -> bool:
        """Usable now: peers refuse a credential past its NotAfter."""
        return now < self.not_after

    def life(self) -> timedelta:
        return self.not_after - self.not_before


@dataclass(frozen=True)
class Moment:
    """Both clocks read at once: validity is judged by `wall`, waits are measured on `mono`."""

    wall: datetime
    mono: float


@dataclass(frozen=True)
class RenewalPolicy:
    backoff: Backoff = field(default_factory=Backoff)
    #: The longest wait between retries while no valid credential is held.
    fast_retry: timedelta = timedelta(seconds=2)
    #: The longest wait between two looks at the wall clock, as a share of the life...
    recheck_share: float = 0.1
    #: ...and never longer than this, nor shorter than `recheck_min`.
    recheck_max: timedelta = timedelta(seconds=60)
    recheck_min: timedelta = timedelta(milliseconds=100)

    def __post_init__(self) -> None:
        if self.fast_retry <= timedelta(0):
            raise ValueError("fast_retry must be positive")
        if not 0 < self.recheck_share <= 1:
            raise ValueError("recheck_share must be in (0, 1]")
        if not timedelta(0) < self.recheck_min <= self.recheck_max:
            raise ValueError("recheck needs 0 < recheck_min <= recheck_max")

    @property
    def shortest(self) -> timedelta:
        """A credential with less life left on arrival is a failure: renewed no faster
        than a failed attempt is retried."""
        return self.backoff.initial

    def recheck(self, held: Validity | None) -> timedelta:
        if held is None:
            return self.recheck_max
        share = held.life() * self.recheck_share
        return min(max(share, self.recheck_min), self.recheck_max)

    def retry_delay(self, failures: int, usable: bool, draw: float) -> timedelta:
        """The wait after `failures` failures; `draw` in [0, 1) was drawn once for this failure."""
        ceiling = self.backoff.ceiling(failures)
        if not usable:
            ceiling = min(ceiling, self.fast_retry)
        return ceiling * (1 - JITTER * draw)


@dataclass(frozen=True)
class Standing:
    """What the loop knows: the credential held, when to renew it, the failures since."""

    held: Validity | None = None  # from when it arrived (NotBefore may be backdated)
    renew_at: datetime | None = None  # drawn once per credential, by `installed`
    failures: int = 0
    failed_mono: float = 0.0  # when the last failure happened, on the monotonic clock
    draw: float = 0.0  # the jitter of the last failure's delay

    def usable(self, now: datetime) -> bool:
        return self.held is not None and self.held.holds_at(now)

    def installed(
        self,
        validity: Validity,
        now: Moment,
        rng: random.Random,
        shortest: timedelta = timedelta(0),
    ) -> Standing:
        """A new credential in service. One already expired, or with less than `shortest`
        left, counts as a failure (kept while it holds), so a renewal that keeps returning
        useless answers is paced like any other failure. Otherwise an issuer that caps
        lives by its own expiry (a CA whose intermediate ends soon) would hand out ever
        shorter ones, each renewed at half its life: renewals without bound, from
        every client at once, just when the issuer is in trouble."""
        if not validity.holds_at(now.wall) or validity.not_after - now.wall < shortest:
            return dataclasses.replace(self, held=validity).failed(now, rng)
        # The life that counts is what is left from now, not from NotBefore: issuers
        # backdate NotBefore for clock skew, which would eat most of a short lifetime.
        held = Validity(max(validity.not_before, now.wall), validity.not_after)
        return Standing(held, refresh_at(held.not_before, held.not_after, now.wall, rng))

    def failed(self, now: Moment, rng: random.Random) -> Standing:
        return dataclasses.replace(
            self, failures=self.failures + 1, failed_mono=now.mono, draw=rng.random()
        )


@dataclass(frozen=True)
class Wait:
    seconds: float
    reason: str


@dataclass(frozen=True)
class Renew:
    reason: str


def plan(now: Moment, standing: Standing, policy: RenewalPolicy) -> Wait | Renew:
    """Renew now, or how long to wait before asking again (never longer than a re-check)."""
    usable = standing.usable(now.wall)
    if standing.failures:
        delay = policy.retry_delay(standing.failures, usable, standing.draw)
        left = standing.failed_mono + delay.total_seconds() - now.mono
        if left <= 0:
            return Renew("retry" if usable else "retry: nothing valid held")
        reason = "backing off" if usable else "backing off (nothing valid held)"
    elif standing.held is None:
        return Renew("no credential yet")
    elif not usable:
        return Renew("expired")
    else:
        assert standing.renew_at is not None  # set with every held credential
        left = (standing.renew_at - now.wall).total_seconds()
        if left <= 0:
            return Renew("due")
        reason = "renewal due"
    if usable:
        assert standing.held is not None
        # Wake at expiry at the latest: from then on retries are fast.
        left = min(left, (standing.held.not_after - now.wall).total_seconds())
    return Wait(min(left, policy.recheck(standing.held).total_seconds()), reason)


class Clock(Protocol):
    """The wall clock credentials expire by, the monotonic clock waits run on, and sleep."""

    def now(self) -> datetime: ...
    def monotonic(self) -> float: ...
    async def sleep(self, seconds: float) -> None: ...


class SystemClock:
    """The real clocks; `now` may be replaced (tests that shift the wall clock)."""

    def __init__(self, now: Callable[[], datetime] | None = None) -> None:
        self._now = now or (lambda: datetime.now(UTC))

    def now(self) -> datetime:
        return self._now()

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


#: Told of each failure: the error, how many in a row, and the seconds until the next try.
OnFailure = Callable[[Exception, int, float], None]


def _log_failure(name: str) -> OnFailure:
    def report(exc: Exception, failures: int, retry_in: float) -> None:
        log.warning(
            "cannot renew %s (attempt %d): %s; retrying in %.1fs", name, failures, exc, retry_in
        )

    return report


class Renewer:
    """The loop: wait as `plan` says, renew, record the outcome; forever.

    `renew` puts a new credential in service and returns its validity; an
    exception of a `retriable` type is a failure (the current credential stays),
    any other ends the loop. `renew_now()` cuts the current wait short;
    `on_expired` is told when the credential held has expired.
    """

    def __init__(
        self,
        name: str,
        renew: Callable[[], Awaitable[Validity]],
        *,
        clock: Clock,
        rng: random.Random,
        policy: RenewalPolicy | None = None,
        held: Validity | None = None,
        retriable: tuple[type[Exception], ...] = (Exception,),
        on_failure: OnFailure | None = None,
        on_expired: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._renew = renew
        self.clock = clock
        self.rng = rng
        self.policy = policy or RenewalPolicy()
        self.retriable = retriable
        self.on_failure = on_failure or _log_failure(name)
        self.on_expired = on_expired
        self._expired: Validity | None = None  # the credential on_expired was called for
        self.standing = Standing()
        if held is not None:
            self.standing = self.standing.installed(held, self.moment(), rng, self.policy.shortest)
        self._wake = asyncio.Event()

    def moment(self) -> Moment:
        return Moment(self.clock.now(), self.clock.monotonic())

    @property
    def next_attempt(self) -> datetime | None:
        """When the next renewal is asked for: the held credential's renewal time, or while
        renewals fail, the next retry's (`plan`'s backoff)."""
        standing = self.standing
        if not standing.failures:
            return standing.renew_at
        now = self.moment()
        usable = standing.usable(now.wall)
        delay = self.policy.retry_delay(standing.failures, usable, standing.draw)
        left = standing.failed_mono + delay.total_seconds() - now.mono
        at = now.wall + timedelta(seconds=max(left, 0.0))
        if usable and standing.held is not None:  # `plan` retries at expiry at the latest
            at = min(at, standing.held.not_after)
        return at

    def renew_now(self) -> None:
        self._wake.set()

    async def run(self) -> NoReturn:
        while True:
            now = self.moment()
            self._notice_expiry(now)
            step = plan(now, self.standing, self.policy)
            if isinstance(step, Wait) and not await self._pause(step.seconds):
                continue  # the wait is over: look at the clocks again
            # A renew_now() from here on asks for the renewal after this one.
            self._wake.clear()
            await self.attempt()

    async def attempt(self) -> None:
        """One renewal, its outcome recorded in `standing`."""
        try:
            validity = await self._renew()
        except self.retriable as exc:
            now = self.moment()
            self.standing = self.standing.failed(now, self.rng)
            self.on_failure(exc, self.standing.failures, self._retry_in(now))
            return
        now = self.moment()
        self.standing = self.standing.installed(validity, now, self.rng, self.policy.shortest)
        if self.standing.failures:  # the clock is off, or the issuer is near its end
            expired = ValueError(
                f"the new credential expires at {validity.not_after}, less than"
                f" {self.policy.shortest.total_seconds():g}s from now"
            )
            self.on_failure(expired, self.standing.failures, self._retry_in(now))

    def _retry_in(self, now: Moment) -> float:
        standing = self.standing
        usable = standing.usable(now.wall)
        return self.policy.retry_delay(standing.failures, usable, standing.draw).total_seconds()

    def _notice_expiry(self, now: Moment) -> None:
        """Tell `on_expired` once per credential, when the loop first sees it expired
        (the waits end at expiry, so that is at once)."""
        held = self.standing.held
        if held is None or held.holds_at(now.wall) or held is self._expired:
            return
        self._expired = held
        if self.on_expired is not None:
            self.on_expired()

    async def _pause(self, seconds: float) -> bool:
        """Sleep `seconds` on the monotonic clock, or less if renew_now(): True if it was."""
        before = self.moment()
        sleeping = asyncio.ensure_future(self.clock.sleep(max(seconds, 0.0)))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait({sleeping, woken}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            sleeping.cancel()
            woken.cancel()
        self._notice_step(before, self.moment())
        return self._wake.is_set()

    def _notice_step(self, before: Moment, after: Moment) -> None:
        drift = (after.wall - before.wall) - timedelta(seconds=after.mono - before.mono)
        if abs(drift) > STEP_TOLERANCE:
            log.warning(
                "%s: the wall clock moved %+.1fs against the monotonic clock (a suspend or"
                " a clock step); planning again by the new time",
                self.name,
                drift.total_seconds(),
            )
