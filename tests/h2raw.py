"""Raw HTTP/2 clients for tests: a well-behaved one on `h2`, and frames an attacker sends as
written, built with hyperframe and hpack (never framed by hand).

Blocking sockets (plain or TLS): a test runs them in a thread, beside the agent's loop or
against an agent process.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.settings
import hpack
from h2.errors import ErrorCodes
from hyperframe.frame import Frame, SettingsFrame

from agent.adapters.h2client import _Connection
from agent.adapters.h2server import H2Server, Handler
from tests.httpraw import mtls_socket
from tests.mesh import AgentProcess
from tests.support import CaSetup

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

Headers = list[tuple[bytes, bytes]]


@dataclass
class Response:
    """One stream's response as the client saw it."""

    stream_id: int
    headers: Headers = field(default_factory=list)
    body: bytes = b""
    trailers: Headers = field(default_factory=list)
    reset: int | None = None  # RST_STREAM's error code
    ended: bool = False

    @property
    def status(self) -> int:
        return int(dict(self.headers)[b":status"])

    def header(self, name: bytes) -> bytes | None:
        return dict(self.headers + self.trailers).get(name)


def request_headers(
    path: str = "/", method: str = "GET", authority: str = "app", **extra: str
) -> Headers:
    headers = [
        (b":method", method.encode()),
        (b":scheme", b"https"),
        (b":authority", authority.encode()),
        (b":path", path.encode()),
    ]
    return headers + [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]


def tls_socket(
    setup: CaSetup,
    agent: AgentProcess,
    who: str = "frontend",
    listener: str = "inbound[0]",
    alpn: tuple[str, ...] = ("h2",),
) -> ssl.SSLSocket:
    """An mTLS connection to one of the agent's listeners, as `who`, offering `alpn`."""
    return mtls_socket(setup, agent.bound[listener], who, alpn)


def h2_connect(
    setup: CaSetup, agent: AgentProcess, who: str = "frontend", listener: str = "inbound[0]"
) -> H2Client:
    """A well-behaved h2 client over mTLS to one of the agent's listeners, as `who`."""
    return H2Client(tls_socket(setup, agent, who, listener))


class H2Client:
    """A well-behaved h2 client on a blocking socket: it reads what it is sent, credits
    data as it arrives, and answers PINGs and SETTINGS (h2 does)."""

    def __init__(self, sock: socket.socket, window: int | None = None) -> None:
        self.sock = sock
        # h2client's connection: one that lets the streams below a graceful GOAWAY finish.
        self.conn = _Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        if window is not None:
            self.conn.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
            )
        self.conn.initiate_connection()
        self.credit = window is None or window > 0  # False: never opens a window again
        self.responses: dict[int, Response] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self._flush()

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send(
        self,
        headers: Headers,
        body: bytes = b"",
        end: bool = True,
        trailers: Headers | None = None,
        together: bool = False,
    ) -> int:
        """Open a stream: its head, then `body`; `trailers` end it (else END_STREAM on the
        last frame, with `end`). `together` sends a small stream's frames in one write, so
        the server takes them all at once (else each part is written when it is ready)."""
        stream_id = self.conn.get_next_available_stream_id()
        end_body = end and trailers is None
        self.conn.send_headers(stream_id, headers, end_stream=end_body and not body)
        self.responses[stream_id] = Response(stream_id)
        if together:
            if body:
                self.conn.send_data(stream_id, body, end_stream=end_body)
        else:
            self._flush()
            self.send_body(stream_id, body, end_body)
        if trailers is not None:
            self.conn.send_headers(stream_id, trailers, end_stream=True)
        self._flush()
        return stream_id

    def send_body(self, stream_id: int, body: bytes, end: bool = True, seconds: float = 5) -> None:
        """Send `body` as the server's windows allow, reading meanwhile."""
        deadline = time.monotonic() + seconds
        while body:
            room = min(
                self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size
            )
            if room <= 0:
                if self.closed or time.monotonic() > deadline:
                    raise TimeoutError(f"stream {stream_id}: no window in {seconds}s")
                self.pump(0.2)
                continue
            self.conn.send_data(stream_id, body[:room], end_stream=end and room >= len(body))
            body = body[room:]
            self._flush()

    def reset(self, stream_id: int, code: int = ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(stream_id, code)
        self._flush()

    def pump(self, timeout: float) -> bool:
        """Read once (up to `timeout`): False once the connection is closed."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return True
        except (ConnectionError, ssl.SSLError, OSError):
            data = b""
        if not data:
            self.closed = True
            return False
        for event in self.conn.receive_data(data):
            self._event(event)
        self._flush()
        return True

    def _event(self, event: h2.events.Event) -> None:
        sid = getattr(event, "stream_id", 0)
        response = self.responses.get(sid) if sid else None
        if isinstance(event, h2.events.ResponseReceived) and response is not None:
            response.headers = list(event.headers or [])
        elif isinstance(event, h2.events.DataReceived) and response is not None:
            response.body += event.data or b""
            if self.credit and event.flow_controlled_length:
                self.conn.acknowledge_received_data(event.flow_controlled_length, sid)
        elif isinstance(event, h2.events.TrailersReceived) and response is not None:
            response.trailers = list(event.headers or [])
        elif isinstance(event, h2.events.StreamEnded) and response is not None:
            response.ended = True
        elif isinstance(event, h2.events.StreamReset) and response is not None:
            response.reset = int(event.error_code or 0)
        elif isinstance(event, h2.events.ConnectionTerminated):
            self.goaway = event

    def wait(self, stream_id: int, seconds: float = 5.0) -> Response:
        """Read until `stream_id` is answered whole (or reset, or the connection ends)."""
        deadline = time.monotonic() + seconds
        response = self.responses[stream_id]
        while not (response.ended or response.reset is not None or self.closed):
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"stream {stream_id} not answered in {seconds}s")
            self.pump(min(left, 0.5))
        return response

    def get(self, path: str = "/", seconds: float = 5.0, **extra: str) -> Response:
        return self.wait(self.send(request_headers(path, **extra)), seconds)

    def drain(self, seconds: float) -> None:
        """Read for `seconds` or until the connection closes."""
        deadline = time.monotonic() + seconds
        while not self.closed and time.monotonic() < deadline:
            self.pump(min(deadline - time.monotonic(), 0.2))

    def close(self) -> None:
        self.sock.close()


class RawFrames:
    """An attacker's side of a connection: frames sent as built, HPACK encoded by hand-picked
    rules (hpack's Encoder), nothing checked on the way out."""

    def __init__(self, sock: socket.socket, settings: bool = True) -> None:
        self.sock = sock
        self.encoder = hpack.Encoder()
        self.sock.sendall(PREFACE)
        if settings:
            self.send([SettingsFrame(0)])

    def send(self, frames: Iterable[Frame]) -> None:
        self.sock.sendall(b"".join(frame.serialize() for frame in frames))

    def block(self, headers: Headers, huffman: bool = True) -> bytes:
        return self.encoder.encode(headers, huffman=huffman)

    def closed_within(self, seconds: float) -> bool:
        """Read (and drop) what the server sends until it closes: True if it did in time."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                if not self.sock.recv(65536):
                    return True
            except TimeoutError:
                return False
            except (ConnectionError, ssl.SSLError, OSError):
                return True
        return False

    def close(self) -> None:
        self.sock.close()


@contextmanager
def threaded_h2_app(handler: Handler) -> Iterator[int]:
    """An h2c app (prior knowledge) on an event loop of its own in a thread, each stream
    served by `handler` on the agent's own H2Server; yields its port."""
    loop = asyncio.new_event_loop()
    servers: set[H2Server] = set()

    def make() -> H2Server:
        server = H2Server(handler, lambda _: None, idle_timeout=600, on_closed=servers.discard)
        servers.add(server)
        return server

    async def start() -> asyncio.Server:
        return await loop.create_server(make, "127.0.0.1", 0)

    async def stop(server: asyncio.Server) -> None:
        server.close()
        for connection in list(servers):
            connection.abort()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        asyncio.run_coroutine_threadsafe(stop(server), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


class Wire(asyncio.Transport):
    """A transport that keeps each write apart (to count them) and sends nothing: an h2
    connection object under test writes to it, and the test feeds its peer by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def taken(self) -> bytes:
        """Everything written since the last call."""
        data, self.writes = b"".join(self.writes), []
        return data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


async def turns(n: int) -> None:
    """Let the event loop go round `n` times."""
    for _ in range(n):
        await asyncio.sleep(0)
