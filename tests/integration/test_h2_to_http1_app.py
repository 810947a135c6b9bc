"""An `http` port's h2 peer, its streams sent to the HTTP/1.1 app on keep-alive connections:
what happens when the app closes one, or cannot be reached (an in-process agent; the
decisions themselves are tests/integration/test_agent_http.py's, on the same port as
HTTP/1.1)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from agent.adapters.inbound_h2h1 import MAX_APP_CONNECTIONS
from tests.h2raw import H2Client, Response, request_headers
from tests.httpraw import mtls_socket
from tests.mesh import agent_yaml, local_sign, running_agent, sample
from tests.support import CaSetup, free_port

OPEN = {"policies": [{"name": "open", "action": "ALLOW", "rules": [{"to": {"paths": ["/*"]}}]}]}


@asynccontextmanager
async def keep_alive_app(
    seen: list[bytes] | None = None,
) -> AsyncIterator[tuple[int, list[int]]]:
    """An HTTP/1.1 app that answers with what it read, and closes a connection it has
    answered once when a request for /stale arrives on it: the race every keep-alive
    client meets when a server's idle timeout fires as its next request leaves (or an
    app that acted on the request and died). Yields its port and how many connections
    it accepted; appends each request line it read to `seen`."""
    accepted: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        answered = 0
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line = head.split(b"\r\n", 1)[0]
                if seen is not None:
                    seen.append(line)
                if b" /stale" in line and answered:
                    return
                if b" /busy" in line:  # long enough for the streams to overlap
                    await asyncio.sleep(0.05)
                body = b""
                if b"transfer-encoding: chunked" in head.lower():
                    while (size := int((await reader.readline()).strip(), 16)) > 0:
                        body += await reader.readexactly(size)
                        await reader.readline()
                    await reader.readline()
                answered += 1
                payload = head.split(b"\r\n", 1)[0] + b" " + body
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(payload))
                writer.write(payload)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], accepted
    finally:
        server.close()


def h2_to(setup: CaSetup, address: str) -> H2Client:
    sock = mtls_socket(setup, address, alpn=("h2", "http/1.1"))
    assert sock.selected_alpn_protocol() == "h2"
    return H2Client(sock)


async def test_a_closed_keep_alive_connection_costs_a_bodiless_request_nothing(
    setup: CaSetup, tmp_path: Path
) -> None:
    async with keep_alive_app() as (port, accepted):
        inbounds = [
            {"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{port}", "protocol": "http"},
            {
                "listen": f"127.0.0.1:{free_port()}",
                "app": f"127.0.0.1:{free_port()}",  # nobody there
                "protocol": "http",
            },
        ]
        raw = agent_yaml(setup.root, "backend", inbound=inbounds, policy=OPEN)
        async with running_agent(raw, local_sign(setup), tmp_path) as agent:

            def ask() -> list[Response]:
                client = h2_to(setup, agent.bound["inbound[0]"])
                try:
                    first = client.get("/first")
                    again = client.get("/stale")  # the pooled connection: closed under it
                    posted = client.send(request_headers("/stale", "POST"), b"payload")
                    lost_body = client.wait(posted)  # sent on it, maybe begun: not replayed
                    return [first, again, lost_body, client.get("/last")]
                finally:
                    client.close()

            def ask_nobody() -> Response:
                client = h2_to(setup, agent.bound["inbound[1]"])
                try:
                    return client.get("/anyone")
                finally:
                    client.close()

            first, again, lost_body, last = await asyncio.to_thread(ask)
            nobody = await asyncio.to_thread(ask_nobody)
            unreachable = sample(
                agent,
                "outrider_connections_refused_total",
                direction="inbound",
                reason="app_unreachable",
            )
    assert (first.status, first.body) == (200, b"GET /first HTTP/1.1 ")
    assert (again.status, again.body) == (200, b"GET /stale HTTP/1.1 ")
    assert lost_body.status == 503 and b"app_reset" in lost_body.body
    assert (last.status, last.body) == (200, b"GET /last HTTP/1.1 ")
    assert len(accepted) == 3  # /first and the stale try; the retry and the POST; /last
    assert nobody.status == 503 and b"app_unreachable" in nobody.body
    assert unreachable == 1


async def test_a_peers_streams_share_a_bounded_number_of_app_connections(
    setup: CaSetup, tmp_path: Path
) -> None:
    """One h2 connection's 60 concurrent streams reach the HTTP/1.1 app on at most
    MAX_APP_CONNECTIONS connections (the rest wait their turn), and all are answered."""
    async with keep_alive_app() as (port, accepted):
        inbounds = [
            {"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{port}", "protocol": "http"}
        ]
        raw = agent_yaml(setup.root, "backend", inbound=inbounds, policy=OPEN)
        async with running_agent(raw, local_sign(setup), tmp_path) as agent:

            def ask() -> list[Response]:
                client = h2_to(setup, agent.bound["inbound[0]"])
                try:
                    sent = [client.send(request_headers(f"/busy/{i}")) for i in range(60)]
                    return [client.wait(stream_id) for stream_id in sent]
                finally:
                    client.close()

            answers = await asyncio.to_thread(ask)
    assert [a.status for a in answers] == [200] * 60
    assert answers[7].body == b"GET /busy/7 HTTP/1.1 "
    assert 1 < len(accepted) <= MAX_APP_CONNECTIONS


async def test_a_request_the_app_may_have_acted_on_is_never_sent_twice(
    setup: CaSetup, tmp_path: Path
) -> None:
    """Lost with its reused connection before any answer, a bodiless POST is answered 503
    app_reset, not sent again (the app may have acted on it); a GET is sent once more, on
    a new connection, though the pool holds other idle ones the app closes as well."""
    seen: list[bytes] = []
    async with keep_alive_app(seen) as (port, accepted):
        inbounds = [
            {"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{port}", "protocol": "http"}
        ]
        raw = agent_yaml(setup.root, "backend", inbound=inbounds, policy=OPEN)
        async with running_agent(raw, local_sign(setup), tmp_path) as agent:

            def ask() -> tuple[Response, Response]:
                client = h2_to(setup, agent.bound["inbound[0]"])
                try:
                    busy = [client.send(request_headers(f"/busy/{i}")) for i in range(3)]
                    assert [client.wait(b).status for b in busy] == [200] * 3  # 3 kept idle
                    posted = client.wait(client.send(request_headers("/stale", "POST")))
                    return posted, client.get("/stale")
                finally:
                    client.close()

            posted, got = await asyncio.to_thread(ask)
    assert posted.status == 503 and b"app_reset" in posted.body
    assert seen.count(b"POST /stale HTTP/1.1") == 1
    assert (got.status, got.body) == (200, b"GET /stale HTTP/1.1 ")
    assert seen.count(b"GET /stale HTTP/1.1") == 2  # on a used connection, then a new one
    assert len(accepted) == 4
