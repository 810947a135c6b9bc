"""An app connection that closes while its upstream is being dialled: the upstream
connection the dial then hands over is closed, not left open on both agents."""

from __future__ import annotations

import asyncio
from typing import Any, cast

from agent.adapters.relay import Relay
from tests.transports import Sent


def made(side: Any, transport: Sent) -> None:
    side.connection_made(cast(asyncio.BaseTransport, transport))


async def test_the_upstream_dialled_after_the_app_left_is_closed() -> None:
    closed: list[Relay] = []
    relay = Relay(60.0, closed.append)
    app = Sent()
    made(relay.down, app)
    relay.down.connection_lost(None)  # the app gave up while the dial ran
    upstream = Sent()
    upstream.paused = True  # as a dialled connection is until the link
    made(relay.new_upstream(), upstream)
    relay.link()
    assert upstream.closed and upstream.paused
    assert closed == [relay]


async def test_an_app_still_there_is_linked_to_its_upstream() -> None:
    relay = Relay(60.0, lambda _: None)
    app, upstream = Sent(), Sent()
    app.paused = upstream.paused = True
    made(relay.down, app)
    made(relay.new_upstream(), upstream)
    relay.link()
    relay.down.data_received(b"GET / HTTP/1.1\r\n")
    assert not app.paused and not upstream.paused and not upstream.closed
    assert upstream.take() == b"GET / HTTP/1.1\r\n"
    relay.close()
