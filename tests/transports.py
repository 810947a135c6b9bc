"""A fake asyncio transport for the sans-IO HTTP exchanges: it keeps what it is sent."""

from __future__ import annotations


class Sent:
    """A transport that keeps what it is written, and whether it was closed or paused."""

    def __init__(self) -> None:
        self.data = b""
        self.closed = False
        self.aborted = False
        self.paused = False
        self.protocol: object = None  # the last set_protocol's

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default  # plain TCP: no ssl_object, no peer

    def set_protocol(self, protocol: object) -> None:
        self.protocol = protocol

    def take(self) -> bytes:
        """What was written since the last take."""
        data, self.data = self.data, b""
        return data
