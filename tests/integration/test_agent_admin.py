"""The agent's admin and status servers as a client sees them: routes, keep-alive, bad
requests, and what an unauthenticated caller can hold there."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from agent.app import Agent
from tests.mesh import agent_yaml, eventually, local_sign, running_agent, sample
from tests.support import CaSetup


@pytest.fixture
async def agent(setup: CaSetup) -> AsyncIterator[Agent]:
    raw = agent_yaml(setup.root, "web", status="127.0.0.1:0")
    async with running_agent(raw, local_sign(setup), setup.root) as a:
        yield a


@asynccontextmanager
async def limited_agent(setup: CaSetup, **limits: object) -> AsyncIterator[Agent]:
    raw = agent_yaml(setup.root, "web", status="127.0.0.1:0", limits=limits)
    async with running_agent(raw, local_sign(setup), setup.root) as a:
        yield a


async def exchange(
    agent: Agent, request: bytes, server: str = "admin"
) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes to the admin (or status) port; every response until the server closes."""
    host, port = agent.bound[server].rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(request)
    responses = []
    try:
        while status_line := await asyncio.wait_for(reader.readline(), 5):
            headers = {}
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, value = line.decode().split(":", 1)
                headers[name.lower()] = value.strip()
            body = await reader.readexactly(int(headers["content-length"]))
            responses.append((int(status_line.split()[1]), headers, body))
            if headers["connection"] == "close":
                break
    finally:
        writer.close()
    return responses


def tuple_address(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


def get(path: str, *, close: bool = False) -> bytes:
    connection = b"Connection: close\r\n" if close else b""
    return b"GET %s HTTP/1.1\r\nHost: admin\r\n%s\r\n" % (path.encode(), connection)


async def test_every_route_answers_on_one_kept_alive_connection(agent: Agent) -> None:
    paths = ["/ready", "/healthz", "/metrics", "/config_dump", "/certs?x=1"]
    responses = await exchange(agent, b"".join(get(p) for p in paths) + get("/ready", close=True))
    assert [status for status, _, _ in responses] == [200] * 6
    ready, healthz, metrics, config, certs, _ = (body for _, _, body in responses)
    assert (ready, healthz) == (b"ready\n", b"ok\n")
    assert b"outrider_svid_expiry_timestamp_seconds" in metrics
    assert json.loads(config)["config"]["identity"]["spiffe_id"].endswith("/sa/web")
    assert json.loads(certs)["spiffe_id"].endswith("/sa/web")
    assert responses[2][1]["content-type"].startswith("text/plain; version=")


async def test_head_has_no_body_and_other_methods_are_refused(agent: Agent) -> None:
    (head,) = await exchange(agent, b"HEAD /healthz HTTP/1.1\r\nConnection: close\r\n\r\n")
    assert head[0] == 200 and head[2] == b""
    post = b"POST /ready HTTP/1.1\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi"
    assert (await exchange(agent, post))[0][0] == 405
    assert (await exchange(agent, get("/nothing", close=True)))[0][0] == 404


async def test_bad_and_oversized_requests_are_refused_and_the_server_goes_on(
    agent: Agent,
) -> None:
    ((status, headers, _),) = await exchange(agent, b"NOT HTTP AT ALL\r\n\r\n")
    assert (status, headers["connection"]) == (400, "close")
    huge = b"GET /ready HTTP/1.1\r\nX-Big: " + b"a" * 64 * 1024 + b"\r\n\r\n"
    assert (await exchange(agent, huge))[0][0] == 431
    assert (await exchange(agent, get("/ready", close=True)))[0][0] == 200


async def test_the_status_port_serves_probes_and_metrics_and_nothing_that_reveals_more(
    agent: Agent,
) -> None:
    # The pod network reaches the status port; /config_dump and /certs name the mesh's
    # topology and who may call this pod, so only loopback (the admin port) has them.
    paths = ["/ready", "/healthz", "/metrics", "/config_dump", "/certs"]
    request = b"".join(get(p) for p in paths) + get("/ready", close=True)
    responses = await exchange(agent, request, "status")
    assert [status for status, _, _ in responses] == [200, 200, 200, 404, 404, 200]
    assert b"outrider_svid_expiry_timestamp_seconds" in responses[2][2]
    assert [s for s, _, _ in await exchange(agent, request)] == [200] * 6  # admin: all


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def open_idle(agent: Agent, server: str, count: int) -> list[Stream]:
    host, port = agent.bound[server].rsplit(":", 1)
    return [await asyncio.open_connection(host, int(port)) for _ in range(count)]


async def closed_by_agent(stream: Stream, within: float) -> bool:
    try:
        return await asyncio.wait_for(stream[0].read(1), within) == b""
    except ConnectionError:
        return True
    except TimeoutError:
        return False


def refused(agent: Agent, server: str, reason: str) -> float:
    return sample(agent, "outrider_connections_refused_total", direction=server, reason=reason)


@pytest.mark.parametrize("server", ["admin", "status"])
async def test_past_the_connection_cap_the_oldest_goes_and_probes_still_answer(
    setup: CaSetup, server: str
) -> None:
    # 1100 idle connections to an uncapped admin port once took every file descriptor:
    # the inbound listener failed with EMFILE and /ready with it.
    async with limited_agent(setup, admin_max_connections=4) as agent:
        idle = await open_idle(agent, server, 12)
        assert await eventually(lambda: refused(agent, server, "max_connections") == 8)
        for oldest in idle[:8]:
            assert await closed_by_agent(oldest, 1.0)
        for newest in idle[8:]:
            assert not await closed_by_agent(newest, 0.05)
        ((status, _, body),) = await exchange(agent, get("/ready", close=True), server)
        assert (status, body) == (200, b"ready\n")
        for _, writer in idle:
            writer.close()


async def test_a_request_too_slow_to_arrive_and_an_idle_connection_are_closed(
    setup: CaSetup,
) -> None:
    timeouts = {"admin_request_timeout": "300ms", "admin_idle_timeout": "600ms"}
    async with limited_agent(setup, **timeouts) as agent:
        slow, idle, kept_alive = await open_idle(agent, "admin", 3)
        started = time.monotonic()
        slow[1].write(b"GET /ready HTTP/1.1\r\nHost: ad")  # and never the rest
        kept_alive[1].write(get("/healthz"))
        assert (await kept_alive[0].readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
        assert await closed_by_agent(slow, 2.0)
        assert 0.25 <= time.monotonic() - started < 1.0
        assert refused(agent, "admin", "request_timeout") == 1
        assert await closed_by_agent(idle, 2.0)
        assert await closed_by_agent(kept_alive, 2.0)
        assert 0.55 <= time.monotonic() - started < 2.0
        for _, writer in (slow, idle, kept_alive):
            writer.close()


async def test_a_request_begun_behind_an_answered_one_has_the_request_timeout_too(
    setup: CaSetup,
) -> None:
    # A slow head sent in the same packet as a whole request must not get the idle
    # timeout (a minute by default) in place of the request timeout.
    timeouts = {"admin_request_timeout": "300ms", "admin_idle_timeout": "5s"}
    async with limited_agent(setup, **timeouts) as agent:
        ((reader, writer),) = await open_idle(agent, "status", 1)
        started = time.monotonic()
        writer.write(get("/healthz") + b"GET /ready HTTP/1.1\r\nHost: ad")  # and no more
        assert (await reader.readuntil(b"ok\n")).startswith(b"HTTP/1.1 200")
        assert await closed_by_agent((reader, writer), 2.0)
        assert time.monotonic() - started < 1.0
        assert refused(agent, "status", "request_timeout") == 1
        writer.close()


async def test_a_client_that_asks_and_never_reads_is_closed_not_buffered_for(
    agent: Agent,
) -> None:
    # Pipelined /metrics requests cost 30 bytes each and their answers KBs: unread,
    # they would pile up in the agent's memory without end.
    # A small receive buffer: the kernel then holds few unread answers, and the agent's
    # own buffer fills within the first reads. With the default (MBs, autotuned), whether
    # it passed the limit before the agent stopped reading depended on /metrics' size.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(tuple_address(agent.bound["admin"]))
    reader, writer = await asyncio.open_connection(sock=sock)
    reader._transport.pause_reading()  # type: ignore[attr-defined]  # never read
    for _ in range(200):  # 8 KB at a time, each asking for MBs, until the agent gives up
        writer.write(get("/metrics") * 210)
        if await eventually(lambda: refused(agent, "admin", "unread_responses") == 1, 0.02):
            break
    assert refused(agent, "admin", "unread_responses") == 1
    writer.close()
