"""Closed connections leave nothing for the garbage collector: once a connection of any
kind the agent carries is closed, reference counting alone frees all it was.

What a closed connection leaves in a reference cycle waits for Python's cycle collector:
memory held a while, and the collector's time (it walks every tracked object each full
collection), paid per connection under churn."""

from __future__ import annotations

import asyncio
import gc
import socket
import ssl
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from agent.app import Agent
from tests import certs
from tests.mesh import (
    agent_yaml,
    closing_http_server,
    echo_server,
    eventually,
    inbound,
    local_sign,
    outbound,
    round_trip,
    running_agent,
    workload,
)
from tests.support import CaSetup

GET = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"
#: Connections closed per kind; each left ~6 to ~100 objects in cycles before.
N = 30


@asynccontextmanager
async def keep_alive_then_closing_server() -> AsyncIterator[int]:
    """An HTTP/1.1 app that answers `200 ok` keeping the connection, then closes it a
    moment later: the client agent pools the upstream connection, and loses it idle."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


Connect = Callable[[Agent, Agent], Awaitable[bool]]


async def through_client(client: Agent, _: Agent, payload: bytes, expect: bytes) -> bool:
    answer = await round_trip(client.bound["outbound[backend]"], payload)
    return answer.startswith(expect) if expect else answer == b""


def direct(setup: CaSetup, name: str | None) -> Connect:
    """A client straight to the server agent's inbound, as `name` (None: no certificate),
    refused. A blocking socket in a thread: asyncio's streams leave cycles of their own
    when a peer refuses (a future's exception and its traceback)."""
    credential = None if name is None else certs.valid_svid(setup, workload(name))
    context = certs.client_context(setup.bundle_pem, credential)

    def refused(address: str) -> bool:
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=2) as raw:
            try:
                with context.wrap_socket(raw) as tls:
                    tls.sendall(b"ping")
                    return tls.recv(4) == b""
            except (ssl.SSLError, ConnectionError):
                return True

    async def connect(_: Agent, server: Agent) -> bool:
        return await asyncio.to_thread(refused, server.bound["inbound[0]"])

    return connect


# kind: (app, protocol, the client agent's server ID for the server agent, one connection)
KINDS = {
    "tcp": ("echo", "tcp", "backend", (b"ping", b"ping")),
    "http": ("closing", "http", "backend", (GET, b"HTTP/1.1 200")),
    "http-pooled": ("keep-alive", "http", "backend", (GET, b"HTTP/1.1 200")),
    "tcp-upstream-refused-for-its-id": ("echo", "tcp", "someone-else", (b"ping", b"")),
    "http-upstream-refused-for-its-id": ("closing", "http", "someone-else", (GET, b"HTTP/1.1 50")),
    "handshake-failure": ("echo", "tcp", "backend", None),
    "not-allowed": ("echo", "tcp", "backend", "intruder"),
}
APPS = {
    "echo": echo_server,
    "closing": closing_http_server,
    "keep-alive": keep_alive_then_closing_server,
}


def collected() -> tuple[int, str]:
    """How many objects the collector finds unreachable now, and of what types."""
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        left = gc.collect()
        found = Counter(type(o).__qualname__ for o in gc.garbage)
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    return left, ", ".join(f"{name} x{count}" for name, count in found.most_common(12))


@pytest.mark.parametrize("kind", list(KINDS))
async def test_closed_connections_leave_nothing_for_the_collector(
    setup: CaSetup, kind: str
) -> None:
    app, protocol, server_id, how = KINDS[kind]
    if isinstance(how, tuple):
        payload, expect = how

        async def connect(client: Agent, server: Agent) -> bool:
            return await through_client(client, server, payload, expect)
    else:
        connect = direct(setup, how)
    async with APPS[app]() as app_port:
        allow = {"spiffe_ids": [str(workload("frontend"))]}
        raw = agent_yaml(
            setup.root,
            "backend",
            inbound=inbound(app_port, protocol=protocol, allow=allow),
            limits={"drain_timeout": "500ms"},
        )
        async with running_agent(raw, local_sign(setup), setup.root) as server:
            out = outbound(server.bound["inbound[0]"], workload(server_id))
            out[0]["protocol"] = protocol
            raw = agent_yaml(setup.root, "frontend", outbound=out)
            async with running_agent(raw, local_sign(setup), setup.root) as client:
                for _ in range(3):  # what the first connections make once (a pool, a memo)
                    assert await connect(client, server)
                await asyncio.sleep(0.1)
                gc.collect()
                gc.disable()
                try:
                    for _ in range(N):
                        assert await connect(client, server)
                    assert await eventually(
                        lambda: not client.connections and not server.connections
                    )
                    await asyncio.sleep(0.2)  # the last closes reach every transport
                    left, detail = collected()
                finally:
                    gc.enable()
    assert left < N, f"{left} objects in cycles after {N} closed connections: {detail}"
