"""The limits an HTTP/2 connection is held to, and the counting behind the flood limits.

One home for the numbers behind issue 17's scope 5 (the known HTTP/2 attack
classes), so the server (agent/adapters/h2server.py), its tests and the docs
agree. Pure: time is an argument.

- Rapid reset (CVE-2023-44487): a stream reset by the client still costs the
  work it started, so resets are counted in a window and past the limit the
  connection gets GOAWAY ENHANCE_YOUR_CALM; and a reset stream's handler keeps
  its place among the concurrent streams until it has really finished, so a
  client cannot have more than `max_concurrent_streams` requests at work at once
  however fast it resets them (Go's fix).
- CONTINUATION floods (CVE-2024-27919) and HPACK bombs: the header block is
  bounded while it is still arriving (frames and encoded bytes), and the DECODED
  header list is bounded as it is decoded (`max_header_list`, the same 64 KiB as
  HTTP/1.1's head), whatever the encoded size.
- SETTINGS and PING floods: each is answered with an ACK the peer must read, so
  they are counted in a window; and the connection stops reading while its
  answers are not being read (the transport's write buffer is full), so nothing
  the peer provokes queues without bound. A PING counts only while the agent
  has sent the peer nothing else (grpc-go's "ping strikes"): a client measuring
  bandwidth with PINGs beside its data is not a flood.
- Flow control: the agent advertises windows and returns credit only as a
  handler forwards what it read, so what a connection buffers is bounded by
  the connection window it advertised; it sends no more than the peer's windows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Literal

#: The label values of `outrider_http2_limits_total{limit}`.
Limit = Literal[
    "rapid_reset",
    "continuation",
    "header_list",
    "concurrent_streams",
    "flow_control",
    "settings_flood",
    "ping_flood",
    "protocol_error",
]


@dataclass(frozen=True)
class H2Limits:
    """An h2 connection's limits (the defaults are what every agent port uses)."""

    max_concurrent_streams: int = 100
    #: Decoded header list (RFC 9113's size: name + value + 32 per field), HTTP/1.1's 64 KiB.
    max_header_list: int = 64 * 1024
    #: Header fields per request (HTTP/1.1's MAX_HEADERS).
    max_headers: int = 100
    #: CONTINUATION frames of one header block still arriving (h2 stops at 64 itself).
    max_continuations: int = 16
    #: A stream's receive window, and the connection's: the most a connection buffers.
    stream_window: int = 65_535
    connection_window: int = 1024 * 1024
    max_frame_size: int = 16_384
    #: Client resets per `window` seconds before GOAWAY ENHANCE_YOUR_CALM.
    max_resets: int = 200
    #: SETTINGS frames per `window`.
    max_settings: int = 100
    #: PINGs per `window` while the agent sent the peer nothing else.
    max_pings: int = 100
    window: float = 10.0
    #: Bytes of frames written but not yet taken by the peer before reading stops.
    write_high: int = 256 * 1024


class Window:
    """Events in the last `seconds`: `hit(now)` is True once more than `limit` fell in it."""

    __slots__ = ("_limit", "_seconds", "_times")

    def __init__(self, limit: int, seconds: float) -> None:
        self._limit, self._seconds = limit, seconds
        self._times: deque[float] = deque(maxlen=limit + 1)  # never more than it must hold

    def hit(self, now: float) -> bool:
        times = self._times
        while times and times[0] <= now - self._seconds:
            times.popleft()
        times.append(now)
        return len(times) > self._limit

    def clear(self) -> None:
        self._times.clear()
