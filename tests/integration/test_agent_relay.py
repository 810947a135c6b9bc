"""The byte path through a pair of in-process agents: app -> outbound -> mTLS -> inbound -> app."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator

import pytest

from agent.app import Agent
from tests.mesh import (
    agent_yaml,
    echo_server,
    inbound,
    local_sign,
    outbound,
    round_trip,
    running_agent,
    sample,
    workload,
)
from tests.support import CaSetup


@pytest.fixture
async def pair(setup: CaSetup) -> AsyncIterator[tuple[Agent, Agent]]:
    sign, root = local_sign(setup), setup.root
    async with echo_server() as app_port:
        server_raw = agent_yaml(root, "backend", inbound=inbound(app_port))
        async with running_agent(server_raw, sign, root) as server:
            upstream = outbound(server.bound["inbound[0]"], workload("backend"))
            client_raw = agent_yaml(root, "frontend", outbound=upstream)
            async with running_agent(client_raw, sign, root) as client:
                yield client, server


async def test_bytes_go_through_and_the_inbound_side_sees_the_client_identity(
    pair: tuple[Agent, Agent],
) -> None:
    client, server = pair
    assert await round_trip(client.bound["outbound[backend]"], b"hello mesh") == b"hello mesh"
    peer = {"direction": "inbound", "peer_id": str(workload("frontend")), "tls_version": "TLSv1.3"}
    assert sample(server, "outrider_peer_connections_total", **peer) == 1
    peer = {"direction": "outbound", "peer_id": str(workload("backend")), "tls_version": "TLSv1.3"}
    assert sample(client, "outrider_peer_connections_total", **peer) == 1


async def test_a_megabyte_each_way_arrives_intact(pair: tuple[Agent, Agent]) -> None:
    client, _ = pair
    payload = os.urandom(1 << 20)
    assert await round_trip(client.bound["outbound[backend]"], payload, timeout=10) == payload


async def test_closing_the_client_closes_the_connection_on_both_agents(
    pair: tuple[Agent, Agent],
) -> None:
    client, server = pair
    assert await round_trip(client.bound["outbound[backend]"]) == b"ping"
    for _ in range(100):
        if len(client.connections) == 0 and len(server.connections) == 0:
            break
        await asyncio.sleep(0.02)
    assert (len(client.connections), len(server.connections)) == (0, 0)
    assert sample(server, "outrider_connections_active", direction="inbound") == 0


async def test_ready_only_while_the_svid_is_valid(pair: tuple[Agent, Agent]) -> None:
    client, _ = pair
    assert client.ready
    svid = client.svid
    assert svid is not None
    client.runtime.now = lambda: svid.not_after  # the CA stayed away too long
    assert not client.ready


async def test_a_client_that_sends_and_closes_at_once_still_delivers_its_bytes_to_the_app(
    setup: CaSetup,
) -> None:
    """Its bytes and its EOF can both come before the upstream is dialled: the outbound side
    reads them early (agent/adapters/relay.py) and relays them once linked, then closes."""
    received: list[bytes] = []
    ended = asyncio.Event()

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read())  # to EOF
        ended.set()
        writer.close()

    sign, root = local_sign(setup), setup.root
    app_server = await asyncio.start_server(app, "127.0.0.1", 0)
    app_port = app_server.sockets[0].getsockname()[1]
    try:
        server_raw = agent_yaml(root, "backend", inbound=inbound(app_port))
        async with running_agent(server_raw, sign, root) as server:
            upstream = outbound(server.bound["inbound[0]"], workload("backend"))
            client_raw = agent_yaml(root, "frontend", outbound=upstream)
            async with running_agent(client_raw, sign, root) as client:
                host, port = client.bound["outbound[backend]"].rsplit(":", 1)
                _, writer = await asyncio.open_connection(host, int(port))
                writer.write(b"fire and forget")
                writer.write_eof()
                await asyncio.wait_for(ended.wait(), 5)
                writer.close()
    finally:
        app_server.close()
    assert received == [b"fire and forget"]
