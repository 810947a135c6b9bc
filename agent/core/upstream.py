"""Where an outbound listener sends a connection.

An `Upstream` is asked for an endpoint per connection attempt, and told which
endpoints already failed that connection, so the next try goes elsewhere.
`StaticUpstream` is a fixed list in round-robin order; the load-balancing
issue adds discovery, weights, health and other policies behind the same
`choose` call.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


class Upstream(Protocol):
    def choose(self, tried: Collection[Endpoint]) -> Endpoint | None:
        """An endpoint not in `tried`, or None when there is none left."""
        ...


class StaticUpstream:
    def __init__(self, endpoints: Sequence[Endpoint]) -> None:
        if not endpoints:
            raise ValueError("an upstream needs at least one endpoint")
        self.endpoints = tuple(endpoints)
        self._next = itertools.cycle(range(len(self.endpoints)))

    def choose(self, tried: Collection[Endpoint]) -> Endpoint | None:
        for _ in self.endpoints:
            endpoint = self.endpoints[next(self._next)]
            if endpoint not in tried:
                return endpoint
        return None
