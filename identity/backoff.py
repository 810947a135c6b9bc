"""How long to wait before trying again after a failure (the CA, Vault, a watch).

Exponential with a cap, and jittered downwards so a fleet of agents that lost
the CA at the same moment does not come back at the same moment. The RNG is
an argument (linkerd's exp-backoff, SPIRE's backoff package).
"""

from __future__ import annotations

import math
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
        return self.ceiling(failures) * rng.uniform(1 - JITTER, 1)

    def ceiling(self, failures: int) -> timedelta:
        """The longest wait after `failures` consecutive failures, before jitter."""
        steps = max(failures - 1, 0)
        if self.multiplier == 1:
            return self.initial
        # Stop multiplying once past the cap: a timedelta overflows after a few
        # dozen doublings, and an outage can last longer than that.
        to_cap = math.ceil(math.log(self.maximum / self.initial, self.multiplier))
        return min(self.initial * self.multiplier ** min(steps, to_cap), self.maximum)
