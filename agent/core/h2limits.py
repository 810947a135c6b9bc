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
- Frames that cost work but carry nothing (the 2019 set, CVE-2019-9511..9518):
  they are held to budgets proportional to what the connection does, Envoy's
  model (`FrameBudget`): empty DATA frames in a row (CVE-2019-9518), frames
  that do nothing (an RST_STREAM for no open stream, an unknown type, an ACK of
  nothing asked: h2 drops them silently) and PRIORITY frames per stream opened
  (9513), WINDOW_UPDATE frames per stream opened and
  DATA frame sent, and the RST_STREAMs the peer makes the agent send (frames on
  streams it reset itself, streams past the concurrent limit: 9514) in a window;
  past any of them, GOAWAY ENHANCE_YOUR_CALM.
- A peer that does not read (9512/9514/9517's common core, and slow reads): the
  connection stops reading while its writes are not taken (above), and one
  whose writes stay untaken for `send_timeout` is dropped, so a peer cannot
  hold a connection's buffers by never reading; a stream whose window stays
  shut for `stall_timeout` is reset, so it cannot hold the app's work either.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Final, Literal, get_args

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
    "empty_frames",
    "priority_flood",
    "window_update_flood",
    "reset_flood",
    "slow_read",
]
LIMITS: Final[tuple[Limit, ...]] = get_args(Limit)


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
    #: Seconds the peer may leave those bytes untaken before the connection is dropped
    #: (nginx's send_timeout); also how long a closing connection may wait to flush.
    send_timeout: float = 60.0
    #: Seconds a stream may wait for the peer to open its window before it is reset
    #: (Envoy's stream_idle_timeout): a client cannot hold a stream, and the app's work
    #: behind it, open for ever by never taking the answer.
    stall_timeout: float = 300.0
    #: DATA frames in a row that carry nothing (no data, or padding only) and end nothing.
    max_empty_frames: int = 10
    #: PRIORITY frames per stream the peer opened (plus one), over the connection's life.
    max_priority_per_stream: int = 100
    #: Frames that do nothing (RST_STREAM for no open stream, unknown types, ACKs of
    #: nothing asked) per stream the peer opened (plus one), over the connection's life.
    max_inert_per_stream: int = 100
    #: WINDOW_UPDATE frames per DATA frame the agent sent (plus 2 per stream, plus 5).
    max_window_updates_per_data: int = 10
    #: RST_STREAMs the peer made the agent send, per `window`.
    max_provoked_resets: int = 200
    #: The HPACK table the agent compresses what it sends with, whatever larger one the
    #: peer allows (SETTINGS_HEADER_TABLE_SIZE): h2 would keep every header sent on the
    #: connection in it. 4 KiB, as Go and nghttp2 cap theirs.
    max_encoder_table: int = 4096
    #: Closed streams h2 remembers (to answer a late frame on one rather than end the
    #: connection): its own 65,536 cost a long-lived connection about 11 MB.
    max_closed_streams: int = 4096


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


class FrameBudget:
    """What a connection's peer may send that costs work but carries nothing, measured
    against what the connection does (Envoy's budgets, its defaults but for empty frames):
    each `received_*` says which limit the frame broke, or None."""

    __slots__ = (
        "_empty",
        "_inert",
        "_limits",
        "_priority",
        "_provoked",
        "_window_updates",
        "data_sent",
        "streams",
    )

    def __init__(self, limits: H2Limits) -> None:
        self._limits = limits
        self.streams = 0  # streams the peer opened
        self.data_sent = 0  # DATA frames the agent sent
        self._empty = 0  # empty DATA frames in a row
        self._inert = 0
        self._priority = 0
        self._window_updates = 0
        self._provoked = Window(limits.max_provoked_resets, limits.window)

    def received_data(self, carries: bool) -> Limit | None:
        """A DATA frame: `carries` is False when it has no data (padding at most) and no
        END_STREAM. A frame that carries something starts the count again."""
        if carries:
            self._empty = 0
            return None
        self._empty += 1
        return "empty_frames" if self._empty > self._limits.max_empty_frames else None

    def received_inert(self) -> Limit | None:
        """A frame that did nothing (counted with the empty ones, past its own budget)."""
        self._inert += 1
        allowed = self._limits.max_inert_per_stream * (1 + self.streams)
        return "empty_frames" if self._inert > allowed else None

    def received_priority(self) -> Limit | None:
        self._priority += 1
        allowed = self._limits.max_priority_per_stream * (1 + self.streams)
        return "priority_flood" if self._priority > allowed else None

    def received_window_update(self) -> Limit | None:
        self._window_updates += 1
        per_data = self._limits.max_window_updates_per_data
        allowed = 5 + 2 * (self.streams + per_data * self.data_sent)
        return "window_update_flood" if self._window_updates > allowed else None

    def provoked_reset(self, now: float) -> Limit | None:
        """The peer made the agent send a RST_STREAM (a frame on a stream it reset itself,
        a stream past the concurrent limit or after a GOAWAY)."""
        return "reset_flood" if self._provoked.hit(now) else None
