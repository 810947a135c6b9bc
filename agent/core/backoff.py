"""How long to wait before asking the CA again after a failure.

Exponential with a cap, and jittered downwards so a fleet of agents that lost
the CA at the same moment does not come back at the same moment. The RNG is
an argument (linkerd's exp-backoff, SPIRE's backoff package).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta

#: Each delay is drawn from [(1 - JITTER) * d, d].
JITTER = 0.5


@dataclass(frozen=True)
class Backoff:
    initial: timedelta = timedelta(seconds=1)
    maximum: timedelta = timedelta(seconds=30)
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not timedelta(0) < self.initial <= self.maximum:
            raise ValueError("backoff needs 0 < initial <= maximum")
        if self.multiplier < 1:
            raise ValueError("backoff multiplier must be at least 1")

    def delay(self, failures: int, rng: random.Random) -> timedelta:
        """The wait after `failures` consecutive failures (1 for the first)."""
        if failures < 1:
            raise ValueError("delay is for after a failure: failures >= 1")
        # Cap the exponent before raising to it, so a long outage cannot overflow.
        steps = min(failures - 1, 64)
        ceiling = min(self.initial * self.multiplier**steps, self.maximum)
        return ceiling * rng.uniform(1 - JITTER, 1)
