"""Retry policy, the retry budget and the circuit breaker of an upstream.

`RetryPolicy` is what an outbound's `retries` config says: how many tries
after the first, on which failures, HTTP statuses and gRPC statuses, and
whether non-idempotent requests are replayed too. Whether a given try is
retried is decided in one place, agent/core/tries.py.

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

from agent.core.grpc import Code

_CODES: Final = frozenset(Code)
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: How a try can fail before anything reached the app. refused-stream: RST_STREAM
#: REFUSED_STREAM, or a stream above a GOAWAY's last id (HTTP/2): like a connect failure,
#: nothing was processed.
Failure = Literal["connect-failure", "refused-stream", "reset", "timeout"]
FAILURES: Final[tuple[Failure, ...]] = get_args(Failure)


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 2  # tries after the first
    on: frozenset[str] = frozenset({"connect-failure", "refused-stream", "reset"})  # Failures
    statuses: frozenset[int] = frozenset({503})  # response codes that retry
    non_idempotent: bool = False  # also retry POST/PATCH/... (reset, timeout, status)
    budget_percent: float = 20.0  # retries in flight <= this % of requests in flight ...
    min_retry_concurrency: int = 3  # ... or this many, whichever is more
    grpc_statuses: frozenset[int] = frozenset({Code.UNAVAILABLE})  # gRPC statuses that retry

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError("retries must be at least 0")
        if unknown := self.on - set(FAILURES):
            raise ValueError(f"unknown retry_on failure(s): {', '.join(sorted(unknown))}")
        if not all(100 <= status <= 599 for status in self.statuses):
            raise ValueError("retry statuses must be HTTP status codes (100-599)")
        if not all(status in _CODES for status in self.grpc_statuses):
            raise ValueError("retry gRPC statuses must be gRPC status codes (0-16)")
        if self.budget_percent < 0 or self.min_retry_concurrency < 0:
            raise ValueError("the retry budget's percent and min concurrency must be at least 0")


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

    def room(self) -> bool:
        """Whether a retry could take a slot now (try_retry takes it)."""
        return self.retries < self.limit()

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
