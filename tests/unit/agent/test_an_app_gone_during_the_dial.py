"""An app connection that closes while its upstream is being dialled: the upstream
connection the dial then hands over is closed, not left open on both agents."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from agent.adapters.relay import Relay


class Transport:
    """What a relay touches of a transport: writing, closing, and resuming reading."""

    def __init__(self) -> None:
        self.closed = False
        self.reading = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def resume_reading(self) -> None:
        self.reading = True

    def get_extra_info(self, name: str) -> object:
        return object()  # any ssl_object: a TLS transport, read as it comes

    def abort(self) -> None:
        self.closed = True


def made(side: Any, transport: Transport) -> None:
    side.connection_made(cast(asyncio.BaseTransport, transport))


async def test_the_upstream_dialled_after_the_app_left_is_closed() -> None:
    closed: list[Relay] = []
    relay = Relay(60.0, closed.append)
    app = Transport()
    made(relay.down, app)
    relay.down.connection_lost(None)  # the app gave up while the dial ran
    upstream = Transport()
    made(relay.new_upstream(), upstream)  # the dial succeeds after all
    relay.link()
    assert upstream.closed and not upstream.reading
    assert closed == [relay]


async def test_an_app_still_there_is_linked_to_its_upstream() -> None:
    relay = Relay(60.0, lambda _: None)
    app, upstream = Transport(), Transport()
    made(relay.down, app)
    made(relay.new_upstream(), upstream)
    relay.link()
    relay.down.data_received(b"GET / HTTP/1.1\r\n")
    assert app.reading and upstream.reading and not upstream.closed
    assert upstream.written == [b"GET / HTTP/1.1\r\n"]
    relay.close()
