"""Idle mTLS connections to upstream endpoints, kept for the next request (HTTP outbound).

A connection carries one request at a time. While a request uses it, what it
reads goes to that request's exchange (its `user`); while idle, nothing
should arrive, and anything that does (a server closing, or talking out of
turn) ends it. The newest idle connection is reused first, so the rest age
out: every idle connection is closed after `idle_timeout`, when its endpoint
leaves the upstream or is ejected, and when the SVID or bundle it was made
with is no longer the current one (`take` compares the TLS context), so no
pooled connection outlives the trust it was verified under. The identity
manager gives the current SVID a fresh context when it expires, so that
retires them too.

A connection taken from the pool may have been closed by the server just
before (its idle timeout, or its end) without the close having been read
yet: a request sent on it is lost with nothing heard back. `stale` says so
when the loss comes, and the request is sent again on a new connection
(agent/core/tries.py `Redial`).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Iterable
from typing import Protocol, cast

from agent.core.accesslog import Tls
from agent.core.http1 import ResponseParser
from agent.core.upstream import Endpoint


class User(Protocol):
    """The exchange using a connection: it gets the bytes, the loss and the flow control."""

    def from_upstream(self, data: bytes) -> None: ...
    def upstream_lost(self) -> None: ...
    def upstream_paused(self, paused: bool) -> None: ...


class UpstreamConnection(asyncio.Protocol):
    __slots__ = (
        "closed",
        "context",
        "endpoint",
        "epoch",
        "heard",
        "idle_since",
        "on_lost",
        "pool",
        "reused",
        "spare",
        "tls",
        "transport",
        "user",
    )

    def __init__(
        self, pool: Pool, endpoint: Endpoint, context: ssl.SSLContext, on_lost: Callable[[], None]
    ) -> None:
        self.pool = pool
        self.endpoint = endpoint
        self.context = context  # the one it was made with: stale after a rotation
        self.epoch = pool.epoch  # the pool's when it was made: stale once the pool retires it
        self.on_lost = on_lost  # gives back its slot under the circuit breaker
        self.transport: asyncio.Transport | None = None
        self.user: User | None = None
        self.idle_since = 0.0
        self.closed = False
        self.reused = False  # taken from the pool: it carried a request before this one
        self.heard = False  # bytes came back since it was last taken
        # The last response's parser, for the next request on this connection
        # (ResponseParser.next: one llhttp parser per connection, not per request).
        self.spare: ResponseParser | None = None
        # Its peer and TLS, read once when it was dialled, for the lines of the requests it
        # carries (agent/core/accesslog.py); None while access logs and tracing are off.
        self.tls: Tls | None = None

    @property
    def stale(self) -> bool:
        """Whether, lost now, it was most likely closed by the server before the request in
        flight went out: reused from the pool, and nothing heard back on it since."""
        return self.reused and not self.heard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        user = self.user
        if user is None:  # bytes nobody asked for: this connection cannot be trusted again
            assert self.transport is not None
            self.transport.abort()
            return
        self.heard = True
        user.from_upstream(data)

    def eof_received(self) -> bool:
        return False  # close: an HTTP/1.1 server that half-closes is done with us

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.on_lost()
        user, self.user = self.user, None
        if user is not None:
            user.upstream_lost()
        else:
            self.pool.forget(self)
        # The user and its parsers refer back to this connection: holding the transport
        # here would keep its TLS state (tens of KB) until the garbage collector runs.
        self.transport = None
        # llhttp holds its parser's callbacks: a cycle, let go of now that no response comes.
        spare, self.spare = self.spare, None
        if spare is not None:
            spare.close()

    def pause_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_paused(True)

    def resume_writing(self) -> None:
        if self.user is not None:
            self.user.upstream_paused(False)

    def close(self) -> None:
        self.user = None
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        self.user = None
        if self.transport is not None:
            self.transport.abort()


class Pool:
    """The idle connections of one upstream, newest last, per endpoint."""

    def __init__(self, idle_timeout: float) -> None:
        self.idle_timeout = idle_timeout
        self.idle: dict[Endpoint, list[UpstreamConnection]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False
        # Bumped by `retire_all`: a connection made before carries no further request.
        self.epoch = 0
        # The loop of the first `put`, for its clock: a pool serves one loop, and each
        # get_running_loop() is a getpid() system call on Python 3.11.
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return sum(map(len, self.idle.values()))

    def take(self, endpoint: Endpoint, context: ssl.SSLContext) -> UpstreamConnection | None:
        """An idle connection to `endpoint` made under `context`, or None."""
        idle = self.idle.get(endpoint)
        while idle:
            connection = idle.pop()
            transport = connection.transport
            if (
                connection.context is context
                and transport is not None
                and not transport.is_closing()
            ):
                connection.reused, connection.heard = True, False
                return connection
            connection.close()  # made under an earlier SVID or bundle
        return None

    def put(self, connection: UpstreamConnection) -> None:
        """`connection` finished a request cleanly and may carry the next."""
        connection.user = None
        transport = connection.transport
        if self.closed or connection.epoch != self.epoch:
            connection.close()
            return
        if connection.closed or transport is None or transport.is_closing():
            return
        transport.resume_reading()  # paused for a slow app, perhaps: idle, it must see a close
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        connection.idle_since = loop.time()
        self.idle.setdefault(connection.endpoint, []).append(connection)
        if self._sweep is None:
            self._sweep = loop.call_later(self.idle_timeout, self._close_idle)

    def set_idle_timeout(self, seconds: float) -> None:
        """A reload's timeout, for the connections idle now too: the sweep is rescheduled."""
        self.idle_timeout = seconds
        if self._sweep is not None:
            self._sweep.cancel()
            self._close_idle()  # closes what is past the new timeout, schedules the rest

    def retire(self, context: ssl.SSLContext) -> None:
        """Close the idle connections made under another context (an earlier SVID or bundle)."""
        for endpoint, idle in list(self.idle.items()):
            stale = [c for c in idle if c.context is not context]
            if stale:
                self.idle[endpoint] = [c for c in idle if c.context is context]
                for connection in stale:
                    connection.close()

    def retire_all(self) -> None:
        """No connection made so far carries another request: the idle ones close now, those
        in use once their request ends (a reload changed the server IDs the upstream trusts:
        each was verified against the old ones, and a dial verifies against the new)."""
        self.epoch += 1
        self.drop(list(self.idle))

    def forget(self, connection: UpstreamConnection) -> None:
        """An idle connection closed on its own."""
        idle = self.idle.get(connection.endpoint)
        if idle and connection in idle:
            idle.remove(connection)

    def drop(self, endpoints: Iterable[Endpoint]) -> None:
        """Close the idle connections to `endpoints` (they left, or were ejected)."""
        for endpoint in endpoints:
            for connection in self.idle.pop(endpoint, ()):
                connection.close()

    def close(self) -> None:
        self.closed = True
        self.drop(list(self.idle))
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _close_idle(self) -> None:
        self._sweep = None
        loop = asyncio.get_running_loop()
        expiry = loop.time() - self.idle_timeout
        oldest = None
        for endpoint, idle in list(self.idle.items()):
            keep = [c for c in idle if c.idle_since > expiry]
            for connection in idle:
                if connection.idle_since <= expiry:
                    connection.close()
            if keep:
                self.idle[endpoint] = keep
                first = min(c.idle_since for c in keep)
                oldest = first if oldest is None else min(oldest, first)
            else:
                del self.idle[endpoint]
        if oldest is not None:
            self._sweep = loop.call_at(oldest + self.idle_timeout, self._close_idle)
