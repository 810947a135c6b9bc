"""What to do after a try ends: retry it elsewhere, answer the app ourselves, or deliver.

The one home of the retry decision for every outbound protocol (TCP,
HTTP/1.1, HTTP/2 and gRPC); agent/adapters/attempts.py is its I/O shell.
A try ends in one of:

- a Failure, before anything reached the app: the connect failed, the
  stream was refused (RST_STREAM REFUSED_STREAM, or a stream above a
  GOAWAY's last id), the connection or stream was reset before the
  response head, or the per-try timeout passed;
- a Response head (an HTTP status; for a trailers-only gRPC response, its
  grpc-status too), not yet passed on;
- "delivered": something already reached the app (a TCP connection linked).

A connect failure or a refused stream retries any method: nothing was
processed. After a reset, a timeout or a response, only an idempotent
method (RFC 9110 9.2.2) is replayed unless the policy says
`non_idempotent`; TCP (method None) counts as idempotent, whether a
connection can be replayed at all being the caller's to know. A gRPC status
in `grpc_statuses` retries any gRPC call (all are POST): the server said
it did not process it (UNAVAILABLE), or the policy asks for it. Every retry
also needs a request that can still be replayed (its body held), an
endpoint not tried yet, and room in the retry budget.

A failure that is not retried is answered by the agent (502/503/504, or
the gRPC code a gRPC client understands); a response that is not retried
is delivered as it is.

A stale connection is not the endpoint's failure: a request sent on a
REUSED pooled connection that was lost before anything of its response came
back (a reset, or an h2 stream refused as its connection went away) was
most likely sent into a connection the server had already closed (an idle
timeout, or a server that just died). It is redialled: sent again once, on
a NEW connection, without a retry-budget slot, without an outlier record
and without counting as one of the policy's tries (Go's net/http
`shouldRetryRequest`, what browsers do). The same idempotency rule applies
as to a retry after a reset (a refused stream: any method); a request that
fails it (a POST without `non_idempotent`) gets what a reset gets. An
endpoint that is really gone is still ejected: the dials to it fail as
connect failures, and those are recorded and retried as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

from agent.core.grpc import Code
from agent.core.health import TrafficEvent
from agent.core.resilience import IDEMPOTENT, Failure, RetryPolicy

UNAVAILABLE: Final = Code.UNAVAILABLE
DEADLINE_EXCEEDED: Final = Code.DEADLINE_EXCEEDED

#: The agent's own answer to a failure no retry recovers: (HTTP status, error, gRPC code).
_FAILURE_ANSWER: Final[dict[Failure, tuple[int, str, int]]] = {
    "connect-failure": (503, "upstream_connect_failure", UNAVAILABLE),
    "refused-stream": (503, "upstream_refused_stream", UNAVAILABLE),
    "reset": (502, "upstream_reset", UNAVAILABLE),
    "timeout": (504, "upstream_timeout", DEADLINE_EXCEEDED),
}
_FAILURE_EVENT: Final[dict[Failure, TrafficEvent]] = {
    "connect-failure": "connect_failure",
    "refused-stream": "reset",  # the server turned it away: at capacity, or going away
    "reset": "reset",
    "timeout": "timeout",
}
#: Failures after which nothing was processed upstream: any method may be replayed.
_UNPROCESSED: Final = frozenset({"connect-failure", "refused-stream"})
#: Failures that, on a reused connection with nothing heard back, say it was stale.
_STALE: Final = frozenset({"reset", "refused-stream"})
#: gRPC codes that say the server failed (as 5xx do), for outlier detection.
_GRPC_SERVER_ERRORS: Final = frozenset(
    {Code.UNKNOWN, Code.INTERNAL, Code.UNAVAILABLE, Code.DATA_LOSS}
)

Delivered = Literal["delivered"]
DELIVERED: Final[Delivered] = "delivered"


@dataclass(frozen=True)
class Response:
    """A response head that has not reached the app yet."""

    status: int  # its HTTP status
    grpc_status: int | None = None  # a trailers-only gRPC response's grpc-status

    def __init__(self, status: int, grpc_status: int | None = None) -> None:
        # Written out: compiled, native code (the dataclass's own stays interpreted), and
        # one is made per request.
        object.__setattr__(self, "status", status)
        object.__setattr__(self, "grpc_status", grpc_status)


Outcome = Failure | Response | Delivered


@dataclass(frozen=True)
class Retry:
    """Try again on another endpoint (a slot of the retry budget is the caller's to take)."""


@dataclass(frozen=True)
class Redial:
    """Send the request again on a NEW connection: the pooled one it went out on was closed
    under it. Not a retry: no budget slot, no outlier record, not one of the policy's
    tries; once per request (to an endpoint not tried yet if one is left, else the same)."""


@dataclass(frozen=True)
class Answer:
    """The agent answers the app itself: the failure is what it gets."""

    status: int  # for an HTTP client
    error: str  # the JSON body's `error`
    grpc_status: int  # for a gRPC call: a trailers-only response with this grpc-status
    over_budget: bool = False  # a retry was due but the budget had no room (count it)


@dataclass(frozen=True)
class Deliver:
    """Pass the response on (or keep the connection): this try is the one."""

    over_budget: bool = False  # a retry was due but the budget had no room (count it)


Step = Retry | Redial | Answer | Deliver
_DELIVER: Final = Deliver()  # the usual step, made once


def next_step(
    policy: RetryPolicy,
    *,
    method: str | None,
    grpc: bool,
    outcome: Outcome,
    tries: int,
    replayable: bool,
    untried: Callable[[], bool],
    budget_room: Callable[[], bool],
    stale: bool = False,
    redialled: bool = False,
) -> Step:
    """What follows a try that ended in `outcome`.

    `method` is the request's (case-sensitive, as HTTP methods are), None
    for TCP; `grpc` whether it is a gRPC call; `tries` the tries made so far
    (1 after the first); `replayable` whether the request can be sent again
    (its body still held); `untried()` whether an endpoint not tried yet is
    left; `budget_room()` whether the retry budget has a slot free now. Those
    two are asked only when a retry is otherwise due: each is a look-up that
    the usual response (a 200) does without. `stale`: the try went out on a
    reused pooled connection and nothing of its response came back before it
    was lost; `redialled`: this request was redialled once already.
    """
    if tries < 1:
        raise ValueError("next_step is for after a try: tries >= 1")
    if outcome == DELIVERED:
        return _DELIVER
    if _redials(policy, method, outcome, stale and not redialled and replayable):
        return Redial()
    fallback: Answer | Deliver = (
        _DELIVER if isinstance(outcome, Response) else Answer(*_FAILURE_ANSWER[outcome])
    )
    if not (_retries(policy, method, grpc, outcome) and tries <= policy.retries):
        return fallback
    if not (replayable and untried()):
        return fallback  # nowhere else to go, or nothing to send again: no retry, none counted
    if not budget_room():
        if isinstance(fallback, Answer):
            return Answer(fallback.status, fallback.error, fallback.grpc_status, over_budget=True)
        return Deliver(over_budget=True)
    return Retry()


def _retries(policy: RetryPolicy, method: str | None, grpc: bool, outcome: Outcome) -> bool:
    """Whether the policy retries this outcome for this method (count, budget aside)."""
    if isinstance(outcome, Response):
        if grpc and outcome.grpc_status is not None:
            return outcome.grpc_status in policy.grpc_statuses
        return _replays(policy, method) and outcome.status in policy.statuses
    if outcome in _UNPROCESSED:
        return outcome in policy.on
    return _replays(policy, method) and outcome in policy.on


def _redials(policy: RetryPolicy, method: str | None, outcome: Outcome, stale: bool) -> bool:
    """Whether a try lost on a stale connection is sent again on a new one (the retry
    policy's count, failures and budget aside: it was not the endpoint's failure)."""
    if not stale or outcome not in _STALE:
        return False
    return outcome in _UNPROCESSED or _replays(policy, method)


def _replays(policy: RetryPolicy, method: str | None) -> bool:
    """Whether a request that may have been processed is sent again."""
    return policy.non_idempotent or method is None or method in IDEMPOTENT


def event_of(outcome: Outcome) -> TrafficEvent:
    """What a try's outcome tells outlier detection about its endpoint."""
    if outcome == DELIVERED:
        return "success"
    if isinstance(outcome, Response):
        return status_event(outcome.status, outcome.grpc_status)
    return _FAILURE_EVENT[outcome]


def status_event(status: int, grpc_status: int | None = None) -> TrafficEvent:
    """What a response's status (and gRPC status) says about its endpoint."""
    if status >= 500 or grpc_status in _GRPC_SERVER_ERRORS:
        return "server_error"
    return "success"
