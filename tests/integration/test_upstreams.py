"""Upstreams over real loopback: balancing, retries, ejection, canary, circuit breaking, pooling.

Every backend is a real HTTP app behind its own agent (`protocol: http`
inbound); the client agent's outbound listener is `protocol: http`, and the
test speaks plain HTTP to it the way an app would, mostly with a new
connection per request (`Connection: close`), as many HTTP clients do.
The kill-and-restart test runs the backend agents as real processes and
SIGKILLs one.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent import config as agent_config
from agent.adapters import upstreams
from agent.app import Agent
from tests.mesh import (
    AgentProcess,
    agent_process,
    agent_yaml,
    echo_server,
    eventually,
    inbound,
    local_sign,
    round_trip,
    running_agent,
    sample,
    workload,
)
from tests.support import CaProcess, CaSetup, free_port

BACKEND = str(workload("backend"))


@pytest.fixture(scope="module")
def root(setup: CaSetup) -> Path:
    return setup.root


# -- backends ------------------------------------------------------------------------------


@dataclass
class App:
    """An HTTP app: answers with its name; a few paths misbehave on purpose."""

    name: str
    port: int = 0
    hits: int = 0
    healthy: bool = True
    failing: int = 0  # answer the next N requests with 503
    paths: collections.Counter[str] = field(default_factory=collections.Counter)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/healthz":
            return web.Response(status=200 if self.healthy else 500)
        self.hits += 1
        self.paths[request.path] += 1
        body = await request.read()
        if request.path.startswith("/slow/"):
            await asyncio.sleep(float(request.path.rsplit("/", 1)[1]))
        if request.path == "/reset" or (request.path == "/reset-post" and request.method == "POST"):
            assert request.transport is not None
            request.transport.abort()  # no response at all
            raise ConnectionResetError
        if self.failing:
            self.failing -= 1
            return web.Response(status=503, text="busy")
        return web.Response(text=f"{self.name} {request.method} {len(body)}")


@asynccontextmanager
async def serving(app: App, port: int = 0) -> AsyncIterator[App]:
    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", app.handle)
    runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    app.port = runner.addresses[0][1]
    try:
        yield app
    finally:
        await runner.cleanup()


@asynccontextmanager
async def backend_agents(
    root: Path, setup: CaSetup, *names: str
) -> AsyncIterator[list[tuple[App, Agent]]]:
    """Each app behind its own in-process agent (`protocol: http`)."""
    async with AsyncExitStack() as stack:
        pairs = []
        for name in names:
            app = await stack.enter_async_context(serving(App(name)))
            raw = agent_yaml(root, "backend", inbound=inbound(app.port, protocol="http"))
            agent = await stack.enter_async_context(running_agent(raw, local_sign(setup), root))
            pairs.append((app, agent))
        yield pairs


@asynccontextmanager
async def backends(root: Path, setup: CaSetup, *names: str) -> AsyncIterator[list[tuple[App, str]]]:
    """Each app and the address of its agent's inbound listener."""
    async with backend_agents(root, setup, *names) as pairs:
        yield [(app, agent.bound["inbound[0]"]) for app, agent in pairs]


def outbound(**upstream: Any) -> list[dict[str, Any]]:
    return [
        {
            "name": "backend",
            "listen": "127.0.0.1:0",
            "protocol": "http",
            "server_ids": [BACKEND],
            **upstream,
        }
    ]


@asynccontextmanager
async def client_agent(root: Path, setup: CaSetup, **upstream: Any) -> AsyncIterator[Agent]:
    raw = agent_yaml(root, "frontend", outbound=outbound(**upstream))
    async with running_agent(raw, local_sign(setup), root) as agent:
        yield agent


def url(agent: Agent, path: str = "/") -> str:
    return f"http://{agent.bound['outbound[backend]']}{path}"


@asynccontextmanager
async def session(*, close: bool = True) -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client; `close`: a new connection and `Connection: close` per request."""
    connector = aiohttp.TCPConnector(force_close=close, limit=0)
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as client:
        yield client


async def get(client: aiohttp.ClientSession, target: str, method: str = "GET") -> tuple[int, str]:
    async with client.request(method, target) as response:
        return response.status, await response.text()


def metric(agent: Agent, name: str, **labels: str) -> float:
    return sample(agent, f"outrider_{name}", upstream="backend", **labels)


def answered(agent: Agent) -> dict[str, float]:
    """upstream_requests_total by code: each request once, as the app was answered, and
    as many durations observed (the histogram's count and its +Inf bucket)."""
    codes = {
        s.labels["code"]: s.value
        for family in agent.metrics.registry.collect()
        for s in family.samples
        if s.name == "outrider_upstream_requests_total" and s.labels["upstream"] == "backend"
    }
    observed = metric(agent, "upstream_request_duration_seconds_count")
    assert observed == metric(agent, "upstream_request_duration_seconds_bucket", le="+Inf")
    assert observed == sum(codes.values()), (observed, codes)
    return codes


# -- balancing and pooling -----------------------------------------------------------------


async def test_round_robin_spreads_requests_evenly_over_three_backends(
    root: Path, setup: CaSetup
) -> None:
    async with backends(root, setup, "a", "b", "c") as pairs:
        endpoints = [address for _, address in pairs]
        async with client_agent(root, setup, endpoints=endpoints) as agent, session() as client:
            answers = [await get(client, url(agent)) for _ in range(30)]
        assert {status for status, _ in answers} == {200}
        assert [app.hits for app, _ in pairs] == [10, 10, 10]
        assert metric(agent, "upstream_requests_total", code="200") == 30


async def test_connection_close_clients_reuse_pooled_upstream_connections(
    root: Path, setup: CaSetup
) -> None:
    """The handshake count stays flat while requests grow: the upstream side is pooled."""
    handshakes = {"direction": "outbound", "result": "ok"}
    async with backends(root, setup, "a") as pairs:
        endpoints = [pairs[0][1]]
        async with client_agent(root, setup, endpoints=endpoints) as agent, session() as client:

            def counted() -> float:
                return sum(
                    s.value
                    for m in agent.metrics.registry.collect()
                    for s in m.samples
                    if s.name == "outrider_tls_handshakes_total"
                    and all(s.labels.get(k) == v for k, v in handshakes.items())
                )

            for _ in range(20):
                assert (await get(client, url(agent)))[0] == 200
            after_20 = counted()
            for _ in range(200):
                assert (await get(client, url(agent)))[0] == 200
            after_220 = counted()
            # Ten at once take up to ten connections; then they are all reused.
            await asyncio.gather(*(get(client, url(agent)) for _ in range(10)))
            await asyncio.gather(*(get(client, url(agent)) for _ in range(10)))
            after_240 = counted()
        assert after_20 == after_220 == 1
        assert after_240 <= 10
        assert metric(agent, "upstream_requests_total", code="200") == 240
        assert metric(agent, "upstream_connections_total", kind="new") == after_240
        assert metric(agent, "upstream_connections_total", kind="reused") == 240 - after_240


async def test_a_canary_split_and_a_blue_green_flip_on_reload(root: Path, setup: CaSetup) -> None:
    async with backends(root, setup, "v1", "v2") as pairs:
        (v1, v1_address), (v2, v2_address) = pairs
        subsets = [
            {"name": "v1", "weight": 90, "endpoints": [v1_address]},
            {"name": "v2", "weight": 10, "endpoints": [v2_address]},
        ]
        async with client_agent(root, setup, subsets=subsets) as agent, session() as client:
            answers = await asyncio.gather(*(get(client, url(agent)) for _ in range(1000)))
            assert {status for status, _ in answers} == {200}
            share = v2.hits / (v1.hits + v2.hits)
            assert 0.07 <= share <= 0.13, (v1.hits, v2.hits)
            # Blue/green: the weights flip on reload; no restart, no listener change.
            listener = agent.bound["outbound[backend]"]
            flipped = [{**subsets[0], "weight": 0}, {**subsets[1], "weight": 100}]
            raw = agent_yaml(root, "frontend", outbound=outbound(subsets=flipped))
            await agent.reconfigure(agent_config.parse(raw, base=root))
            before = v1.hits
            answers = await asyncio.gather(*(get(client, url(agent)) for _ in range(100)))
        assert {status for status, _ in answers} == {200}
        assert v1.hits == before
        assert agent.bound["outbound[backend]"] == listener


async def test_ring_hash_on_a_header_keeps_each_user_on_one_backend(
    root: Path, setup: CaSetup
) -> None:
    async with backends(root, setup, "a", "b", "c") as pairs:
        endpoints = [address for _, address in pairs]
        async with (
            client_agent(
                root, setup, endpoints=endpoints, balancer="ring_hash", hash_on={"header": "x-user"}
            ) as agent,
            session() as client,
        ):
            landed: dict[str, set[str]] = collections.defaultdict(set)
            for i in range(60):
                user = f"user-{i % 12}"
                async with client.get(url(agent), headers={"x-user": user}) as response:
                    landed[user].add((await response.text()).split()[0])
        assert all(len(backends_seen) == 1 for backends_seen in landed.values()), landed
        assert len({next(iter(b)) for b in landed.values()}) > 1  # and users spread out


async def answered_by(listener: str, source: str) -> str:
    """The backend's name in the answer to one HTTP/1.1 request sent as bytes through a
    tcp outbound `listener` ("host:port"), from a connection bound to `source`."""
    host, port = listener.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(
        host.strip("[]"), int(port), local_addr=(source, 0)
    )
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    return answer.split(b"\r\n\r\n", 1)[1].split()[0].decode()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
async def test_ring_hash_on_source_keeps_each_app_address_on_one_backend_over_tcp(
    root: Path, setup: CaSetup, family: str
) -> None:
    """A tcp upstream hashes on the app's address (an IPv6 app's too): each address's
    connections all reach one backend, and addresses spread over them."""
    sources = [f"127.0.0.{i}" for i in range(2, 14)] if family == "ipv4" else ["::1"]
    listen = "127.0.0.1:0" if family == "ipv4" else "[::1]:0"
    async with backends(root, setup, "a", "b", "c") as pairs:
        endpoints = [address for _, address in pairs]
        upstream = {"endpoints": endpoints, "balancer": "ring_hash", "hash_on": "source"}
        async with client_agent(root, setup, protocol="tcp", listen=listen, **upstream) as agent:
            listener = agent.bound["outbound[backend]"]
            landed: dict[str, set[str]] = collections.defaultdict(set)
            for _ in range(3 if family == "ipv4" else 8):
                for source in sources:
                    landed[source].add(await answered_by(listener, source))
    assert all(len(seen) == 1 for seen in landed.values()), landed
    if family == "ipv4":
        assert len({next(iter(seen)) for seen in landed.values()}) > 1  # spread out


# -- retries, timeouts, ejection ---------------------------------------------------------------


async def test_a_503_is_retried_on_another_endpoint(root: Path, setup: CaSetup) -> None:
    async with backends(root, setup, "a", "b") as pairs:
        (a, _), (b, _) = pairs
        a.failing = 1  # round robin tries a first
        endpoints = [address for _, address in pairs]
        retries = {"retry_on": ["connect-failure", "reset", 503]}
        async with (
            client_agent(root, setup, endpoints=endpoints, retries=retries) as agent,
            session() as client,
        ):
            status, _ = await get(client, url(agent))
        assert status == 200
        assert metric(agent, "upstream_retries_total") == 1
        assert answered(agent) == {"200": 1}  # the request once, as the app got it
        assert a.hits + b.hits == 2 and a.hits == b.hits == 1  # the retry went elsewhere


async def test_when_retries_are_spent_the_app_gets_the_upstream_answer(
    root: Path, setup: CaSetup
) -> None:
    async with backends(root, setup, "a") as pairs:
        pairs[0][0].failing = 10
        retries = {"max": 2, "retry_on": [503]}
        async with (
            client_agent(root, setup, endpoints=[pairs[0][1]], retries=retries) as agent,
            session() as client,
        ):
            status, body = await get(client, url(agent))
        # One endpoint: nothing else to try, so its own 503 (body and all) comes back.
        assert (status, body) == (503, "busy")
        assert pairs[0][0].hits == 1
        assert answered(agent) == {"503": 1}


async def test_a_reset_is_retried_for_get_but_not_for_post(root: Path, setup: CaSetup) -> None:
    async with backends(root, setup, "a", "b") as pairs:
        endpoints = [address for _, address in pairs]
        async with client_agent(root, setup, endpoints=endpoints) as agent, session() as client:
            get_status, _ = await get(client, url(agent, "/reset"))
            hits_after_get = sum(app.hits for app, _ in pairs)
            post_status, post_body = await get(client, url(agent, "/reset-post"), "POST")
            hits_after_post = sum(app.hits for app, _ in pairs)
        # GET: tried on both (each resets), so 3 tries are not possible with 2 endpoints.
        assert hits_after_get == 2 and get_status == 502
        # POST is not idempotent: one try, and the reset is reported, not replayed.
        assert hits_after_post - hits_after_get == 1
        assert post_status == 502 and "upstream_reset" in post_body
        assert answered(agent) == {"502": 2}


async def test_a_per_try_timeout_moves_on_and_a_request_timeout_answers_504(
    root: Path, setup: CaSetup
) -> None:
    async with backends(root, setup, "a", "b") as pairs:
        endpoints = [address for _, address in pairs]
        timeouts = {"per_try": "200ms", "request": "1s"}
        retries = {"retry_on": ["timeout"]}
        async with (
            client_agent(
                root, setup, endpoints=endpoints, timeouts=timeouts, retries=retries
            ) as agent,
            session() as client,
        ):
            started = time.monotonic()
            status, body = await get(client, url(agent, "/slow/5"))
            took = time.monotonic() - started
        # Both endpoints time out per try (2 x 200 ms): then nothing is left to try.
        assert status == 504 and "upstream_timeout" in body, body
        assert 0.35 < took < 0.9
        assert metric(agent, "upstream_retries_total") == 1
        assert answered(agent) == {"504": 1}
        async with (
            client_agent(root, setup, endpoints=endpoints, timeouts={"request": "300ms"}) as agent,
            session() as client,
        ):
            started = time.monotonic()
            status, body = await get(client, url(agent, "/slow/5"))
            took = time.monotonic() - started
        assert status == 504 and "upstream_timeout" in body
        assert 0.25 < took < 2.0


async def test_active_http_checks_take_a_failing_backend_out_and_back(
    root: Path, setup: CaSetup
) -> None:
    async with backends(root, setup, "a", "b") as pairs:
        (a, _), (b, _) = pairs
        b.healthy = False
        endpoints = [address for _, address in pairs]
        health = {
            "active": {
                "kind": "http",
                "path": "/healthz",
                "interval": "50ms",
                "timeout": "1s",
                "unhealthy_threshold": 2,
                "healthy_threshold": 1,
            }
        }
        async with (
            client_agent(root, setup, endpoints=endpoints, health=health) as agent,
            session() as client,
        ):
            assert await eventually(
                lambda: metric(agent, "upstream_endpoints", state="unhealthy") == 1, 3
            )
            for _ in range(20):
                assert (await get(client, url(agent)))[0] == 200
            assert (a.hits, b.hits) == (20, 0)
            b.healthy = True
            assert await eventually(
                lambda: metric(agent, "upstream_endpoints", state="healthy") == 2, 3
            )
            for _ in range(20):
                assert (await get(client, url(agent)))[0] == 200
        assert b.hits == 10


async def test_dns_discovery_finds_the_backend_by_name(root: Path, setup: CaSetup) -> None:
    async with backends(root, setup, "a") as pairs:
        port = pairs[0][1].rsplit(":", 1)[1]
        dns = {"name": f"localhost:{port}", "refresh": "1s"}
        async with client_agent(root, setup, dns=dns) as agent, session() as client:
            assert await eventually(
                lambda: metric(agent, "upstream_endpoints", state="healthy") >= 1, 3
            )
            status, body = await get(client, url(agent))
        assert (status, body) == (200, "a GET 0")


# -- circuit breaking ------------------------------------------------------------------------


async def test_the_circuit_breaker_trips_under_a_flood_and_recovers(
    root: Path, setup: CaSetup
) -> None:
    async with backends(root, setup, "a") as pairs:
        breaker = {"max_requests": 5}
        async with (
            client_agent(root, setup, endpoints=[pairs[0][1]], circuit_breaker=breaker) as agent,
            session() as client,
        ):
            flood = await asyncio.gather(*(get(client, url(agent, "/slow/0.3")) for _ in range(40)))
            statuses = collections.Counter(status for status, _ in flood)
            refused = [body for status, body in flood if status == 503]
            after = [await get(client, url(agent)) for _ in range(5)]
        assert statuses[200] >= 5 and statuses[503] >= 20, statuses
        assert statuses[200] + statuses[503] == 40
        assert all("overflow_max_requests" in body for body in refused)
        assert metric(agent, "upstream_overflows_total", reason="max_requests") == statuses[503]
        assert [status for status, _ in after] == [200] * 5  # it recovers once the flood ends
        assert answered(agent) == {"200": statuses[200] + 5, "503": statuses[503]}
        assert pairs[0][0].hits == statuses[200] + 5


# -- three backends behind real agent processes: kill one, restart it --------------------------


@contextmanager
def backend_process(
    setup: CaSetup, ca: CaProcess, name: str, app_port: int, port: int
) -> Iterator[AgentProcess]:
    """A backend agent as a real process, authenticated to a real `ca serve` by its token."""
    root = setup.root / "processes"  # its token file is a real token, not local_sign's
    root.mkdir(exist_ok=True)
    raw = agent_yaml(
        root,
        "backend",
        ca_address=f"127.0.0.1:{ca.grpc_port}",
        token=setup.issuer.token("demo", "backend"),
        inbound=inbound(app_port, protocol="http"),
    )
    raw["ca"]["bundle_file"] = str(setup.ca_dir / "bundle.pem")
    raw["inbound"][0]["listen"] = f"127.0.0.1:{port}"
    with agent_process(root, f"backend-{name}", raw) as process:
        yield process


async def test_killing_one_of_three_backends_loses_no_request_and_it_returns(
    setup: CaSetup, ca: CaProcess
) -> None:
    root = setup.root
    async with AsyncExitStack() as stack:
        apps = [await stack.enter_async_context(serving(App(n))) for n in ("a", "b", "c")]
        ports = [free_port() for _ in apps]
        processes = [
            stack.enter_context(backend_process(setup, ca, app.name, app.port, port))
            for app, port in zip(apps, ports, strict=True)
        ]
        upstream = {
            "endpoints": [f"127.0.0.1:{port}" for port in ports],
            "health": {"outlier": {"consecutive_failures": 2, "base_ejection": "1s"}},
        }
        agent = await stack.enter_async_context(client_agent(root, setup, **upstream))
        client = await stack.enter_async_context(session())
        failures: list[tuple[int, str]] = []
        stop = asyncio.Event()
        stack.callback(stop.set)  # a failed assertion stops the load too

        async def load() -> int:
            """Requests one after another until told to stop (bounded in time and count)."""
            sent = 0
            deadline = time.monotonic() + 30
            while not stop.is_set() and time.monotonic() < deadline and sent < 5000:
                status, body = await get(client, url(agent))
                sent += 1
                if status != 200:
                    failures.append((status, body))
            return sent

        loads = [asyncio.create_task(load()) for _ in range(4)]
        await asyncio.sleep(0.5)
        processes[1].process.kill()  # SIGKILL: no drain, connections reset
        await asyncio.to_thread(processes[1].process.wait)
        assert await eventually(lambda: metric(agent, "upstream_ejections_total") >= 1, 3)
        ejected_at = metric(agent, "upstream_endpoints", state="ejected")
        hits_while_dead = apps[1].hits
        await asyncio.sleep(1.0)
        assert apps[1].hits == hits_while_dead
        # Restarted on the same port, it is used again once its ejection ends: the load
        # goes on until then (a slow restart must not outlast a fixed load window).
        processes[1] = stack.enter_context(
            backend_process(setup, ca, "b-again", apps[1].port, ports[1])
        )
        assert await eventually(lambda: apps[1].hits > hits_while_dead, 10)
        stop.set()
        sent = sum(await asyncio.gather(*loads))
        assert failures == [], failures[:3]
        assert ejected_at == 1
        assert sent > 100
        assert metric(agent, "upstream_retries_total") >= 1


async def test_a_drain_closes_idle_app_connections_and_lets_busy_ones_finish(
    root: Path, setup: CaSetup
) -> None:
    async with backends(root, setup, "a") as pairs:
        raw = agent_yaml(
            root,
            "frontend",
            outbound=outbound(endpoints=[pairs[0][1]]),
            limits={"drain_timeout": "20s"},
        )
        agent = Agent(agent_config.parse(raw, base=root), sign=local_sign(setup))
        await asyncio.wait_for(agent.start(), 10)
        try:
            async with session(close=False) as idle, session(close=False) as busy:
                assert (await get(idle, url(agent)))[0] == 200  # now idle, kept alive
                slow = asyncio.create_task(get(busy, url(agent, "/slow/0.5")))
                await asyncio.sleep(0.2)
                started = time.monotonic()
                await agent.drain()
                took = time.monotonic() - started
                status, _ = await slow
        finally:
            await agent.stop()
        # Not the 20 s drain timeout: the idle connection closed at once, the busy one
        # right after its response.
        assert status == 200
        assert took < 2.0
        assert len(agent.connections) == 0


async def test_a_drain_answers_every_request_the_app_pipelined_before_it(
    root: Path, setup: CaSetup
) -> None:
    # As the inbound does: what was read before the drain is answered, the last response
    # with `Connection: close`; nothing read is dropped unanswered.
    async with (
        backends(root, setup, "a") as pairs,
        client_agent(root, setup, endpoints=[pairs[0][1]]) as agent,
    ):
        host, port = agent.bound["outbound[backend]"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /slow/0.5 HTTP/1.1\r\nHost: b\r\n\r\nGET /second HTTP/1.1\r\nHost: b\r\n\r\n"
        )
        await asyncio.sleep(0.2)  # both read; the first in flight
        drain = asyncio.create_task(agent.drain())
        answers = await asyncio.wait_for(reader.read(), 5)  # to the agent's close
        await drain
        writer.close()
    heads = re.findall(rb"HTTP/1\.1 \d{3} .*?\r\n\r\n", answers, re.DOTALL)
    assert [head.split(b" ")[1] for head in heads] == [b"200", b"200"]
    assert b"connection: close" not in heads[0].lower()
    assert b"connection: close" in heads[1].lower()


async def test_an_endpoint_that_leaves_keeps_its_open_connections(
    root: Path, setup: CaSetup
) -> None:
    """TCP mode: discovery (here a reload) drops an endpoint; what is open on it goes on."""
    async with AsyncExitStack() as stack:
        accepted: dict[str, list[int]] = {"a": [], "b": []}
        addresses = []
        for name in ("a", "b"):
            port = await stack.enter_async_context(echo_server(accepted[name]))
            raw = agent_yaml(root, "backend", inbound=inbound(port))
            agent = await stack.enter_async_context(running_agent(raw, local_sign(setup), root))
            addresses.append(agent.bound["inbound[0]"])
        tcp = {"protocol": "tcp", "endpoints": addresses}
        client = await stack.enter_async_context(client_agent(root, setup, **tcp))
        host, port = client.bound["outbound[backend]"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))  # round robin: a
        writer.write(b"before")
        assert await asyncio.wait_for(reader.readexactly(6), 5) == b"before"
        assert (len(accepted["a"]), len(accepted["b"])) == (1, 0)
        only_b = agent_yaml(
            root, "frontend", outbound=outbound(protocol="tcp", endpoints=addresses[1:])
        )
        await client.reconfigure(agent_config.parse(only_b, base=root))
        writer.write(b"after")  # the open connection to a still works
        assert await asyncio.wait_for(reader.readexactly(5), 5) == b"after"
        writer.close()
        for _ in range(3):  # and new ones go to b only
            assert await round_trip(client.bound["outbound[backend]"], b"new") == b"new"
        assert (len(accepted["a"]), len(accepted["b"])) == (1, 3)


@pytest.mark.parametrize("protocol", ["tcp", "http"])
async def test_past_max_connections_an_app_connection_is_closed_at_once(
    root: Path, setup: CaSetup, protocol: str
) -> None:
    async with backends(root, setup, "a") as pairs:
        raw = agent_yaml(
            root,
            "frontend",
            outbound=outbound(protocol=protocol, endpoints=[pairs[0][1]]),
            limits={"max_connections": 2, "drain_timeout": "300ms"},
        )
        async with running_agent(raw, local_sign(setup), root) as agent:
            host, port = agent.bound["outbound[backend]"].rsplit(":", 1)
            held = [await asyncio.open_connection(host, int(port)) for _ in range(2)]
            assert await eventually(lambda: len(agent.connections) == 2)
            reader, writer = await asyncio.open_connection(host, int(port))
            async with asyncio.timeout(2):
                assert await reader.read() == b""  # closed without a byte
            writer.close()
            for _, held_writer in held:
                held_writer.close()
        assert (
            sample(
                agent,
                "outrider_connections_refused_total",
                direction="outbound",
                reason="max_connections",
            )
            == 1
        )


async def test_a_removed_upstream_leaves_no_endpoint_gauges_behind(
    root: Path, setup: CaSetup
) -> None:
    async with backends(root, setup, "a") as pairs:
        async with client_agent(root, setup, endpoints=[pairs[0][1]]) as agent:
            assert await eventually(
                lambda: metric(agent, "upstream_endpoints", state="healthy") == 1
            )
            await agent.reconfigure(agent_config.parse(agent_yaml(root, "frontend"), base=root))
            names = {
                s.labels.get("upstream")
                for m in agent.metrics.registry.collect()
                for s in m.samples
                if s.name == "outrider_upstream_endpoints"
            }
        assert names == set()  # a dashboard would otherwise show a gone upstream's endpoints


async def test_a_discovery_watch_that_fails_outright_starts_again(
    root: Path, setup: CaSetup, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No in-cluster credentials here: the Kubernetes watch fails at once, and again later."""
    monkeypatch.setattr(upstreams, "DISCOVERY_RESTART", 0.05)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    source = {"service": "backend", "namespace": "shop"}
    with caplog.at_level(logging.ERROR, logger="outrider.agent"):
        async with client_agent(root, setup, kubernetes=source):

            def failures() -> int:
                return sum("discovery failed" in r.getMessage() for r in caplog.records)

            assert await eventually(lambda: failures() >= 3, 5)
