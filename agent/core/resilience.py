"""Retries, the retry budget and the circuit breaker of an upstream: when to try again, when not to.

`should_retry` decides whether a failed try may be repeated: within the
policy's count, for the failures and status codes it names, and only for a
request that can be replayed. A connect failure retries any method, since
nothing reached the server; after a reset, a timeout or a response, only an
idempotent method (RFC 9110 9.2.2) is replayed unless the policy says
`non_idempotent`. TCP mode (method None) counts as idempotent: whether a
connection can be replayed at all is the caller's to know.

`RetryBudget` is Envoy's retry budget: retries in flight may be at most
budget_percent of the requests in flight, or min_retry_concurrency, whichever
is more, so that retries cannot multiply load on an upstream that is already
failing (a retry storm), while a quiet upstream can still retry.

`CircuitBreaker` is Envoy's circuit breaking, not the Hystrix-style state
machine: there is no open / half-open / closed timer, so no table of states.
Each resource (connections, pending requests, requests) is counted against
its limit; a request that would go over fails fast (the caller answers 503 and
counts the overflow), and the breaker closes by itself as soon as something
is released. `open()` names the limits that are at capacity right now.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal, get_args

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
Failure = Literal["connect-failure", "reset", "timeout"]
FAILURES: Final[tuple[Failure, ...]] = get_args(Failure)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2  # tries after the first
    on: frozenset[str] = frozenset({"connect-failure", "reset"})  # subset of Failure names
    statuses: frozenset[int] = frozenset({503})  # response codes that retry
    non_idempotent: bool = False  # also retry POST/PATCH/... (reset, timeout, status)
    budget_percent: float = 20.0  # retries in flight <= this % of requests in flight ...
    min_retry_concurrency: int = 3  # ... or this many, whichever is more

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must be at least 0")
        if unknown := self.on - set(FAILURES):
            raise ValueError(f"unknown retry_on failure(s): {', '.join(sorted(unknown))}")
        if not all(100 <= status <= 599 for status in self.statuses):
            raise ValueError("retry statuses must be HTTP status codes (100-599)")
        if self.budget_percent < 0 or self.min_retry_concurrency < 0:
            raise ValueError("the retry budget's percent and min concurrency must be at least 0")


def should_retry(
    policy: RetryPolicy, method: str | None, failure: Failure | int, tries: int
) -> bool:
    """Whether to try again after `tries` attempts (1 after the first) ended in `failure`.

    `failure` is a Failure name or the response's status code. `method` is the
    request's, case-sensitive as HTTP methods are; None in TCP mode.
    """
    if tries < 1:
        raise ValueError("should_retry is for after a try: tries >= 1")
    if tries > policy.retries:
        return False
    if failure == "connect-failure":
        return failure in policy.on
    replayable = policy.non_idempotent or method is None or method in IDEMPOTENT
    if isinstance(failure, int):
        return replayable and failure in policy.statuses
    return replayable and failure in policy.on


class RetryBudget:
    """Counts requests and retries in flight; grants a retry while the budget allows."""

    def __init__(self, percent: float, min_concurrency: int) -> None:
        if percent < 0 or min_concurrency < 0:
            raise ValueError("a retry budget needs percent >= 0 and min_concurrency >= 0")
        self.percent = percent
        self.min_concurrency = min_concurrency
        self.requests = 0  # in flight, retries not included
        self.retries = 0  # in flight

    def limit(self) -> int:
        """How many retries may be in flight now."""
        return max(math.floor(self.percent * self.requests / 100), self.min_concurrency)

    def request_started(self) -> None:
        self.requests += 1

    def request_finished(self) -> None:
        if self.requests == 0:
            raise RuntimeError("request_finished without request_started")
        self.requests -= 1

    def try_retry(self) -> bool:
        """Take a retry slot if the budget allows (then call retry_finished when it ends)."""
        if self.retries >= self.limit():
            return False
        self.retries += 1
        return True

    def retry_finished(self) -> None:
        if self.retries == 0:
            raise RuntimeError("retry_finished without a granted try_retry")
        self.retries -= 1


@dataclass(frozen=True)
class BreakerLimits:
    max_connections: int = 1024  # open connections to the upstream's endpoints
    max_pending: int = 1024  # requests waiting for a connection
    max_requests: int = 1024  # requests in flight

    def __post_init__(self) -> None:
        if min(self.max_connections, self.max_pending, self.max_requests) < 0:
            raise ValueError("circuit breaker limits must be at least 0")


Overflow = Literal["max_connections", "max_pending", "max_requests"]
OVERFLOWS: Final[tuple[Overflow, ...]] = get_args(Overflow)


class CircuitBreaker:
    """Counts each resource against its limit in BreakerLimits; over the limit fails fast."""

    def __init__(self, limits: BreakerLimits) -> None:
        self.limits = limits
        self._limit: dict[Overflow, int] = {
            "max_connections": limits.max_connections,
            "max_pending": limits.max_pending,
            "max_requests": limits.max_requests,
        }
        self._in_use: dict[Overflow, int] = dict.fromkeys(OVERFLOWS, 0)

    def acquire(self, kind: Overflow) -> bool:
        """Take one of `kind`; False when at the limit (the caller fails fast and counts it)."""
        if self._in_use[kind] >= self._limit[kind]:
            return False
        self._in_use[kind] += 1
        return True

    def release(self, kind: Overflow) -> None:
        if self._in_use[kind] == 0:
            raise RuntimeError(f"release({kind!r}) without a matching acquire")
        self._in_use[kind] -= 1

    def in_use(self, kind: Overflow) -> int:
        return self._in_use[kind]

    def open(self) -> frozenset[Overflow]:
        """The limits at capacity now ("tripped": the next acquire of that kind fails)."""
        return frozenset(k for k in OVERFLOWS if self._in_use[k] >= self._limit[k])
