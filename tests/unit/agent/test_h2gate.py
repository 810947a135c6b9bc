"""The gate of an h2c-only port (agent/adapters/h2gate.py): h2 goes on to the H2Server
however its preface is split, an HTTP/1.x request is answered in HTTP/1.1, and a
connection that says nothing, or is drained first, is closed and leaves the registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from agent.adapters.h2gate import H2Gate
from agent.adapters.h2server import H2Server, H2Stream
from agent.core.http1 import H2_PREFACE


async def _answer(stream: H2Stream) -> None:
    await stream.respond([(b":status", b"204")], end=True)


class Gates:
    def __init__(self) -> None:
        self.opened: list[H2Gate] = []
        self.closed: list[H2Gate] = []
        self.refused = 0
        self.admitted = 0

    def gate(self, timeout: float = 5.0) -> H2Gate:
        server = H2Server(_answer, lambda limit: None, idle_timeout=5)

        def refused() -> None:
            self.refused += 1

        def admitted() -> None:
            self.admitted += 1

        gate = H2Gate(server, "grpc", refused, self.closed.append, timeout, admitted)
        self.opened.append(gate)
        return gate


@asynccontextmanager
async def served(timeout: float = 5.0) -> AsyncIterator[tuple[Gates, int]]:
    gates = Gates()
    server = await asyncio.get_running_loop().create_server(
        lambda: gates.gate(timeout), "127.0.0.1", 0
    )
    try:
        yield gates, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for gate in gates.opened:
            gate.abort()


async def _send_in_pieces(port: int, data: bytes, size: int, *, whole: bool = False) -> bytes:
    """Send `data` in pieces of `size`; the first read back (`whole`: all until EOF)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for at in range(0, len(data), size):
        writer.write(data[at : at + size])
        await writer.drain()
        await asyncio.sleep(0)
    try:
        return await asyncio.wait_for(reader.read(-1 if whole else 4096), 2)
    finally:
        writer.close()


async def _soon(check: Callable[[], bool]) -> bool:
    for _ in range(200):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def test_a_preface_split_byte_by_byte_reaches_the_h2_server() -> None:
    async with served() as (gates, port):
        answer = await _send_in_pieces(port, H2_PREFACE, 1)
        assert answer[3:4] == b"\x04"  # the server's SETTINGS frame: h2 speaks
        assert (gates.admitted, gates.refused) == (1, 0)


async def test_an_http1_request_split_anywhere_gets_a_505_saying_what_to_do() -> None:
    async with served() as (gates, port):
        request = b"GET /demo.Greeter/SayHello HTTP/1.1\r\nHost: backend\r\n\r\n"
        # The answer comes after the first 4 bytes; the rest, sent after it, is read and
        # dropped (a close with it unread would reset the connection under the answer).
        answer = await _send_in_pieces(port, request, 2, whole=True)
        assert answer.startswith(b"HTTP/1.1 505 HTTP Version Not Supported\r\n")
        assert answer.endswith(b'set appProtocol: http"}\n')
        assert (gates.admitted, gates.refused) == (0, 1)
        assert await _soon(lambda: gates.closed == gates.opened)  # left the registry, once


async def test_a_connection_that_says_nothing_is_closed_at_the_timeout() -> None:
    async with served(timeout=0.05) as (gates, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        assert await _soon(lambda: gates.closed == gates.opened) and gates.admitted == 0


async def test_a_drain_before_the_first_bytes_closes_the_connection() -> None:
    async with served() as (gates, port):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for _ in range(100):
            if gates.opened:
                break
            await asyncio.sleep(0.01)
        [gate] = gates.opened
        gate.finish()
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()
        assert await _soon(lambda: gates.closed == [gate]) and gate.server.closed
