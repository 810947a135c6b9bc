"""HTTP/2 and gRPC outbound through real agents: per-call balancing, weights, retries,
deadlines, and pooled h2 connections.

The app side is one h2c connection to a `protocol: grpc` (or `http2`) outbound
listener, as one grpcio channel would be; every backend is an h2c app
(tests/h2backend.py) behind its own agent's `protocol: http2` inbound, all
in this test's event loop. Each backend says its name in `x-backend`. The
grpcio acceptance test (tests/e2e/test_grpc.py) runs real grpcio clients and
servers as processes; here grpcio appears once, for a bidirectional stream.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import queue
from collections.abc import AsyncIterator, Iterator
from concurrent import futures
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import grpc
import pytest
from h2.errors import ErrorCodes

from agent.adapters import h2client
from agent.adapters.listeners import OutboundListener
from agent.app import Agent
from agent.core.grpc import Code
from tests.h2backend import (
    Answer,
    GoAway,
    H2Backend,
    Reply,
    Request,
    Reset,
    exchange,
    grpc_error,
    grpc_head,
    h2_backend,
)
from tests.mesh import agent_yaml, eventually, inbound, local_sign, running_agent, sample, workload
from tests.support import CaSetup

BACKEND = str(workload("backend"))


@asynccontextmanager
async def backend_agents(
    setup: CaSetup,
    *names: str,
    replies: dict[str, Reply] | None = None,
    early: frozenset[str] = frozenset(),
) -> AsyncIterator[list[tuple[H2Backend, Agent]]]:
    """Each h2c app behind its own agent (`protocol: http2` inbound); those in `early`
    answer on the request head."""
    async with AsyncExitStack() as stack:
        pairs = []
        for name in names:
            reply = (replies or {}).get(name)
            app = await stack.enter_async_context(h2_backend(name, reply, early=name in early))
            raw = agent_yaml(setup.root, "backend", inbound=inbound(app.port, protocol="http2"))
            agent = await stack.enter_async_context(
                running_agent(raw, local_sign(setup), setup.root)
            )
            pairs.append((app, agent))
        yield pairs


@asynccontextmanager
async def backends(
    setup: CaSetup,
    *names: str,
    replies: dict[str, Reply] | None = None,
    early: frozenset[str] = frozenset(),
) -> AsyncIterator[list[tuple[H2Backend, str]]]:
    """Each h2c app and its agent's inbound address."""
    async with backend_agents(setup, *names, replies=replies, early=early) as pairs:
        yield [(app, agent.bound["inbound[0]"]) for app, agent in pairs]


@asynccontextmanager
async def client_agent(setup: CaSetup, **upstream: Any) -> AsyncIterator[Agent]:
    item = {
        "name": "backend",
        "listen": "127.0.0.1:0",
        "protocol": "grpc",
        "server_ids": [BACKEND],
        **upstream,
    }
    raw = agent_yaml(setup.root, "frontend", outbound=[item])
    async with running_agent(raw, local_sign(setup), setup.root) as agent:
        yield agent


@asynccontextmanager
async def channel(agent: Agent) -> AsyncIterator[h2client.H2ClientConnection]:
    """One h2c connection to the outbound, as one grpcio channel is."""
    host, port = agent.bound["outbound[backend]"].rsplit(":", 1)
    connection = await h2client.connect(host, int(port))
    try:
        yield connection
    finally:
        connection.close()


async def calls(
    connection: h2client.H2ClientConnection, count: int, concurrency: int = 20, **extra: str
) -> list[Any]:
    """`count` unary calls on one connection, `concurrency` at a time."""
    results: list[Any] = []

    async def worker(share: int) -> None:
        for _ in range(share):
            results.append(await exchange(connection, grpc_head(**extra)))

    shares = [count // concurrency + (i < count % concurrency) for i in range(concurrency)]
    await asyncio.gather(*(worker(share) for share in shares))
    return results


def metric(agent: Agent, name: str, **labels: str) -> float:
    return sample(agent, f"outrider_{name}", upstream="backend", **labels)


def ok(answered: Any) -> bool:
    return bool(answered.status == 200 and answered.grpc_status == 0)


async def test_one_channels_calls_spread_evenly_over_three_backends_on_pooled_connections(
    setup: CaSetup,
) -> None:
    async with (
        backends(setup, "a", "b", "c") as pairs,
        client_agent(setup, endpoints=[address for _, address in pairs]) as agent,
        channel(agent) as connection,
    ):
        results = await calls(connection, 300)
        assert all(map(ok, results))
        spread = collections.Counter(r.backend for r in results)
        assert all(95 <= spread[name] <= 105 for name in "abc"), spread
        # One h2 connection per backend agent, every other call multiplexed on it.
        assert metric(agent, "upstream_connections_total", kind="new") == 3
        assert metric(agent, "upstream_connections_total", kind="reused") == 297
        assert metric(agent, "upstream_requests_total", code="200") == 300
        assert metric(agent, "upstream_grpc_requests_total", grpc_status="0") == 300
        # Each call's duration observed once (the h2 path's Counted.request).
        assert metric(agent, "upstream_request_duration_seconds_count") == 300
        assert metric(agent, "upstream_request_duration_seconds_bucket", le="+Inf") == 300
        assert [app.connections for app, _ in pairs] == [1, 1, 1]  # the backend agents pool too


async def test_calls_follow_the_subset_weights(setup: CaSetup) -> None:
    async with (
        backends(setup, "v1", "v2") as pairs,
        client_agent(
            setup,
            subsets=[
                {"name": "v1", "weight": 90, "endpoints": [pairs[0][1]]},
                {"name": "v2", "weight": 10, "endpoints": [pairs[1][1]]},
            ],
        ) as agent,
        channel(agent) as connection,
    ):
        results = await calls(connection, 500, concurrency=25)
    spread = collections.Counter(r.backend for r in results)
    assert all(map(ok, results))
    assert 0.84 <= spread["v1"] / 500 <= 0.96, spread  # 4.5 standard deviations


async def test_unavailable_is_retried_on_another_backend(setup: CaSetup) -> None:
    async def unavailable(request: Request) -> Answer:
        return grpc_error(Code.UNAVAILABLE, "shutting down")

    async with (
        backends(setup, "down", "up", replies={"down": unavailable}) as pairs,
        client_agent(setup, endpoints=[address for _, address in pairs]) as agent,
        channel(agent) as connection,
    ):
        results = await calls(connection, 40, concurrency=4)
        assert all(map(ok, results)) and {r.backend for r in results} == {"up"}
        # Each of its UNAVAILABLEs was retried, until outlier detection took it out after
        # 5 in a row; calls already on their way to it then (3 more at most, 4 at a time)
        # got theirs too, and were retried as well.
        down = len(pairs[0][0].requests)
        assert metric(agent, "upstream_retries_total") == down and 5 <= down <= 5 + 3
        assert metric(agent, "upstream_ejections_total") == 1


async def test_a_refused_stream_and_a_goaway_are_retried_for_any_method(setup: CaSetup) -> None:
    turn = iter(range(1000))

    async def refusing(request: Request) -> Reset | GoAway:
        return GoAway() if next(turn) % 2 else Reset()

    async with (
        backends(setup, "refusing", "up", replies={"refusing": refusing}) as pairs,
        client_agent(setup, endpoints=[address for _, address in pairs]) as agent,
        channel(agent) as connection,
    ):
        results = await calls(connection, 20, concurrency=2)
    # The backend agent passes the app's refusal on as UNAVAILABLE, retried here.
    assert all(map(ok, results)) and {r.backend for r in results} == {"up"}


async def test_a_call_an_app_reset_before_answering_is_not_replayed(setup: CaSetup) -> None:
    """An app that resets a call with INTERNAL_ERROR may have acted on it: its agent answers
    INTERNAL (what a gRPC client reads from that reset), never UNAVAILABLE, which the
    caller's agent would retry on another backend for any call."""

    async def failing(request: Request) -> Reset:
        return Reset(ErrorCodes.INTERNAL_ERROR)

    async with (
        backends(setup, "a", "b", replies={"a": failing, "b": failing}) as pairs,
        client_agent(setup, endpoints=[address for _, address in pairs]) as agent,
        channel(agent) as connection,
    ):
        answered = await exchange(connection, grpc_head())
        assert metric(agent, "upstream_retries_total") == 0
    assert answered.status == 200 and answered.grpc_status == Code.INTERNAL
    assert sum(len(app.requests) for app, _ in pairs) == 1


async def test_a_killed_backend_loses_no_call(setup: CaSetup) -> None:
    async with (
        backends(setup, "a", "b", "c") as pairs,
        client_agent(setup, endpoints=[address for _, address in pairs]) as agent,
        channel(agent) as connection,
    ):
        first = await calls(connection, 60)
        victim = pairs[0][0]
        victim.kill()
        victim.reply = _never_again  # as good as gone: nothing it gets is answered well
        # Three at a time: within the retry budget's minimum, each retry is granted.
        after = await calls(connection, 120, concurrency=3)
    assert [r for r in first + after if not ok(r)] == []
    assert {r.backend for r in after} == {"b", "c"}


async def _never_again(request: Request) -> Answer:
    return grpc_error(Code.UNAVAILABLE, "killed")


async def test_a_deadline_is_passed_on_reduced_and_answered_deadline_exceeded(
    setup: CaSetup,
) -> None:
    async def slow(request: Request) -> Answer:
        await asyncio.sleep(float(request.header(b"x-sleep") or b"0"))
        return Answer(
            [(b":status", b"200"), (b"content-type", b"application/grpc")],
            b"",
            [(b"grpc-status", b"0"), (b"x-timeout", request.header(b"grpc-timeout") or b"")],
        )

    async with (
        backends(setup, "slow", replies={"slow": slow}) as pairs,
        client_agent(setup, endpoints=[pairs[0][1]]) as agent,
        channel(agent) as connection,
    ):
        quick = await exchange(connection, grpc_head(grpc_timeout="2S", x_sleep="0"))
        late = await exchange(connection, grpc_head(grpc_timeout="200m", x_sleep="1"))
        count = metric(agent, "upstream_grpc_requests_total", grpc_status="4")
    assert quick.grpc_status == 0
    passed_on = quick.header(b"x-timeout") or b""
    assert passed_on.endswith(b"m") and 0 < int(passed_on[:-1]) <= 2000
    assert late.status == 200 and late.grpc_status == Code.DEADLINE_EXCEEDED
    assert count == 1


async def test_a_rotation_retires_pooled_connections_for_new_ones(setup: CaSetup) -> None:
    async with (
        backends(setup, "a") as pairs,
        client_agent(setup, endpoints=[pairs[0][1]]) as agent,
        channel(agent) as connection,
    ):
        assert all(map(ok, await calls(connection, 10, concurrency=2)))
        listener = next(iter(agent.outbound.values()))
        assert isinstance(listener, OutboundListener)
        live = listener.live
        (old,) = live.h2pool.connections[next(iter(live.h2pool.connections))]
        agent.identity.install(await agent.identity.renew())
        assert all(map(ok, await calls(connection, 10, concurrency=2)))
        assert metric(agent, "upstream_connections_total", kind="new") == 2
        assert await eventually(lambda: old.closed)


async def test_a_call_on_an_upstream_a_reload_closed_leaves_no_connection_pooled(
    setup: CaSetup,
) -> None:
    """A channel opened before a reload removed its upstream keeps going under the old
    config; a call that upstream had not carried yet is served, and the connection dialled
    for it closes with the call, as the closed upstream pools nothing (its h2 pool is
    built with the first call: built closed once the upstream is)."""
    async with (
        backend_agents(setup, "a") as [(_, backend)],
        client_agent(setup, endpoints=[backend.bound["inbound[0]"]]) as agent,
        channel(agent) as connection,
    ):
        listener = next(iter(agent.outbound.values()))
        assert isinstance(listener, OutboundListener)
        await agent.reconfigure(dataclasses.replace(agent.config, outbound=()))
        assert not listener.live.running
        assert all(map(ok, await calls(connection, 1, concurrency=1)))
        assert await eventually(
            lambda: sample(backend, "outrider_connections_active", direction="inbound") == 0
        )
        assert len(listener.live.h2pool) == 0


async def test_plain_http2_requests_get_answers_and_json_refusals(setup: CaSetup) -> None:
    head = [
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b":authority", b"backend"),
        (b":path", b"/items"),
        (b"x-forwarded-client-cert", b"By=spiffe://example.org/ns/demo/sa/admin"),
    ]
    async with (
        backends(setup, "a") as pairs,
        client_agent(setup, protocol="http2", endpoints=[pairs[0][1]]) as agent,
        channel(agent) as connection,
    ):
        answered = await exchange(connection, head, b"")
    assert (answered.status, answered.body) == (200, b"a")
    (request,) = pairs[0][0].requests
    # The app's own claim never reaches the backend: its agent says who called.
    claims = [v for n, v in request.headers if n == b"x-forwarded-client-cert"]
    assert len(claims) == 1 and b"sa/frontend" in claims[0] and b"sa/admin" not in claims[0]
    async with (
        client_agent(setup, protocol="http2", endpoints=["127.0.0.1:1"]) as agent,
        channel(agent) as connection,
    ):
        refused = await exchange(connection, head, b"")
        grpc_refused = await exchange(connection, grpc_head())
        crowded = grpc_head(**{f"x_{i}": "1" for i in range(101)})
        too_many = await exchange(connection, crowded)
        limited = sample(
            agent, "outrider_http2_limits_total", direction="outbound", limit="header_list"
        )
    assert too_many.grpc_status == Code.RESOURCE_EXHAUSTED and limited == 1
    assert refused.status == 503
    assert json.loads(refused.body) == {"error": "upstream_connect_failure"}
    assert grpc_refused.status == 200 and grpc_refused.grpc_status == Code.UNAVAILABLE


async def test_a_wrong_server_id_is_answered_unavailable_and_logged(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """As the TCP and HTTP/1.1 outbounds say it: which ID the endpoint presented."""
    other = "spiffe://example.org/ns/demo/sa/payments"
    async with (
        backends(setup, "a") as pairs,
        client_agent(setup, endpoints=[pairs[0][1]], server_ids=[other]) as agent,
        channel(agent) as connection,
    ):
        refused = await exchange(connection, grpc_head())
    assert refused.status == 200 and refused.grpc_status == Code.UNAVAILABLE
    said = [r.getMessage() for r in caplog.records if r.name == "outrider.agent"]
    assert f"outbound backend: {pairs[0][1]} presented {BACKEND}, not an ID of the upstream" in said


async def test_a_header_name_an_app_server_folds_is_refused_before_it_leaves(
    setup: CaSetup,
) -> None:
    """`x_role` is `HTTP_X_ROLE` to a CGI/WSGI server, as `x-role` is: as on an HTTP/1.1
    outbound, a call naming it is refused here (headers_with_underscores: reject), never
    sent to an upstream that may not screen it."""
    async with (
        backend_agents(setup, "a") as pairs,
        client_agent(setup, endpoints=[pairs[0][1].bound["inbound[0]"]]) as agent,
        channel(agent) as connection,
    ):
        refused = await exchange(connection, [*grpc_head(), (b"x_role", b"admin")])
        allowed = await exchange(connection, [*grpc_head(), (b"x-role", b"viewer")])
        backend, frontend = pairs[0][1], str(workload("frontend"))
        answered = {
            code: sample(
                backend,
                "outrider_grpc_requests_total",
                direction="inbound",
                peer_id=frontend,
                grpc_status=str(code),
            )
            for code in (Code.OK, Code.INTERNAL)
        }
    assert refused.status == 200 and refused.grpc_status == Code.INTERNAL
    assert b"underscore" in (refused.header(b"grpc-message") or b"")
    assert ok(allowed)
    assert answered == {Code.OK: 1, Code.INTERNAL: 0}  # the backend's agent never saw it


async def test_large_streamed_bodies_go_both_ways_and_are_not_replayed(setup: CaSetup) -> None:
    async def unavailable(request: Request) -> Answer:
        return grpc_error(Code.UNAVAILABLE, "try elsewhere")

    big = bytes(range(256)) * 4096  # 1 MiB: past REPLAY_BYTES and every window
    async with (
        backends(setup, "down", "up", replies={"down": unavailable}) as pairs,
        client_agent(setup, endpoints=[address for _, address in pairs]) as agent,
        channel(agent) as connection,
    ):
        results = [await exchange(connection, grpc_head(), big) for _ in range(2)]
    # Round robin gives each backend one: the echo comes back whole; the refusal cannot be
    # retried (the body was sent on, not held), so the app gets it.
    echoed = [r for r in results if r.backend == "up"]
    assert len(echoed) == 1 and echoed[0].body == big and echoed[0].grpc_status == 0
    assert {r.grpc_status for r in results} == {0, Code.UNAVAILABLE}
    assert len(pairs[0][0].requests) == 1 and pairs[0][0].requests[0].body == big


async def test_a_call_the_app_cancels_is_cancelled_upstream_and_leaves_nothing_held(
    setup: CaSetup,
) -> None:
    async with (
        backend_agents(setup, "a") as pairs,
        client_agent(setup, endpoints=[pairs[0][1].bound["inbound[0]"]]) as agent,
        channel(agent) as connection,
    ):
        backend, frontend = pairs[0][1], str(workload("frontend"))
        listener = next(iter(agent.outbound.values()))
        assert isinstance(listener, OutboundListener)
        live = listener.live
        stream = connection.open(grpc_head())
        await stream.send(b"\0\0\0\0\x10half a message")  # and never the rest
        pool = live.h2pool

        def upstream_streams() -> int:
            return sum(len(c.streams) for cs in pool.connections.values() for c in cs)

        assert await eventually(lambda: upstream_streams() == 1)
        stream.reset()
        assert await eventually(lambda: upstream_streams() == 0)
        assert live.breaker.in_use("max_requests") == 0
        assert live.budget.requests == 0 and set(live.core.load.values()) == {0}
        # Counted on both sides as Envoy records a client's reset: CANCELLED, and 499 for
        # the HTTP counters (the client went away before an answer).
        assert metric(agent, "upstream_grpc_requests_total", grpc_status="1") == 1
        assert metric(agent, "upstream_requests_total", code="499") == 1
        inbound = {"direction": "inbound", "peer_id": frontend}

        def backend_counted() -> bool:
            return (
                sample(backend, "outrider_grpc_requests_total", grpc_status="1", **inbound),
                sample(backend, "outrider_requests_total", code="499", **inbound),
            ) == (1, 1)

        assert await eventually(backend_counted)
        assert all(map(ok, await calls(connection, 3, concurrency=1)))  # all still works


async def test_past_max_requests_a_call_is_answered_unavailable_at_once(setup: CaSetup) -> None:
    gate = asyncio.Event()

    async def held(request: Request) -> Answer:
        await gate.wait()
        return Answer(
            [(b":status", b"200"), (b"content-type", b"application/grpc")],
            b"",
            [(b"grpc-status", b"0")],
        )

    async with (
        backends(setup, "a", replies={"a": held}) as pairs,
        client_agent(setup, endpoints=[pairs[0][1]], circuit_breaker={"max_requests": 1}) as agent,
        channel(agent) as connection,
    ):
        first = asyncio.create_task(exchange(connection, grpc_head()))
        assert await eventually(lambda: len(pairs[0][0].requests) == 1)
        second = await exchange(connection, grpc_head())
        gate.set()
        assert ok(await first)
        assert second.grpc_status == Code.UNAVAILABLE
        assert (second.header(b"grpc-message") or b"").startswith(b"overflow")
        assert metric(agent, "upstream_overflows_total", reason="max_requests") == 1


async def test_a_backend_agent_that_drains_finishes_its_calls_and_loses_none(
    setup: CaSetup,
) -> None:
    async def slow(request: Request) -> Answer:
        await asyncio.sleep(0.05)
        name = (b"x-backend", request.header(b"x-name") or b"")
        head = [(b":status", b"200"), (b"content-type", b"application/grpc"), name]
        return Answer(head, b"", [(b"grpc-status", b"0")])

    async with (
        backend_agents(setup, "a", "b", replies={"a": slow, "b": slow}) as pairs,
        client_agent(setup, endpoints=[agent.bound["inbound[0]"] for _, agent in pairs]) as agent,
        channel(agent) as connection,
    ):
        # Three at a time: the calls that find its listener gone are all retried within the
        # retry budget's minimum (more at once would be over budget, and answered).
        running = asyncio.create_task(calls(connection, 120, concurrency=3))
        assert await eventually(lambda: len(pairs[0][0].requests) >= 6)
        await pairs[0][1].drain()  # GOAWAY: its calls in flight finish, new ones go to b
        results = await running
    assert [r for r in results if not ok(r)] == []
    assert len(pairs[1][0].requests) > 60


async def test_a_streaming_call_refused_midway_is_replayed_whole_on_the_next_backend(
    setup: CaSetup,
) -> None:
    async def unavailable(request: Request) -> Answer:
        return grpc_error(Code.UNAVAILABLE, "draining")

    async with (
        backends(
            setup, "down", "up", replies={"down": unavailable}, early=frozenset({"down"})
        ) as pairs,
        client_agent(
            setup,  # every call goes to `down` first; `up` is where a retry falls back to
            subsets=[
                {"name": "first", "weight": 1, "endpoints": [pairs[0][1]]},
                {"name": "fallback", "weight": 0, "endpoints": [pairs[1][1]]},
            ],
        ) as agent,
        channel(agent) as connection,
    ):
        stream = connection.open(grpc_head())
        await stream.send(b"\0\0\0\0\x05first")
        # `down` refuses on the head: the retry replays what was sent so far ...
        assert await eventually(lambda: len(pairs[0][0].requests) == 1)
        assert await eventually(lambda: metric(agent, "upstream_retries_total") == 1)
        await stream.send(b"\0\0\0\0\x06second", end=True)  # ... and goes on with the rest
        answered = []
        async for event in stream:
            answered.append(event)
            if isinstance(event, h2client.Data):
                stream.consumed(event.flow)
        stream.release()
    trailers = [e for e in answered if isinstance(e, h2client.Trailers)]
    assert trailers and (b"grpc-status", b"0") in trailers[0].headers
    (request,) = pairs[1][0].requests
    assert request.body == b"\0\0\0\0\x05first\0\0\0\0\x06second"


async def test_a_grpcio_bidi_stream_is_relayed_message_by_message(setup: CaSetup) -> None:
    """Each message of a bidirectional call comes back before the next is sent: neither
    agent holds a streaming call's body back until it ends."""

    def chat(messages: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for message in messages:
            yield b"echo:" + message

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.stream_stream_rpc_method_handler(chat)
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("demo.Greeter", {"Chat": handler})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    raw = agent_yaml(setup.root, "backend", inbound=inbound(port, protocol="grpc"))
    try:
        async with (
            running_agent(raw, local_sign(setup), setup.root) as backend,
            client_agent(setup, endpoints=[backend.bound["inbound[0]"]]) as agent,
        ):
            address = agent.bound["outbound[backend]"]

            def converse() -> list[bytes]:
                sent: queue.Queue[bytes | None] = queue.Queue()
                with grpc.insecure_channel(address) as channel:
                    call = channel.stream_stream("/demo.Greeter/Chat")
                    answers = call(iter(sent.get, None), timeout=10)
                    heard = []
                    for i in range(20):
                        sent.put(b"m%d" % i)
                        heard.append(next(answers))  # before the next message is sent
                    sent.put(None)
                    assert list(answers) == []
                    return heard

            heard = await asyncio.get_running_loop().run_in_executor(None, converse)
    finally:
        server.stop(0)
    assert heard == [b"echo:m%d" % i for i in range(20)]


async def test_a_backend_that_reads_nothing_holds_the_app_back_not_the_agents_memory(
    setup: CaSetup,
) -> None:
    async with (
        backend_agents(setup, "stalled") as pairs,
        client_agent(setup, endpoints=[pairs[0][1].bound["inbound[0]"]]) as agent,
        channel(agent) as connection,
    ):
        pairs[0][0].stall = True
        stream = connection.open(grpc_head())
        sent = 0

        async def upload() -> None:
            nonlocal sent
            for _ in range(1024):  # 16 MiB at most
                await stream.send(b"x" * 16384)
                sent += 16384

        uploading = asyncio.create_task(upload())
        previous = -1
        while sent != previous:  # until the app can send no more: every window is shut
            previous = sent
            await asyncio.sleep(0.2)
        blocked = not uploading.done()
        stream.release()
        uploading.cancel()
    # Each hop holds what the windows it advertised let in, and a chunk: no more.
    assert blocked and 0 < sent <= 512 * 1024, sent  # 176 KiB when written


async def test_an_http1_app_on_a_grpc_outbound_is_told_to_speak_h2c(
    setup: CaSetup, caplog: pytest.LogCaptureFixture
) -> None:
    """The mirror of the GOAWAY an `http` port sends an h2 preface: an app speaking
    HTTP/1.1 to an h2c-only port gets an HTTP/1.1 answer it can show, not h2's SETTINGS
    and a protocol error; counted and logged once a while."""
    async with client_agent(setup, endpoints=["127.0.0.1:1"]) as agent:
        host, port = agent.bound["outbound[backend]"].rsplit(":", 1)
        answers = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /demo.Greeter/SayHello HTTP/1.1\r\nHost: backend\r\n\r\n")
            answers.append(await asyncio.wait_for(reader.read(), 5))
            writer.close()
        refused = sample(
            agent,
            "outrider_connections_refused_total",
            direction="outbound",
            reason="protocol_mismatch",
        )
        async with channel(agent) as connection:  # h2c on the same port is served as ever
            unavailable = await exchange(connection, grpc_head())
    head, _, body = answers[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 ") and answers[1] == answers[0]
    assert json.loads(body) == {
        "error": "protocol_mismatch",
        "detail": "this port is protocol: grpc (HTTP/2 only); the app must speak h2c"
        " (HTTP/2 with prior knowledge), or set appProtocol: http",
    }
    assert refused == 2
    lines = [r for r in caplog.records if "refused an HTTP/1.x request" in r.getMessage()]
    assert len(lines) == 1  # a line a while, not one per connection
    assert unavailable.grpc_status == Code.UNAVAILABLE


async def test_an_http_outbound_pointed_at_an_h2_inbound_relays_what_to_change(
    setup: CaSetup,
) -> None:
    """The outbound says `http`, the peer's port `http2`: the peer's agent answers the
    HTTP/1.1 request with the advice an h2c port gives an HTTP/1.1 app, and this agent
    relays it, so the app shows why instead of a bare upstream reset."""
    async with (
        backend_agents(setup, "a") as pairs,
        client_agent(setup, protocol="http", endpoints=[pairs[0][1].bound["inbound[0]"]]) as agent,
    ):
        host, port = agent.bound["outbound[backend]"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /items HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        refused = sample(
            pairs[0][1],
            "outrider_connections_refused_total",
            direction="inbound",
            reason="protocol_mismatch",
        )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 ")
    assert json.loads(body)["detail"].startswith("this port is protocol: http2 (HTTP/2 only)")
    assert refused == 1
