"""HTTP/1.1 framing, decided once (agent/core/http1.py): tables for every rule, and
properties that hold for any split of the bytes and any body.

The smuggling cases are here as bytes in, events out: a request whose framing
two readers could read two ways is refused before anything is passed on.
"""

from __future__ import annotations

import h2.connection
import h2.events
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import http1
from agent.core.http1 import (
    END,
    PREFACE,
    Broken,
    Data,
    Fields,
    Refused,
    Request,
    RequestParser,
    Response,
    ResponseParser,
    Switched,
)

GET = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"


def requests(raw: bytes, **kwargs: object) -> list[object]:
    return list(RequestParser(**kwargs).feed(raw))  # type: ignore[arg-type]


def refusal(raw: bytes) -> tuple[int, str] | None:
    found = [e for e in requests(raw) if isinstance(e, Refused)]
    return (found[0].status, found[0].detail) if found else None


def fields(*lines: str) -> Fields:
    return [tuple(line.encode().split(b": ", 1)) for line in lines]  # type: ignore[misc]


# -- framing decisions -----------------------------------------------------------------

REQUEST_FRAMING = [
    ((), "none"),
    (("Content-Length: 5",), "length"),
    (("Content-Length: 0",), "length"),
    (("Transfer-Encoding: chunked",), "chunked"),
]


@pytest.mark.parametrize(("headers", "framing"), REQUEST_FRAMING)
def test_a_request_body_is_framed_by_length_or_chunks_and_never_by_the_close(
    headers: tuple[str, ...], framing: str
) -> None:
    assert http1.request_framing(http1.scan(fields(*headers))) == framing


RESPONSE_FRAMING = [
    # method, status, headers -> framing
    (b"GET", 200, ("Content-Length: 5",), "length"),
    (b"GET", 200, ("Transfer-Encoding: chunked",), "chunked"),
    (b"GET", 200, ("Transfer-Encoding: gzip, chunked",), "chunked"),
    (b"GET", 200, ("Transfer-Encoding: gzip",), "close"),  # RFC 9112 6.3: read to the close
    (b"GET", 200, (), "close"),
    (b"HEAD", 200, ("Content-Length: 5",), "none"),
    (b"HEAD", 200, ("Transfer-Encoding: chunked",), "none"),
    (b"HEAD", 200, (), "none"),
    (b"GET", 204, ("Transfer-Encoding: chunked",), "none"),
    (b"GET", 304, ("Content-Length: 5",), "none"),
    (b"GET", 100, (), "none"),
    (b"GET", 103, ("Content-Length: 5",), "none"),
    (b"POST", 500, ("Content-Length: 0",), "length"),
]


@pytest.mark.parametrize(("method", "status", "headers", "framing"), RESPONSE_FRAMING)
def test_a_response_has_no_body_after_head_1xx_204_and_304_whatever_its_headers_say(
    method: bytes, status: int, headers: tuple[str, ...], framing: str
) -> None:
    assert http1.response_framing(method, status, http1.scan(fields(*headers))) == framing


RELAY_FRAMING = [
    # incoming, to an HTTP/1.0 peer, the peer's connection ends with the sender's -> out
    ("length", False, False, "length"),
    ("length", True, False, "length"),
    ("chunked", False, False, "chunked"),
    ("chunked", True, False, "close"),  # HTTP/1.0 knows no chunks
    ("close", False, False, "chunked"),  # the app's keep-alive connection survives it
    ("close", False, True, "close"),  # inbound: the client's connection ends with the app's
    ("close", True, False, "close"),
    ("none", True, False, "none"),
    ("none", False, True, "none"),
]


@pytest.mark.parametrize(("incoming", "http10", "ends", "outgoing"), RELAY_FRAMING)
def test_a_relayed_body_is_framed_for_the_peer_it_goes_to(
    incoming: http1.Framing, http10: bool, ends: bool, outgoing: str
) -> None:
    assert http1.relay_framing(incoming, http10=http10, ends_with_sender=ends) == outgoing


PERSISTENT = [
    ("1.1", (), True),
    ("1.1", ("Connection: close",), False),
    ("1.1", ("Connection: Keep-Alive, CLOSE",), False),
    ("1.0", (), False),
    ("1.0", ("Connection: keep-alive",), True),
    ("1.0", ("Connection: Keep-Alive",), True),
]


@pytest.mark.parametrize(("version", "headers", "keeps"), PERSISTENT)
def test_a_connection_persists_by_version_and_connection_tokens(
    version: str, headers: tuple[str, ...], keeps: bool
) -> None:
    assert http1.persistent(version, http1.connection_tokens(fields(*headers))) is keeps


def test_hop_by_hop_headers_are_the_fixed_ones_and_those_connection_names() -> None:
    tokens = http1.connection_tokens(fields("Connection: X-Trace, keep-alive", "X-Trace: 1"))
    hop = http1.hop_by_hop(tokens)
    assert hop == set(http1.HOP_BY_HOP) | {b"x-trace"}


@given(st.lists(st.sampled_from(["content-length", "Transfer-Encoding", "HOST", "x-a", ""])))
def test_connection_never_strips_the_framing_or_the_host(names: list[str]) -> None:
    hop = http1.hop_by_hop(http1.connection_tokens(fields("Connection: " + ", ".join(names))))
    assert not hop & {b"content-length", b"transfer-encoding", b"host"}


# -- requests: what is refused -----------------------------------------------------------

SMUGGLING = [
    # raw request -> (status, a word of the detail). None of these reach the app.
    (
        b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: b\r\n\r\n",
        400,
        "Content-Length",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\nContent-Length: 6\r\n\r\n",
        400,
        "Content-Length",
    ),
    (b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: gzip\r\n\r\nxx", 400, "Transfer-Encoding"),
    (
        b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        400,
        "Transfer-Encoding",
    ),
    # Codings before chunked: the body would go on chunked again under the caller's header,
    # which an app that takes only a bare `chunked` reads as unframed.
    (
        b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
        400,
        "chunked alone",
    ),
    (
        b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: gzip\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
        "chunked alone",
    ),
    (
        b"POST / HTTP/1.0\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        400,
        "HTTP/1.0",
    ),
    (b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nx", 400, ""),
    (b"POST / HTTP/1.1\r\nHost: b\r\nContent-Length: +5\r\n\r\nhello", 400, ""),
    (b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\nz\r\n", 400, ""),
    (b"GET / HTTP/1.1\nHost: b\n\n", 400, ""),  # bare LF
    (b"GET / HTTP/1.1\r\nHost: b\r\nX: a\r\n b\r\n\r\n", 400, ""),  # obs-fold
    (b"GET / HTTP/1.1\r\nHost : b\r\n\r\n", 400, ""),  # space before the colon
    (b"GET / HTTP/1.1\r\nHost: backend\r\nHost: internal\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "no Host"),
    (b"GET / HTTP/1.1\r\nHost: evil.com, x.example.org\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400, "Host"),
    (b"GET / HTTP/1.1\r\nHost: b\r\nTransfer_Encoding: chunked\r\n\r\n", 400, "underscore"),
    (b"GET / HTTP/1.1\r\nHost: b\r\nContent.Length: 5\r\n\r\n", 400, "'.'"),
    (b"CONNECT b:443 HTTP/1.1\r\nHost: b:443\r\n\r\n", 501, "CONNECT"),
    (
        b"POST / HTTP/1.1\r\nHost: b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Content-Length: 40\r\n\r\n",
        400,
        "Upgrade request with a body",
    ),
    (GET + b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400, "HTTP/2 preface"),
    # llhttp takes these versions; passed on, the app would read them its own way.
    (b"GET /\r\n\r\n", 505, "HTTP/0.9"),
    (b"GET / HTTP/2.0\r\nHost: b\r\n\r\n", 505, "HTTP/2.0"),
]


@pytest.mark.parametrize(("raw", "status", "detail"), SMUGGLING)
def test_a_request_two_readers_could_frame_two_ways_is_refused(
    raw: bytes, status: int, detail: str
) -> None:
    found = refusal(raw)
    assert found is not None, "accepted"
    assert found[0] == status and detail in found[1]


ACCEPTED = [
    b"GET / HTTP/1.0\r\n\r\n",  # HTTP/1.0 may leave Host out
    b"GET / HTTP/1.1\r\nHost: internal.example.org:8080\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: [::1]:80\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: internal.example.org \r\n\r\n",  # trailing space: the app drops it
    b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
]


@pytest.mark.parametrize("raw", ACCEPTED)
def test_a_well_framed_request_is_one_head_and_an_end(raw: bytes) -> None:
    events = requests(raw)
    assert isinstance(events[0], Request) and events[-1] is END, events


def test_headers_over_the_limits_are_refused_with_431() -> None:
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(101))
    assert refusal(b"GET / HTTP/1.1\r\nHost: b\r\n" + many + b"\r\n") == (431, "")
    big = b"x-big: " + b"a" * (61 * 1024) + b"\r\n"
    assert refusal(b"GET / HTTP/1.1\r\nHost: b\r\n" + big + b"\r\n") == (431, "")


def test_a_huge_header_value_is_refused_before_it_is_whole() -> None:
    """llhttp buffers a value whole before handing it on: the bytes fed bound it instead."""
    parser = RequestParser()
    events = parser.feed(b"GET / HTTP/1.1\r\nHost: b\r\nX-Big: ")
    fed = 0
    while not events and fed < 4 << 20:
        events = parser.feed(b"a" * 4096)
        fed += 4096
    assert events == [Refused(431, "headers_too_large")]
    assert fed <= http1.MAX_HEADER_BYTES
    assert parser.feed(b"\r\n\r\n" + GET) == []  # nothing more is read


def test_nothing_after_a_refusal_is_read() -> None:
    raw = b"GET / HTTP/1.1\r\nHost: b\r\nHost: c\r\n\r\n" + GET
    events = requests(raw)
    assert len(events) == 1 and isinstance(events[0], Refused)


def test_an_http2_preface_opening_the_connection_is_told_apart() -> None:
    parser = RequestParser()
    assert parser.feed(http1.H2_PREFACE[:10]) == []
    assert parser.feed(http1.H2_PREFACE[10:] + GET) == [PREFACE]
    assert parser.feed(GET) == []


def test_the_answer_to_an_http2_preface_is_a_goaway_saying_what_to_set() -> None:
    client = h2.connection.H2Connection()
    client.initiate_connection()
    events = client.receive_data(http1.h2_refusal())
    [goaway] = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
    assert goaway.additional_data is not None
    assert b"appProtocol: kubernetes.io/h2c or grpc" in goaway.additional_data


# -- requests: events ----------------------------------------------------------------------


def test_a_request_head_carries_its_framing_keep_alive_and_upgrade() -> None:
    [head, end] = requests(
        b"GET /chat HTTP/1.1\r\nHost: b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    assert head == Request(
        b"GET",
        b"/chat",
        "1.1",
        fields("Host: b", "Connection: Upgrade", "Upgrade: websocket"),
        "none",
        True,
        b"websocket",
        frozenset({b"upgrade"}),
    )
    assert end is END
    # An Upgrade header without Connection: upgrade asks for nothing.
    [plain, _] = requests(b"GET / HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\n\r\n")
    assert isinstance(plain, Request) and plain.upgrade is None


def test_what_follows_an_upgrade_is_held_until_the_answer() -> None:
    ask = b"GET /chat HTTP/1.1\r\nHost: b\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n"
    switched = RequestParser()
    assert len(switched.feed(ask + b"\x81\x05hello")) == 2
    assert switched.feed(b"more") == []
    assert switched.switched() == b"\x81\x05hellomore"  # the new protocol's bytes, untouched

    refused = RequestParser()
    refused.feed(ask + GET[:10])
    assert refused.feed(GET[10:]) == []
    held = refused.resume()  # the app said no: the held bytes are HTTP, fed as any read
    assert held == GET
    [head, end] = refused.feed(held)
    assert isinstance(head, Request) and head.target == b"/" and end is END


def test_a_header_name_an_app_server_folds_is_dropped_when_so_configured() -> None:
    [head, _] = requests(b"GET / HTTP/1.1\r\nHost: b\r\nX_Role: admin\r\n\r\n", underscores="drop")
    assert isinstance(head, Request) and head.headers == fields("Host: b")


def _chunked_request(body: bytes, cuts: list[int]) -> bytes:
    pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p)
    return (
        b"POST / HTTP/1.1\r\nHost: b\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    )


def _split(raw: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(raw)) for c in cuts})
    return [raw[a:b] for a, b in zip([0, *points], [*points, len(raw)], strict=True)]


@given(st.binary(max_size=300), st.lists(st.integers(0, 300), max_size=6), st.data())
def test_any_split_of_the_bytes_gives_the_same_messages(
    body: bytes, cuts: list[int], data: st.DataObject
) -> None:
    raw = _chunked_request(body, sorted(set(c for c in cuts if c < len(body)))) + GET
    feeds = _split(raw, data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
    parser = RequestParser()
    events = [event for piece in feeds for event in parser.feed(piece)]
    heads = [e for e in events if isinstance(e, Request)]
    assert [h.target for h in heads] == [b"/", b"/"]
    assert b"".join(e.data for e in events if isinstance(e, Data)) == body
    assert events.count(END) == 2


@given(st.binary(max_size=300), st.lists(st.integers(1, 299), max_size=6))
def test_a_rechunked_body_reads_back_as_the_same_bytes(body: bytes, cuts: list[int]) -> None:
    """What the agent writes for a chunked body (http1.body, http1.end) frames it exactly."""
    raw = _chunked_request(body, sorted(set(c for c in cuts if c < len(body))))
    events = RequestParser().feed(raw)
    head = events[0]
    assert isinstance(head, Request)
    written = http1.request_head(head, head.target)
    written += b"".join(http1.body(head.framing, e.data) for e in events if isinstance(e, Data))
    written += http1.end(head.framing)
    again = RequestParser().feed(written + GET)
    assert b"".join(e.data for e in again if isinstance(e, Data)) == body
    assert [type(e) for e in again if not isinstance(e, Data)] == [Request, type(END)] * 2


# -- heads written -----------------------------------------------------------------------


def _head(raw: bytes) -> Request:
    head = requests(raw)[0]
    assert isinstance(head, Request)
    return head


def test_a_request_head_passed_on_drops_hop_by_hop_headers_but_never_its_framing() -> None:
    head = _head(
        b"POST /a HTTP/1.1\r\nHost: b\r\nConnection: close, content-length, x-trace\r\n"
        b"X-Trace: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nContent-Length: 2\r\n\r\nhi"
    )
    assert http1.request_head(head, b"/a", version="1.1", keep_alive=True) == (
        b"POST /a HTTP/1.1\r\nHost: b\r\nContent-Length: 2\r\n\r\n"
    )
    assert http1.request_head(head, b"/a").endswith(
        b"Content-Length: 2\r\nconnection: close\r\n\r\n"
    )


def test_headers_a_client_names_in_connection_are_dropped_and_nothing_of_them_is_kept() -> None:
    """Each request's own hop-by-hop names are honoured, in any case, and the agent keeps
    nothing of them after the head is written (no cache a client can fill)."""
    kept = len(http1._LENGTHS)
    for n in range(200):
        head = _head(
            b"GET / HTTP/1.1\r\nHost: b\r\nConnection: x-hop-%d\r\nX-Hop-%d: 1\r\n"
            b"X-Kept: 2\r\n\r\n" % (n, n)
        )
        assert http1.request_head(head, b"/") == b"GET / HTTP/1.1\r\nHost: b\r\nX-Kept: 2\r\n\r\n"
    assert len(http1._LENGTHS) == kept


def test_an_http10_request_keeps_its_keep_alive_only_by_saying_so() -> None:
    head = _head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert http1.request_head(head, b"/") == b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n"
    head = _head(b"GET / HTTP/1.0\r\n\r\n")
    assert http1.request_head(head, b"/") == b"GET / HTTP/1.0\r\n\r\n"


def test_a_websocket_upgrade_goes_on_with_its_upgrade_header() -> None:
    head = _head(
        b"GET / HTTP/1.1\r\nHost: b\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nKeep-Alive: 5\r\n\r\n"
    )
    assert head.upgrade == b"websocket"
    assert http1.request_head(head, b"/") == (
        b"GET / HTTP/1.1\r\nHost: b\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nconnection: Upgrade\r\n\r\n"
    )


@pytest.mark.parametrize("protocol", [b"h2c", b"h2c, websocket", b"TLS/1.2", b"foo"])
def test_any_other_upgrade_is_dropped_and_the_request_goes_on_as_http(protocol: bytes) -> None:
    """h2c smuggling: after a 101 to h2c every later request would be an h2 stream that
    no policy sees. The app gets a plain request and answers it in HTTP/1.1."""
    ask = (
        b"GET /public HTTP/1.1\r\nHost: b\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: %s\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n" % protocol
    )
    parser = RequestParser()
    events = parser.feed(ask + b"GET /admin HTTP/1.1\r\nHost: b\r\n\r\n")
    heads = [e for e in events if isinstance(e, Request)]
    assert [h.target for h in heads] == [b"/public", b"/admin"]  # each one authorized
    assert heads[0].upgrade is None and not parser.upgrading
    assert http1.request_head(heads[0], b"/public") == (b"GET /public HTTP/1.1\r\nHost: b\r\n\r\n")


def _response(raw: bytes, method: bytes = b"GET", upgrade: bool = False) -> list[object]:
    return list(ResponseParser(method, upgrade).feed(raw))


RESPONSE_HEADS = [
    # raw response, to an HTTP/1.0 client, keep the client's connection -> head written
    (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, x-a\r\nX-A: 1\r\n\r\n",
        False,
        True,
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n",
    ),
    (
        b"HTTP/1.0 200 OK\r\nX: y\r\n\r\n",  # until the close: chunked to an HTTP/1.1 client
        False,
        True,
        b"HTTP/1.1 200 OK\r\nX: y\r\ntransfer-encoding: chunked\r\n\r\n",
    ),
    (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",  # no chunks for HTTP/1.0
        True,
        False,
        b"HTTP/1.1 200 OK\r\n\r\n",
    ),
    (
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
        True,
        True,
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nconnection: keep-alive\r\n\r\n",
    ),
    (
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
        False,
        False,
        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nconnection: close\r\n\r\n",
    ),
    (
        b"HTTP/1.1 100 Continue\r\n\r\n",
        False,
        True,
        b"HTTP/1.1 100 Continue\r\n\r\n",
    ),
    (  # a Connection header naming the length cannot take it away
        b"HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\n",
        False,
        True,
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
    ),
]


@pytest.mark.parametrize(("raw", "http10", "keep", "written"), RESPONSE_HEADS)
def test_a_response_head_passed_on_is_framed_for_the_client(
    raw: bytes, http10: bool, keep: bool, written: bytes
) -> None:
    head = _response(raw)[0]
    assert isinstance(head, Response)
    outgoing = http1.relay_framing(head.framing, http10=http10, ends_with_sender=False)
    assert http1.response_head(head, outgoing, http10=http10, keep_alive=keep) == written


# -- responses -------------------------------------------------------------------------------

RESPONSES = [
    # method, raw -> events (Data pieces joined), the response's keep_alive
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi", [200, b"hi", END], True),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n", [200, END], True),
    (b"HEAD", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", [200, END], True),
    (b"GET", b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n", [204, END], True),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n", [304, END], True),
    (
        b"GET",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
        [100, 200, b"x", END],
        True,
    ),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
        [200, b"hi", END],
        True,
    ),
    (
        b"GET",
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
        [200, END],
        False,
    ),
    (b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", [200, END], False),
    (b"GET", b"HTTP/1.1 200 OK\r\n\r\nuntil the close", [200, b"until the close"], False),
]


def _summary(events: list[object]) -> list[object]:
    out: list[object] = []
    for event in events:
        if isinstance(event, Response):
            out.append(event.status)
        elif isinstance(event, Data):
            if out and isinstance(out[-1], bytes):
                out[-1] += event.data
            else:
                out.append(event.data)
        else:
            out.append(event)
    return out


@pytest.mark.parametrize(("method", "raw", "summary", "keep_alive"), RESPONSES)
def test_a_response_ends_where_its_framing_says(
    method: bytes, raw: bytes, summary: list[object], keep_alive: bool
) -> None:
    events = _response(raw, method)
    assert _summary(events) == summary
    finals = [e for e in events if isinstance(e, Response) and e.status >= 200]
    assert finals[0].keep_alive is keep_alive


def test_a_close_delimited_body_ends_with_the_connection_and_any_other_is_cut() -> None:
    until_close = ResponseParser(b"GET")
    until_close.feed(b"HTTP/1.1 200 OK\r\n\r\nsome")
    assert until_close.eof() == [END]
    cut = ResponseParser(b"GET")
    cut.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nsome")
    assert cut.eof() == [Broken("closed mid-response")]


def test_a_response_nobody_asked_for_breaks_the_connection() -> None:
    parser = ResponseParser(b"GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\nHTTP/1.1 200 OK\r\n\r\n")
    assert events[-1] == Broken("a response nobody asked for")
    head = ResponseParser(b"HEAD")
    head.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert head.feed(b"hello") == [Broken("a response nobody asked for")]


def test_a_101_switches_only_a_connection_that_asked() -> None:
    switching = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    )
    events = _response(switching + b"\x81\x02hi", upgrade=True)
    assert [type(e) for e in events] == [Response, Switched]
    assert events[1] == Switched(b"\x81\x02hi")
    head = events[0]
    assert isinstance(head, Response)
    assert http1.response_head(head, "none", http10=False, keep_alive=True) == (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nconnection: Upgrade\r\n\r\n"
    )
    assert _response(switching) == [Broken("101 to a request that asked for no Upgrade")]
    # Asked, and refused: HTTP goes on.
    assert _summary(
        _response(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n", upgrade=True)
    ) == [403, END]


def test_a_malformed_response_breaks_the_connection() -> None:
    events = _response(
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    assert isinstance(events[-1], Broken)
    assert _response(b"HTTP/1.1 099 Odd\r\nContent-Length: 0\r\n\r\n") == [Broken("status 99")]


# -- trailers ------------------------------------------------------------------------------

TRAILED = (
    b"POST / HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
    b"Host: internal.example.org\r\nX-Role: admin\r\n\r\n"
)


@pytest.mark.parametrize("cut", [0, TRAILED.index(b"0\r\nHost"), len(TRAILED) - 3])
def test_a_requests_trailers_never_join_its_head(cut: int) -> None:
    """The head is authorized and passed on as it came; trailer fields arriving with it
    (in the same read or later) must not become a second Host the policy never saw."""
    parser = RequestParser()
    events = parser.feed(TRAILED[:cut]) + parser.feed(TRAILED[cut:]) if cut else requests(TRAILED)
    head = events[0]
    assert isinstance(head, Request) and events[-1] is END
    assert head.headers == fields("Host: backend", "Transfer-Encoding: chunked")
    written = http1.request_head(head, b"/")
    assert written.count(b"Host") == 1 and b"X-Role" not in written


def test_trailers_are_screened_like_any_field() -> None:
    found = refusal(TRAILED.replace(b"X-Role", b"X_Role"))
    assert found is not None and found[0] == 400 and "'X_Role'" in found[1]


def test_a_responses_trailers_never_join_its_head() -> None:
    events = _response(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n"
        b"X-Forwarded-Client-Cert: leak\r\nSet-Cookie: a=b\r\n\r\n"
    )
    head = events[0]
    assert isinstance(head, Response) and events[-1] is END
    assert head.headers == fields("Transfer-Encoding: chunked")


def test_a_response_head_over_the_header_limits_breaks_the_connection() -> None:
    """A hostile upstream (or a broken app) cannot make the agent hold a head without end:
    the request limits apply to responses too."""
    many = b"".join(b"x-h%d: v\r\n" % i for i in range(http1.MAX_HEADERS + 1))
    events = _response(b"HTTP/1.1 200 OK\r\n" + many + b"\r\n")
    assert events == [Broken("response headers too large")]
    parser = ResponseParser(b"GET")
    events = parser.feed(b"HTTP/1.1 200 OK\r\nX-Big: ")
    fed = 0
    while not events and fed < 4 << 20:
        events = parser.feed(b"a" * 4096)
        fed += 4096
    assert events == [Broken("response headers too large")]
    assert fed <= http1.MAX_HEADER_BYTES


def test_a_long_body_and_many_interim_responses_are_within_the_limits() -> None:
    parser = ResponseParser(b"GET")
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" * 200
    events = parser.feed(interim + b"HTTP/1.1 200 OK\r\nContent-Length: 200000\r\n\r\n")
    events += parser.feed(b"x" * 200000)
    assert not [e for e in events if isinstance(e, Broken)] and events[-1] is END


@pytest.mark.parametrize(
    ("method", "raw"),
    [(m, r) for m, r, _, _ in RESPONSES if not r.startswith(b"HTTP/1.1 200 OK\r\n\r\n")],
)
def test_a_parser_reused_for_the_next_response_reads_it_as_a_new_one_would(
    method: bytes, raw: bytes
) -> None:
    """`next` keeps llhttp's parser between responses only where llhttp ended the last one
    (never after a HEAD response, whose body it would still wait for)."""
    first = ResponseParser(b"GET")
    first.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi")
    again = first.next(method)
    assert again is first
    assert _summary(again.feed(raw)) == _summary(_response(raw, method))
    follow = again.next(b"GET")
    if method == b"HEAD" and b"Content-Length: 2" in raw:
        assert follow is not again
    assert _summary(follow.feed(GET_OK)) == [200, b"x", END]


GET_OK = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx"
