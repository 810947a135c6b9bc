"""The acceptor every unauthenticated port shares, in process over loopback sockets.

Behaviour that needs no CA or webhook to show: a caller that keeps sending
while it leaves the server's answers unread is cut off.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

import pytest

from identity import serving
from identity.serving import Acceptor, ConnectionLimits, progress_of
from identity.tlsfiles import TLS_SHUTDOWN_TIMEOUT
from tests.support import loopback_tls


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


class CloseAtOnce(asyncio.Protocol):
    """Closes each connection as soon as it is made (as an idle timeout would, later)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


async def test_a_tls_caller_that_never_answers_the_close_gives_its_slot_back_within_a_second(
    tmp_path: Path,
) -> None:
    """A closed TLS connection waits for the caller's close_notify: a caller whose node
    froze never sends it, and its connection (its slot of max_connections) was held for
    the loop's 30 s. TLS_SHUTDOWN_TIMEOUT bounds it."""
    tls = loopback_tls(tmp_path, "acceptor")
    sock = socket.create_server(("127.0.0.1", 0))
    limits = ConnectionLimits(10, timedelta(seconds=5), timedelta(seconds=30))
    server = Acceptor(sock, CloseAtOnce, tls.server_context, limits, lambda reason: None)
    server.start()
    client = ssl.create_default_context(cafile=str(tls.ca_file))
    thawed = threading.Event()

    def frozen() -> None:
        with (
            socket.create_connection(sock.getsockname()[:2]) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1"),
        ):
            thawed.wait(30)  # never reads again: the server's close_notify unanswered

    caller = threading.Thread(target=frozen, daemon=True)
    caller.start()
    try:
        for _ in range(500):  # bounded: 5 s for the handshake
            if server.held():
                break
            await asyncio.sleep(0.01)
        closing_since = time.monotonic()
        for _ in range(100):  # bounded: 5 s, where the loop's default took 30
            if not server.held():
                break
            await asyncio.sleep(0.05)
        assert server.held() == 0
        assert time.monotonic() - closing_since < TLS_SHUTDOWN_TIMEOUT + 1.5
    finally:
        thawed.set()
        server.abort_clients()
        server.close()
        await server.wait_closed()


class Answering(asyncio.Protocol):
    """Answers each line `ok`, reporting the request and its answer to the acceptor."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        progress = progress_of(self.transport)
        assert progress is not None
        for _ in range(data.count(b"\n")):
            progress.received()
            self.transport.write(b"ok\n")  # type: ignore[attr-defined]
            progress.answered()


async def test_connections_answered_once_and_left_idle_keep_no_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nine callers that each asked once and then sat idle kept their places ahead of
    every newcomer, so a legitimate caller was displaced mid-handshake by the next new
    connection. Once their answer is RECENT-old, they go before a newcomer does."""
    monkeypatch.setattr(serving, "RECENT", 0.2)
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    limits = ConnectionLimits(10, timedelta(seconds=5), timedelta(seconds=30))
    server = Acceptor(sock, Answering, None, limits, lambda reason: None)
    server.start()
    reader_writers = []
    try:
        for _ in range(9):  # asked once, answered, then idle
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"ask\n")
            assert await asyncio.wait_for(reader.readline(), 5) == b"ok\n"
            reader_writers.append((reader, writer))
        await asyncio.sleep(0.3)  # their answers are older than RECENT
        newcomer = await asyncio.open_connection("127.0.0.1", port)  # the cap's tenth
        reader_writers.append(newcomer)
        reader_writers.append(await asyncio.open_connection("127.0.0.1", port))  # past it
        await asyncio.sleep(0.1)
        newcomer[1].write(b"ask\n")
        assert await asyncio.wait_for(newcomer[0].readline(), 5) == b"ok\n"
    finally:
        for _, writer in reader_writers:
            writer.close()
        server.abort_clients()
        server.close()
        await server.wait_closed()
