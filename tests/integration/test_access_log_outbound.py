"""Outbound access log lines from real agent processes: which peer each request and each TCP
connection reached, over which TLS, as the inbound line at the other end says it.

A compliance team audits TLS from what the agents export: with `access_log: {mode: all}` an
outbound line names the peer's verified SPIFFE ID, the TLS version and the cipher, with the
same names and formats as an inbound line; a TCP connection gets one line when it ends;
`mode: denied` logs no outbound line (no policy denies an app's own request).

The mesh: a `ca serve`, a backend agent (inbound http, tcp and grpc ports to apps on this
test's event loop) and two client agents, each a real process whose stdout (its access log)
is a pipe read here: `frontend` (mode all) and `quiet` (mode denied).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from agent.adapters import h2client
from agent.core.grpc import Code
from tests.h2backend import exchange, grpc_head, h2_backend
from tests.httpraw import get, one
from tests.integration.test_access_log_and_tracing import App, http_server
from tests.mesh import Logged, echo_server, inbound, logged_agent, served_agent_yaml, workload
from tests.support import CaProcess, CaSetup, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

BACKEND = str(workload("backend"))
#: The quiet agent denies /admin on its own inbound port: the line that shows its log is
#: caught up (lines are written in the order their requests end).
GUARD = {
    "policies": [
        {
            "name": "guard",
            "action": "DENY",
            "rules": [{"name": "admin", "to": {"paths": ["/admin*"]}}],
        }
    ]
}
#: Fields whose names and formats an outbound line shares with the inbound line of the
#: same connection.
TLS_FIELDS = ("tls_version", "cipher")


@dataclass
class Mesh:
    setup: CaSetup
    backend: Logged
    frontend: Logged
    quiet: Logged
    dead: str  # an endpoint nobody listens on

    def outbound(self, name: str, agent: Logged | None = None) -> str:
        return (agent or self.frontend).agent.bound[f"outbound[{name}]"]


def upstream(name: str, protocol: str, *endpoints: str) -> dict[str, Any]:
    return {
        "name": name,
        "listen": f"127.0.0.1:{free_port()}",  # (listeners are told apart by address)
        "protocol": protocol,
        "endpoints": list(endpoints),
        "server_ids": [BACKEND],
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(setup: CaSetup, ca: CaProcess) -> AsyncIterator[Mesh]:
    app = App()
    async with (
        http_server(app.handle) as http_port,
        echo_server() as echo_port,
        h2_backend("backend") as grpc_app,
    ):
        with ExitStack() as stack:
            # Each on a port of its own: the agent tells listeners apart by address.
            ports = [
                {"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{port}", "protocol": kind}
                for port, kind in ((http_port, "http"), (echo_port, "tcp"), (grpc_app.port, "grpc"))
            ]
            raw = served_agent_yaml(setup, ca, "backend", inbound=ports, access_log={"mode": "all"})
            backend = stack.enter_context(logged_agent(setup.root, "backend", raw))
            web, tcp, grpc = (backend.agent.bound[f"inbound[{n}]"] for n in range(3))
            dead = f"127.0.0.1:{free_port()}"
            raw = served_agent_yaml(
                setup,
                ca,
                "frontend",
                outbound=[
                    upstream("web", "http", web),
                    upstream("echo", "tcp", tcp),
                    upstream("greeter", "grpc", grpc),
                    upstream("nowhere", "tcp", dead),
                ],
                access_log={"mode": "all"},
            )
            frontend = stack.enter_context(logged_agent(setup.root, "frontend", raw))
            raw = served_agent_yaml(
                setup,
                ca,
                "quiet",
                inbound=inbound(http_port, protocol="http"),
                outbound=[upstream("web", "http", web), upstream("echo", "tcp", tcp)],
                policy=GUARD,
                access_log={"mode": "denied"},
            )
            quiet = stack.enter_context(logged_agent(setup.root, "quiet", raw))
            yield Mesh(setup, backend, frontend, quiet, dead)


async def relayed(address: str, payload: bytes) -> bytes:
    """`payload` through the TCP outbound at `address` to an echo (`echoed`)."""
    host, port = address.rsplit(":", 1)
    return await echoed(await asyncio.open_connection(host, int(port)), payload)


async def echoed(
    opened: tuple[asyncio.StreamReader, asyncio.StreamWriter], payload: bytes
) -> bytes:
    """`payload` sent on an app's connection to an echo and read back, then the app's close;
    what came back. Returns once the agent closed its side too: the connection's line is
    made by then (it is written as the relay closes)."""
    reader, writer = opened
    try:
        writer.write(payload)
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 5)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the agent closed it too
        return echoed
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    finally:
        writer.close()


def outbound_lines(lines: list[dict[str, Any]], upstream: str | None) -> list[dict[str, Any]]:
    return [
        line for line in lines if line["direction"] == "outbound" and line["upstream"] == upstream
    ]


async def test_each_outbound_request_names_the_peer_and_tls_it_reached_as_the_inbound_line_does(
    mesh: Mesh,
) -> None:
    """Two requests, the second on the pooled connection the first left: both lines name the
    backend and its TLS, read once when that connection was dialled."""
    mesh.frontend.lines(), mesh.backend.lines()
    reused_before = mesh.frontend.agent.sample(
        "outrider_upstream_connections_total", upstream="web", kind="reused"
    )
    base = f"http://{mesh.outbound('web')}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client:
        for path in ("/api/one", "/api/two"):
            async with client.get(base + path) as response:
                assert response.status == 200
    out = outbound_lines(
        await mesh.frontend.arrived(lambda line: line["path"] == "/api/two"), "web"
    )
    into = await mesh.backend.arrived(lambda line: line["path"] == "/api/two")
    assert (
        mesh.frontend.agent.sample(
            "outrider_upstream_connections_total", upstream="web", kind="reused"
        )
        == reused_before + 1
    )
    assert [line["path"] for line in out] == ["/api/one", "/api/two"]
    (inbound_line,) = [line for line in into if line["path"] == "/api/two"]
    for line in out:
        assert (line["kind"], line["status"], line["peer_id"]) == ("http", 200, BACKEND)
        assert line["endpoint"] == mesh.backend.agent.bound["inbound[0]"]
        for name in TLS_FIELDS:  # the same values, in the same format, from the other end
            assert line[name] == inbound_line[name]
    assert inbound_line["tls_version"] == "TLSv1.3" and inbound_line["cipher"].startswith("TLS_")


async def test_an_outbound_grpc_call_names_the_peer_and_tls_of_its_h2_connection(
    mesh: Mesh,
) -> None:
    mesh.frontend.lines(), mesh.backend.lines()
    host, port = mesh.outbound("greeter").rsplit(":", 1)
    connection = await h2client.connect(host, int(port))
    try:
        answered = await exchange(connection, grpc_head())
    finally:
        connection.close()
    assert answered.grpc_status == Code.OK
    (out,) = outbound_lines(
        await mesh.frontend.arrived(lambda line: line["upstream"] == "greeter"), "greeter"
    )
    into = await mesh.backend.arrived(lambda line: line["kind"] == "grpc")
    (inbound_line,) = [line for line in into if line["kind"] == "grpc"]
    assert (out["kind"], out["grpc_status"], out["peer_id"]) == ("grpc", Code.OK, BACKEND)
    assert [out[name] for name in TLS_FIELDS] == [inbound_line[name] for name in TLS_FIELDS]


async def test_an_outbound_tcp_connection_gets_one_line_when_it_ends(mesh: Mesh) -> None:
    mesh.frontend.lines(), mesh.backend.lines()
    payload = b"x" * 3000
    assert await relayed(mesh.outbound("echo"), payload) == payload
    lines = await mesh.frontend.arrived(lambda line: line["upstream"] == "echo")
    (out,) = outbound_lines(lines, "echo")
    into = await mesh.backend.arrived(lambda line: line["kind"] == "tcp")
    (inbound_line,) = [line for line in into if line["kind"] == "tcp"]
    assert (out["kind"], out["peer_id"], out["endpoint"], out["tries"]) == (
        "tcp",
        BACKEND,
        mesh.backend.agent.bound["inbound[1]"],
        1,
    )
    # Every byte each way, as the backend's inbound line counts them from the other end.
    assert out["bytes_in"] == out["bytes_out"] == inbound_line["bytes_in"] == len(payload)
    assert [out[name] for name in TLS_FIELDS] == [inbound_line[name] for name in TLS_FIELDS]
    assert out["status"] is out["method"] is out["path"] is out["error"] is None
    assert out["local_id"] == str(workload("frontend")) and out["duration_ms"] > 0
    assert out["decision"] is None  # no policy decides an app's own connection


async def test_an_outbound_tcp_connection_that_reached_no_peer_is_logged_with_why(
    mesh: Mesh,
) -> None:
    mesh.frontend.lines()
    host, port = mesh.outbound("nowhere").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"hello")
    with contextlib.suppress(ConnectionResetError):  # (reset: closed with "hello" unread)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed: nowhere to go
    writer.close()
    (line,) = outbound_lines(
        await mesh.frontend.arrived(lambda line: line["upstream"] == "nowhere"), "nowhere"
    )
    assert (line["error"], line["endpoint"], line["tries"]) == (
        "upstream_connect_failure",
        mesh.dead,
        1,
    )
    assert line["peer_id"] is line["tls_version"] is line["cipher"] is None
    assert line["bytes_in"] == line["bytes_out"] == 0  # nothing of the app's went anywhere


async def test_mode_denied_logs_no_outbound_line(mesh: Mesh) -> None:
    """`mode: denied` is denied-only: an app's requests and connections go out unlogged."""
    mesh.quiet.lines()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as client,
        client.get(f"http://{mesh.outbound('web', mesh.quiet)}/api/items") as response,
    ):
        assert response.status == 200
    assert await relayed(mesh.outbound("echo", mesh.quiet), b"ping") == b"ping"
    # Both are over (the app got its answer, the agent closed the TCP connection): a
    # denial now is the next line, and nothing before it.
    assert (await asyncio.to_thread(one, mesh.setup, mesh.quiet.agent, get("/admin"))).status == 403
    lines = await mesh.quiet.arrived(lambda line: line["decision"] == "deny")
    assert [(line["direction"], line["path"]) for line in lines] == [("inbound", "/admin")]
