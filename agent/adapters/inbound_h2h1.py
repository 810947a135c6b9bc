"""h2 from a peer agent to an HTTP/1.1 app: an `http` port's streams, each sent as an
HTTP/1.1 request (the Linkerd model).

An inbound of `protocol: http` offers h2 beside http/1.1 in ALPN
(agent/adapters/tls.py): a peer that picks h2 is served by an `H2Server`
like an `http2` port, and every stream gets the decisions of `InboundH2`
(agent/adapters/inbound_h2.py): the same normalization, header screening,
Host rules, authorization and x-forwarded-client-cert as an HTTP/1.1 request
on the same port, so both get the same answers. What differs is only the way
to the app, which speaks HTTP/1.1: each allowed stream becomes one HTTP/1.1
request framed by agent/core/http1.py (`from_h2`, `request_head`: its body by
its content-length, else chunked), sent on a keep-alive connection of a small
pool this client connection keeps (one request at a time on each; at most
MAX_APP_CONNECTIONS at once, further streams waiting for one, and
IDLE_APP_CONNECTIONS kept idle), and its
response carried back (`to_h2`: the status, the headers minus hop-by-hop ones
and the identity header, the body). Chunked trailers from the app are dropped,
as the HTTP/1.1 path drops them; so are request trailers (an HTTP/1.1 app
has no use for h2 trailers, and gRPC, which needs them, is an `http2|grpc`
port's business). No WebSocket over h2 (RFC 8441's extended CONNECT): an h2
CONNECT is refused 501 as on every h2 port.

A pooled connection the app closed while idle (its keep-alive timeout) can
fail a request before any byte of answer. Nothing tells that race from an app
that read the request, acted on it and closed without answering, so only a
request the app may see twice is sent again: bodiless, of an idempotent
method (as agent/core/tries.py decides for upstreams), once, on a new
connection. Any other is answered 503 `app_reset`.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

from h2.errors import ErrorCodes

from agent.adapters.h2server import H2Stream, StreamReset
from agent.adapters.http import IDENTITY_HEADERS
from agent.adapters.inbound_h2 import Forward, InboundH2, _Call, refusal
from agent.core import grpc, http1
from agent.core.endpoint import Endpoint
from agent.core.http1 import END, Broken, Data, Framing, Response
from agent.core.resilience import IDEMPOTENT

#: Idle keep-alive connections to the app kept per client connection.
IDLE_APP_CONNECTIONS = 4
#: Connections to the app per client connection at once (streams beyond wait for one).
MAX_APP_CONNECTIONS = 16
#: Response bytes read from the app ahead of the client's window before reading pauses.
READ_AHEAD = 256 * 1024


class _Stale(Exception):
    """The app's connection ended before any byte of its answer."""


class AppConnection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection to the app: one request at a time, its response
    read with agent.core.http1's ResponseParser and handed out as events."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser: http1.ResponseParser | None = None
        self.events: deque[http1.ResponseEvent] = deque()
        self.ahead = 0  # body bytes read and not yet taken
        self.paused = False
        self.lost = False
        self._changed = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # bytes nobody asked for: nothing after them is trusted
            self.events.append(Broken("a response nobody asked for"))
            self.close()
        else:
            for event in self.parser.feed(data):
                if isinstance(event, Data):
                    self.ahead += len(event.data)
                self.events.append(event)
            if self.ahead > READ_AHEAD and self.transport is not None:
                self.paused = True
                self.transport.pause_reading()
        self._changed.set()

    def eof_received(self) -> bool:
        self._ended()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._ended()
        self._writable.set()

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def _ended(self) -> None:
        if self.parser is not None:
            self.events.extend(self.parser.eof())
        self._changed.set()

    # the exchange's

    def begin(self, method: bytes, head: bytes) -> None:
        """Send a request head; its response is parsed from here on."""
        assert self.transport is not None
        self.parser = http1.ResponseParser(method)
        self.events.clear()
        self.transport.write(head)

    async def write(self, data: bytes) -> None:
        """A piece of request body, once the app's socket takes more."""
        if self.lost or self.transport is None or self.transport.is_closing():
            raise ConnectionError("the app's connection closed")
        if data:
            self.transport.write(data)
        await self._writable.wait()

    async def next(self) -> http1.ResponseEvent:
        """The next response event; Broken once the connection is gone with nothing left."""
        while not self.events:
            if self.lost:
                return Broken("closed")
            self._changed.clear()
            await self._changed.wait()
        event = self.events.popleft()
        if isinstance(event, Data):
            self.ahead -= len(event.data)
            if self.paused and self.ahead <= READ_AHEAD // 2 and self.transport is not None:
                self.paused = False
                self.transport.resume_reading()
        return event

    def idle(self) -> None:
        """The response was whole: the connection waits for the next request."""
        self.parser = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class AppConnections:
    """The keep-alive connections one client connection has to the app: at most
    MAX_APP_CONNECTIONS at once (streams beyond wait for one to be free), so a peer's
    100 streams cannot become 100 connections to the app."""

    def __init__(
        self, app: Endpoint, connect_timeout: float, local_addr: tuple[str, int] | None = None
    ) -> None:
        self.app = app
        self.connect_timeout = connect_timeout
        self.local_addr = local_addr  # where the app is dialled from (Inbound.source)
        self.idle: list[AppConnection] = []
        self.busy = 0  # connections carrying a request (or being dialled for one)
        self.waiting: deque[asyncio.Future[None]] = deque()
        self.closed = False

    async def take(self, new: bool = False) -> tuple[AppConnection, bool]:
        """An idle connection (True: it was used before) or, with `new` or none idle, a new
        one, once one is free; OSError/TimeoutError if the app cannot be reached."""
        while True:
            while self.idle and not new:
                connection = self.idle.pop()
                transport = connection.transport
                if not connection.lost and transport is not None and not transport.is_closing():
                    self.busy += 1
                    return connection, True
            if self.busy < MAX_APP_CONNECTIONS:
                break
            free = asyncio.get_running_loop().create_future()
            self.waiting.append(free)
            try:
                await free
            except asyncio.CancelledError:
                if free.done() and not free.cancelled():
                    self._wake()  # woken as it was cancelled: the next one takes the turn
                raise
            finally:
                if free in self.waiting:
                    self.waiting.remove(free)
        self.busy += 1
        try:
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    AppConnection, self.app.host, self.app.port, local_addr=self.local_addr
                )
        except BaseException:
            self.busy -= 1
            self._wake()
            raise
        return connection, False

    def done(self, connection: AppConnection, kept: bool) -> None:
        """A request's connection is free: kept for the next one (`kept`: its response was
        whole and both sides keep it), or closed."""
        self.busy -= 1
        connection.idle()
        room = len(self.idle) < IDLE_APP_CONNECTIONS or self.waiting
        if kept and room and not self.closed and not connection.lost:
            self.idle.append(connection)
            self._wake()
            return
        connection.close()
        self._wake()

    def _wake(self) -> None:
        while self.waiting:
            free = self.waiting.popleft()
            if not free.done():
                free.set_result(None)
                return

    def close(self) -> None:
        self.closed = True
        for connection in self.idle:
            connection.close()
        self.idle.clear()


class InboundH2ToHttp1(InboundH2):
    """The streams of one h2 client connection to an `http` port's HTTP/1.1 app."""

    _apps: AppConnections | None = None

    @property
    def apps(self) -> AppConnections:
        if self._apps is None:
            self._apps = AppConnections(self.app, self.connect_timeout, self.local_addr)
        return self._apps

    def close(self) -> None:
        super().close()
        if self._apps is not None:
            self._apps.close()

    async def forward(self, stream: H2Stream, request: Forward, call: _Call) -> None:
        """Send the request to the app as HTTP/1.1 and carry its response back; the app
        unreachable (or gone before answering) is answered 503 / UNAVAILABLE."""
        if request.deadline is not None:
            request.headers.append((b"grpc-timeout", grpc.timeout_value(request.deadline).encode()))
        message, head = _message(request, stream.bodiless)
        # Lost on a reused connection before any answer, it goes once more on a new one if
        # the app may see it twice (the module's docstring).
        resend = stream.bodiless and message.method.decode("latin-1") in IDEMPOTENT
        new = False
        while True:
            try:
                app, reused = await self.apps.take(new)
            except (OSError, TimeoutError) as exc:
                self.unreachable(exc)
                break
            kept = False
            upload = None
            try:
                app.begin(message.method, head)
                if not stream.bodiless:
                    upload = asyncio.get_running_loop().create_task(
                        _upload(stream, app, message.framing, call)
                    )
                kept = await self._relay(stream, app, call)
                kept = kept and (upload is None or (upload.done() and upload.result()))
                return
            except _Stale:
                if not (reused and resend):  # the app may have acted on it
                    why = refusal(503, "app_reset", "", grpc.Code.UNAVAILABLE)
                    await self.refuse(stream, why, call.grpc, request.entry)
                    return
                new = True
            finally:
                if upload is not None:
                    upload.cancel()
                self.apps.done(app, kept)
        why = refusal(503, "app_unreachable", "", grpc.Code.UNAVAILABLE)
        await self.refuse(stream, why, call.grpc, request.entry)

    async def _relay(self, stream: H2Stream, app: AppConnection, call: _Call) -> bool:
        """The app's response, as the client's windows take it; whether the connection
        may carry another request. _Stale if it ended before any answer."""
        keep = False
        while True:
            event = await app.next()
            if isinstance(event, Response):
                if event.status < 200:
                    if event.status != 101:  # 1xx: h2 carries them (never asked to upgrade)
                        await stream.respond(http1.to_h2(event, IDENTITY_HEADERS))
                    continue
                headers = http1.to_h2(event, IDENTITY_HEADERS)
                call.status = event.status
                call.heard(headers)
                keep = event.keep_alive
                await stream.respond(headers, end=event.framing == "none")
            elif isinstance(event, Data):
                call.bytes_out += len(event.data)
                await stream.send(event.data)
            elif event is END:
                if not stream.finished:
                    await stream.end()
                return keep
            elif call.status is None:  # Broken (or Switched, never asked for) before a head
                raise _Stale
            else:  # the app broke off mid-response: so does the client's stream
                stream.reset(ErrorCodes.INTERNAL_ERROR)
                return False


def _message(request: Forward, bodiless: bool) -> tuple[http1.Request, bytes]:
    """The HTTP/1.1 request and head for an allowed stream (InboundH2.screen's `Forward`:
    the normalized :path, the identity header already the agent's own)."""
    pseudo = {n: v for n, v in request.headers if n.startswith(b":")}
    fields = [(n, v) for n, v in request.headers if not n.startswith(b":")]
    authority = pseudo.get(b":authority")
    if authority is not None and not any(n == b"host" for n, _ in fields):
        fields.insert(0, (b"host", authority))
    target = pseudo[b":path"]
    message = http1.from_h2(pseudo[b":method"], target, fields, bodiless=bodiless)
    return message, http1.request_head(message, target)


async def _upload(stream: H2Stream, app: AppConnection, framing: Framing, call: _Call) -> bool:
    """The request body, as the app takes it; True once it was sent whole (trailers are
    dropped: see the module's docstring)."""
    try:
        while chunk := await stream.read():
            call.bytes_in += len(chunk)
            await app.write(http1.body(framing, chunk))
        await app.write(http1.end(framing))
    except (StreamReset, ConnectionError):
        return False
    return True
