"""What a relay does with an app's bytes that come before its upstream is connected (real
loopback sockets; agent/adapters/relay.py): read and kept, then sent first; bounded; and an
EOF that early still lets them out."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import sys
from collections.abc import AsyncIterator

from agent.adapters.relay import EARLY, Relay
from tests.mesh import eventually


class Recorder:
    """An upstream app: what it received, and whether its client closed."""

    def __init__(self) -> None:
        self.received = b""
        self.ended = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while chunk := await reader.read(65536):
            self.received += chunk
        self.ended.set()
        writer.close()


@contextlib.asynccontextmanager
async def accepted(relay: Relay) -> AsyncIterator[tuple[asyncio.StreamWriter, Recorder]]:
    """An app connected to `relay`'s downstream side (not linked yet), and the upstream's
    recorder, to be connected with `upstream(relay, recorder)`."""
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: relay.down, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    _, app = await asyncio.open_connection("127.0.0.1", port)
    recorder = Recorder()
    upstream = await asyncio.start_server(recorder.serve, "127.0.0.1", 0)
    relay.upstream_port = upstream.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
    try:
        assert await eventually(lambda: relay.down.transport is not None)
        yield app, recorder
    finally:
        app.close()
        relay.abort()
        server.close()
        upstream.close()


async def link(relay: Relay) -> None:
    port = relay.upstream_port  # type: ignore[attr-defined]
    await asyncio.get_running_loop().create_connection(lambda: relay.up, "127.0.0.1", port)
    relay.link()


async def test_bytes_sent_before_the_upstream_is_connected_go_out_first_once_linked() -> None:
    relay = Relay(30, lambda _: None)
    async with accepted(relay) as (app, recorder):
        app.write(b"GET / HTTP/1.1\r\n\r\n")
        assert await eventually(lambda: relay.down.pending != [])  # read, not left in the kernel
        await link(relay)
        app.write(b"and then")
        assert await eventually(lambda: recorder.received == b"GET / HTTP/1.1\r\n\r\nand then")
        assert not relay.closed


async def test_past_early_bytes_before_the_link_the_app_is_not_read_until_linked() -> None:
    relay = Relay(30, lambda _: None)
    sent = bytes(range(256)) * (64 * EARLY // 256)  # more than one read takes
    async with accepted(relay) as (app, recorder):
        app.write(sent)
        assert await eventually(lambda: relay.down.early >= EARLY)
        down = relay.down.transport
        assert down is not None
        assert not down.is_reading()
        assert relay.down.early < len(sent)  # the kernel holds the rest meanwhile
        await link(relay)
        assert await eventually(lambda: recorder.received == sent, 5)


async def test_an_app_that_sends_a_lot_before_the_link_has_at_most_early_bytes_held() -> None:
    """The bound is EARLY, not EARLY plus whatever one read takes (uvloop reads up to
    256 KB at a time: 16 times EARLY, held per connection for as long as a dial takes)."""
    relay = Relay(30, lambda _: None)
    sent = bytes(range(256)) * (64 * EARLY // 256)
    async with accepted(relay) as (app, recorder):
        app.write(sent)
        assert await eventually(lambda: relay.down.early >= EARLY)
        assert relay.down.early == EARLY
        assert sum(map(len, relay.down.pending)) == EARLY
        await link(relay)
        assert await eventually(lambda: recorder.received == sent, 5)


async def test_an_app_that_dribbles_bytes_before_the_link_holds_about_what_it_sent() -> None:
    """Read a byte at a time (an app that writes each byte on its own, without Nagle, while
    its upstream is dialled), a side holds about what it read, not an object per read: a
    list of 4096 one-byte pieces is ~40 times the bytes (at EARLY of them, 650 KB per
    connection, for as long as the dial takes), and the bound is EARLY."""
    relay = Relay(30, lambda _: None)
    sent = bytes(range(256)) * 16  # 4096 bytes, one read each
    async with accepted(relay) as (app, recorder):
        app.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for count, byte in enumerate(sent, 1):
            app.write(bytes([byte]))
            for _ in range(1000):  # read before the next is sent: an iteration or two
                if relay.down.early >= count:
                    break
                await asyncio.sleep(0)
            else:
                raise AssertionError(f"byte {count} was not read")
        pending = relay.down.pending
        held = sys.getsizeof(pending) + sum(map(sys.getsizeof, pending))
        assert held < 2 * len(sent), f"{held} bytes held for {len(sent)} read"
        await link(relay)
        assert await eventually(lambda: recorder.received == sent, 5)


async def test_an_app_that_sends_and_closes_before_the_link_still_delivers_its_bytes() -> None:
    closed: list[Relay] = []
    relay = Relay(30, closed.append)
    async with accepted(relay) as (app, recorder):
        app.write(b"fire and forget")
        app.write_eof()
        assert await eventually(lambda: relay.down.eof)
        assert not relay.closed  # the EOF waits for the link
        await link(relay)
        await asyncio.wait_for(recorder.ended.wait(), 5)  # written out, then closed
        assert recorder.received == b"fire and forget"
        assert closed == [relay]


async def test_an_app_that_leaves_before_the_link_closes_the_relay() -> None:
    closed: list[Relay] = []
    relay = Relay(30, closed.append)
    async with accepted(relay) as (app, _):
        linger = struct.pack("ii", 1, 0)  # closed with a reset, not an EOF: nothing is owed
        app.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        app.transport.abort()
        assert await eventually(lambda: relay.closed)
        assert closed == [relay]
