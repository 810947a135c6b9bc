"""Access log lines of captured outbound traffic: pods as network namespaces with real nft
rules, their agents real processes whose stdout (the access log) is a pipe read here.

Every way the client pod's app can leave gets a line that says where it went and how:
- a mesh pod's own address (mTLS pinned to that pod): one line when the connection ends,
  naming the peer it reached and the TLS, as the server's inbound line names them;
- a Service address (the upstream's own path): per connection (tcp) or request (http);
- an address outside the mesh, passed through in plain: its line says so, with no peer
  and no TLS fields, as an inbound plaintext line does; one that cannot be reached
  says why.

The pods: `server` (an HTTP app on 8080, an echo on 9090, both strict mTLS) and `client`
(upstreams `server.demo:8080` (http) and `echo.demo:9090` (tcp), each with a Service-like
address and the server pod's IP as its endpoint); a plain echo on the node, outside the mesh.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_asyncio

from identity.injected import AGENT_UID
from tests.integration.test_access_log_outbound import TLS_FIELDS, echoed, outbound_lines
from tests.integration.test_capture_listeners import (
    SERVICE,
    HttpApp,
    body,
    capture,
    captured_config,
    exchange,
)
from tests.mesh import Logged, echo, logged_agent, workload
from tests.netns import Pod, PodNetwork, pod_network
from tests.support import ca_process, free_port, make_ca_setup

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

ECHO_SERVICE = "198.51.100.22:9090"  # TEST-NET-2: routed nowhere, captured in the pod first
SERVER = str(workload("server"))
HTTP, ECHO = "server.demo:8080", "echo.demo:9090"


@dataclass
class Pods:
    network: PodNetwork
    server: Pod
    client: Pod
    agents: dict[str, Logged]
    outside: str  # a plain echo on the node: outside the mesh

    async def lines(self, pod: str, predicate: Any) -> list[dict[str, Any]]:
        return await self.agents[pod].arrived(predicate)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pods(tmp_path_factory: pytest.TempPathFactory, nft: str) -> AsyncIterator[Pods]:
    tmp_path = tmp_path_factory.mktemp("captured-log")
    with pod_network() as network:
        setup = make_ca_setup(
            tmp_path, listen={"grpc": f"{network.node_ip}:0", "http": "127.0.0.1:0"}
        )
        server, client = network.add_pod("server"), network.add_pod("client")
        apps = [
            await server.start_server(HttpApp().handle, "0.0.0.0", 8080),
            await server.start_server(echo, "0.0.0.0", 9090),
            await asyncio.start_server(echo, network.node_ip, 0),
        ]
        outside = f"{network.node_ip}:{apps[2].sockets[0].getsockname()[1]}"
        try:
            with ca_process(setup.config) as ca, ExitStack() as stack:
                address = f"{network.node_ip}:{ca.grpc_port}"
                ports = {"8080": {"protocol": "http"}, "9090": {"protocol": "tcp"}}
                upstreams = [
                    {
                        "name": name,
                        "protocol": protocol,
                        "destinations": [service],
                        "endpoints": [f"{server.ip}:{port}"],  # the server pod's IP
                        "server_ids": [SERVER],
                    }
                    for name, protocol, service, port in (
                        (HTTP, "http", SERVICE, 8080),
                        (ECHO, "tcp", ECHO_SERVICE, 9090),
                    )
                ]
                configs: list[tuple[Pod, dict[str, Any]]] = [
                    (server, {"captured": {"inbound": {"ports": ports}}}),
                    (client, {"outbound": upstreams}),
                ]
                agents = {}
                for pod, sections in configs:
                    capture(pod)
                    raw = captured_config(
                        setup, address, pod, access_log={"mode": "all"}, **sections
                    )
                    prefix = pod.command([], AGENT_UID)
                    agents[pod.name] = stack.enter_context(
                        logged_agent(setup.root, pod.name, raw, prefix=prefix)
                    )
                yield Pods(network, server, client, agents, outside)
        finally:
            for app in apps:
                app.close()


async def test_a_connection_to_a_mesh_pods_address_names_the_peer_and_tls_it_reached(
    pods: Pods,
) -> None:
    """Pinned to the pod the app called, over mTLS: its line and the server's inbound line
    of the same connection say the same TLS, each naming the other end."""
    for logged in pods.agents.values():
        logged.lines()
    payload = b"p" * 2500
    assert await echoed(await pods.client.open_connection(pods.server.ip, 9090), payload) == payload
    (out,) = outbound_lines(await pods.lines("client", lambda line: line["kind"] == "tcp"), ECHO)
    into = await pods.lines("server", lambda line: line["kind"] == "tcp")
    (inbound_line,) = [line for line in into if line["kind"] == "tcp"]
    assert (out["peer_id"], inbound_line["peer_id"]) == (SERVER, str(workload("client")))
    assert (out["endpoint"], out["tries"], out["error"]) == (f"{pods.server.ip}:9090", 1, None)
    assert [out[name] for name in TLS_FIELDS] == [inbound_line[name] for name in TLS_FIELDS]
    assert out["tls_version"] == "TLSv1.3"
    assert out["bytes_in"] == out["bytes_out"] == inbound_line["bytes_out"] == len(payload)


async def test_a_service_address_is_logged_as_its_upstream_serves_it(pods: Pods) -> None:
    """A tcp Service: a line per connection; an http one: a line per request. Both name the
    server pod they were balanced to, its peer ID and the TLS."""
    client = pods.agents["client"]
    client.lines()
    host, port = ECHO_SERVICE.split(":")
    assert await echoed(await pods.client.open_connection(host, int(port)), b"ping") == b"ping"
    host, port = SERVICE.split(":")
    caller = f"By={SERVER};URI={workload('client')}"
    assert body(await exchange(await pods.client.open_connection(host, int(port)))) == caller
    # (the echo's line first: its connection was over, closed by the agent, before)
    lines = await pods.lines("client", lambda line: line["upstream"] == HTTP)
    (tcp,), (http,) = outbound_lines(lines, ECHO), outbound_lines(lines, HTTP)
    assert (tcp["kind"], tcp["endpoint"], tcp["bytes_in"]) == ("tcp", f"{pods.server.ip}:9090", 4)
    assert (http["kind"], http["status"], http["endpoint"]) == (
        "http",
        200,
        f"{pods.server.ip}:8080",
    )
    for line in (tcp, http):
        assert line["peer_id"] == SERVER and line["tls_version"] == "TLSv1.3" and line["cipher"]


async def test_a_passed_through_connection_says_it_is_plaintext_and_where_it_went(
    pods: Pods,
) -> None:
    """Outside the mesh (allow-any): no peer, no TLS; the destination the app asked for.
    One the node does not answer is logged with why."""
    client = pods.agents["client"]
    client.lines()
    host, port = pods.outside.rsplit(":", 1)
    assert await echoed(await pods.client.open_connection(host, int(port)), b"plain") == b"plain"
    (line,) = outbound_lines(
        await pods.lines("client", lambda line: line["endpoint"] == pods.outside), None
    )
    assert line["kind"] == "tcp" and line["local_id"] == str(workload("client"))
    assert line["peer_id"] is line["tls_version"] is line["cipher"] is None
    assert (line["endpoint"], line["tries"], line["error"]) == (pods.outside, 1, None)
    assert line["bytes_in"] == line["bytes_out"] == len(b"plain")

    closed = f"{pods.network.node_ip}:{free_port()}"  # nothing listens there
    host, port = closed.rsplit(":", 1)
    reader, writer = await pods.client.open_connection(host, int(port))
    assert await asyncio.wait_for(reader.read(), 5) == b""  # closed: it could not be reached
    writer.close()
    (line,) = outbound_lines(
        await pods.lines("client", lambda line: line["endpoint"] == closed), None
    )
    assert (line["error"], line["peer_id"], line["bytes_out"]) == (
        "upstream_connect_failure",
        None,
        0,
    )
