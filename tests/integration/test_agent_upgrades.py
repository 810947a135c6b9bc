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
from typing import ClassVar

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
    """An app that takes `Upgrade: h2c` (RFC 7540 3.2) whenever it is asked, and otherwise
    answers in HTTP/1.1 with the path it was asked for."""

    def __init__(self) -> None:
        self.head = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.head += data
        while b"\r\n\r\n" in self.head:
            head, _, self.head = self.head.partition(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            fields = {n.lower() for n, _, _ in (line.partition(b": ") for line in lines[1:])}
            if b"upgrade" in fields:
                self.transport.write(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n"
                    b"Upgrade: h2c\r\n\r\n"
                )
                return
            body = b"h1 " + lines[0].split(b" ")[1]
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )


async def test_an_h2c_upgrade_is_never_relayed_so_every_request_stays_authorized(
    root: Path, setup: CaSetup
) -> None:
    """h2c smuggling: were a 101 to h2c relayed, every later request would be an h2 stream
    no policy sees. The Upgrade is dropped; the app answers each request in HTTP/1.1,
    and a later request on the same connection is authorized like the first."""
    server = await asyncio.get_running_loop().create_server(H2cApp, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncio.timeout(10), agents_in_front_of(root, setup, port) as pair:
            host, outbound_port = pair.frontend.bound["outbound[backend]"].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(outbound_port))
            settings = h2.connection.H2Connection().initiate_upgrade_connection()
            writer.write(
                b"GET /h2c/one HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                b"Upgrade: h2c\r\nHTTP2-Settings: %s\r\n\r\n" % settings
            )
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert await reader.readexactly(len(b"h1 /h2c/one")) == b"h1 /h2c/one"
            writer.write(b"GET /ws/admin HTTP/1.1\r\nHost: backend\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 403 "), head  # denied, as on its own connection
            writer.close()
    finally:
        server.close()


class Unanswering(asyncio.Protocol):
    """An app that reads an Upgrade request and answers only when told to."""

    transports: ClassVar[list[asyncio.Transport]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(transport)  # type: ignore[arg-type]


async def test_bytes_sent_before_the_101_are_bounded_then_parsed_as_http_if_refused(
    root: Path, setup: CaSetup
) -> None:
    """What follows an Upgrade is held until the answer says what it is: an app that
    streams meanwhile is paused, not buffered without bound in the agent; answered
    without a 101, what was held is HTTP again (here: not HTTP, so a 400)."""
    server = await asyncio.get_running_loop().create_server(Unanswering, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    piece = b"\x82" * (1 << 20)
    try:
        async with asyncio.timeout(20), agents_in_front_of(root, setup, port) as pair:
            host, outbound_port = pair.frontend.bound["outbound[backend]"].rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(outbound_port))
            writer.write(
                b"GET /ws/chat HTTP/1.1\r\nHost: backend\r\nConnection: Upgrade\r\n"
                b"Upgrade: websocket\r\n\r\n"
            )
            sent = 0
            for _ in range(64):  # 64 MiB at most
                writer.write(piece)
                try:
                    await asyncio.wait_for(writer.drain(), 1.0)
                except TimeoutError:
                    break  # the agent stopped reading: what it holds is bounded
                sent += len(piece)
            assert sent < 16 << 20, f"{sent >> 20} MiB taken before any answer"
            [app] = Unanswering.transports
            app.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 426 ")
            answers = b""
            try:  # the agent closes with our unread megabytes in its buffers: a reset
                while chunk := await reader.read(65536):
                    answers += chunk
            except ConnectionResetError:
                pass
            # The held bytes were read as HTTP, never relayed (if the reset let it through).
            assert not answers or answers.startswith(b"HTTP/1.1 400 Bad Request")
            writer.close()
    finally:
        server.close()
