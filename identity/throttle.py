"""Log lines about refusals, bounded: one line per kind a while, saying how many it stands for.

A refusal a caller can cause (a connection to a port the agent never relays, an
address outside the registry) is worth a line in the log: it is how a user learns
why their connection was closed. But a caller can cause it as fast as it can
connect, and a line per connection would let a flood fill the disk and bury
everything else. So each kind of refusal is said at most once per interval; the
line that ends the quiet says how many were held back meanwhile. The counters
in /metrics count every one.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

#: Seconds between two lines about the same kind of refusal.
INTERVAL = 10.0
#: Kinds remembered at most: a key holds a refusal's kind, never an address, so a
#: handful; the bound only keeps a mistaken key from growing without end.
MAX_KINDS = 256


@dataclass
class LogThrottle:
    """Whether to say a refusal of kind `key` now: `admit(key, now)`."""

    interval: float = INTERVAL
    _kinds: dict[Hashable, tuple[float, int]] = field(default_factory=dict)

    def admit(self, key: Hashable, now: float) -> int | None:
        """None: hold this one back (counted); else say it, with the number held back
        since the last line of this kind (0: none)."""
        last = self._kinds.get(key)
        if last is not None and now - last[0] < self.interval:
            self._kinds[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._kinds) >= MAX_KINDS:
            self._kinds.clear()
        self._kinds[key] = (now, 0)
        return 0 if last is None else last[1]


def held_back(count: int) -> str:
    """The tail of a line that ends a quiet: how many it stands for."""
    return f" (and {count} more like it since the last line)" if count else ""
