"""Which endpoints of an upstream may take traffic: active checks and outlier detection.

An endpoint has two independent statuses, as Envoy keeps two health flags
(FAILED_ACTIVE_HC and FAILED_OUTLIER_CHECK) per host. `CHECK_STEPS` and
`OUTLIER_STEPS` below are their tables; in words:

    checks   passing --unhealthy_threshold check_failed in a row--> failing
             failing --healthy_threshold check_passed in a row----> passing
    outlier  in_service --consecutive_failures gateway failures in a row--> ejected
             in_service --consecutive_5xx 5xx in a row--------------------> ejected
             ejected ----its ejection time has passed------------------> in_service

A gateway failure is a connect failure, a reset or a timeout; it extends both
runs, a `server_error` (a 5xx response) extends the 5xx run and ends the
gateway-failure run, a `success` ends both. The State the rest of the agent
sees is "ejected" while ejected, else "unhealthy" while checks are failing,
else "healthy". Settings `active=None` ignore check events, `outlier=None`
ignores request results.

The leftover rules, beside the tables:

- ejection time = base_ejection * times ejected, capped at max_ejection;
  times ejected falls by one for each whole base_ejection spent un-ejected;
- an ejection is refused when it would leave more than max_ejection_percent
  of the known endpoints ejected, except that one endpoint may always be
  ejected when none is. A refused ejection still resets the run that tripped
  it, so the endpoint needs a full new run before the next attempt.

Where this follows Envoy (outlier detection with the default
split_external_local_origin_errors=false, and active health checking):
local-origin failures counting as 5xx, a success resetting the runs, a 5xx
response resetting the gateway-failure run, the runs resetting when the
ejection triggers (refused or not) and again at un-ejection, the ejection time
and its cap, the max_ejection_percent test ((ejected + 1) / known <= percent),
and the panic threshold of `usable` (healthy percent < threshold: use all).

Where it departs, and why:

- no sweep timer: an ejection ends exactly at its time, noticed by the next
  call that is given `now` (Envoy un-ejects at its next `interval` sweep, up
  to 10 s late), and there is no ejection jitter (Envoy's default is none);
- times ejected falls by one per base_ejection un-ejected, counted when the
  next ejection happens (Envoy decrements it once per sweep interval after
  the first interval un-ejected); it stops growing once base * times reaches
  max_ejection (Envoy lets it go one step past, which only slows the decay);
- one ejection is always allowed: Envoy's always_eject_one_host, which is off
  there by default; without it a small upstream (one or two endpoints at 50%
  or less) could never eject anything;
- a passing check does not end an ejection (Envoy's
  successful_active_health_check_uneject_host, on there by default): the
  default check is a TCP connect to the peer's agent, which passes while the
  application behind it is failing the requests that got it ejected;
- a new endpoint starts healthy (Envoy fails it until its first check
  passes): discovery lists only endpoints Kubernetes reports ready;
- request results that arrive while an endpoint is ejected (requests already
  in flight) are ignored; Envoy counts them and then resets the runs at
  un-ejection, which comes to the same;
- no success-rate or failure-percentage detection.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Literal, get_args

from agent.core.endpoint import Endpoint

TrafficEvent = Literal["success", "connect_failure", "reset", "timeout", "server_error"]
CheckEvent = Literal["check_passed", "check_failed"]
Event = Literal[TrafficEvent, CheckEvent]
State = Literal["healthy", "unhealthy", "ejected"]  # unhealthy: failing active checks
STATES: Final[tuple[State, ...]] = get_args(State)

CheckStatus = Literal["passing", "failing"]
OutlierStatus = Literal["in_service", "ejected"]
# Not an Event: the passing of time, fed in by the calls that are given `now`.
EjectionOver = Literal["ejection_time_passed"]

CheckRule = Literal["clear_run", "extend_run"]
OutlierRule = Literal["clear_runs", "gateway_failure", "server_error", "end_ejection"]

# fmt: off
#: (status, event) -> (rule, the status the rule may move the endpoint to).
#: "extend_run" moves once the run reaches the threshold of the status it
#: leads to: unhealthy_threshold for failing, healthy_threshold for passing.
CHECK_STEPS: Final[Mapping[tuple[CheckStatus, CheckEvent], tuple[CheckRule, CheckStatus]]] = {
    ("passing", "check_passed"): ("clear_run",  "passing"),
    ("passing", "check_failed"): ("extend_run", "failing"),
    ("failing", "check_failed"): ("clear_run",  "failing"),
    ("failing", "check_passed"): ("extend_run", "passing"),
}

#: (status, input) -> (rule, the status the rule may move the endpoint to).
#: The failure rules eject once a run reaches its threshold and the ejection
#: cap allows it. Inputs missing here are ignored: results of requests that
#: were in flight when their endpoint was ejected.
OUTLIER_STEPS: Final[
    Mapping[tuple[OutlierStatus, TrafficEvent | EjectionOver], tuple[OutlierRule, OutlierStatus]]
] = {
    ("in_service", "success"):           ("clear_runs",      "in_service"),
    ("in_service", "connect_failure"):   ("gateway_failure", "ejected"),
    ("in_service", "reset"):             ("gateway_failure", "ejected"),
    ("in_service", "timeout"):           ("gateway_failure", "ejected"),
    ("in_service", "server_error"):      ("server_error",    "ejected"),
    ("ejected", "ejection_time_passed"): ("end_ejection",    "in_service"),
}
# fmt: on


@dataclass(frozen=True)
class ActiveCheck:
    kind: Literal["tcp", "http"] = "tcp"
    path: str = "/healthz"  # http: GET over mTLS
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3

    def __post_init__(self) -> None:
        if self.kind not in ("tcp", "http"):
            raise ValueError(f"active check kind must be tcp or http, not {self.kind!r}")
        if not self.path.startswith("/"):
            raise ValueError("active check path must start with /")
        if not (self.interval > 0 and self.timeout > 0):
            raise ValueError("active check interval and timeout must be positive")
        if self.healthy_threshold < 1 or self.unhealthy_threshold < 1:
            raise ValueError("active check thresholds must be at least 1")


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_failures: int = 5  # connect failures, resets, timeouts in a row
    consecutive_5xx: int = 5  # 5xx responses in a row (gateway failures count too)
    base_ejection: float = 30.0  # ejected for base_ejection * times ejected ...
    max_ejection: float = 300.0  # ... capped here
    max_ejection_percent: int = 50  # of the upstream's endpoints (one may always be ejected)

    def __post_init__(self) -> None:
        if self.consecutive_failures < 1 or self.consecutive_5xx < 1:
            raise ValueError("outlier detection thresholds must be at least 1")
        if not 0 < self.base_ejection <= self.max_ejection:
            raise ValueError("outlier detection needs 0 < base_ejection <= max_ejection")
        if not 0 <= self.max_ejection_percent <= 100:
            raise ValueError("max_ejection_percent must be between 0 and 100")


@dataclass(frozen=True)
class HealthSettings:
    active: ActiveCheck | None = None
    outlier: OutlierDetection | None = OutlierDetection()
    panic_threshold: int = 50  # percent; 0 turns panic off

    def __post_init__(self) -> None:
        if not 0 <= self.panic_threshold <= 100:
            raise ValueError("panic_threshold must be between 0 and 100")


@dataclass(frozen=True)
class Transition:
    endpoint: Endpoint
    old: State
    new: State
    reason: str  # "consecutive_failures", "consecutive_5xx", "check_failed", ...


@dataclass
class _Health:
    """What the table knows of one endpoint."""

    checks: CheckStatus = "passing"
    check_run: int = 0  # check results in a row against the current status
    failures: int = 0  # gateway failures in a row
    errors_5xx: int = 0  # 5xx in a row, gateway failures included
    ejected_until: float | None = None
    times_ejected: int = 0
    unejected_at: float | None = None  # when the last ejection ended

    @property
    def outlier(self) -> OutlierStatus:
        return "in_service" if self.ejected_until is None else "ejected"

    @property
    def state(self) -> State:
        if self.ejected_until is not None:
            return "ejected"
        return "unhealthy" if self.checks == "failing" else "healthy"


class HealthTable:
    """The health of one upstream's endpoints, fed check results and request results."""

    def __init__(self, settings: HealthSettings) -> None:
        self.settings = settings
        self.ejections_refused = 0  # by max_ejection_percent (Envoy: ejections_overflow)
        self._endpoints: dict[Endpoint, _Health] = {}
        self._ejected: set[Endpoint] = set()
        self._ended: list[Transition] = []  # ejections that ended, until expired() hands them out
        self._available: frozenset[Endpoint] | None = None  # cache: available() is per request

    def reconfigure(self, settings: HealthSettings) -> None:
        """New settings on reload; what the table knows carries over.

        Turning active checks off clears their verdicts (nothing would ever
        pass them again); turning outlier detection off ends every ejection.
        """
        self.settings = settings
        for health in self._endpoints.values():
            if settings.active is None:
                health.checks, health.check_run = "passing", 0
            if settings.outlier is None:
                health.ejected_until = None
                health.failures = health.errors_5xx = 0
        if settings.outlier is None:
            self._ejected.clear()
        self._available = None

    def update(self, endpoints: Iterable[Endpoint]) -> None:
        """The upstream's whole membership: new endpoints start healthy, gone ones are forgotten."""
        members = set(endpoints)
        for gone in self._endpoints.keys() - members:
            del self._endpoints[gone]
            self._ejected.discard(gone)
        for new in members - self._endpoints.keys():
            self._endpoints[new] = _Health()
        self._ended = [t for t in self._ended if t.endpoint in members]
        self._available = None

    def record(self, endpoint: Endpoint, event: Event, now: float) -> Transition | None:
        """Feed one result in; the change of State it caused, if any. Unknown endpoint: None."""
        health = self._endpoints.get(endpoint)
        if health is None:
            return None
        self._end_ejections(now)
        old = health.state
        match event:
            case "check_passed" | "check_failed":
                reason = self._check(health, event)
            case _:
                reason = self._outlier(endpoint, health, event, now)
        if reason is None or health.state == old:
            return None
        self._available = None
        return Transition(endpoint, old, health.state, reason)

    def available(self, now: float) -> frozenset[Endpoint]:
        """The endpoints neither ejected nor unhealthy; ejections that are over end here."""
        self._end_ejections(now)
        if self._available is None:
            self._available = frozenset(
                endpoint
                for endpoint, health in self._endpoints.items()
                if health.state == "healthy"
            )
        return self._available

    def state(self, endpoint: Endpoint, now: float) -> State:
        """The endpoint's State; KeyError if it is not a member."""
        self._end_ejections(now)
        return self._endpoints[endpoint].state

    def counts(self, now: float) -> dict[State, int]:
        self._end_ejections(now)
        counts = dict.fromkeys(STATES, 0)
        for health in self._endpoints.values():
            counts[health.state] += 1
        return counts

    def expired(self, now: float) -> list[Transition]:
        """The ejections that ended by now, each reported once, whichever call noticed it."""
        self._end_ejections(now)
        ended, self._ended = self._ended, []
        return ended

    def _check(self, health: _Health, event: CheckEvent) -> str | None:
        active = self.settings.active
        if active is None:
            return None
        rule, target = CHECK_STEPS[health.checks, event]
        if rule == "clear_run":
            health.check_run = 0
            return None
        health.check_run += 1
        threshold = active.unhealthy_threshold if target == "failing" else active.healthy_threshold
        if health.check_run < threshold:
            return None
        health.checks, health.check_run = target, 0
        return event

    def _outlier(
        self, endpoint: Endpoint, health: _Health, event: TrafficEvent | EjectionOver, now: float
    ) -> str | None:
        outlier = self.settings.outlier
        step = OUTLIER_STEPS.get((health.outlier, event))
        if outlier is None or step is None:
            return None
        match step[0]:
            case "clear_runs":
                health.failures = health.errors_5xx = 0
                return None
            case "gateway_failure":
                health.failures += 1
                health.errors_5xx += 1
            case "server_error":  # the endpoint answered: the gateway-failure run is over
                health.failures = 0
                health.errors_5xx += 1
            case "end_ejection":
                self._end_ejection(endpoint, health)
                return "ejection_ended"
        return self._trip(endpoint, health, outlier, now)

    def _trip(
        self, endpoint: Endpoint, health: _Health, outlier: OutlierDetection, now: float
    ) -> str | None:
        """Eject once a run reaches its threshold and the cap allows; the run resets either way."""
        tripped = []
        if health.failures >= outlier.consecutive_failures:
            tripped.append("consecutive_failures")
            health.failures = 0
        if health.errors_5xx >= outlier.consecutive_5xx:
            tripped.append("consecutive_5xx")
            health.errors_5xx = 0
        if not tripped:
            return None
        if not self._may_eject(outlier):
            self.ejections_refused += 1
            return None
        self._eject(endpoint, health, outlier, now)
        return tripped[0]

    def _may_eject(self, outlier: OutlierDetection) -> bool:
        ejected = len(self._ejected)
        known = len(self._endpoints)
        return ejected == 0 or (ejected + 1) * 100 <= outlier.max_ejection_percent * known

    def _eject(
        self, endpoint: Endpoint, health: _Health, outlier: OutlierDetection, now: float
    ) -> None:
        base = outlier.base_ejection
        if health.unejected_at is not None:
            rested = int((now - health.unejected_at) // base)
            health.times_ejected = max(0, health.times_ejected - rested)
        most = math.ceil(outlier.max_ejection / base)
        health.times_ejected = min(health.times_ejected + 1, most)
        health.ejected_until = now + min(base * health.times_ejected, outlier.max_ejection)
        health.unejected_at = None
        health.failures = health.errors_5xx = 0
        self._ejected.add(endpoint)

    def _end_ejection(self, endpoint: Endpoint, health: _Health) -> None:
        health.unejected_at, health.ejected_until = health.ejected_until, None
        health.failures = health.errors_5xx = 0
        self._ejected.discard(endpoint)
        self._ended.append(Transition(endpoint, "ejected", health.state, "ejection_ended"))
        self._available = None

    def _end_ejections(self, now: float) -> None:
        if not self._ejected:  # the usual case, on every request: no list to copy
            return
        for endpoint in list(self._ejected):
            health = self._endpoints[endpoint]
            if health.ejected_until is not None and health.ejected_until <= now:
                self._outlier(endpoint, health, "ejection_time_passed", now)


def usable(
    members: Collection[Endpoint], available: Collection[Endpoint], panic_threshold: int
) -> tuple[frozenset[Endpoint], bool]:
    """Members that are available, or all members (panic=True) when fewer than
    panic_threshold percent of them are: then sending to a failing endpoint is
    better than overloading the few left (Envoy's panic threshold). 0 turns it off."""
    healthy = frozenset(members).intersection(available)  # no copy of a frozenset
    if len(healthy) * 100 < panic_threshold * len(members):
        return frozenset(members), True
    return healthy, False
