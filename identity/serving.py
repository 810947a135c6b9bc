"""What every port that unauthenticated callers reach shares: bounds on what they hold.

Before a caller is authenticated it must not be able to make a server hold
more than a known amount. The `Acceptor` is the accept loop of such a port
(the CA's gRPC and HTTP ports, the injector's webhook):

- a cap on open connections, TLS handshakes in progress included: a
  connection over it is closed at once, before its handshake, and counted;
- a time limit on the TLS handshake;
- an idle timeout: a connection that has had no request answered for that
  long (from its accept, or its last answer) is closed;
- a bound on output left unread: a connection that goes on sending while
  more than `MAX_UNREAD` of what it was sent waits is closed.

Bytes alone are not activity: a slowloris sends one byte a second forever
(a PING, a header trickled a byte at a time) and would otherwise be held
forever and never be the quietest at the cap, so a thousand of them would
lock every caller out. The server's own protocol reports progress instead
(`progress_of(transport)`): a request received whole, and its answer sent.
While a request it has received is being answered the server owes the
caller, so the connection is not displaced to make room for another; the
idle timeout still applies, in case an answer never comes. An answer the
caller will not take protects nothing: one that reads nothing (our writes
are paused) or keeps its HTTP/2 flow-control window shut would otherwise ask,
never take the answer, and hold its place at the cap for the idle timeout;
a thousand such callers locked everyone out of the CA.

It hands each connection to the server's own protocol (grpclib's, aiohttp's)
and quacks like the `asyncio.AbstractServer` those expect (aiohttp's handlers
report their progress through identity/webserving.py, which keeps aiohttp out
of the agent, a user of this module too). Also here, for
every server the `outrider` command runs: the file-descriptor limit, and a
TLS server context that keeps no sessions.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from identity.throttle import LogThrottle, held_back
from identity.tlsfiles import TLS_SHUTDOWN_TIMEOUT

if TYPE_CHECKING:
    from identity.configfile import ConfigReader

__all__ = [
    "Acceptor",
    "ConnectionLimits",
    "Progress",
    "progress_of",
    "read_limits",
    "tls_server_context",
]

log = logging.getLogger("outrider.serving")

#: Why the acceptor closed a connection, the label of the servers' metric.
CLOSE_REASONS = (
    "max_connections",
    "handshake_timeout",
    "handshake_failed",
    "idle_timeout",
    "unread_output",
)
#: Seconds after an answer during which a connection owed nothing is displaced only
#: after every connection that had no answer that recently (`Acceptor._make_room`).
RECENT = 5.0
#: Output a connection may leave unread while it goes on sending. Every answer
#: here is a few KiB; without a bound, a caller that floods PINGs or SETTINGS
#: and never reads makes the server buffer every acknowledgement.
MAX_UNREAD = 1024 * 1024
ACCEPT_BACKOFF = 0.1  # seconds, after accept() fails (EMFILE): the listener stays
OUT_OF_FILES = (errno.EMFILE, errno.ENFILE)
RAISE_LIMIT = (
    ": raise the open-file limit (ulimit -n, or the container runtime's), or lower"
    " limits.max_connections; callers get in again as connections close"
)


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


class Progress(Protocol):
    """What a server protocol tells the acceptor about one connection."""

    def received(self) -> None:
        """A request has arrived whole: the server owes an answer."""

    def answered(self) -> None:
        """The answer to a request `received` is out (or the request ended)."""


@runtime_checkable
class Answers(Protocol):
    """A server's protocol that can tell when an answer it owes waits on the caller."""

    def answer_waits_on_caller(self) -> bool: ...


def progress_of(transport: asyncio.BaseTransport | None) -> Progress | None:
    """The progress record of a connection an `Acceptor` accepted, else None."""
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, _Guard) else None


class Acceptor:
    """Accepts on `sock` within `limits`; each connection gets `factory()`'s protocol.

    At the cap the connection that has been quiet longest (handshakes in progress
    included; quiet: no request received whole or answered) makes room for the
    new one, if it is owed no answer it would take (`_Guard.protected`), those that
    never had an answer first: a flood of idle or trickling connections then only
    displaces itself, and a caller whose request is being answered is never cut.
    However recent its last request: a
    second of quiet required let 50 callers asking every half second (no
    credentials needed) hold every place of the CA, or 64 those of a status port
    that a kubelet probes. When none can make room the new one is closed instead,
    before any TLS. Either way the closure is counted as `max_connections`.
    """

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
        self._held: set[_Guard] = set()
        self._task: asyncio.Task[None] | None = None
        self._cancelled: list[asyncio.Task[None]] = []  # handshakes cut by `close`
        self._lines = LogThrottle()

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return (self._sock,)

    def use_tls(self, tls: ssl.SSLContext) -> None:
        """Handshake new connections with `tls` from now on; open ones keep theirs.

        For a trust bundle that changed: roots can be added to a context in
        place, but never removed from it.
        """
        self._tls = tls

    def held(self) -> int:
        """Connections held now, handshakes in progress included."""
        return len(self._held)

    def start(self) -> None:
        self._sock.setblocking(False)
        self._task = asyncio.get_running_loop().create_task(self._accept_loop())

    def is_serving(self) -> bool:
        return self._task is not None and not self._task.done()

    def close(self) -> None:
        """Stop accepting and handshaking; open connections go on (see `abort_clients`)."""
        if self._task is not None:
            self._task.cancel()
        for guard in list(self._held):
            if guard.setup is not None and not guard.setup.done():
                self._cancelled.append(guard.setup)
                guard.abort()
        self._sock.close()

    async def wait_closed(self) -> None:
        tasks = [t for t in (self._task, *self._cancelled) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)

    def abort_clients(self) -> None:
        for guard in list(self._held):
            guard.abort()

    def release(self, guard: _Guard) -> None:
        self._held.discard(guard)

    def protocol(self) -> Any:
        """The server's own protocol for a connection that is ready."""
        return self._factory()

    def count(self, reason: str) -> None:
        self._closed(reason)

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, _ = await loop.sock_accept(self._sock)
            except OSError as exc:  # EMFILE and friends: back off, keep the listener
                held = self._lines.admit(exc.errno, loop.time())
                if held is not None:
                    where = self._sock.getsockname()
                    advice = RAISE_LIMIT if exc.errno in OUT_OF_FILES else ""
                    log.warning("accept failed on %s: %s%s%s", where, exc, advice, held_back(held))
                await asyncio.sleep(ACCEPT_BACKOFF)
                continue
            if len(self._held) >= self.limits.max_connections and not self._make_room():
                sock.close()  # before any TLS: an excess connection costs nothing more
                self._closed("max_connections")
                continue
            guard = _Guard(self, self.limits.idle_timeout.total_seconds(), loop.time())
            self._held.add(guard)
            guard.setup = loop.create_task(self._setup(guard, sock))

    def _make_room(self) -> bool:
        waiting = [guard for guard in self._held if not guard.protected()]
        if not waiting:
            return False  # every connection waits on an answer from us
        # A connection that had no answer lately goes before one that had: a flood of new
        # connections then displaces itself, not a client's keep-alive between requests;
        # and connections asked once and then left idle keep no place for long.
        now = asyncio.get_running_loop().time()
        quietest = min(waiting, key=lambda guard: (guard.answered_since(now - RECENT), guard.last))
        quietest.abort()
        self._closed("max_connections")
        return True

    async def _setup(self, guard: _Guard, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        kwargs: dict[str, Any] = {}
        if self._tls is not None:
            kwargs = {
                "ssl": self._tls,
                "ssl_handshake_timeout": self.limits.handshake_timeout.total_seconds(),
                "ssl_shutdown_timeout": TLS_SHUTDOWN_TIMEOUT,
            }
        try:
            await loop.connect_accepted_socket(lambda: guard, sock, **kwargs)
        except ConnectionAbortedError:  # how both event loops end a handshake that is too slow
            self._failed(guard, sock, "handshake_timeout")
        except (OSError, ssl.SSLError, EOFError):
            self._failed(guard, sock, "handshake_failed")
        except asyncio.CancelledError:  # displaced, or the server is closing
            self._failed(guard, sock, None)
            raise

    def _failed(self, guard: _Guard, sock: socket.socket, reason: str | None) -> None:
        sock.close()  # a no-op if the event loop took it over
        self.release(guard)
        if reason is not None:
            self._closed(reason)


class _Guard(asyncio.Protocol):
    """One connection, from accept: stands between the transport and the server's
    protocol, which it creates once the handshake is done; closes it when idle."""

    def __init__(self, acceptor: Acceptor, idle: float, now: float) -> None:
        self._acceptor = acceptor
        self._idle = idle
        self.last = now  # when a request last arrived whole or was answered (or the accept)
        self.owed = 0  # requests received whole and not answered yet
        self.answered_once = False  # a request of it was answered
        self.setup: asyncio.Task[None] | None = None
        self._inner: Any = None  # the server's protocol: grpclib's or aiohttp's
        self._transport: asyncio.BaseTransport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._paused = False  # the transport holds more than the caller has read
        self._answers: Answers | None = None  # the server's protocol, if it can tell

    def answered_since(self, moment: float) -> bool:
        """Whether a request of it was answered, and it has been busy, since `moment`."""
        return self.answered_once and self.last >= moment

    def protected(self) -> bool:
        """Owed an answer the caller takes: not displaced at the cap. An answer that waits
        on the caller (it reads nothing, or keeps its flow-control window shut) protects
        nothing, or a caller could ask, never take the answer, and keep its place."""
        if not self.owed or self._paused:
            return False
        return self._answers is None or not self._answers.answer_waits_on_caller()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        self._timer = loop.call_at(self.last + self._idle, self._check_idle)
        self._inner = self._acceptor.protocol()
        self._answers = self._inner if isinstance(self._inner, Answers) else None
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        assert self._transport is not None
        if self._transport.get_write_buffer_size() > MAX_UNREAD:  # type: ignore[attr-defined]
            self._acceptor.count("unread_output")
            self.abort()
            return
        self._inner.data_received(data)  # not activity by itself: see the module's docstring

    def received(self) -> None:
        self.owed += 1
        self.last = asyncio.get_running_loop().time()

    def answered(self) -> None:
        self.owed = max(self.owed - 1, 0)
        self.answered_once = True
        self.last = asyncio.get_running_loop().time()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()  # type: ignore[no-any-return]

    def pause_writing(self) -> None:
        self._paused = True
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._paused = False
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._acceptor.release(self)
        self._inner.connection_lost(exc)

    def abort(self) -> None:
        self._acceptor.release(self)
        if self._transport is not None:
            self._transport.abort()  # type: ignore[attr-defined]
        elif self.setup is not None:
            self.setup.cancel()

    def _check_idle(self) -> None:
        loop = asyncio.get_running_loop()
        due = self.last + self._idle  # owed or not: no answer should take that long
        if loop.time() < due:
            self._timer = loop.call_at(due, self._check_idle)
            return
        self._timer = None
        self._acceptor.count("idle_timeout")
        self.abort()  # abort, not close: a TLS close waits on a peer that may never read
