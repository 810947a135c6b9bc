"""The server side of an HTTP/2 connection, on `h2` (python-hyper), as an asyncio.Protocol.

Any transport serves: TLS from a peer agent (ALPN h2) or h2c from the local
app (prior knowledge). h2 does the framing, HPACK and the protocol's state
machine; this module holds the connection to the limits of
agent/core/h2limits.py, counts each limit reached (`outrider_http2_limits_total`
through the `hit` callback), and hands every request stream to a handler as an
`H2Stream`:

    async def handler(stream: H2Stream) -> None:
        stream.headers                 # [(name, value)] as bytes, pseudo-headers first
        chunk = await stream.read()    # b"" at the end; credit for the chunk before
                                       #   is returned to the client on this call
        stream.trailers                # after read() returned b"", or None
        await stream.respond(headers)  # the response head (end=True: the whole answer)
        await stream.send(data)        # waits for the client's window and a writable socket
        await stream.end(trailers)     # END_STREAM, with trailers or without
        stream.reset(code)             # RST_STREAM

Backpressure both ways: the client's data is credited only as the handler
reads on (so a connection buffers at most the connection window it was
advertised), and `send` sends no more than the client's windows allow and waits
while the transport's buffer is full. A stream the client resets cancels its
handler (the handler's `finally` ends whatever it opened); a handler that
returns without ending its stream resets it (INTERNAL_ERROR).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.connection import ConnectionState
from h2.errors import ErrorCodes
from h2.stream import StreamClosedBy
from hyperframe.frame import (
    DataFrame,
    ExtensionFrame,
    Frame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from agent.adapters.h2client import sensitive
from agent.adapters.h2malformed import MalformedReset, StreamErrors
from agent.core.h2limits import FrameBudget, H2Limits, Limit, Window

log = logging.getLogger("outrider.agent")

Headers = list[tuple[bytes, bytes]]
Handler = Callable[["H2Stream"], Awaitable[None]]


class StreamReset(Exception):
    """The stream is gone (reset by either side, or its connection closed)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"stream reset ({code})")
        self.code = code


class H2Stream:
    """One request stream, as a handler sees it."""

    def __init__(self, server: H2Server, stream_id: int, headers: Headers, ended: bool) -> None:
        self.server = server
        self.id = stream_id
        self.headers = headers
        self.trailers: Headers | None = None
        self.reset_code: int | None = None  # set once the stream is gone
        self.responded = False  # the response head was sent
        self.finished = False  # END_STREAM (or RST_STREAM) sent: nothing more goes out
        self._chunks: deque[tuple[bytes, int]] = deque()  # (data, flow-controlled length)
        self._ended = ended  # the client's END_STREAM arrived
        self.bodiless = ended  # it came on the HEADERS: no body, no trailers
        self._credit = 0  # flow-controlled bytes handed to the handler, not yet credited
        self.buffered = 0  # flow-controlled bytes held in `_chunks`
        self._changed = asyncio.Event()  # data, end, reset, or a window opened
        self.task: asyncio.Task[None] | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of a header (or pseudo-header), or None."""
        return next((v for n, v in self.headers if n == name), None)

    # -- from the client ----------------------------------------------------------------

    async def read(self) -> bytes:
        """The next body chunk, b"" at the end; the chunk read before is credited now.

        Raises StreamReset when the stream is gone.
        """
        self._give_credit()
        while not self._chunks:
            if self.reset_code is not None:
                raise StreamReset(self.reset_code)
            if self._ended:
                return b""
            self._changed.clear()
            await self._changed.wait()
        data, length = self._chunks.popleft()
        self.buffered -= length
        self._credit = length
        return data

    def read_now(self) -> bytes | None:
        """`read` without waiting: None when it would wait (nothing has come yet). A
        handler that forwards what is at hand at once needs no task to wait for it."""
        if not self._chunks and not self._ended and self.reset_code is None:
            return None
        self._give_credit()
        if not self._chunks:
            if self.reset_code is not None:
                raise StreamReset(self.reset_code)
            return b""
        data, length = self._chunks.popleft()
        self.buffered -= length
        self._credit = length
        return data

    def _give_credit(self) -> None:
        if self._credit:
            self.server.credit(self.id, self._credit)
            self._credit = 0

    def _data(self, data: bytes, length: int) -> None:
        if not data:  # padding only: nothing to hold, credit at once
            self.server.credit(self.id, length)
            return
        self._chunks.append((data, length))
        self.buffered += length
        self._changed.set()

    def _end(self) -> None:
        self._ended = True
        self._changed.set()

    def _gone(self, code: int) -> None:
        """Reset (by either side) or the connection closed: wake whoever waits."""
        if self.reset_code is None:
            self.reset_code = code
        self.finished = True
        self._changed.set()

    def _release(self) -> int:
        """The stream's handler is done: the credit it still held, to return."""
        held = self._credit + self.buffered
        self._chunks.clear()
        self._credit = self.buffered = 0
        return held

    # -- to the client ------------------------------------------------------------------

    async def respond(self, headers: Headers, end: bool = False) -> None:
        """Send the response head (a 1xx first, if wanted); `end`: it is the whole response."""
        await self.server.writable(self)
        self.responded = self.responded or not headers[0][1].startswith(b"1")
        self.server.send_headers(self, headers, end)

    async def send(self, data: bytes, end: bool = False) -> None:
        """Send body data as the client's windows allow; waits while they are shut."""
        view = memoryview(data)
        stalled: float | None = None  # since when the windows have been shut
        while view:
            await self.server.writable(self)
            size = self.server.room(self)
            if size <= 0:
                self._changed.clear()
                stalled = await self.server.window_opened(self, stalled)
                continue
            stalled = None
            self.server.send_data(self, bytes(view[:size]), False)
            view = view[size:]
        if end:
            await self.end()

    async def end(self, trailers: Headers | None = None) -> None:
        """End the response, with trailers or without."""
        await self.server.writable(self)
        self.server.end(self, trailers)

    def reset(self, code: int = ErrorCodes.CANCEL) -> None:
        """RST_STREAM: the client gets no more of this stream."""
        self.server.reset(self, code)


class Flood(h2.exceptions.ProtocolError):
    """The peer broke a frame budget: h2 answers it with GOAWAY ENHANCE_YOUR_CALM."""

    error_code = ErrorCodes.ENHANCE_YOUR_CALM

    def __init__(self, limit: Limit) -> None:
        super().__init__(f"HTTP/2 limit reached: {limit}")
        self.limit = limit


class _Connection(StreamErrors):
    """h2's server connection, with four changes.

    A malformed request resets its stream, not the connection (agent/adapters/
    h2malformed.py); each such reset is one the peer provoked (the reset budget).

    h2 remembers `max_closed_streams` closed streams, not its 65,536 (about 11 MB a
    long-lived connection).

    A client's graceful GOAWAY lets the streams it opened before it finish (RFC 9113
    6.8): h2 would close at once and refuse their responses. No new stream is taken once
    it came (`H2Server._closing`).

    Every frame received is held to the connection's `FrameBudget` as h2 takes it: the
    frames that carry nothing never reach us as events (h2 drops an empty DATA frame's
    nothing, answers a frame on a reset stream with RST_STREAM itself), so they are
    counted here, and a frame over budget stops the read with GOAWAY ENHANCE_YOUR_CALM
    (`Flood`).
    """

    def __init__(
        self,
        config: h2.config.H2Configuration,
        budget: FrameBudget,
        now: Callable[[], float],
        closed_streams: int,
    ) -> None:
        self.MAX_CLOSED_STREAMS = closed_streams  # read by h2's __init__
        super().__init__(config=config)
        self.budget = budget
        self._now = now
        self._provoked = -1  # RST_STREAMs h2 queued while taking a frame; -1: not taking one

    def _receive_frame(self, frame: Frame) -> Any:
        self._provoked = 0
        try:
            events = super()._receive_frame(frame)
        finally:
            provoked, self._provoked = self._provoked, -1
        budget = self.budget
        limit: Limit | None = None
        if isinstance(frame, DataFrame):
            limit = budget.received_data(bool(frame.data) or "END_STREAM" in frame.flags)
        elif isinstance(frame, PriorityFrame):
            limit = budget.received_priority()
        elif isinstance(frame, WindowUpdateFrame):
            limit = budget.received_window_update()
        elif _inert(frame, events):
            limit = budget.received_inert()
        budget.streams += sum(isinstance(e, h2.events.RequestReceived) for e in events)
        for _ in range(provoked):
            limit = limit or budget.provoked_reset(self._now())
        if limit is not None:
            raise Flood(limit)
        return events

    def malformed(self, stream_id: int) -> None:
        if self._provoked >= 0:
            self._provoked += 1

    def _prepare_for_sending(self, frames: list[Frame]) -> None:
        if self._provoked >= 0:  # h2 answers the frame it is taking with these
            # Counted only for a stream the peer reset itself: frames it sends on one after
            # that are never in flight by accident, while those on a stream the agent reset
            # (an early answer, a deadline) may have been sent before the peer knew.
            self._provoked += sum(
                isinstance(f, RstStreamFrame)
                and self._stream_closed_by(f.stream_id) == StreamClosedBy.RECV_RST_STREAM
                for f in frames
            )
        super()._prepare_for_sending(frames)

    def _receive_goaway_frame(self, frame: Any) -> Any:
        state = self.state_machine.state
        result = super()._receive_goaway_frame(frame)
        if frame.error_code == ErrorCodes.NO_ERROR and state == ConnectionState.SERVER_OPEN:
            self.state_machine.state = state
        return result


class H2Server(asyncio.Protocol):
    """One h2 server connection: limits, flow control, and a handler task per stream."""

    def __init__(
        self,
        handler: Handler,
        hit: Callable[[Limit], None],
        *,
        idle_timeout: float,
        limits: H2Limits | None = None,
        on_closed: Callable[[H2Server], None] = lambda _: None,
        clock: Callable[[], float] | None = None,
        checked_heads: bool = False,
    ) -> None:
        self.handler = handler
        self.hit = hit  # a limit was reached: counted by the caller
        self.limits = limits = limits or H2Limits()
        self.idle_timeout = idle_timeout
        self.on_closed = on_closed
        self._clock = clock
        # `checked_heads`: the handler only sends heads and trailers that h2 validated on
        # receipt (a response an H2ClientConnection took) or that the agent built, so
        # h2's outbound checks and normalization would only repeat work (about half of
        # what sending a head costs); h2client.sensitive keeps its never-indexed rule.
        # Not for a handler that sends what an HTTP/1.1 app answered: h2 checks those.
        self.checked_heads = checked_heads
        config = h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_inbound_headers=True,
            normalize_inbound_headers=True,
            validate_outbound_headers=not checked_heads,
            normalize_outbound_headers=not checked_heads,
        )
        self.budget = FrameBudget(limits)
        self.conn = _Connection(config, self.budget, self._now, limits.max_closed_streams)
        # Our SETTINGS as the first frame says them; h2 applies them once acknowledged,
        # and our own checks below hold from the first byte.
        self.conn.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: limits.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: limits.max_header_list,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: limits.stream_window,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: limits.max_frame_size,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.conn.decoder.max_header_list_size = limits.max_header_list
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, H2Stream] = {}  # streams whose handler is running
        self._resets = Window(limits.max_resets, limits.window)
        self._settings = Window(limits.max_settings, limits.window)
        self._pings = Window(limits.max_pings, limits.window)
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._closing = False  # GOAWAY sent or received: no new streams
        self.closed = False
        self._active = False  # a frame moved since the idle timer last looked
        self._idle: asyncio.TimerHandle | None = None
        self._unread: asyncio.TimerHandle | None = None  # the peer has stopped taking writes
        self._loop: asyncio.AbstractEventLoop | None = None
        self._write_due = False  # a `_write` is scheduled
        self._queued: list[bytes] = []  # taken from h2, for that `_write`

    @property
    def paused(self) -> bool:
        """The peer is not taking what is written (the transport's buffer is full)."""
        return not self._can_write.is_set()

    def _now(self) -> float:
        return self._clock() if self._clock is not None else asyncio.get_running_loop().time()

    # -- asyncio.Protocol -----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self._loop = asyncio.get_running_loop()
        # The transport's own flow control: pause_writing past write_high.
        self.transport.set_write_buffer_limits(high=self.limits.write_high)
        self.conn.initiate_connection()
        extra = self.limits.connection_window - 65_535
        if extra > 0:
            self.conn.increment_flow_control_window(extra)
        self._write()
        self._idle = asyncio.get_running_loop().call_later(self.idle_timeout, self._check_idle)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self._active = True
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # h2 queued the GOAWAY
            self.hit(_limit_of(exc))
            self._flush()
            self.close()
            return
        try:
            for event in events:
                self._event(event)
                if self.closed:
                    return
        except h2.exceptions.ProtocolError as exc:  # a frame h2 took, then we could not act on
            self.hit(_limit_of(exc))
            self.conn.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self._flush()
            self.close()
            return
        if self._continuing():
            return
        self._flush()

    def eof_received(self) -> bool:
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.close()
        self.transport = None

    def pause_writing(self) -> None:
        # The peer is not reading what we write: write nothing more, and read nothing more
        # either, so nothing it sends (PINGs, SETTINGS, requests) queues answers meanwhile.
        self._can_write.clear()
        if self.transport is not None:
            self.transport.pause_reading()
        if self._unread is None and self._loop is not None and not self.closed:
            self._unread = self._loop.call_later(self.limits.send_timeout, self._slow_read)

    def resume_writing(self) -> None:
        self._can_write.set()
        if self._unread is not None:
            self._unread.cancel()
            self._unread = None
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    # -- events -------------------------------------------------------------------------

    def _event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._request(event)
        elif isinstance(event, h2.events.DataReceived):
            stream = self.streams.get(event.stream_id)
            length = event.flow_controlled_length or 0
            if stream is None:  # its handler is done: credit the connection at once
                self.credit(event.stream_id, length)
            else:
                stream._data(event.data or b"", length)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream._end()
        elif isinstance(event, h2.events.TrailersReceived):
            stream = self.streams.get(event.stream_id)
            if stream is not None:
                stream.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamReset):
            if isinstance(event, MalformedReset):
                self.hit("protocol_error")
            self._reset(event)
        elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            if isinstance(event, h2.events.RemoteSettingsChanged):
                self._flood(self._settings, "settings_flood")
                self._cap_encoder()
            self._opened(event)
        elif isinstance(event, h2.events.PingReceived):
            self._flood(self._pings, "ping_flood")
        elif isinstance(event, h2.events.ConnectionTerminated):
            self._closing = True  # the client's GOAWAY: finish what is open
            if not self.streams:
                self.close()

    def _cap_encoder(self) -> None:
        """h2 sizes the table it compresses headers with to whatever the peer allows; it
        never needs more than `max_encoder_table` (a smaller one is signalled in-band)."""
        encoder = self.conn.encoder
        if encoder.header_table_size > self.limits.max_encoder_table:
            encoder.header_table_size = self.limits.max_encoder_table

    def _request(self, event: h2.events.RequestReceived) -> None:
        stream_id = event.stream_id
        if self._closing or len(self.streams) >= self.limits.max_concurrent_streams:
            # After a GOAWAY either way, or past the limit (handlers of streams the client
            # reset count until they are done, so resets cannot put more than the limit to
            # work at once): refused, and each refusal is one the peer provoked.
            if not self._closing:
                self.hit("concurrent_streams")
            self._refuse(stream_id, ErrorCodes.REFUSED_STREAM)
            limit = self.budget.provoked_reset(self._now())
            if limit is not None:
                self._calm(limit)
            return
        headers = cast(Headers, list(event.headers or []))
        ended = event.stream_ended is not None
        stream = H2Stream(self, stream_id, headers, ended)
        self.streams[stream_id] = stream
        stream.task = asyncio.get_running_loop().create_task(self._serve(stream))

    def _refuse(self, stream_id: int, code: int) -> None:
        """RST_STREAM, unless the stream is closed already (the client reset it in the same
        read: h2 has processed every frame of a read before its events are handled)."""
        with contextlib.suppress(h2.exceptions.StreamClosedError):
            self.conn.reset_stream(stream_id, code)

    async def _serve(self, stream: H2Stream) -> None:
        try:
            await self.handler(stream)
        except (StreamReset, asyncio.CancelledError):
            pass
        except Exception:  # a handler's bug: its stream is reset, the connection goes on
            log.exception("HTTP/2 stream %d: the handler failed", stream.id)
        finally:
            self._done(stream)

    def _done(self, stream: H2Stream) -> None:
        self.streams.pop(stream.id, None)
        held = stream._release()
        if self.closed:
            return
        if not stream.finished:  # the handler ended without ending its stream
            self.reset(stream, ErrorCodes.INTERNAL_ERROR)
        elif not stream._ended and stream.reset_code is None:
            # Answered before the request was whole: the rest of it is not wanted
            # (RFC 9113 8.1), so the client stops sending rather than stall on its window.
            stream._gone(ErrorCodes.NO_ERROR)
            self._refuse(stream.id, ErrorCodes.NO_ERROR)
        if held:
            self.credit(stream.id, held)
        if self._closing and not self.streams:
            self.close()
        else:
            self._flush()

    def _reset(self, event: h2.events.StreamReset) -> None:
        stream = self.streams.get(event.stream_id)
        if event.remote_reset and self._resets.hit(self._now()):
            self._calm("rapid_reset")
            return
        if stream is not None:
            stream._gone(int(event.error_code or 0))
            if stream.task is not None:
                stream.task.cancel()

    def _opened(self, event: h2.events.Event) -> None:
        """A window opened (or the initial window changed): wake the senders it concerns."""
        stream_id = getattr(event, "stream_id", 0)
        for stream in self.streams.values() if not stream_id else [self.streams.get(stream_id)]:
            if stream is not None:
                stream._changed.set()

    def _flood(self, window: Window, limit: Limit) -> None:
        if window.hit(self._now()):
            self._calm(limit)

    def _calm(self, limit: Limit) -> None:
        """A limit that ends the connection: GOAWAY ENHANCE_YOUR_CALM, counted."""
        self.hit(limit)
        self.conn.close_connection(ErrorCodes.ENHANCE_YOUR_CALM)
        self._flush()
        self.close()

    def _continuing(self) -> bool:
        """A header block still arriving beyond its bounds ends the connection (CONTINUATION
        floods). h2 holds the block's frames until END_HEADERS and stops at 64 of them
        itself; its list is private, so this bound is checked here, after every read."""
        pending = getattr(self.conn.incoming_buffer, "_headers_buffer", ())
        if not pending:
            return False
        size = sum(len(frame.data) for frame in pending)
        if len(pending) > self.limits.max_continuations or size > self.limits.max_header_list:
            self._calm("continuation")
            return True
        return False

    # -- to the client (H2Stream calls these) ---------------------------------------------

    async def writable(self, stream: H2Stream) -> None:
        """Wait while the transport's buffer is full; StreamReset once the stream is gone."""
        while True:
            if stream.finished or self.closed:
                raise StreamReset(stream.reset_code or ErrorCodes.STREAM_CLOSED)
            if self._can_write.is_set():
                return
            await self._can_write.wait()

    async def window_opened(self, stream: H2Stream, since: float | None) -> float:
        """Wait for something to change on a stream whose windows are shut (since `since`,
        or now); returns since when. Shut for `stall_timeout`, whatever else came meanwhile
        (a window update for another stream), it is reset (counted `slow_read`), as
        StreamReset."""
        loop = asyncio.get_running_loop()
        since = loop.time() if since is None else since
        try:
            async with asyncio.timeout_at(since + self.limits.stall_timeout):
                await stream._changed.wait()
            return since
        except TimeoutError:
            self.hit("slow_read")
            self.reset(stream, ErrorCodes.CANCEL)
            raise StreamReset(ErrorCodes.CANCEL) from None

    def room(self, stream: H2Stream) -> int:
        """Bytes `stream` may send now: the client's windows, one frame at most."""
        try:
            window = self.conn.local_flow_control_window(stream.id)
        except h2.exceptions.StreamClosedError:
            stream._gone(ErrorCodes.STREAM_CLOSED)
            raise StreamReset(ErrorCodes.STREAM_CLOSED) from None
        return min(window, self.conn.max_outbound_frame_size)

    def send_headers(self, stream: H2Stream, headers: Headers, end: bool) -> None:
        head = sensitive(headers) if self.checked_heads else headers
        self._send(stream, lambda: self.conn.send_headers(stream.id, head, end_stream=end))
        stream.finished = stream.finished or end

    def send_data(self, stream: H2Stream, data: bytes, end: bool) -> None:
        self._send(stream, lambda: self.conn.send_data(stream.id, data, end_stream=end))
        self.budget.data_sent += 1
        stream.finished = stream.finished or end

    def end(self, stream: H2Stream, trailers: Headers | None) -> None:
        if trailers:
            tail = sensitive(trailers) if self.checked_heads else trailers
            self._send(stream, lambda: self.conn.send_headers(stream.id, tail, end_stream=True))
        else:
            self._send(stream, lambda: self.conn.end_stream(stream.id))
        stream.finished = True

    def _send(self, stream: H2Stream, write: Callable[[], None]) -> None:
        try:
            write()
        except h2.exceptions.ProtocolError:  # the stream or the connection has closed
            stream._gone(ErrorCodes.STREAM_CLOSED)
            raise StreamReset(ErrorCodes.STREAM_CLOSED) from None
        self._pings.clear()  # the peer got more than PING answers: its PINGs are no flood
        self._flush()

    def reset(self, stream: H2Stream, code: int) -> None:
        if stream.finished or self.closed:
            stream._gone(code)
            return
        stream._gone(code)
        self._refuse(stream.id, code)
        self._flush()

    def credit(self, stream_id: int, length: int) -> None:
        """Return `length` flow-controlled bytes of the client's to its windows."""
        if length and not self.closed:
            self.conn.acknowledge_received_data(length, stream_id)
            self._flush()

    def _flush(self) -> None:
        """Send what h2 queued at the next turn of the event loop: the frames of every
        stream that moved in this turn (a response's head, body and trailers; the answers
        of every call that woke together) go out in one write, one TLS record and one
        syscall, not one each. What h2 queues meanwhile is bounded: DATA by the client's
        windows, the rest by what the streams do in a turn. `close` writes it at once.
        """
        data = self.conn.data_to_send()
        if not data:  # nothing to send (a read that asks no answer): no turn spent on it
            return
        self._queued.append(data)
        if self._write_due:
            return
        if self._loop is None:
            self._write()
            return
        self._write_due = True
        self._loop.call_soon(self._write)

    def _write(self) -> None:
        self._write_due = False
        self._queued.append(self.conn.data_to_send())
        data = b"".join(self._queued)
        self._queued.clear()
        if data and self.transport is not None and not self.transport.is_closing():
            self._active = True
            self.transport.write(data)

    # -- lifetime -----------------------------------------------------------------------

    def finish(self) -> None:
        """Draining: GOAWAY (no new streams), close once the open ones are done."""
        if self.closed:
            return
        if not self._closing:
            self._closing = True
            # h2 takes its own GOAWAY as the end of the connection and would refuse the
            # responses still owed; RFC 9113 6.8 lets the streams below it finish.
            state = self.conn.state_machine.state
            self.conn.close_connection(ErrorCodes.NO_ERROR)
            self.conn.state_machine.state = state
            self._flush()
        if not self.streams:
            self.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._idle is not None:
            self._idle.cancel()
        if self._unread is not None:
            self._unread.cancel()
        for stream in list(self.streams.values()):
            stream._gone(ErrorCodes.CANCEL)
            if stream.task is not None:
                stream.task.cancel()
        transport = self.transport
        if transport is not None:
            self._write()  # what h2 queued (a GOAWAY that says why) goes before the close
            if self.paused:
                # The peer is not taking what was written: it would not read a GOAWAY
                # either, and a close would wait on it for ever.
                transport.abort()
            else:
                transport.close()  # flushes what is written (the GOAWAY), then closes
                if transport.get_write_buffer_size() and self._loop is not None:
                    self._loop.call_later(self.limits.send_timeout, transport.abort)
        self.on_closed(self)

    def _slow_read(self) -> None:
        """The peer took nothing written for `send_timeout`: drop the connection."""
        self._unread = None
        if not self.closed:
            self.hit("slow_read")
            self.abort()

    def _check_idle(self) -> None:
        if self.closed:
            return
        if self._active:
            self._active = False
            loop = asyncio.get_running_loop()
            self._idle = loop.call_later(self.idle_timeout, self._check_idle)
            return
        # Nothing moved either way for idle_timeout: a GOAWAY, then close.
        self.conn.close_connection(ErrorCodes.NO_ERROR)
        self._flush()
        self.close()


def _inert(frame: Frame, events: list[h2.events.Event]) -> bool:
    """A frame h2 took without a word that does nothing here: an RST_STREAM for a stream
    not open (h2 ignores those, idle streams' included), an extension frame, an ACK of a
    PING (the server sends none) or of SETTINGS (it sends one)."""
    if isinstance(frame, RstStreamFrame):
        return not any(isinstance(e, h2.events.StreamReset) for e in events)
    if isinstance(frame, PingFrame | SettingsFrame):
        return "ACK" in frame.flags
    return isinstance(frame, ExtensionFrame)


def _limit_of(exc: h2.exceptions.ProtocolError) -> Limit:
    """Which limit a protocol error h2 raised stands for."""
    if isinstance(exc, Flood):
        return exc.limit
    if isinstance(exc, h2.exceptions.DenialOfServiceError):
        return "header_list"  # the decoded header list outgrew max_header_list_size
    if isinstance(exc, h2.exceptions.TooManyStreamsError):
        return "concurrent_streams"
    if isinstance(exc, h2.exceptions.FlowControlError):
        return "flow_control"
    if "continuation" in str(exc).lower():
        return "continuation"
    return "protocol_error"
