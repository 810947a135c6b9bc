"""Captured traffic through real agents: pods as network namespaces with real nft rules.

Two pods, each with an agent running as UID 1337 (the capture rules leave that UID
alone) and capture rules applied in the pod as root, as the `outrider-capture` init
container does; a CA on the node. The apps are this test process's servers inside
the pods, and its clients connect from inside a pod (UID 0: captured, as an app
is) or from the node (a plaintext caller with no agent).

- `server` pod: an HTTP app on 0.0.0.0:8080 that answers with the
  x-forwarded-client-cert it was given; its agent serves port 8080 as http.
- `client` pod: its agent knows the server as one upstream: by a Service-like
  address (a ClusterIP that exists nowhere, 198.51.100.20:8080: the pod's own
  rules take the connection before it leaves) and by the server pod's IP.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import ExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import pytest
import pytest_asyncio
import yaml

from agent.adapters import h2client
from agent.adapters.nft import Nft
from agent.adapters.relay import EARLY
from identity.capture import HANDOFF_SOURCE
from identity.injected import AGENT_UID, STATUS_PORT
from tests.h2backend import exchange as h2_exchange
from tests.h2backend import grpc_head, h2_backend
from tests.mesh import AgentProcess, agent_process, agent_yaml, echo, eventually, workload
from tests.mesh_cluster import metric, status
from tests.netns import Pod, PodNetwork, pod_network
from tests.support import CaSetup, ca_process, make_ca_setup

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

SERVICE = "198.51.100.20:8080"  # TEST-NET-2: routed nowhere, captured in the pod first
GRPC_SERVICE = "198.51.100.21:8081"
Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


# -- the capture rules ---------------------------------------------------------------------


def capture(pod: Pod) -> None:
    """The pod's TCP redirected to its agent, as the init container does it (as root)."""
    command = [sys.executable, "-m", "outrider", "capture", "apply", "--agent-uid", str(AGENT_UID)]
    applied = pod.run(command, check=False)
    assert applied.returncode == 0, applied.stderr


# -- apps ----------------------------------------------------------------------------------


@dataclass
class HttpApp:
    """An app on [::]:8080 in a pod: answers every request with the identity header."""

    requests: int = 0
    heard: str = ""
    caller: str = ""  # the address the last request came from: the agent's hand-off source

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        self.requests += 1
        self.caller = writer.get_extra_info("peername")[0]
        xfcc = [
            line.split(":", 1)[1].strip()
            for line in head.split("\r\n")
            if line.lower().startswith("x-forwarded-client-cert:")
        ]
        body = (";".join(xfcc) or "-").encode()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        await writer.drain()
        writer.close()


REQUEST = b"GET / HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n"
FORGED = (
    b"GET / HTTP/1.1\r\nHost: server\r\nConnection: close\r\n"
    b"X-Forwarded-Client-Cert: URI=spiffe://example.org/ns/demo/sa/admin\r\n\r\n"
)


async def exchange(
    opened: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes = REQUEST
) -> bytes:
    """What comes back for `request` until the server closes; b'' if closed unanswered."""
    reader, writer = opened
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionError:
        return b""
    finally:
        writer.close()


def body(response: bytes) -> str:
    assert response.startswith(b"HTTP/1.1 200"), response
    return response.split(b"\r\n\r\n", 1)[1].decode()


# -- agents --------------------------------------------------------------------------------


async def reaches(pod: Pod, name: str, value: float, **labels: str) -> None:
    """The agent's metric `name` is `value` within 10 s."""
    await eventually(lambda: metric(pod, name, **labels) == value, 10)
    assert metric(pod, name, **labels) == value


async def logged(log: list[str], wanted: Callable[[str], bool]) -> None:
    """An agent's log (read by a thread) has a line that is `wanted`, within 5 s."""
    for _ in range(250):
        if any(wanted(line) for line in list(log)):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no such line in the agent's log: {log[-5:]}")


@dataclass
class Captured:
    """Two captured pods with agents, the server's app, and how to change their configs."""

    network: PodNetwork
    root: Path
    server: Pod
    client: Pod
    app: HttpApp
    agents: dict[str, AgentProcess]
    configs: dict[str, dict[str, Any]]

    async def reload(self, pod: Pod, **sections: Any) -> None:
        """The agent's config file with `sections` in place of its own (None: the key
        taken out); returns once the agent runs it (SIGHUP: no wait for the watcher)."""
        done = metric(pod, "outrider_config_reloads_total", kind="agent", result="ok")
        config = {**self.configs[pod.name], **sections}
        (self.root / f"{pod.name}.yaml").write_text(
            yaml.safe_dump({k: v for k, v in config.items() if v is not None})
        )
        self.agents[pod.name].process.send_signal(signal.SIGHUP)
        await reaches(pod, "outrider_config_reloads_total", done + 1, kind="agent", result="ok")

    @asynccontextmanager
    async def reconfigured(self, pod: Pod, **sections: Any) -> AsyncIterator[None]:
        """The agent runs with `sections` for the block, then with its first config again:
        the tests of this module share the agents."""
        await self.reload(pod, **sections)
        try:
            yield
        finally:
            await self.reload(pod)


def captured_config(setup: CaSetup, ca: str, pod: Pod, **sections: Any) -> dict[str, Any]:
    """A captured pod's agent: its capture listeners, and its status port on the pod IP
    (which the capture rules leave alone) for the metrics."""
    return agent_yaml(
        setup.root,
        pod.name,
        ca_address=ca,
        token=setup.issuer.token("demo", pod.name),
        capture={},
        status=f"0.0.0.0:{STATUS_PORT}",
        **sections,
    )


def server_config(setup: CaSetup, ca: str, server: Pod) -> dict[str, Any]:
    inbound = {"ports": {"8080": {"protocol": "http"}}}
    return captured_config(setup, ca, server, captured={"inbound": inbound})


def client_config(setup: CaSetup, ca: str, client: Pod, server: Pod) -> dict[str, Any]:
    upstream = {
        "name": "server.demo:8080",
        "protocol": "http",
        "destinations": [SERVICE],
        "endpoints": [f"{server.ip}:8080"],  # a captured pod: its IP and app port
        "server_ids": [str(workload(server.name))],
    }
    return captured_config(setup, ca, client, outbound=[upstream])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(tmp_path_factory: pytest.TempPathFactory, nft: str) -> AsyncIterator[Captured]:
    """One CA and two captured pods with their agents, for every test of the module."""
    tmp_path = tmp_path_factory.mktemp("capture")
    with pod_network() as network:
        setup = make_ca_setup(
            tmp_path, listen={"grpc": f"{network.node_ip}:0", "http": "127.0.0.1:0"}
        )
        server, client = network.add_pod("server"), network.add_pod("client")
        app = HttpApp()
        serving = await server.start_server(app.handle, "::", 8080)
        try:
            with ca_process(setup.config) as ca, ExitStack() as stack:
                root = setup.root
                address = f"{network.node_ip}:{ca.grpc_port}"
                configs = {
                    "server": server_config(setup, address, server),
                    "client": client_config(setup, address, client, server),
                }
                agents = {}
                for pod in (server, client):
                    capture(pod)
                    agents[pod.name] = stack.enter_context(
                        agent_process(
                            root, pod.name, configs[pod.name], prefix=pod.command([], AGENT_UID)
                        )
                    )
                yield Captured(network, root, server, client, app, agents, configs)
        finally:
            serving.close()


def counted(pod: Pod, direction: str, mtls: str, peer_id: str = "") -> float:
    """outrider_connections_total of `pod`'s agent."""
    labels = {"direction": direction, "mtls": mtls, "peer_id": peer_id}
    return metric(pod, "outrider_connections_total", **labels)


async def test_strict_capture_lets_only_mtls_reach_the_app_with_the_callers_identity(
    mesh: Captured,
) -> None:
    server, client, app = mesh.server, mesh.client, mesh.app
    assert mesh.agents["server"].bound["capture[inbound]"] == "0.0.0.0:15006"
    assert mesh.agents["client"].bound["capture[outbound]"] == "127.0.0.1:15007"
    caller = f"By={workload('server')};URI={workload('client')}"
    requests, verified = app.requests, counted(server, "inbound", "true", str(workload("client")))
    # The client's mTLS connections to the server's agent, counted by the server's ID once
    # verified: one pinned to the pod IP, and what the Service's upstream dialled (its pool
    # may hold one already, from another test).
    server_id = str(workload("server"))
    made = counted(client, "outbound", "true", server_id)
    dialled = {"upstream": "server.demo:8080", "kind": "new"}
    dialled_before = metric(client, "outrider_upstream_connections_total", **dialled)

    # The client app calls the server's pod IP, unchanged: mTLS pinned to that pod.
    assert body(await exchange(await client.open_connection(server.ip, 8080))) == caller
    # ... and the Service address: the upstream's own HTTP path, per request. Known by
    # its destinations only, that upstream started (discovery, gauges) on first use.
    started = {"upstream": "server.demo:8080", "state": "healthy"}
    first_use = metric(client, "outrider_upstream_endpoints", **started) == 0
    host, port = SERVICE.split(":")
    assert body(await exchange(await client.open_connection(host, int(port)))) == caller
    assert app.requests == requests + 2
    assert metric(client, "outrider_upstream_endpoints", **started) == 1
    assert first_use or requests > 0  # (not the first use if another test ran first)

    # A plaintext caller without an agent (the node): not a byte from the app, and a
    # forged identity header never reaches it; each attempt is counted as refused.
    plaintext = {"direction": "inbound", "reason": "plaintext"}
    refused = metric(server, "outrider_connections_refused_total", **plaintext)
    for request in (REQUEST, FORGED):
        opened = await asyncio.open_connection(server.ip, 8080)
        assert await exchange(opened, request) == b""
    assert app.requests == requests + 2
    assert metric(server, "outrider_connections_refused_total", **plaintext) == refused + 2

    # Counted once each, after the handshake; no plaintext was accepted.
    assert counted(server, "inbound", "true", str(workload("client"))) == verified + 2
    assert counted(server, "inbound", "false") == 0
    new = metric(client, "outrider_upstream_connections_total", **dialled) - dialled_before
    assert counted(client, "outbound", "true", server_id) == made + 1 + new
    assert counted(client, "outbound", "true") == 0  # never before a verified server
    # The agents' own connections (to the CA on the node, to the server pod) were never
    # captured: none came back through a capture port as a passthrough or a loop.
    for pod in (server, client):
        assert metric(pod, "outrider_outbound_passthrough_total", reason="registry") == 0
        assert counted(pod, "outbound", "false") == metric(
            pod, "outrider_outbound_passthrough_total", reason="allow_any"
        )
        loops = {"direction": "inbound", "reason": "capture_loop"}
        assert metric(pod, "outrider_connections_refused_total", **loops) == 0


async def test_permissive_lets_plaintext_through_counted_and_strict_stops_it_without_restart(
    mesh: Captured,
) -> None:
    server, app = mesh.server, mesh.app
    process = mesh.agents["server"].process
    permissive = {"mtls": "permissive", "ports": {"8080": {"protocol": "http"}}}
    async with mesh.reconfigured(server, captured={"inbound": permissive}):
        requests = app.requests
        forged = await exchange(await asyncio.open_connection(server.ip, 8080), FORGED)
        assert body(forged) == "-"  # through, and without the forged header (none added)
        assert counted(server, "inbound", "false") == 1
        # mTLS still works on a permissive port (the first byte tells them apart).
        caller = body(await exchange(await mesh.client.open_connection(server.ip, 8080)))
        assert caller.endswith(f"URI={workload('client')}")
        assert app.requests == requests + 2

    # Strict again (the first config): the plaintext caller is stopped, same agent.
    assert await exchange(await asyncio.open_connection(server.ip, 8080)) == b""
    assert app.requests == requests + 2
    assert counted(server, "inbound", "false") == 1
    assert process.poll() is None  # never restarted


@pytest.mark.parametrize(
    "caller",
    [
        {"not_principals": ["*"]},  # Istio's "deny plaintext"
        {"not_namespaces": ["demo"]},  # a DENY with a negative match: Istio's safe pattern
        {"not_trust_domains": ["example.org"]},
    ],
)
async def test_a_deny_with_a_negated_from_stops_plaintext_on_a_permissive_port(
    mesh: Captured, caller: dict[str, list[str]]
) -> None:
    """Plaintext has no principal, namespace or trust domain: a negated `from` in a DENY
    matches it (fail closed), as Istio's does; the mTLS caller it names still passes."""
    server, app = mesh.server, mesh.app
    permissive = {"mtls": "permissive", "ports": {"8080": {"protocol": "http"}}}
    deny = {"name": "deny-outsiders", "action": "DENY", "rules": [{"from": caller}]}
    async with mesh.reconfigured(
        server, captured={"inbound": permissive}, policy={"policies": [deny]}
    ):
        requests = app.requests
        refused = await exchange(await asyncio.open_connection(server.ip, 8080))
        assert refused.startswith(b"HTTP/1.1 403"), refused[:80]
        allowed = body(await exchange(await mesh.client.open_connection(server.ip, 8080)))
        assert allowed.endswith(f"URI={workload('client')}")
        assert app.requests == requests + 1  # the mTLS caller's alone


async def test_destinations_outside_the_mesh_are_passed_through_or_refused_and_counted(
    mesh: Captured,
) -> None:
    client, network = mesh.client, mesh.network
    node = await asyncio.start_server(
        lambda r, w: (w.write(b"node"), w.close()), network.node_ip, 0
    )
    port = node.sockets[0].getsockname()[1]

    async def call(host: str, port: int) -> bytes:
        return await exchange(await client.open_connection(host, port), b"")

    def passed(reason: str) -> float:
        return metric(client, "outrider_outbound_passthrough_total", reason=reason)

    def refused(reason: str) -> float:
        labels = {"direction": "outbound", "reason": reason}
        return metric(client, "outrider_connections_refused_total", **labels)

    try:
        # allow-any (the default): an address outside the registry, in plain TCP, counted.
        plain, allow_any = counted(client, "outbound", "false"), passed("allow_any")
        assert await call(network.node_ip, port) == b"node"
        assert passed("allow_any") == allow_any + 1
        assert counted(client, "outbound", "false") == plain + 1

        # A registry Service outside the mesh: passed through under either policy.
        registry = {"policy": "registry-only", "passthrough": [f"{network.node_ip}:{port}"]}
        async with mesh.reconfigured(client, captured={"outbound": registry}):
            assert await call(network.node_ip, port) == b"node"
            assert passed("registry") == 1

        # registry-only: anything else is closed, counted.
        async with mesh.reconfigured(client, captured={"outbound": {"policy": "registry-only"}}):
            assert await call(network.node_ip, port) == b""
            assert refused("registry_only") == 1

        # An app connection to a capture port would come back to the agent: refused.
        assert await call("198.51.100.9", 15007) == b""
        assert refused("capture_loop") == 1
        # A capture port called as itself (nothing redirected it): nowhere to send it.
        assert await call("127.0.0.1", 15007) == b""
        assert refused("no_original_destination") == 1
        reader, writer = await asyncio.open_connection(mesh.server.ip, 15006)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
        unknown = {"direction": "inbound", "reason": "no_original_destination"}
        assert metric(mesh.server, "outrider_connections_refused_total", **unknown) == 1
        assert counted(client, "outbound", "false") == plain + 2
    finally:
        node.close()


async def test_the_agents_own_listeners_are_never_reached_through_the_capture_port(
    mesh: Captured,
) -> None:
    """A caller on the pod network sending to the pod's IP at the port of one of the agent's
    loopback listeners (here the explicit outbound listener 127.0.0.1:15001) must not be
    relayed to it: the agent would carry its bytes into the mesh under the pod's own SVID.
    Shown on a permissive pod, where even a plaintext caller would get that far."""
    client = mesh.client
    upstream = {**mesh.configs["client"]["outbound"][0], "listen": "127.0.0.1:15001"}
    loops = {"direction": "inbound", "reason": "capture_loop"}
    sections = {"outbound": [upstream], "captured": {"inbound": {"mtls": "permissive"}}}
    async with mesh.reconfigured(client, **sections):
        requests = mesh.app.requests
        looped = metric(client, "outrider_connections_refused_total", **loops)
        # (the listener works, from the app's side)
        assert body(await exchange(await client.open_connection("127.0.0.1", 15001))).endswith(
            f"URI={workload('client')}"
        )
        assert await exchange(await asyncio.open_connection(client.ip, 15001), FORGED) == b""
        assert mesh.app.requests == requests + 1
        assert metric(client, "outrider_connections_refused_total", **loops) == looped + 1


async def test_the_app_is_handed_a_caller_where_it_was_sent_and_never_on_a_loopback_only_port(
    mesh: Captured,
) -> None:
    """As Istio does: the agent dials the app at the address the caller sent the connection
    to, from 127.0.0.6. A port the app keeps on loopback (a debug server) is not reached
    through the agent, over mTLS or in plaintext on a permissive port, as it would not be
    without the mesh; a port the app binds on the pod IP only is."""
    server, client = mesh.server, mesh.client
    arrived: list[tuple[str, str]] = []

    async def where(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arrived.append((writer.get_extra_info("sockname")[0], writer.get_extra_info("peername")[0]))
        writer.write(b"here")
        await writer.drain()
        writer.close()

    private = await server.start_server(echo, "127.0.0.1", 9096)
    pod_ip_only = await server.start_server(where, server.ip, 9097)
    unreachable = {"direction": "inbound", "reason": "app_unreachable"}
    raw = [  # the two ports as endpoints of the mesh: the client's agent dials them with mTLS
        {
            "name": f"raw.demo:{port}",
            "protocol": "tcp",
            "destinations": [f"198.51.100.22:{port}"],
            "endpoints": [f"{server.ip}:{port}"],
            "server_ids": [str(workload(server.name))],
        }
        for port in (9096, 9097)
    ]
    try:
        async with (
            mesh.reconfigured(server, captured={"inbound": {"mtls": "permissive"}}),
            mesh.reconfigured(client, outbound=[*mesh.configs["client"]["outbound"], *raw]),
        ):
            mtls = counted(server, "inbound", "true", str(workload("client")))
            # From the client's app over mTLS, and from the node in plaintext.
            for opened in (client.open_connection, asyncio.open_connection):
                assert await exchange(await opened(server.ip, 9097), b"hi") == b"here"
            assert arrived == [(server.ip, HANDOFF_SOURCE[4])] * 2
            assert counted(server, "inbound", "true", str(workload("client"))) == mtls + 1
            refused = metric(server, "outrider_connections_refused_total", **unreachable)
            for opened in (client.open_connection, asyncio.open_connection):
                assert await exchange(await opened(server.ip, 9096), b"secret?") == b""
            await reaches(server, "outrider_connections_refused_total", refused + 2, **unreachable)
    finally:
        private.close()
        pod_ip_only.close()


async def test_an_app_on_its_pod_ip_only_passes_its_probes_as_without_the_mesh(
    mesh: Captured,
) -> None:
    """The kubelet probes the pod IP; the agent performs the rewritten probes there too,
    from 127.0.0.6, so an app that listens on its pod IP only is ready and live."""
    server = mesh.server
    heard: list[tuple[str, str]] = []

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        host = next(line for line in head.split("\r\n") if line.lower().startswith("host:"))
        heard.append((writer.get_extra_info("peername")[0], host))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    served = await server.start_server(app, server.ip, 9198)
    probes = {
        "/app-health/web/readyz": {"httpGet": {"path": "/ready", "port": 9198}},
        "/app-health/web/livez": {"tcpSocket": {"port": 9198}},
    }
    try:
        async with mesh.reconfigured(server, probes=probes):
            for path in probes:
                code, text = await asyncio.to_thread(status, server, path)
                assert code == 200, text
            assert (HANDOFF_SOURCE[4], f"Host: {server.ip}:9198") in heard
    finally:
        served.close()


async def test_probes_asked_on_loopback_never_take_the_kubelets_place(mesh: Captured) -> None:
    """Each probe runs once at a time per address: 127.0.0.1 (a container of the pod, a
    port-forward) and the pod IP (the kubelet). Every probe held at 127.0.0.1 by a slow
    app leaves the kubelet's own runs their places."""
    server = mesh.server
    release = asyncio.Event()

    async def slow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await release.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    served = await server.start_server(slow, "::", 9199)
    probes = {
        f"/app-health/c{i}/readyz": {"httpGet": {"path": "/", "port": 9199}, "timeoutSeconds": 5}
        for i in range(16)
    }

    async def inside(path: str) -> bytes:
        opened = await server.open_connection("127.0.0.1", STATUS_PORT)
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        return await exchange(opened, request.encode())

    try:
        async with mesh.reconfigured(server, probes=probes):
            held = [asyncio.create_task(inside(path)) for path in probes]
            await asyncio.sleep(0.3)  # every probe running at 127.0.0.1
            kubelet = asyncio.create_task(
                asyncio.to_thread(status, server, "/app-health/c0/readyz")
            )
            await asyncio.sleep(0.3)
            release.set()
            assert await kubelet == (200, "HTTP 200\n")
            assert all(answer.startswith(b"HTTP/1.1 200") for answer in await asyncio.gather(*held))
    finally:
        served.close()


def sends_to_loopback(pod: Pod, nft: str, target: Pod, port: int) -> None:
    """`pod`, a neighbour on the bridge, puts 127.0.0.1:`port` on the wire to `target`'s
    MAC for what it sends to target:`port` (as anything that writes raw frames can), and
    takes the replies back as from target."""
    script = f"""table ip spoof {{
  chain post {{ type filter hook postrouting priority 300; policy accept;
    ip daddr {target.ip} tcp dport {port} ip daddr set 127.0.0.1
  }}
  chain pre {{ type filter hook prerouting priority -400; policy accept;
    ip saddr 127.0.0.1 tcp sport {port} ip saddr set {target.ip}
  }}
}}
"""
    Nft((*pod.prefix, nft)).apply(script)

    def mac(of: Pod) -> str:
        return str(json.loads(of.run(["ip", "-j", "link", "show", "eth0"]).stdout)[0]["address"])

    # Neighbours known without ARP: the replies leave from 127.0.0.1, which ARP never asks.
    for sender, address, owner in ((pod, "127.0.0.1", target), (target, pod.ip, pod)):
        neigh = ["ip", "neigh", "replace", address, "lladdr", mac(owner), "dev", "eth0"]
        sender.run([*neigh, "nud", "permanent"])


async def test_a_neighbour_that_sends_to_127_0_0_1_never_reaches_a_loopback_only_port(
    mesh: Captured, nft: str
) -> None:
    """127.0.0.1 is the pod's own address too, so the rules capture it from the wire; the
    agent refuses to hand such a connection to the app."""
    server = mesh.server
    private = await server.start_server(echo, "127.0.0.1", 9096)
    neighbour = mesh.network.add_pod("neighbour")  # no agent, no rules
    local = {"direction": "inbound", "reason": "local_destination"}
    try:
        async with mesh.reconfigured(server, captured={"inbound": {"mtls": "permissive"}}):
            sends_to_loopback(neighbour, nft, server, 9096)
            refused = metric(server, "outrider_connections_refused_total", **local)
            opened = await neighbour.open_connection(server.ip, 9096)
            assert await exchange(opened, b"secret?") == b""
            await reaches(server, "outrider_connections_refused_total", refused + 1, **local)
    finally:
        private.close()


async def test_switching_a_port_to_strict_stops_plaintext_already_connected(
    mesh: Captured,
) -> None:
    """Strict applies to plaintext accepted while the port was permissive too: to a
    client that connected but had not spoken yet, and to one already relayed."""
    server = mesh.server
    tcp_app = await server.start_server(echo, "0.0.0.0", 9090)
    try:
        async with mesh.reconfigured(server, captured={"inbound": {"mtls": "permissive"}}):
            silent = await asyncio.open_connection(server.ip, 8080)
            talking = await asyncio.open_connection(server.ip, 9090)
            talking[1].write(b"a")
            assert await asyncio.wait_for(talking[0].readexactly(1), 5) == b"a"
            let_in = counted(server, "inbound", "false")
        # Strict again: neither gets another byte to an app.
        requests = mesh.app.requests
        assert await exchange(silent) == b""
        assert mesh.app.requests == requests
        assert await exchange(talking, b"b") == b""
        assert counted(server, "inbound", "false") == let_in
    finally:
        tcp_app.close()


async def test_a_plaintext_request_larger_than_what_is_read_early_arrives_whole(
    mesh: Captured,
) -> None:
    """A permissive port's plaintext client that sends more than the agent reads before its
    app is connected (agent/adapters/relay.py EARLY), all at once: paused, then resumed at
    the link, it arrives whole and in order, and comes back so."""
    server = mesh.server
    tcp_app = await server.start_server(echo, "0.0.0.0", 9090)
    sent = bytes(range(256)) * 4096  # 1 MiB
    try:
        async with mesh.reconfigured(server, captured={"inbound": {"mtls": "permissive"}}):
            reader, writer = await asyncio.open_connection(server.ip, 9090)
            writer.write(sent)
            try:
                assert await asyncio.wait_for(reader.readexactly(len(sent)), 10) == sent
            finally:
                writer.close()
    finally:
        tcp_app.close()


async def test_an_upgrade_read_before_the_app_is_connected_holds_what_follows_in_the_kernel(
    mesh: Captured,
) -> None:
    """A permissive `http` port's plaintext client whose Upgrade request is read before its
    app is connected (agent/adapters/relay.py EARLY), and that streams on while the app has
    not answered: what follows waits in the kernel, not in the agent's memory. The link
    resumes reading after it hands the early bytes to the HTTP parser, which paused it; the
    parser pauses again on the one read that lets in.
    """
    server = mesh.server
    answer = asyncio.Event()

    async def unanswering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            await answer.wait()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    app = await server.start_server(unanswering, "0.0.0.0", 9092)
    flood = 64 * 1024 * 1024
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: server\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    permissive = {"mtls": "permissive", "ports": {"9092": {"protocol": "http"}}}
    try:
        async with mesh.reconfigured(server, captured={"inbound": permissive}):
            _, writer = await asyncio.open_connection(server.ip, 9092)
            try:
                writer.write(upgrade + bytes(flood))
                left, steady = writer.transport.get_write_buffer_size(), 0
                for _ in range(200):  # settled: unchanged for half a second, within 20 s
                    await asyncio.sleep(0.1)
                    now = writer.transport.get_write_buffer_size()
                    steady = steady + 1 if now == left else 0
                    left = now
                    if steady == 5 or not left:
                        break
                # The kernel's buffers take a few MB; the agent holds at most what it read.
                assert left > flood // 2, f"the agent read {flood - left} bytes of the stream"
            finally:
                writer.close()
                answer.set()
    finally:
        app.close()


async def test_bytes_sent_with_an_upgrade_before_the_app_is_connected_reach_it_after_the_101(
    mesh: Captured,
) -> None:
    """A permissive `http` port's plaintext client that sends its Upgrade request and the
    new protocol's first bytes at once, more than the agent reads before its app is
    connected (agent/adapters/relay.py EARLY): the app answers 101 and gets those bytes
    whole, after the request, and what it echoes comes back after the 101."""
    server = mesh.server

    async def switching(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\n")
            writer.write(b"Upgrade: websocket\r\n\r\n")
            await echo(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    app = await server.start_server(switching, "0.0.0.0", 9095)
    upgrade = (
        b"GET /ws HTTP/1.1\r\nHost: server\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    )
    stream = bytes(range(256)) * 256  # 64 KiB: past EARLY
    permissive = {"mtls": "permissive", "ports": {"9095": {"protocol": "http"}}}
    try:
        async with mesh.reconfigured(server, captured={"inbound": permissive}):
            for _ in range(5):
                reader, writer = await asyncio.open_connection(server.ip, 9095)
                try:
                    writer.write(upgrade + stream)
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
                    assert head.startswith(b"HTTP/1.1 101 "), head
                    assert await asyncio.wait_for(reader.readexactly(len(stream)), 10) == stream
                finally:
                    writer.close()
    finally:
        app.close()


async def test_a_flood_of_plain_connections_around_what_is_read_early_all_echo_whole(
    mesh: Captured,
) -> None:
    """Plain connections that send EARLY - 1, EARLY and EARLY + 1 bytes at once (what a
    side reads before its link, agent/adapters/relay.py), many at a time, on both plain
    paths that read early: a permissive port's plaintext client, and an app's connection
    passed through to an address outside the mesh. Each comes back whole and in order,
    and each plaintext client is counted once."""
    server, client, network = mesh.server, mesh.client, mesh.network
    sizes = [EARLY - 1, EARLY, EARLY + 1] * 30
    inside = await server.start_server(echo, "0.0.0.0", 9094)
    outside = await asyncio.start_server(echo, network.node_ip, 0)
    port = outside.sockets[0].getsockname()[1]

    async def echoed(opened: Awaitable[Stream], size: int) -> bool:
        reader, writer = await opened
        sent = bytes(range(256)) * (size // 256) + bytes(size % 256)
        try:
            writer.write(sent)
            return await asyncio.wait_for(reader.readexactly(size), 10) == sent
        finally:
            writer.close()

    try:
        async with mesh.reconfigured(server, captured={"inbound": {"mtls": "permissive"}}):
            let_in = counted(server, "inbound", "false")
            plain = [echoed(asyncio.open_connection(server.ip, 9094), n) for n in sizes]
            assert all(await asyncio.gather(*plain))
            await reaches(
                server,
                "outrider_connections_total",
                let_in + len(sizes),
                direction="inbound",
                mtls="false",
                peer_id="",
            )
        passed = [echoed(client.open_connection(network.node_ip, port), n) for n in sizes]
        assert all(await asyncio.gather(*passed))
    finally:
        inside.close()
        outside.close()


async def test_a_pod_calling_a_service_it_serves_itself_reaches_its_own_app_over_mtls(
    mesh: Captured,
) -> None:
    """The upstream's endpoint is the calling pod: the agent's mTLS dial to its own pod IP
    goes over loopback, which the inbound rules skip; it must come back through the
    inbound capture port, not hit the app's port with a ClientHello."""
    server = mesh.server
    itself = {
        "name": "server.demo:8080",
        "protocol": "http",
        "destinations": [SERVICE],
        "endpoints": [f"{server.ip}:8080"],
        "server_ids": [str(workload(server.name))],
    }
    async with mesh.reconfigured(server, outbound=[itself]):
        host, port = SERVICE.split(":")
        caller = f"By={workload('server')};URI={workload('server')}"
        assert body(await exchange(await server.open_connection(host, int(port)))) == caller
        # ... and by its pod IP, which the app reaches in plain over loopback, as before.
        assert body(await exchange(await server.open_connection(server.ip, 8080))) == "-"


async def test_a_flood_of_refused_connections_is_counted_each_and_logged_a_line_a_while(
    mesh: Captured,
) -> None:
    """Each refusal is in /metrics; the log says why, but a flood is a line per kind a
    while, not a line per connection."""
    server, log = mesh.server, mesh.agents["server"].log
    flood = 50
    loops = {"direction": "inbound", "reason": "capture_loop"}
    looped = metric(server, "outrider_connections_refused_total", **loops)
    said = len(log)
    admin = int(mesh.agents["server"].bound["admin"].rsplit(":", 1)[1])
    for port in (8080, admin):  # plaintext to a strict port; the agent's admin port
        for _ in range(flood):
            assert await exchange(await asyncio.open_connection(server.ip, port)) == b""
    await reaches(server, "outrider_connections_refused_total", looped + flood, **loops)
    refusals = [line for line in log[said:] if "capture: refused" in line]
    assert len(refusals) <= 2, refusals  # at most one per kind (none: said just before)
    # What the lines say (here, or said by an earlier test within the interval):
    await logged(log, lambda line: "port 8080: no mTLS handshake" in line and "strict" in line)
    await logged(log, lambda line: f"port {admin} of the pod, one of the agent's own" in line)


async def test_ipv6_is_captured_too_mtls_between_pods_and_no_plaintext_in(
    mesh: Captured,
) -> None:
    """The rules redirect IPv6 as IPv4: the agent serves its capture ports on both, so an
    app's IPv6 call goes over mTLS, and a plaintext IPv6 caller gets nothing."""
    network, server, client = mesh.network, mesh.server, mesh.client
    intruder = network.add_pod("intruder6")  # no agent, no rules
    server_ip = network.add_ipv6(server)
    network.add_ipv6(client)
    network.add_ipv6(intruder)
    upstream = mesh.configs["client"]["outbound"][0]
    pinned = {**upstream, "endpoints": [*upstream["endpoints"], f"[{server_ip}]:8080"]}
    async with mesh.reconfigured(client, outbound=[pinned]):
        requests = mesh.app.requests
        verified = counted(server, "inbound", "true", str(workload("client")))
        plaintext = counted(server, "inbound", "false")

        async def call(pod: Pod, request: bytes = REQUEST, port: int = 8080) -> bytes:
            sock = pod.socket(socket.AF_INET6)
            sock.setblocking(False)
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(sock, (server_ip, port)), 5
            )
            return await exchange(await asyncio.open_connection(sock=sock), request)

        caller = f"By={workload('server')};URI={workload('client')}"
        assert body(await call(client)) == caller
        assert mesh.app.caller == HANDOFF_SOURCE[6]  # at the pod's IPv6, from ::6
        for request in (REQUEST, FORGED):
            assert await call(intruder, request) == b""
        # The inbound capture port called as itself over IPv6: no app port, refused.
        unknown = {"direction": "inbound", "reason": "no_original_destination"}
        before = metric(server, "outrider_connections_refused_total", **unknown)
        assert await call(intruder, REQUEST, 15006) == b""
        await reaches(server, "outrider_connections_refused_total", before + 1, **unknown)
        assert mesh.app.requests == requests + 1
        assert counted(server, "inbound", "true", str(workload("client"))) == verified + 1
        assert counted(server, "inbound", "false") == plaintext


async def test_switching_to_registry_only_closes_what_it_no_longer_lets_out(
    mesh: Captured,
) -> None:
    """registry-only applies to connections passed through under allow-any as well: an
    app's open connection outside the registry is closed, not left to run."""
    client, node = mesh.client, mesh.network.node_ip
    listed, unlisted = [await asyncio.start_server(echo, node, 0) for _ in range(2)]
    ports = [server.sockets[0].getsockname()[1] for server in (listed, unlisted)]
    try:
        # allow-any (the first config): both passed through.
        kept, stopped = [await client.open_connection(node, port) for port in ports]
        for reader, writer in (kept, stopped):
            writer.write(b"a")
            assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
        registry = {"policy": "registry-only", "passthrough": [f"{node}:{ports[0]}"]}
        async with mesh.reconfigured(client, captured={"outbound": registry}):
            assert await exchange(stopped, b"b") == b""
            kept[1].write(b"c")  # a registry passthrough: still allowed, goes on
            assert await asyncio.wait_for(kept[0].readexactly(1), 5) == b"c"
        kept[1].close()
    finally:
        listed.close()
        unlisted.close()


async def test_a_flood_of_plaintext_denied_by_policy_is_a_line_a_while_not_one_each(
    mesh: Captured,
) -> None:
    server, log = mesh.server, mesh.agents["server"].log
    tcp_app = await server.start_server(echo, "0.0.0.0", 9090)
    denied = {"decision": "deny", "policy": "default", "rule": "deny"}
    sections = {
        "captured": {"inbound": {"mtls": "permissive"}},
        "policy": {"default_action": "deny"},
    }
    try:
        async with mesh.reconfigured(server, **sections):
            before = metric(server, "outrider_authz_decisions_total", **denied)
            said = len(log)
            for _ in range(50):
                opened = await asyncio.open_connection(server.ip, 9090)
                assert await exchange(opened, b"plain") == b""
            await reaches(server, "outrider_authz_decisions_total", before + 50, **denied)
            lines = [line for line in log[said:] if "denied" in line]
            assert len(lines) <= 2, lines
            await logged(log, lambda line: "from a plaintext caller" in line)
    finally:
        tcp_app.close()


async def test_a_scan_of_the_pods_ports_in_plaintext_is_a_line_a_while_not_one_each(
    mesh: Captured,
) -> None:
    """On a permissive pod anyone may try every port; nothing listens on most of them."""
    server, log = mesh.server, mesh.agents["server"].log
    unreachable = {"direction": "inbound", "reason": "app_unreachable"}
    async with mesh.reconfigured(server, captured={"inbound": {"mtls": "permissive"}}):
        before = metric(server, "outrider_connections_refused_total", **unreachable)
        plaintext = counted(server, "inbound", "false")
        said = len(log)
        ports = range(20001, 20041)
        for port in ports:
            assert await exchange(await asyncio.open_connection(server.ip, port)) == b""
        total = before + len(ports)
        await reaches(server, "outrider_connections_refused_total", total, **unreachable)
        lines = [line for line in log[said:] if "unreachable" in line]
        assert len(lines) <= 2, lines  # (none, if an earlier test said it just before)
        # The line said (by this scan, or by a test just before it) names the pod IP's
        # port the caller chose, and what an app bound to loopback only should change.
        await logged(
            log,
            lambda line: (
                f"app {server.ip}:" in line
                and "an app that listens on 127.0.0.1 or ::1 only is not reached" in line
            ),
        )
        # No app took them: no plaintext was let in, and none is counted as if it was.
        assert counted(server, "inbound", "false") == plaintext


async def test_a_flood_past_a_limit_is_said_a_line_a_while(mesh: Captured) -> None:
    """Silent callers past max_pending_handshakes: each evicts the oldest, counted; the log
    says which limit was reached, once a while."""
    server, log = mesh.server, mesh.agents["server"].log
    evicted = {"direction": "inbound", "reason": "max_pending_handshakes"}
    async with mesh.reconfigured(server, limits={"max_pending_handshakes": 1}):
        before = metric(server, "outrider_connections_refused_total", **evicted)
        said = len(log)
        silent = [await asyncio.open_connection(server.ip, 8080) for _ in range(20)]
        await reaches(server, "outrider_connections_refused_total", before + 19, **evicted)
        lines = [line for line in log[said:] if "limits.max_pending_handshakes" in line]
        assert len(lines) <= 2, lines
        await logged(log, lambda line: "limits.max_pending_handshakes (1) reached" in line)
        for _, writer in silent:
            writer.close()


async def test_an_app_dialing_an_unreachable_address_in_a_loop_is_a_line_a_while(
    mesh: Captured,
) -> None:
    client, log = mesh.client, mesh.agents["client"].log
    closed = socket.create_server((mesh.network.node_ip, 0))  # a port nobody accepts on
    port = closed.getsockname()[1]
    closed.close()
    failed = {"direction": "outbound", "reason": "no_endpoint"}
    before = metric(client, "outrider_connections_refused_total", **failed)
    said = len(log)
    for _ in range(30):
        assert await exchange(await client.open_connection(mesh.network.node_ip, port)) == b""
    await reaches(client, "outrider_connections_refused_total", before + 30, **failed)
    lines = [line for line in log[said:] if "unreachable" in line]
    assert len(lines) <= 2, lines
    await logged(log, lambda line: f"{mesh.network.node_ip}:{port} unreachable" in line)


async def test_plain_connections_let_through_before_a_capture_port_moved_still_close(
    mesh: Captured,
) -> None:
    """A reload that moves the capture ports opens new listeners: the plain connections
    the old ones let through still close when their port turns strict (inbound) or the
    outbound policy registry-only."""
    server, client, node = mesh.server, mesh.client, mesh.network.node_ip
    moved = {"inbound_port": 15016, "outbound_port": 15017}
    permissive = {"inbound": {"mtls": "permissive"}}
    tcp_app = await server.start_server(echo, "0.0.0.0", 9090)
    outside = await asyncio.start_server(echo, node, 0)
    try:
        async with mesh.reconfigured(server, captured=permissive):
            inbound = await asyncio.open_connection(server.ip, 9090)
            outbound = await client.open_connection(node, outside.sockets[0].getsockname()[1])
            for reader, writer in (inbound, outbound):
                writer.write(b"a")
                assert await asyncio.wait_for(reader.readexactly(1), 5) == b"a"
            await mesh.reload(server, captured=permissive, capture=moved)
            await mesh.reload(server, capture=moved)  # strict, the port still moved
            assert await exchange(inbound, b"b") == b""
        async with mesh.reconfigured(client, capture=moved):
            registry_only = {"outbound": {"policy": "registry-only"}}
            await mesh.reload(client, capture=moved, captured=registry_only)
            assert await exchange(outbound, b"b") == b""
    finally:
        tcp_app.close()
        outside.close()


async def test_a_plaintext_grpc_call_larger_than_what_is_read_early_arrives_whole(
    mesh: Captured,
) -> None:
    """A permissive grpc port's plaintext client whose preface, request and 40 KB of body
    are in the socket at once: the agent reads EARLY of them before it hands the
    connection to its HTTP/2 server (agent/adapters/relay.py), the rest after; the app gets
    the body whole."""
    server = mesh.server
    listening = server.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("0.0.0.0", 8082))
    listening.listen(16)
    listening.setblocking(False)
    permissive = {"mtls": "permissive", "ports": {"8082": {"protocol": "grpc"}}}
    message = bytes(range(256)) * 160  # 40 KiB: past EARLY, within h2's first window
    body = b"\0" + len(message).to_bytes(4, "big") + message
    async with (
        h2_backend("greeter", sock=listening) as app,
        mesh.reconfigured(server, captured={"inbound": permissive}),
    ):
        for _ in range(5):
            reader, writer = await asyncio.open_connection(server.ip, 8082)
            caller = h2.connection.H2Connection(
                h2.config.H2Configuration(client_side=True, header_encoding=None)
            )
            caller.initiate_connection()
            caller.send_headers(1, grpc_head())
            for at in range(0, len(body), 16384):  # the largest frame h2 allows by default
                caller.send_data(1, body[at : at + 16384], end_stream=at + 16384 >= len(body))
            writer.write(caller.data_to_send())  # all of it in the socket at once
            status, trailers = None, None
            try:
                async with asyncio.timeout(10):
                    while trailers is None and (data := await reader.read(65536)):
                        for event in caller.receive_data(data):
                            if isinstance(event, h2.events.ResponseReceived):
                                status = dict(event.headers)[b":status"]
                            elif isinstance(event, h2.events.TrailersReceived):
                                trailers = dict(event.headers)
                        writer.write(caller.data_to_send())
            finally:
                writer.close()
            assert (status, trailers and trailers.get(b"grpc-status")) == (b"200", b"0")
            assert app.requests[-1].body == body


async def test_a_captured_grpc_service_is_served_call_by_call_over_mtls(mesh: Captured) -> None:
    """A Service port with `protocol: grpc` on both sides: the client pod's h2c to the
    Service address is taken by its agent, each call sent over h2 mTLS to the server pod,
    whose agent serves the captured port as grpc to an h2c app with the caller's identity."""
    server, client = mesh.server, mesh.client
    listening = server.socket()
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind(("0.0.0.0", 8081))
    listening.listen(16)
    listening.setblocking(False)
    ports = {"8080": {"protocol": "http"}, "8081": {"protocol": "grpc"}}
    upstream = {
        "name": "greeter.demo:8081",
        "protocol": "grpc",
        "destinations": [GRPC_SERVICE],
        "endpoints": [f"{server.ip}:8081"],
        "server_ids": [str(workload(server.name))],
    }
    async with (
        h2_backend("greeter", sock=listening) as app,
        mesh.reconfigured(server, captured={"inbound": {"ports": ports}}),
        mesh.reconfigured(client, outbound=[upstream]),
    ):
        sock = client.socket()
        sock.setblocking(False)
        host, port = GRPC_SERVICE.split(":")
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, int(port))), 5)
        connection = await h2client.connect(None, None, sock=sock)
        try:
            answers = [await h2_exchange(connection, grpc_head()) for _ in range(3)]
        finally:
            connection.close()
    assert [(a.status, a.grpc_status, a.backend) for a in answers] == [(200, 0, "greeter")] * 3
    claims = [v for n, v in app.requests[0].headers if n == b"x-forwarded-client-cert"]
    assert len(claims) == 1 and f"URI={workload('client')}".encode() in claims[0]


async def test_a_permissive_port_tells_tls_from_plaintext_by_a_first_byte_however_it_comes(
    mesh: Captured,
) -> None:
    """The first byte decides TLS or plaintext whether it was there at the accept or came
    later, alone: plaintext sent a byte at a time reaches the app; plaintext whose first
    byte opens a TLS record, a client that leaves unheard or resets, never does, and the
    port goes on telling the two apart."""
    server, app = mesh.server, mesh.app
    process = mesh.agents["server"].process
    permissive = {"mtls": "permissive", "ports": {"8080": {"protocol": "http"}}}
    async with mesh.reconfigured(server, captured={"inbound": permissive}):
        requests, plain = app.requests, counted(server, "inbound", "false")
        # One byte, then (once the agent surely waited on it) the rest.
        reader, writer = await asyncio.open_connection(server.ip, 8080)
        writer.write(REQUEST[:1])
        await writer.drain()
        await asyncio.sleep(0.2)
        assert body(await exchange((reader, writer), REQUEST[1:])) == "-"
        assert app.requests == requests + 1
        # A connection that said nothing for a while, then everything.
        reader, writer = await asyncio.open_connection(server.ip, 8080)
        await asyncio.sleep(0.2)
        assert body(await exchange((reader, writer))) == "-"
        # Plaintext whose first byte is a TLS record's: a handshake that fails, unanswered.
        tls_like = b"\x16" + REQUEST
        assert await exchange(await asyncio.open_connection(server.ip, 8080), tls_like) == b""
        # Gone before a byte: shut, or reset.
        _, writer = await asyncio.open_connection(server.ip, 8080)
        writer.close()
        sock = socket.create_connection((server.ip, 8080), timeout=5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
        assert app.requests == requests + 2
        assert counted(server, "inbound", "false") == plain + 2
        # Both still told apart.
        assert body(await exchange(await asyncio.open_connection(server.ip, 8080))) == "-"
        caller = body(await exchange(await mesh.client.open_connection(server.ip, 8080)))
        assert caller.endswith(f"URI={workload('client')}")
    assert process.poll() is None
