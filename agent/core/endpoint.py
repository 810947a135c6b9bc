"""An upstream endpoint's address: what balancers pick, health tracks and pools key on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True, eq=False)
class Endpoint:
    """`host` and `port`, equal and hashed by both.

    Each request looks endpoints up in several dicts (its balancer's load, the pool, the
    health table): the hash is made once, and equality written out, where the dataclass's
    own build a tuple of the fields on every call.
    """

    host: str
    port: int
    _hash: ClassVar[int]  # set per instance by __post_init__ (not a field)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.host, self.port)))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if other is self:
            return True
        if not isinstance(other, Endpoint):
            return NotImplemented
        return self.host == other.host and self.port == other.port

    def __reduce__(self) -> tuple[type[Endpoint], tuple[str, int]]:
        # Pickled (to workers) by its fields: the hash is the receiving process's own.
        return Endpoint, (self.host, self.port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"
