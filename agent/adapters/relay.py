"""The byte path: two asyncio Protocols that write what one side reads to the other.

This is the hot path, so it does as little as possible per chunk: no stream
readers, no copies, no per-chunk timers; what a side receives goes to its
sink: straight into the other side's transport (L4), or into an HTTP parser
that writes to it (L7, agent/adapters/http.py). The transports' own flow control
(pause_writing/resume_writing) pauses the reading side while the writing
side's buffer is full. Idle connections are found by a timer per connection
that looks at a flag the data path sets.

Before the two sides are linked (an app's connection while its upstream is
dialled) a side goes on reading, up to EARLY bytes, and keeps what it reads:
the app's first request is taken in as it arrives and goes out the moment the
upstream is ready, not one trip through the event loop later. Under a burst of
new connections every trip through the loop waits behind the burst's
handshakes, and a first request that waited for its upstream's handshake
waited long enough. An EOF that comes this early is kept until the link, so
the bytes that came before it still go out.

Half-close is not kept: an EOF from either side closes both once what was
received before it has been written out. Every relay has a TLS side, and
the TLS transports of asyncio and uvloop cannot send a close_notify and go
on reading; holding the connection open instead would keep a client's fully
closed connection alive upstream until the idle timeout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast

Sink = Callable[[bytes], None]

#: Seconds a closed relay may take to write out what it holds; then it is aborted.
#: A peer that stops reading would otherwise keep the socket and its buffer
#: forever, no longer counted against max_connections nor reached by a drain.
LINGER = 10.0
#: Bytes a side takes in before its relay is linked; past them it stops reading until
#: then (the kernel holds the rest). An app's first request fits.
EARLY = 16 * 1024
#: Pieces a side keeps before the link before it joins them into one: a read is an
#: object (~40 bytes for one byte read), so many small reads would hold many times EARLY.
PIECES = 16


class Side(asyncio.Protocol):
    """One end of a relayed connection."""

    __slots__ = (
        "active",
        "early",
        "eof",
        "made",
        "other",
        "pending",
        "read_early",
        "relay",
        "sink",
        "transport",
    )

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.other: asyncio.Transport | None = None
        self.sink: Sink | None = None  # where received bytes go: the other side, or a parser
        self.pending: list[bytes] = []  # what came before the link
        self.early = 0  # its size
        self.eof = False  # an EOF came before the link
        self.read_early = False  # its transport reads through Early until the link
        self.active = False
        self.made: Callable[[], None] | None = None  # told when the connection is made

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, only alike.
        self.transport = cast(asyncio.Transport, transport)
        if self is self.relay.down and self.sink is None and _half_open(self.transport):
            # The side read while the other is dialled (an app's, or a permissive port's
            # plaintext client): into at most what EARLY leaves, until the link sets it back.
            transport.set_protocol(Early(self))
            self.read_early = True
        if self.made is not None:
            self.made()

    def data_received(self, data: bytes) -> None:
        sink = self.sink
        if sink is None:  # before the relay is linked: an app's first request, say
            pending = self.pending
            pending.append(data)
            if len(pending) > PIECES:  # read a few bytes at a time: held as one piece
                pending[:] = [b"".join(pending)]
            self.early += len(data)
            if self.early >= EARLY and self.transport is not None:
                self.transport.pause_reading()  # link() resumes it
            return
        sink(data)
        self.active = True

    def eof_received(self) -> bool:
        # Bytes, then an EOF, before the link: the relay ends once they went out. An app
        # that leaves without a byte is owed nothing (the dial stops); a TLS transport
        # cannot stay half-open (it closes whatever this returns).
        if (
            self.pending
            and self.sink is None
            and _half_open(self.transport)
            and not self.relay.closed
        ):
            self.eof = True
            return True
        self.relay.lost(self)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        relay = self.relay
        relay.lost(self)
        # Let go of the transports: whatever a side still holds would wait for the relay,
        # and a TLS transport holds its SSLObject and OpenSSL's buffers (tens of KB).
        # Dropped here, they are freed by reference counting once the transport is done.
        self.transport = self.other = self.sink = self.made = None
        self.pending.clear()
        relay.side_gone()
        # The relay and its sides refer to each other: a cycle only the garbage collector
        # would free (two dozen objects per connection, and its time). No callback comes
        # after this one, so the side lets go of its relay; the relay, of its idle timer.
        self.relay = _GONE

    def pause_writing(self) -> None:
        if self.other is not None:
            self.other.pause_reading()

    def resume_writing(self) -> None:
        if self.other is not None and not self.other.is_closing():
            self.other.resume_reading()


class Early(asyncio.BufferedProtocol):
    """A plain TCP side's protocol until its relay is linked: the loop reads into a buffer
    no larger than what EARLY leaves, so a side holds at most EARLY bytes. Handed every
    read as it comes (a Protocol), a side would hold whatever one read took past EARLY:
    on uvloop up to 256 KB, for as long as a dial takes, per connection.

    A TLS side needs none: its transport is paused as soon as its handshake is done.
    """

    __slots__ = ("buffer", "side")

    def __init__(self, side: Side) -> None:
        self.side = side
        self.buffer = bytearray()

    def get_buffer(self, sizehint: int) -> bytearray:
        # Never empty (the loop takes an empty buffer for an error); a side that reached
        # EARLY paused its reading, so the loop asks no more until the link.
        self.buffer = bytearray(max(EARLY - self.side.early, 1))
        return self.buffer

    def buffer_updated(self, nbytes: int) -> None:
        buffer, self.buffer = self.buffer, bytearray()
        self.side.data_received(bytes(memoryview(buffer)[:nbytes]))  # the loop holds `buffer`

    def eof_received(self) -> bool:
        return self.side.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.side.connection_lost(exc)

    def pause_writing(self) -> None:
        self.side.pause_writing()

    def resume_writing(self) -> None:
        self.side.resume_writing()


class Relay:
    """A downstream and an upstream Side, linked once both are connected."""

    def __init__(self, idle_timeout: float, on_closed: Callable[[Relay], None]) -> None:
        self.down = Side(self)
        self.up = Side(self)
        self._idle_timeout = idle_timeout
        self._on_closed = on_closed
        self._idle: asyncio.TimerHandle | None = None
        self.closed = False
        self._gone = False  # closed, both sides' connections gone: they let go of it
        self.draining = False
        self._drain: Callable[[], None] | None = None  # how an L7 relay drains
        #: Called once both sides' transports are gone: an L7 sink lets go of them too.
        self.on_released: Callable[[], None] | None = None
        #: Called once when the relay closes: an access-logged L4 connection's line.
        self.ended: Callable[[], None] | None = None

    def link(self, down_sink: Sink | None = None, up_sink: Sink | None = None) -> None:
        """Start relaying: flush what arrived early, resume reading, arm the idle timer.

        Bytes go straight to the other side (L4) unless a sink takes them (L7).
        """
        if not self.dialled():
            return
        down, up = self.down.transport, self.up.transport
        assert down is not None and up is not None
        self.down.other, self.up.other = up, down
        sinks = ((self.down, down_sink or up.write), (self.up, up_sink or down.write))
        for side, sink in sinks:
            side.sink = sink
            if side.read_early and side.transport is not None:
                side.transport.set_protocol(side)  # read as it comes from now on
                side.read_early = False
            if side.pending:
                sink(b"".join(side.pending))
                side.pending.clear()
        if self.down.eof or self.up.eof:  # the early bytes were all there is
            self.close()
            return
        for transport in (down, up):
            if not transport.is_closing():
                transport.resume_reading()
        self._arm_idle()

    def dialled(self) -> bool:
        """Whether the relay can go on now that its upstream is connected: not if its
        client left during the dial. That upstream is closed then: the relay's close
        came before it was there to close, and nothing else would.

        Every path that dials before it links (or hands the transports to an L7 parser)
        asks this first."""
        if not self.closed and self.down.transport is not None:
            return True
        up = self.up.transport
        if up is not None:
            up.close()
        return False

    def new_upstream(self) -> Side:
        """A fresh upstream side for one connection attempt; earlier attempts are forgotten.

        One made once both sides are gone (a dial that failed after its client left) is
        not tied back to the relay: the relay is over, and the pair would be a cycle."""
        self.up = Side(_GONE if self._gone else self)
        return self.up

    def lost(self, side: Side) -> None:
        """An EOF or a lost connection on `side` ends the relay; stale sides are ignored."""
        if side is self.down or side is self.up:
            self.close()  # each transport writes out what it holds, then closes

    def side_gone(self) -> None:
        """A side's transport is gone; once both are, what holds them lets go, and once the
        relay is closed too, its sides let go of it (they refer to each other: a cycle)."""
        down, up = self.down, self.up
        if down.transport is not None or up.transport is not None:
            return
        release = self.on_released
        if release is not None:
            self.on_released = self._drain = None
            release()
        if self.closed:
            # A side that never connected (an upstream replaced after its dial failed or
            # its peer was refused; a client whose handshake failed) has no
            # connection_lost to let go of the relay. One connecting late finds it
            # closed all the same: whoever dialled it asks `dialled()` first.
            down.relay = up.relay = _GONE
            self._gone = True

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None  # its callback is this relay's: a cycle
        # A transport already closing (an L7 exchange closed it) is left to whoever
        # closed it: closing an asyncio TLS transport twice unhooks it from its protocol.
        transports = [t for t in (self.down.transport, self.up.transport) if t is not None]
        for transport in transports:
            if not transport.is_closing():
                transport.close()
        # Only a transport still holding bytes lingers; the timer keeps it (and its TLS
        # buffers) alive, so arming it for every close would hold each closed connection
        # in memory for LINGER seconds: at a few hundred connections/s, hundreds of MB.
        lingering = [t for t in transports if t.get_write_buffer_size()]
        if lingering:
            asyncio.get_running_loop().call_later(LINGER, _abort_all, lingering)
        self._on_closed(self)
        if self.ended is not None:
            self.ended()
            self.ended = None
        # Closed before either side connected (a client whose handshake failed): no
        # connection_lost will come to say the sides are gone.
        self.side_gone()

    def finish(self) -> None:
        """Draining: at L4 an idle connection looks like a slow request, so it goes on;
        an HTTP one drains by its requests (`drained_by`)."""
        self.draining = True
        if self._drain is not None:
            self._drain()

    def drained_by(self, drain: Callable[[], None]) -> None:
        """`drain` ends this relay when the agent drains; at once if it already is."""
        self._drain = drain
        if self.draining:
            drain()

    def abort(self) -> None:
        for transport in (self.down.transport, self.up.transport):
            if transport is not None:
                transport.abort()
        self.close()

    def _arm_idle(self) -> None:
        self._idle = asyncio.get_running_loop().call_later(self._idle_timeout, self._check_idle)

    def _check_idle(self) -> None:
        if self.down.active or self.up.active:
            self.down.active = self.up.active = False
            self._arm_idle()
        else:  # nothing moved either way: what is still buffered is not being read
            self.abort()


#: A side's relay once its connection is lost: closed, its sides not this side, so a
#: late call (none is made) would do nothing.
_GONE = Relay(0.0, lambda relay: None)
_GONE.closed = True


def _half_open(transport: asyncio.Transport | None) -> bool:
    """Whether `transport` can stay open after an EOF: plain TCP, not TLS."""
    return transport is not None and transport.get_extra_info("ssl_object") is None


def _abort_all(transports: list[asyncio.Transport]) -> None:
    for transport in transports:
        transport.abort()  # a no-op once a transport has closed
