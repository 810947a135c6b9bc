"""A pooled HTTP/1.1 connection says whether its loss looks like a server's close it had not
read yet (reused, nothing heard back since it was taken): such a request is redialled."""

from __future__ import annotations

import asyncio
import ssl

from agent.adapters.pool import Pool, UpstreamConnection
from agent.core.upstream import Endpoint

ENDPOINT = Endpoint("10.0.0.1", 15443)


class Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        self.closing = True

    def close(self) -> None:
        self.closing = True


class User:
    def __init__(self) -> None:
        self.data: list[bytes] = []

    def from_upstream(self, data: bytes) -> None:
        self.data.append(data)

    def upstream_lost(self) -> None:
        pass

    def upstream_paused(self, paused: bool) -> None:
        pass


def _connection(pool: Pool, context: ssl.SSLContext) -> UpstreamConnection:
    connection = UpstreamConnection(pool, ENDPOINT, context, lambda: None)
    connection.connection_made(Transport())
    return connection


async def test_a_connection_taken_from_the_pool_is_stale_until_it_hears_back() -> None:
    pool, context = Pool(idle_timeout=60), ssl.create_default_context()
    connection = _connection(pool, context)
    assert not connection.stale  # just dialled: a loss is the server's doing, not a race
    connection.user = User()
    connection.data_received(b"HTTP/1.1 200 OK\r\n")
    pool.put(connection)
    assert pool.take(ENDPOINT, context) is connection
    assert connection.stale  # lost now, nothing came back: it was closed under us
    connection.user = User()
    connection.data_received(b"HTTP/1.1 200 OK\r\n")
    assert not connection.stale  # the server answered on it: it was alive
    pool.put(connection)
    assert pool.take(ENDPOINT, context) is connection
    assert connection.stale  # each reuse starts again
    pool.close()


async def test_bytes_on_an_idle_connection_end_it_and_say_nothing_of_staleness() -> None:
    pool, context = Pool(idle_timeout=60), ssl.create_default_context()
    connection = _connection(pool, context)
    pool.put(connection)
    connection.data_received(b"junk")  # nobody asked: dropped, never taken again
    assert connection.transport is not None and connection.transport.is_closing()
    assert pool.take(ENDPOINT, context) is None
    pool.close()


async def test_a_retired_pool_takes_back_no_connection_made_before_idle_or_in_use() -> None:
    """After `retire_all` (a reload changed whom the upstream trusts) neither an idle
    connection nor one whose request was in flight carries another request; one made
    after goes back to the pool as usual."""
    pool, context = Pool(idle_timeout=60), ssl.create_default_context()
    idle, busy = _connection(pool, context), _connection(pool, context)
    pool.put(idle)
    busy.user = User()
    pool.retire_all()
    assert idle.transport is not None and idle.transport.is_closing()
    pool.put(busy)  # its request ended
    assert busy.transport is not None and busy.transport.is_closing()
    assert pool.take(ENDPOINT, context) is None
    fresh = _connection(pool, context)
    pool.put(fresh)
    assert pool.take(ENDPOINT, context) is fresh
