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
bounded like the inbound side (HOLD_BYTES). The framing rules (what a request
may be, its head upstream, the response's framing back to the app) are
agent/core/http1.py's. A WebSocket Upgrade goes upstream like any request
(any other, h2c, is dropped: http1 decides); if the answer is 101 the app's
connection and that upstream connection are relayed as bytes from then on
(never pooled again). An HTTP/2 preface gets a GOAWAY saying which port protocol to use.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import cast

from agent.adapters.attempts import Attempts, LocalAnswer, Try, dial_within_limit, overflow
from agent.adapters.http import (
    HOLD_BYTES,
    METHOD_NAMES,
    REQUEST_COST,
    error_body,
    local_body_size,
    local_response,
    read_on,
    take_requests,
)
from agent.adapters.metrics import TalliedHistogram, clock
from agent.adapters.pool import UpstreamConnection
from agent.adapters.runtime import refusal_line
from agent.adapters.upstreams import DialError, LiveUpstream
from agent.core import http1
from agent.core.accesslog import Entry
from agent.core.http1 import END, Data, Framing, Request, Switched
from agent.core.resilience import CircuitBreaker, RetryBudget
from agent.core.tracecontext import HEADERS as TRACE_HEADERS
from agent.core.tries import Deliver, Outcome, Response
from agent.core.upstream import Endpoint

log = logging.getLogger("outrider.agent")

#: Request body bytes kept for a retry; a longer body is sent once, never replayed.
REPLAY_BYTES = 64 * 1024
_KEPT: frozenset[bytes] = frozenset()  # no header of the app's dropped (tracing off)


@dataclass(slots=True)
class _Request:
    method: str
    head: bytes
    key: bytes | None  # what ring_hash and maglev hash
    keep_alive: bool  # the app keeps its connection after this request
    http10: bool
    framing: Framing  # its body's, as sent upstream
    upgrade: bool = False  # it asks for an Upgrade: a 101 makes the connection a tunnel
    body: list[bytes] = field(default_factory=list)  # held until sent; kept while replayable
    size: int = 0
    replayable: bool = True
    held: int = 0  # bytes of it held in memory until it goes out
    done: bool = False  # the whole request has been read
    answer: bytes = b""  # a refusal queued behind earlier requests
    entry: Entry | None = None  # its access log entry and span (an observer is on)
    wire_method: bytes = b""  # `method` as received, for the response's parser

    def __init__(
        self,
        method: str,
        head: bytes,
        key: bytes | None,
        keep_alive: bool,
        http10: bool,
        framing: Framing,
        upgrade: bool = False,
        body: list[bytes] | None = None,
        size: int = 0,
        replayable: bool = True,
        held: int = 0,
        done: bool = False,
        answer: bytes = b"",
        entry: Entry | None = None,
        wire_method: bytes = b"",
    ) -> None:
        # Written out, as for each per-request class here: compiled, this is native code,
        # where the dataclass's own __init__ stays interpreted.
        self.method = method
        self.head = head
        self.key = key
        self.keep_alive = keep_alive
        self.http10 = http10
        self.framing = framing
        self.upgrade = upgrade
        self.body = [] if body is None else body
        self.size = size
        self.replayable = replayable
        self.held = held
        self.done = done
        self.answer = answer
        self.entry = entry
        self.wire_method = wire_method


@dataclass(slots=True)
class _Parsing:
    """A try's response state: the core's parser fed what the upstream sends, its events
    applied, and how it ended."""

    events: _Responses
    parser: http1.ResponseParser
    # A try run by the attempts loop in a task: the status the app got, once the response
    # is over; 0 once the try was decided not to deliver it (retried, or answered by the
    # agent). None: a try made without a task (`OutboundHttp._next`), `_try_over` goes on.
    done: asyncio.Future[int] | None
    over: bool = False  # `_try_over` was told, once

    def __init__(
        self,
        events: _Responses,
        parser: http1.ResponseParser,
        done: asyncio.Future[int] | None,
        over: bool = False,
    ) -> None:
        self.events = events
        self.parser = parser
        self.done = done
        self.over = over


@dataclass(slots=True)
class _Flight:
    """The request in flight and what it holds until it is answered: its place under the
    circuit breaker's max_requests and in the retry budget (those it was taken from: a
    reload may replace either meanwhile), and its tries. `end` gives them back, once."""

    request: _Request
    started: float  # clock()
    breaker: CircuitBreaker
    budget: RetryBudget
    tries: Attempts[UpstreamConnection, _Parsing] | None = None
    ended: bool = False

    def __init__(
        self,
        request: _Request,
        started: float,
        breaker: CircuitBreaker,
        budget: RetryBudget,
        tries: Attempts[UpstreamConnection, _Parsing] | None = None,
        ended: bool = False,
    ) -> None:
        self.request = request
        self.started = started
        self.breaker = breaker
        self.budget = budget
        self.tries = tries
        self.ended = ended

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.tries is not None:
            self.tries.close()  # a try still in progress: its connection dropped
        self.budget.request_finished()
        self.breaker.release("max_requests")


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
        self.requests = http1.RequestParser(live.runtime.limits.headers_with_underscores)
        self.queue: deque[_Request] = deque()  # queue[0] is in flight
        self.held = 0
        self.unread = b""  # read, not parsed yet (agent/adapters/http.py PARSE_BYTES)
        self.reading_on = False  # a read_on is due (called soon: never inside a parse)
        self.flight: _Flight | None = None  # queue[0]'s, once it started
        self.task: asyncio.Task[None] | None = None  # its attempts loop, when it must wait
        self.loop: asyncio.AbstractEventLoop | None = None  # the running one, from connection_made
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
        # None: no access log, no tracing (agent/adapters/tracing.py).
        observer = live.runtime.observer
        self.watch = (
            None if observer is None else observer.watch("http", "outbound", None, None, live.name)
        )
        # The upstream connection after a 101: bytes both ways, no HTTP.
        self.tunnel: UpstreamConnection | None = None

    # -- the app's connection ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.client = cast(asyncio.Transport, transport)
        self.loop = asyncio.get_running_loop()  # once: each call is a getpid() (Python 3.11)
        hash_on = self.live.config.hash_on
        if hash_on is not None and hash_on[0] == "source":
            peer = transport.get_extra_info("peername")
            self.source = str(peer[0]).encode() if peer else b""
        self._arm_idle()

    def _arm_idle(self) -> None:
        seconds = self.live.runtime.limits.idle_timeout.total_seconds()
        assert self.loop is not None
        self.idle = self.loop.call_later(seconds, self._check_idle)

    def _check_idle(self) -> None:
        if self.active:
            self.active = False
            self._arm_idle()
        else:  # no bytes either way for a whole timeout: as the TCP relay does
            self.abort()

    def data_received(self, data: bytes) -> None:
        self.active = True
        tunnel = self.tunnel
        if tunnel is not None:
            if tunnel.transport is not None:
                tunnel.transport.write(data)
        elif not self.stopped and self.client is not None:
            take_requests(self, data, self.client)
            if self.requests.upgrading and self.client is not None:
                # Held in memory until the upstream answers the Upgrade: whatever
                # resumed reading, one read is all it gets.
                self.client.pause_reading()
            self._flush()

    def h2_preface(self) -> None:
        """The app spoke HTTP/2 to an HTTP/1.1 upstream: a GOAWAY says what to change."""
        self.stopped = True
        self.to_client.append(http1.h2_refusal())
        self._close_client()
        runtime = self.live.runtime
        runtime.connection_refused("outbound", "protocol_mismatch")
        refusal_line(
            runtime.refusal_lines,
            log,
            ("outbound", "protocol_mismatch"),
            "outbound %s: refused an HTTP/2 connection: %s",
            self.live.name,
            http1.H2_ADVICE,
        )

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
        self._abandon()
        self._drop_connection()  # mid-exchange: its state is unknown
        if self.tunnel is not None:
            self.tunnel.close()
        self.on_closed(self)
        # Its last try's response state refers back to it (_Responses.exchange), and
        # llhttp holds each parser's callbacks: cycles only the garbage collector would
        # free, a few dozen objects per connection. Nothing is parsed from now on.
        self.requests.close()
        self.unread = b""
        if self.attempt is not None:
            self.attempt.parser = None

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
        if self.tunnel is not None:
            return  # a byte stream now: it goes on, as a TCP relay does
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
            self._abandon()
            self._drop_connection()
            if self.events is not None and self.events.delivering:
                self.abort()
            else:
                self._answer(status, error, detail)
                self._close_client()
            return
        refusal = _Request("", b"", None, False, False, "none", done=True)
        refusal.answer = local_response(status, error_body(error, detail))
        self.queue.append(refusal)
        if len(self.queue) == 1:
            self._next()

    # -- requests ------------------------------------------------------------------------

    def request(self, head: Request) -> None:
        """A request head is complete: queue it, and send it when it is first in line.
        It goes upstream as HTTP/1.1 on a pooled connection: its hop-by-hop headers (the
        app's `Connection: close`, say) end here."""
        if self.draining:  # begun after the drain: not taken (the close tells the app)
            self.stopped = True
            return
        headers = head.headers
        # An HTTP/1.0 app may leave Host out (HTTP/1.1 without one is refused: http1); the
        # upstream wants one.
        host = head.version == "1.1" or any(name.lower() == b"host" for name, _ in headers)
        extra: tuple[tuple[bytes, bytes], ...] = (
            () if host else ((b"host", self.live.name.encode()),)
        )
        method = METHOD_NAMES.get(head.method) or head.method.decode("ascii")
        entry, dropped = None, _KEPT
        if self.watch is not None:  # access log or tracing on: the request is propagated
            entry = self.watch.request(method, head.target.decode("latin-1"), headers)
            assert entry.trace is not None
            extra += tuple(entry.trace.headers())
            dropped = TRACE_HEADERS
        hash_on = self.live.config.hash_on
        request = _Request(
            method,
            http1.request_head(
                head, head.target, version="1.1", keep_alive=True, extra=extra, dropped=dropped
            ),
            None if hash_on is None else _key(hash_on, headers, self.source),
            head.keep_alive,
            head.version == "1.0",
            head.framing,
            head.upgrade is not None,
            entry=entry,
            wire_method=head.method,
        )
        self.queue.append(request)
        self._hold(request, len(request.head) + REQUEST_COST)
        if len(self.queue) == 1:
            self._next()
        if request.upgrade and self.client is not None:
            self.client.pause_reading()  # nothing follows it but the new protocol, if agreed

    def body(self, data: bytes) -> None:
        request = self.queue[-1]
        self._add(request, http1.body(request.framing, data))

    def request_done(self) -> None:
        request = self.queue[-1]
        if request.framing == "chunked":
            self._add(request, http1.LAST_CHUNK)
        request.done = True
        if self.draining:
            self.stopped = True

    def _add(self, request: _Request, piece: bytes) -> None:
        if not piece:
            return
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
        if self.unread:
            if self.held <= HOLD_BYTES:
                self._read_on_soon()
        elif (
            self.held <= HOLD_BYTES
            and self.client is not None
            and not self.stopped
            and not self.requests.upgrading  # what follows it waits for the answer
        ):
            self.client.resume_reading()

    def _read_on_soon(self) -> None:
        if not self.reading_on and self.loop is not None:
            self.reading_on = True  # from the loop: this may run inside a parse
            self.loop.call_soon(self._read_on)

    def _read_on(self) -> None:
        self.reading_on = False
        if self.client is not None:
            read_on(self, self.client)
            self._flush()

    def _next(self) -> None:
        """Start the first request in line: forward it, or give the refusal queued for it.

        The usual request (an idle pooled connection to the endpoint chosen, no timeouts)
        goes out from here and is ended by its response's callbacks (`_try_over`): no
        task, no future, no coroutine. What must wait (a dial, a retry, a timer) runs the
        attempts loop in a task (`_forward`), from the same state (`Attempts`)."""
        request = self.queue[0]
        if request.answer:
            self.to_client.append(request.answer)
            self.closing = True
            self._close_client()
            return
        live = self.live
        started = clock()
        self.attempt = None  # the last request's
        breaker, budget = live.breaker, live.budget
        if not breaker.acquire("max_requests"):
            self._answered(request, started, self._answer(*overflow(live, "max_requests")))
            return
        budget.request_started()
        flight = self.flight = _Flight(request, started, breaker, budget)
        timeouts = live.config.timeouts
        first = None
        try:
            tries = flight.tries = Attempts(
                live,
                self.rng,
                method=request.method,
                key=request.key,
                replayable=lambda: request.replayable,
                per_try=timeouts.per_try or None,
                loop=self.loop,
            )
            if not (timeouts.request or timeouts.per_try):  # no timer: no task needed
                first = tries.next_try()
                connection = self._pooled(first.endpoint)
                if connection is not None:
                    self._send(request, first, connection, None)
                    return
        except LocalAnswer as answer:
            self._conclude(flight, self._answer(answer.status, answer.error))
            return
        assert self.loop is not None
        self.task = self.loop.create_task(self._forward(flight, first))

    async def _forward(
        self, flight: _Flight, first: Try[UpstreamConnection, _Parsing] | None
    ) -> None:
        """The request's attempts loop, from `first` (made, not run) or the next try."""
        try:
            status = await self._exchange(flight, first)
        except Exception:  # a bug: the app must not wait on a connection nobody serves
            log.exception(
                "outbound %s: request failed unexpectedly; closing the app's", self.live.name
            )
            self.abort()
            return
        self._conclude(flight, status)
        self._flush()  # the next request's, if it went out

    async def _exchange(
        self, flight: _Flight, first: Try[UpstreamConnection, _Parsing] | None
    ) -> int:
        """Try until a response is delivered or the agent answers; the status the app got."""
        live = self.live
        tries = flight.tries
        assert tries is not None
        try:
            # The attempts loop, then the delivered response to its end: the status the app got.
            run = partial(self._try, flight.request)
            timeout = live.config.timeouts.request
            if not timeout:  # no timer to arm
                attempt = await tries.run(run, first)
                status = await _response_end(attempt)
            else:
                async with asyncio.timeout(timeout):
                    attempt = await tries.run(run, first)
                    status = await _response_end(attempt)
            attempt.end(status)
            return status
        except LocalAnswer as answer:
            return self._answer(answer.status, answer.error)
        except TimeoutError:
            if self.events is not None and self.events.delivering:
                self.abort()  # the response has begun: it cannot be replaced
                return 504
            return self._answer(504, "upstream_timeout")
        finally:
            flight.end()
            if self.attempt is not None:
                self.attempt.end()  # if the response did not: mid-exchange, it is dropped

    def _try_over(self, attempt: Try[UpstreamConnection, _Parsing], status: int) -> None:
        """`attempt` is over: its response delivered whole (`status`, what the app got), or
        (0) decided not to be delivered (retried, redialled, or answered by the agent).

        A task waiting on it (`_try`) is woken; else (made by `_next`) the request ends
        here, or its attempts loop goes on in a task."""
        parsing = attempt.parser
        assert parsing is not None
        if parsing.done is not None:
            if not parsing.done.done():
                parsing.done.set_result(status)
            return
        flight = self.flight
        if parsing.over or flight is None or flight.tries is None:
            return  # told already, or abandoned (the app left)
        if flight.tries.current is not attempt:
            return  # not this request's try in progress: nothing of it to go on with
        parsing.over = True
        assert attempt.step is not None
        try:
            delivered = flight.tries.decided(attempt.step)
        except LocalAnswer as answer:
            self._conclude(flight, self._answer(answer.status, answer.error))
            return
        if delivered is None:  # another try: a dial, perhaps, so a task
            assert self.loop is not None
            self.task = self.loop.create_task(self._forward(flight, None))
            return
        delivered.end(status)
        self._conclude(flight, status)

    def _conclude(self, flight: _Flight, status: int) -> None:
        """The request in flight was answered, `status` what the app got: what it held
        goes back (a try the response did not end is dropped mid-exchange)."""
        flight.end()
        if self.attempt is not None:
            self.attempt.end()
        self._answered(flight.request, flight.started, status)

    def _answered(self, request: _Request, started: float, status: int) -> None:
        """Count the request answered, and go on to the next one (or close)."""
        counted = self.live.counted
        counted.code(status).value += 1.0
        _observe(counted.duration, clock() - started)
        if request.entry is not None:
            self._logged(request.entry, request.size, status)
        self.flight = self.task = None
        self.queue.popleft()
        if self.tunnel is not None:  # switched protocols: no more HTTP on this connection
            return
        last = self.draining and not self.queue
        if self.closing or last or not request.keep_alive or not request.done:
            # Answered before the body was all read: the rest would be taken for a request.
            self._close_client()
        elif self.queue and self.client is not None and not self.client.is_closing():
            self._next()  # a pipelined request (not for an app dropped: a truncated response)

    def _logged(self, entry: Entry, size: int, status: int) -> None:
        """A finished request's access log line and span: where its tries went, and the peer
        and TLS of the connection its last try went out on (none if it got none). That
        connection is back in the pool by now: what it says was read when it was dialled."""
        assert self.watch is not None
        attempt = self.attempt
        if attempt is not None:
            entry.endpoint, entry.tries = str(attempt.endpoint), attempt.number
            parsing = attempt.parser
            entry.over(parsing.events.connection.tls if parsing is not None else None)
        entry.bytes_in = size
        self.watch.finish(entry, status)

    def _abandon(self) -> None:
        """The request in flight will not be answered (the app left, or broke it off):
        its task is cancelled, what it holds given back now."""
        flight, task = self.flight, self.task
        self.flight = self.task = None
        if task is not None:
            task.cancel()
        if flight is not None:
            flight.end()

    async def _try(
        self, request: _Request, attempt: Try[UpstreamConnection, _Parsing]
    ) -> Outcome | None:
        """One try in the attempts loop's task: a connection to its endpoint, the request
        sent, until its response head (or its failure) decides it."""
        self.attempt = attempt
        endpoint = attempt.endpoint
        # A redial after a stale pooled connection (`fresh`) dials a new one.
        connection = None if attempt.fresh else self._pooled(endpoint)
        if connection is None:
            connection = await self._dial(endpoint)
            if connection is None:
                return "connect-failure"
        assert self.loop is not None
        done: asyncio.Future[int] = self.loop.create_future()
        self._send(request, attempt, connection, done)
        self._flush()
        if attempt.timer is None:
            # No per-try timeout: nothing needs the loop to wake at the decision, so it
            # wakes once, when the response is over (or the try decided not to deliver
            # it: `_try_over`), and `_exchange` finds it done.
            await done
        else:
            await attempt.decided()
        return None

    def _send(
        self,
        request: _Request,
        attempt: Try[UpstreamConnection, _Parsing],
        connection: UpstreamConnection,
        done: asyncio.Future[int] | None,
    ) -> None:
        """Send `request` on `connection` for `attempt`: the response's callbacks decide
        the try (`_Responses`), and say when it is over (`_try_over`). Written by the
        caller's `_flush`: a callback's, once it has applied all it read (a body read with
        the head goes in the same write)."""
        self.attempt = attempt
        attempt.connection = connection
        connection.user = self
        spare, method = connection.spare, request.wire_method or request.method.encode()
        if spare is None:
            parser = http1.ResponseParser(method, request.upgrade)
        else:
            parser = spare.next(method, request.upgrade)
        connection.spare = parser
        attempt.parser = _Parsing(_Responses(self, request, connection), parser, done)
        if self.writing_paused:  # the app still has not read the last response
            self._upstream_reading(False)
        self.to_upstream.append(request.head)
        if request.body:
            self.to_upstream += request.body
            if not request.replayable:
                request.body.clear()
        self._unhold(request)
        attempt.sent()

    def _pooled(self, endpoint: Endpoint) -> UpstreamConnection | None:
        """An idle pooled connection to `endpoint`, if there is one (a plain call: the usual
        case takes no coroutine of its own)."""
        live = self.live
        context = live.runtime.contexts.client
        assert context is not None, "upstreams start after the first SVID"
        connection = live.pool.take(endpoint, context)
        if connection is not None:
            live.counted.reused_count.value += 1.0
        return connection

    async def _dial(self, endpoint: Endpoint) -> UpstreamConnection | None:
        """A new connection to `endpoint`; None if it cannot be had."""
        live = self.live
        context = live.runtime.contexts.client
        assert context is not None, "upstreams start after the first SVID"
        breaker = live.breaker
        if not breaker.acquire("max_pending"):
            raise LocalAnswer(*overflow(live, "max_pending"))
        try:
            # A partial, not a closure: compiled, a closure and its environment are a cycle.
            connection, tls = await dial_within_limit(
                live, endpoint, partial(UpstreamConnection, live.pool, endpoint, context)
            )
        except DialError as exc:
            live.runtime.dial_failed(live.name, endpoint, exc)  # as the TCP outbound says it
            return None
        finally:
            breaker.release("max_pending")
        live.counted.new.inc()
        connection.tls = tls
        return connection

    # -- responses -----------------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        self.active = True
        if self.tunnel is not None:
            if self.client is not None:
                self.client.write(data)
            return
        responses, events = self.responses, self.events
        assert responses is not None and events is not None
        # A response whole before the break was delivered, its connection closed, and the
        # next request may be out already: nothing of that one is dropped.
        if not events.apply(responses.feed(data)) and self.events is events:
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
        if request.upgrade and not self.closing:  # answered without switching: HTTP goes
            # on, from what was held since, parsed from the loop as any read past HOLD_BYTES
            self.unread = self.requests.resume() + self.unread
            self._read_on_soon()
        self._try_over(attempt, status)

    def switch(self, rest: bytes) -> None:
        """The upstream answered 101: the app's connection and this upstream connection are
        one byte stream from now on (the request that asked was sent like any other)."""
        attempt = self.attempt
        assert attempt is not None and attempt.parser is not None
        tunnel = attempt.release()  # the try ends without dropping it
        assert tunnel is not None
        self.tunnel = tunnel  # still its user: its bytes and its close come here
        held = self.requests.switched()
        if held and tunnel.transport is not None:
            tunnel.transport.write(held)
        if rest:
            self.to_client.append(rest)
        if self.client is not None:
            self.client.resume_reading()
        self._try_over(attempt, 101)

    def upstream_lost(self) -> None:
        """The connection in use is gone: a reset before the head, or the end of the body."""
        if self.tunnel is not None:  # the upgraded stream ended upstream: so it does here
            self._close_client()
            return
        attempt = self.attempt
        if attempt is None:
            return
        lost = attempt.release()  # gone already: nothing to drop
        events = self.events
        if events is None or events.finished:
            return
        if not events.delivering:
            attempt.decide("reset", stale=lost is not None and lost.stale)
            self._try_over(attempt, 0)
        elif events.until_close:
            events.finish()
            self._flush()  # the last chunk: nothing else will write it
        else:  # truncated: the app must not take it for the whole response
            self.abort()
            self._try_over(attempt, 502)

    def upstream_paused(self, paused: bool) -> None:
        if self.client is not None and not self.stopped:
            (self.client.pause_reading if paused else self.client.resume_reading)()

    def _upstream_reading(self, on: bool) -> None:
        connection = self.connection or self.tunnel
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
    def responses(self) -> http1.ResponseParser | None:
        parsing = self.attempt.parser if self.attempt is not None else None
        return parsing.parser if parsing is not None else None

    def _drop_connection(self) -> None:
        connection = self.attempt.release() if self.attempt is not None else None
        if connection is not None:
            connection.abort()

    # -- to the app ----------------------------------------------------------------------

    def _answer(self, status: int, error: str, detail: str = "") -> int:
        answer = local_response(status, error_body(error, detail))
        if self.watch is not None and self.queue and self.queue[0].entry is not None:
            self.queue[0].entry.error = error
            self.queue[0].entry.bytes_out = local_body_size(answer)
        self.to_client.append(answer)
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
    """One response's events: decide whether to retry on it, else deliver it to the app."""

    __slots__ = (
        "connection",
        "delivering",
        "exchange",
        "finished",
        "keep_alive",
        "outgoing",
        "request",
        "status",
        "until_close",
    )

    def __init__(
        self, exchange: OutboundHttp, request: _Request, connection: UpstreamConnection
    ) -> None:
        self.exchange = exchange
        self.request = request
        self.connection = connection
        self.status = 0
        self.keep_alive = False  # the upstream keeps the connection after this response
        self.delivering = False
        self.finished = False
        self.outgoing: Framing = "none"  # the body's framing as written to the app
        self.until_close = False  # no length: the body ends when the connection does

    def apply(self, events: list[http1.ResponseEvent]) -> bool:
        """Deliver what the upstream sent; False if it broke HTTP."""
        # Broken comes last: a response whole before it (then a second one, unasked) is
        # delivered, but its connection is never pooled again.
        broken = bool(events) and isinstance(events[-1], http1.Broken)
        for event in events:
            if isinstance(event, Data):
                if self.delivering and not self.finished:
                    data = event.data
                    self.exchange.to_client.append(
                        data if self.outgoing != "chunked" else http1.body("chunked", data)
                    )
                    if self.request.entry is not None:
                        self.request.entry.bytes_out += len(event.data)
            elif event is END:
                if self.delivering and not self.finished:
                    self.keep_alive = self.keep_alive and not broken
                    self.finish()
            elif isinstance(event, http1.Response):
                self.head(event)
            elif isinstance(event, Switched):
                if self.delivering:
                    self.exchange.switch(event.rest)
            else:
                return False
        return True

    def head(self, response: http1.Response) -> None:
        x = self.exchange
        request = self.request
        status = self.status = response.status
        if status < 200 and status != 101:  # 100 Continue and friends: the final one follows
            if not request.http10:
                x.to_client.append(
                    http1.response_head(response, "none", http10=False, keep_alive=True)
                )
            return
        if self._retry_granted(status):
            return  # tried again elsewhere: the attempts loop drops this connection
        self.keep_alive = response.keep_alive
        self.until_close = response.framing == "close"
        self.outgoing = http1.relay_framing(
            response.framing, http10=request.http10, ends_with_sender=False
        )
        if self.outgoing == "close" or not request.done:
            # Answered before the body was all read: the rest would be taken for a request.
            x.closing = True
        keep = not (x.closing or (x.draining and len(x.queue) == 1) or not request.keep_alive)
        x.to_client.append(
            http1.response_head(response, self.outgoing, http10=request.http10, keep_alive=keep)
        )
        self.delivering = True

    def finish(self) -> None:
        self.finished = True
        if self.outgoing == "chunked":
            self.exchange.to_client.append(http1.LAST_CHUNK)
        self.exchange.response_done(self.status, self.keep_alive)

    def _retry_granted(self, status: int) -> bool:
        """Whether this response is not delivered: the try is decided (agent/core/tries.py)
        as the head arrives, before any of it reaches the app."""
        attempt = self.exchange.attempt
        assert attempt is not None
        request = self.request
        # A response that came before the whole request was read is delivered: what is
        # left of the request would follow it.
        step = attempt.decide(Response(status), replayable=request.replayable and request.done)
        if isinstance(step, Deliver):
            return False
        self.exchange._try_over(attempt, 0)
        return True


def _observe(histogram: TalliedHistogram, amount: float) -> None:
    """`histogram.observe(amount)`, compiled here (every request's duration): the loop over
    the buckets is native code, where the histogram's own method is Python."""
    histogram.sum.value += amount
    buckets = histogram.buckets
    for i, bound in enumerate(histogram.bounds):
        if amount <= bound:
            buckets[i].value += 1.0
            return


def _response_end(attempt: Try[UpstreamConnection, _Parsing]) -> asyncio.Future[int]:
    """The delivered try's response, done with the status the app got."""
    assert attempt.parser is not None and attempt.parser.done is not None
    return attempt.parser.done


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
