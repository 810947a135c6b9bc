"""What every port that unauthenticated callers reach shares: bounds on what they hold.

Before a caller is authenticated it must not be able to make a server hold
more than a known amount. The `Acceptor` is the accept loop of such a port
(the CA's gRPC and HTTP ports, the injector's webhook):

- a cap on open connections, TLS handshakes in progress included: a
  connection over it is closed at once, before its handshake, and counted;
- a time limit on the TLS handshake;
- an idle timeout: a connection that sends nothing for that long is closed.

It hands each connection to the server's own protocol (grpclib's, aiohttp's)
and quacks like the `asyncio.AbstractServer` those expect. Also here, for
every server the `outrider` command runs: the file-descriptor limit, and a
TLS server context that keeps no sessions.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from identity.configfile import ConfigReader

__all__ = ["Acceptor", "ConnectionLimits", "raise_fd_limit", "read_limits", "tls_server_context"]

log = logging.getLogger("outrider.serving")

#: Why the acceptor closed a connection, the label of the servers' metric.
CLOSE_REASONS = ("max_connections", "handshake_timeout", "handshake_failed", "idle_timeout")
ACCEPT_BACKOFF = 0.1  # seconds, after accept() fails (EMFILE): the listener stays


@dataclass(frozen=True)
class ConnectionLimits:
    max_connections: int = 1000
    handshake_timeout: timedelta = timedelta(seconds=10)
    idle_timeout: timedelta = timedelta(seconds=60)


def read_limits(
    reader: ConfigReader, raw: Mapping[str, Any], path: str, defaults: ConnectionLimits
) -> ConnectionLimits:
    """The three keys of a `limits:` section every such server has."""
    return ConnectionLimits(
        max_connections=reader.integer(
            raw, "max_connections", f"{path}.max_connections", defaults.max_connections
        ),
        handshake_timeout=reader.duration(
            raw, "handshake_timeout", f"{path}.handshake_timeout", defaults.handshake_timeout
        ),
        idle_timeout=reader.duration(
            raw, "idle_timeout", f"{path}.idle_timeout", defaults.idle_timeout
        ),
    )


def raise_fd_limit() -> int:
    """Raise the soft limit on open files to the hard one; return the limit now in force.

    1024, a common soft default, is what a thousand idle connections take.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:  # e.g. macOS's unlimited hard limit
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, hard, exc)
    log.info("open-file limit: %d", soft)
    return soft


def tls_server_context() -> ssl.SSLContext:
    """TLS 1.3 only, no session tickets, no session cache.

    Without tickets (OP_NO_TICKET alone) OpenSSL still caches every session, for
    two hours, up to 20,480 of them: memory that callers make grow, and a resumed
    session skips the verification of the client's chain. With `num_tickets = 0`
    TLS 1.3 caches nothing; TLS 1.2 would still cache by session ID, and Python
    cannot turn that cache off, so TLS 1.2 is refused.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.options |= ssl.OP_NO_TICKET
    context.num_tickets = 0
    return context


Refused = Callable[[str], None]  # called with one of CLOSE_REASONS


class Acceptor:
    """Accepts on `sock` within `limits`; each connection gets `factory()`'s protocol."""

    def __init__(
        self,
        sock: socket.socket,
        factory: Callable[[], asyncio.BaseProtocol],
        tls: ssl.SSLContext | None,
        limits: ConnectionLimits,
        closed: Refused,
    ) -> None:
        self._sock, self._factory, self._tls = sock, factory, tls
        self.limits = limits
        self._closed = closed
        self._open: set[_Guard] = set()
        self._handshakes: set[asyncio.Task[None]] = set()
        self._task: asyncio.Task[None] | None = None

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)

    def held(self) -> int:
        """Connections held now, handshakes in progress included."""
        return len(self._open) + len(self._handshakes)

    def start(self) -> None:
        self._sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    def is_serving(self) -> bool:
        return self._task is not None and not self._task.done()

    def close(self) -> None:
        """Stop accepting; connections already open go on (see `abort_clients`)."""
        if self._task is not None:
            self._task.cancel()
        for task in self._handshakes:
            task.cancel()
        self._sock.close()

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._task, *self._handshakes) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def abort_clients(self) -> None:
        for guard in list(self._open):
            guard.abort()

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off, keep the listener
                log.warning("accept failed on %s: %s", self._sock.getsockname(), exc)
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            if self.held() >= self.limits.max_connections:
                sock.close()  # before any TLS: an excess connection costs nothing more
                self._closed("max_connections")
                continue
            task = loop.create_task(self._setup(sock))
            self._handshakes.add(task)
            task.add_done_callback(self._handshakes.discard)

    async def _setup(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        guard = _Guard(self._factory(), self.limits.idle_timeout.total_seconds(), self)
        kwargs: dict[str, Any] = {}
        if self._tls is not None:
            kwargs = {
                "ssl": self._tls,
                "ssl_handshake_timeout": self.limits.handshake_timeout.total_seconds(),
            }
        try:
            await loop.connect_accepted_socket(lambda: guard, sock, **kwargs)
        except ConnectionAbortedError:  # how both event loops end a handshake that is too slow
            sock.close()
            self._closed("handshake_timeout")
        except (OSError, ssl.SSLError, EOFError):
            sock.close()
            self._closed("handshake_failed")

    def _opened(self, guard: _Guard) -> None:
        self._open.add(guard)

    def _lost(self, guard: _Guard) -> None:
        self._open.discard(guard)


class _Guard(asyncio.Protocol):
    """Stands between the transport and the server's protocol; closes it when idle."""

    def __init__(self, inner: asyncio.BaseProtocol, idle: float, acceptor: Acceptor) -> None:
        self._inner = inner
        self._idle = idle
        self._acceptor = acceptor
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._acceptor._opened(self)
        loop = asyncio.get_running_loop()
        self._last = loop.time()
        self._timer = loop.call_at(self._last + self._idle, self._check_idle)
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self._last = asyncio.get_running_loop().time()
        self._inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[attr-defined,no-any-return]

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._acceptor._lost(self)
        self._inner.connection_lost(exc)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()  # type: ignore[attr-defined]

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        due = self._last + self._idle
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check_idle)
            return
        self._timer = None
        self._acceptor._closed("idle_timeout")
        self.abort()  # abort, not close: a TLS close waits on a peer that may never read
