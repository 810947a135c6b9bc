"""A malformed message on an h2 connection is an error of its stream, not of the connection.

RFC 9113 8.1.1: a request or response that breaks HTTP/2's rules on fields
(an uppercase name, a connection-specific field, `te` other than `trailers`,
Host differing from :authority, a pseudo-header repeated, unknown or after a
regular field) or whose DATA disagrees with its content-length is malformed,
and "MUST be treated as a stream error of type PROTOCOL_ERROR". h2 checks all
of these (validate_inbound_headers; a request's content-length only when a DATA
frame ends it, so `_Stream.receive_headers` checks a request ended on its HEADERS
or by trailers), but raises a bare ProtocolError that
carries no stream id, which its connection answers with GOAWAY PROTOCOL_ERROR:
one bad request would end every other stream of the connection (a peer
agent's, multiplexing many apps' calls). `StreamErrors` makes h2 reset just
that stream (RST_STREAM PROTOCOL_ERROR) and report it as a `MalformedReset`
event; each such reset is one the peer provoked, held to the connection's
reset budget by the connection that uses it (a flood still ends in a GOAWAY).
What can only be a connection error (HPACK, flow control, too many streams,
frames on a closed stream) still is one.
"""

from __future__ import annotations

from typing import Any

import h2.connection
import h2.events
import h2.exceptions
import h2.stream
from h2.errors import ErrorCodes
from hyperframe.frame import DataFrame, Frame, HeadersFrame


class Malformed(h2.exceptions.ProtocolError):
    """h2 found the message on `stream_id` malformed."""

    def __init__(self, stream_id: int, why: str) -> None:
        super().__init__(why)
        self.stream_id = stream_id


class MalformedReset(h2.events.StreamReset):
    """The agent reset a stream whose message was malformed (not the peer's reset)."""


class _Stream(h2.stream.H2Stream):
    """h2's stream, whose checks of a received message say which stream failed them."""

    def _process_received_headers(self, *args: Any) -> Any:
        try:
            return super()._process_received_headers(*args)
        except h2.exceptions.ProtocolError as exc:
            raise Malformed(self.stream_id, str(exc)) from exc

    def _initialize_content_length(self, *args: Any) -> Any:
        try:
            return super()._initialize_content_length(*args)
        except h2.exceptions.ProtocolError as exc:
            raise Malformed(self.stream_id, str(exc)) from exc

    def _track_content_length(self, *args: Any) -> Any:
        try:
            return super()._track_content_length(*args)
        except h2.exceptions.ProtocolError as exc:
            raise Malformed(self.stream_id, str(exc)) from exc

    def receive_headers(self, headers: Any, end_stream: bool, header_encoding: Any) -> Any:
        """h2 holds a request's DATA to its content-length only when a DATA frame ends the
        stream: a request ended on its HEADERS, or by trailers, is checked here. Passed on
        to an HTTP/1.1 app with a length its body falls short of, the app would read the
        next request's head as the rest (request smuggling). Requests only: a response
        to HEAD, a 204 or a 304 may declare a length it has no body for (RFC 9113 8.1.1)."""
        declared = self._expected_content_length  # the head's: trailers would replace it
        trailers = bool(self.state_machine.headers_received)
        result = super().receive_headers(headers, end_stream, header_encoding)
        if end_stream and not self.state_machine.client:
            if not trailers:
                declared = self._expected_content_length
            received = self._actual_content_length
            if declared is not None and declared != received:
                why = f"content-length {declared}, but the request's body has {received} bytes"
                raise Malformed(self.stream_id, why)
        return result


class StreamErrors(h2.connection.H2Connection):
    """An h2 connection that resets a stream with a malformed message instead of ending
    itself; `malformed` is called for each (to count it against a budget)."""

    def malformed(self, stream_id: int) -> None:
        """A stream was reset as malformed (while a frame is being taken)."""

    def _begin_new_stream(self, stream_id: int, allowed_ids: Any) -> h2.stream.H2Stream:
        stream = super()._begin_new_stream(stream_id, allowed_ids)
        stream.__class__ = _Stream  # the same state, and checks that name their stream
        return stream

    def _receive_headers_frame(self, frame: HeadersFrame) -> Any:
        try:
            return super()._receive_headers_frame(frame)
        except Malformed as exc:
            return self._reset_malformed(exc, 0)

    def _receive_data_frame(self, frame: DataFrame) -> Any:
        try:
            return super()._receive_data_frame(frame)
        except Malformed as exc:  # the DATA frame's bytes are the connection's again
            return self._reset_malformed(exc, frame.flow_controlled_length)

    def _reset_malformed(self, exc: Malformed, length: int) -> tuple[list[Frame], list[Any]]:
        stream = self.streams.get(exc.stream_id)
        if stream is not None and not stream.closed:  # else it ended with the bad frame:
            self.reset_stream(exc.stream_id, ErrorCodes.PROTOCOL_ERROR)  # nothing to send
        if length:
            self.acknowledge_received_data(length, exc.stream_id)
        self.malformed(exc.stream_id)
        event = MalformedReset(
            stream_id=exc.stream_id, error_code=ErrorCodes.PROTOCOL_ERROR, remote_reset=False
        )
        return [], [event]
