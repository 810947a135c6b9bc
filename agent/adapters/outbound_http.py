"""HTTP/1.1 outbound (L7): each request of the app balanced, retried, and sent pooled over mTLS.

The app speaks plain HTTP/1.1 (or 1.0) to the outbound listener. llhttp
parses its requests; each one gets a subset and then, per try, an endpoint
(agent/core/upstream.py) and a connection: an idle pooled one to that
endpoint, or a new mTLS dial. The request goes upstream as HTTP/1.1 with its
hop-by-hop headers removed, so an app that sends `Connection: close` on
every request still reuses the upstream connections: the close applies to
the app's own connection only. The response comes back the same way, its
body re-chunked when the app's connection needs framing the upstream did
not give (a close-delimited body).

Each request's tries run through the attempts loop every outbound protocol
shares (agent/adapters/attempts.py): a try fails on a connect failure, a
reset before the response head, a per-try timeout, or a status in the retry
list, and agent/core/tries.py decides whether it is tried again on another
endpoint (the retry policy, for this method and failure; the retry budget;
and its body still held in memory, up to REPLAY_BYTES: past that the
request is sent once). Circuit breaker limits (requests in flight, requests
waiting for a connection, connections) answer 503 at once and are counted
by reason. Every outcome goes to the upstream's health table for outlier
detection.

One request is in flight per app connection; pipelined requests wait,
bounded like the inbound side (HOLD_BYTES).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import cast

import httptools

from agent.adapters.attempts import LocalAnswer, Try, attempts
from agent.adapters.http import (
    HOLD_BYTES,
    MAX_HEADER_BYTES,
    Refused,
    RequestEvents,
    error_body,
    local_response,
)
from agent.adapters.metrics import clock, since
from agent.adapters.pool import UpstreamConnection
from agent.adapters.upstreams import DialError, LiveUpstream
from agent.core.tries import Deliver, Outcome, Response
from agent.core.upstream import Endpoint

log = logging.getLogger("outrider.agent")

#: Request body bytes kept for a retry; a longer body is sent once, never replayed.
REPLAY_BYTES = 64 * 1024
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
#: Never dropped because a Connection header names them: they frame the message (or name
#: its authority), and a body sent without its framing is read as the next message.
_END_TO_END = frozenset({b"content-length", b"transfer-encoding", b"host"})


@dataclass
class _Request:
    method: str
    head: bytes
    key: bytes | None  # what ring_hash and maglev hash
    keep_alive: bool  # the app keeps its connection after this request
    http10: bool
    chunked: bool
    body: list[bytes] = field(default_factory=list)  # held until sent; kept while replayable
    size: int = 0
    replayable: bool = True
    held: int = 0  # bytes of it held in memory until it goes out
    done: bool = False  # the whole request has been read
    answer: bytes = b""  # a refusal queued behind earlier requests


@dataclass
class _Parsing:
    """A try's response state: llhttp fed what the upstream sends, and how it ended."""

    events: _Responses
    parser: httptools.HttpResponseParser
    done: asyncio.Future[int]  # the status the app got, once the response is over


class OutboundHttp(asyncio.Protocol):
    """One app connection to an HTTP outbound listener."""

    def __init__(
        self, live: LiveUpstream, on_closed: Callable[[OutboundHttp], None], rng: random.Random
    ) -> None:
        self.live = live
        self.on_closed = on_closed
        self.rng = rng
        self.client: asyncio.Transport | None = None
        self.source = b""
        self.underscores = live.runtime.limits.headers_with_underscores
        self.requests = httptools.HttpRequestParser(RequestEvents(self))
        self.unparsed = 0  # bytes fed since the parser last handed some on
        self.queue: deque[_Request] = deque()  # queue[0] is in flight
        self.held = 0
        self.task: asyncio.Task[None] | None = None
        self.stopped = False  # read no more requests: refused, or the app is leaving
        self.closing = False  # close the app's connection after the response in flight
        self.draining = False  # take no new request; close once what was read is answered
        self.to_client: list[bytes] = []
        self.to_upstream: list[bytes] = []
        self.active = False  # bytes moved either way since the idle timer last looked
        self.idle: asyncio.TimerHandle | None = None
        self.writing_paused = False  # the app is not reading what it is owed
        # The try in progress (or the last one): it owns its connection and response state.
        self.attempt: Try[UpstreamConnection, _Parsing] | None = None

    # -- the app's connection ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = cast(asyncio.Transport, transport)
        hash_on = self.live.config.hash_on
        if hash_on is not None and hash_on[0] == "source":
            peer = transport.get_extra_info("peername")
            self.source = str(peer[0]).encode() if peer else b""
        self._arm_idle()

    def _arm_idle(self) -> None:
        seconds = self.live.runtime.limits.idle_timeout.total_seconds()
        self.idle = asyncio.get_running_loop().call_later(seconds, self._check_idle)

    def _check_idle(self) -> None:
        if self.active:
            self.active = False
            self._arm_idle()
        else:  # no bytes either way for a whole timeout: as the TCP relay does
            self.abort()

    def data_received(self, data: bytes) -> None:
        self.active = True
        if self.stopped:
            return
        self.unparsed += len(data)
        try:
            self.requests.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.refuse(501, "upgrade_not_supported")
        except httptools.HttpParserError:
            if not self.stopped:
                self.refuse(400, "bad_request")
        if not self.stopped and self.unparsed > MAX_HEADER_BYTES:
            self.refuse(431, "headers_too_large")
        self._flush()

    def eof_received(self) -> bool:
        self.stopped = True
        if not self.queue:
            return False
        if not self.queue[-1].done:  # it left mid-request: nothing it is owed can be whole
            self.abort()
            return False
        self.closing = True
        return True  # keep the write side: the response in flight is still owed

    def connection_lost(self, exc: Exception | None) -> None:
        self.stopped = True
        self.client = None
        if self.idle is not None:
            self.idle.cancel()
        if self.task is not None:
            self.task.cancel()
        self._drop_connection()  # mid-exchange: its state is unknown
        self.on_closed(self)

    def pause_writing(self) -> None:
        self.writing_paused = True
        self._upstream_reading(False)

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._upstream_reading(True)

    def finish(self) -> None:
        """Draining: close now if nothing was asked, else once what was read is answered
        (as the inbound does), the last response with `Connection: close`."""
        self.draining = True
        if not self.queue:
            self.closing = True
            self._close_client()
        elif self.queue[-1].done:
            self.stopped = True  # the requests read are all whole: read nothing more

    def abort(self) -> None:
        """Drop the app's connection (a drain that timed out): what it is owed is lost."""
        if self.client is not None:
            self.client.abort()

    def refuse(self, status: int, error: str, detail: str = "") -> None:
        """Answer the request being read ourselves, after the one in flight; then close."""
        self.stopped = True
        partial = self.queue and not self.queue[-1].done
        if partial and len(self.queue) > 1:
            self.queue.pop()  # broke off behind the one in flight: it was never sent
        elif partial:  # the request in flight is incomplete: its response cannot be relied on
            if self.task is not None:
                self.task.cancel()
            self._drop_connection()
            if self.events is not None and self.events.delivering:
                self.abort()
            else:
                self._answer(status, error, detail)
                self._close_client()
            return
        refusal = _Request("", b"", None, False, False, False, done=True)
        refusal.answer = local_response(status, error_body(error, detail))
        self.queue.append(refusal)
        if len(self.queue) == 1:
            self._next()

    # -- requests ------------------------------------------------------------------------

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """A request head is complete: queue it, and send it when it is first in line."""
        if self.draining:  # begun after the drain: not taken (the close tells the app)
            self.stopped = True
            return
        parser = self.requests
        hop = _hop_by_hop(headers)
        host = any(name.lower() == b"host" for name, _ in headers)
        lines = [b"%s %s HTTP/1.1" % (method, target)]
        lines += [b"%s: %s" % (n, v) for n, v in headers if n.lower() not in hop]
        if not host:  # an HTTP/1.0 app may leave it out; the upstream wants one
            lines.append(b"host: " + self.live.name.encode())
        http10 = parser.get_http_version() == "1.0"
        request = _Request(
            method.decode("ascii"),
            b"\r\n".join(lines) + b"\r\n\r\n",
            _key(self.live.config.hash_on, headers, self.source),
            parser.should_keep_alive() and not http10,
            http10,
            any(n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in headers),
        )
        self.queue.append(request)
        self._hold(request, len(request.head))
        if len(self.queue) == 1:
            self._next()

    def body(self, data: bytes) -> None:
        request = self.queue[-1]
        self._add(request, b"%x\r\n%s\r\n" % (len(data), data) if request.chunked else data)

    def request_done(self) -> None:
        request = self.queue[-1]
        if request.chunked:
            self._add(request, b"0\r\n\r\n")
        request.done = True
        if self.draining:
            self.stopped = True

    def _add(self, request: _Request, piece: bytes) -> None:
        sending = request is self.queue[0] and self.connection is not None
        request.size += len(piece)
        if request.size > REPLAY_BYTES:
            request.replayable = False
        if sending:
            self.to_upstream.append(piece)
        if request.replayable or not sending:
            request.body.append(piece)
        if not sending:
            self._hold(request, len(piece))

    def _hold(self, request: _Request, size: int) -> None:
        request.held += size
        self.held += size
        if self.held > HOLD_BYTES and self.client is not None:
            self.client.pause_reading()  # resumes as the held requests go out

    def _unhold(self, request: _Request) -> None:
        self.held -= request.held
        request.held = 0
        if self.held <= HOLD_BYTES and self.client is not None and not self.stopped:
            self.client.resume_reading()

    def _next(self) -> None:
        """Start the first request in line: forward it, or give the refusal queued for it."""
        request = self.queue[0]
        if request.answer:
            self.to_client.append(request.answer)
            self.closing = True
            self._close_client()
            return
        self.task = asyncio.get_running_loop().create_task(self._forward(request))

    async def _forward(self, request: _Request) -> None:
        live = self.live
        started = clock()
        self.attempt = None  # the last request's
        try:
            status = await self._exchange(request)
        except Exception:  # a bug: the app must not wait on a connection nobody serves
            log.exception("outbound %s: request failed unexpectedly; closing the app's", live.name)
            self.abort()
            return
        live.counted.request(status, since(started))
        self.task = None
        self.queue.popleft()
        last = self.draining and not self.queue
        if self.closing or last or not request.keep_alive or not request.done:
            # Answered before the body was all read: the rest would be taken for a request.
            self._close_client()
        elif self.queue:
            self._next()

    async def _exchange(self, request: _Request) -> int:
        """Try until a response is delivered or the agent answers; the status the app got."""
        live = self.live
        breaker, budget = live.breaker, live.budget
        if not breaker.acquire("max_requests"):
            return self._answer(*_overflow(live, "max_requests"))
        budget.request_started()
        try:
            if not live.config.timeouts.request:  # the usual case: no timer to arm
                return await self._tries(request)
            async with asyncio.timeout(live.config.timeouts.request):
                return await self._tries(request)
        except LocalAnswer as answer:
            return self._answer(answer.status, answer.error)
        except TimeoutError:
            if self.events is not None and self.events.delivering:
                self.abort()  # the response has begun: it cannot be replaced
                return 504
            return self._answer(504, "upstream_timeout")
        finally:
            budget.request_finished()
            breaker.release("max_requests")
            if self.attempt is not None:
                self.attempt.end()  # if the response did not: mid-exchange, it is dropped

    async def _tries(self, request: _Request) -> int:
        """The attempts loop, then the delivered response to its end: the status the app got."""
        live = self.live
        attempt: Try[UpstreamConnection, _Parsing] = await attempts(
            live,
            partial(self._try, request),
            self.rng,
            method=request.method,
            key=request.key,
            replayable=lambda: request.replayable,
            per_try=live.config.timeouts.per_try or None,
        )
        assert attempt.parser is not None
        status = await attempt.parser.done
        attempt.end(status)
        return status

    async def _try(
        self, request: _Request, attempt: Try[UpstreamConnection, _Parsing]
    ) -> Outcome | None:
        """One try: a connection to its endpoint, the request sent, until its response head
        (or its failure) decides it."""
        self.attempt = attempt
        connection = await self._connection(attempt.endpoint)
        if connection is None:
            return "connect-failure"
        attempt.connection = connection
        connection.user = self
        events = _Responses(self, request, connection)
        done = asyncio.get_running_loop().create_future()
        attempt.parser = _Parsing(events, httptools.HttpResponseParser(events), done)
        if self.writing_paused:  # the app still has not read the last response
            self._upstream_reading(False)
        self.to_upstream += [request.head, *request.body]
        if not request.replayable:
            request.body.clear()
        self._unhold(request)
        self._flush()
        attempt.sent()
        await attempt.decided()
        return None

    async def _connection(self, endpoint: Endpoint) -> UpstreamConnection | None:
        """An idle pooled connection to `endpoint`, or a new one; None if it cannot be had."""
        live = self.live
        context = live.runtime.contexts.client
        assert context is not None, "upstreams start after the first SVID"
        connection = live.pool.take(endpoint, context)
        if connection is not None:
            live.counted.reused.inc()
            return connection
        breaker = live.breaker
        if not breaker.acquire("max_pending"):
            raise LocalAnswer(*_overflow(live, "max_pending"))
        try:
            if not breaker.acquire("max_connections"):
                raise LocalAnswer(*_overflow(live, "max_connections"))

            released = False

            def release() -> None:  # once: by a failed dial, or by the connection's loss
                nonlocal released
                if not released:
                    released = True
                    breaker.release("max_connections")

            try:
                _, connection = await live.dial(
                    endpoint, lambda: UpstreamConnection(live.pool, endpoint, context, release)
                )
            except DialError:
                release()
                return None
            except asyncio.CancelledError:  # the app left, or the request timed out, mid-dial
                release()
                raise
        finally:
            breaker.release("max_pending")
        live.counted.new.inc()
        return connection

    # -- responses -----------------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        self.active = True
        responses = self.responses
        assert responses is not None
        try:
            responses.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):
            self._drop_connection()
            self.upstream_lost()  # it broke HTTP: as good as a reset
        self._flush()

    def response_done(self, status: int, keep_alive: bool) -> None:
        """The response ended; its connection goes back to the pool if it can carry another."""
        attempt = self.attempt
        assert attempt is not None and attempt.parser is not None
        connection = attempt.release()
        request = self.queue[0]
        if connection is not None:
            if keep_alive and request.done and self.live.keeps(connection.endpoint):
                self.live.pool.put(connection)
            else:
                connection.close()
        if not attempt.parser.done.done():
            attempt.parser.done.set_result(status)

    def upstream_lost(self) -> None:
        """The connection in use is gone: a reset before the head, or the end of the body."""
        attempt = self.attempt
        if attempt is None:
            return
        attempt.release()  # gone already: nothing to drop
        events = self.events
        if events is None or events.finished:
            return
        if not events.delivering:
            attempt.decide("reset")
        elif events.until_close:
            events.finish(keep_alive=False)
            self._flush()  # the last chunk: nothing else will write it
        else:  # truncated: the app must not take it for the whole response
            self.abort()
            if attempt.parser is not None and not attempt.parser.done.done():
                attempt.parser.done.set_result(502)

    def upstream_paused(self, paused: bool) -> None:
        if self.client is not None and not self.stopped:
            (self.client.pause_reading if paused else self.client.resume_reading)()

    def _upstream_reading(self, on: bool) -> None:
        connection = self.connection
        if connection is not None and connection.transport is not None:
            (connection.transport.resume_reading if on else connection.transport.pause_reading)()

    @property
    def connection(self) -> UpstreamConnection | None:
        """The upstream connection the try in progress holds."""
        return self.attempt.connection if self.attempt is not None else None

    @property
    def events(self) -> _Responses | None:
        """The response of the try in progress (or of the last one)."""
        parsing = self.attempt.parser if self.attempt is not None else None
        return parsing.events if parsing is not None else None

    @property
    def responses(self) -> httptools.HttpResponseParser | None:
        parsing = self.attempt.parser if self.attempt is not None else None
        return parsing.parser if parsing is not None else None

    def _drop_connection(self) -> None:
        connection = self.attempt.release() if self.attempt is not None else None
        if connection is not None:
            connection.abort()

    # -- to the app ----------------------------------------------------------------------

    def _answer(self, status: int, error: str, detail: str = "") -> int:
        self.to_client.append(local_response(status, error_body(error, detail)))
        self.closing = True
        self._flush()
        return status

    def _close_client(self) -> None:
        self.stopped = True
        self._flush()
        if self.client is not None:
            self.client.close()

    def _flush(self) -> None:
        if self.to_upstream:
            connection = self.connection
            if connection is not None and connection.transport is not None:
                connection.transport.write(b"".join(self.to_upstream))
            self.to_upstream.clear()
        if self.to_client and self.client is not None:
            self.client.write(b"".join(self.to_client))
            self.to_client.clear()


class _Responses:
    """llhttp's callbacks for one response: decide whether to retry on it, else deliver it."""

    def __init__(
        self, exchange: OutboundHttp, request: _Request, connection: UpstreamConnection
    ) -> None:
        self.exchange = exchange
        self.request = request
        self.connection = connection
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.status = 0
        self.delivering = False
        self.finished = False
        self.rechunk = False  # llhttp hands the body de-chunked: frame it again
        self.until_close = False  # no length: the body ends when the connection does

    def on_message_begin(self) -> None:
        if self.finished:  # a second response nobody asked for: the server cannot be trusted
            self.connection.abort()
            raise Refused
        self.reason, self.headers = b"", []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        x = self.exchange
        assert x.responses is not None
        status = self.status = x.responses.get_status_code()
        if status < 200:  # 100 Continue and friends: pass on, the final response follows
            if status != 101 and not self.request.http10:
                x.to_client.append(self._head())
            return
        if self._retry_granted(status):
            return  # tried again elsewhere: the attempts loop drops this connection
        names = {n.lower() for n, _ in self.headers}
        chunked = any(
            n.lower() == b"transfer-encoding" and b"chunked" in v.lower() for n, v in self.headers
        )
        bodyless = self.request.method == "HEAD" or status in (204, 304)
        self.until_close = not bodyless and not chunked and b"content-length" not in names
        self.rechunk = not self.request.http10 and (chunked or self.until_close) and not bodyless
        closing = x.closing or (x.draining and len(x.queue) == 1) or not self.request.keep_alive
        extra = []
        if self.until_close and self.rechunk:
            extra.append(b"transfer-encoding: chunked")
        if closing:
            extra.append(b"connection: close")
        x.to_client.append(self._head(extra, drop_te=self.request.http10))
        self.delivering = True
        if bodyless:
            self.finish(x.responses.should_keep_alive())

    def on_body(self, body: bytes) -> None:
        if self.delivering and not self.finished:
            self.exchange.to_client.append(
                b"%x\r\n%s\r\n" % (len(body), body) if self.rechunk else body
            )

    def on_message_complete(self) -> None:
        if self.delivering and not self.finished and self.status >= 200:
            responses = self.exchange.responses
            self.finish(responses is not None and responses.should_keep_alive())

    def finish(self, keep_alive: bool) -> None:
        self.finished = True
        if self.rechunk:
            self.exchange.to_client.append(b"0\r\n\r\n")
        self.exchange.response_done(self.status, keep_alive and not self.until_close)

    def _retry_granted(self, status: int) -> bool:
        """Whether this response is not delivered: the try is decided (agent/core/tries.py)
        as the head arrives, before any of it reaches the app."""
        attempt = self.exchange.attempt
        assert attempt is not None
        request = self.request
        # A response that came before the whole request was read is delivered: what is
        # left of the request would follow it.
        step = attempt.decide(Response(status), replayable=request.replayable and request.done)
        return not isinstance(step, Deliver)

    def _head(self, extra: Sequence[bytes] = (), *, drop_te: bool = False) -> bytes:
        hop = _hop_by_hop(self.headers)
        if drop_te:
            hop.add(b"transfer-encoding")
        lines = [b"HTTP/1.1 %d %s" % (self.status, self.reason)]
        lines += [b"%s: %s" % (n, v) for n, v in self.headers if n.lower() not in hop]
        return b"\r\n".join([*lines, *extra]) + b"\r\n\r\n"


def _hop_by_hop(headers: Sequence[tuple[bytes, bytes]]) -> set[bytes]:
    """The headers that end at this hop: the fixed ones, and the ones Connection names."""
    hop = set(_HOP_BY_HOP)
    for name, value in headers:
        if name.lower() == b"connection":
            hop.update(v.strip().lower() for v in value.split(b","))
    return hop - _END_TO_END


def _key(
    hash_on: tuple[str, str] | None, headers: list[tuple[bytes, bytes]], source: bytes
) -> bytes | None:
    """What a consistent-hash balancer hashes for this request: None picks at random."""
    if hash_on is None:
        return None
    kind, name = hash_on
    if kind == "source":
        return source
    wanted = name.encode() if kind == "header" else b"cookie"
    for header, value in headers:
        if header.lower() != wanted:
            continue
        if kind == "header":
            return value
        for cookie in value.split(b";"):
            cookie_name, _, found = cookie.strip().partition(b"=")
            if cookie_name == name.encode():
                return found
    return None


def _overflow(live: LiveUpstream, reason: str) -> tuple[int, str]:
    live.counted.overflow(reason)
    return 503, f"overflow_{reason}"
