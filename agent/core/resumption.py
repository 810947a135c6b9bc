"""TLS 1.3 session resumption between agents: which saved session a new dial may offer.

A resumed handshake (PSK with (EC)DHE) skips the certificates and OpenSSL's chain check,
so a session may only stand for a check that still holds:

- sessions live in a client context's own cache, and every rotation and bundle change
  builds new contexts: a session never outlives the SVID and the roots it was made
  with (the server side's ticket keys are its context's too, random, and renewed every
  `ticket_lifetime`: agent/adapters/tls.py);
- only a session whose server passed the agent's checks (its SPIFFE ID is one of the
  upstream's server IDs) is saved, and offered again only to the same endpoint while
  that ID is still one of the upstream's;
- a session is offered for `ticket_lifetime` after its ticket was issued, not longer;
- the agent's own checks (the peer's SPIFFE ID, its validity, the allow-list) run on
  every connection, resumed or not: the peer's certificate is in the session.

Time is an argument (wall-clock seconds, as OpenSSL stamps a session), and the cache
holds sessions of any type: the tests need no TLS.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable
from dataclasses import dataclass
from datetime import timedelta
from typing import Generic, TypeVar

S = TypeVar("S")

#: Endpoints whose sessions one client context keeps; the least recently saved go first.
MAX_SESSIONS = 1024
#: The longest a ticket may be used: a resumed connection stands on a chain check made
#: up to this long ago (the SPIFFE ID, validity and allow-list are checked anyway).
MAX_TICKET_LIFETIME = timedelta(hours=1)


@dataclass(frozen=True)
class Resumption:
    """`tls:` in agent.yaml: whether agents resume sessions with each other, and how long
    a ticket may be used."""

    resumption: bool = True
    ticket_lifetime: timedelta = timedelta(minutes=5)


@dataclass(frozen=True)
class _Saved(Generic[S]):
    session: S
    peer: Hashable  # the server's verified SPIFFE ID
    issued_at: float  # wall-clock seconds


class SessionCache(Generic[S]):
    """The latest resumable session per endpoint, for one client context."""

    def __init__(self, lifetime: timedelta, max_sessions: int = MAX_SESSIONS) -> None:
        self.lifetime = lifetime.total_seconds()
        self.max_sessions = max_sessions
        self._saved: dict[Hashable, _Saved[S]] = {}

    def __len__(self) -> int:
        return len(self._saved)

    def save(self, endpoint: Hashable, peer: Hashable, session: S, issued_at: float) -> None:
        """Keep `session` of a connection to `endpoint` whose server was verified as
        `peer`; it replaces an older one."""
        saved = self._saved
        known = saved.get(endpoint)
        if known is not None and known.issued_at > issued_at:
            return  # a connection that outlived a later one: keep the later ticket
        saved.pop(endpoint, None)
        if len(saved) >= self.max_sessions:
            del saved[next(iter(saved))]
        saved[endpoint] = _Saved(session, peer, issued_at)

    def wants(self, endpoint: Hashable, now: float) -> bool:
        """Whether a resumed connection to `endpoint` should give its new session: only
        once the saved one is half its lifetime old. Reading a session out of CPython
        copies it through DER, certificate and all (~0.4 ms on OpenSSL 3.0), so a resumed
        connection does it once in a while, not every time; a full handshake always
        gives its session (the saved one, if any, was not taken)."""
        known = self._saved.get(endpoint)
        return known is None or not 0 <= now - known.issued_at < self.lifetime / 2

    def offer(self, endpoint: Hashable, server_ids: Collection[Hashable], now: float) -> S | None:
        """The session to offer `endpoint`, if one is fresh and its server is still one of
        `server_ids`; a stale one is forgotten."""
        known = self._saved.get(endpoint)
        if known is None:
            return None
        if not 0 <= now - known.issued_at < self.lifetime or known.peer not in server_ids:
            del self._saved[endpoint]
            return None
        return known.session
