"""HTTP/1.1 inbound (L7): every request parsed, authorized, and handed to the app normalized.

llhttp (httptools) parses both directions, strictly: a request whose framing
is ambiguous (Content-Length beside Transfer-Encoding, bare LF, bad chunk
sizes) is a 400, never a guess. The agent writes each request head to the app
itself: the normalized path with the original query, the headers as received
minus the identity headers, and its own x-forwarded-client-cert naming the
verified peer; bodies stream through, re-chunked when they came chunked.
Responses are parsed the same way, so an app that echoes the identity header
cannot leak it, and every status is counted.

One request is in flight to the app at a time. A client that pipelines has
its later requests authorized at once and held (bounded: reading pauses
beyond HOLD_BYTES) until the app has answered the earlier ones, so every
response starts on a fresh read from the app. That is also how a response to
HEAD, which llhttp cannot be told has no body, ends cleanly: its head is the
whole message, and the next response gets a fresh parser.

A denied request gets 403 with a short JSON body naming the policy and rule;
a bad path 400; a header name with an underscore 400, or the header is
dropped (agent/core/headers.py decides, for both directions); headers over
the limits 431; CONNECT 501. Each such answer closes the connection once
earlier responses are out. A WebSocket Upgrade is authorized like any request;
if the app answers 101 the connection is relayed as bytes both ways from then
on, else HTTP goes on. Any other Upgrade (h2c) is dropped: http1 decides.
An HTTP/2 preface gets a GOAWAY saying which port protocol to use. The
framing rules themselves live in agent/core/http1.py; this module applies
its events to the two transports.

Draining (SIGTERM): an idle connection closes at once; one with requests
already read gets their responses, the last with `Connection: close`, and
then closes. A request whose head had not arrived whole is not taken: the
connection closes under it, which a client treats like any pooled connection
the server closed (it retries elsewhere), never a 502 after the app acted. So
are pipelined requests read but not parsed yet (past HOLD_BYTES): the last
response answered says `Connection: close`, and the client sends the rest
again elsewhere, as it would to any server that closes.
"""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Protocol

from agent.core import http1
from agent.core.accesslog import Entry
from agent.core.headers import UnderscoreAction
from agent.core.http1 import END, Data, Framing, Refused, Request, Response, Switched
from agent.core.httppath import BadPath, normalize_host, normalize_target
from agent.core.policy import Decision
from agent.core.tracecontext import HEADERS as TRACE_HEADERS

if TYPE_CHECKING:
    from agent.adapters.tracing import Watch

#: Bytes of pipelined requests held while an earlier one is in flight.
HOLD_BYTES = 256 * 1024
#: What a held request counts beyond its bytes: its objects (the request, its head, its
#: decision), so that many tiny pipelined requests pause reading as a few large ones do.
REQUEST_COST = 1024
#: A client's read is parsed this much at a time, and no further once HOLD_BYTES are held:
#: the rest waits unparsed (`unread`) until held requests went out. Parsed whole, one
#: 256 KiB read of pipelined GETs was 8,000 requests held at once (~5 MB).
PARSE_BYTES = 8 * 1024

IDENTITY_HEADERS = frozenset({b"x-forwarded-client-cert"})
#: Dropped from a request the agent traces: it sets its own (agent/core/tracecontext.py).
TRACED_HEADERS = IDENTITY_HEADERS | TRACE_HEADERS

#: method, normalized path, normalized host (or None), headers -> the decision
Authorize = Callable[[str, str, str | None, dict[str, tuple[str, ...]]], Decision]


def xfcc(own: str, peer: str) -> bytes:
    """x-forwarded-client-cert as Envoy writes it, values quoted when they need it."""
    return f"By={_quoted(own)};URI={_quoted(peer)}".encode()


def _quoted(value: str) -> str:
    if any(c in value for c in ',;="\\'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


_IDENTITY_LENGTHS = frozenset(map(len, IDENTITY_HEADERS))
#: The usual methods as the policy reads them, decoded once.
METHOD_NAMES = {m.encode(): m for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}


def _identity(name: bytes) -> bool:
    """One of the headers the agent sets, in any spelling an app server may fold onto it."""
    # Called for every header both ways: the length rules out nearly all at once.
    return len(name) in _IDENTITY_LENGTHS and name.lower().replace(b"_", b"-") in IDENTITY_HEADERS


def error_body(error: str, detail: str = "") -> dict[str, str]:
    return {"error": error, "detail": detail} if detail else {"error": error}


def local_response(status: int, body: dict[str, str]) -> bytes:
    payload = json.dumps(body).encode() + b"\n"
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + payload


def local_body_size(response: bytes) -> int:
    """The body bytes of a `local_response`: what an access log line counts as sent,
    as it counts an app's responses (bodies, not heads)."""
    return len(response.partition(b"\r\n\r\n")[2])


class RequestSink(Protocol):
    """What takes a client's HTTP/1.1 requests off the parser: the inbound exchange
    (HttpExchange) and the outbound one (agent/adapters/outbound_http.py)."""

    stopped: bool  # a local answer is queued: nothing more is taken
    requests: http1.RequestParser
    held: int  # bytes (and REQUEST_COST per request) of requests waiting their turn
    unread: bytes  # read from the client, not parsed yet: see PARSE_BYTES

    def request(self, head: Request, /) -> None: ...
    def body(self, data: bytes, /) -> None: ...
    def request_done(self) -> None: ...
    def refuse(self, status: int, error: str, detail: str = "", /) -> None: ...
    def h2_preface(self) -> None: ...


def take_requests(sink: RequestSink, data: bytes, client: asyncio.Transport) -> None:
    """Parse what waits unread and `data` into `sink`, PARSE_BYTES at a time, until it holds
    more than HOLD_BYTES: the rest waits in `sink.unread`, the client's reading paused
    (whatever resumed it: the app's buffer draining, say), until `read_on` is called once
    held requests went out."""
    if sink.unread:
        data, sink.unread = sink.unread + data, b""
    start = 0
    while start < len(data) and not sink.stopped:
        if sink.held > HOLD_BYTES:
            sink.unread = data[start:]
            client.pause_reading()
            return
        piece = data if len(data) <= PARSE_BYTES else data[start : start + PARSE_BYTES]
        deliver_requests(sink.requests.feed(piece), sink)
        start += PARSE_BYTES


def read_on(sink: RequestSink, client: asyncio.Transport) -> None:
    """Held requests went out: parse what waits unread, and read from the client again once
    it is all parsed and what is held fits HOLD_BYTES (not upgrading: what follows an
    Upgrade waits for its answer)."""
    if sink.unread and not sink.stopped:
        take_requests(sink, b"", client)
    if (
        not sink.unread
        and sink.held <= HOLD_BYTES
        and not sink.stopped
        and not sink.requests.upgrading
        and not client.is_closing()
    ):
        client.resume_reading()


def deliver_requests(events: list[http1.RequestEvent], sink: RequestSink) -> None:
    """Hand the parser's events to `sink` in order, until it stops taking them."""
    for event in events:
        if sink.stopped:
            return
        if isinstance(event, Request):
            sink.request(event)
        elif isinstance(event, Data):
            sink.body(event.data)
        elif event is END:
            sink.request_done()
        elif isinstance(event, Refused):
            sink.refuse(event.status, event.error, event.detail)
        else:
            sink.h2_preface()


@dataclass(slots=True)
class _Request:
    """One client request: what goes to the app, or the answer the agent gives itself."""

    method: bytes
    head: bytes = b""
    answer: bytes = b""  # a local response: nothing goes to the app
    framing: Framing = "none"  # its body's, as sent to the app
    http10: bool = False  # the client speaks HTTP/1.0
    keep_alive: bool = True  # the client keeps its connection after it
    upgrade: bool = False  # it asks for an Upgrade: HTTP may end with its answer
    body: list[bytes] = field(default_factory=list)  # held until the request is in flight
    held: int = 0  # bytes of head and body held in memory while it waits
    done: bool = False
    entry: Entry | None = None  # its access log entry and span (an observer is on)

    def __init__(
        self,
        method: bytes,
        head: bytes = b"",
        answer: bytes = b"",
        framing: Framing = "none",
        http10: bool = False,
        keep_alive: bool = True,
        upgrade: bool = False,
        body: list[bytes] | None = None,
        held: int = 0,
        done: bool = False,
        entry: Entry | None = None,
    ) -> None:
        # Written out: compiled, this is native code, where the dataclass's own __init__
        # stays interpreted (one per request).
        self.method = method
        self.head = head
        self.answer = answer
        self.framing = framing
        self.http10 = http10
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.body = [] if body is None else body
        self.held = held
        self.done = done
        self.entry = entry


class HttpExchange:
    """The requests of one client connection and the app's responses, in order."""

    def __init__(
        self,
        client: asyncio.Transport,
        app: asyncio.Transport,
        authorize: Authorize,
        identity: bytes,
        on_response: Callable[[int], None],
        underscores: UnderscoreAction = "reject",
        drained: Callable[[], None] = lambda: None,
        refused: Callable[[str], None] = lambda reason: None,
        watch: Watch | None = None,
        broke: Callable[[str], None] = lambda detail: None,
    ) -> None:
        self.client, self.app = client, app
        self.watch = watch  # None: no access log, no tracing (agent/adapters/tracing.py)
        self.authorize = authorize
        self.identity = identity  # the x-forwarded-client-cert value for this peer; b"": none
        # What every request's head gets for it (made once per connection).
        self.extra: tuple[tuple[bytes, bytes], ...] = (
            ((b"x-forwarded-client-cert", identity),) if identity else ()
        )
        self.on_response = on_response
        self.requests = http1.RequestParser(underscores)
        self.responses: http1.ResponseParser | None = None  # to the request in flight
        self.spare: http1.ResponseParser | None = None  # the last one, for `next` to reuse
        self.queue: deque[_Request] = deque()  # queue[0] is in flight when it goes to the app
        self.held = 0
        self.unread = b""  # read, not parsed yet (see PARSE_BYTES)
        self.reading_on = False  # a read_on is due (called soon: never inside a parse)
        self.answering = False  # a response's head went to the client, its end not yet
        self.stopped = False  # a local answer is queued: later requests are ignored
        # What one read produces for each side goes out in one write: a response's
        # head and body in one TLS record, not two (a quarter more requests/s).
        self.to_client: list[bytes] = []
        self.to_app: list[bytes] = []
        self.outgoing: Framing = "none"  # the response's body, as written to the client
        self.keep = True  # the client's connection stays after the response in flight
        self.tunnel = False  # the app switched protocols: bytes both ways, no HTTP
        self.closing = False  # close the client once what is owed to it is written
        self.draining = False  # take no new request; close once what was read is answered
        self.drained = drained  # told when a drained connection has been sent all it is owed
        self.refused = refused  # told why a connection was refused (protocol_mismatch)
        self.broke = broke  # told how the app broke HTTP, once, as both connections end

    def release(self) -> None:
        """Both connections are gone: let go of the parsers and what they hold (a request
        held behind an Upgrade) at once."""
        self.requests.close()
        for responses in (self.responses, self.spare):
            if responses is not None:
                responses.close()
        self.responses = self.spare = None
        self.queue.clear()
        self.unread = b""
        self.stopped = True

    # -- bytes in ----------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.tunnel:
            self.app.write(data)
        elif not self.stopped:
            take_requests(self, data, self.client)
            if self.requests.upgrading:
                # Held in memory until the app answers the Upgrade: whatever resumed
                # reading (the app's write buffer drained), one read is all it gets.
                self.client.pause_reading()
            self._flush()

    def from_app(self, data: bytes) -> None:
        if self.tunnel:
            self.client.write(data)
            return
        responses = self.responses
        if responses is None:
            self._app_broke(b"", "bytes while no request was in flight", midway=False)
            return
        midway = self.answering  # a response's head went out in an earlier read
        events = responses.feed(data)
        if events and isinstance(events[-1], http1.Broken):
            whole = b"".join(self.to_client[: self._responses(events)])
            self._app_broke(whole, events[-1].detail, midway=midway and not whole)
            return
        self._responses(events)
        self._flush()

    def _app_broke(self, whole: bytes, detail: str, *, midway: bool) -> None:
        """The app broke HTTP: nothing sane can follow on either connection. The responses
        it finished before the break (`whole`: a 204 with a body, say) go out, after what
        was written before, and the client's connection closes; unless the break cut a
        response whose head the client has (`midway`): a reset says it was cut."""
        self.to_client.clear()
        self.to_app.clear()
        self.queue.clear()
        self.unread = b""
        self.stopped = self.closing = True
        self.app.abort()
        self.broke(detail)
        if midway:
            self.client.abort()
            return
        if whole:
            self.client.write(whole)
        self.client.close()

    def _responses(self, events: list[http1.ResponseEvent]) -> int:
        """Apply the app's response events; how much of `to_client` holds whole responses
        (a Broken event, last, is left to the caller)."""
        whole = 0
        for event in events:
            if isinstance(event, Data):
                data = event.data
                self.to_client.append(
                    data if self.outgoing != "chunked" else http1.body("chunked", data)
                )
                if self.watch is not None:
                    self._sent(len(event.data))
            elif event is END:
                self.response_done()
                whole = len(self.to_client)
            elif isinstance(event, Response):
                self.response_head(event)
            elif isinstance(event, Switched):
                self.switch(event.rest)
        return whole

    def _flush(self) -> None:
        if self.to_app:
            self.app.write(b"".join(self.to_app))
            self.to_app.clear()
        if self.to_client:
            self.client.write(b"".join(self.to_client))
            self.to_client.clear()
        if self.closing:
            self.client.close()
            if self.draining and not self.client.get_write_buffer_size():
                # Nothing owed is left to write: the drain does not wait for the client's
                # close_notify, which a pooled client sends only when it next uses the
                # connection (the TLS shutdown goes on meanwhile).
                self.drained()

    def finish(self) -> None:
        """Draining: close now if nothing was asked, else once what was read is answered.
        A switched connection is a byte stream now: it goes on, as a TCP relay does."""
        self.draining = True
        if self.tunnel:
            return
        if not self.queue:
            self.stopped = self.closing = True
            self._flush()
        elif self.queue[-1].done:
            self.stopped = True  # the requests read are all whole: read nothing more

    # -- requests ----------------------------------------------------------------------

    def request(self, request: Request) -> None:
        """A request head is complete: authorize it and send or hold it."""
        if self.draining:  # begun after the drain: not taken (the close tells the client)
            self.stopped = True
            return
        try:
            path, query = normalize_target(request.target.decode("latin-1"))
        except BadPath as exc:
            return self.answer(400, {"error": "bad_path", "detail": str(exc)})
        values: dict[str, tuple[str, ...]] = {}
        # The policy reads what the app will: not the fields that end here (request_head
        # drops them), such as one a `Connection: x-api-version` names.
        hop = http1.hop_by_hop(request.connection, upgrade=request.upgrade is not None)
        for name, value in request.headers:
            if len(name) in _IDENTITY_LENGTHS and _identity(name):  # the length: at once
                continue
            lowered = name.lower()
            if lowered in hop:
                continue
            key = lowered.decode("latin-1")
            # llhttp keeps trailing whitespace; the app drops it (RFC 9110 5.5), so must we.
            text = value.decode("latin-1").strip(" \t")
            found = values.get(key)
            values[key] = (text,) if found is None else (*found, text)
        hosts = values.get("host", ())
        host = normalize_host(hosts[0]) if hosts else None
        method = METHOD_NAMES.get(request.method) or request.method.decode("ascii")
        decision = self.authorize(method, path, host, values)
        forwarded = path + ("?" + query if query else "")
        entry = None
        if self.watch is not None:
            entry = self.watch.request(method, forwarded, request.headers)
            self.watch.decided(entry, decision)
        if not decision.allowed:
            return self.answer(
                403, {"error": "denied", "policy": decision.policy, "rule": decision.rule}, entry
            )
        extra, dropped = self.extra, IDENTITY_HEADERS
        if entry is not None and entry.trace is not None:
            extra += tuple(entry.trace.headers())
            dropped = TRACED_HEADERS
        head = http1.request_head(
            request, forwarded.encode("latin-1"), extra=extra, dropped=dropped
        )
        upgrade = request.upgrade is not None
        self._enqueue(
            _Request(
                request.method,
                head,
                b"",
                request.framing,
                request.version == "1.0",
                request.keep_alive,
                upgrade,
                [],
                0,
                False,
                entry,
            )
        )
        if upgrade:  # nothing follows it but the new protocol, once the app agrees
            self.client.pause_reading()

    def body(self, data: bytes) -> None:
        request = self.queue[-1] if self.queue else None
        if request is None or request.answer:
            return
        if request.entry is not None:
            request.entry.bytes_in += len(data)
        self._send(request, http1.body(request.framing, data))

    def request_done(self) -> None:
        request = self.queue[-1] if self.queue else None
        if request is None or request.answer:
            return
        if request.framing == "chunked":
            self._send(request, http1.LAST_CHUNK)
        request.done = True
        if self.draining:
            self.stopped = True

    def refuse(self, status: int, error: str, detail: str = "") -> None:
        """The request being read breaks a rule (http1 said which): answered, then close."""
        self.answer(status, error_body(error, detail))

    def h2_preface(self) -> None:
        """The client spoke HTTP/2 to an HTTP/1.1 port: a GOAWAY says what to change."""
        self.stopped = self.closing = True
        self.to_client.append(http1.h2_refusal())
        self.refused("protocol_mismatch")

    def answer(self, status: int, body: dict[str, str], entry: Entry | None = None) -> None:
        """Answer the latest request ourselves, after every earlier response; then close."""
        self.stopped = True
        if self.queue and not self.queue[-1].done:
            # The request being read broke off mid-body: it can never reach the app
            # whole, so it is dropped and answered in its place.
            partial = self.queue.pop()
            self.held -= partial.held
            if not self.queue:  # it was in flight: no response to it will come
                self.to_app.clear()
                self.app.abort()
        self._enqueue(_Request(b"", answer=local_response(status, body), done=True))
        self.on_response(status)
        if self.watch is not None:
            self._answered(status, body["error"], entry)

    def _answered(self, status: int, error: str, entry: Entry | None) -> None:
        """The access log entry of a request the agent answered itself."""
        assert self.watch is not None
        if entry is None:  # refused before it was a request: a bad path, a head too big
            entry = self.watch.begin()
        entry.bytes_out = local_body_size(self.queue[-1].answer)
        self.watch.finish(entry, status, error if status != 403 else None)

    def _sent(self, size: int) -> None:
        entry = self.queue[0].entry if self.queue else None
        if entry is not None:
            entry.bytes_out += size

    def _enqueue(self, request: _Request) -> None:
        self.queue.append(request)
        if len(self.queue) == 1:
            self._start(request)
        else:
            self._hold(request, len(request.head) + REQUEST_COST)

    def _send(self, request: _Request, piece: bytes) -> None:
        if not piece:
            return
        if request is self.queue[0]:
            self.to_app.append(piece)
            return
        request.body.append(piece)
        self._hold(request, len(piece))

    def _hold(self, request: _Request, size: int) -> None:
        request.held += size
        self.held += size
        if self.held > HOLD_BYTES:
            self.client.pause_reading()  # resumes when the held requests go out

    def _start(self, request: _Request) -> None:
        """`request` is now first in line: send it, or give our own answer and close."""
        if request.answer:
            self.to_client.append(request.answer)
            self.closing = True
            return
        spare = self.spare
        if spare is None:
            self.responses = http1.ResponseParser(request.method, request.upgrade)
        else:
            self.responses = spare.next(request.method, request.upgrade)
            self.spare = None
        self.to_app.append(request.head)
        if request.body:
            self.to_app += request.body
            request.body.clear()
        self.held -= request.held
        request.held = 0
        if self.unread:
            if self.held <= HOLD_BYTES:
                self._read_on_soon()
        elif (
            self.held <= HOLD_BYTES
            and not self.requests.upgrading  # what follows an Upgrade waits for its answer
            and not self.client.is_closing()
        ):
            self.client.resume_reading()

    def _read_on_soon(self) -> None:
        if not self.reading_on:
            self.reading_on = True  # from the loop: this may run inside a parse
            asyncio.get_running_loop().call_soon(self._read_on)

    def _read_on(self) -> None:
        self.reading_on = False
        read_on(self, self.client)
        self._flush()

    # -- responses ---------------------------------------------------------------------

    def response_head(self, response: Response) -> None:
        """Write the head of the app's response, decide the client connection's fate."""
        request = self.queue[0]
        if response.status < 200 and response.status != 101:
            if not request.http10:  # 100 Continue and friends: the final one follows
                self.to_client.append(
                    http1.response_head(
                        response, "none", http10=False, keep_alive=True, dropped=IDENTITY_HEADERS
                    )
                )
            return
        self.outgoing = http1.relay_framing(
            response.framing, http10=request.http10, ends_with_sender=True
        )
        self.keep = (
            response.keep_alive
            and request.keep_alive
            and request.done  # else the app may still be reading a body it answered early
            and self.outgoing != "close"
            and not (self.draining and len(self.queue) == 1)  # the last before the close
        )
        self.to_client.append(
            http1.response_head(
                response,
                self.outgoing,
                http10=request.http10,
                keep_alive=self.keep,
                dropped=IDENTITY_HEADERS,
            )
        )
        self.answering = True

    def response_done(self) -> None:
        responses = self.responses
        assert responses is not None
        self.answering = False
        self.on_response(responses.status)
        request = self.queue.popleft()
        if request.entry is not None and self.watch is not None:
            self.watch.finish(request.entry, responses.status)
        self.spare, self.responses = responses, None
        if self.outgoing == "chunked":
            self.to_client.append(http1.LAST_CHUNK)
        if not self.keep:
            self.stopped = self.closing = True
        elif request.upgrade:  # answered without switching: HTTP goes on, from what was
            # held since, parsed from the loop as any read past HOLD_BYTES is
            self.unread = self.requests.resume() + self.unread
            self._read_on_soon()
        elif self.queue:
            self._start(self.queue[0])

    def switch(self, rest: bytes) -> None:
        """The app answered 101: from here on the connection is the upgraded stream, relayed
        as bytes both ways (the request that asked was authorized like any other)."""
        self.on_response(101)
        if self.watch is not None and self.queue and self.queue[0].entry is not None:
            self.watch.finish(self.queue[0].entry, 101)
        self.queue.clear()
        self.responses = None
        self.tunnel = True
        held = self.requests.switched()
        if held:
            self.to_app.append(held)
        if rest:
            self.to_client.append(rest)
        if not self.client.is_closing():
            self.client.resume_reading()
