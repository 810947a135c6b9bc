"""The agent's limits: handshake timeout, connection cap, idle timeout, an app that is down,
and closed connections that cannot linger."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest

from agent.adapters import relay as relay_mod
from agent.app import Agent
from tests import certs
from tests.h2backend import h2_backend
from tests.h2raw import H2Client
from tests.httpraw import mtls_socket
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
    sample,
    workload,
)
from tests.support import CaSetup

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


@asynccontextmanager
async def inbound_agent(setup: CaSetup, app_port: int, **limits: Any) -> AsyncIterator[Agent]:
    # A short drain: a test that fails with a connection open should not wait 30 s to say so.
    limits = {"drain_timeout": "500ms", **limits}
    raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port), limits=limits)
    async with running_agent(raw, local_sign(setup), setup.root) as agent:
        yield agent


def frontend(setup: CaSetup) -> ssl.SSLContext:
    return certs.client_context(setup.bundle_pem, certs.valid_svid(setup, workload("frontend")))


async def connect(address: str, context: ssl.SSLContext | None = None) -> Stream:
    host, port = address.rsplit(":", 1)
    server_hostname = "" if context else None
    return await asyncio.wait_for(
        asyncio.open_connection(host, int(port), ssl=context, server_hostname=server_hostname), 2
    )


async def echo(stream: Stream, payload: bytes) -> bytes:
    reader, writer = stream
    writer.write(payload)
    return await asyncio.wait_for(reader.readexactly(len(payload)), 2)


async def seconds_until_closed(stream: Stream, limit: float = 3.0) -> float:
    """Seconds until the agent closes `stream` (EOF, alert or reset); TimeoutError if never."""
    reader, _ = stream
    started = time.monotonic()
    try:
        while await asyncio.wait_for(reader.read(65536), limit):
            pass
    except (ConnectionError, ssl.SSLError):
        pass
    return time.monotonic() - started


def refused(agent: Agent, reason: str) -> float:
    labels = {"direction": "inbound", "reason": reason}
    return sample(agent, "outrider_connections_refused_total", **labels)


@contextmanager
def without_collector() -> Iterator[None]:
    """Inside, only reference counting frees memory: what a cycle holds stays."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def tls_objects() -> int:
    return sum(isinstance(o, ssl.SSLObject) for o in gc.get_objects())


async def test_a_client_that_never_starts_the_handshake_is_closed_after_the_timeout(
    setup: CaSetup,
) -> None:
    async with (
        echo_server() as app_port,
        inbound_agent(setup, app_port, handshake_timeout="1s") as agent,
    ):
        silent = await connect(agent.bound["inbound[0]"])  # TCP only, not a byte sent
        assert 0.9 <= await seconds_until_closed(silent) <= 2.0
        silent[1].close()
        labels = {"direction": "inbound", "result": "refused", "tls_version": "", "cipher": ""}
        assert await eventually(
            lambda: sample(agent, "outrider_tls_handshakes_total", reason="timeout", **labels) == 1
        )
        assert len(agent.connections) == 0


async def test_past_max_connections_a_connection_is_closed_at_once_and_the_others_go_on(
    setup: CaSetup,
) -> None:
    async with (
        echo_server() as app_port,
        inbound_agent(setup, app_port, max_connections=2) as agent,
    ):
        address, context = agent.bound["inbound[0]"], frontend(setup)
        first, second = await connect(address, context), await connect(address, context)
        assert await echo(first, b"one") == b"one"
        assert await echo(second, b"two") == b"two"

        started = time.monotonic()
        try:
            third = await connect(address, context)
            assert await seconds_until_closed(third, limit=1.0) < 1.0
            third[1].close()
        except (ConnectionError, ssl.SSLError):
            pass  # closed before the handshake could finish: the usual outcome
        assert time.monotonic() - started < 1.0
        assert refused(agent, "max_connections") == 1

        assert await echo(first, b"still one") == b"still one"
        assert await echo(second, b"still two") == b"still two"
        first[1].close()  # frees a place for the next connection
        assert await eventually(lambda: len(agent.connections) == 1)
        fourth = await connect(address, context)
        assert await echo(fourth, b"four") == b"four"
        for _, writer in (second, fourth):
            writer.close()
        assert refused(agent, "max_connections") == 1


async def test_a_connection_that_sends_nothing_holds_no_tls_state(setup: CaSetup) -> None:
    # An SSL transport costs ~50 KiB once used: 4000 silent connects took an agent
    # from 50 to 256 MiB. Until the client's first bytes arrive there is none.
    async with echo_server() as app_port, inbound_agent(setup, app_port) as agent:
        address = agent.bound["inbound[0]"]
        gc.collect()
        before = tls_objects()
        silent = [await connect(address) for _ in range(50)]
        assert await eventually(lambda: len(agent.connections) == 50)
        await asyncio.sleep(0.1)  # what each accepted connection would make, made
        assert tls_objects() == before
        assert await echo(await connect(address, frontend(setup)), b"hi") == b"hi"
        for _, writer in silent:
            writer.close()


async def test_past_max_pending_handshakes_the_oldest_goes_and_new_clients_get_in(
    setup: CaSetup,
) -> None:
    async with (
        echo_server() as app_port,
        inbound_agent(setup, app_port, max_pending_handshakes=4) as agent,
    ):
        address, context = agent.bound["inbound[0]"], frontend(setup)
        established = await connect(address, context)
        assert await echo(established, b"one") == b"one"
        silent = []
        for _ in range(6):  # one by one, so the agent sees them in this order
            silent.append(await connect(address))
            assert await eventually(lambda: len(agent.connections) == 1 + min(len(silent), 4))
        assert refused(agent, "max_pending_handshakes") == 2
        assert sample(agent, "outrider_pending_handshakes") == 4
        for oldest in silent[:2]:
            assert await seconds_until_closed(oldest, limit=1.0) < 1.0

        # A client that handshakes gets in past the waiting ones (the oldest goes), and
        # the established connection never counted against the limit.
        newcomer = await connect(address, context)
        assert await echo(newcomer, b"two") == b"two"
        assert refused(agent, "max_pending_handshakes") == 3
        assert await echo(established, b"still one") == b"still one"
        assert await eventually(lambda: sample(agent, "outrider_pending_handshakes") == 3)
        for _, writer in [established, newcomer, *silent]:
            writer.close()


async def test_an_idle_connection_is_closed_and_a_chatty_one_is_not(setup: CaSetup) -> None:
    async with (
        echo_server() as app_port,
        inbound_agent(setup, app_port, idle_timeout="1s") as agent,
    ):
        address, context = agent.bound["inbound[0]"], frontend(setup)
        idle, chatty = await connect(address, context), await connect(address, context)
        assert await echo(idle, b"once") == b"once"

        async def keep_talking() -> float:
            started = time.monotonic()
            for i in range(8):  # 8 x 0.3 s: past twice the idle timeout
                await asyncio.sleep(0.3)
                assert await echo(chatty, b"%d" % i) == b"%d" % i
            return time.monotonic() - started

        idle_for, talked_for = await asyncio.gather(seconds_until_closed(idle), keep_talking())
        # The idle check runs every idle_timeout, so a silent connection goes
        # between one and two timeouts after its last byte.
        assert 0.9 <= idle_for <= 2.5
        assert talked_for > 2.0
        assert await echo(chatty, b"still open") == b"still open"
        assert sample(agent, "outrider_connections_active", direction="inbound") == 1
        for _, writer in (idle, chatty):
            writer.close()


async def test_an_unreachable_app_closes_the_client_with_eof(setup: CaSetup) -> None:
    with socket.socket() as bound_not_listening:  # holds the port: connecting to it is refused
        bound_not_listening.bind(("127.0.0.1", 0))
        app_port = bound_not_listening.getsockname()[1]
        async with inbound_agent(setup, app_port) as agent:
            reader, writer = await connect(agent.bound["inbound[0]"], frontend(setup))
            assert await asyncio.wait_for(reader.read(65536), 2) == b""  # EOF, not a reset
            writer.close()
            assert refused(agent, "app_unreachable") == 1
            peer = {"direction": "inbound", "peer_id": str(workload("frontend"))}
            assert sample(agent, "outrider_peer_connections_total", tls_version="TLSv1.3", **peer)
            assert sample(agent, "outrider_connections_active", direction="inbound") == 0


def sockets_to(port: int) -> int:
    """Open sockets of this process connected to 127.0.0.1:port (from /proc/net/tcp)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    count = 0
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            remote, inode = parts[2], parts[9]
            if int(remote.split(":")[1], 16) == port and inode in inodes:
                count += 1
    return count


def send_then_close(address: str, context: ssl.SSLContext, size: int) -> None:
    host, port = address.rsplit(":", 1)
    raw = socket.create_connection((host, int(port)), timeout=3)
    tls = context.wrap_socket(raw, server_hostname=None)
    tls.sendall(b"x" * size)
    tls.close()


async def test_a_closed_connection_to_an_app_that_does_not_read_is_aborted(
    setup: CaSetup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(relay_mod, "LINGER", 0.5)
    held = []

    async def never_read(r, w):
        held.append(w)
        await asyncio.sleep(30)

    app = await asyncio.start_server(never_read, "127.0.0.1", 0)
    app_port = app.sockets[0].getsockname()[1]
    limits = {"drain_timeout": "200ms", "idle_timeout": "300ms"}
    raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port), limits=limits)
    try:
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            svid = certs.valid_svid(setup, workload("frontend"))
            context = certs.client_context(setup.bundle_pem, svid)
            for _ in range(5):
                await asyncio.to_thread(
                    send_then_close, agent.bound["inbound[0]"], context, 8 << 20
                )
            await asyncio.sleep(1.5)
            open_before_drain = sockets_to(app_port)
        assert open_before_drain == 0, "closed relays keep their app sockets open"
    finally:
        for w in held:
            w.transport.abort()
        app.close()


GET = b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n"


@pytest.mark.parametrize(
    ("protocol", "server_id"),
    [("tcp", "backend"), ("http", "backend"), ("tcp", "someone-else")],
    ids=["tcp", "http", "tcp-upstream-refused-for-its-id"],
)
async def test_closed_connections_free_their_tls_state_without_the_collector(
    setup: CaSetup, protocol: str, server_id: str
) -> None:
    # Each closed connection's TLS object holds tens of KB of OpenSSL buffers: left in a
    # reference cycle, it waits for the collector, and under churn the agent grows by them.
    # Over HTTP the app closes every connection: the outbound's pooled ones close too.
    # An upstream refused for its ID has its transport aborted right after the handshake:
    # the relay must not linger on it (10 s) as on a closing one.
    app_server = closing_http_server() if protocol == "http" else echo_server()
    payload, expect = (GET, b"HTTP/1.1 200") if protocol == "http" else (b"ping", b"ping")
    refused = server_id != "backend"
    async with app_server as app_port:
        raw = agent_yaml(
            setup.root,
            "backend",
            inbound=inbound(app_port, protocol=protocol),
            limits={"drain_timeout": "500ms"},
        )
        async with running_agent(raw, local_sign(setup), setup.root) as server:
            out = outbound(server.bound["inbound[0]"], workload(server_id))
            out[0]["protocol"] = protocol
            raw = agent_yaml(setup.root, "frontend", outbound=out)
            async with running_agent(raw, local_sign(setup), setup.root) as client:
                address = client.bound["outbound[backend]"]
                with without_collector():
                    before = tls_objects()
                    for _ in range(50 if refused else 200):
                        answer = await round_trip(address, payload)
                        assert answer == b"" if refused else answer[: len(expect)] == expect
                    assert await eventually(
                        lambda: not client.connections and not server.connections
                    )
                    await asyncio.sleep(0.2)  # the last closes reach both sides' transports
                    alive = tls_objects() - before
    assert alive < 10, f"{alive} TLS objects of closed connections are still alive"


@pytest.mark.parametrize("protocol", ["http2", "http"])
async def test_closed_h2_connections_free_their_tls_state_without_the_collector(
    setup: CaSetup, protocol: str
) -> None:
    # As above, for an h2 client of an http2 port and of an http port (ALPN h2: its
    # streams parsed): the TLS object and the peer's certificate, which the event loop's
    # transport keeps as its `peercert` (tls._PeerCert: decoded only if read), go with it.
    # The app speaks h2 behind an http2 port, HTTP/1.1 behind an http one.
    async with h2_backend("backend") as h2_app, closing_http_server() as http_app:
        app_port = h2_app.port if protocol == "http2" else http_app
        raw = agent_yaml(
            setup.root,
            "backend",
            inbound=inbound(app_port, protocol=protocol),
            limits={"drain_timeout": "500ms"},
        )
        async with running_agent(raw, local_sign(setup), setup.root) as server:
            address = server.bound["inbound[0]"]

            def one_request() -> int:
                client = H2Client(mtls_socket(setup, address, "frontend", ("h2",)))
                try:
                    return client.get("/").status
                finally:
                    client.close()

            with without_collector():
                before = tls_objects()
                for _ in range(100):
                    assert await asyncio.to_thread(one_request) == 200
                assert await eventually(lambda: not server.connections)
                await asyncio.sleep(0.2)  # the last closes reach the transports
                alive = tls_objects() - before
    assert alive < 10, f"{alive} TLS objects of closed h2 connections are still alive"
