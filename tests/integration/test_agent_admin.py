"""The agent's admin server as a client sees it: routes, keep-alive, and bad requests."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from agent.app import Agent
from tests.mesh import agent_yaml, local_sign, running_agent
from tests.support import CaSetup


@pytest.fixture
async def agent(setup: CaSetup) -> AsyncIterator[Agent]:
    async with running_agent(agent_yaml(setup.root, "web"), local_sign(setup), setup.root) as a:
        yield a


async def exchange(agent: Agent, request: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Send raw bytes to the admin port; every response until the server closes."""
    host, port = agent.bound["admin"].rsplit(":", 1)
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
