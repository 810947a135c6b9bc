"""How long an inbound connection is waited for before its handshake starts
(agent/adapters/listeners.py `_first_bytes`): not at all once its client spoke."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from agent.adapters.listeners import _first_bytes


@contextmanager
def accepted() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(client, the accepted non-blocking socket) over loopback TCP."""
    with socket.create_server(("127.0.0.1", 0)) as listening:
        client = socket.create_connection(listening.getsockname())
        server, _ = listening.accept()
        server.setblocking(False)
        with client, server:
            yield client, server


async def test_a_client_that_spoke_already_is_not_waited_for() -> None:
    with accepted() as (client, server):
        client.sendall(b"\x16\x03\x01")  # a ClientHello's first bytes
        await asyncio.sleep(0.01)  # in the accepted socket's buffer
        past = asyncio.get_running_loop().time() - 1  # no time left to wait at all
        # Its first byte, which says TLS or plaintext without another read.
        assert await _first_bytes(server, past) == b"\x16"
        assert server.recv(3, socket.MSG_PEEK) == b"\x16\x03\x01"  # peeked, not taken


async def test_a_client_that_left_is_not_waited_for() -> None:
    with accepted() as (client, server):
        client.shutdown(socket.SHUT_WR)
        await asyncio.sleep(0.01)
        assert await _first_bytes(server, asyncio.get_running_loop().time() - 1) == b""


async def test_a_client_that_says_nothing_is_waited_for_until_the_deadline() -> None:
    with accepted() as (_, server):
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await _first_bytes(server, loop.time() + 0.05)


async def test_a_client_that_speaks_later_is_waited_for() -> None:
    with accepted() as (client, server):
        loop = asyncio.get_running_loop()
        loop.call_later(0.02, client.sendall, b"\x16")
        assert await _first_bytes(server, loop.time() + 5) is None  # waited: read it again
        assert server.recv(1, socket.MSG_PEEK) == b"\x16"
