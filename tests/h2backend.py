"""A small h2c server in the test's own event loop, built on `h2`: the app behind an h2 or gRPC
outbound, or the peer of an h2 client under test.

Each stream is read whole, then answered by `reply(request)`: by default a gRPC call
(content-type application/grpc) gets its body echoed with grpc-status 0 in the trailers, and
anything else a 200 whose body is the backend's name; either way `x-backend: NAME` is in the
response head, so a test sees which backend served it. A reply can also be a trailers-only
gRPC error (`grpc_error`), a reset (`Reset(code)`), or a GOAWAY (`GoAway`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes

from agent.adapters import h2client

Headers = list[tuple[bytes, bytes]]


@dataclass
class Request:
    headers: Headers
    body: bytes
    trailers: Headers | None
    connection: int  # which connection of the backend (0, 1, ...) carried it

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in self.headers if n == name), None)

    @property
    def grpc(self) -> bool:
        return (self.header(b"content-type") or b"").startswith(b"application/grpc")


@dataclass
class Answer:
    headers: Headers
    body: bytes = b""
    trailers: Headers | None = None


@dataclass
class Reset:
    code: int = ErrorCodes.REFUSED_STREAM


@dataclass
class GoAway:
    """GOAWAY with this stream refused: last-stream-id just below it."""

    code: int = ErrorCodes.NO_ERROR


Reply = Callable[[Request], Awaitable[Answer | Reset | GoAway]]


def grpc_error(code: int, message: str = "") -> Answer:
    """A trailers-only gRPC response (one HEADERS frame, END_STREAM)."""
    return Answer(
        [
            (b":status", b"200"),
            (b"content-type", b"application/grpc"),
            (b"grpc-status", str(code).encode()),
            (b"grpc-message", message.encode()),
        ]
    )


@dataclass
class H2Backend:
    name: str
    reply: Reply | None = None
    max_streams: int = 100
    early: bool = False  # answer on the request head, without waiting for its body
    stall: bool = False  # read no body: give no flow-control credit back
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    connections: int = 0  # accepted so far
    open: set[_Server] = field(default_factory=set)

    async def answer(self, request: Request) -> Answer | Reset | GoAway:
        self.requests.append(request)
        if self.reply is not None:
            return await self.reply(request)
        name = (b"x-backend", self.name.encode())
        if request.grpc:
            return Answer(
                [(b":status", b"200"), (b"content-type", b"application/grpc"), name],
                request.body,
                [(b"grpc-status", b"0")],
            )
        return Answer([(b":status", b"200"), name], self.name.encode())

    def kill(self) -> None:
        """Abort every connection (as a killed process would leave them)."""
        for server in list(self.open):
            if server.transport is not None:
                server.transport.abort()


@asynccontextmanager
async def h2_backend(
    name: str,
    reply: Reply | None = None,
    max_streams: int = 100,
    sock: socket.socket | None = None,
    early: bool = False,
) -> AsyncIterator[H2Backend]:
    """An H2Backend listening on 127.0.0.1 (its `port`), or on the listening `sock` (a
    pod's, say), for the block; `early`: it answers on the request head."""
    backend = H2Backend(name, reply, max_streams, early)
    loop = asyncio.get_running_loop()
    if sock is None:
        server = await loop.create_server(lambda: _Server(backend), "127.0.0.1", 0)
    else:
        server = await loop.create_server(lambda: _Server(backend), sock=sock)
    backend.port = server.sockets[0].getsockname()[1]
    try:
        yield backend
    finally:
        server.close()
        backend.kill()


class _Server(asyncio.Protocol):
    def __init__(self, backend: H2Backend) -> None:
        self.backend = backend
        self.number = backend.connections
        backend.connections += 1
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.h2 = h2.connection.H2Connection(config)
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: backend.max_streams},
        )
        self.transport: asyncio.Transport | None = None
        self.bodies: dict[int, bytearray] = {}
        self.heads: dict[int, Headers] = {}
        self.trailers: dict[int, Headers] = {}
        self.windows: dict[int, asyncio.Event] = {}
        self.tasks: set[asyncio.Task[None]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.backend.open.add(self)
        self.h2.initiate_connection()
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.backend.open.discard(self)
        self.transport = None
        for task in self.tasks:
            task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except Exception:
            self.flush()
            if self.transport is not None:
                self.transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                self.heads[event.stream_id] = list(event.headers)
                self.bodies[event.stream_id] = bytearray()
                if self.backend.early:
                    self.start(event.stream_id)
            elif isinstance(event, h2.events.DataReceived):
                if event.stream_id in self.bodies:
                    self.bodies[event.stream_id] += event.data
                if not self.backend.stall:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.TrailersReceived):
                self.trailers[event.stream_id] = list(event.headers)
            elif isinstance(event, h2.events.StreamEnded):
                if event.stream_id in self.heads:
                    self.start(event.stream_id)
            elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
                for window in self.windows.values():
                    window.set()
            elif isinstance(event, h2.events.StreamReset):
                self.windows.pop(event.stream_id, asyncio.Event()).set()
        self.flush()

    def start(self, stream_id: int) -> None:
        task = asyncio.get_running_loop().create_task(self.serve(stream_id))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def serve(self, stream_id: int) -> None:
        request = Request(
            self.heads.pop(stream_id),
            bytes(self.bodies.pop(stream_id)),
            self.trailers.pop(stream_id, None),
            self.number,
        )
        answer = await self.backend.answer(request)
        if self.transport is None:
            return
        with contextlib.suppress(Exception):  # the client went away meanwhile
            if isinstance(answer, Reset):
                self.h2.reset_stream(stream_id, answer.code)
            elif isinstance(answer, GoAway):
                # h2 would take the connection as closed, and answer no stream below it.
                state = self.h2.state_machine.state
                self.h2.close_connection(answer.code, last_stream_id=stream_id - 2)
                if answer.code == ErrorCodes.NO_ERROR:
                    self.h2.state_machine.state = state
            else:
                await self.send(stream_id, answer)
        self.flush()

    async def send(self, stream_id: int, answer: Answer) -> None:
        ends_with_head = not answer.body and not answer.trailers
        self.h2.send_headers(stream_id, answer.headers, end_stream=ends_with_head)
        view = memoryview(answer.body)
        window = self.windows[stream_id] = asyncio.Event()
        while view:
            room = min(
                self.h2.local_flow_control_window(stream_id),
                self.h2.max_outbound_frame_size,
                len(view),
            )
            if room <= 0:
                self.flush()
                window.clear()
                await window.wait()
                continue
            self.h2.send_data(stream_id, bytes(view[:room]))
            view = view[room:]
        del self.windows[stream_id]
        if answer.trailers:
            self.h2.send_headers(stream_id, answer.trailers, end_stream=True)
        elif answer.body:
            self.h2.end_stream(stream_id)

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and self.transport is not None:
            self.transport.write(data)


@dataclass
class Answered:
    """What an h2 client got for one request."""

    status: int
    headers: Headers
    body: bytes
    trailers: Headers
    reset: str | None = None  # the stream's failure, if it was reset

    def header(self, name: bytes) -> bytes | None:
        return next((v for n, v in [*self.headers, *self.trailers] if n == name), None)

    @property
    def grpc_status(self) -> int | None:
        value = self.header(b"grpc-status")
        return None if value is None else int(value)

    @property
    def backend(self) -> str:
        return (self.header(b"x-backend") or b"").decode()


def grpc_head(path: str = "/demo.Greeter/SayHello", **extra: str) -> Headers:
    """A gRPC call's request head, as grpcio sends it (extra headers by keyword)."""
    head = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":authority", b"backend"),
        (b":path", path.encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ]
    return head + [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]


async def exchange(
    connection: h2client.H2ClientConnection,
    head: Headers,
    body: bytes = b"\0\0\0\0\0",
    within: float = 10.0,
) -> Answered:
    """Send one request on `connection` (the agent's h2c outbound, say) and read it whole."""
    stream = connection.open(head, end=not body)
    try:
        async with asyncio.timeout(within):
            if body:
                await stream.send(body, end=True)
            answered = Answered(0, [], b"", [])
            async for event in stream:
                if isinstance(event, h2client.Response) and event.status >= 200:
                    answered.status, answered.headers = event.status, event.headers
                elif isinstance(event, h2client.Data):
                    answered.body += event.data
                    stream.consumed(event.flow)
                elif isinstance(event, h2client.Trailers):
                    answered.trailers = event.headers
                elif isinstance(event, h2client.Reset):
                    answered.reset = event.failure
            return answered
    finally:
        stream.release()
