"""HTTP/1.1 on either side of h2 (agent/core/http1.py): an h2 stream as the HTTP/1.1
request an `http` port's app gets, its response as h2 fields, and the first bytes of a
connection to an h2-only port told apart."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import http1
from agent.core.http1 import H2_PREFACE, Response

GET = b"GET /api/items HTTP/1.1\r\nHost: backend\r\n\r\n"


@pytest.mark.parametrize(
    ("first", "seen"),
    [
        (H2_PREFACE, "h2"),
        (H2_PREFACE + b"\x00\x00\x12\x04", "h2"),  # the client's SETTINGS right behind it
        (b"", "wait"),
        (H2_PREFACE[:10], "wait"),
        (b"PRI ", "wait"),  # the preface, or a method named PRI: not yet known
        (b"GE", "wait"),
        (GET, "http1"),
        (b"POST /demo.Greeter/SayHello HTTP/1.1\r\n", "http1"),
        (b"PRI /x HTTP/1.1\r\n", "http1"),
        (b"M-SEARCH * HTTP/1.1\r\n", "http1"),
        (b"\x16\x03\x01\x02\x00", "other"),  # TLS to a plaintext port: h2's to refuse
        (b"\x00\x00\x00\x04", "other"),
        (b"G" * 30, "other"),  # no method is that long
    ],
)
def test_the_first_bytes_of_an_h2_only_port_say_what_the_client_speaks(
    first: bytes, seen: str
) -> None:
    assert http1.opening(first) == seen


@given(st.integers(min_value=0, max_value=len(GET)))
def test_a_request_line_is_never_taken_for_h2_however_it_is_split(cut: int) -> None:
    assert http1.opening(GET[:cut]) in ("wait", "http1")
    assert http1.opening(GET[: max(cut, 4)]) == "http1"


@given(st.integers(min_value=0, max_value=len(H2_PREFACE) - 1))
def test_a_preface_still_arriving_is_waited_for(cut: int) -> None:
    assert http1.opening(H2_PREFACE[:cut]) == "wait"


def test_the_advice_names_the_port_protocol_and_both_fixes() -> None:
    advice = http1.h1_advice("grpc")
    assert "protocol: grpc (HTTP/2 only)" in advice
    assert "must speak h2c" in advice and "appProtocol: http" in advice


# -- an h2 stream as an HTTP/1.1 request ------------------------------------------------


def head(message: http1.Request) -> bytes:
    return http1.request_head(message, message.target)


def test_a_bodiless_stream_is_a_request_without_a_body() -> None:
    message = http1.from_h2(b"GET", b"/api/items", [(b"host", b"backend")], bodiless=True)
    assert message.framing == "none"
    assert head(message) == b"GET /api/items HTTP/1.1\r\nhost: backend\r\n\r\n"


def test_a_body_keeps_its_content_length_or_goes_chunked() -> None:
    sized = http1.from_h2(
        b"POST", b"/u", [(b"host", b"b"), (b"content-length", b"3")], bodiless=False
    )
    assert sized.framing == "length"
    assert b"content-length: 3\r\n" in head(sized)
    assert b"transfer-encoding" not in head(sized)
    streamed = http1.from_h2(b"POST", b"/u", [(b"host", b"b")], bodiless=False)
    assert streamed.framing == "chunked"
    assert head(streamed).count(b"transfer-encoding: chunked\r\n") == 1
    assert http1.body("chunked", b"abc") + http1.end("chunked") == b"3\r\nabc\r\n0\r\n\r\n"


def test_split_cookies_are_joined_and_te_ends_at_this_hop() -> None:
    fields = [(b"host", b"b"), (b"cookie", b"a=1"), (b"te", b"trailers"), (b"cookie", b"b=2")]
    written = head(http1.from_h2(b"GET", b"/", fields, bodiless=True))
    assert b"cookie: a=1; b=2\r\n" in written
    assert b"te:" not in written


# -- an HTTP/1.1 response as h2 fields --------------------------------------------------


def test_a_response_loses_its_hop_by_hop_fields_and_the_identity_header() -> None:
    response = Response(
        200,
        b"OK",
        "1.1",
        [
            (b"Content-Type", b"application/json "),
            (b"Connection", b"keep-alive, X-Hop"),
            (b"Keep-Alive", b"timeout=5"),
            (b"X-Hop", b"1"),
            (b"Transfer-Encoding", b"chunked"),
            (b"X_Forwarded-Client-Cert", b"leak"),
            (b"Set-Cookie", b"a=1"),
            (b"Set-Cookie", b"b=2"),
        ],
        "chunked",
        True,
        frozenset({b"keep-alive", b"x-hop"}),
    )
    assert http1.to_h2(response, frozenset({b"x-forwarded-client-cert"})) == [
        (b":status", b"200"),
        (b"content-type", b"application/json"),
        (b"set-cookie", b"a=1"),
        (b"set-cookie", b"b=2"),
    ]
