"""An HTTP/1.1 outbound request on an idle pooled connection is sent and ended by callbacks,
with no task; a retry goes on in a task from where the first try left it; an app that
leaves gives back at once what its request held. Fake transports, a real upstream."""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime

from agent.adapters.http import HOLD_BYTES, PARSE_BYTES, REQUEST_COST
from agent.adapters.metrics import AgentMetrics
from agent.adapters.outbound_http import OutboundHttp
from agent.adapters.pool import UpstreamConnection
from agent.adapters.runtime import Runtime
from agent.adapters.tls import Contexts
from agent.adapters.upstreams import LiveUpstream
from agent.config import Limits
from agent.config_outbound import Outbound, Subset
from agent.core.discovery import StaticSource
from agent.core.upstream import Endpoint
from identity import SpiffeId
from tests.transports import Sent

A, B = Endpoint("10.0.0.1", 15443), Endpoint("10.0.0.2", 15443)
SERVER = SpiffeId.parse("spiffe://example.org/ns/shop/sa/backend")
GET = b"GET /items HTTP/1.1\r\nHost: backend\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
UNAVAILABLE = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n"


@dataclass
class Setup:
    live: LiveUpstream
    exchange: OutboundHttp
    app: Sent
    upstream: dict[Endpoint, tuple[UpstreamConnection, Sent]]  # one pooled connection each

    def sent_to(self) -> list[Endpoint]:
        """The endpoints whose connection has been written a request since the last look."""
        return [e for e, (_, transport) in self.upstream.items() if transport.take()]


@asynccontextmanager
async def outbound(*endpoints: Endpoint) -> AsyncIterator[Setup]:
    contexts = Contexts()
    contexts.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # compared by the pool only
    runtime = Runtime(
        Limits(),
        contexts,
        AgentMetrics(),
        lambda: datetime.now(UTC),
        SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend"),
    )
    source = StaticSource(tuple((e, 1) for e in endpoints))
    config = Outbound(
        "backend", None, frozenset({SERVER}), (Subset("default", 1, source),), protocol="http"
    )
    live = LiveUpstream(config, runtime, random.Random(1))
    live.start()
    for _ in range(100):  # the static source publishes at the next turn of the loop
        if live.core.endpoints():
            break
        await asyncio.sleep(0)
    upstream = {}
    for endpoint in endpoints:
        connection = UpstreamConnection(live.pool, endpoint, contexts.client, lambda: None)
        transport = Sent()
        connection.connection_made(transport)  # type: ignore[arg-type]
        live.pool.put(connection)
        upstream[endpoint] = (connection, transport)
    app = Sent()
    exchange = OutboundHttp(live, lambda _: None, random.Random(1))
    exchange.connection_made(app)  # type: ignore[arg-type]
    try:
        yield Setup(live, exchange, app, upstream)
    finally:
        live.close()


async def until(check: Callable[[], bool], turns: int = 100) -> None:
    """Let the loop turn until `check()` holds (a bounded number of turns)."""
    for _ in range(turns):
        if check():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


async def test_a_request_on_an_idle_pooled_connection_is_answered_without_a_task() -> None:
    async with outbound(A) as s:
        s.exchange.data_received(GET)
        assert s.exchange.task is None
        assert s.sent_to() == [A]
        connection, _ = s.upstream[A]
        connection.data_received(OK)
        assert s.app.take() == b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        assert s.exchange.task is None and s.exchange.flight is None
        assert s.live.breaker.in_use("max_requests") == 0 and s.live.budget.requests == 0
        assert len(s.live.pool) == 1  # back for the next request
        s.exchange.data_received(GET)  # and the next one takes it again
        assert s.sent_to() == [A]


async def test_a_retried_response_goes_on_in_a_task_to_the_other_endpoint() -> None:
    async with outbound(A, B) as s:
        s.exchange.data_received(GET)
        [first] = s.sent_to()
        s.upstream[first][0].data_received(UNAVAILABLE)  # 503: retried by default
        assert s.exchange.task is not None
        assert s.upstream[first][1].aborted  # the retried try's connection is dropped
        await until(lambda: s.exchange.connection is not None)
        [second] = s.sent_to()
        assert second != first
        s.upstream[second][0].data_received(OK)
        await until(lambda: s.exchange.task is None)
        assert s.app.take().startswith(b"HTTP/1.1 200 OK\r\n")  # never the 503
        assert s.live.breaker.in_use("max_requests") == 0 and s.live.budget.retries == 0


async def test_an_app_that_leaves_mid_request_gives_back_its_place_at_once() -> None:
    async with outbound(A) as s:
        s.exchange.data_received(GET)
        assert s.live.breaker.in_use("max_requests") == 1
        s.exchange.connection_lost(None)
        assert s.live.breaker.in_use("max_requests") == 0 and s.live.budget.requests == 0
        assert s.upstream[A][1].aborted  # its state mid-exchange is unknown: never pooled
        assert len(s.live.pool) == 0


async def test_a_read_of_pipelined_requests_is_parsed_no_further_than_what_may_be_held() -> None:
    """As inbound (tests/unit/agent/test_http_exchange.py): an app's one read of thousands
    of pipelined GETs holds a bounded number, and each goes out in order as answered."""
    async with outbound(A) as s:
        count = 64 * 1024 // len(GET)
        pipelined = b"".join(b"GET /%d HTTP/1.1\r\nHost: backend\r\n\r\n" % n for n in range(count))
        s.exchange.data_received(pipelined)
        most = HOLD_BYTES // REQUEST_COST + PARSE_BYTES // len(GET) + 1
        assert len(s.exchange.queue) <= most and s.exchange.unread and s.app.paused
        connection, transport = s.upstream[A]
        arrived: list[int] = []
        for _ in range(count):
            await until(lambda: bool(transport.data))
            arrived.append(int(transport.take().split(b" ")[1][1:]))
            assert len(s.exchange.queue) <= most
            connection = s.exchange.connection or connection
            connection.data_received(OK)
        assert arrived == list(range(count))
        await until(lambda: not s.exchange.unread and not s.app.paused)
