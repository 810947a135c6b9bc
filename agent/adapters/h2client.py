"""The client side of HTTP/2 connections (python-hyper's `h2`), and a pool of them per endpoint.

One `H2ClientConnection` is an asyncio protocol over any transport: mTLS to a
peer agent's inbound (ALPN `h2`) or h2c with prior knowledge to the local app.
It carries many streams at once; each request is an `H2Stream`, whose
response comes as events (`Response`, `Data`, `Trailers`, `End`, `Reset`)
read with `await stream.event()` or `async for`. Flow control is explicit
both ways:

- what the peer sends is credited back only when the user says it has
  forwarded it (`stream.consumed(flow)`), so a slow reader holds at most the
  windows we advertised (STREAM_WINDOW a stream, CONNECTION_WINDOW in all),
  never a growing buffer;
- `await stream.send(data)` waits for the peer's windows and for the
  transport (paused writing), so a fast writer is held back, not buffered.

A GOAWAY stops new streams at once. Streams above its last-stream-id were
never processed: they end `Reset("refused-stream")`, which retries any
method, as a connect failure does. A graceful GOAWAY (NO_ERROR) lets the
streams at or below it finish (h2 itself would close the connection on any
GOAWAY: `_Connection` keeps it open for them); an error GOAWAY ends them
`Reset("reset")`, as a protocol error or a lost transport ends every stream.

`H2Pool` keeps these connections per endpoint and hands out the one with
room, up to the peer's SETTINGS_MAX_CONCURRENT_STREAMS (and our own
MAX_STREAMS), so requests multiplex on few connections; requests that find
none wait for one dial in progress rather than each dialling their own.
Like the HTTP/1.1 pool (agent/adapters/pool.py), a connection made under
an SVID or bundle that is no longer current is retired (`retire`): it takes
no new stream and closes when its last one ends; so do connections to an
endpoint that left or was ejected (`drop`). A connection with no stream for
`idle_timeout` is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple

from agent.adapters.h2malformed import StreamErrors
from agent.core.accesslog import Tls
from agent.core.h2limits import H2Limits
from agent.core.upstream import Endpoint

#: Streams at once on one connection, whatever the peer allows (RFC 9113 suggests >= 100).
MAX_STREAMS = 100
#: What one stream may have in flight towards us, unread by its user.
STREAM_WINDOW = 256 * 1024
#: What all streams of a connection may have in flight towards us: its memory bound.
CONNECTION_WINDOW = 1024 * 1024
#: The decoded header list we accept in a response (as MAX_HEADER_BYTES for HTTP/1.1).
MAX_HEADER_LIST = 64 * 1024
#: Seconds for the peer's first SETTINGS after the transport is up (part of the dial).
SETTINGS_TIMEOUT = 10.0
#: The HPACK table we compress requests with, whatever larger one the peer allows, and
#: the closed streams h2 remembers: the bounds H2Server keeps (agent/core/h2limits.py).
#: (Read from an instance: compiled by mypyc, H2Limits's class holds descriptors, not the
#: defaults.)
MAX_ENCODER_TABLE = H2Limits().max_encoder_table
MAX_CLOSED_STREAMS = H2Limits().max_closed_streams

Header = tuple[bytes, bytes]
#: Why a stream ended without a whole response: `refused-stream` means the peer never
#: processed it (RST_STREAM REFUSED_STREAM, or above a GOAWAY's last-stream-id).
StreamFailure = Literal["refused-stream", "reset"]


@dataclass(frozen=True, slots=True)
class Response:
    """A response head: informational (1xx, more follow) or final. `end`: END_STREAM was on
    it (no body; with grpc-status in it, a gRPC trailers-only response). End follows."""

    headers: list[Header]
    end: bool = False

    @property
    def status(self) -> int:
        for name, value in self.headers:
            if name == b":status":
                return int(value)
        return 0  # h2 validates responses: unreachable


@dataclass(frozen=True, slots=True)
class Data:
    """Body bytes; `flow` (with padding) is what to hand to `consumed` once forwarded."""

    data: bytes
    flow: int


@dataclass(frozen=True, slots=True)
class Trailers:
    """The response's trailers; End follows."""

    headers: list[Header]


@dataclass(frozen=True, slots=True)
class End:
    """The peer ended its side of the stream: the response is whole."""


@dataclass(frozen=True, slots=True)
class Reset:
    """The stream ended without a whole response."""

    failure: StreamFailure
    code: int = ErrorCodes.CANCEL
    # Its connection went away under it, not the peer's RST_STREAM: a GOAWAY refused it, or
    # the connection was lost with nothing heard on it since the stream opened. On a pooled
    # connection, the stream most likely went out on one the peer had closed: redialled.
    stale: bool = False


Event = Response | Data | Trailers | End | Reset
_END = End()

#: Fields HPACK must never index (h2's own rule, `h2.utilities._secure_headers`): a
#: compression context shared by many requests must not let one guess another's secret.
_NEVER_INDEXED = frozenset({b"authorization", b"proxy-authorization"})


def sensitive(headers: Sequence[Header]) -> Sequence[Header]:
    """`headers` with credentials marked never-indexed, as h2's outbound normalization
    marks them (for a connection that skips it: see `checked_heads`)."""
    if not any(n in _NEVER_INDEXED or (n == b"cookie" and len(v) < 20) for n, v in headers):
        return headers
    return [
        NeverIndexedHeaderTuple(n, v)
        if n in _NEVER_INDEXED or (n == b"cookie" and len(v) < 20)
        else (n, v)
        for n, v in headers
    ]


class StreamError(Exception):
    """Sending on a stream that ended (reset by the peer, refused, or its connection lost)."""

    def __init__(self, failure: StreamFailure, code: int) -> None:
        super().__init__(f"stream {failure} (error code {code})")
        self.failure, self.code = failure, code


class NoRoom(Exception):
    """The connection takes no new stream (GOAWAY, retiring, closed, or at its stream limit)."""


_HEADS = (h2.events.ResponseReceived, h2.events.InformationalResponseReceived)


class _Connection(StreamErrors):
    """h2's connection, with three changes (as h2server's).

    A malformed response resets its stream, not the connection (agent/adapters/
    h2malformed.py): the stream fails as a reset (PROTOCOL_ERROR).

    h2 remembers `closed_streams` closed streams, not its 65,536 (about 11 MB a
    long-lived connection: a pooled upstream connection is one).

    A graceful GOAWAY lets the streams below it finish. h2 moves the connection
    to CLOSED on any GOAWAY, and then takes every later frame (the rest of those
    streams' responses) as a protocol error. RFC 9113 6.8: streams at or below
    the last-stream-id may still complete. We keep the state open; the owner
    opens no new stream once it saw the GOAWAY.
    """

    def __init__(
        self, config: h2.config.H2Configuration, closed_streams: int = MAX_CLOSED_STREAMS
    ) -> None:
        self.MAX_CLOSED_STREAMS = closed_streams  # read by h2's __init__
        super().__init__(config=config)

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if frame.error_code == ErrorCodes.NO_ERROR and state == ConnectionState.CLIENT_OPEN:
            self.state_machine.state = state
        return result


class H2Stream:
    """One request on an H2ClientConnection: send the rest of the request, read the response.

    The user must end every stream it opened: `end()` after the request (then
    read to End or Reset), or `release()` (reset unless already over; idempotent),
    which a `finally` should always call.
    """

    __slots__ = (
        "_events",
        "_failure",
        "_waiter",
        "_window",
        "connection",
        "heard_at",
        "id",
        "local_closed",
        "remote_closed",
        "unacked",
    )

    def __init__(self, connection: H2ClientConnection, stream_id: int) -> None:
        self.connection = connection
        self.id = stream_id
        self.heard_at = connection.heard  # the connection's reads when it opened
        self._events: deque[Event] = deque()
        self._waiter: asyncio.Future[None] | None = None  # a reader waiting for an event
        self._window: asyncio.Future[None] | None = None  # a writer waiting for room
        self._failure: Reset | None = None
        self.local_closed = False  # our side ended (END_STREAM sent, or reset)
        self.remote_closed = False  # End or Reset delivered to the queue
        self.unacked = 0  # flow-controlled bytes received and not yet consumed

    @property
    def failure(self) -> Reset | None:
        return self._failure

    # -- the response --------------------------------------------------------------------

    async def event(self) -> Event:
        """The next response event; after End or Reset, Reset again forever."""
        while not self._events:
            if self.remote_closed:
                return self._failure or Reset("reset", ErrorCodes.STREAM_CLOSED)
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self.event()
            yield event
            if isinstance(event, End | Reset):
                return

    def consumed(self, flow: int) -> None:
        """`flow` bytes of Data were forwarded: give the peer that much window back."""
        if flow <= 0:
            return
        self.unacked -= flow
        self.connection._acknowledge(self, flow)

    # -- the request ---------------------------------------------------------------------

    async def send(self, data: bytes, end: bool = False) -> None:
        """Send body bytes as the peer's windows and the transport allow; StreamError if
        the stream ended meanwhile."""
        connection = self.connection
        view = memoryview(data)
        while view:
            self._check()
            size = connection._room(self, len(view))
            if size <= 0:
                await self._wait_room()
                continue
            last = end and size == len(view)
            connection._send_data(self, bytes(view[:size]), last)
            view = view[size:]
        if end and not data:
            self.end()

    def send_now(self, data: bytes, end: bool = False) -> bool:
        """`send` without waiting: all of `data` (in one frame) if the windows and the
        transport take it now, else nothing (False); StreamError if the stream ended."""
        self._check()
        if self.connection._room(self, len(data)) < len(data):
            return False
        self.connection._send_data(self, data, end)
        return True

    def end(self, trailers: Sequence[Header] | None = None) -> None:
        """The request is complete (with its trailers, if any)."""
        self._check()
        self.connection._end(self, trailers)

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        """Abandon the stream (RST_STREAM `code`); its unread data is credited back."""
        if self.local_closed and self.remote_closed:
            return
        self.connection._reset(self, code)

    def release(self) -> None:
        """Done with the stream whatever its state: reset it if either side is still open."""
        if not (self.local_closed and self.remote_closed):
            self.reset(ErrorCodes.CANCEL)
        elif self.unacked:
            self.consumed(self.unacked)

    def _check(self) -> None:
        if self._failure is not None:
            raise StreamError(self._failure.failure, self._failure.code)
        if self.local_closed:
            raise StreamError("reset", ErrorCodes.STREAM_CLOSED)

    async def _wait_room(self) -> None:
        self._window = asyncio.get_running_loop().create_future()
        try:
            await self._window
        finally:
            self._window = None

    # -- from the connection -------------------------------------------------------------

    def _push(self, event: Event) -> None:
        if self.remote_closed:
            return
        if isinstance(event, End | Reset):
            self.remote_closed = True
            if isinstance(event, Reset):
                self._failure = event
                self._events.clear()  # what was not read of a failed response is worthless
                self._wake_writer()
        self._events.append(event)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _wake_writer(self) -> None:
        window = self._window
        if window is not None and not window.done():
            window.set_result(None)


class H2ClientConnection(asyncio.Protocol):
    """One HTTP/2 connection, client side. `ready` resolves once the peer's first SETTINGS
    arrived (the h2 handshake); `open` starts a stream."""

    def __init__(
        self,
        endpoint: Endpoint | None = None,
        context: ssl.SSLContext | None = None,
        on_lost: Callable[[], None] | None = None,
        *,
        max_streams: int = MAX_STREAMS,
        checked_heads: bool = False,
        closed_streams: int = MAX_CLOSED_STREAMS,
    ) -> None:
        self.endpoint = endpoint
        self.context = context  # the one it was made with: stale after a rotation
        self.on_lost = on_lost  # gives back its slot under the circuit breaker
        self.max_streams = max_streams
        # `checked_heads`: every head and trailer block given to `open` and `end` is one
        # h2 validated on receipt (a request an H2Server took) or one the agent built, so
        # h2's outbound checks and normalization would only repeat work (about half of
        # what sending a head costs); `sensitive` keeps its never-indexed rule.
        self.checked_heads = checked_heads
        self.h2 = _Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                validate_outbound_headers=not checked_heads,
                normalize_outbound_headers=not checked_heads,
                validate_inbound_headers=True,
                normalize_inbound_headers=False,
            ),
            closed_streams,
        )
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.goaway = False  # the peer sent GOAWAY: no new stream
        self.retiring = False  # ours: no new stream, close when the last one ends
        self.closed = False
        self.heard = 0  # reads from the peer so far (a stream's loss with none since is stale)
        self.writing_paused = False
        self._loop = asyncio.get_running_loop()
        self.idle_since = self._loop.time()
        self.on_idle: Callable[[H2ClientConnection], None] | None = None  # the pool's
        # Its peer and TLS, read once when it was dialled, for the lines of the streams it
        # carries (agent/core/accesslog.py); None while access logs and tracing are off.
        self.tls: Tls | None = None
        self._write_due = False  # a `_write` is scheduled
        self._queued: list[bytes] = []  # taken from h2, for that `_write`

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        h2c = self.h2
        h2c.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 0,  # no pushed streams
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: MAX_HEADER_LIST,
            },
        )
        h2c.initiate_connection()
        h2c.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._write()

    def data_received(self, data: bytes) -> None:
        self.heard += 1
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError:
            self._write()  # h2 queued the GOAWAY that says why
            self._fail_all("reset", ErrorCodes.PROTOCOL_ERROR)
            self.abort()
            return
        for event in events:
            self._dispatch(event)
        self._flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.transport = None
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"lost before its SETTINGS: {exc}"))
            self.ready.exception()  # retrieved: nobody may be waiting
        self._fail_all("reset", ErrorCodes.CANCEL, lost=True)
        if self.on_lost is not None:
            on_lost, self.on_lost = self.on_lost, None
            on_lost()
        if self.on_idle is not None:
            self.on_idle(self)

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        for stream in list(self.streams.values()):
            stream._wake_writer()

    # -- streams -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """Streams it may carry at once: the peer's limit, and ours."""
        return min(self.h2.remote_settings.max_concurrent_streams, self.max_streams)

    def available(self) -> bool:
        """Whether `open` would take a new stream now."""
        return (
            not (self.goaway or self.retiring or self.closed)
            and self.transport is not None
            and not self.transport.is_closing()
            and len(self.streams) < self.capacity
        )

    def open(self, headers: Sequence[Header], end: bool = False) -> H2Stream:
        """Send a request head on a new stream (`end`: no body follows); NoRoom if this
        connection takes no new stream now."""
        if not self.available():
            raise NoRoom
        stream_id = self.h2.get_next_available_stream_id()
        stream = H2Stream(self, stream_id)
        if self.checked_heads:
            headers = sensitive(headers)
        self.h2.send_headers(stream_id, headers, end_stream=end)
        stream.local_closed = end
        self.streams[stream_id] = stream
        self._flush()
        return stream

    def close(self) -> None:
        """Say GOAWAY and close; open streams end `reset`."""
        if self.transport is not None and not self.closed:
            try:
                self.h2.close_connection()
                self._write()
            except h2.exceptions.ProtocolError:
                pass
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def retire(self) -> None:
        """Take no new stream; close once the streams open now have ended."""
        self.retiring = True
        if not self.streams:
            self.close()

    # -- internals (H2Stream's) ----------------------------------------------------------

    def _room(self, stream: H2Stream, wanted: int) -> int:
        """How many bytes `stream` may send now: windows, frame size, and a paused transport."""
        if self.writing_paused or self.transport is None:
            return 0
        try:
            window = self.h2.local_flow_control_window(stream.id)
        except h2.exceptions.StreamClosedError:
            stream._push(Reset("reset", ErrorCodes.STREAM_CLOSED))
            return 0
        return min(window, self.h2.max_outbound_frame_size, wanted)

    def _send_data(self, stream: H2Stream, data: bytes, end: bool) -> None:
        self.h2.send_data(stream.id, data, end_stream=end)
        if end:
            stream.local_closed = True
            self._finished(stream)
        self._flush()

    def _end(self, stream: H2Stream, trailers: Sequence[Header] | None) -> None:
        if trailers:
            if self.checked_heads:
                trailers = sensitive(trailers)
            self.h2.send_headers(stream.id, trailers, end_stream=True)
        else:
            self.h2.end_stream(stream.id)
        stream.local_closed = True
        self._finished(stream)
        self._flush()

    def _reset(self, stream: H2Stream, code: int) -> None:
        if not (self.closed or (stream.remote_closed and stream.local_closed)):
            # Closed on the wire already: its End or Reset is queued.
            with contextlib.suppress(h2.exceptions.StreamClosedError):
                self.h2.reset_stream(stream.id, code)
        stream.local_closed = True
        stream._push(Reset("reset", code))
        if stream.unacked:
            self._acknowledge(stream, stream.unacked)
            stream.unacked = 0
        self._finished(stream)
        self._flush()

    def _acknowledge(self, stream: H2Stream, flow: int) -> None:
        if self.closed:
            return
        self.h2.acknowledge_received_data(flow, stream.id)
        self._flush()

    def _finished(self, stream: H2Stream) -> None:
        """Forget a stream both sides are done with; a retiring connection may close."""
        if not (stream.local_closed and stream.remote_closed):
            return
        if self.streams.pop(stream.id, None) is None:
            return
        if not self.streams:
            self.idle_since = asyncio.get_running_loop().time()
            if self.retiring or self.goaway:
                self.close()
            elif self.on_idle is not None:
                self.on_idle(self)

    # -- h2 events -----------------------------------------------------------------------

    def _dispatch(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id or 0)
            flow = event.flow_controlled_length or 0
            if stream is None or stream.remote_closed:  # reset by us: credit it back now
                if flow:
                    self.h2.acknowledge_received_data(flow, event.stream_id or 0)
                return
            stream.unacked += flow
            stream._push(Data(event.data or b"", flow))
        elif isinstance(
            event, h2.events.ResponseReceived | h2.events.InformationalResponseReceived
        ):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                headers = cast(list[Header], event.headers or [])
                end = isinstance(event, h2.events.ResponseReceived) and event.stream_ended
                stream._push(Response(headers, bool(end)))
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream._push(Trailers(cast(list[Header], event.headers or [])))
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                stream._push(_END)
                self._finished(stream)
        elif isinstance(event, h2.events.StreamReset):
            stream = self.streams.get(event.stream_id or 0)
            if stream is not None:
                code = int(event.error_code or 0)
                refused = code == ErrorCodes.REFUSED_STREAM
                stream.local_closed = True
                stream._push(Reset("refused-stream" if refused else "reset", code))
                self._finished(stream)
        elif isinstance(event, h2.events.WindowUpdated):
            if not event.stream_id:
                for stream in list(self.streams.values()):
                    stream._wake_writer()
            elif (stream := self.streams.get(event.stream_id)) is not None:
                stream._wake_writer()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            # h2 sizes the table it compresses heads with to whatever the peer allows,
            # and would keep every header sent on the connection in it: MAX_ENCODER_TABLE
            # is all it needs (a smaller table is signalled in-band).
            encoder = self.h2.encoder
            if encoder.header_table_size > MAX_ENCODER_TABLE:
                encoder.header_table_size = MAX_ENCODER_TABLE
            if not self.ready.done():
                self.ready.set_result(None)
            for stream in list(self.streams.values()):  # the initial window may have grown
                stream._wake_writer()
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._goaway(int(event.error_code or 0), event.last_stream_id or 0)

    def _goaway(self, code: int, last_stream_id: int) -> None:
        """No new stream; those above `last_stream_id` were never processed, whatever the
        code (RFC 9113 6.8); after an error, the others are lost too."""
        self.goaway = True
        for stream_id in [i for i in self.streams if i > last_stream_id]:
            stream = self.streams[stream_id]
            stream.local_closed = True
            stream._push(Reset("refused-stream", ErrorCodes.REFUSED_STREAM, stale=True))
            self._finished(stream)
        if code != ErrorCodes.NO_ERROR:
            self._fail_all("reset", code)
        if not self.streams:
            self.close()
        if not self.ready.done():
            self.ready.set_exception(ConnectionError("GOAWAY before its SETTINGS"))
            self.ready.exception()

    def _fail_all(self, failure: StreamFailure, code: int, *, lost: bool = False) -> None:
        """End every stream; `lost`: the connection is gone (a stream that heard nothing
        since it opened is stale)."""
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.local_closed = True
            stream._push(Reset(failure, code, stale=lost and stream.heard_at == self.heard))

    def _flush(self) -> None:
        """Send what h2 queued at the next turn of the event loop: a call's HEADERS, DATA
        and END_STREAM (sent in one step: `send_now`), and the frames of every stream
        that moved in this turn (50 calls in flight wake together), go out in one write,
        one TLS record and one syscall, not one each. What h2 queues meanwhile is
        bounded: DATA by the peer's windows, the rest by what the streams do in a turn.
        """
        data = self.h2.data_to_send()
        if not data:  # nothing to send (a read that asks no answer): no turn spent on it
            return
        self._queued.append(data)
        if not self._write_due:
            self._write_due = True
            self._loop.call_soon(self._write)

    def _write(self) -> None:
        self._write_due = False
        self._queued.append(self.h2.data_to_send())
        data = b"".join(self._queued)
        self._queued.clear()
        if data and self.transport is not None:
            self.transport.write(data)


async def connect(
    host: str | None,
    port: int | None,
    *,
    ssl_context: ssl.SSLContext | None = None,
    within: float = SETTINGS_TIMEOUT,
    factory: Callable[[], H2ClientConnection] = H2ClientConnection,
    sock: socket.socket | None = None,
    local_addr: tuple[str, int] | None = None,
) -> H2ClientConnection:
    """An h2 connection (h2c with prior knowledge, or TLS with ALPN h2), once the peer's
    SETTINGS arrived; OSError / TimeoutError / ConnectionError otherwise. `sock`: a
    connected socket to use (host and port None); `local_addr`: the address to dial from."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(within):
        hostname = "" if ssl_context else None
        if sock is None:
            assert host is not None and port is not None, "an address, or a socket"
            transport, connection = await loop.create_connection(
                factory,
                host,
                port,
                ssl=ssl_context,
                server_hostname=hostname,
                local_addr=local_addr,
            )
        else:
            transport, connection = await loop.create_connection(
                factory, sock=sock, ssl=ssl_context, server_hostname=hostname
            )
        try:
            await handshake(connection, within)
        except BaseException:
            transport.abort()
            raise
    return connection


async def handshake(connection: H2ClientConnection, within: float = SETTINGS_TIMEOUT) -> None:
    """Wait for the peer's first SETTINGS; over TLS, the peer must have chosen ALPN h2."""
    transport = connection.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    if ssl_object is not None and ssl_object.selected_alpn_protocol() != "h2":
        raise ConnectionError("the peer did not choose ALPN h2")
    async with asyncio.timeout(within):
        await asyncio.shield(connection.ready)


class H2Pool:
    """The h2 connections of one upstream (or app), per endpoint: shared by many streams."""

    def __init__(self, idle_timeout: float, max_streams: int = MAX_STREAMS) -> None:
        self.idle_timeout = idle_timeout
        self.max_streams = max_streams
        self.connections: dict[Endpoint, list[H2ClientConnection]] = {}
        self._dialing: dict[Endpoint, asyncio.Future[BaseException | None]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self.closed = False
        # Bumped by `retire_all`: a connection whose dial began before keeps no place.
        self.epoch = 0

    def __len__(self) -> int:
        return sum(map(len, self.connections.values()))

    def take(self, endpoint: Endpoint, context: ssl.SSLContext | None) -> H2ClientConnection | None:
        """A connection to `endpoint` made under `context` with room for a stream, or None.

        The busiest one with room first: the others empty out and close when idle.
        """
        best: H2ClientConnection | None = None
        for connection in self.connections.get(endpoint, ()):
            if connection.context is not context:
                connection.retire()
            elif connection.available() and (
                best is None or len(connection.streams) > len(best.streams)
            ):
                best = connection
        return best

    async def connection(
        self,
        endpoint: Endpoint,
        context: ssl.SSLContext | None,
        dial: Callable[[], Awaitable[H2ClientConnection]],
        *,
        fresh: bool = False,
    ) -> tuple[H2ClientConnection, bool]:
        """A connection with room for a stream now, and whether it was dialled for this
        caller (False: reused). Callers that find none while a dial to `endpoint` is under
        way wait for it (and raise its error if it fails); else `dial` (its error propagates).
        `fresh`: dial one for this caller, whatever the pool holds (a redial after a stream
        lost on a stale one). Open the stream before the next await: the room is not reserved.
        """
        while not fresh:
            connection = self.take(endpoint, context)
            if connection is not None:
                return connection, False
            pending = self._dialing.get(endpoint)
            if pending is None:
                break
            failed = await asyncio.shield(pending)
            if failed is not None:  # the endpoint failed the dial we waited for: ours too
                raise failed
        loop = asyncio.get_running_loop()
        done = self._dialing[endpoint] = loop.create_future()
        failed, epoch = None, self.epoch
        try:
            connection = await dial()
            self.add(connection, epoch)
        except Exception as exc:
            failed = exc
            raise
        finally:  # cancelled (the caller left): the waiters dial for themselves
            if self._dialing.get(endpoint) is done:
                del self._dialing[endpoint]
            done.set_result(failed)
        return connection, True

    def add(self, connection: H2ClientConnection, epoch: int | None = None) -> None:
        """A connection dialled for the pool (its `endpoint` and `context` set; `epoch`
        the pool's when its dial began).

        A closed pool keeps none, nor one whose dial began before `retire_all`: the
        connection carries the stream its caller opens now (before the next await) and
        closes when that ends, retired on the loop's next turn. Retired at once, it
        refused that stream: a call of a connection taken before a reload closed its
        upstream was answered UNAVAILABLE."""
        assert connection.endpoint is not None
        if self.closed or (epoch is not None and epoch != self.epoch):
            asyncio.get_running_loop().call_soon(connection.retire)
            return
        connection.on_idle = self._idle
        self.connections.setdefault(connection.endpoint, []).append(connection)
        self._arm()

    def retire(self, context: ssl.SSLContext | None) -> None:
        """Connections made under another context (an earlier SVID or bundle) take no new
        stream and close when their streams end."""
        for connections in list(self.connections.values()):
            for connection in list(connections):
                if connection.context is not context:
                    connection.retire()

    def retire_all(self) -> None:
        """The IDs its connections were verified against changed: none takes a new stream,
        those being dialled included (their streams in flight finish)."""
        self.epoch += 1
        self.drop(list(self.connections))

    def drop(self, endpoints: Iterable[Endpoint]) -> None:
        """Endpoints that left or were ejected: their connections retire."""
        for endpoint in endpoints:
            for connection in list(self.connections.get(endpoint, ())):
                connection.retire()

    def set_idle_timeout(self, seconds: float) -> None:
        self.idle_timeout = seconds
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
            self._close_idle()

    def close(self) -> None:
        self.closed = True
        for connections in list(self.connections.values()):
            for connection in list(connections):
                connection.retire()
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None

    def _idle(self, connection: H2ClientConnection) -> None:
        """A connection's last stream ended, or it closed: forget it if closed."""
        if connection.closed:
            connections = self.connections.get(connection.endpoint)  # type: ignore[arg-type]
            if connections and connection in connections:
                connections.remove(connection)
                if not connections:
                    del self.connections[connection.endpoint]  # type: ignore[arg-type]

    def _arm(self) -> None:
        if self._sweep is None and not self.closed:
            loop = asyncio.get_running_loop()
            self._sweep = loop.call_later(self.idle_timeout, self._close_idle)

    def _close_idle(self) -> None:
        self._sweep = None
        expiry = asyncio.get_running_loop().time() - self.idle_timeout
        for connections in list(self.connections.values()):
            for connection in list(connections):
                if not connection.streams and connection.idle_since <= expiry:
                    connection.close()
        if self.connections:
            self._arm()
