"""A grpclib server bounded before any caller is authenticated: the CA's, the control plane's.

grpclib reads a whole message into memory before the handler sees it, acking
flow control as it goes, so neither HTTP/2 window bounds it: a client that says
its message is 256 MB is sent window for 256 MB. Here each stream's bytes are
followed as they arrive (gRPC's 5-byte length prefix), and a message that says
it is longer than `max_message_bytes` is refused at once, before a byte of its
body is buffered: the caller gets RESOURCE_EXHAUSTED with the limit in the
message, the stream is reset, the handler never runs, the connection goes on.

Per connection the rest is bounded too: the HTTP/2 windows at their minimum
(64 KiB: a Sign request fits in one), `max_concurrent_streams` streams, 16 KiB
frames, header lists and header blocks (h2 alone would hold 1 MiB of
CONTINUATION frames). So what one connection holds before authentication is
at most streams x message + one window, and the `Acceptor` bounds connections.

Frames that start no call are budgeted per connection and per call. A server
whose calls last for hours (the control plane's Subscribe: the client
acknowledges every snapshot, and its window updates follow every one) also
gets `control_frames_per_second` back, up to `CONTROL_FRAMES`: a steady trickle
is served, a flood is still cut off. And each DATA frame such a server sends
earns the client `ANSWERS_PER_DATA_SENT`: the answer it owes (an Ack, two window
updates), however fast the server pushes, as in a rollout that changes
endpoints many times a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import DecodeError
from grpclib.config import Configuration
from grpclib.const import Status
from grpclib.encoding.proto import ProtoCodec
from grpclib.exceptions import GRPCError
from grpclib.metadata import encode_grpc_message
from grpclib.protocol import EventsProcessor, H2Protocol, Stream
from grpclib.server import Server
from h2.errors import ErrorCodes
from h2.events import DataReceived, RequestReceived, StreamEnded, StreamReset
from h2.exceptions import (
    DenialOfServiceError,
    NoSuchStreamError,
    ProtocolError,
    StreamClosedError,
    StreamIDTooLowError,
)
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.frame import (
    DataFrame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from identity.serving import Acceptor, ConnectionLimits, Progress, Refused, progress_of

#: The HTTP/2 minimum (and default) window; grpclib's is 4 MiB.
WINDOW = 65_535
HEADER_LIST_BYTES = 16_384  # a Sign request's headers, token included, are ~1.5 KB
PREFIX = 5  # gRPC: one compression byte, a 4-byte big-endian length
CONTROL_FRAMES = 100  # per connection...
CONTROL_FRAMES_PER_CALL = 10  # ...and per call started on it
_CONTROL = (SettingsFrame, PingFrame, WindowUpdateFrame, PriorityFrame)
SMALL_DATA = 1024  # a DATA frame shorter than this is counted with the control frames
#: What a client answers to one DATA frame the server sent it: its message's Ack (a small
#: DATA frame) and WINDOW_UPDATEs for the stream and the connection.
ANSWERS_PER_DATA_SENT = 3


#: Streams a connection may hold beyond twice its limit: those reset as they opened,
#: waiting for their tasks to be done (the next turn of the loop).
HELD_SLACK = 32
#: What processing a stream the caller is done with raises: it reset or ended it in the
#: same read (StreamClosedError), or opened a later stream after it, after which h2 no
#: longer knows it (StreamIDTooLowError): no reason to drop the connection's other calls.
GONE = (StreamClosedError, StreamIDTooLowError)


def unanswerable() -> contextlib.suppress:
    """Around the server's own answer, reset or window update for a stream it refuses:
    whatever h2 says against sending it (the caller reset the stream, passed it with a
    later one, sent GOAWAY in the same read, or allows no stream of the server's: all
    ProtocolErrors of our own frames) leaves no one to answer, and no reason to drop the
    connection with a traceback."""
    return contextlib.suppress(ProtocolError)


@dataclass(frozen=True)
class GrpcLimits:
    # The largest CSR the CA accepts (RSA-8192 with one SAN) is ~2.3 KB; 16 KiB is
    # seven times that and one HTTP/2 frame.
    max_message_bytes: int = 16_384
    max_concurrent_streams: int = 4  # an agent sends one Sign at a time
    #: The MAX_CONCURRENT_STREAMS clients are told, if more (0: the limit itself, and a
    #: stream past it is reset REFUSED_STREAM). gRPC clients queue calls past the number
    #: they are told without a word, so a server whose clients are not ours tells them
    #: more, and answers a call past the limit RESOURCE_EXHAUSTED, which they show.
    advertised_streams: int = 0


class MessageTooLarge(Exception):
    def __init__(self, declared: int, limit: int) -> None:
        super().__init__(f"message of {declared} bytes exceeds the server's limit of {limit} bytes")


class Framing:
    """Follows one stream's length-prefixed messages; raises on a length over `limit`."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._prefix = b""
        self._body_left = 0

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._body_left:
                taken = min(self._body_left, len(view))
                self._body_left -= taken
                view = view[taken:]
                continue
            wanted = PREFIX - len(self._prefix)
            self._prefix += bytes(view[:wanted])
            view = view[wanted:]
            if len(self._prefix) == PREFIX:
                declared = int.from_bytes(self._prefix[1:], "big")
                self._prefix = b""
                if declared > self._limit:
                    raise MessageTooLarge(declared, self._limit)
                self._body_left = declared


class _StrictProtoCodec(ProtoCodec):
    """A message that is not the request's protobuf is the caller's error: INVALID_ARGUMENT,
    not an "Application error" logged with its traceback, once per message a caller sends."""

    def decode(self, data: bytes, message_type: Any) -> Any:
        try:
            return super().decode(data, message_type)
        except DecodeError:
            name = getattr(message_type, "__name__", "message")
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"the message is not a well-formed {name}"
            ) from None


class _BoundedEvents(EventsProcessor):
    limits: GrpcLimits

    def __init__(
        self,
        *args: object,
        limits: GrpcLimits,
        progress: Progress | None,
        too_many: Callable[[], None],
    ) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.limits = limits
        self._counted_too_many = too_many
        self._framing: dict[int, Framing] = {}
        self._progress = progress
        self._owed: set[int] = set()  # streams whose request has arrived whole
        #: Streams the caller reset whose handlers have not ended yet: grpclib keeps them
        #: until then (the next trip through the loop: `_release_when_done`), but they
        #: are no longer the caller's, and a call that replaces one at the limit must
        #: find its slot.
        self._reset: set[int] = set()
        self._releases: dict[int, Callable[[], None]] = {}
        #: Streams refused for a message too large: what more of them arrives (in the same
        #: read, or before the caller heard) is dropped, never handed to the handler.
        self._refused: set[int] = set()

    def register(self, stream: Stream) -> Callable[[], None]:
        release = super().register(stream)
        stream_id = stream.id
        assert stream_id is not None
        self._framing[stream_id] = Framing(self.limits.max_message_bytes)

        def release_and_forget() -> None:
            if self._releases.pop(stream_id, None) is None:
                return  # released already: by its handler, or when its task was done
            self._framing.pop(stream_id, None)
            self._reset.discard(stream_id)
            self._refused.discard(stream_id)
            self._settled(stream_id)
            release()

        self._releases[stream_id] = release_and_forget
        return release_and_forget

    def _release_when_done(self, stream: Stream) -> None:
        """Before grpclib cancels `stream`'s handler: release the stream once its task is
        done. grpclib releases it when the handler ends, but a handler cancelled before
        it started never runs at all, so a caller sending HEADERS and RST_STREAM together
        would leave every such stream behind for as long as the connection lasts."""
        tasks = getattr(self.handler, "_tasks", {})  # grpclib's Server: each stream's task
        task = tasks.get(stream)
        release = self._releases.get(stream.id) if stream.id is not None else None
        if task is not None and release is not None:
            task.add_done_callback(lambda _task: release())

    def process_stream_ended(self, event: StreamEnded) -> None:
        """The caller's request is whole: from here the server owes the answer."""
        if event.stream_id in self._framing and self._progress is not None:
            self._owed.add(event.stream_id)
            self._progress.received()
        super().process_stream_ended(event)

    def process_stream_reset(self, event: StreamReset) -> None:
        """A reset stream is owed nothing. grpclib releases a stream when its handler
        ends, but a handler cancelled before it started never ends (a rapid reset)."""
        self._settled(event.stream_id)
        stream = self.streams.get(event.stream_id)
        if stream is not None:
            self._reset.add(event.stream_id)
            self._release_when_done(stream)
            if stream not in getattr(self.handler, "_tasks", {stream: None}):
                # Cancelled already (`_refuse`: its message too large): grpclib's own
                # reset would cancel it again, and its task is no longer there to pop.
                stream.__terminated__("Stream reset by remote party")
                self.connection.streams_failed += 1
                return
        super().process_stream_reset(event)

    def answer_waits_on_window(self) -> bool:
        """Whether an answer owed here has no flow-control window to go out in: the caller
        keeps it shut (SETTINGS_INITIAL_WINDOW_SIZE 0, or windows spent, never updated)."""
        h2 = self._h2
        for stream_id in self._owed:
            with contextlib.suppress(NoSuchStreamError):
                if h2.local_flow_control_window(stream_id) <= 0:
                    return True
        return False

    def _settled(self, stream_id: int) -> None:
        if stream_id in self._owed and self._progress is not None:
            self._owed.discard(stream_id)
            self._progress.answered()

    def process_request_received(self, event: RequestReceived) -> None:
        if len(self.streams) >= self.limits.max_concurrent_streams * 2 + HELD_SLACK:
            # Streams reset as they open are let go once their tasks are done, which a
            # caller that resets faster than the loop turns (one read held 9,500 of them)
            # never lets happen: a rapid reset flood, cut off (CVE-2023-44487).
            raise DenialOfServiceError("streams reset faster than they can be let go")
        # Enforced here because h2 applies our SETTINGS only once the peer acks them.
        if len(self.streams) - len(self._reset) >= self.limits.max_concurrent_streams:
            if self.limits.advertised_streams:
                self._too_many(event)
            else:
                with unanswerable():
                    self._h2.reset_stream(event.stream_id, ErrorCodes.REFUSED_STREAM)
            self.connection.flush()
            return
        super().process_request_received(event)

    def _too_many(self, event: RequestReceived) -> None:
        """A call past the limit, answered RESOURCE_EXHAUSTED (trailers only), its stream
        then reset unless the caller ended it: nothing of it is read or kept."""
        self._counted_too_many()
        limit = self.limits.max_concurrent_streams
        message = f"at most {limit} calls at once on one connection; open another connection"
        with unanswerable():
            self._h2.send_headers(
                event.stream_id,
                [
                    (":status", "200"),
                    ("content-type", "application/grpc"),
                    ("grpc-status", str(Status.RESOURCE_EXHAUSTED.value)),
                    ("grpc-message", encode_grpc_message(message)),
                ],
                end_stream=True,
            )
            self._h2.reset_stream(event.stream_id, ErrorCodes.NO_ERROR)

    def process_data_received(self, event: DataReceived) -> None:
        if event.stream_id in self._refused:  # its window is given back, its bytes dropped
            with unanswerable():
                self.connection.ack(event.stream_id, event.flow_controlled_length)
            return
        framing = self._framing.get(event.stream_id)
        try:
            if framing is not None:
                framing.feed(event.data)
        except MessageTooLarge as exc:
            self._refuse(event, exc)
            return
        super().process_data_received(event)

    def _refuse(self, event: DataReceived, exc: MessageTooLarge) -> None:
        """RESOURCE_EXHAUSTED (trailers-only, or trailers after the answer's headers if a
        stream had them already: a pseudo-header there is malformed), then RST_STREAM so
        the sender stops."""
        stream = self.streams[event.stream_id]
        self._framing.pop(event.stream_id, None)
        self._refused.add(event.stream_id)
        trailers = [
            ("grpc-status", str(Status.RESOURCE_EXHAUSTED.value)),
            ("grpc-message", encode_grpc_message(str(exc))),
        ]
        answered = self._h2.streams.get(event.stream_id)
        if answered is None or not answered.state_machine.headers_sent:
            trailers[:0] = [(":status", "200"), ("content-type", "application/grpc")]
        with unanswerable():
            self._h2.send_headers(event.stream_id, trailers, end_stream=True)
        with unanswerable():
            self._h2.reset_stream(event.stream_id, ErrorCodes.NO_ERROR)
        with unanswerable():
            self.connection.ack(event.stream_id, event.flow_controlled_length)
        self._release_when_done(stream)
        self.handler.cancel(stream)  # the handler waits for a body that will not come

    @property
    def _h2(self):  # type: ignore[no-untyped-def]
        return self.connection._connection


class _BoundedFrames(FrameBuffer):
    """h2 holds a header block's CONTINUATION frames until it ends: up to 64 frames,
    1 MiB per connection. Here a block may not grow past the header list limit.

    Frames that start no call (SETTINGS, PING, WINDOW_UPDATE, PRIORITY) each cost
    the CA work, and SETTINGS and PING an answer: a flood of them from four
    connections starved every Sign past its deadline. DATA frames of a few bytes
    (none, for an empty one) cost as much and spend little or no flow-control
    window, so they count too. A connection may send
    `CONTROL_FRAMES` of them, and `CONTROL_FRAMES_PER_CALL` more per call it
    starts (clients send a few per call: window updates, BDP pings); past that
    it is ended, as h2 ends one that breaks its own limits."""

    def __init__(self, *args: Any, refill_per_second: float = 0.0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._control_budget = float(CONTROL_FRAMES)
        self._refill = refill_per_second
        self._refilled = time.monotonic()

    def earn(self, frames: int) -> None:
        """The server sent something the client will answer: allow the answer."""
        self._control_budget += frames

    def _top_up(self) -> None:
        """Long-lived calls: give back what a steady client spends, never past the start."""
        now = time.monotonic()
        if self._control_budget < CONTROL_FRAMES:
            earned = (now - self._refilled) * self._refill
            self._control_budget = min(self._control_budget + earned, float(CONTROL_FRAMES))
        self._refilled = now

    def __next__(self) -> Any:
        frame = super().__next__()
        if isinstance(frame, HeadersFrame):
            self._control_budget += CONTROL_FRAMES_PER_CALL
        elif isinstance(frame, _CONTROL) or (
            isinstance(frame, DataFrame) and len(frame.data) < SMALL_DATA
        ):
            if self._refill:
                self._top_up()
            self._control_budget -= 1
            if self._control_budget < 0:
                raise DenialOfServiceError("too many control frames for the calls made")
        return frame

    def _update_header_buffer(self, f: Any) -> Any:
        frame = super()._update_header_buffer(f)
        if sum(len(part.data) for part in self._headers_buffer) > HEADER_LIST_BYTES:
            raise DenialOfServiceError(f"a header block over {HEADER_LIST_BYTES} bytes")
        return frame


class _BoundedProtocol(H2Protocol):
    def __init__(
        self,
        *args: object,
        limits: GrpcLimits,
        refill_per_second: float,
        too_many: Callable[[], None],
    ) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self._limits = limits
        self._refill = refill_per_second
        self._too_many = too_many

    def data_received(self, data: bytes) -> None:
        """As grpclib's, except that a caller who broke the protocol (or our limits) is
        cut off, not closed gracefully: a close waits for it to read what is queued,
        which a flooder never does."""
        try:
            events = self.connection.feed(data)
        except ProtocolError:
            self.processor.close("Protocol error")
            self._transport.abort()  # type: ignore[attr-defined]
            return
        self.connection.flush()
        try:
            for event in events:
                # A stream the caller ended or reset in the same read is no reason to drop
                # every other call on the connection.
                with contextlib.suppress(*GONE):
                    self.processor.process(event)
        except DenialOfServiceError:
            self.processor.close("Protocol error")
            self._transport.abort()  # type: ignore[attr-defined]
            return
        self.connection.flush()

    def answer_waits_on_caller(self) -> bool:
        """For the acceptor (`Answers`): an owed answer the caller's window keeps in."""
        processor = self.processor
        return isinstance(processor, _BoundedEvents) and processor.answer_waits_on_window()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._transport = transport
        h2 = self.connection._connection
        h2.update_settings(
            {
                SettingCodes.MAX_CONCURRENT_STREAMS: self._limits.advertised_streams
                or self._limits.max_concurrent_streams,
                SettingCodes.MAX_HEADER_LIST_SIZE: HEADER_LIST_BYTES,
            }
        )
        h2.decoder.max_header_list_size = HEADER_LIST_BYTES  # now, not once acked
        frames = _BoundedFrames(server=True, refill_per_second=self._refill)
        frames.max_frame_size = h2.incoming_buffer.max_frame_size
        h2.incoming_buffer = frames  # nothing has been received yet
        if self._refill:  # long-lived calls: each push earns the client its answer
            send_data = h2.send_data

            def send_and_earn(*args: Any, **kwargs: Any) -> Any:
                frames.earn(ANSWERS_PER_DATA_SENT)
                return send_data(*args, **kwargs)

            h2.send_data = send_and_earn  # type: ignore[method-assign]
        self.connection.flush()
        self.processor = _BoundedEvents(
            self.handler,
            self.connection,
            limits=self._limits,
            progress=progress_of(transport),
            too_many=self._too_many,
        )


class BoundedServer(Server):
    """grpclib's Server, served by an `Acceptor` with `_BoundedProtocol` connections."""

    def __init__(
        self,
        handlers: Collection[object],
        limits: GrpcLimits,
        *,
        control_frames_per_second: float = 0.0,
        config: Configuration | None = None,
        too_many: Callable[[], None] = lambda: None,
    ) -> None:
        """`too_many` is told of each call answered RESOURCE_EXHAUSTED past
        `limits.max_concurrent_streams` (with `limits.advertised_streams`)."""
        window = config or Configuration(
            http2_connection_window_size=WINDOW, http2_stream_window_size=WINDOW
        )
        super().__init__(handlers, codec=_StrictProtoCodec(), config=window)  # type: ignore[arg-type]
        # grpclib says "Request was cancelled" at INFO for every call its caller resets or
        # leaves: a caller starting and resetting calls as fast as it writes (no credentials
        # needed at the CA's port) would write ~170 KB of log a second. Its errors stay.
        logging.getLogger("grpclib.server").setLevel(logging.WARNING)
        self._limits = limits
        self._refill = control_frames_per_second
        self._too_many = too_many
        self.acceptor: Acceptor | None = None

    def _protocol_factory(self) -> H2Protocol:
        plain = super()._protocol_factory()
        return _BoundedProtocol(
            plain.handler,
            plain.config,
            plain.h2_config,
            limits=self._limits,
            refill_per_second=self._refill,
            too_many=self._too_many,
        )

    async def serve(
        self,
        sock: socket.socket,
        tls: ssl.SSLContext,
        limits: ConnectionLimits,
        closed: Refused,
    ) -> Acceptor:
        """Start, as `start(sock=..., ssl=...)` would, behind an acceptor."""
        self.acceptor = Acceptor(sock, self._protocol_factory, tls, limits, closed)
        self.acceptor.start()
        self._server = self.acceptor  # type: ignore[assignment]
        self._server_closed_fut = asyncio.get_running_loop().create_future()
        return self.acceptor

    def close(self) -> None:
        super().close()
        if self.acceptor is not None:
            self.acceptor.abort_clients()
