"""Measured durations resolve below a millisecond: the event loop's clock does not.

uvloop caches `loop.time()` once per loop iteration in whole milliseconds, so
a histogram fed from it puts every loopback handshake or request at 0 or 1 ms.
"""

from __future__ import annotations

import asyncio

from agent.adapters.metrics import AgentMetrics, clock, since
from tests.support import whole_milliseconds

ROUNDS = 20


async def _loopback_round_trip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(b"x")
    await writer.drain()
    await reader.readexactly(1)


async def test_sub_millisecond_round_trips_land_below_one_millisecond() -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(1):
            writer.write(data)
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    reader, writer = await asyncio.open_connection(*server.sockets[0].getsockname()[:2])
    metrics = AgentMetrics()
    histogram = metrics.handshake_duration.labels("inbound")
    try:
        for _ in range(ROUNDS):
            started = clock()
            await _loopback_round_trip(reader, writer)
            histogram.observe(since(started))
    finally:
        writer.close()
        server.close()
    read = metrics.registry.get_sample_value
    labels = {"direction": "inbound"}
    below_1ms = read("outrider_tls_handshake_duration_seconds_bucket", {**labels, "le": "0.001"})
    assert below_1ms is not None and below_1ms > ROUNDS // 2  # a loaded machine may stall a few
    total = read("outrider_tls_handshake_duration_seconds_sum", labels)
    assert total is not None and total > 0
    assert not whole_milliseconds(total)


def test_the_check_tells_millisecond_sums_apart() -> None:
    assert whole_milliseconds(sum([0.001, 0.0, 0.002, 0.001] * 5))
    assert not whole_milliseconds(0.0001234)
