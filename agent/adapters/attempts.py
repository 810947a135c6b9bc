"""The attempts loop: one request (or TCP connection) tried on endpoints until one delivers.

Every outbound protocol (TCP in agent/adapters/listeners.py, HTTP/1.1 in
agent/adapters/outbound_http.py, HTTP/2 and gRPC) runs its tries through
`attempts`, so that balancing, outlier detection records, endpoint load,
the retry budget and the retry decision (agent/core/tries.py) are done one
way. What a protocol brings is `run`: one try on the endpoint it is given,
from getting a connection (or stream) to the response head.

A `Try` owns, until it ends, what one attempt holds: its connection (or
stream: anything with `abort()`), its response parser's state, its place in
its endpoint's load, and the retry-budget slot it runs on (a retry holds
one, taken when the try before it was decided; the first try none). It
ends exactly once, whichever comes first of its decision to retry or
answer, the end of the response it delivered, or a cancellation (the app
left, the request timed out, a drain): `end()` again does nothing, so a
slot goes back exactly once, to the budget it came from even after a reload
replaced the upstream's.

A try whose request went out on a reused pooled connection that was lost
with nothing heard back (`decide(..., stale=True)`) is redialled
(agent/core/tries.py `Redial`): the next try is `fresh` (its `run` must dial
a new connection, not take a pooled one), goes to an endpoint not tried yet
if one is left, else to the same one, keeps the slot the stale try ran on
(if it was a retry) and takes none; nothing is recorded for the stale try.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Generic, Protocol, TypeVar

from agent.adapters.upstreams import LiveUpstream
from agent.core.accesslog import Tls
from agent.core.resilience import CircuitBreaker, RetryBudget
from agent.core.tries import (
    UNAVAILABLE,
    Answer,
    Deliver,
    Outcome,
    Redial,
    Retry,
    Step,
    event_of,
    next_step,
    status_event,
)
from agent.core.upstream import Endpoint


class Droppable(Protocol):
    """What a try holds upstream: a connection, or a stream of a shared one."""

    def abort(self) -> None:
        """Drop it mid-exchange: its state is unknown, so it carries nothing else."""


C = TypeVar("C", bound=Droppable)
P = TypeVar("P")
Proto = TypeVar("Proto", bound=asyncio.BaseProtocol)


class LocalAnswer(Exception):
    """The agent answers the request itself: no endpoint could, or a limit was reached."""

    def __init__(self, status: int, error: str, grpc_status: int = UNAVAILABLE) -> None:
        super().__init__(status, error)
        self.status, self.error, self.grpc_status = status, error, grpc_status


def overflow(live: LiveUpstream, reason: str) -> tuple[int, str]:
    """The circuit breaker's `reason` limit is reached: counted, and answered by the agent."""
    live.counted.overflow(reason)
    return 503, f"overflow_{reason}"


async def dial_within_limit(
    live: LiveUpstream, endpoint: Endpoint, factory: Callable[[Callable[[], None]], Proto]
) -> tuple[Proto, Tls | None]:
    """A new connection to `endpoint` under the circuit breaker's max_connections, and its
    peer and TLS for access log lines (None when they are off: `LiveUpstream.dial`).

    `factory(release)` builds the connection's protocol: its loss calls `release`,
    which gives the slot back once however often it is called; a dial that fails
    (DialError), is cancelled (the app left, the request's deadline) or raises anything
    else (a bug must not hold the slot for good) gives it back here.
    """
    breaker = live.breaker
    if not breaker.acquire("max_connections"):
        raise LocalAnswer(*overflow(live, "max_connections"))
    slot = _Slot(breaker)
    try:
        # No closures: compiled, a closure and its environment refer to each other, a
        # cycle the connection would hold (through `release`) until the collector ran.
        _, connection, tls = await live.dial(endpoint, partial(factory, slot.release))
    except BaseException:
        slot.release()
        raise
    return connection, tls


class _Slot:
    """A connection's place under the circuit breaker's max_connections."""

    __slots__ = ("breaker", "released")

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker
        self.released = False

    def release(self) -> None:
        """Give the place back, once however often it is called."""
        if not self.released:
            self.released = True
            self.breaker.release("max_connections")


class Try(Generic[C, P]):
    """One attempt on one endpoint; see the module's docstring for what it owns."""

    # One made per request: no instance dict.
    __slots__ = (
        "_decided",
        "_grant",
        "_grpc",
        "_load",
        "_method",
        "_per_try",
        "_replayable",
        "_slot",
        "_tried",
        "connection",
        "ended",
        "endpoint",
        "fresh",
        "live",
        "number",
        "outcome",
        "parser",
        "redialled",
        "step",
        "timer",
    )

    def __init__(
        self,
        live: LiveUpstream,
        endpoint: Endpoint,
        tried: list[Endpoint],
        slot: RetryBudget | None,
        *,
        method: str | None,
        grpc: bool,
        replayable: Callable[[], bool],
        per_try: float | None = None,
        redialled: bool = False,
    ) -> None:
        self.live = live
        self.endpoint = endpoint
        # The policy's count, 1 for the first try: a redial is not one of them.
        self.number = len(tried) - redialled
        self.redialled = redialled  # this request was redialled (this try, or one before)
        self.fresh = False  # this try is the redial: `run` dials a new connection for it
        self.connection: C | None = None  # the protocol's, set by `run`
        self.parser: P | None = None  # the protocol's response state, set by `run`
        self.step: Step | None = None  # once decided
        self.outcome: Outcome | None = None
        self.ended = False
        self._tried = tried
        self._method, self._grpc, self._replayable = method, grpc, replayable
        self._slot = slot  # the budget this try's retry slot came from
        self._grant: RetryBudget | None = None  # the slot taken for the next try (Retry)
        self._decided: asyncio.Future[None] | None = None
        self._per_try = per_try
        self.timer: asyncio.Timeout | None = None  # the loop's per-try timer, started by sent()
        self._load = live.core.load  # a reload carries the dict over: this one is counted in
        self._load[endpoint] = self._load.get(endpoint, 0) + 1

    def decide(
        self, outcome: Outcome, *, replayable: bool | None = None, stale: bool = False
    ) -> Step:
        """What follows `outcome` (agent/core/tries.py); decided once, later calls return it.

        Call it the moment the outcome is known, before anything of the
        response reaches the app (a response head's status decides whether
        it is delivered). A Retry takes its budget slot here, for the next
        try; a retry due that the budget refuses is counted as an overflow.
        `replayable` overrides the request's own (False: a response that
        came before the whole request was sent is not retried). `stale`: the
        connection was reused from the pool and lost with nothing heard back
        on it (a Redial then takes no slot and records nothing).
        """
        if self.step is not None:
            return self.step  # e.g. a per-try timeout that lost the race to the head
        live = self.live
        budget = live.budget
        step = next_step(
            live.config.retries,
            method=self._method,
            grpc=self._grpc,
            outcome=outcome,
            tries=self.number,
            replayable=self._replayable() if replayable is None else replayable,
            untried=lambda: live.core.untried(self._tried, _now()),
            budget_room=budget.room,
            stale=stale,
            redialled=self.redialled,
        )
        self.step, self.outcome = step, outcome
        if isinstance(step, Redial):  # the same try, again: it carries this one's slot on
            self._grant, self._slot = self._slot, None
        elif isinstance(step, Retry):
            granted = budget.try_retry()
            assert granted, "budget.room() said there was room"
            self._grant = budget
            live.counted.retries.inc()
        elif step.over_budget:
            live.counted.overflow("retry_budget")
        if not isinstance(step, Deliver | Redial):
            live.record(self.endpoint, event_of(outcome))
        if self._decided is not None and not self._decided.done():
            self._decided.set_result(None)
        return step

    async def decided(self) -> None:
        """Wait until `decide` has been called (by a callback of the protocol's)."""
        if self.step is None:
            self._decided = asyncio.get_running_loop().create_future()
            await self._decided

    def sent(self) -> None:
        """The request went out (on a connection or stream had): the per-try timeout runs
        from now, so that a dial's time is the connect timeout's, not the try's."""
        if self.timer is not None and self._per_try is not None:
            self.timer.reschedule(asyncio.get_running_loop().time() + self._per_try)

    def release(self) -> C | None:
        """Take the connection back from this try, whole (to pool it): `end` will not drop it."""
        connection, self.connection = self.connection, None
        return connection

    def end(self, status: int | None = None, grpc_status: int | None = None) -> None:
        """End this try, once: give back its slot and its load, drop a connection it holds.

        A delivered try is recorded for outlier detection here, by the
        status the app got (`status`; None: as decided, e.g. a TCP
        connection linked); a try that ended undecided (cancelled) is not.
        """
        if self.ended:
            return
        self.ended = True
        self._load[self.endpoint] -= 1
        slot, grant = self._slot, self._grant
        if slot is not None or grant is not None:
            self._slot = self._grant = None
            for taken in (slot, grant):
                if taken is not None:
                    taken.retry_finished()
        connection = self.connection
        if connection is not None:
            self.connection = None
            connection.abort()
        if self.outcome is not None and isinstance(self.step, Deliver):
            event = event_of(self.outcome) if status is None else status_event(status, grpc_status)
            self.live.record(self.endpoint, event)

    def hand_over(self) -> RetryBudget | None:
        """The slot this try took for the next one, or (redialled) its own: the loop moves
        it there."""
        grant, self._grant = self._grant, None
        return grant


def _always() -> bool:
    return True


class Attempts(Generic[C, P]):
    """The attempts loop's state for one request (or TCP connection): the subset it was
    given, the endpoints tried, the slot taken for the next try, a redial pending.

    `run` is the loop (what `attempts` runs). A protocol that can make a try without
    waiting (HTTP/1.1 on an idle pooled connection) takes its first one itself, with
    `next_try` and then `decided` from the callback that decides it, and hands the loop
    on to `run` only when it must wait: a dial, a retry, a timer. The state is the same
    either way, so the tries are the same. `close` ends what is left (a try in progress,
    a slot taken); called again it does nothing.
    """

    __slots__ = (
        "_loop",
        "_redialled",
        "_stale",
        "current",
        "grpc",
        "key",
        "live",
        "method",
        "per_try",
        "replayable",
        "rng",
        "slot",
        "subset",
        "tried",
    )

    def __init__(
        self,
        live: LiveUpstream,
        rng: random.Random,
        *,
        method: str | None,
        grpc: bool = False,
        key: bytes | None = None,
        replayable: Callable[[], bool] = _always,
        per_try: float | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        subset = live.core.subset(rng)
        if subset is None:
            raise LocalAnswer(503, "no_endpoints")
        self.live, self.rng, self.subset = live, rng, subset
        self.method, self.grpc, self.key = method, grpc, key
        self.replayable, self.per_try = replayable, per_try
        self._loop = loop
        self.tried: list[Endpoint] = []
        self.slot: RetryBudget | None = None  # taken by the last try's Retry, for the next one
        self.current: Try[C, P] | None = None  # the try in progress
        self._stale: Endpoint | None = None  # the endpoint of the try just redialled
        self._redialled = False

    def next_try(self) -> Try[C, P]:
        """The next try: on an endpoint not tried yet (a redial: the same one if none is
        left), carrying the slot the last one took; LocalAnswer when there is none."""
        live = self.live
        loop = self._loop or asyncio.get_running_loop()
        endpoint = live.core.choose(self.subset, self.tried, loop.time(), self.rng, self.key)
        if endpoint is None:  # a redial with no other endpoint left goes to the same one
            endpoint = self._stale
        if endpoint is None:
            raise LocalAnswer(503, "no_healthy_endpoint" if not self.tried else "no_endpoint_left")
        self.tried.append(endpoint)
        current = self.current = Try(
            live,
            endpoint,
            self.tried,
            self.slot,
            method=self.method,
            grpc=self.grpc,
            replayable=self.replayable,
            per_try=self.per_try,
            redialled=self._redialled,
        )
        current.fresh, self._stale = self._stale is not None, None
        self.slot = None
        return current

    def decided(self, step: Step) -> Try[C, P] | None:
        """The try in progress was decided `step`: Deliver returns it, still running (the
        caller ends it); else it ends here, its slot (if it took one) kept for the next
        try, and None says to go on, or LocalAnswer says what the agent answers."""
        current = self.current
        assert current is not None, "decided() without a try in progress"
        self.current = None
        if isinstance(step, Deliver):
            return current
        self.slot = current.hand_over()
        current.end()
        if isinstance(step, Redial):
            self._stale, self._redialled = current.endpoint, True
        if isinstance(step, Answer):
            raise LocalAnswer(step.status, step.error, step.grpc_status)
        return None

    async def run(
        self, run: Callable[[Try[C, P]], Awaitable[Outcome | None]], first: Try[C, P] | None = None
    ) -> Try[C, P]:
        """Try until one delivers (see `attempts`), starting with `first` when the caller
        made it (`next_try`) without running it."""
        try:
            current = first
            while True:
                if current is None:
                    current = self.next_try()
                per_try = self.per_try
                if per_try is None:  # the usual case: no timer to arm
                    outcome = await run(current)
                else:
                    try:
                        async with asyncio.timeout(None) as timer:  # armed by current.sent()
                            current.timer = timer
                            outcome = await run(current)
                    except TimeoutError:  # the per-try one only: the request's ends as a cancel
                        outcome = "timeout"
                    current.timer = None
                step = current.step if outcome is None else current.decide(outcome)
                assert step is not None, "run returned None without deciding its try"
                delivered = self.decided(step)
                if delivered is not None:
                    return delivered
                current = None
        finally:
            self.close()

    def close(self) -> None:
        """End the try in progress (its connection dropped) and give back a slot taken."""
        current, self.current = self.current, None
        if current is not None:
            current.end()
        slot, self.slot = self.slot, None
        if slot is not None:
            slot.retry_finished()


async def attempts(
    live: LiveUpstream,
    run: Callable[[Try[C, P]], Awaitable[Outcome | None]],
    rng: random.Random,
    *,
    method: str | None,
    grpc: bool = False,
    key: bytes | None = None,
    replayable: Callable[[], bool] = _always,
    per_try: float | None = None,
) -> Try[C, P]:
    """Try endpoints of `live` until one delivers; that try, still running, is returned.

    `run(try_)` makes one try on `try_.endpoint`: it returns the outcome,
    or None once it has called `try_.decide` itself (from a callback, as a
    response head arrives: await `try_.decided()`; with no per-try timeout it
    may wait longer, e.g. for a delivered response's end, as nothing runs
    between the decision and the loop's return). A try not decided
    within `per_try` seconds (None: no limit) of `try_.sent()`, which run
    calls as the request goes out, fails "timeout" (the dial before has a
    timeout of its own: Envoy's per_try_timeout counts the same). The returned
    try's step is Deliver: the caller ends it (`end(status)`) when the
    response is over, or the connection linked. Raises LocalAnswer
    when the agent must answer instead: no endpoint, or the last try's
    failure. Cancelled, the try in progress ends (its connection dropped).

    `method` is the request's (None for TCP), `grpc` whether it is a gRPC
    call, `key` what a consistent-hash balancer hashes, `replayable()`
    whether the request can still be sent again.
    """
    tries: Attempts[C, P] = Attempts(
        live, rng, method=method, grpc=grpc, key=key, replayable=replayable, per_try=per_try
    )
    return await tries.run(run)


def _now() -> float:
    return asyncio.get_running_loop().time()
