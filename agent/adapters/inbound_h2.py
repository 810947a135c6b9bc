"""HTTP/2 and gRPC inbound (L7): every stream screened, authorized, and sent to the app
over h2c.

A `protocol: http2|grpc` port serves h2 (ALPN h2 from a peer agent; h2c from a
plaintext client a permissive captured port lets in) with an `H2Server`
(agent/adapters/h2server.py, which holds the connection to the HTTP/2 limits).
Each request stream gets the decisions an HTTP/1.1 request gets
(agent/adapters/http.py): the same path normalization, header-name screening,
Host checks, authorization by the same engine with the same `Request`, and the
peer's own x-forwarded-client-cert in place of any the client sent (none for a
plaintext client). The app gets the normalized `:path` with the original query.

gRPC (content-type `application/grpc*`, on either protocol) adds its own rules
(agent/core/grpc.py): a `:path` that is not a plain `/Service/Method` is refused
UNIMPLEMENTED before any policy; refusals are trailers-only gRPC errors a client
shows (PERMISSION_DENIED, UNAVAILABLE, DEADLINE_EXCEEDED), never dropped
streams; `grpc-timeout` is the call's deadline here and is passed on reduced by
the time spent. Other requests get the JSON answers HTTP/1.1 gets.

The app is reached over h2c on connections of this client connection's own
(`H2Pool`, dialled when the first allowed stream needs one), so one peer's
streams never queue behind another's, and a connection's streams end with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from h2.errors import ErrorCodes

from agent.adapters import h2client
from agent.adapters.h2client import H2Pool, NoRoom, StreamError
from agent.adapters.h2server import H2Stream, Headers, StreamReset
from agent.adapters.http import Authorize, _identity, error_body
from agent.adapters.metrics import CLIENT_CLOSED
from agent.core import grpc
from agent.core.accesslog import Entry
from agent.core.endpoint import Endpoint
from agent.core.h2limits import H2Limits, Limit
from agent.core.headers import (
    UnderscoreAction,
    control_in,
    plain,
    screen,
    underscore_refusal,
)
from agent.core.http1 import HOST_FIELD
from agent.core.httppath import BadPath, normalize_host, normalize_target
from agent.core.tracecontext import HEADERS as TRACE_HEADERS

if TYPE_CHECKING:
    from agent.adapters.tracing import Watch

log = logging.getLogger("outrider.agent")

#: An HTTP method: a token (RFC 9110 9.1, 5.6.2), as llhttp holds an HTTP/1.1 one to.
_METHOD = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")

#: (the :status the client got, its grpc-status or None for a request that is not gRPC)
Answered = Callable[[int, int | None], None]


@dataclass(frozen=True)
class Refusal:
    """The agent's own answer to a stream: an HTTP status and JSON body, or, for a gRPC
    call, a gRPC status and message."""

    status: int
    body: dict[str, str]
    code: grpc.Code
    message: str
    entry: Entry | None = None  # its access log entry, once it was authorized


@dataclass(frozen=True)
class Forward:
    """A request allowed through: the head the app gets, and the call's deadline."""

    headers: Headers
    deadline: float | None  # seconds from now (grpc-timeout), or None
    entry: Entry | None = None  # its access log entry and span (an observer is on)


def refusal(status: int, error: str, detail: str, code: grpc.Code) -> Refusal:
    return Refusal(status, error_body(error, detail), code, detail or error.replace("_", " "))


class InboundH2:
    """The streams of one h2 client connection to one app."""

    def __init__(
        self,
        app: Endpoint,
        authorize: Authorize,
        identity: bytes,
        answered: Answered,
        hit: Callable[[Limit], None],
        *,
        underscores: UnderscoreAction,
        connect_timeout: float,
        idle_timeout: float,
        unreachable: Callable[[BaseException], None],
        limits: H2Limits | None = None,
        watch: Watch | None = None,
        local_addr: tuple[str, int] | None = None,
    ) -> None:
        self.app = app
        self.local_addr = local_addr  # where the app is dialled from (Inbound.source)
        self.watch = watch  # None: no access log, no tracing (agent/adapters/tracing.py)
        self.authorize = authorize
        self.identity = identity  # x-forwarded-client-cert for this peer; b"": none
        self.answered = answered
        self.hit = hit
        self.underscores = underscores
        self.connect_timeout = connect_timeout
        self.unreachable = unreachable  # told (to count and log) when the app cannot be dialled
        self.limits = limits or H2Limits()
        self.pool = H2Pool(idle_timeout)

    def close(self) -> None:
        """The client connection is gone: the app connections close once their streams end
        (each stream's handler has been cancelled, which resets it)."""
        self.pool.close()

    # -- a stream ------------------------------------------------------------------------

    async def handle(self, stream: H2Stream) -> None:
        """H2Server's handler: screen, authorize, forward; every refusal answered."""
        is_grpc = grpc.is_grpc(
            (n.decode("latin-1"), v.decode("latin-1")) for n, v in stream.headers
        )
        decided = self.screen(stream.headers, is_grpc)
        if isinstance(decided, Refusal):
            await self.refuse(stream, decided, is_grpc)
            return
        call = _Call(is_grpc)
        try:
            async with asyncio.timeout(decided.deadline):
                await self.forward(stream, decided, call)
        except TimeoutError:
            if stream.responded:  # too late for a status: the client sees the reset
                stream.reset(ErrorCodes.CANCEL)
                call.code = grpc.Code.DEADLINE_EXCEEDED
            else:
                why = refusal(504, "deadline_exceeded", "", grpc.Code.DEADLINE_EXCEEDED)
                await self.refuse(stream, why, is_grpc, decided.entry)
                return
        except (StreamReset, asyncio.CancelledError):
            call.left()  # the client reset its stream or dropped its connection
            raise
        finally:
            if call.status:  # else refused (counted there)
                self.answered(call.status, call.outcome())
                if decided.entry is not None and self.watch is not None:
                    decided.entry.bytes_in, decided.entry.bytes_out = call.bytes_in, call.bytes_out
                    self.watch.finish(decided.entry, call.status, None, call.outcome())

    def screen(self, headers: Headers, is_grpc: bool) -> Refusal | Forward:
        """The decisions HTTP/1.1 makes on a request head, made on an h2 one."""
        pseudo: dict[bytes, bytes] = {}
        regular: Headers = []
        for name, value in headers:
            if name.startswith(b":"):
                pseudo[name] = value  # h2 has refused duplicates and unknown ones
            else:
                regular.append((name, value))
        raw_method = pseudo.get(b":method", b"")
        if not _METHOD.fullmatch(raw_method):
            # It becomes an HTTP/1.1 request line's first word (an `http` port's app): a
            # space would put a second target there, `GET /admin /api/x HTTP/1.1`, which
            # a lenient app may route while the policy decided on /api/x.
            detail = f"method {raw_method.decode('latin-1')!r} is not a token"
            return refusal(400, "bad_request", detail, grpc.Code.INTERNAL)
        method = raw_method.decode("latin-1")
        if method == "CONNECT":  # an h2 tunnel carries bytes no policy sees
            return refusal(501, "upgrade_not_supported", "", grpc.Code.UNIMPLEMENTED)
        if len(regular) > self.limits.max_headers:
            self.hit("header_list")
            return refusal(431, "headers_too_large", "", grpc.Code.RESOURCE_EXHAUSTED)
        target = pseudo.get(b":path", b"").decode("latin-1")
        if is_grpc:
            problem = grpc.malformed_method(target)
            if problem is not None:
                return refusal(400, "bad_path", problem, grpc.Code.UNIMPLEMENTED)
        try:
            path, query = normalize_target(target)
        except BadPath as exc:
            return refusal(400, "bad_path", str(exc), grpc.Code.UNIMPLEMENTED)
        values: dict[str, tuple[str, ...]] = {}
        kept: Headers = []
        for name, value in regular:
            verdict = screen(name, self.underscores)  # first, as HTTP/1.1 reads a field
            if verdict == "reject":
                detail = underscore_refusal(name)
                return refusal(400, "bad_request", detail, grpc.Code.INTERNAL)
            if verdict == "drop" or _identity(name):
                continue
            control = control_in(value)
            if control is not None:
                detail = f"header {name.decode('latin-1')!r} has the character {control!r}"
                return refusal(400, "bad_request", detail, grpc.Code.INTERNAL)
            kept.append((name, value))
            key = name.decode("latin-1")  # h2 has lower-cased it (or refused the stream)
            values[key] = (*values.get(key, ()), value.decode("latin-1"))
        if len(values.get("content-length", ())) > 1:  # h2 lets equal numbers through
            return refusal(400, "bad_request", "more than one Content-Length", grpc.Code.INTERNAL)
        host_problem = self._host(pseudo.get(b":authority"), values)
        if host_problem is not None:
            return refusal(400, "bad_request", host_problem, grpc.Code.INTERNAL)
        hosts = values.get("host", ())
        host = normalize_host(hosts[0]) if hosts else None
        decision = self.authorize(method, path, host, values)
        entry = None
        if self.watch is not None:
            target = path + ("?" + query if query else "")
            entry = self.watch.request(method, target, regular, "grpc" if is_grpc else "http")
            self.watch.decided(entry, decision)
            if entry.trace is not None:
                kept = [(n, v) for n, v in kept if n not in TRACE_HEADERS]
                kept += entry.trace.headers()
        if not decision.allowed:
            body = {"error": "denied", "policy": decision.policy, "rule": decision.rule}
            message = f"denied by policy {decision.policy!r} rule {decision.rule!r}"
            return Refusal(403, body, grpc.Code.PERMISSION_DENIED, message, entry)
        deadline = None
        if is_grpc and "grpc-timeout" in values:
            try:
                deadline = grpc.parse_timeout(values["grpc-timeout"][0])
            except ValueError as bad:  # not `exc`: compiled, that name is a BadPath here
                return refusal(400, "bad_request", str(bad), grpc.Code.INTERNAL)
            kept = [(n, v) for n, v in kept if n != b"grpc-timeout"]
        head: Headers = [
            (b":method", method.encode("latin-1")),
            (b":scheme", b"http"),
            *([(b":authority", pseudo[b":authority"])] if b":authority" in pseudo else []),
            (b":path", (path + ("?" + query if query else "")).encode("latin-1")),
            *kept,
        ]
        if self.identity:
            head.append((b"x-forwarded-client-cert", self.identity))
        return Forward(head, deadline, entry)

    @staticmethod
    def _host(authority: bytes | None, values: dict[str, tuple[str, ...]]) -> str | None:
        """What is wrong with the request's host, or None; `values` gets its `host` (from
        :authority when no Host header came) for the policy, as an HTTP/1.1 request has."""
        hosts = values.get("host", ())
        if len(hosts) > 1:
            return "more than one Host"
        if authority is not None:
            text = authority.decode("latin-1")
            if hosts and hosts[0] != text:
                return "Host and :authority differ"
            values["host"] = (text,)
            hosts = (text,)
        if hosts and not HOST_FIELD.fullmatch(hosts[0]):
            return "malformed Host"
        return None

    async def refuse(
        self, stream: H2Stream, why: Refusal, is_grpc: bool, entry: Entry | None = None
    ) -> None:
        """The agent's own answer: trailers-only for a gRPC call, else JSON."""
        if self.watch is not None:
            self._logged(why, is_grpc, entry or why.entry)
        try:
            if is_grpc:
                answer = grpc.trailers_only(why.code, why.message)
                await stream.respond([(n.encode(), v.encode()) for n, v in answer], end=True)
                self.answered(200, why.code)
                return
            payload = json.dumps(why.body).encode() + b"\n"
            head = [
                (b":status", str(why.status).encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ]
            await stream.respond(head)
            await stream.send(payload, end=True)
            self.answered(why.status, None)
        except StreamReset:
            pass

    def _logged(self, why: Refusal, is_grpc: bool, entry: Entry | None) -> None:
        """The access log line of a stream the agent answered itself."""
        assert self.watch is not None
        if entry is None:  # refused before it was authorized: a bad path, a header limit
            entry = self.watch.begin("grpc" if is_grpc else "http")
        error = None if why.status == 403 else why.body.get("error")
        status, code = (200, why.code) if is_grpc else (why.status, None)
        self.watch.finish(entry, status, error, code)

    async def forward(self, stream: H2Stream, request: Forward, call: _Call) -> None:
        """Send the request to the app and relay its response; the app unreachable or
        refusing the stream (or lost) before its head is answered 503 / UNAVAILABLE; any
        other reset before the head, 502 / INTERNAL (agent.core.grpc.reset_before_head)."""
        if request.deadline is not None:  # passed on, less what was spent (nothing yet)
            request.headers.append((b"grpc-timeout", grpc.timeout_value(request.deadline).encode()))
        try:
            app = await self._open(request.headers, stream)
        except (OSError, TimeoutError, ConnectionError, NoRoom) as exc:
            self.unreachable(exc)
            why = refusal(503, "app_unreachable", "", grpc.Code.UNAVAILABLE)
            await self.refuse(stream, why, call.grpc, request.entry)
            return
        # What the client has sent goes at once, with the head; a task sends the rest only
        # if more is to come (a streaming call) or the app's windows are shut.
        pending = self._upload_ready(stream, app, call)
        upload = None
        if pending is not None:
            upload = asyncio.get_running_loop().create_task(
                self._upload(stream, app, pending, call)
            )
        try:
            await self._download(stream, app, call)
        finally:
            if upload is not None:
                upload.cancel()
            app.release()

    async def _open(self, headers: Headers, stream: H2Stream) -> h2client.H2Stream:
        endpoint = self.app

        async def dial() -> h2client.H2ClientConnection:
            connection = await h2client.connect(
                endpoint.host,
                endpoint.port,
                within=self.connect_timeout,
                factory=_checked,
                local_addr=self.local_addr,
            )
            connection.endpoint = endpoint
            return connection

        connection, _ = await self.pool.connection(endpoint, None, dial)
        return connection.open(headers, end=stream.bodiless)

    def _upload_ready(self, stream: H2Stream, app: h2client.H2Stream, call: _Call) -> bytes | None:
        """Send, without waiting, what the client has sent already: None once the whole
        request went; else what `_upload` starts with (a chunk the windows did not take
        now, or b"")."""
        if stream.bodiless:
            return None
        try:
            while (chunk := stream.read_now()) is not None:
                if not chunk:
                    _end_upload(stream, app)
                    return None
                call.bytes_in += len(chunk)
                if not app.send_now(chunk):
                    return chunk
        except (StreamError, StreamReset):
            return None  # either side is gone: the response side sees it
        return b""

    async def _upload(
        self, stream: H2Stream, app: h2client.H2Stream, pending: bytes, call: _Call
    ) -> None:
        """The rest of the request body and its trailers, as the app's windows take them."""
        try:
            if pending:
                await app.send(pending)
            while chunk := await stream.read():
                call.bytes_in += len(chunk)
                await app.send(chunk)
            _end_upload(stream, app)
        except (StreamError, StreamReset):
            pass  # either side is gone: the response side sees it

    async def _download(self, stream: H2Stream, app: h2client.H2Stream, call: _Call) -> None:
        """The app's response, as the client's windows take it; `call` learns its status."""
        async for event in app:
            if isinstance(event, h2client.Response):
                headers = _outward(event.headers)
                if event.status >= 200:
                    call.status = event.status
                    call.heard(headers)
                await stream.respond(headers, end=event.end)
            elif isinstance(event, h2client.Data):
                call.bytes_out += len(event.data)
                await stream.send(event.data)
                app.consumed(event.flow)
            elif isinstance(event, h2client.Trailers):
                trailers = _outward(event.headers)
                call.heard(trailers)
                await stream.end(trailers)
            elif isinstance(event, h2client.End):
                if not stream.finished:
                    await stream.end()
            elif call.status is None:  # Reset before the head: the app gave up on it
                code = grpc.reset_before_head(event.code)
                status = 503 if code == grpc.Code.UNAVAILABLE else 502
                await self.refuse(stream, refusal(status, "app_reset", "", code), call.grpc)
                return
            else:  # Reset mid-response: so is the client's stream
                stream.reset(ErrorCodes.INTERNAL_ERROR)
                call.code = call.code if call.code is not None else grpc.Code.INTERNAL
                return


@dataclass
class _Call:
    """What a forwarded request's counting needs to know: its status, and its grpc-status."""

    grpc: bool
    status: int | None = None
    code: int | None = None
    bytes_in: int = 0  # body bytes from the client, for its access log line
    bytes_out: int = 0  # body bytes to it

    def heard(self, headers: Headers) -> None:
        if self.grpc and self.code is None:
            self.code = grpc.status_of(
                (n.decode("latin-1"), v.decode("latin-1")) for n, v in headers
            )

    def left(self) -> None:
        """The client went away before the call was over: CLIENT_CLOSED unless a head went
        out, and CANCELLED unless a grpc-status did (what Envoy records for a client's
        reset)."""
        self.status = self.status or CLIENT_CLOSED
        if self.grpc and self.code is None:
            self.code = grpc.Code.CANCELLED

    def outcome(self) -> int | None:
        """The grpc-status the client got (None: not gRPC). An app that answered a gRPC call
        without one: what a client makes of the HTTP status."""
        if not self.grpc:
            return None
        if self.code is not None:
            return self.code
        status = self.status or 0
        return grpc.Code.UNKNOWN if status == 200 else grpc.from_http_status(status)


#: RFC 9110 6.5.1's fields no trailer may be: framing, routing, authentication, request
#: modifiers and content metadata. Those a policy reads in a head (and a server that merges
#: trailers would take for the head's) are dropped; gRPC sends none of them as trailers.
_HEAD_ONLY = frozenset(
    {
        b"host",
        b"content-length",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"connection",
        b"content-type",
        b"content-encoding",
        b"content-range",
        b"authorization",
        b"proxy-authorization",
        b"cookie",
        b"expect",
        b"range",
        b"if-match",
        b"if-none-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"if-range",
        b"max-forwards",
        b"cache-control",
        b"pragma",
    }
)


def onward(trailers: Headers) -> Headers:
    """A request's trailers as they go on (to the app, or upstream): no identity header, no
    `_HEAD_ONLY` field, no value with a control character a head could not hold, and only
    names no app server folds onto another (agent.core.headers). Unlike a head, they cannot
    be refused: the request has gone on, so the rest are dropped, whatever
    `headers_with_underscores`. No policy sees them (docs/policy.md)."""
    return [
        (n, v)
        for n, v in trailers
        if plain(n) and n not in _HEAD_ONLY and not _identity(n) and control_in(v) is None
    ]


def _outward(headers: Headers) -> Headers:
    """A response's headers or trailers as the client gets them: no identity header."""
    return [(n, v) for n, v in headers if not _identity(n)]


def _checked() -> h2client.H2ClientConnection:
    """An app connection whose request heads h2 does not check again: `screen` built them
    from the client's, which h2 checked on receipt, and the agent's own fields."""
    return h2client.H2ClientConnection(checked_heads=True)


def _end_upload(stream: H2Stream, app: h2client.H2Stream) -> None:
    """The request is whole: its trailers (`onward`) or END_STREAM to the app."""
    app.end(onward(stream.trailers or []) or None)
