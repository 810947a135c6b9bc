"""HTTP/1.1 messages, sans-IO: bytes in, events out; heads and bodies back out as bytes.

Every HTTP/1.1 rule the agent applies lives here once, for both roles and both
directions (the model is h11's `_connection.py`, where `_body_framing` decides
how a body is delimited in one place):

- how a message's body is framed (`request_framing`, `response_framing`):
  Content-Length, chunked, until the connection closes, or none (a request
  without either; a response to HEAD; 1xx, 204 and 304);
- how it is framed when passed on (`relay_framing`): llhttp hands bodies on
  de-chunked, so the agent writes its own framing, chunked for an HTTP/1.1
  peer when the sender gave none, close-delimited for an HTTP/1.0 peer;
- which headers end at this hop (`hop_by_hop`), and the head written in their
  place (`request_head`, `response_head`) with the agent's own `Connection`;
- whether a connection stays open after a message (`persistent`);
- what a request may not be (two Hosts, no Host on HTTP/1.1, chunked on
  HTTP/1.0, a Host no app reads alike, an Upgrade with a body, CONNECT),
  header limits, and header names app servers fold (agent/core/headers.py);
- an Upgrade (`Request.upgrade`): the request is passed on and the parser
  holds what follows until the answer says whether the connection switched
  (`RequestParser.switched`) or goes on as HTTP (`RequestParser.resume`);
- an HTTP/2 preface on an HTTP/1.1 port (`H2Preface`, answered by
  `h2_refusal`, a GOAWAY written with the `h2` library), and the mirror: an
  HTTP/1.x request on an h2-only port (`opening`; `h1_advice` says what to do);
- an h2 stream carried to an HTTP/1.1 app (`from_h2`) and its response carried
  back (`to_h2`): an `http` port takes h2 from peer agents too.

llhttp (httptools) stays the tokenizer: it is strict where it matters (a
Content-Length beside a Transfer-Encoding, bare LF, bad chunk sizes are
errors, never guesses). It cannot be told that a response to HEAD has no body,
so a ResponseParser serves one request and ends that response at its head.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import h2.config
import h2.connection
import h2.errors
import httptools

from agent.core.headers import UnderscoreAction, plain, underscore_refusal

Fields = list[tuple[bytes, bytes]]
#: The fields the rules read (`_RULED`), by lower-case name, their values in order.
Scanned = dict[bytes, list[bytes]]
#: How a body is delimited on the wire.
Framing = Literal["none", "length", "chunked", "close"]

#: Envoy's defaults: 60 KiB of request line and headers, 100 headers.
MAX_HEADER_BYTES = 60 * 1024
MAX_HEADERS = 100

#: Headers that end at this hop, whatever Connection says (RFC 9110 7.6.1).
HOP_BY_HOP: Final = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"}
)
#: Never dropped because a Connection header names them: they frame the message (or name
#: its authority), and a body sent without its framing is read as the next message.
END_TO_END: Final = frozenset({b"content-length", b"transfer-encoding", b"host"})
_RULED = frozenset({b"host", b"transfer-encoding", b"content-length", b"connection", b"upgrade"})
#: Kept on an Upgrade to h2c: the server must see the client's SETTINGS (RFC 7540 3.2.1).
_UPGRADE_KEPT = frozenset({b"upgrade", b"http2-settings"})

#: A Host the agent can match the way the app will read it: a name or IP literal, a port
#: (HTTP/1.1's Host and HTTP/2's :authority alike).
HOST_FIELD = re.compile(r"(?:[A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
H2_ADVICE = (
    "this port is protocol: http (HTTP/1.1); set appProtocol: kubernetes.io/h2c or grpc"
    " on the Service port"
)
LAST_CHUNK = b"0\r\n\r\n"

#: An HTTP/1.x request line's start: a method token, then a space.
_REQUEST_LINE = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,20} ")
_METHOD_SO_FAR = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]{1,20}")


# -- events ----------------------------------------------------------------------------


@dataclass(slots=True)
class Request:
    """A request head, complete and within the rules."""

    method: bytes
    target: bytes
    version: str  # "1.1" or "1.0"
    headers: Fields  # as received, minus names refused or dropped by headers.screen
    framing: Framing
    keep_alive: bool  # the client keeps its connection after this exchange
    upgrade: bytes | None = None  # the Upgrade it asks for (`Connection: upgrade` too)
    connection: frozenset[bytes] = frozenset()  # its Connection header's tokens


@dataclass(slots=True)
class Response:
    """A response head: 1xx (informational, more follows) or the final one."""

    status: int
    reason: bytes
    version: str
    headers: Fields
    framing: Framing
    keep_alive: bool  # the server keeps its connection after this response
    connection: frozenset[bytes] = frozenset()  # its Connection header's tokens


@dataclass(slots=True)
class Data:
    data: bytes  # a piece of body, de-chunked


class EndOfMessage:
    """The message's body is whole."""


@dataclass(slots=True)
class Refused:
    """The request breaks a rule: answer it with `status` and close. Nothing more is read."""

    status: int
    error: str
    detail: str = ""


class H2Preface:
    """The connection opened with the HTTP/2 preface: answer it with `h2_refusal`."""


@dataclass(slots=True)
class Switched:
    """101 to an Upgrade: `rest` (what followed the head) and all after it is the new protocol."""

    rest: bytes


@dataclass(slots=True)
class Broken:
    """The server broke HTTP: nothing it sends on this connection can be trusted."""

    detail: str


END: Final = EndOfMessage()
PREFACE: Final = H2Preface()
RequestEvent = Request | Data | EndOfMessage | Refused | H2Preface
ResponseEvent = Response | Data | EndOfMessage | Switched | Broken


# -- decisions -------------------------------------------------------------------------


def scan(headers: Fields) -> Scanned:
    """The fields the rules read, by lower-case name (the parsers build it as they go)."""
    scanned: Scanned = {}
    for name, value in headers:
        key = name.lower()
        if key in _RULED:
            scanned.setdefault(key, []).append(value)
    return scanned


_NO_TOKENS: Final[frozenset[bytes]] = frozenset()


def _tokens(values: list[bytes] | None) -> frozenset[bytes]:
    """The comma-separated tokens of a field's values, lower-case."""
    if not values:
        return _NO_TOKENS
    return frozenset(t.strip().lower() for v in values for t in v.split(b",")) - {b""}


def _chunked(scanned: Scanned) -> bool:
    """Transfer-Encoding ends in chunked (llhttp refuses a request where it does not)."""
    values = scanned.get(b"transfer-encoding", ())
    codings = [t.strip().lower() for v in values for t in v.split(b",")]
    return bool(codings) and codings[-1] == b"chunked"


def request_framing(scanned: Scanned) -> Framing:
    """RFC 9112 6.3: chunked, a Content-Length, or no body (never until close)."""
    if b"transfer-encoding" in scanned:
        return "chunked"  # _check refuses any other last coding, and a length beside it
    return "length" if b"content-length" in scanned else "none"


def response_framing(method: bytes, status: int, scanned: Scanned) -> Framing:
    """RFC 9112 6.3 for a response to `method`: no body for HEAD, 1xx, 204 and 304 whatever
    the headers say; else chunked, a length, or until the server closes."""
    if method == b"HEAD" or status < 200 or status in (204, 304):
        return "none"
    if b"transfer-encoding" in scanned:
        return "chunked" if _chunked(scanned) else "close"
    return "length" if b"content-length" in scanned else "close"


def relay_framing(incoming: Framing, *, http10: bool, ends_with_sender: bool) -> Framing:
    """How a body received with `incoming` framing is sent on to a peer.

    llhttp hands it on de-chunked: chunked stays chunked (re-chunked piece by piece)
    unless the peer is HTTP/1.0, which knows no chunks and reads until the close. A
    close-delimited body stays so when the peer's connection ends with the sender's
    anyway (`ends_with_sender`: inbound, one app connection per client connection);
    else it is chunked for an HTTP/1.1 peer, so the peer's connection can stay."""
    if incoming == "close":
        return "close" if http10 or ends_with_sender else "chunked"
    if incoming == "chunked" and http10:
        return "close"
    return incoming


def persistent(version: str, connection: frozenset[bytes]) -> bool:
    """Whether the sender keeps its connection after this message (RFC 9112 9.3), from the
    tokens of its Connection header."""
    if version == "1.0":
        return b"keep-alive" in connection
    return b"close" not in connection


def hop_by_hop(connection: frozenset[bytes], *, upgrade: bool = False) -> frozenset[bytes]:
    """The headers that end at this hop: the fixed ones, and the ones Connection names
    (its tokens). On an upgrade, Upgrade (and h2c's HTTP2-Settings) go on with it."""
    if not connection and not upgrade:
        return HOP_BY_HOP  # the usual case, with no set to build
    hop = HOP_BY_HOP | connection
    if upgrade:
        hop -= _UPGRADE_KEPT
    return hop - END_TO_END


def connection_tokens(headers: Fields) -> frozenset[bytes]:
    """The tokens of the Connection header(s) in `headers`."""
    return _tokens(scan(headers).get(b"connection"))


def body(framing: Framing, data: bytes) -> bytes:
    """A piece of body as sent with `framing`."""
    return b"%x\r\n%s\r\n" % (len(data), data) if framing == "chunked" and data else data


def end(framing: Framing) -> bytes:
    """What ends a body sent with `framing`."""
    return LAST_CHUNK if framing == "chunked" else b""


#: The name lengths of each `dropped` set: a name of another length needs no folding.
_LENGTHS: dict[frozenset[bytes], frozenset[int]] = {}


def _fields(
    headers: Fields,
    connection: frozenset[bytes],
    incoming: Framing,
    outgoing: Framing,
    *,
    upgrade: bool,
    dropped: frozenset[bytes],
) -> list[bytes]:
    """Header lines passed on: hop-by-hop names out, and `dropped` ones in any spelling an
    app server folds onto them (`_` for `-`); framing as sent."""
    hop = hop_by_hop(connection, upgrade=upgrade)
    if incoming == "chunked" and outgoing == "close":
        hop |= {b"transfer-encoding"}
    lengths = _LENGTHS.get(dropped)
    if lengths is None:
        lengths = _LENGTHS[dropped] = frozenset(map(len, dropped))
    lines = []
    for name, value in headers:
        key = name.lower()
        if key in hop or (len(key) in lengths and key.replace(b"_", b"-") in dropped):
            continue
        lines.append(b"%s: %s" % (name, value))
    if incoming == "close" and outgoing == "chunked":
        lines.append(b"transfer-encoding: chunked")
    return lines


def _connection(version: str, keep_alive: bool, upgrade: bool, headers: Fields) -> list[bytes]:
    """The agent's own Connection header for the next hop."""
    if upgrade:
        kept = [n for n, _ in headers if n.lower() == b"http2-settings"][:1]
        return [b"connection: " + b", ".join([b"Upgrade", *kept])]
    if version == "1.0":
        return [b"connection: keep-alive"] if keep_alive else []
    return [] if keep_alive else [b"connection: close"]


def request_head(
    request: Request,
    target: bytes,
    *,
    version: str | None = None,
    keep_alive: bool | None = None,
    extra: Sequence[tuple[bytes, bytes]] = (),
    dropped: frozenset[bytes] = frozenset(),
) -> bytes:
    """The head the agent sends on for `request`: its normalized `target`, the same
    framing (llhttp de-chunks; `body` chunks again), hop-by-hop headers out."""
    version = version or request.version
    keep = request.keep_alive if keep_alive is None else keep_alive
    lines = [b"%s %s HTTP/%s" % (request.method, target, version.encode())]
    lines += _fields(
        request.headers,
        request.connection,
        request.framing,
        request.framing,
        upgrade=request.upgrade is not None,
        dropped=dropped,
    )
    lines += [b"%s: %s" % field for field in extra]
    lines += _connection(version, keep, request.upgrade is not None, request.headers)
    return b"\r\n".join(lines) + b"\r\n\r\n"


def response_head(
    response: Response,
    outgoing: Framing,
    *,
    http10: bool,
    keep_alive: bool,
    dropped: frozenset[bytes] = frozenset(),
) -> bytes:
    """The head the agent sends a client for `response`, as HTTP/1.1 (RFC 9110 6.2: a
    server sends its own version), its body framed `outgoing` (`relay_framing`), with
    the agent's own decision on the client's connection (`keep_alive`)."""
    switching = response.status == 101
    lines = [b"HTTP/1.1 %d %s" % (response.status, response.reason)]
    lines += _fields(
        response.headers,
        response.connection,
        response.framing,
        outgoing,
        upgrade=switching,
        dropped=dropped,
    )
    if response.status >= 200 or switching:
        lines += _connection("1.0" if http10 else "1.1", keep_alive, switching, [])
    return b"\r\n".join(lines) + b"\r\n\r\n"


def h2_refusal(advice: str = H2_ADVICE) -> bytes:
    """What an HTTP/1.1 port answers an HTTP/2 preface: the server's SETTINGS, then GOAWAY
    HTTP_1_1_REQUIRED whose debug data says what to change (a client logs it)."""
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    connection.initiate_connection()
    connection.close_connection(
        error_code=h2.errors.ErrorCodes.HTTP_1_1_REQUIRED, additional_data=advice.encode()
    )
    return connection.data_to_send()


def h1_advice(protocol: str) -> str:
    """What an h2-only port tells an HTTP/1.x client: what the app (or the port) must change."""
    return (
        f"this port is protocol: {protocol} (HTTP/2 only); the app must speak h2c"
        " (HTTP/2 with prior knowledge), or set appProtocol: http"
    )


Opening = Literal["h2", "http1", "other", "wait"]


def opening(data: bytes) -> Opening:
    """What a connection to an h2-only port opened with, from its first bytes: the HTTP/2
    preface ("h2"), an HTTP/1.x request line ("http1": answer it in HTTP/1.1 with
    `h1_advice`, rather than let h2 fail with a protocol error the client cannot read),
    something else ("other": h2's to refuse), or too few bytes to tell ("wait")."""
    if data.startswith(H2_PREFACE):
        return "h2"
    if H2_PREFACE.startswith(data):
        return "wait"
    if _REQUEST_LINE.match(data):
        return "http1"
    if _METHOD_SO_FAR.fullmatch(data):
        return "wait"  # a method token still arriving
    return "other"


# -- h2 streams to an HTTP/1.1 app -----------------------------------------------------

#: Never passed from an HTTP/1.1 response to h2 (RFC 9113 8.2.2): h2 frames the body.
_NOT_ON_H2: Final = frozenset({b"transfer-encoding"})


def from_h2(method: bytes, target: bytes, fields: Fields, *, bodiless: bool) -> Request:
    """An h2 request (its regular fields, :authority already as `host`) as the HTTP/1.1
    request the app gets: its body framed by its content-length, else chunked unless it
    has none (END_STREAM on its HEADERS); h2's split cookies joined again (RFC 9113
    8.2.3). Connection-specific fields never arrive on h2 (h2 refuses them); `te` ends
    here like every hop-by-hop field (`request_head`)."""
    cookies = [v for n, v in fields if n == b"cookie"]
    headers = [(n, v) for n, v in fields if n != b"cookie"]
    if cookies:
        headers.append((b"cookie", b"; ".join(cookies)))
    if bodiless:
        framing: Framing = "none"
    elif any(n == b"content-length" for n, _ in headers):
        framing = "length"
    else:
        framing = "chunked"
        headers.append((b"transfer-encoding", b"chunked"))
    return Request(method, target, "1.1", headers, framing, True)


def to_h2(response: Response, dropped: frozenset[bytes] = frozenset()) -> Fields:
    """An HTTP/1.1 response head as h2 fields: `:status`, names lower-case, minus the
    hop-by-hop ones, Transfer-Encoding (h2 frames the body itself) and `dropped` (in any
    spelling an app server folds onto them)."""
    hop = hop_by_hop(response.connection) | _NOT_ON_H2
    out = [(b":status", b"%d" % response.status)]
    for name, value in response.headers:
        key = name.lower()
        if key in hop or key.replace(b"_", b"-") in dropped:
            continue
        out.append((key, value.strip(b" \t")))
    return out


# -- parsers ---------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from a callback to stop llhttp (which reports it as HttpParserCallbackError,
    after the callback has recorded why)."""


class RequestParser:
    """The requests a client sends on one connection, as events.

    Nothing more is parsed after a `Refused` or an `H2Preface`; after an Upgrade request,
    what follows is held until `switched()` (the new protocol's first bytes) or
    `resume()` (the server said no: HTTP goes on).
    """

    def __init__(self, underscores: UnderscoreAction = "reject") -> None:
        self.underscores = underscores
        self._parser = httptools.HttpRequestParser(self)
        self._events: list[RequestEvent] = []
        self._url = b""
        self._headers: Fields = []
        self._scanned: Scanned = {}
        self._size = 0
        self._fields = 0  # received, dropped ones included
        # Bytes fed since llhttp last handed any on (a body piece, a complete head):
        # httptools buffers a header name or value whole before calling on_header,
        # so this is what bounds that buffer.
        self._unparsed = 0
        self._messages = 0
        self.stopped = False
        self.upgrading = False  # an Upgrade request is whole: what follows is held
        self._held: list[bytes] = []

    def feed(self, data: bytes) -> list[RequestEvent]:
        if self.stopped:
            return []
        if self.upgrading:
            self._held.append(data)
            return []
        events = self._events = []
        self._unparsed += len(data)
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            self.upgrading = True
            self._held.append(data[upgrade.args[0] :])
        except httptools.HttpParserError as exc:
            if str(exc) == "Pause on PRI/Upgrade" and self._messages == 1:
                self.stopped = True  # the connection's first bytes: a client speaking h2
                events.append(PREFACE)
            elif not self.stopped:
                self._refuse(400, "bad_request", _reason(exc))
        if not self.stopped and self._unparsed > MAX_HEADER_BYTES:
            self._refuse(431, "headers_too_large")
        return events

    def switched(self) -> bytes:
        """The server switched protocols: the bytes held since the request, for the tunnel."""
        self.stopped = True
        held, self._held = b"".join(self._held), []
        return held

    def resume(self) -> list[RequestEvent]:
        """The server answered the Upgrade without switching: parse on, from what was held."""
        self.upgrading = False
        self._parser = httptools.HttpRequestParser(self)
        held, self._held = b"".join(self._held), []
        return self.feed(held) if held else []

    def _refuse(self, status: int, error: str, detail: str = "") -> None:
        self.stopped = True
        self._events.append(Refused(status, error, detail))

    def _count(self, size: int) -> None:
        self._size += size
        if self._size > MAX_HEADER_BYTES or self._fields > MAX_HEADERS:
            self._refuse(431, "headers_too_large")
            raise _Stop  # stops the parser: nothing after this is read

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        self._url, self._headers, self._scanned, self._size, self._fields = b"", [], {}, 0, 0
        self._messages += 1

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._count(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        # The hot path: every field of every request (the limits inline, not _count).
        self._fields += 1
        self._size += len(name) + len(value)
        if self._size > MAX_HEADER_BYTES or self._fields > MAX_HEADERS:
            self._count(0)
        if plain(name):
            self._headers.append((name, value))
            key = name.lower()
            if key in _RULED:
                self._scanned.setdefault(key, []).append(value)
        elif self.underscores == "reject":  # trailers too: one rule for every field
            self._refuse(400, "bad_request", underscore_refusal(name))
            raise _Stop
        # else dropped (headers.screen's "drop")

    def on_headers_complete(self) -> None:
        self._unparsed = 0
        parser = self._parser
        method = parser.get_method()
        version = parser.get_http_version()
        headers, scanned = self._headers, self._scanned
        if method == b"CONNECT":
            self._refuse(501, "connect_not_supported", "CONNECT tunnels are not relayed")
            raise _Stop
        refusal = _check(version, scanned)
        upgrade = None
        framing = request_framing(scanned)
        if refusal is None and parser.should_upgrade():
            upgrade = b", ".join(scanned.get(b"upgrade", ()))
            if framing != "none":
                # llhttp takes the body for the new protocol's bytes: were the answer
                # not 101, it would be read as the next request.
                refusal = "an Upgrade request with a body"
        if refusal is not None:
            self._refuse(400, "bad_request", refusal)
            raise _Stop
        connection = _tokens(scanned.get(b"connection"))
        self._events.append(
            Request(
                method,
                self._url,
                version,
                headers,
                framing,
                persistent(version, connection),
                upgrade,
                connection,
            )
        )

    def on_body(self, data: bytes) -> None:
        self._unparsed = 0
        self._events.append(Data(data))

    def on_message_complete(self) -> None:
        self._unparsed = 0
        self._events.append(END)


def _check(version: str, scanned: Scanned) -> str | None:
    """Why a request head is refused (400), or None."""
    hosts = scanned.get(b"host", ())
    if len(hosts) > 1:
        return "more than one Host"
    if not hosts and version == "1.1":
        return "no Host"
    codings = scanned.get(b"transfer-encoding")
    if codings and version == "1.0":
        # RFC 9112 6.1: faulty framing; the app may read the body as close-delimited.
        return "chunked in HTTP/1.0"
    if codings and not _chunked(scanned):  # RFC 9112 6.3: the length cannot be known
        return "Transfer-Encoding does not end in chunked"
    if codings and b"content-length" in scanned:  # the smuggler's favourite
        return "Content-Length beside Transfer-Encoding"
    # llhttp keeps trailing whitespace; the app drops it (RFC 9110 5.5), so must we.
    if hosts and not HOST_FIELD.fullmatch(hosts[0].strip(b" \t").decode("latin-1")):
        return "malformed Host"
    return None


def _reason(exc: httptools.HttpParserError) -> str:
    """llhttp's own words for what is wrong, e.g. 'Invalid header value char'."""
    text = str(exc)
    if text == "Pause on PRI/Upgrade":
        return "an HTTP/2 preface after HTTP/1.1 requests"
    return text.split(": ", 1)[-1] if ": " in text else text or type(exc).__name__


class ResponseParser:
    """The response to one request, as events: its 1xx heads, then the final response.

    Anything after the final response is `Broken`: a server that answers what nobody
    asked cannot be trusted with the next request.
    """

    def __init__(self, method: bytes, upgrade: bool = False) -> None:
        self.method = method
        self.upgrade = upgrade  # the request asked for an Upgrade: a 101 may switch
        self._parser = httptools.HttpResponseParser(self)
        self._events: list[ResponseEvent] = []
        self._reason = b""
        self._headers: Fields = []
        self._scanned: Scanned = {}
        self.framing: Framing = "none"
        self.status = 0
        self.done = False  # the final response is whole

    def feed(self, data: bytes) -> list[ResponseEvent]:
        events = self._events = []
        if self.done:
            if data:
                events.append(Broken("a response nobody asked for"))
            return events
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade as upgrade:
            if self.status == 101 and self.upgrade:
                self.done = True
                events.append(Switched(data[upgrade.args[0] :]))
            else:
                events.append(Broken("101 to a request that asked for no Upgrade"))
        except httptools.HttpParserError as exc:
            stray = self.done  # on_message_begin stopped a second response
            events.append(Broken("a response nobody asked for" if stray else str(exc)))
        return events

    def eof(self) -> list[ResponseEvent]:
        """The server closed: the end of a close-delimited body, else a truncated response."""
        if self.done:
            return []
        self.done = True
        if self.status >= 200 and self.framing == "close":
            return [END]
        return [Broken("closed mid-response")]

    # llhttp's callbacks

    def on_message_begin(self) -> None:
        if self.done:  # the final response was whole (a HEAD response, its parser retired)
            raise _Stop
        self._reason, self._headers, self._scanned = b"", [], {}

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        key = name.lower()
        if key in _RULED:
            self._scanned.setdefault(key, []).append(value)

    def on_headers_complete(self) -> None:
        parser = self._parser
        status = self.status = parser.get_status_code()
        version = parser.get_http_version()
        headers = self._headers
        if status == 101 and not self.upgrade:
            return  # llhttp raises HttpParserUpgrade next: Broken there
        scanned = self._scanned
        connection = _tokens(scanned.get(b"connection"))
        framing = self.framing = response_framing(self.method, status, scanned)
        keep_alive = framing != "close" and persistent(version, connection)
        self._events.append(
            Response(status, self._reason, version, headers, framing, keep_alive, connection)
        )
        if status >= 200 and framing == "none":
            # llhttp would wait for a HEAD response's body: the response is whole here.
            self.done = True
            self._events.append(END)

    def on_body(self, data: bytes) -> None:
        if not self.done:
            self._events.append(Data(data))

    def on_message_complete(self) -> None:
        if self.status >= 200 and not self.done:
            self.done = True
            self._events.append(END)
