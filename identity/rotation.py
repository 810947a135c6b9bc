"""When to renew an SVID.

Renewing at half the lifetime leaves the other half to ride out a CA outage,
and the jitter spreads renewals of SVIDs issued at the same moment (a
rollout, a node restart) so they do not all reach the CA at once. Time and
randomness are arguments, so callers and tests decide both.
"""

from __future__ import annotations

import random
from datetime import datetime

__all__ = ["JITTER", "refresh_at"]

#: Fraction of half the lifetime by which the refresh point is moved, either way.
JITTER = 0.1


def refresh_at(
    not_before: datetime, not_after: datetime, now: datetime, rng: random.Random
) -> datetime:
    """The moment to start renewing an SVID valid from ``not_before`` to ``not_after``.

    Contract, with ``L = not_after - not_before``:

    * The planned point is ``not_before + L/2 * f`` with ``f`` drawn by
      ``rng.uniform(1 - JITTER, 1 + JITTER)``, i.e. between
      ``not_before + 0.45 * L`` and ``not_before + 0.55 * L`` (to the
      microsecond, which is the resolution of :class:`datetime`). It is
      strictly inside ``(not_before, not_after)`` whenever ``L`` is at least
      two microseconds.
    * If the planned point is not after ``now``, ``now`` itself is returned:
      renew immediately. The result is never earlier than ``now``, so the
      delay a caller sleeps is never negative. Pacing retries after a failed
      renewal is the caller's backoff, not this function's job.
    * Exactly one value is drawn from ``rng`` per call.

    Raises ``ValueError`` if ``not_after <= not_before`` (no lifetime to
    divide) or if the datetimes mix naive and aware values.
    """
    _check_comparable(not_before, not_after, now)
    if not_after <= not_before:
        raise ValueError(f"not_after {not_after} must be later than not_before {not_before}")
    lifetime = not_after - not_before
    fraction = rng.uniform(1 - JITTER, 1 + JITTER)
    planned = not_before + lifetime * (fraction / 2)
    return planned if planned > now else now


def _check_comparable(*moments: datetime) -> None:
    """Naive and aware datetimes cannot be compared; say so before Python does."""
    if len({moment.utcoffset() is None for moment in moments}) > 1:
        raise ValueError("not_before, not_after and now must all be timezone-aware (or all naive)")
