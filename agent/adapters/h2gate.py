"""The first bytes of a plaintext connection to an h2-only port, looked at before h2 speaks.

The app reaches a `protocol: http2|grpc` outbound over h2c with prior
knowledge; an app that speaks HTTP/1.1 there instead (the port's appProtocol
is wrong, or the app is) would get h2's SETTINGS and a GOAWAY PROTOCOL_ERROR,
which an HTTP/1.1 client reports as a garbled response. So the H2Server is
handed the connection only once its first bytes are the HTTP/2 preface; an
HTTP/1.x request line gets an HTTP/1.1 505 whose JSON body says what to change
(agent.core.http1.h1_advice), counted as a `protocol_mismatch` refusal with a
throttled log line: the mirror of the GOAWAY HTTP_1_1_REQUIRED an `http` port
gives an h2 preface. Anything else goes to the H2Server, whose protocol error
it is. (A peer agent's `http` outbound pointed at an h2-only inbound, TLS
without ALPN h2, gets the same answer: `advise_peer`.) The gate is what the
connection registry holds: it drains and aborts the
server once it has it, the bare connection before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

from agent.adapters.h2server import H2Server
from agent.adapters.http import error_body, local_response
from agent.adapters.relay import Relay
from agent.core import http1

#: Seconds a refused client has to read the answer and close before the agent closes.
LINGER = 2.0


def advice(protocol: str) -> bytes:
    """The HTTP/1.1 505 an h2-only port answers an HTTP/1.x client with: what to change."""
    return local_response(505, error_body("protocol_mismatch", http1.h1_advice(protocol)))


def advise_peer(relay: Relay, transport: asyncio.Transport, protocol: str) -> None:
    """A peer agent reached an h2-only inbound over TLS without ALPN h2 (its outbound says
    `http`): its HTTP/1.1 request gets `advice`, which that agent relays to its app, rather
    than a reset only this agent would explain. What the peer sends is read and dropped
    until it closes or LINGER passes: closing with its request unread would reset the
    connection, which can destroy the answer before the peer reads it."""
    relay.down.sink = _dropped
    relay.down.pending.clear()
    transport.write(advice(protocol))
    transport.resume_reading()
    asyncio.get_running_loop().call_later(LINGER, relay.close)


def _dropped(data: bytes) -> None:
    """The rest of a refused request."""


class H2Gate(asyncio.Protocol):
    """One connection to an h2-only port until its first bytes say it speaks h2."""

    def __init__(
        self,
        server: H2Server,
        protocol: str,
        refused: Callable[[], None],
        on_closed: Callable[[H2Gate], None],
        timeout: float,
        admitted: Callable[[], None] = lambda: None,
    ) -> None:
        self.server = server
        self.protocol = protocol  # the port's, for the advice
        self.refused = refused  # an HTTP/1.x client was answered: count it, log it
        self.on_closed = on_closed
        self.timeout = timeout  # for the first bytes: the server's idle timeout
        self.admitted = admitted  # told once h2 is let through (a plaintext one is counted)
        self.transport: asyncio.Transport | None = None
        self.held = b""
        self.handed = False  # the server has the connection
        self.refusing = False  # answered 505: waiting for the client to close
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        server.on_closed = lambda _: self._close()  # the registry learns it from the gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(self.timeout, self.abort)

    def data_received(self, data: bytes) -> None:
        if self.handed:  # only until set_protocol takes effect
            self.server.data_received(data)
            return
        if self.refusing:  # the rest of a refused request: dropped
            return
        self.held += data
        seen = http1.opening(self.held)
        if seen == "wait":
            return
        if seen == "http1":
            self._refuse()
            return
        self._hand_over()

    def _refuse(self) -> None:
        """Answer 505 and half-close; what the client still sends is read and dropped until
        it closes (or LINGER passes): closing with its request unread would send a reset,
        which can destroy the answer before the client reads it."""
        transport = self.transport
        assert transport is not None
        self.refusing = True
        self.held = b""
        transport.write(advice(self.protocol))
        if transport.can_write_eof():
            transport.write_eof()
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(LINGER, transport.close)
        self.refused()

    def _hand_over(self) -> None:
        transport = self.transport
        assert transport is not None
        if self._timer is not None:
            self._timer.cancel()
        self.handed = True
        held, self.held = self.held, b""
        self.admitted()
        transport.set_protocol(self.server)
        self.server.connection_made(transport)
        if held:
            self.server.data_received(held)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.handed:
            self.server.connection_lost(exc)
        self._close()

    # -- the registry's (Closable) -------------------------------------------------------

    def finish(self) -> None:
        """Draining: the server drains its streams; a connection not yet h2 just closes."""
        if self.handed:
            self.server.finish()
        elif self.transport is not None:
            self.transport.close()
            self._close()

    def abort(self) -> None:
        if self.handed:
            self.server.abort()
            return
        if self.transport is not None:
            self.transport.abort()
        self._close()

    def _close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if not self.handed:
            self.server.close()  # never connected: it closes nothing, and frees its state
        self.on_closed(self)
