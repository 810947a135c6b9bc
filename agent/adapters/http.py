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
the limits 431; an Upgrade or CONNECT 501 (an upgraded stream would carry
bytes no policy sees: use a TCP port for WebSockets). Each such answer
closes the connection once earlier responses are out.

Draining (SIGTERM): an idle connection closes at once; one with requests
already read gets their responses, the last with `Connection: close`, and
then closes. A request whose head had not arrived whole is not taken: the
connection closes under it, which a client treats like any pooled connection
the server closed (it retries elsewhere), never a 502 after the app acted.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

import httptools

from agent.core.headers import UnderscoreAction, screen, underscore_refusal
from agent.core.httppath import BadPath, normalize_host, normalize_target
from agent.core.policy import Decision

#: Envoy's defaults: 60 KiB of request line and headers, 100 headers.
MAX_HEADER_BYTES = 60 * 1024
MAX_HEADERS = 100
#: Bytes of pipelined requests held while an earlier one is in flight.
HOLD_BYTES = 256 * 1024

IDENTITY_HEADERS = frozenset({b"x-forwarded-client-cert"})
#: A Host the agent can match the way the app will read it: a name or IP literal, a port.
_HOST_FIELD = re.compile(r"(?:[A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")

#: method, normalized path, normalized host (or None), headers -> the decision
Authorize = Callable[[str, str, str | None, dict[str, tuple[str, ...]]], Decision]


def xfcc(own: str, peer: str) -> bytes:
    """x-forwarded-client-cert as Envoy writes it, values quoted when they need it."""
    return f"By={_quoted(own)};URI={_quoted(peer)}".encode()


def _quoted(value: str) -> str:
    if any(c in value for c in ',;="\\'):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return value


def _identity(name: bytes) -> bool:
    """One of the headers the agent sets, in any spelling an app server may fold onto it."""
    return name.lower().replace(b"_", b"-") in IDENTITY_HEADERS


def error_body(error: str, detail: str = "") -> dict[str, str]:
    return {"error": error, "detail": detail} if detail else {"error": error}


def local_response(status: int, body: dict[str, str]) -> bytes:
    payload = json.dumps(body).encode() + b"\n"
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + payload


@dataclass
class _Request:
    """One client request: what goes to the app, or the answer the agent gives itself."""

    method: bytes
    head: bytes = b""
    answer: bytes = b""  # a local response: nothing goes to the app
    chunked: bool = False
    body: list[bytes] = field(default_factory=list)  # held until the request is in flight
    held: int = 0  # bytes of head and body held in memory while it waits
    done: bool = False


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
    ) -> None:
        self.client, self.app = client, app
        self.authorize = authorize
        self.underscores = underscores  # what a header name with an underscore gets
        self.identity = identity  # the x-forwarded-client-cert value for this peer; b"": none
        self.on_response = on_response
        self.requests = httptools.HttpRequestParser(RequestEvents(self))
        # Bytes fed to the request parser since it last handed any on (a body piece,
        # a complete head): httptools buffers a header name or value whole before
        # calling on_header, so this is what bounds that buffer.
        self.unparsed = 0
        self.responses = httptools.HttpResponseParser(_AppEvents(self))
        self.queue: deque[_Request] = deque()  # queue[0] is in flight when it goes to the app
        self.held = 0
        self.stopped = False  # a local answer is queued: later requests are ignored
        # What one read produces for each side goes out in one write: a response's
        # head and body in one TLS record, not two (a quarter more requests/s).
        self.to_client: list[bytes] = []
        self.to_app: list[bytes] = []
        self.closing = False  # close the client once what is owed to it is written
        self.draining = False  # take no new request; close once what was read is answered
        self.drained = drained  # told when a drained connection has been sent all it is owed

    def release(self) -> None:
        """Both connections are gone: drop the parsers, whose callbacks refer back to this
        exchange, so reference counting frees it and the TLS state of its transports."""
        del self.requests, self.responses

    # -- bytes in ----------------------------------------------------------------------

    def from_client(self, data: bytes) -> None:
        if self.stopped:
            return
        self.unparsed += len(data)
        try:
            self.requests.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.answer(501, {"error": "upgrade_not_supported"})
        except httptools.HttpParserError as exc:
            if not self.stopped:  # a callback's own refusal is already queued
                self.answer(400, {"error": "bad_request", "detail": _reason(exc)})
        if not self.stopped and self.unparsed > MAX_HEADER_BYTES:
            self.answer(431, {"error": "headers_too_large"})
        self._flush()

    def from_app(self, data: bytes) -> None:
        try:
            self.responses.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade):  # 101: not relayed
            self.client.abort()  # the app broke HTTP: nothing sane can follow
            self.app.abort()
            return
        self._flush()

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
        """Draining: close now if nothing was asked, else once what was read is answered."""
        self.draining = True
        if not self.queue:
            self.stopped = self.closing = True
            self._flush()
        elif self.queue[-1].done:
            self.stopped = True  # the requests read are all whole: read nothing more

    # -- requests ----------------------------------------------------------------------

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        """A request head is complete: authorize it and send or hold it."""
        if self.draining:  # begun after the drain: not taken (the close tells the client)
            self.stopped = True
            return
        try:
            path, query = normalize_target(target.decode("latin-1"))
        except BadPath as exc:
            return self.answer(400, {"error": "bad_path", "detail": str(exc)})
        values: dict[str, tuple[str, ...]] = {}
        for name, value in headers:
            if _identity(name):
                continue
            key = name.lower().decode("latin-1")
            # llhttp keeps trailing whitespace; the app drops it (RFC 9110 5.5), so must we.
            values[key] = (*values.get(key, ()), value.decode("latin-1").strip(" \t"))
        hosts = values.get("host", ())
        if len(hosts) > 1:
            return self.answer(400, {"error": "bad_request", "detail": "more than one Host"})
        version = self.requests.get_http_version()
        if not hosts and version == "1.1":
            return self.answer(400, {"error": "bad_request", "detail": "no Host"})
        if "transfer-encoding" in values and version == "1.0":
            # RFC 9112 6.1: faulty framing; the app may read the body as close-delimited.
            return self.answer(400, {"error": "bad_request", "detail": "chunked in HTTP/1.0"})
        if hosts and not _HOST_FIELD.fullmatch(hosts[0]):
            return self.answer(400, {"error": "bad_request", "detail": "malformed Host"})
        host = normalize_host(hosts[0]) if hosts else None
        decision = self.authorize(method.decode("ascii"), path, host, values)
        if not decision.allowed:
            return self.answer(
                403, {"error": "denied", "policy": decision.policy, "rule": decision.rule}
            )
        forwarded = path + ("?" + query if query else "")
        lines = [f"{method.decode('ascii')} {forwarded} HTTP/{version}".encode("latin-1")]
        lines += [b"%s: %s" % (n, v) for n, v in headers if not _identity(n)]
        if self.identity:  # none for a plaintext caller that permissive capture let in
            lines.append(b"x-forwarded-client-cert: " + self.identity)
        chunked = any("chunked" in v.lower() for v in values.get("transfer-encoding", ()))
        self._enqueue(_Request(method, b"\r\n".join(lines) + b"\r\n\r\n", chunked=chunked))

    def body(self, data: bytes) -> None:
        request = self.queue[-1] if self.queue else None
        if request is None or request.answer:
            return
        piece = _chunk(data) if request.chunked else data
        self._send(request, piece)

    def request_done(self) -> None:
        request = self.queue[-1] if self.queue else None
        if request is None or request.answer:
            return
        self._send(request, b"0\r\n\r\n" if request.chunked else b"")
        request.done = True
        if self.draining:
            self.stopped = True

    def refuse(self, status: int, error: str, detail: str = "") -> None:
        self.answer(status, error_body(error, detail))

    def answer(self, status: int, body: dict[str, str]) -> None:
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

    def _enqueue(self, request: _Request) -> None:
        self.queue.append(request)
        if len(self.queue) == 1:
            self._start(request)
        else:
            self._hold(request, len(request.head))

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
        self.to_app += [request.head, *request.body]
        self.held -= request.held
        request.held = 0
        request.body.clear()
        if self.held <= HOLD_BYTES and not self.client.is_closing():
            self.client.resume_reading()

    # -- responses ---------------------------------------------------------------------

    def response_head(self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> bool:
        """Write the head of the app's response; True when it is the whole response (HEAD)."""
        version = self.responses.get_http_version()
        lines = [b"HTTP/%s %d %s" % (version.encode(), status, reason)]
        last = self.draining and status >= 200 and len(self.queue) == 1
        if last:  # the client learns from this response not to send another
            headers = [(n, v) for n, v in headers if n.lower() != b"connection"]
            headers.append((b"Connection", b"close"))
        lines += [b"%s: %s" % (n, v) for n, v in headers if not _identity(n)]
        self.to_client.append(b"\r\n".join(lines) + b"\r\n\r\n")
        if self.queue and self.queue[0].method == b"HEAD" and status >= 200:
            # No body follows, whatever the headers say: this parser would wait for
            # one, so the next response gets a fresh parser.
            keep_alive = self.responses.should_keep_alive()
            self.responses = httptools.HttpResponseParser(_AppEvents(self))
            self.response_done(status, keep_alive)
            return True
        return False

    def response_done(self, status: int, keep_alive: bool) -> None:
        if status < 200 or not self.queue:  # 1xx: the final response is still to come
            return
        self.on_response(status)
        request = self.queue.popleft()
        if not keep_alive or not request.done or (self.draining and not self.queue):
            # Answered before its body was all read: the app may still be reading
            # that body, so nothing else can follow on this connection.
            self.stopped = True
            self.closing = True
        elif self.queue:
            self._start(self.queue[0])


class RequestReader(Protocol):
    """An exchange that reads requests with `RequestEvents` (inbound here, outbound too)."""

    requests: httptools.HttpRequestParser
    unparsed: int
    stopped: bool
    underscores: UnderscoreAction

    def request(self, method: bytes, target: bytes, headers: list[tuple[bytes, bytes]]) -> None: ...
    def body(self, data: bytes) -> None: ...
    def request_done(self) -> None: ...
    def refuse(self, status: int, error: str, detail: str = "") -> None: ...


class RequestEvents:
    """llhttp's request callbacks, collecting one head at a time within the limits."""

    def __init__(self, exchange: RequestReader) -> None:
        self.exchange = exchange
        self.url = b""
        self.headers: list[tuple[bytes, bytes]] = []  # the fields passed on
        self.size = 0
        self.fields = 0  # received, dropped ones included

    def on_message_begin(self) -> None:
        self.url, self.headers, self.size, self.fields = b"", [], 0, 0

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields += 1
        self._count(len(name) + len(value))
        verdict = screen(name, self.exchange.underscores)
        if verdict == "keep":
            self.headers.append((name, value))
        elif verdict == "reject":  # trailers too: one rule for every field
            self.exchange.refuse(400, "bad_request", underscore_refusal(name))
            raise Refused

    def _count(self, size: int) -> None:
        self.size += size
        if self.size > MAX_HEADER_BYTES or self.fields > MAX_HEADERS:
            self.exchange.refuse(431, "headers_too_large")
            raise Refused  # stops the parser: nothing after this is read

    def on_headers_complete(self) -> None:
        parser = self.exchange.requests
        if parser.should_upgrade():
            return  # feed_data raises HttpParserUpgrade next: answered there
        self.exchange.unparsed = 0
        self.exchange.request(parser.get_method(), self.url, self.headers)
        if self.exchange.stopped:
            raise Refused

    def on_body(self, body: bytes) -> None:
        self.exchange.unparsed = 0
        self.exchange.body(body)

    def on_message_complete(self) -> None:
        self.exchange.unparsed = 0
        self.exchange.request_done()


class _AppEvents:
    """llhttp's response callbacks."""

    def __init__(self, exchange: HttpExchange) -> None:
        self.exchange = exchange
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.finished = False  # a response to HEAD: its parser is retired

    def on_message_begin(self) -> None:
        self.reason, self.headers = b"", []

    def on_status(self, reason: bytes) -> None:
        self.reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self.exchange.responses.get_status_code()
        # 1xx, 204 and 304 have no body, whatever their Transfer-Encoding says.
        self.chunked = (
            status >= 200
            and status not in (204, 304)
            and any(
                n.lower() == b"transfer-encoding" and b"chunked" in v.lower()
                for n, v in self.headers
            )
        )
        self.finished = self.exchange.response_head(status, self.reason, self.headers)

    def on_body(self, body: bytes) -> None:
        if not self.finished:
            self.exchange.to_client.append(
                b"%x\r\n%s\r\n" % (len(body), body) if self.chunked else body
            )

    def on_message_complete(self) -> None:
        if self.finished:
            return
        if self.chunked:
            self.exchange.to_client.append(b"0\r\n\r\n")
        responses = self.exchange.responses
        self.exchange.response_done(responses.get_status_code(), responses.should_keep_alive())


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Refused(Exception):
    """Raised from a callback to stop parsing after the agent has answered."""


def _reason(exc: httptools.HttpParserError) -> str:
    """llhttp's own words for what is wrong, e.g. 'Invalid header value char'."""
    text = str(exc)
    return text.split(": ", 1)[-1] if ": " in text else text or type(exc).__name__
