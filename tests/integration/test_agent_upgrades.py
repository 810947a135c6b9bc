"""WebSocket through an agent pair: the handshake decided by policy, then bytes both ways.

An aiohttp app (a WebSocket echo) behind an inbound agent whose policy denies
`/ws/admin*`; a client agent's `protocol: http` outbound in front of it; a
real aiohttp WebSocket client speaking to the outbound as an app would. The
framing of an Upgrade (what is held, what goes on, what a refusal looks like)
is unit-tested (tests/unit/agent/test_http1_framing.py, test_http_exchange.py);
this is what only real processes show: both agents relay the switched
connection, in both directions, for as long as it lasts.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import h2.connection
import h2.errors
import h2.events
import pytest
from aiohttp import web

from agent.app import Agent
from tests.mesh import agent_yaml, eventually, inbound, local_sign, running_agent, sample, workload
from tests.support import CaSetup

POLICY = """\
policies:
  - name: guard
    action: DENY
    rules:
      - name: admin
        to: {paths: ["/ws/admin*"]}
"""
BACKEND = str(workload("backend"))


@pytest.fixture(scope="module")
def root(setup: CaSetup) -> Path:
    return setup.root


@dataclass
class Echo:
    """A WebSocket echo; it notes the identity header each handshake carried."""

    port: int = 0
    identities: list[str] = field(default_factory=list)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.identities.append(request.headers.get("x-forwarded-client-cert", ""))
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        async for message in socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                await socket.send_str("echo: " + message.data)
            elif message.type == aiohttp.WSMsgType.BINARY:
                await socket.send_bytes(message.data)
        return socket


@dataclass
class Pair:
    echo: Echo
    backend: Agent
    frontend: Agent

    def url(self, path: str) -> str:
        return f"http://{self.frontend.bound['outbound[backend]']}{path}"


@asynccontextmanager
async def agent_pair(root: Path, setup: CaSetup) -> AsyncIterator[Pair]:
    echo = Echo()
    application = web.Application()
    application.router.add_get("/ws/{tail:.*}", echo.handle)
    runner = web.AppRunner(application, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    echo.port = runner.addresses[0][1]
    policy = root / "upgrade-policy.yaml"
    policy.write_text(POLICY)
    backend_raw = agent_yaml(
        root,
        "backend",
        inbound=inbound(echo.port, protocol="http"),
        policy={"files": [str(policy)]},
    )
    try:
        async with running_agent(backend_raw, local_sign(setup), root) as backend:
            upstream = {
                "name": "backend",
                "listen": "127.0.0.1:0",
                "protocol": "http",
                "server_ids": [BACKEND],
                "endpoints": [backend.bound["inbound[0]"]],
            }
            frontend_raw = agent_yaml(root, "frontend", outbound=[upstream])
            async with running_agent(frontend_raw, local_sign(setup), root) as frontend:
                yield Pair(echo, backend, frontend)
    finally:
        await runner.cleanup()


async def test_a_websocket_echoes_through_both_agents_and_a_denied_handshake_gets_403(
    root: Path, setup: CaSetup
) -> None:
    big = bytes(range(256)) * 1024  # 256 KiB: more than one read, both ways
    async with asyncio.timeout(15), agent_pair(root, setup) as pair:
        async with aiohttp.ClientSession() as client:
            async with client.ws_connect(pair.url("/ws/chat")) as socket:
                for text in ("hello", "through two agents"):
                    await socket.send_str(text)
                    assert await socket.receive_str() == "echo: " + text
                await socket.send_bytes(big)
                assert await socket.receive_bytes() == big
            # The handshake was a request like any other: the app saw who called.
            assert pair.echo.identities == [f"By={BACKEND};URI={workload('frontend')}"]

            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await client.ws_connect(pair.url("/ws/admin"))
            assert refused.value.status == 403
            assert len(pair.echo.identities) == 1  # the denied handshake never reached it

        frontend = str(workload("frontend"))
        assert (
            sample(
                pair.backend,
                "outrider_requests_total",
                direction="inbound",
                peer_id=frontend,
                code="101",
            )
            == 1
        )
        assert await eventually(
            lambda: (
                sample(
                    pair.frontend,
                    "outrider_upstream_requests_total",
                    upstream="backend",
                    code="101",
                )
                == 1
            )
        )


async def test_an_h2_app_on_an_http_outbound_is_told_to_change_the_port_protocol(
    root: Path, setup: CaSetup
) -> None:
    async with asyncio.timeout(10), agent_pair(root, setup) as pair:
        host, port = pair.frontend.bound["outbound[backend]"].rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        client = h2.connection.H2Connection()
        client.initiate_connection()
        writer.write(client.data_to_send())
        events = client.receive_data(await reader.read(4096))
        writer.close()
        [goaway] = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
        assert goaway.error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
        assert b"set appProtocol: kubernetes.io/h2c or grpc" in (goaway.additional_data or b"")
        assert (
            sample(
                pair.frontend,
                "outrider_connections_refused_total",
                direction="outbound",
                reason="protocol_mismatch",
            )
            == 1
        )
