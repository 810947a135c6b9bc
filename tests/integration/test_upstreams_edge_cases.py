"""Upstream edge cases over loopback: framing, connection slots, health answers, pooling.

Backends are real apps behind real in-process agents (tests/integration/
test_upstreams.py's helpers); where a test needs bytes an HTTP server would
not send, the app is a raw TCP server behind an L4 (`protocol: tcp`) inbound,
so its bytes reach the client agent's outbound untouched.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import httptools
import pytest

from agent import config as agent_config
from agent.adapters import discovery
from agent.adapters.listeners import OutboundListener
from agent.adapters.outbound_http import OutboundHttp
from agent.app import Agent
from agent.core.discovery import Source
from agent.core.endpoint import Endpoint
from tests.integration.test_upstreams import (
    BACKEND,
    App,
    backend_agents,
    backends,
    metric,
    outbound,
    root,
    serving,
)
from tests.mesh import agent_yaml, eventually, inbound, local_sign, running_agent, sample
from tests.support import CaSetup, free_port

__all__ = ["root"]  # the module-scoped fixture, shared with test_upstreams.py

SHORT_DRAIN = {"drain_timeout": "300ms"}
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


# -- helpers ---------------------------------------------------------------------------------


@asynccontextmanager
async def raw_backend(root: Path, setup: CaSetup, handler: Handler) -> AsyncIterator[str]:
    """A raw TCP app behind an L4 inbound agent; yields the agent's inbound address."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    raw = agent_yaml(root, "backend", inbound=inbound(port))
    try:
        async with running_agent(raw, local_sign(setup), root) as agent:
            yield agent.bound["inbound[0]"]
    finally:
        server.close()


@contextmanager
def black_hole() -> Iterator[str]:
    """A port whose kernel completes TCP connects that nobody ever accepts: TLS never starts."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as listening:
        yield f"127.0.0.1:{listening.getsockname()[1]}"


class _Response:
    def __init__(self) -> None:
        self.body = b""
        self.headers: dict[bytes, bytes] = {}
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.complete = True


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    """One HTTP/1.1 response off `reader`: status, headers (lower-case names), body."""
    response = _Response()
    parser = httptools.HttpResponseParser(response)
    while not response.complete:
        data = await reader.read(65536)
        if not data:
            parser.feed_data(b"")  # a close-delimited body ends here, anything else is cut
            break
        parser.feed_data(data)
    assert response.complete, "the response was cut short"
    return parser.get_status_code(), response.headers, response.body


async def exchange(address: str, *requests: bytes) -> list[tuple[int, bytes]]:
    """Send each request on one connection, reading its response before the next."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    answers = []
    try:
        for request in requests:
            writer.write(request)
            status, _, body = await read_response(reader)
            answers.append((status, body))
    finally:
        writer.close()
    return answers


@asynccontextmanager
async def client_agent(root: Path, setup: CaSetup, **upstream: object) -> AsyncIterator[Agent]:
    """test_upstreams.py's client agent, with a short drain: a connection a bug left hanging
    must not hold the test for the default 30 s."""
    raw = agent_yaml(root, "frontend", outbound=outbound(**upstream), limits=SHORT_DRAIN)
    async with running_agent(raw, local_sign(setup), root) as agent:
        yield agent


def state(agent: Agent, address: str) -> str:
    """The health state the client agent's upstream holds for the endpoint at `address`."""
    [outbound_listener] = agent.outbound.values()
    assert isinstance(outbound_listener, OutboundListener) and outbound_listener.live is not None
    host, port = address.rsplit(":", 1)
    now = asyncio.get_running_loop().time()
    return str(outbound_listener.live.core.health.state(Endpoint(host, int(port)), now))


def listener(agent: Agent) -> str:
    return agent.bound["outbound[backend]"]


# -- request smuggling ---------------------------------------------------------------------


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: backend\r\n\r\n"


async def test_a_close_delimited_response_reaches_a_keep_alive_app_whole(
    root: Path, setup: CaSetup
) -> None:
    """A body that ends with the upstream connection is re-chunked, and its last chunk sent.

    The end comes as the connection's loss (upstream_lost), which queues the
    terminating `0\\r\\n\\r\\n` but writes nothing: the app, which keeps its
    connection, waits for the end of a response that never comes.
    """

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\n\r\nuntil the close")  # no length: ends at close

    async with (
        raw_backend(root, setup, answer) as address,
        client_agent(root, setup, endpoints=[address]) as agent,
    ):
        try:
            async with asyncio.timeout(1.5):
                answers = await exchange(listener(agent), b"GET / HTTP/1.1\r\nHost: b\r\n\r\n")
        except TimeoutError:
            answers = []  # the last chunk never came
    assert answers == [(200, b"until the close")]


async def test_an_upstream_that_answers_twice_is_never_pooled(root: Path, setup: CaSetup) -> None:
    """A second response after the final one (what a desynchronized server sends for a
    request it read as two) ends the upstream connection: pooled, what it sends next
    would be taken for the answer to another request of the app."""
    carried: list[int] = []  # requests per upstream connection

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        carried.append(0)
        while True:
            await reader.readuntil(b"\r\n\r\n")
            carried[-1] += 1
            ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
            writer.write(ok + b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned")

    async with (
        raw_backend(root, setup, answer) as address,
        client_agent(root, setup, endpoints=[address]) as agent,
    ):
        get = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
        answers = await exchange(listener(agent), get, get)
    assert answers == [(200, b"ok"), (200, b"ok")]
    assert carried == [1, 1]


# -- circuit breaker and retry budget counters -----------------------------------------------


async def test_a_request_timeout_during_a_dial_gives_back_its_connection_slot(
    root: Path, setup: CaSetup
) -> None:
    """A dial cut short by `timeouts.request` must release its `max_connections` slot.

    Otherwise every request that times out while connecting leaks one, and
    after `max_connections` of them the upstream answers 503 for good.
    """
    async with asyncio.timeout(5), backends(root, setup, "a") as pairs:
        with black_hole() as hole:
            upstream = {
                "endpoints": [hole, pairs[0][1]],  # round robin: the hole first
                "timeouts": {"request": "300ms"},
                "circuit_breaker": {"max_connections": 1},
            }
            async with client_agent(root, setup, **upstream) as agent:
                get = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
                [(first, _)] = await exchange(listener(agent), get)  # stuck in the handshake
                [(second, body)] = await exchange(listener(agent), get)  # to the backend
    assert first == 504
    assert (second, body) == (200, b"a GET 0")
    assert metric(agent, "upstream_overflows_total", reason="max_connections") == 0


async def test_a_dial_to_the_wrong_server_id_releases_its_connection_slot_once(
    root: Path, setup: CaSetup
) -> None:
    """A peer refused for its SPIFFE ID gives its `max_connections` slot back once, not twice.

    The dial releases it when it raises, and the aborted connection's
    connection_lost releases it again: the count drifts below the connections
    really open, so the limit no longer holds.
    """
    async with (
        asyncio.timeout(5),
        serving(App("intruder")) as intruder_app,
        running_agent(
            agent_yaml(root, "intruder", inbound=inbound(intruder_app.port, protocol="http")),
            local_sign(setup),
            root,
        ) as intruder,
        backends(root, setup, "a") as pairs,
    ):
        upstream = {
            "endpoints": [intruder.bound["inbound[0]"], pairs[0][1]],  # round robin: it first
            "circuit_breaker": {"max_connections": 1},
            "health": {"outlier": {"consecutive_failures": 1}},  # then it is ejected
        }
        async with client_agent(root, setup, **upstream) as agent:
            get = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
            # The intruder is refused, the retry reaches a: one connection, now pooled.
            assert await exchange(listener(agent), get) == [(200, b"a GET 0")]
            await asyncio.sleep(0.05)  # the refused connection's connection_lost
            slow = b"GET /slow/0.3 HTTP/1.1\r\nHost: backend\r\n\r\n"
            answers = await asyncio.gather(*(exchange(listener(agent), slow) for _ in range(2)))
    # One takes the pooled connection; a second connection would break max_connections: 1.
    assert sorted(status for [(status, _)] in answers) == [200, 503]
    assert intruder_app.hits == 0


async def test_a_wrong_server_id_is_logged_as_the_tcp_outbound_logs_it(
    root: Path, setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """An HTTP outbound whose server_ids do not hold the endpoint's ID answers 503
    upstream_connect_failure, and the log says which ID the endpoint presented: from
    the 503 alone a wrong server_ids looks like a dead upstream."""
    other = "spiffe://example.org/ns/demo/sa/payments"
    async with (
        asyncio.timeout(5),
        backends(root, setup, "a") as pairs,
        client_agent(root, setup, endpoints=[pairs[0][1]], server_ids=[other]) as agent,
    ):
        get = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
        [(status, body)] = await exchange(listener(agent), get)
    assert (status, b"upstream_connect_failure" in body) == (503, True)
    assert pairs[0][0].hits == 0
    said = [r.getMessage() for r in caplog.records if r.name == "outrider.agent"]
    assert f"outbound backend: {pairs[0][1]} presented {BACKEND}, not an ID of the upstream" in said


async def test_a_reload_during_a_retry_leaves_the_app_connection_working(
    root: Path, setup: CaSetup
) -> None:
    """A retry's budget slot goes back to the budget it came from, even if a reload replaced it.

    Released on the new budget instead, it raises: the request's task dies
    after the response went out, and the app's keep-alive connection never
    gets another answer.
    """
    async with asyncio.timeout(5), backends(root, setup, "a", "b") as pairs:
        (a, a_address), (b, b_address) = pairs
        a.failing = 1  # round robin: a answers 503 first, the retry goes to b
        upstream = {"endpoints": [a_address, b_address], "retries": {"retry_on": [503]}}
        async with client_agent(root, setup, **upstream) as agent:
            host, port = listener(agent).rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET /slow/0.3 HTTP/1.1\r\nHost: backend\r\n\r\n")
            assert await eventually(lambda: b.hits == 1, 2)  # the retry is in flight
            reloaded = outbound(**{**upstream, "retries": {"retry_on": [503], "max": 3}})
            raw = agent_yaml(root, "frontend", outbound=reloaded, limits=SHORT_DRAIN)
            await agent.reconfigure(agent_config.parse(raw, base=root))
            first = await read_response(reader)
            writer.write(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n")  # the same connection
            try:
                async with asyncio.timeout(1):
                    second = await read_response(reader)
            except TimeoutError:
                second = (0, {}, b"no answer")
            writer.close()
    assert (first[0], first[2]) == (200, b"b GET 0")
    assert (second[0], second[2]) == (200, b"a GET 0")


# -- health checks ---------------------------------------------------------------------------


async def test_one_endpoint_with_an_odd_health_answer_does_not_stop_checks_for_all(
    root: Path, setup: CaSetup
) -> None:
    """Whatever one endpoint answers, the other endpoints go on being checked.

    A first line longer than the check's 16 KiB reader limit raises
    ValueError, which the check does not catch: it ends the checker task of
    the whole upstream, silently, and an endpoint marked unhealthy stays out
    for good.
    """
    odd = {"now": False}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if odd["now"]:
            writer.write(b"HTTP/1.1 200 " + b"x" * 20_000 + b"\r\n\r\n")
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()

    health = {
        "active": {
            "kind": "http",
            "interval": "50ms",
            "timeout": "1s",
            "unhealthy_threshold": 1,
            "healthy_threshold": 1,
        },
        "panic_threshold": 0,
    }
    async with (
        asyncio.timeout(6),
        backends(root, setup, "a") as pairs,
        raw_backend(root, setup, answer) as odd_address,
    ):
        a, a_address = pairs[0]
        a.healthy = False
        async with client_agent(
            root, setup, endpoints=[a_address, odd_address], health=health
        ) as agent:
            assert await eventually(lambda: state(agent, a_address) == "unhealthy", 2)
            odd["now"] = True
            await asyncio.sleep(0.3)  # a few rounds of checks
            a.healthy = True
            back = await eventually(lambda: state(agent, a_address) == "healthy", 1)
    assert back, "a passes its checks again but is never taken back"


# -- reload --------------------------------------------------------------------------------


async def test_a_reload_that_touches_a_dns_source_keeps_its_endpoints_through_a_dns_outage(
    root: Path, setup: CaSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Changing only `refresh` must not empty the upstream until the next DNS answer.

    The reload starts a watch for the new source and drops what the old one
    published; while DNS fails (or until it first answers, for any source)
    the upstream has no endpoint and every request gets 503, although the
    docs promise that "a failed or empty answer keeps the last set".
    """
    dns_down = False

    async def resolve(host: str, port: int) -> frozenset[Endpoint]:
        if dns_down:
            raise OSError("DNS is down")
        return await discovery.resolve_addresses(host, port)

    real_watch = discovery.watch

    async def watch(source: Source, publish: discovery.Publish) -> None:
        await real_watch(source, publish, resolve=resolve)

    monkeypatch.setattr(discovery, "watch", watch)
    async with asyncio.timeout(5), backends(root, setup, "a") as pairs:
        port = pairs[0][1].rsplit(":", 1)[1]
        dns = {"name": f"localhost:{port}", "refresh": "1s"}
        async with client_agent(root, setup, dns=dns) as agent:
            assert await eventually(
                lambda: metric(agent, "upstream_endpoints", state="healthy") >= 1, 2
            )
            get = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
            assert await exchange(listener(agent), get) == [(200, b"a GET 0")]
            dns_down = True
            reloaded = outbound(dns={**dns, "refresh": "2s"})
            raw = agent_yaml(root, "frontend", outbound=reloaded, limits=SHORT_DRAIN)
            await agent.reconfigure(agent_config.parse(raw, base=root))
            await asyncio.sleep(0.1)  # the new watch's first lookup has failed
            after = await exchange(listener(agent), get)
    assert after == [(200, b"a GET 0")]


# -- slow and silent apps ------------------------------------------------------------------------


async def test_an_idle_app_connection_to_an_http_outbound_is_closed_after_idle_timeout(
    root: Path, setup: CaSetup
) -> None:
    """`limits.idle_timeout` "aborts connections with no bytes either way" (docs/agent.md).

    The TCP outbound's relay does; the HTTP outbound's app connections have no
    timer at all, so one that goes quiet (or half-sends a request head) holds
    a slot of `max_connections` and the drain forever.
    """
    async with asyncio.timeout(5), backends(root, setup, "a") as pairs:
        raw = agent_yaml(
            root,
            "frontend",
            outbound=outbound(endpoints=[pairs[0][1]]),
            limits={**SHORT_DRAIN, "idle_timeout": "200ms"},
        )
        async with running_agent(raw, local_sign(setup), root) as agent:
            host, port = listener(agent).rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"GET / HTTP/1.1\r\nHost: back")  # and nothing more
            try:
                async with asyncio.timeout(1.5):  # the relay's bound: 1-2x the timeout
                    closed = await reader.read() == b""
            except TimeoutError:
                closed = False
            writer.close()
    assert closed


async def test_a_tcp_retry_holds_its_budget_slot_while_it_dials(root: Path, setup: CaSetup) -> None:
    """TCP mode: a retry counts against the budget until its dial ends, as in HTTP mode.

    The listener takes the slot and gives it back at once ("the retry is the
    next dial, which starts now"), so retries in flight are always 0 and the
    budget never limits anything: in a connect-failure storm every
    connection retries `max` times.
    """
    refused = f"127.0.0.1:{free_port()}"  # nobody listens: connection refused
    with black_hole() as hole:
        upstream = {
            "protocol": "tcp",
            "endpoints": [refused, hole],  # round robin: refused, then the retry to the hole
            "timeouts": {"connect": "2s"},
            "retries": {"budget": {"percent": 0, "min_concurrency": 1}},  # one retry at a time
        }
        async with asyncio.timeout(5), client_agent(root, setup, **upstream) as agent:
            host, port = listener(agent).rsplit(":", 1)
            first = await asyncio.open_connection(host, int(port))
            assert await eventually(lambda: metric(agent, "upstream_retries_total") == 1, 1)
            # The first connection's retry is dialling the hole; a second one is refused
            # too and finds the budget's one slot taken: it is closed, not retried.
            _, second = await asyncio.open_connection(host, int(port))

            def overflows() -> float:
                return metric(agent, "upstream_overflows_total", reason="retry_budget")

            # Refused, or (unbounded) retried too: one or the other, right after its first try.
            await eventually(
                lambda: overflows() == 1 or metric(agent, "upstream_retries_total") == 2, 1
            )
            denied = overflows()
            first[1].close()
            second.close()
    assert denied == 1


async def test_a_tcp_connection_with_no_endpoint_left_counts_no_retry(
    root: Path, setup: CaSetup
) -> None:
    """`outrider_upstream_retries_total` counts retries made, not retries merely allowed.

    TCP mode counts one (and takes a budget slot) before it looks for an
    endpoint to retry on; with none left, no retry happens but one is counted.
    """
    refused = f"127.0.0.1:{free_port()}"
    upstream = {"protocol": "tcp", "endpoints": [refused]}
    async with asyncio.timeout(5), client_agent(root, setup, **upstream) as agent:
        host, port = listener(agent).rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        assert await reader.read() == b""  # refused: nothing else to try
        writer.close()
        retries = metric(agent, "upstream_retries_total")
    assert retries == 0


async def test_an_app_that_pipelines_and_never_reads_cannot_make_the_agent_buffer_without_bound(
    root: Path, setup: CaSetup
) -> None:
    """Flow control holds across requests, not only within one response.

    pause_writing pauses the upstream connection in use; but when the write
    that crosses the high-water mark completes a response, there is no
    connection in use to pause, and the next request's connection reads
    freely: every later response piles up in the agent's buffer toward the
    app (the transport stays "paused", so pause_writing is not called again).
    """
    body = b"x" * 16_000
    answered = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal answered
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            answered += 1

    loop = asyncio.get_running_loop()
    async with (
        asyncio.timeout(8),
        raw_backend(root, setup, answer) as address,
        client_agent(root, setup, endpoints=[address]) as agent,
    ):
        host, port = listener(agent).rsplit(":", 1)
        with socket.socket() as app:
            app.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
            app.setblocking(False)
            await loop.sock_connect(app, (host, int(port)))

            def accepted() -> OutboundHttp | None:  # the app's connection to the outbound
                for connection in agent.connections._open:
                    if isinstance(connection, OutboundHttp) and connection.client is not None:
                        return connection
                return None

            assert await eventually(lambda: accepted() is not None, 1)
            outbound_connection = accepted()
            assert outbound_connection is not None and outbound_connection.client is not None
            requests = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n" * 600  # 9.6 MB of answers
            await loop.sock_sendall(app, requests)
            # Bounded, the backend stalls long before the last; unbounded, it answers them all.
            await eventually(lambda: answered == 600, 1.5)
            buffered = outbound_connection.client.get_write_buffer_size()
    assert buffered < 1_000_000, f"{buffered} bytes held for an app that reads nothing"


# -- the pool and the SVID -----------------------------------------------------------------------


async def test_idle_pooled_connections_close_when_the_svid_rotates(
    root: Path, setup: CaSetup
) -> None:
    """docs/upstreams.md: idle pooled connections close "when the SVID rotates".

    They are only skipped (and closed) when a request next asks the pool for
    their endpoint; until then, or until pool.idle_timeout, each one stays
    open on the old SVID and holds a connection at the peer.
    """
    rotations = {"result": "success"}
    async with asyncio.timeout(5), backend_agents(root, setup, "a") as [(_, backend)]:
        address = backend.bound["inbound[0]"]
        async with client_agent(root, setup, endpoints=[address]) as agent:
            get = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
            assert await exchange(listener(agent), get) == [(200, b"a GET 0")]
            assert await eventually(lambda: len(backend.connections) == 1, 1)  # pooled
            before = sample(agent, "outrider_svid_rotations_total", **rotations)
            agent.identity.renew_now()
            assert await eventually(
                lambda: sample(agent, "outrider_svid_rotations_total", **rotations) > before,
                2,
            )
            closed = await eventually(lambda: len(backend.connections) == 0, 2)
    assert closed, "the connection made under the old SVID is still open"


async def test_a_connection_to_an_endpoint_that_left_is_not_pooled_when_its_request_ends(
    root: Path, setup: CaSetup
) -> None:
    """docs/upstreams.md: endpoints that leave "lose their idle pooled connections".

    A connection busy when its endpoint leaves is put back in the pool when
    its request ends, and stays open there until pool.idle_timeout (60 s by
    default), holding a connection at a peer that is no longer a member.
    """
    async with asyncio.timeout(5), backend_agents(root, setup, "a", "b") as pairs:
        (a, a_agent), (_, b_agent) = pairs
        a_address, b_address = a_agent.bound["inbound[0]"], b_agent.bound["inbound[0]"]
        async with client_agent(root, setup, endpoints=[a_address, b_address]) as agent:
            slow = b"GET /slow/0.3 HTTP/1.1\r\nHost: backend\r\n\r\n"
            in_flight = asyncio.create_task(exchange(listener(agent), slow))  # to a
            assert await eventually(lambda: a.hits == 1, 1)
            raw = agent_yaml(
                root, "frontend", outbound=outbound(endpoints=[b_address]), limits=SHORT_DRAIN
            )
            await agent.reconfigure(agent_config.parse(raw, base=root))
            assert await in_flight == [(200, b"a GET 0")]  # it finishes, as promised
            closed = await eventually(lambda: len(a_agent.connections) == 0, 1)
    assert closed, "the connection to a, which left, is still open (pooled)"
