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
  a chunked body's trailers end here too (screened and counted like any field,
  never joined to the head: a trailer Host would be one the policy never saw);
- whether a connection stays open after a message (`persistent`);
- what a request may not be (two Hosts, no Host on HTTP/1.1, chunked on
  HTTP/1.0, a Host no app reads alike, an Upgrade with a body, CONNECT, a
  version other than 1.0 and 1.1),
  header limits, and header names app servers fold (agent/core/headers.py);
- an Upgrade (`Request.upgrade`): only to WebSocket. The request is passed
  on and the parser holds what follows until the answer says whether the
  connection switched (`RequestParser.switched`) or goes on as HTTP
  (`RequestParser.resume`). Any other Upgrade (h2c above all) is dropped
  and the request passed on as plain HTTP/1.1: after a 101 to h2c, every
  later request would be an h2 stream no policy sees ("h2c smuggling"), so
  the app answers in HTTP/1.1, as behind Envoy; HTTP/2 to an app is
  `appProtocol: kubernetes.io/h2c`, where each stream is authorized;
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

from agent.core.headers import PLAIN, UnderscoreAction, underscore_refusal

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
#: Their name lengths: a field of another length is none of them, and needs no lower().
_RULED_LENGTHS = frozenset(map(len, _RULED))
#: Kept on an Upgrade (the one relayed: to WebSocket).
_UPGRADE_KEPT = frozenset({b"upgrade"})
#: The protocols a connection may switch to once the policy allowed the request: those
#: whose bytes after the switch carry no requests of their own for a policy to miss.
RELAYED_UPGRADES: Final = frozenset({b"websocket"})

#: A Host the agent can match the way the app will read it: a name or IP literal, a port
#: (HTTP/1.1's Host and HTTP/2's :authority alike).
HOST_FIELD = re.compile(r"(?:[A-Za-z0-9._-]*|\[[0-9A-Fa-f:.]+\])(?::[0-9]*)?")
_HOST_BYTES = re.compile(HOST_FIELD.pattern.encode())  # the same rule, on a field as received

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

_NO_TOKENS: Final[frozenset[bytes]] = frozenset()


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

    def __init__(
        self,
        method: bytes,
        target: bytes,
        version: str,
        headers: Fields,
        framing: Framing,
        keep_alive: bool,
        upgrade: bytes | None = None,
        connection: frozenset[bytes] = _NO_TOKENS,
    ) -> None:
        # Written out (the dataclass's own would be the same): compiled, it is native code,
        # where the one dataclasses generates stays interpreted (a quarter of a microsecond
        # per event, on every request). So for each event class below.
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.framing = framing
        self.keep_alive = keep_alive
        self.upgrade = upgrade
        self.connection = connection


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

    def __init__(
        self,
        status: int,
        reason: bytes,
        version: str,
        headers: Fields,
        framing: Framing,
        keep_alive: bool,
        connection: frozenset[bytes] = _NO_TOKENS,
    ) -> None:
        self.status = status
        self.reason = reason
        self.version = version
        self.headers = headers
        self.framing = framing
        self.keep_alive = keep_alive
        self.connection = connection


@dataclass(slots=True)
class Data:
    data: bytes  # a piece of body, de-chunked

    def __init__(self, data: bytes) -> None:
        self.data = data


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


#: The usual Connection values (nginx says keep-alive on every response), their tokens
#: made once.
_USUAL_TOKENS: Final = {
    value: frozenset({value.lower()})
    for value in (b"keep-alive", b"Keep-Alive", b"close", b"Close", b"upgrade", b"Upgrade")
}


def _tokens(values: list[bytes] | None) -> frozenset[bytes]:
    """The comma-separated tokens of a field's values, lower-case."""
    if not values:
        return _NO_TOKENS
    if len(values) == 1:
        usual = _USUAL_TOKENS.get(values[0])
        if usual is not None:
            return usual
    return frozenset(t.strip().lower() for v in values for t in v.split(b",")) - {b""}


def _codings(scanned: Scanned) -> list[bytes]:
    """The transfer codings of Transfer-Encoding, in order, lowercase."""
    values = scanned.get(b"transfer-encoding", ())
    return [t.strip().lower() for v in values for t in v.split(b",")]


def _chunked(scanned: Scanned) -> bool:
    """Transfer-Encoding ends in chunked (llhttp refuses a request where it does not)."""
    codings = _codings(scanned)
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
    (its tokens). On an upgrade, Upgrade goes on with it."""
    if not connection and not upgrade:
        return HOP_BY_HOP  # the usual case, with no set to build
    usual = _USUAL_HOPS.get((connection, upgrade))
    if usual is not None:  # `Connection: keep-alive` (nginx's every response): made once
        return usual
    return _hop_by_hop(connection, upgrade)


def _hop_by_hop(connection: frozenset[bytes], upgrade: bool) -> frozenset[bytes]:
    hop = HOP_BY_HOP | connection
    if upgrade:
        hop -= _UPGRADE_KEPT
    return hop - END_TO_END


_USUAL_HOPS: Final = {
    (tokens, upgrade): _hop_by_hop(tokens, upgrade)
    for tokens in {*_USUAL_TOKENS.values(), _NO_TOKENS}
    for upgrade in (False, True)
}


def connection_tokens(headers: Fields) -> frozenset[bytes]:
    """The tokens of the Connection header(s) in `headers`."""
    return _tokens(scan(headers).get(b"connection"))


def body(framing: Framing, data: bytes) -> bytes:
    """A piece of body as sent with `framing`."""
    return b"%x\r\n%s\r\n" % (len(data), data) if framing == "chunked" and data else data


def end(framing: Framing) -> bytes:
    """What ends a body sent with `framing`."""
    return LAST_CHUNK if framing == "chunked" else b""


#: The name lengths of the headers each (hop-by-hop set, `dropped` set) removes: a name of
#: another length is passed on without a lower(). Kept for the usual hop sets only (a
#: client's Connection header names its own), and the agent's own `dropped` sets.
_LENGTHS: dict[tuple[frozenset[bytes], frozenset[bytes]], frozenset[int]] = {}
_KEPT_HOPS: Final = frozenset(
    {
        hop | extra
        for hop in (HOP_BY_HOP, *_USUAL_HOPS.values())
        for extra in (frozenset(), frozenset({b"transfer-encoding"}))
    }
)
_MAX_LENGTHS = 64


def _fields(
    parts: list[bytes],
    headers: Fields,
    connection: frozenset[bytes],
    incoming: Framing,
    outgoing: Framing,
    *,
    upgrade: bool,
    dropped: frozenset[bytes],
) -> None:
    """Add the header lines passed on to `parts`: hop-by-hop names out, and `dropped`
    ones in any spelling an app server folds onto them (`_` for `-`); framing as sent.
    (Pieces of lines, joined once by the caller: no bytes object per line.)"""
    hop = hop_by_hop(connection, upgrade=upgrade)
    if incoming == "chunked" and outgoing == "close":
        hop |= {b"transfer-encoding"}
    lengths = _LENGTHS.get((hop, dropped))
    if lengths is None:
        lengths = frozenset(map(len, hop | dropped))  # folding keeps a name's length
        if hop in _KEPT_HOPS and len(_LENGTHS) < _MAX_LENGTHS:
            _LENGTHS[hop, dropped] = lengths
    for name, value in headers:
        if len(name) in lengths:
            key = name.lower()
            if key in hop or key.replace(b"_", b"-") in dropped:
                continue
        parts += (name, b": ", value, b"\r\n")
    if incoming == "close" and outgoing == "chunked":
        parts.append(b"transfer-encoding: chunked\r\n")


def _connection(version: str, keep_alive: bool, upgrade: bool, headers: Fields) -> bytes:
    """The agent's own Connection header line for the next hop (b"": none)."""
    if upgrade:
        return b"connection: Upgrade\r\n"
    if version == "1.0":
        return b"connection: keep-alive\r\n" if keep_alive else b""
    return b"" if keep_alive else b"connection: close\r\n"


_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}


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
    parts = [request.method, b" ", target, b" HTTP/", _VERSIONS[version], b"\r\n"]
    _fields(
        parts,
        request.headers,
        request.connection,
        request.framing,
        request.framing,
        upgrade=request.upgrade is not None,
        dropped=dropped,
    )
    for name, value in extra:
        parts += (name, b": ", value, b"\r\n")
    parts += (_connection(version, keep, request.upgrade is not None, request.headers), b"\r\n")
    return b"".join(parts)


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
    parts = [b"HTTP/1.1 %d %s\r\n" % (response.status, response.reason)]
    _fields(
        parts,
        response.headers,
        response.connection,
        response.framing,
        outgoing,
        upgrade=switching,
        dropped=dropped,
    )
    if response.status >= 200 or switching:
        parts.append(_connection("1.0" if http10 else "1.1", keep_alive, switching, []))
    parts.append(b"\r\n")
    return b"".join(parts)


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


#: What a closed parser holds in place of its llhttp parser: one that calls back nobody.
_SPENT_REQUESTS: Final = httptools.HttpRequestParser(object())
_SPENT_RESPONSES: Final = httptools.HttpResponseParser(object())


class _Stop(Exception):
    """Raised from a callback to stop llhttp (which reports it as HttpParserCallbackError,
    after the callback has recorded why)."""


class RequestParser:
    """The requests a client sends on one connection, as events.

    Nothing more is parsed after a `Refused` or an `H2Preface`; after an Upgrade request,
    what follows is held until `switched()` (the new protocol's first bytes) or
    `resume()` (the server said no: HTTP goes on).
    """

    __slots__ = (
        "_events",
        "_fields",
        "_headers",
        "_held",
        "_host",
        "_messages",
        "_parser",
        "_scanned",
        "_size",
        "_switchable",
        "_trailers",
        "_unparsed",
        "_url",
        "stopped",
        "underscores",
        "upgrading",
    )

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
        self._host = b""  # the last Host found well-formed: a client sends the same one
        self._trailers = False  # the head is out: fields now are a chunked body's trailers
        self._switchable = False  # the last request asked for an Upgrade that is relayed

    def feed(self, data: bytes) -> list[RequestEvent]:
        if self.stopped:
            return []
        if self.upgrading:
            self._held.append(data)
            return []
        events = self._events = []
        self._unparsed += len(data)
        try:
            try:
                self._parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                self._upgrade(data, upgrade.args[0])
        except httptools.HttpParserError as exc:
            if str(exc) == "Pause on PRI/Upgrade" and self._messages == 1:
                self.stopped = True  # the connection's first bytes: a client speaking h2
                events.append(PREFACE)
            elif not self.stopped:
                self._refuse(400, "bad_request", _reason(exc))
        if not self.stopped and self._unparsed > MAX_HEADER_BYTES:
            self._refuse(431, "headers_too_large")
        return events

    def _upgrade(self, data: bytes, offset: int) -> None:
        """llhttp stopped after an Upgrade request's head, at `offset` of `data`."""
        while True:
            rest = data[offset:]
            if self._switchable:
                self.upgrading = True
                self._held.append(rest)
                return
            # An Upgrade not relayed: llhttp stopped at its end all the same, so a
            # fresh parser takes what follows as the next request.
            self._parser = httptools.HttpRequestParser(self)
            if not rest:
                return
            try:
                self._parser.feed_data(rest)
                return
            except httptools.HttpParserUpgrade as upgrade:
                data, offset = rest, upgrade.args[0]

    def close(self) -> None:
        """The connection is gone: let go of llhttp, which holds this parser's callbacks
        (a reference cycle only the garbage collector would free), and of what is held."""
        self.stopped = True
        self.upgrading = False
        self._parser = _SPENT_REQUESTS
        self._events, self._headers, self._held = [], [], []

    def switched(self) -> bytes:
        """The server switched protocols: the bytes held since the request, for the tunnel."""
        self.stopped = True
        held, self._held = b"".join(self._held), []
        return held

    def resume(self) -> bytes:
        """The server answered the Upgrade without switching: HTTP goes on, on a fresh
        parser; the bytes held since the request, for the caller to feed (as any read)."""
        self.upgrading = False
        self._parser = httptools.HttpRequestParser(self)
        held, self._held = b"".join(self._held), []
        return held

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
        self._trailers = False

    def on_url(self, url: bytes) -> None:
        self._url += url
        self._size += len(url)
        if self._size > MAX_HEADER_BYTES:
            self._count(0)

    def on_header(self, name: bytes, value: bytes) -> None:
        # The hot path: every field of every request (the limits inline, not _count).
        self._fields += 1
        self._size += len(name) + len(value)
        if self._size > MAX_HEADER_BYTES or self._fields > MAX_HEADERS:
            self._count(0)
        if name and not name.translate(None, PLAIN):  # headers.plain, inline: every field
            if self._trailers:
                # A chunked body's trailer fields: counted and screened like any field,
                # then dropped (never passed on). Added to the head, they would reach
                # the app as header fields the policy never saw, or a second Host.
                return
            self._headers.append((name, value))
            if len(name) in _RULED_LENGTHS:
                key = name.lower()
                if key in _RULED:
                    self._scanned.setdefault(key, []).append(value)
        elif self.underscores == "reject":  # trailers too: one rule for every field
            self._refuse(400, "bad_request", underscore_refusal(name))
            raise _Stop
        # else dropped (headers.screen's "drop")

    def on_headers_complete(self) -> None:
        self._unparsed = 0
        self._trailers = True
        parser = self._parser
        method = parser.get_method()
        version = parser.get_http_version()
        headers, scanned = self._headers, self._scanned
        if method == b"CONNECT":
            self._refuse(501, "connect_not_supported", "CONNECT tunnels are not relayed")
            raise _Stop
        if version != "1.1" and version != "1.0":
            # llhttp takes HTTP/0.9 (no headers, no Host) and a request line saying 2.0:
            # neither is HTTP/1.x, and the app would read either its own way.
            self._refuse(505, "version_not_supported", f"HTTP/{version}")
            raise _Stop
        refusal = _check(version, scanned, self._host)
        if refusal is None and b"host" in scanned:
            self._host = scanned[b"host"][0]
        upgrade = None
        framing = request_framing(scanned)
        if refusal is None and parser.should_upgrade():
            if framing != "none":
                # llhttp takes the body for the new protocol's bytes: were the answer
                # not 101, it would be read as the next request.
                refusal = "an Upgrade request with a body"
            elif _tokens(scanned.get(b"upgrade")) <= RELAYED_UPGRADES:
                upgrade = b", ".join(scanned.get(b"upgrade", ()))
            # else (h2c, anything else): passed on as a plain request, its Upgrade dropped
        self._switchable = upgrade is not None
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


def _check(version: str, scanned: Scanned, known_host: bytes = b"") -> str | None:
    """Why a request head is refused (400), or None. `known_host`: a Host value found
    well-formed before (its pattern not matched again)."""
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
    if codings and _codings(scanned) != [b"chunked"]:
        # The body goes on de-chunked and chunked again, under the caller's header: an app
        # that takes only a bare `chunked` would read `gzip, chunked` as no framing at all
        # (Envoy answers 501 to any coding but chunked).
        return "Transfer-Encoding other than chunked alone"
    if codings and b"content-length" in scanned:  # the smuggler's favourite
        return "Content-Length beside Transfer-Encoding"
    # llhttp keeps trailing whitespace; the app drops it (RFC 9110 5.5), so must we.
    host = hosts[0] if hosts else None
    if host is not None and host != known_host and not _HOST_BYTES.fullmatch(host.strip(b" \t")):
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
    asked cannot be trusted with the next request. So is a head over the request
    limits (MAX_HEADER_BYTES, MAX_HEADERS), and a status below 100.
    """

    __slots__ = (
        "_between",
        "_broken",
        "_events",
        "_fields",
        "_headers",
        "_parser",
        "_reason",
        "_scanned",
        "_size",
        "_trailers",
        "_unparsed",
        "done",
        "framing",
        "method",
        "status",
        "upgrade",
    )

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
        self._trailers = False  # the head is out: fields now are trailers, dropped
        # The request limits, for a hostile upstream or a broken app: bytes of the
        # head so far, its fields, and bytes fed since llhttp last handed any on.
        self._size = 0
        self._fields = 0
        self._unparsed = 0
        self._broken = ""  # why a callback stopped llhttp
        self._between = False  # llhttp ended the final response itself: `next` may reuse it

    def next(self, method: bytes, upgrade: bool = False) -> ResponseParser:
        """The parser for the next response on this connection: this one, reset, when
        llhttp itself ended the last response (it stands between two messages); else a
        new one (a response to HEAD, whose body llhttp would still wait for). One
        llhttp parser per connection, not per request, on the usual path."""
        if not self._between:
            return ResponseParser(method, upgrade)
        self._between = False
        self.method, self.upgrade = method, upgrade
        self.framing, self.status, self.done = "none", 0, False
        return self

    def close(self) -> None:
        """The connection is gone: let go of llhttp, which holds this parser's callbacks
        (a reference cycle only the garbage collector would free)."""
        self.done = True
        self._between = False  # `next` makes a new one
        self._parser = _SPENT_RESPONSES
        self._events, self._headers = [], []

    def feed(self, data: bytes) -> list[ResponseEvent]:
        events = self._events = []
        if self.done:
            if data:
                events.append(Broken("a response nobody asked for"))
            return events
        self._unparsed += len(data)
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
            why = self._broken or ("a response nobody asked for" if stray else str(exc))
            events.append(Broken(why))
            self._between = False
            return events
        if self._unparsed > MAX_HEADER_BYTES:  # a head (or a field) without end
            self.done = True
            self._between = False
            events.append(Broken("response headers too large"))
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
            self._between = False  # the parser was stopped mid-message: never reused
            raise _Stop
        self._reason, self._headers, self._scanned = b"", [], {}
        self._trailers = False
        self._size = self._fields = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._trailers:  # a chunked body's trailers: never joined to the head sent on
            self._fields += 1
            self._size += len(name) + len(value)
            if self._size > MAX_HEADER_BYTES or self._fields > MAX_HEADERS:
                self._broken = "response headers too large"
                raise _Stop
            return
        # The hot path: every field of every response. The head's fields are counted
        # by the list that holds them (`_fields` takes over for trailers).
        headers = self._headers
        headers.append((name, value))
        size = self._size = self._size + len(name) + len(value)
        if size > MAX_HEADER_BYTES or len(headers) > MAX_HEADERS:
            self._broken = "response headers too large"
            raise _Stop
        if len(name) in _RULED_LENGTHS:
            key = name.lower()
            if key in _RULED:
                self._scanned.setdefault(key, []).append(value)

    def on_headers_complete(self) -> None:
        self._trailers = True
        self._fields = len(self._headers)
        self._unparsed = 0
        parser = self._parser
        status = self.status = parser.get_status_code()
        if status < 100:  # llhttp takes any three digits; no client knows what 0xx means
            self._broken = f"status {status}"
            raise _Stop
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
        self._unparsed = 0
        if not self.done:
            self._events.append(Data(data))

    def on_message_complete(self) -> None:
        self._unparsed = 0
        if self.status >= 200:
            self._between = self._parser.should_keep_alive()  # else llhttp takes no more
            if not self.done:
                self.done = True
                self._events.append(END)
