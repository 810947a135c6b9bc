"""`outrider_connections_total` counts connections, not the app's: once each, after the
handshake, by the peer whose SVID verified (docs/metrics.md).

Two in-process agents: the client's outbound listener takes the app's
connections; each mTLS connection it makes to the server's agent is counted
once, with the server's SPIFFE ID, on both sides. A pooled HTTP upstream
connection serves several of the app's connections and is counted once; a
TCP relay makes one per app connection; a server that is not the upstream's
is never counted as established.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from agent.app import Agent
from tests.mesh import (
    agent_yaml,
    echo_server,
    eventually,
    inbound,
    local_sign,
    outbound,
    round_trip,
    running_agent,
    sample,
    threaded_app,
    workload,
)
from tests.support import CaSetup

CLIENT, SERVER = str(workload("frontend")), str(workload("backend"))


def connections(agent: Agent, direction: str, mtls: str, peer_id: str) -> float:
    labels = {"direction": direction, "mtls": mtls, "peer_id": peer_id}
    return sample(agent, "outrider_connections_total", **labels)


def every_connection_count(agent: Agent) -> dict[tuple[str, str, str], float]:
    """outrider_connections_total by (direction, mtls, peer_id)."""
    return {
        (s.labels["direction"], s.labels["mtls"], s.labels["peer_id"]): s.value
        for metric in agent.metrics.registry.collect()
        for s in metric.samples
        if s.name == "outrider_connections_total"
    }


def routed(agent: Agent) -> float:
    return sample(agent, "outrider_outbound_app_connections_total", route="upstream")


@pytest.fixture
async def http_pair(setup: CaSetup) -> AsyncIterator[tuple[Agent, Agent]]:
    """frontend (outbound `protocol: http`) -> backend (inbound `protocol: http`) -> an app."""

    async def hello(_: web.Request) -> web.Response:
        return web.Response(text="hello")

    application = web.Application()
    application.router.add_get("/{tail:.*}", hello)
    sign, root = local_sign(setup), setup.root
    with threaded_app(application) as app_port:
        server_raw = agent_yaml(root, "backend", inbound=inbound(app_port, protocol="http"))
        async with running_agent(server_raw, sign, root) as server:
            upstream = outbound(server.bound["inbound[0]"], workload("backend"))
            upstream[0]["protocol"] = "http"
            client_raw = agent_yaml(root, "frontend", outbound=upstream)
            async with running_agent(client_raw, sign, root) as client:
                yield client, server


async def get(address: str) -> bytes:
    """One request on a new connection of the app's (`Connection: close`); the response."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"GET /hello HTTP/1.1\r\nHost: backend\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_three_app_connections_over_one_pooled_upstream_connection_count_one(
    http_pair: tuple[Agent, Agent],
) -> None:
    client, server = http_pair
    for _ in range(3):
        response = await get(client.bound["outbound[backend]"])
        assert response.startswith(b"HTTP/1.1 200") and response.endswith(b"hello")
    assert routed(client) == 3  # the app's connections, routed into the mesh
    reused = {"upstream": "backend", "kind": "reused"}
    assert sample(client, "outrider_upstream_connections_total", **reused) == 2
    # One mTLS connection: counted once on each side, by the identity verified on it.
    assert every_connection_count(client) == {("outbound", "true", SERVER): 1}
    assert every_connection_count(server) == {("inbound", "true", CLIENT): 1}
    # peer_connections_total counts the same connections, by TLS version besides.
    peer = {"direction": "outbound", "peer_id": SERVER, "tls_version": "TLSv1.3"}
    assert sample(client, "outrider_peer_connections_total", **peer) == 1


@pytest.fixture
async def tcp_pair(setup: CaSetup, request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """frontend (outbound tcp) -> backend (inbound tcp) -> an echo app; `request.param`: the
    server IDs the frontend's upstream expects."""
    sign, root = local_sign(setup), setup.root
    async with echo_server() as app_port:
        server_raw = agent_yaml(root, "backend", inbound=inbound(app_port))
        async with running_agent(server_raw, sign, root) as server:
            expected = workload(request.param)
            upstream = outbound(server.bound["inbound[0]"], expected)
            client_raw = agent_yaml(root, "frontend", outbound=upstream)
            async with running_agent(client_raw, sign, root) as client:
                yield client, server


@pytest.mark.parametrize("tcp_pair", ["backend"], indirect=True)
async def test_each_tcp_connection_of_the_app_is_one_mtls_connection_counted_once(
    tcp_pair: tuple[Agent, Agent],
) -> None:
    client, server = tcp_pair
    for payload in (b"one", b"two"):
        assert await round_trip(client.bound["outbound[backend]"], payload) == payload
    assert routed(client) == 2
    assert every_connection_count(client) == {("outbound", "true", SERVER): 2}
    assert await eventually(lambda: connections(server, "inbound", "true", CLIENT) == 2)
    assert every_connection_count(server) == {("inbound", "true", CLIENT): 2}


@pytest.mark.parametrize("tcp_pair", ["someone-else"], indirect=True)
async def test_a_server_that_is_not_the_upstreams_is_never_counted_as_a_connection(
    tcp_pair: tuple[Agent, Agent],
) -> None:
    client, _ = tcp_pair
    assert await round_trip(client.bound["outbound[backend]"], b"nothing") == b""
    assert routed(client) == 1  # the app's connection was taken, and closed
    refused = {"direction": "outbound", "result": "refused", "reason": "wrong_server_id"}
    assert sample(client, "outrider_tls_handshakes_total", **refused, tls_version="", cipher="")
    assert every_connection_count(client) == {}
    no_endpoint = {"direction": "outbound", "reason": "no_endpoint"}
    assert await eventually(
        lambda: sample(client, "outrider_connections_refused_total", **no_endpoint) == 1
    )
