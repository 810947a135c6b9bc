"""What the agent's listeners refuse, each with the reason it is counted under.

Inbound: a client certificate of every wrong shape is refused before the app
sees a connection. Outbound: a server presenting another workload's SVID is
refused before it sees a byte of the app's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from agent.app import Agent
from identity import SpiffeId
from tests import certs
from tests.certs import Credential
from tests.mesh import (
    agent_yaml,
    echo_server,
    eventually,
    inbound,
    local_sign,
    mtls_exchange,
    outbound,
    round_trip,
    running_agent,
    sample,
    workload,
)
from tests.support import CaSetup

FRONTEND, INTRUDER = workload("frontend"), workload("intruder")
FOREIGN_FRONTEND = f"spiffe://{certs.FOREIGN_DOMAIN}/ns/demo/sa/frontend"
PAYLOAD = b"secret for the app"
# A test that fails with a connection still open should not wait 30 s to say so.
LIMITS = {"drain_timeout": "500ms"}


def refusals(agent: Agent, direction: str) -> dict[str, float]:
    """Refused handshakes on `direction`, by reason."""
    counted: dict[str, float] = {}
    for metric in agent.metrics.registry.collect():
        for s in metric.samples:
            if (
                s.name == "outrider_tls_handshakes_total"
                and s.labels["direction"] == direction
                and s.labels["result"] == "refused"
            ):
                counted[s.labels["reason"]] = counted.get(s.labels["reason"], 0) + s.value
    return counted


@pytest.fixture
async def app_and_agent(setup: CaSetup) -> AsyncIterator[tuple[list[int], Agent]]:
    """An agent whose inbound listener lets only FRONTEND through to a counting echo app."""
    accepted: list[int] = []
    async with echo_server(accepted) as app_port:
        allow = {"spiffe_ids": [str(FRONTEND)]}
        raw = agent_yaml(
            setup.root, "backend", inbound=inbound(app_port, allow=allow), limits=LIMITS
        )
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            yield accepted, agent


async def assert_refused(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent], client: Credential | None, reason: str
) -> None:
    accepted, agent = app_and_agent
    context = certs.client_context(setup.bundle_pem, client)
    assert await mtls_exchange(agent.bound["inbound[0]"], context) == b""
    assert await eventually(lambda: bool(refusals(agent, "inbound"))), "no refusal counted"
    assert refusals(agent, "inbound") == {reason: 1}
    assert accepted == [], "the app saw a connection from a refused peer"
    assert sample(agent, "outrider_peer_connections_total", **_peer(FRONTEND)) == 0
    assert established(agent) == {}, "a refused connection was counted as established"


def established(agent: Agent) -> dict[tuple[str, str, str], float]:
    """outrider_connections_total by (direction, mtls, peer_id): counted once established."""
    return {
        (s.labels["direction"], s.labels["mtls"], s.labels["peer_id"]): s.value
        for metric in agent.metrics.registry.collect()
        for s in metric.samples
        if s.name == "outrider_connections_total"
    }


def _peer(spiffe_id: object) -> dict[str, str]:
    return {"direction": "inbound", "peer_id": str(spiffe_id), "tls_version": "TLSv1.3"}


async def test_an_allowed_svid_gets_its_bytes_echoed(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent]
) -> None:
    accepted, agent = app_and_agent
    context = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, FRONTEND))
    assert await mtls_exchange(agent.bound["inbound[0]"], context) == PAYLOAD
    assert accepted == [1]
    assert refusals(agent, "inbound") == {}
    assert sample(agent, "outrider_peer_connections_total", **_peer(FRONTEND)) == 1
    assert established(agent) == {("inbound", "true", str(FRONTEND)): 1}  # once, with its ID


async def test_no_client_certificate(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent]
) -> None:
    await assert_refused(setup, app_and_agent, None, "no_client_cert")


async def test_an_svid_from_another_trust_domains_ca(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent], tmp_path: Path
) -> None:
    await assert_refused(setup, app_and_agent, certs.foreign_svid(tmp_path / "other"), "unknown_ca")


async def test_our_roots_svid_for_another_trust_domain(setup: CaSetup) -> None:
    """Even on the allow-list: our bundle vouches for example.org's IDs only."""
    client = certs.cross_domain_svid(setup)
    allow = {"spiffe_ids": [FOREIGN_FRONTEND]}
    async with echo_server() as app_port:
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port, allow=allow))
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            context = certs.client_context(setup.bundle_pem, client)
            assert await mtls_exchange(agent.bound["inbound[0]"], context) == b""
            assert await eventually(lambda: bool(refusals(agent, "inbound")))
            assert refusals(agent, "inbound") == {"foreign_trust_domain": 1}


async def test_an_expired_svid(setup: CaSetup, app_and_agent: tuple[list[int], Agent]) -> None:
    await assert_refused(setup, app_and_agent, certs.expired_svid(setup, FRONTEND), "expired")


async def test_a_leaf_whose_date_cannot_be_read(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent]
) -> None:
    """Year 0000: OpenSSL verifies it, the agent cannot read it; refused and closed (an
    agent that failed on it left the connection open and uncounted)."""
    client = certs.year_zero_svid(setup, FRONTEND)
    await assert_refused(setup, app_and_agent, client, "malformed_extensions")


async def test_two_uri_sans(setup: CaSetup, app_and_agent: tuple[list[int], Agent]) -> None:
    client = certs.two_uri_sans(setup, FRONTEND, INTRUDER)
    await assert_refused(setup, app_and_agent, client, "multiple_uri_sans")


async def test_a_ca_certificate_naming_a_workload(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent]
) -> None:
    await assert_refused(setup, app_and_agent, certs.ca_certificate(setup, FRONTEND), "is_ca")


async def test_a_dns_san_spelling_a_spiffe_id(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent]
) -> None:
    await assert_refused(setup, app_and_agent, certs.dns_san_only(setup, FRONTEND), "no_uri_san")


async def test_an_eku_without_client_auth(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent]
) -> None:
    client = certs.server_auth_only(setup, FRONTEND)
    await assert_refused(setup, app_and_agent, client, "wrong_usage")


async def test_a_valid_svid_not_on_the_allow_list(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent]
) -> None:
    await assert_refused(setup, app_and_agent, certs.valid_svid(setup, INTRUDER), "not_allowed")


async def test_a_peer_refused_again_and_again_is_logged_a_line_a_while(
    setup: CaSetup, app_and_agent: tuple[list[int], Agent], caplog: pytest.LogCaptureFixture
) -> None:
    """Any workload of the mesh can connect: one refused 30 times in a row gets one line
    (and the count), not 30: a log line per connection is the caller's to multiply."""
    _, agent = app_and_agent
    caplog.set_level(logging.INFO)
    context = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, INTRUDER))
    for _ in range(30):
        assert await mtls_exchange(agent.bound["inbound[0]"], context) == b""
    assert await eventually(lambda: refusals(agent, "inbound").get("not_allowed") == 30)
    assert caplog.text.count("not on the allow-list") == 1


# --- outbound ----------------------------------------------------------------------


@asynccontextmanager
async def tls_server(context: ssl.SSLContext) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A plain TLS server (not an agent); yields its port and every byte it received."""
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await asyncio.wait_for(reader.read(65536), 2):
                received.append(data)
        except (ConnectionError, ssl.SSLError, TimeoutError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1], received
    finally:
        server.close()


async def test_a_server_presenting_another_workloads_svid(setup: CaSetup) -> None:
    impostor = certs.server_context(setup.bundle_pem, certs.valid_svid(setup, INTRUDER))
    async with tls_server(impostor) as (port, received):
        upstream = outbound(f"127.0.0.1:{port}", workload("backend"))
        raw = agent_yaml(setup.root, "frontend", outbound=upstream, limits=LIMITS)
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            assert await round_trip(agent.bound["outbound[backend]"], PAYLOAD, 2) == b""
            assert await eventually(lambda: bool(refusals(agent, "outbound")))
            assert refusals(agent, "outbound") == {"wrong_server_id": 1}
            refused = {"direction": "outbound", "reason": "no_endpoint"}
            assert sample(agent, "outrider_connections_refused_total", **refused) == 1
        assert b"".join(received) == b"", "the impostor received the app's bytes"


async def test_a_server_with_our_roots_svid_for_another_trust_domain(setup: CaSetup) -> None:
    """Even when named in server_ids: our bundle vouches for example.org's IDs only."""
    impostor = certs.server_context(setup.bundle_pem, certs.cross_domain_svid(setup))
    async with tls_server(impostor) as (port, received):
        upstream = outbound(f"127.0.0.1:{port}", SpiffeId.parse(FOREIGN_FRONTEND))
        raw = agent_yaml(setup.root, "frontend", outbound=upstream, limits=LIMITS)
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            assert await round_trip(agent.bound["outbound[backend]"], PAYLOAD, 2) == b""
            assert await eventually(lambda: bool(refusals(agent, "outbound")))
            assert refusals(agent, "outbound") == {"foreign_trust_domain": 1}
        assert b"".join(received) == b"", "the impostor received the app's bytes"


async def test_a_server_whose_date_cannot_be_read_is_refused_and_frees_its_slot(
    setup: CaSetup,
) -> None:
    """Each dial to it is refused as any non-SVID is, and gives back its place under
    max_connections: one held per dial would leave the upstream answering 503 for good."""
    bad = certs.server_context(setup.bundle_pem, certs.year_zero_svid(setup, workload("backend")))
    async with tls_server(bad) as (port, received):
        upstream = outbound(f"127.0.0.1:{port}", workload("backend"))
        upstream[0]["protocol"] = "http"
        upstream[0]["circuit_breaker"] = {"max_connections": 2}
        raw = agent_yaml(setup.root, "frontend", outbound=upstream, limits=LIMITS)
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            address = agent.bound["outbound[backend]"]
            for _ in range(4):
                answer = await round_trip(address, b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", 2)
                assert answer.startswith(b"HTTP/1.1 503") and b"overflow" not in answer, answer
            assert refusals(agent, "outbound") == {"malformed_extensions": 4}
        assert b"".join(received) == b"", "the server received the app's bytes"


async def test_an_endpoint_where_nothing_listens(setup: CaSetup) -> None:
    with socket.socket() as bound_not_listening:  # holds the port: connecting to it is refused
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        upstream = outbound(f"127.0.0.1:{port}", workload("backend"))
        raw = agent_yaml(setup.root, "frontend", outbound=upstream, limits=LIMITS)
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            assert await round_trip(agent.bound["outbound[backend]"], PAYLOAD, 2) == b""
            refused = {"direction": "outbound", "reason": "no_endpoint"}
            assert await eventually(
                lambda: sample(agent, "outrider_connections_refused_total", **refused) == 1
            )
            assert sample(agent, "outrider_connections_active", direction="outbound") == 0
