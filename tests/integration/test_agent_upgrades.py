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
import h2.config
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
async def agents_in_front_of(root: Path, setup: CaSetup, port: int) -> AsyncIterator[Pair]:
    """The app on `port` behind a backend agent (POLICY), and a client agent's outbound."""
    policy = root / "upgrade-policy.yaml"
    policy.write_text(POLICY)
    backend_raw = agent_yaml(
        root,
        "backend",
        inbound=inbound(port, protocol="http"),
        policy={"files": [str(policy)]},
    )
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
            yield Pair(Echo(port), backend, frontend)


@asynccontextmanager
async def agent_pair(root: Path, setup: CaSetup) -> AsyncIterator[Pair]:
    """The WebSocket echo behind an agent pair."""
    echo = Echo()
    application = web.Application()
    application.router.add_get("/ws/{tail:.*}", echo.handle)
    runner = web.AppRunner(application, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    echo.port = runner.addresses[0][1]
    try:
        async with agents_in_front_of(root, setup, echo.port) as pair:
            pair.echo = echo
            yield pair
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


class H2cApp(asyncio.Protocol):
    """An app that takes `Upgrade: h2c` (RFC 7540 3.2), then answers each h2 stream with
    its path: the first, stream 1, is the upgraded request itself."""

    def __init__(self) -> None:
        self.head = b""
        self.h2: h2.connection.H2Connection | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if self.h2 is None:
            self.head += data
            if b"\r\n\r\n" not in self.head:
                return
            head, _, data = self.head.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            fields = {n.lower(): v for n, _, v in (line.partition(b": ") for line in lines[1:])}
            self.transport.write(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n"
            )
            self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
            self.h2.initiate_upgrade_connection(fields[b"http2-settings"])
            self._answer(1, lines[0].split(b" ")[1])
        for event in self.h2.receive_data(data) if data else []:
            if isinstance(event, h2.events.RequestReceived):
                path = dict(event.headers)[b":path"]
                self._answer(event.stream_id, path)
        self.transport.write(self.h2.data_to_send())

    def _answer(self, stream_id: int, path: bytes) -> None:
        assert self.h2 is not None
        self.h2.send_headers(stream_id, [(":status", "200")])
        self.h2.send_data(stream_id, b"h2c " + path, end_stream=True)


async def _h2_response(
    client: h2.connection.H2Connection, reader: asyncio.StreamReader, stream_id: int
) -> bytes:
    body = b""
    while True:
        data = await reader.read(65536)
        assert data, "closed before the response ended"
        for event in client.receive_data(data):
            if isinstance(event, h2.events.DataReceived) and event.stream_id == stream_id:
                body += event.data
            if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream_id:
                return body


async def test_an_h2c_upgrade_is_decided_by_policy_then_relayed_through_both_agents(
    root: Path, setup: CaSetup
) -> None:
    server = await asyncio.get_running_loop().create_server(H2cApp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10), agents_in_front_of(root, setup, port) as pair:
            host, outbound_port = pair.frontend.bound["outbound[backend]"].rsplit(":", 1)
            for path, status in ((b"/ws/admin", b"403"), (b"/h2c/one", b"101")):
                reader, writer = await asyncio.open_connection(host, int(outbound_port))
                client = h2.connection.H2Connection()
                settings = client.initiate_upgrade_connection()
                writer.write(
                    b"GET %s HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                    b"Upgrade: h2c\r\nHTTP2-Settings: %s\r\n\r\n" % (path, settings)
                )
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.split(b" ")[1] == status, head
                if status == b"101":
                    writer.write(client.data_to_send())  # the preface, then h2 both ways
                    assert await _h2_response(client, reader, 1) == b"h2c /h2c/one"
                    client.send_headers(
                        3,
                        [(":method", "GET"), (":path", "/h2c/two"), (":scheme", "http"),
                         (":authority", "backend")],
                        end_stream=True,
                    )  # fmt: skip
                    writer.write(client.data_to_send())
                    assert await _h2_response(client, reader, 3) == b"h2c /h2c/two"
                writer.close()
    finally:
        server.close()
