"""The acceptor every unauthenticated port shares, in process over loopback sockets.

Behaviour that needs no CA or webhook to show: a caller that keeps sending
while it leaves the server's answers unread is cut off.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta

from identity.serving import Acceptor, ConnectionLimits


class Echo(asyncio.Protocol):
    """Answers every byte with 64 KiB, as a server answering pipelined requests would."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(bytes(64 * 1024) * len(data))  # type: ignore[attr-defined]


@asynccontextmanager
async def acceptor(closed: list[str]) -> AsyncIterator[int]:
    sock = socket.create_server(("127.0.0.1", 0))
    limits = ConnectionLimits(10, timedelta(seconds=5), timedelta(seconds=30))
    server = Acceptor(sock, Echo, None, limits, closed.append)
    server.start()
    try:
        yield sock.getsockname()[1]
    finally:
        server.abort_clients()
        server.close()
        await server.wait_closed()


def send_and_never_read(port: int, sends: int) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sticks
    sock.connect(("127.0.0.1", port))
    try:
        for _ in range(sends):
            sock.send(b"x")
            time.sleep(0.002)
    except ConnectionError:
        pass  # cut off
    finally:
        sock.close()


async def test_a_caller_that_never_reads_is_cut_once_a_mebibyte_waits() -> None:
    closed: list[str] = []
    async with acceptor(closed) as port:
        # 64 MiB of answers asked for: far past what kernel buffers take.
        await asyncio.to_thread(send_and_never_read, port, 1024)
    assert closed == ["unread_output"]
