"""Access log lines of connections the agent refuses before relaying them: pods as network
namespaces with real nft rules, their agents real processes whose stdout (the access log)
is a pipe read here.

An auditor reads denials from the access log, so a captured connection the agent refuses
(`registry_only`: outside the mesh with the outbound policy registry-only, Istio's
BlackHoleCluster; `capture_loop`) gets a line in `mode: denied` (and all), never in off:
L4, `decision` deny, `error` the reason as connections_refused_total names it, `endpoint`
where the app was going, no peer and no TLS. The app can refuse itself as fast as it
connects: a flood leaves the agent serving, every refusal counted, and every one logged or
counted as a dropped line.

A caller's inbound connection to one of the agent's own ports of the pod is refused and
logged the same way.

The pods: `audited` (mode denied) and `quiet` (mode off), both registry-only with one
registry address outside the mesh (a plain echo on the node) passed through; `crowd` as
`audited`, its agent with `workers: 2` (each worker's lines and drops add up).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from agent.core.accesslog import FIELDS
from identity.injected import AGENT_UID
from tests.integration.test_access_log_outbound import echoed
from tests.integration.test_capture_listeners import capture, captured_config
from tests.mesh import Logged, echo, eventually, logged_agent, workload
from tests.mesh_cluster import metric
from tests.netns import Pod, PodNetwork, pod_network
from tests.support import ca_process, free_port, make_ca_setup

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

FLOOD = 500  # refusals the app makes in the flood test
BATCH = 50  # of them at once


@dataclass
class Pods:
    network: PodNetwork
    audited: Pod
    quiet: Pod
    crowd: Pod
    agents: dict[str, Logged]
    outside: str  # a plain echo on the node, in the registry: passed through

    def refused(self, pod: Pod, reason: str) -> float:
        labels = {"direction": "outbound", "reason": reason}
        return metric(pod, "outrider_connections_refused_total", **labels)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pods(tmp_path_factory: pytest.TempPathFactory, nft: str) -> AsyncIterator[Pods]:
    tmp_path = tmp_path_factory.mktemp("refused-log")
    with pod_network() as network:
        setup = make_ca_setup(
            tmp_path, listen={"grpc": f"{network.node_ip}:0", "http": "127.0.0.1:0"}
        )
        audited, quiet = network.add_pod("audited"), network.add_pod("quiet")
        crowd = network.add_pod("crowd")
        outside_app = await asyncio.start_server(echo, network.node_ip, 0)
        outside = f"{network.node_ip}:{outside_app.sockets[0].getsockname()[1]}"
        registry = {"policy": "registry-only", "passthrough": [outside]}
        try:
            with ca_process(setup.config) as ca, ExitStack() as stack:
                address = f"{network.node_ip}:{ca.grpc_port}"
                agents = {}
                for pod, mode, workers in (
                    (audited, "denied", 1),
                    (quiet, "off", 1),
                    (crowd, "denied", 2),
                ):
                    capture(pod)
                    raw = captured_config(
                        setup,
                        address,
                        pod,
                        access_log={"mode": mode},
                        captured={"outbound": registry},
                        workers=workers,
                    )
                    prefix = pod.command([], AGENT_UID)
                    agents[pod.name] = stack.enter_context(
                        logged_agent(setup.root, pod.name, raw, prefix=prefix)
                    )
                yield Pods(network, audited, quiet, crowd, agents, outside)
        finally:
            outside_app.close()


async def closed_at_once(pod: Pod, destination: str) -> None:
    """The app's connection to `destination`, which the agent closes unread."""
    host, port = destination.rsplit(":", 1)
    reader, writer = await pod.open_connection(host, int(port))
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()


def refusal_lines(lines: list[dict[str, Any]], reason: str) -> list[dict[str, Any]]:
    return [line for line in lines if line["error"] == reason]


async def test_a_registry_only_refusal_is_logged_as_a_denial_naming_where_the_app_went(
    pods: Pods,
) -> None:
    """mode denied: one L4 line, decision deny, error registry_only, the destination the
    app asked for, nothing of a peer or TLS (none was had), every field present."""
    audited = pods.agents["audited"]
    audited.lines()
    before = pods.refused(pods.audited, "registry_only")
    blocked = f"{pods.network.node_ip}:{free_port()}"  # outside the mesh, not in the registry
    await closed_at_once(pods.audited, blocked)
    (line,) = refusal_lines(
        await audited.arrived(lambda line: line["endpoint"] == blocked), "registry_only"
    )
    assert list(line) == list(FIELDS)
    assert (line["kind"], line["direction"], line["decision"]) == ("tcp", "outbound", "deny")
    assert (line["endpoint"], line["error"], line["local_id"]) == (
        blocked,
        "registry_only",
        str(workload("audited")),
    )
    for name in ("peer_id", "tls_version", "cipher", "method", "path", "status", "policy"):
        assert line[name] is None, name
    assert (line["bytes_in"], line["bytes_out"], line["tries"], line["upstream"]) == (
        0,
        0,
        None,
        None,
    )
    assert pods.refused(pods.audited, "registry_only") == before + 1

    # What the registry passes gets no line in mode denied (nothing was denied).
    assert await echoed(await pods.audited.open_connection(*_split(pods.outside)), b"hi") == b"hi"
    assert not [line for line in audited.lines() if line["endpoint"] == pods.outside]


async def test_a_capture_loop_refusal_is_logged_too(pods: Pods) -> None:
    """An app's connection to a capture port would come back to the agent: refused, and
    logged with that reason and where it was going."""
    audited = pods.agents["audited"]
    audited.lines()
    loop = "198.51.100.9:15007"
    await closed_at_once(pods.audited, loop)
    (line,) = refusal_lines(
        await audited.arrived(lambda line: line["endpoint"] == loop), "capture_loop"
    )
    assert (line["decision"], line["direction"], line["peer_id"]) == ("deny", "outbound", None)


async def test_mode_off_logs_no_refusal_and_counts_it(pods: Pods) -> None:
    quiet = pods.agents["quiet"]
    before = pods.refused(pods.quiet, "registry_only")
    await closed_at_once(pods.quiet, f"{pods.network.node_ip}:{free_port()}")
    assert await eventually(lambda: pods.refused(pods.quiet, "registry_only") == before + 1, 5)
    assert quiet.lines() == []


async def test_a_flood_of_refusals_is_logged_or_counted_dropped_and_the_agent_serves(
    pods: Pods,
) -> None:
    """FLOOD refusals the app makes as fast as it can: each counted, each either a line or
    a dropped line (never silently lost), the lines bounded (the address the app asked
    for, no more), and the agent still passes the registry's traffic through."""
    audited = pods.agents["audited"]
    pod = pods.audited
    audited.lines()
    agent = audited.agent

    def dropped() -> float:
        return metric(pod, "outrider_access_log_dropped_lines_total")

    refused, lost = pods.refused(pod, "registry_only"), dropped()
    node = pods.network.node_ip
    targets = [f"{node}:{port}" for port in range(40000, 40000 + FLOOD)]
    for start in range(0, FLOOD, BATCH):
        await asyncio.gather(*(closed_at_once(pod, t) for t in targets[start:][:BATCH]))
    assert pods.refused(pod, "registry_only") == refused + FLOOD
    lines: list[dict[str, Any]] = []

    def accounted() -> bool:
        lines.extend(refusal_lines(audited.lines(), "registry_only"))
        return len(lines) + dropped() - lost >= FLOOD

    assert await eventually(accounted, 10), (len(lines), dropped() - lost)
    assert len(lines) + dropped() - lost == FLOOD
    assert sorted(line["endpoint"] for line in lines) == sorted(
        {line["endpoint"] for line in lines}
    )
    assert {line["endpoint"] for line in lines} <= set(targets)
    assert max(len(str(line)) for line in lines) < 1024
    assert await echoed(await pod.open_connection(*_split(pods.outside)), b"ok") == b"ok"
    assert agent.process.poll() is None
    assert not any("Traceback" in line for line in agent.log)


def _split(address: str) -> tuple[str, int]:
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def test_an_inbound_capture_loop_refusal_is_logged_with_the_port_it_asked_for(
    pods: Pods,
) -> None:
    """A caller's connection to one of the agent's own ports of the pod (its admin port),
    captured: never relayed to the agent itself; a denial's line naming that address."""
    audited = pods.agents["audited"]
    audited.lines()
    port = int(audited.agent.bound["admin"].rsplit(":", 1)[1])
    asked = f"{pods.audited.ip}:{port}"
    reader, writer = await asyncio.open_connection(pods.audited.ip, port)  # from the node
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
    (line,) = refusal_lines(
        await audited.arrived(lambda line: line["endpoint"] == asked), "capture_loop"
    )
    assert (line["direction"], line["decision"], line["peer_id"], line["tls_version"]) == (
        "inbound",
        "deny",
        None,
        None,
    )


async def test_an_agent_with_workers_serves_a_captured_pod_and_logs_its_refusals(
    pods: Pods,
) -> None:
    """`crowd`'s agent (workers: 2) started: each worker took the capture ports, IPv6 ones
    too. Its workers' refusals are each logged once, the registry passed through."""
    crowd = pods.agents["crowd"]
    crowd.lines()
    before = pods.refused(pods.crowd, "registry_only")
    blocked = [f"{pods.network.node_ip}:{port}" for port in range(41000, 41000 + BATCH)]
    await asyncio.gather(*(closed_at_once(pods.crowd, target) for target in blocked))
    lines: list[dict[str, Any]] = []

    def arrived() -> bool:
        lines.extend(refusal_lines(crowd.lines(), "registry_only"))
        return len(lines) >= BATCH

    assert await eventually(arrived, 10), len(lines)
    assert sorted(line["endpoint"] for line in lines) == sorted(blocked)
    assert pods.refused(pods.crowd, "registry_only") == before + BATCH
    assert await echoed(await pods.crowd.open_connection(*_split(pods.outside)), b"ok") == b"ok"
