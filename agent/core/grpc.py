"""gRPC over HTTP/2, as far as a proxy needs it: statuses, deadlines, trailers-only errors.

From the gRPC wire spec (PROTOCOL-HTTP2.md): a call is an HTTP/2 POST whose
content-type is `application/grpc` (optionally `+proto`, `+json`, `;...`); its
outcome is the `grpc-status` trailer, or the header of a trailers-only
response (a single HEADERS frame ending the stream) when it failed before any
message. A proxy that refuses a call answers trailers-only, so the client sees
a status (PERMISSION_DENIED, UNAVAILABLE) rather than a broken stream; and
because a trailers-only UNAVAILABLE carries no message, the call can still be
retried elsewhere. `grpc-timeout` is the client's deadline.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from enum import IntEnum
from typing import Final

__all__ = [
    "Code",
    "from_http_status",
    "is_grpc",
    "malformed_method",
    "parse_timeout",
    "percent_encode",
    "reset_before_head",
    "status_of",
    "timeout_value",
    "trailers_only",
]

Headers = Iterable[tuple[str, str]]


class Code(IntEnum):
    """The gRPC status codes (statuscodes.md)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


_CONTENT_TYPE: Final = re.compile(r"application/grpc(?:[+;].*)?", re.IGNORECASE | re.DOTALL)
#: TimeoutValue is at most 8 digits (PROTOCOL-HTTP2.md), then one unit letter.
_TIMEOUT: Final = re.compile(r"([0-9]{1,8})([HMSmun])")
_UNITS: Final = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
#: The gRPC spec's mapping for a response that is HTTP, not gRPC (http-grpc-status-mapping.md).
_FROM_HTTP: Final = {
    400: Code.INTERNAL,
    401: Code.UNAUTHENTICATED,
    403: Code.PERMISSION_DENIED,
    404: Code.UNIMPLEMENTED,
    429: Code.UNAVAILABLE,
    502: Code.UNAVAILABLE,
    503: Code.UNAVAILABLE,
    504: Code.UNAVAILABLE,
}


def is_grpc(headers: Headers) -> bool:
    """Whether a request (or response) is gRPC: its content-type says so."""
    for name, value in headers:
        if name == "content-type":
            return _CONTENT_TYPE.fullmatch(value.strip()) is not None
    return False


def parse_timeout(value: str) -> float:
    """`grpc-timeout` in seconds; ValueError for anything the spec does not allow."""
    match = _TIMEOUT.fullmatch(value.strip())
    if match is None:
        raise ValueError(
            f"malformed grpc-timeout {value[:32]!r}: expected up to 8 digits and a unit"
        )
    return int(match.group(1)) * _UNITS[match.group(2)]


def timeout_value(seconds: float) -> str:
    """`grpc-timeout` for what is left of a deadline: whole milliseconds, at least 1,
    so a call passed on with its deadline almost spent still carries one."""
    millis = max(1, int(seconds * 1000))
    if millis < 10**8:
        return f"{millis}m"
    return f"{min(max(1, int(seconds)), 10**8 - 1)}S"


def status_of(headers: Headers) -> int | None:
    """The `grpc-status` in headers or trailers; None when absent or not a number (ASCII
    digits only: str.isdigit also takes `²`, which int refuses, from a hostile peer)."""
    for name, value in headers:
        if name == "grpc-status":
            plain = value.isascii() and value.isdigit() and len(value) <= 3
            return int(value) if plain else None
    return None


def percent_encode(message: str) -> str:
    """`grpc-message` encoding: UTF-8, then every byte outside printable ASCII and `%`
    as %XX (PROTOCOL-HTTP2.md), so a header value never carries a control character."""
    out = []
    for byte in message.encode("utf-8"):
        if 0x20 <= byte <= 0x7E and byte != 0x25:
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    return "".join(out)


def trailers_only(code: Code, message: str = "") -> list[tuple[str, str]]:
    """A whole gRPC response in one HEADERS frame (sent with END_STREAM): `code` and why."""
    headers = [
        (":status", "200"),
        ("content-type", "application/grpc"),
        ("grpc-status", str(int(code))),
    ]
    if message:
        headers.append(("grpc-message", percent_encode(message)))
    return headers


#: RST_STREAM error codes (RFC 9113 7) a proxy reads apart: REFUSED_STREAM, CANCEL, and the
#: two the gRPC spec maps to statuses of their own (ENHANCE_YOUR_CALM, INADEQUATE_SECURITY).
_REFUSED_STREAM, _CANCEL = 0x7, 0x8
_FROM_RESET: Final = {
    _REFUSED_STREAM: Code.UNAVAILABLE,
    _CANCEL: Code.UNAVAILABLE,
    0xB: Code.RESOURCE_EXHAUSTED,
    0xC: Code.PERMISSION_DENIED,
}


def reset_before_head(code: int) -> Code:
    """The status for a call whose app stream was reset with `code` before any response head.

    UNAVAILABLE only where a retry cannot repeat what the app did: REFUSED_STREAM (RFC
    9113 8.7: nothing was processed) and CANCEL (what a lost app connection reads as,
    the killed-pod case; grpc-go reports a lost transport as UNAVAILABLE too). Any other
    reset is the app failing the call, maybe after acting on it: INTERNAL, as the gRPC
    spec maps it (PROTOCOL-HTTP2.md, "Errors"), never UNAVAILABLE, which an outbound
    retries for any call.
    """
    return _FROM_RESET.get(code, Code.INTERNAL)


def from_http_status(status: int) -> Code:
    """The status a gRPC client reads from an HTTP response that carries no grpc-status."""
    return _FROM_HTTP.get(status, Code.UNKNOWN)


#: `/Service/Method` as grpc-go accepts it: one leading `/`, two non-empty parts.
_METHOD: Final = re.compile(r"/([^/]+)/([^/]+)")


def malformed_method(path: str) -> str | None:
    """Why a gRPC call's `:path` is not a plain `/Service/Method`, or None.

    Refused with UNIMPLEMENTED ("malformed method name", grpc-go's answer) before any
    policy: a path a policy matches after normalization (dot segments, `//`, escapes)
    could reach a server that routes on the raw one (the class of grpc-go
    CVE-2026-33186), so a gRPC path must already be what it means. A `;` is refused
    too: no proto name has one, and servlet containers strip `;` path parameters before
    routing, so a gRPC server on one may read `/S/Admin;x` as `/S/Admin`, past a DENY.
    """
    match = _METHOD.fullmatch(path)
    if match is None:
        return "a gRPC path is /Service/Method"
    for part in match.groups():
        if part in (".", ".."):
            return "a gRPC path has no dot segments"
        if any(c in part for c in "%?#;\\") or not part.isprintable() or " " in part:
            return "a gRPC service or method name has no escapes or special characters"
    return None
