"""HTTP/2 and gRPC outbound (L7): each stream of the app balanced, retried, and sent on pooled
h2 mTLS connections.

The app speaks h2c with prior knowledge (what grpcio's insecure channel
does) to a `protocol: http2|grpc` outbound; an `H2Server`
(agent/adapters/h2server.py) holds its connection to the HTTP/2 limits and
hands each stream here. Every stream is a request of its own: it gets a
subset, then per try an endpoint (`live.core.choose`), so one channel's
calls spread over the endpoints by the balancer and the weights, not by
connection. A try takes a stream on a pooled h2 connection to its endpoint
(agent/adapters/h2client.py: ALPN h2, multiplexed up to the peer's stream
limit), or dials one; the attempts loop (agent/adapters/attempts.py)
decides after each try whether to retry, answer, or deliver:

- a connect failure or a refused stream (RST_STREAM REFUSED_STREAM, above
  a GOAWAY's last-stream-id) retries any method: nothing was processed;
- a reset before the response head retries what the policy replays;
- a stream its pooled connection's end failed (refused by a GOAWAY, or lost
  with the connection with nothing heard since it opened) is redialled once
  on a new connection, outside the retry budget (agent/core/tries.py);
  a peer's RST_STREAM REFUSED_STREAM (at capacity) is a retry on the budget;
- a response head is delivered, unless its status is one the policy
  retries; for a gRPC call, a trailers-only response whose grpc-status is
  in `retry_on` (UNAVAILABLE by default) is retried like a 503.

The request body goes upstream as it arrives (a streaming call streams),
and is held for a retry while the whole is within REPLAY_BYTES; past that,
the call is sent once. `grpc-timeout` is the call's deadline (the smaller of
it and `timeouts.request`) and goes upstream reduced by the time spent. The
circuit breaker's limits apply per stream (max_requests), per stream waiting
for a connection (max_pending) and per h2 connection (max_connections).

The agent's own answers are trailers-only gRPC errors for a gRPC call
(UNAVAILABLE, DEADLINE_EXCEEDED: what a gRPC client shows), JSON otherwise,
as HTTP/1.1 outbounds answer. x-forwarded-client-cert is stripped both ways.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from h2.errors import ErrorCodes

from agent.adapters import h2client
from agent.adapters.attempts import LocalAnswer, Try, attempts
from agent.adapters.h2client import H2ClientConnection, NoRoom, StreamError
from agent.adapters.h2server import H2Server, H2Stream, Headers, StreamReset
from agent.adapters.http import _identity, error_body
from agent.adapters.inbound_h2 import onward
from agent.adapters.metrics import CLIENT_CLOSED, clock, since
from agent.adapters.outbound_http import REPLAY_BYTES, _key
from agent.adapters.upstreams import DialError, LiveUpstream
from agent.core import grpc
from agent.core.accesslog import Entry
from agent.core.h2limits import H2Limits, Limit
from agent.core.headers import plain, screen, underscore_refusal
from agent.core.tracecontext import HEADERS as TRACE_HEADERS
from agent.core.tries import Outcome, Response
from agent.core.upstream import Endpoint

log = logging.getLogger("outrider.agent")

OUTBOUND = "outbound"


@dataclass(frozen=True)
class _Refusal:
    status: int  # for an HTTP client
    error: str
    code: int  # for a gRPC call
    detail: str = ""


class OutboundH2:
    """The streams of an app's h2c connections to one outbound's upstream."""

    def __init__(self, live: LiveUpstream, rng: random.Random) -> None:
        self.live = live
        self.rng = rng
        self.limits = H2Limits()
        observer = live.runtime.observer  # None: no access log, no tracing
        self.watch = (
            None if observer is None else observer.watch("http", OUTBOUND, None, None, live.name)
        )

    def serve(self, on_closed: Callable[[H2Server], None]) -> H2Server:
        """The protocol for one app connection just accepted."""
        runtime = self.live.runtime
        limits = runtime.metrics.http2_limits

        def hit(limit: Limit) -> None:
            limits.labels(OUTBOUND, limit).inc()

        return H2Server(
            self.handle,
            hit,
            idle_timeout=runtime.limits.idle_timeout.total_seconds(),
            limits=self.limits,
            on_closed=on_closed,
            checked_heads=True,  # what it answers: upstream's responses, h2-checked, or ours
        )

    # -- a stream ------------------------------------------------------------------------

    async def handle(self, stream: H2Stream) -> None:
        """H2Server's handler: one request, tried until delivered or answered; counted."""
        started = clock()
        call = _Call(grpc.is_grpc(_field(stream.headers, b"content-type")))
        if self.watch is not None:
            call.entry = self._entry(stream, call.grpc)
        try:
            refused = self._screen(stream)
            if refused is not None:
                await self._refuse(stream, refused, call)
            else:
                await self._exchange(stream, call)
        except (StreamReset, asyncio.CancelledError):
            call.left()  # the app reset its stream, or left: counted, H2Server's to handle
            raise
        except Exception:  # a bug: the app must not wait on a stream nobody serves
            log.exception("outbound %s: a stream failed unexpectedly; resetting it", self.live.name)
            stream.reset(ErrorCodes.INTERNAL_ERROR)
        finally:
            if call.status is not None:  # else a bug: logged above
                counted = self.live.counted
                counted.request(call.status, since(started))
                code = call.outcome()
                if code is not None:
                    counted.grpc(code)
                if call.entry is not None and self.watch is not None:
                    self.watch.finish(call.entry, call.status, None, code)

    def _entry(self, stream: H2Stream, is_grpc: bool) -> Entry:
        """The stream's access log entry, its trace propagated from the app's headers."""
        assert self.watch is not None
        method = (stream.header(b":method") or b"").decode("latin-1")
        target = (stream.header(b":path") or b"").decode("latin-1")
        fields = [(n, v) for n, v in stream.headers if not n.startswith(b":")]
        return self.watch.request(method, target, fields, "grpc" if is_grpc else "http")

    def _screen(self, stream: H2Stream) -> _Refusal | None:
        """What the agent refuses before any try: a tunnel, too many headers, or a header
        name an app server folds onto another (`headers_with_underscores: reject`, as on an
        HTTP/1.1 outbound; `drop`: _upstream_head leaves it out)."""
        if stream.header(b":method") == b"CONNECT":  # an h2 tunnel: bytes nobody would see
            return _Refusal(501, "upgrade_not_supported", grpc.Code.UNIMPLEMENTED)
        if sum(not n.startswith(b":") for n, _ in stream.headers) > self.limits.max_headers:
            self.live.runtime.metrics.http2_limits.labels(OUTBOUND, "header_list").inc()
            return _Refusal(431, "headers_too_large", grpc.Code.RESOURCE_EXHAUSTED)
        action = self.live.runtime.limits.headers_with_underscores
        for name, _ in stream.headers:
            if not name.startswith(b":") and screen(name, action) == "reject":
                detail = underscore_refusal(name)
                return _Refusal(400, "bad_request", grpc.Code.INTERNAL, detail)
        return None

    async def _exchange(self, stream: H2Stream, call: _Call) -> None:
        live = self.live
        config = live.config
        deadline = config.timeouts.request or None
        if call.grpc and (value := stream.header(b"grpc-timeout")) is not None:
            try:
                timeout = grpc.parse_timeout(value.decode("latin-1"))
            except ValueError as exc:
                await self._refuse(
                    stream, _Refusal(400, "bad_request", grpc.Code.INTERNAL, str(exc)), call
                )
                return
            deadline = timeout if deadline is None else min(deadline, timeout)
        breaker, budget = live.breaker, live.budget
        if not breaker.acquire("max_requests"):
            await self._refuse(stream, _overflow(live, "max_requests"), call)
            return
        budget.request_started()
        loop = asyncio.get_running_loop()
        head = _upstream_head(stream.headers, call.grpc)
        if call.entry is not None and call.entry.trace is not None:
            head = [(n, v) for n, v in head if n not in TRACE_HEADERS] + call.entry.trace.headers()
        request = _Request(
            head,
            (stream.header(b":method") or b"").decode("latin-1"),
            call.grpc,
            None if deadline is None else loop.time() + deadline,
        )
        body = _Body(stream, stream.bodiless)
        attempt: Try[_Upstream, h2client.Response] | None = None
        try:
            async with asyncio.timeout(deadline):
                attempt = await attempts(
                    live,
                    partial(self._try, request, body, call.entry),
                    self.rng,
                    method=request.method,
                    grpc=call.grpc,
                    key=self._key(stream),
                    replayable=lambda: body.replayable,
                    per_try=config.timeouts.per_try or None,
                )
                await self._deliver(stream, attempt, call)
        except LocalAnswer as answer:
            why = _Refusal(answer.status, answer.error, answer.grpc_status)
            await self._refuse(stream, why, call)
        except TimeoutError:
            await self._timed_out(stream, call)
        finally:
            budget.request_finished()
            breaker.release("max_requests")
            if call.entry is not None:
                call.entry.bytes_in = body.size  # what the app sent (read, at least)
            if attempt is not None:  # if the response did not end it: dropped mid-exchange
                attempt.end(call.status, call.outcome())

    def _key(self, stream: H2Stream) -> bytes | None:
        hash_on = self.live.config.hash_on
        if hash_on is None:
            return None
        source = b""
        if hash_on[0] == "source" and stream.server.transport is not None:
            peer = stream.server.transport.get_extra_info("peername")
            source = str(peer[0]).encode() if peer else b""
        return _key(hash_on, stream.headers, source)

    async def _try(
        self,
        request: _Request,
        body: _Body,
        entry: Entry | None,
        attempt: Try[_Upstream, h2client.Response],
    ) -> Outcome | None:
        """One try: a stream on a connection to its endpoint, the request sent as the app
        sends it, until the response head (or the stream's failure) decides it. A stream
        its pooled connection's end failed (GOAWAY, or a loss with nothing heard) is stale:
        redialled (agent/core/tries.py).

        Its line (`entry`, when logged) names each try as it starts, so that it ends naming
        the last, delivered or not (as an HTTP/1.1 request's does): its endpoint, its
        number, and the peer and TLS of the connection its stream went out on (none if it
        got none)."""
        if entry is not None:
            entry.endpoint, entry.tries = str(attempt.endpoint), attempt.number
            entry.over(None)
        had = await self._connection(attempt.endpoint, fresh=attempt.fresh)
        if had is None:
            return "connect-failure"
        connection, reused = had
        try:
            up = connection.open(request.head_now(), end=body.empty)
        except NoRoom:  # it went away between the pool's answer and now: nothing was sent
            attempt.decide("refused-stream", stale=reused)
            return None
        if entry is not None:
            entry.over(connection.tls)
        attempt.sent()
        upstream = attempt.connection = _Upstream(up)
        if not up.local_closed:
            # What the app has sent goes at once, with the head; a task sends the rest
            # only if more is to come (a streaming call) or the windows are shut.
            position = body.send_ready(up)
            if position is not None:
                upstream.sender = asyncio.get_running_loop().create_task(body.send(up, position))
        while True:
            event = await up.event()
            if isinstance(event, h2client.Reset):
                attempt.decide(event.failure, stale=reused and event.stale)
                return None
            if isinstance(event, h2client.Response) and event.status >= 200:
                attempt.parser = event
                code = None
                if event.end and request.grpc:  # trailers-only: its grpc-status may retry
                    code = grpc.status_of(_field(event.headers, b"grpc-status"))
                return Response(event.status, code)
            # 1xx: the final head follows (h2 allows nothing else before it)

    async def _connection(
        self, endpoint: Endpoint, *, fresh: bool = False
    ) -> tuple[H2ClientConnection, bool] | None:
        """A pooled h2 connection to `endpoint` with room for a stream (unless `fresh`: a
        redial), or a new one, and whether it was reused; None if it cannot be had
        (LocalAnswer past a breaker limit)."""
        live = self.live
        context = live.runtime.contexts.client_for(live.config.protocol)
        assert context is not None, "upstreams start after the first SVID"
        pool = live.h2pool
        connection = None if fresh else pool.take(endpoint, context)
        if connection is not None:
            live.counted.reused.inc()
            return connection, True
        breaker = live.breaker
        if not breaker.acquire("max_pending"):
            raise LocalAnswer(*_overflow_answer(live, "max_pending"))
        try:
            connection, new = await pool.connection(
                endpoint, context, partial(self._dial, endpoint, context), fresh=fresh
            )
        except DialError as exc:
            live.runtime.dial_failed(live.name, endpoint, exc)  # as the TCP outbound says it
            return None
        finally:
            breaker.release("max_pending")
        (live.counted.new if new else live.counted.reused).inc()
        return connection, not new

    async def _dial(self, endpoint: Endpoint, context: object) -> H2ClientConnection:
        """A new h2 connection to `endpoint` under the circuit breaker's max_connections."""
        live = self.live
        breaker = live.breaker
        if not breaker.acquire("max_connections"):
            raise LocalAnswer(*_overflow_answer(live, "max_connections"))
        released = False

        def release() -> None:  # once: by a failed dial, or by the connection's loss
            nonlocal released
            if not released:
                released = True
                breaker.release("max_connections")

        try:
            _, connection, tls = await live.dial(
                endpoint,
                # The heads sent on it are the app's, which the H2Server facing it had
                # h2 validate, less a header or two, plus grpc-timeout (h2client).
                lambda: H2ClientConnection(endpoint, context, release, checked_heads=True),  # type: ignore[arg-type]
            )
        except DialError:
            release()
            raise
        except asyncio.CancelledError:  # the app left, or the call's deadline, mid-dial
            release()
            raise
        connection.tls = tls
        try:
            await h2client.handshake(
                connection, live.runtime.limits.handshake_timeout.total_seconds()
            )
        except (OSError, TimeoutError, ConnectionError) as exc:
            connection.abort()  # its loss releases the slot
            log.warning("outbound %s: %s: no HTTP/2: %s", live.name, endpoint, exc)
            raise DialError(f"{endpoint}: no HTTP/2 ({exc or type(exc).__name__})") from None
        except asyncio.CancelledError:
            connection.abort()
            raise
        return connection

    async def _deliver(
        self, stream: H2Stream, attempt: Try[_Upstream, h2client.Response], call: _Call
    ) -> None:
        """Relay the delivered response to the app, as the app's windows take it."""
        head, upstream = attempt.parser, attempt.connection
        assert head is not None and upstream is not None
        up = upstream.stream
        headers = _outward(head.headers)
        call.status = head.status
        call.heard(headers)
        await stream.respond(headers, end=head.end)
        async for event in up:
            if isinstance(event, h2client.Data):
                if call.entry is not None:
                    call.entry.bytes_out += len(event.data)
                await stream.send(event.data)
                up.consumed(event.flow)
            elif isinstance(event, h2client.Trailers):
                trailers = _outward(event.headers)
                call.heard(trailers)
                await stream.end(trailers)
            elif isinstance(event, h2client.End):
                if not stream.finished:
                    await stream.end()
            elif isinstance(event, h2client.Reset):  # mid-response: so is the app's stream
                stream.reset(ErrorCodes.INTERNAL_ERROR)
                call.broken = True
        attempt.end(call.status, call.outcome())

    async def _timed_out(self, stream: H2Stream, call: _Call) -> None:
        """The call's deadline passed: DEADLINE_EXCEEDED / 504 if the head has not gone out;
        else a gRPC call ends with that status in its trailers, anything else is reset."""
        if not stream.responded:
            why = _Refusal(504, "upstream_timeout", grpc.Code.DEADLINE_EXCEEDED)
            await self._refuse(stream, why, call)
            return
        call.code = grpc.Code.DEADLINE_EXCEEDED
        if call.grpc and not stream.finished:
            try:
                await stream.end([(b"grpc-status", b"4"), (b"grpc-message", b"deadline exceeded")])
                return
            except StreamReset:
                return
        stream.reset(ErrorCodes.CANCEL)

    async def _refuse(self, stream: H2Stream, why: _Refusal, call: _Call) -> None:
        """The agent's own answer: trailers-only for a gRPC call, else JSON."""
        if call.entry is not None:
            call.entry.error = why.error
        try:
            if call.grpc:
                message = why.detail or why.error.replace("_", " ")
                head = grpc.trailers_only(grpc.Code(why.code), message)
                call.status, call.code = 200, why.code
                await stream.respond([(n.encode(), v.encode()) for n, v in head], end=True)
                return
            payload = json.dumps(error_body(why.error, why.detail)).encode() + b"\n"
            call.status = why.status
            await stream.respond(
                [
                    (b":status", str(why.status).encode()),
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(payload)).encode()),
                ]
            )
            await stream.send(payload, end=True)
        except StreamReset:
            pass  # the app left first


@dataclass
class _Request:
    """What every try of one call sends upstream."""

    head: Headers
    method: str
    grpc: bool
    deadline: float | None  # the loop's time the call must be over by

    def head_now(self) -> Headers:
        """The head for a try starting now: a gRPC call's grpc-timeout is what is left of
        its deadline."""
        if self.deadline is None or not self.grpc:
            return self.head
        left = self.deadline - asyncio.get_running_loop().time()
        return [*self.head, (b"grpc-timeout", grpc.timeout_value(left).encode())]


class _Upstream:
    """A try's stream upstream and the task sending the request body on it."""

    __slots__ = ("sender", "stream")

    def __init__(self, stream: h2client.H2Stream) -> None:
        self.stream = stream
        self.sender: asyncio.Task[None] | None = None

    def abort(self) -> None:
        """The try is over: stop sending; the stream is reset unless it is over too."""
        if self.sender is not None:
            self.sender.cancel()
            self.sender = None
        self.stream.release()


class _Body:
    """The request body as the app sends it, shared by the tries of its call.

    The try in progress reads it from the app as it sends it upstream, one
    chunk at a time: h2server credits a chunk to the app only when the next is
    read, so the app's windows close while upstream is slow, and nothing is
    read while no try is sending. Chunks are held for a retry while the whole
    body is within REPLAY_BYTES; past that, each is dropped once sent and the
    call is no longer replayable.
    """

    def __init__(self, stream: H2Stream, bodiless: bool) -> None:
        self.stream = stream
        self.chunks: list[bytes] = []
        self.base = 0  # the index (in the whole body) of chunks[0]
        self.size = 0
        self.replayable = True
        self.ended = bodiless
        self.trailers: Headers | None = None

    @property
    def empty(self) -> bool:
        """The whole request was its head: the stream ends with it."""
        return self.ended and not self.chunks and not self.base and self.trailers is None

    def send_ready(self, up: h2client.H2Stream) -> int | None:
        """Send on one try's stream, without waiting, what is at hand: the chunks held and
        those the app has sent already, the last with END_STREAM if the body is whole.
        None once there is nothing more to send; else the chunk `send` goes on from."""
        if self.base:
            return 0  # `send` refuses it
        try:
            while not self.ended and (chunk := self.stream.read_now()) is not None:
                self._took(chunk)
            sent = 0
            for chunk in self.chunks:
                last = sent + 1 == len(self.chunks) and self.ended and self.trailers is None
                if not up.send_now(chunk, end=last):
                    break
                sent += 1
            if sent == len(self.chunks) and self.ended:
                if not up.local_closed:  # else END_STREAM went with the last chunk
                    up.end(self.trailers)
                return None
        except (StreamError, StreamReset):
            return None  # upstream: the try fails on its response side; the app: it left
        if not self.replayable:  # sent for good: not held
            del self.chunks[:sent]
            self.base = sent
        return sent

    async def send(self, up: h2client.H2Stream, position: int = 0) -> None:
        """Send the body on one try's stream from chunk `position`: what was read so far,
        then what follows."""
        if self.base > position:  # its start was dropped: not replayable (no retry gets here)
            up.reset(ErrorCodes.CANCEL)
            return
        try:
            while True:
                if position == self.base + len(self.chunks):  # sent all there is
                    if self.ended:
                        up.end(self.trailers)
                        return
                    if not await self._read():
                        continue
                await up.send(self.chunks[position - self.base])
                position += 1
                if not self.replayable:  # sent for good: not held
                    del self.chunks[: position - self.base]
                    self.base = position
        except (StreamError, StreamReset):
            return  # upstream: the try fails on its response side; the app: it left

    async def _read(self) -> bool:
        """The app's next chunk into `chunks` (True), or its end (False)."""
        return self._took(await self.stream.read())

    def _took(self, chunk: bytes) -> bool:
        if not chunk:
            self.trailers = onward(self.stream.trailers or []) or None
            self.ended = True
            return False
        self.size += len(chunk)
        if self.size > REPLAY_BYTES:
            self.replayable = False
        self.chunks.append(chunk)
        return True


@dataclass
class _Call:
    """What counting a call needs: the status the app got, and its grpc-status."""

    grpc: bool
    status: int | None = None
    code: int | None = None
    broken: bool = False  # reset mid-response
    entry: Entry | None = None  # its access log entry and span (an observer is on)

    def heard(self, headers: Headers) -> None:
        if self.grpc and self.code is None:
            self.code = grpc.status_of(_field(headers, b"grpc-status"))

    def left(self) -> None:
        """The app went away before the call was over: CLIENT_CLOSED unless a head went
        out, and CANCELLED unless a grpc-status did (what Envoy records for a client's
        reset)."""
        self.status = self.status or CLIENT_CLOSED
        if self.grpc and self.code is None:
            self.code = grpc.Code.CANCELLED

    def outcome(self) -> int | None:
        """The grpc-status the app got (None: not gRPC): a response without one is read as
        a gRPC client reads it (an HTTP status mapped; a reset stream INTERNAL)."""
        if not self.grpc:
            return None
        if self.code is not None:
            return self.code
        if self.broken:
            return grpc.Code.INTERNAL
        status = self.status or 0
        return grpc.Code.UNKNOWN if status == 200 else grpc.from_http_status(status)


def _upstream_head(headers: Headers, is_grpc: bool) -> Headers:
    """The app's request head as it goes upstream: no identity header (the peer's inbound
    sets ours), no name an app server folds onto another (_screen refused those unless
    told to drop them), and for a gRPC call no grpc-timeout (each try sends what is left)."""
    return [
        (n, v)
        for n, v in headers
        if (n.startswith(b":") or plain(n))
        and not _identity(n)
        and not (is_grpc and n == b"grpc-timeout")
    ]


def _outward(headers: Headers) -> Headers:
    """Response headers or trailers as the app gets them: no identity header."""
    return [(n, v) for n, v in headers if not _identity(n)]


def _field(headers: Headers, name: bytes) -> list[tuple[str, str]]:
    """The first `name` field of `headers`, as the text agent.core.grpc reads: that one
    decoded, not the whole list (this runs on every call)."""
    for n, v in headers:
        if n == name:
            return [(n.decode("latin-1"), v.decode("latin-1"))]
    return []


def _overflow_answer(live: LiveUpstream, reason: str) -> tuple[int, str]:
    live.counted.overflow(reason)
    return 503, f"overflow_{reason}"


def _overflow(live: LiveUpstream, reason: str) -> _Refusal:
    return _Refusal(*_overflow_answer(live, reason), grpc.Code.UNAVAILABLE)
