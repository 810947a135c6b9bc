"""`outrider control serve` as a real process, against a fake API server over HTTPS.

Agents are grpclib clients with SVIDs of the test CA. What an agent relies
on: it gets its own pod's configuration at once and every change within 2 s;
an SVID cannot fetch another namespace's pod, nor a pod of another service
account; no client certificate, no connection. What an operator relies on:
Acks and Nacks in /debug/agents and `outrider proxy-status`, statuses written
back once, and a resync after the API server fails or expires its history.
"""

from __future__ import annotations

import asyncio
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from control.app import HTTP_LIMITS
from tests import floods
from tests.apiserver import DEFAULT_CRDS, FakeApiServer, fake_api_server
from tests.control_process import (
    ALLOW_FRONTEND,
    CONTROL_ID,
    DEFAULT_DENY,
    NAMESPACES,
    ControlProcess,
    Ran,
    control_plane,
    eventually,
    outrider,
    pod,
    ready,
    subscribed,
)
from tests.support import free_port, scraped

INVALID = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: broken, namespace: shop}
spec:
  rules:
    - to: {paths: ["/api/*/x"]}  # the schema allows it; the agent's parser does not
"""
RESTARTS = "outrider_control_watch_restarts_total"
#: Outrider's CRDs without Gateway API's, as in a cluster where nobody installed it.
OUTRIDER_CRDS = tuple(path for path in DEFAULT_CRDS if "gateway-api" not in path.parts)


async def agents_where(
    control: ControlProcess, check: Callable[[dict[str, Any]], bool]
) -> list[Any]:
    """/debug/agents once its only agent passes `check`."""
    shown: list[Any] = []

    async def passes() -> bool:
        nonlocal shown
        shown = (await control.debug("/debug/agents"))[1]
        return len(shown) == 1 and check(shown[0])

    await eventually(passes)
    return shown


def policy(api: FakeApiServer, name: str) -> dict[str, Any]:
    return api.get("security.outrider.io/v1alpha1", "AuthorizationPolicy", "shop", name)


async def proxy_status(url: str) -> Ran:
    return await outrider("proxy-status", "--control", url)


@asynccontextmanager
async def shop_api(root: Path) -> AsyncIterator[FakeApiServer]:
    """The namespaces, shop/web and shop's default-deny."""
    async with fake_api_server(root) as server:
        server.apply(NAMESPACES)
        server.apply(pod("shop", "web", "web"))
        server.apply(DEFAULT_DENY)
        yield server


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    async with shop_api(tmp_path / "api") as server:
        yield server


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[FakeApiServer]:
    """For `shared_control`: the refusal tests below share one control plane."""
    async with shop_api(tmp_path_factory.mktemp("api")) as server:
        yield server


#: The tests of `shared_control`, which run on the module's event loop.
on_shared_control = pytest.mark.asyncio(loop_scope="module")


async def test_an_agent_gets_its_pods_configuration_and_its_ack_is_recorded(
    control: ControlProcess,
) -> None:
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        version, config = await agent.next()
        assert set(config) == {"inbound", "outbound", "policy"}
        names = [p["name"] for p in config["policy"]["policies"]]
        assert "shop/default-deny" in names
        await agent.ack(version)
        (seen,) = await agents_where(control, lambda a: a["acked"] == version)
        assert seen["pod"] == "shop/web"
        assert seen["spiffe_id"] == "spiffe://example.org/ns/shop/sa/web"
        assert seen["agent_version"] == "tests"
        assert seen["sent"] == seen["latest"] == version
        assert seen["nack"] is None
        status, shown = await control.debug("/debug/config?pod=shop/web")
        assert status == 200 and shown["version"] == version and shown["config"] == config


async def test_a_policy_applied_in_the_api_reaches_the_agent_within_2_seconds(
    control: ControlProcess, api: FakeApiServer
) -> None:
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        first, _ = await agent.next()
        await agent.ack(first)
        started = time.monotonic()
        api.apply(ALLOW_FRONTEND)
        version, config = await agent.next(timeout=2.0)
        elapsed = time.monotonic() - started
        print(f"\nAPI change -> snapshot: {elapsed * 1000:.0f} ms")
        assert version != first
        names = [p["name"] for p in config["policy"]["policies"]]
        assert "shop/frontend-reads-api" in names


GREETER = """\
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: grpc, port: 9090, targetPort: 8080, appProtocol: grpc}]
---
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: greeter-callers, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
    - from: {principals: ["spiffe://example.org/ns/shop/sa/frontend"]}
      to: {paths: [/demo.Greeter/SayHello]}
"""


async def test_a_grpc_service_port_and_a_policy_on_its_methods_reach_the_agent(
    control: ControlProcess, api: FakeApiServer
) -> None:
    """`appProtocol: grpc` makes the pod's port a gRPC listener, where a rule on a gRPC
    method applies as written: the status says Accepted, not HTTPRulesOnTCPPorts."""
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        first, config = await agent.next()
        await agent.ack(first)
        assert [i["protocol"] for i in config["inbound"]] == ["tcp"]
        api.apply(GREETER)

        async def served_as_grpc() -> bool:
            nonlocal config
            version, config = await agent.next(timeout=2.0)
            await agent.ack(version)
            names = [p["name"] for p in config["policy"]["policies"]]
            return config["inbound"][0]["protocol"] == "grpc" and "shop/greeter-callers" in names

        await eventually(served_as_grpc)
        (sent,) = [p for p in config["policy"]["policies"] if p["name"] == "shop/greeter-callers"]
        assert sent["rules"] == [
            {
                "from": {"principals": ["spiffe://example.org/ns/shop/sa/frontend"]},
                "to": {"paths": ["/demo.Greeter/SayHello"]},
            }
        ]

        async def accepted() -> bool:
            status = policy(api, "greeter-callers").get("status") or {}
            return [(c["status"], c["reason"]) for c in status.get("conditions", [])] == [
                ("True", "Accepted")
            ]

        await eventually(accepted)


PERMISSIVE = """\
apiVersion: security.outrider.io/v1alpha1
kind: PeerAuthentication
metadata: {name: migration, namespace: shop}
spec:
  mtls: {mode: %s}
"""
SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec:
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""


async def test_a_peer_authentication_applied_in_the_api_reaches_a_captured_pod_live(
    control: ControlProcess, api: FakeApiServer
) -> None:
    """Strict by default; PERMISSIVE, then STRICT again, each within 2 s, and each status
    written. The Service's ClusterIP, allocated by the API server, is passed through: it has
    no injected endpoint (its pod has no IP yet)."""
    api.apply(pod("shop", "api", "api", captured=True))
    (service,) = api.apply(SERVICE)
    cluster_ip = service["spec"]["clusterIP"]
    async with subscribed(control, control.ca.workload("shop", "api"), "api") as agent:

        async def snapshot(mode: str) -> dict[str, Any]:
            """The first snapshot in `mode` (with the Service): each before it, of a change
            the control plane saw first (the pod before the Service), acked and passed over."""
            while True:
                version, config = await agent.next(timeout=2.0)
                await agent.ack(version)
                captured = config["captured"]
                if captured["inbound"]["mtls"] == mode and captured["outbound"]["passthrough"]:
                    return config

        config = await snapshot("strict")
        assert config["inbound"] == []
        assert config["captured"]["outbound"] == {
            "policy": "allow-any",
            "passthrough": [f"{cluster_ip}:80"],
        }
        for mode in ("PERMISSIVE", "STRICT"):
            api.apply(PERMISSIVE % mode)
            await snapshot(mode.lower())

            async def accepted(mode: str = mode) -> bool:
                found = api.get(
                    "security.outrider.io/v1alpha1", "PeerAuthentication", "shop", "migration"
                )
                status = found.get("status") or {}
                spec = (status.get("inForce") or {}).get("spec")
                return (
                    spec == {"mtls": {"mode": mode}} and status["conditions"][0]["status"] == "True"
                )

            await eventually(accepted)


async def test_an_agent_that_reconnects_with_the_running_version_is_sent_nothing_new(
    control: ControlProcess,
) -> None:
    credential = control.ca.workload("shop", "web")
    async with subscribed(control, credential, "web") as agent:
        version, _ = await agent.next()
    async with subscribed(control, credential, "web", running_version=version) as again:
        with pytest.raises(TimeoutError):
            await again.next(timeout=0.5)


@on_shared_control
async def test_an_svid_of_another_namespace_cannot_subscribe_for_a_pod_there(
    shared_control: ControlProcess, shared_api: FakeApiServer
) -> None:
    shared_api.apply(pod("billing", "ledger", "ledger"))
    # shop's SVID names "ledger": the namespace is the SVID's, so shop/ledger, which is no pod.
    started = time.monotonic()
    with pytest.raises(GRPCError) as refused:
        async with subscribed(
            shared_control, shared_control.ca.workload("shop", "web"), "ledger"
        ) as agent:
            await agent.next(timeout=10)
    assert refused.value.status == Status.PERMISSION_DENIED
    assert "no pod shop/ledger" in str(refused.value.message)
    assert time.monotonic() - started >= 4.0  # the watch might have lagged: it waited


@on_shared_control
async def test_a_pod_of_another_service_account_is_refused_at_once(
    shared_control: ControlProcess,
) -> None:
    started = time.monotonic()
    with pytest.raises(GRPCError) as refused:
        async with subscribed(
            shared_control, shared_control.ca.workload("shop", "intruder"), "web"
        ) as agent:
            await agent.next()
    assert refused.value.status == Status.PERMISSION_DENIED
    assert "runs as service account web, not intruder" in str(refused.value.message)
    assert time.monotonic() - started < 2.0


@on_shared_control
@pytest.mark.parametrize("name", ["", "web\n2026-01-01 INFO forged line", "Web", "w" * 254])
async def test_a_hello_that_names_no_pod_is_refused(
    shared_control: ControlProcess, name: str
) -> None:
    with pytest.raises(GRPCError) as refused:
        async with subscribed(
            shared_control, shared_control.ca.workload("shop", "web"), name
        ) as agent:
            await agent.next()
    assert refused.value.status == Status.INVALID_ARGUMENT
    assert "is not a pod name" in str(refused.value.message)
    assert not any("forged line" in line for line in shared_control.log)


@on_shared_control
async def test_a_client_without_a_certificate_is_refused_in_the_handshake(
    shared_control: ControlProcess,
) -> None:
    with pytest.raises((ConnectionError, StreamTerminatedError, OSError)):
        async with subscribed(shared_control, None, "web") as agent:
            await agent.next()


async def test_a_nack_is_recorded_and_shown_by_proxy_status(control: ControlProcess) -> None:
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        version, _ = await agent.next()
        await agent.nack(version, "policy.policies[0].rules: not today")
        agents = await agents_where(control, lambda a: a["nack"] is not None)
        assert agents[0]["nack"] == {
            "version": version,
            "error": "policy.policies[0].rules: not today",
        }
        assert agents[0]["acked"] is None
        table = await proxy_status(control.debug_url)
    assert table.returncode == 0, table.stderr
    header, row = table.stdout.splitlines()
    assert header.split() == ["POD", "SPIFFE", "ID", "VERSION", "ACK", "STATE"]
    assert row.split()[:3] == ["shop/web", "spiffe://example.org/ns/shop/sa/web", version]
    assert row.endswith("NACK (policy.policies[0].rules: not today)")


async def test_proxy_status_shows_a_synced_agent(control: ControlProcess) -> None:
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        version, _ = await agent.next()
        await agent.ack(version)
        await agents_where(control, lambda a: a["acked"] == version)
        table = await proxy_status(control.debug_url)
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[1].endswith("SYNCED")


async def test_proxy_status_says_when_the_control_plane_is_unreachable() -> None:
    port = free_port()
    table = await proxy_status(f"http://127.0.0.1:{port}")
    assert table.returncode == 1
    assert f"cannot reach the control plane at http://127.0.0.1:{port}" in table.stderr


async def test_an_invalid_policy_gets_accepted_false_written_once(
    control: ControlProcess, api: FakeApiServer
) -> None:
    api.apply(INVALID)

    async def written() -> bool:
        return bool(policy(api, "broken").get("status"))

    await eventually(written)
    (condition,) = policy(api, "broken")["status"]["conditions"]
    assert condition["type"] == "Accepted" and condition["status"] == "False"
    assert condition["reason"] == "Invalid"
    assert condition["message"].startswith("spec.rules[0].to.paths[0]: ")
    assert policy(api, "default-deny")["status"]["conditions"][0]["status"] == "True"
    await asyncio.sleep(0.5)  # its own write comes back through the watch: nothing more to write
    written = sorted(r.path for r in api.requests if r.verb in ("update", "patch"))
    assert written == [
        "/apis/security.outrider.io/v1alpha1/namespaces/shop/authorizationpolicies/broken/status",
        "/apis/security.outrider.io/v1alpha1/namespaces/shop/authorizationpolicies/default-deny/status",
    ]


async def test_after_the_api_server_fails_and_forgets_its_history_the_agents_resync(
    control: ControlProcess, api: FakeApiServer
) -> None:
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        first, _ = await agent.next()
        # A restart, as the control plane sees one: every watch cut, the next requests
        # refused, and the server back without the history it had; a policy was
        # added meanwhile.
        api.fail_next(4, 503)
        api.drop_watches(abrupt=True)
        api.apply(ALLOW_FRONTEND)
        api.compact()
        second, config = await agent.next(timeout=10)
        assert second != first
        names = [p["name"] for p in config["policy"]["policies"]]
        assert "shop/frontend-reads-api" in names
        _, agents = await control.debug("/debug/agents")
        assert agents[0]["latest"] == second


async def test_a_watch_from_expired_history_lists_again_and_goes_on(tmp_path: Path) -> None:
    # No bookmarks: each kind's watch stays at its last event, which compact() expires.
    async with fake_api_server(tmp_path / "api", bookmark_interval=3600) as api:
        api.apply(NAMESPACES)
        api.apply(pod("shop", "web", "web"))
        async with control_plane(tmp_path, api) as control:
            await ready(control)
            async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
                first, _ = await agent.next()
                api.compact()
                api.drop_watches()

                async def relisted() -> bool:
                    metrics = (await control.debug("/metrics"))[1]
                    return scraped(metrics, RESTARTS, kind="Pod") >= 1

                await eventually(relisted, timeout=10)
                api.apply(DEFAULT_DENY)
                second, config = await agent.next(timeout=2)
                assert second != first
                assert [p["name"] for p in config["policy"]["policies"]] == ["shop/default-deny"]


async def test_without_gateway_api_installed_the_control_plane_is_ready_and_serves(
    tmp_path: Path,
) -> None:
    async with fake_api_server(tmp_path / "api", crds=OUTRIDER_CRDS) as api:
        api.apply(NAMESPACES)
        api.apply(pod("shop", "web", "web"))
        async with control_plane(tmp_path, api) as control:
            await ready(control)
            async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
                await agent.next()
            warned = [line for line in control.log if "does not serve it" in line]
    assert len(warned) == 2  # HTTPRoute and GRPCRoute, once each
    assert "CRD not installed?" in warned[0]


async def test_a_subscription_outlives_the_idle_timeout_of_connections(tmp_path: Path) -> None:
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        api.apply(pod("shop", "web", "web"))
        limits = {"idle_timeout": "1s"}
        async with control_plane(tmp_path, api, limits=limits) as control:
            await ready(control)
            async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
                first, _ = await agent.next()
                await agent.ack(first)
                await asyncio.sleep(2.5)  # the connection's idle timeout, twice over
                api.apply(DEFAULT_DENY)
                second, _ = await agent.next(timeout=2)
                assert second != first
            _, metrics = await control.debug("/metrics")
    closed = "outrider_control_connections_closed_total"
    assert scraped(metrics, closed, listener="grpc", reason="idle_timeout") == 0
    assert scraped(metrics, "outrider_control_pushes_total", result="acked") == 1


async def test_silent_connections_to_the_http_ports_are_capped_and_make_room(
    tmp_path: Path,
) -> None:
    """Every pod reaches the status port (the debug port is served alike): silent
    connections were held for ever, took every descriptor, and the agents' gRPC port
    with them. Past the cap they are closed at once; after a second the quietest make
    room for a caller that asks something."""
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        async with control_plane(tmp_path, api) as control:
            await ready(control)
            cap = HTTP_LIMITS.max_connections
            with floods.idle_connections(control.debug_port, cap + 10) as flood:
                assert flood.closed_by_peer(within=0.5) + flood.failed == 10
                assert (await control.debug("/ready"))[0] == 200
            _, metrics = await control.debug("/metrics")
    closed = "outrider_control_connections_closed_total"
    assert scraped(metrics, closed, listener="debug", reason="max_connections") >= 10
    assert scraped(metrics, closed, listener="grpc", reason="max_connections") == 0


async def test_a_rotated_svid_is_served_to_new_connections(
    control: ControlProcess, tmp_path: Path
) -> None:
    before = await served_certificate(control)
    renewed = control.ca.svid(CONTROL_ID)
    (tmp_path / "svid" / "svid.key").write_bytes(renewed.key_pem)
    (tmp_path / "svid" / "svid.pem").write_bytes(renewed.chain_pem)

    async def rotated() -> bool:
        return await served_certificate(control) != before

    await eventually(rotated, timeout=5)
    assert await served_certificate(control) == renewed.chain_pem.split(b"-----END")[0]
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        await agent.next()


async def served_certificate(control: ControlProcess) -> bytes:
    """The leaf the control plane presents now, as the start of its PEM."""
    context = control.client_context(control.ca.workload("shop", "web"))
    _, writer = await asyncio.open_connection("127.0.0.1", control.grpc_port, ssl=context)
    ssl_object = writer.get_extra_info("ssl_object")
    der = ssl_object.getpeercert(binary_form=True)
    writer.close()
    return ssl.DER_cert_to_PEM_cert(der).encode().split(b"-----END")[0]


async def test_in_a_pod_it_reaches_the_api_server_with_the_in_cluster_config(
    tmp_path: Path,
) -> None:
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        api.apply(pod("shop", "web", "web"))
        async with control_plane(tmp_path, api, pod=True) as control:
            await ready(control)
            async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
                await agent.next()
    assert any(r.verb == "watch" for r in api.requests)


async def test_a_status_is_replaced_whole_so_the_version_in_force_is_what_was_accepted(
    control: ControlProcess, api: FakeApiServer
) -> None:
    api.apply(ALLOW_FRONTEND)

    async def in_force(generation: int) -> bool:
        record = policy(api, "frontend-reads-api").get("status", {}).get("inForce") or {}
        return record.get("generation") == generation

    await eventually(lambda: in_force(1))
    assert "selector" in policy(api, "frontend-reads-api")["status"]["inForce"]["spec"]
    api.apply(ALLOW_FRONTEND.replace("  selector: {matchLabels: {app: web}}\n", ""))
    await eventually(lambda: in_force(2))
    # A merge patch would have kept the selector the new spec left out.
    assert "selector" not in policy(api, "frontend-reads-api")["status"]["inForce"]["spec"]


async def test_the_status_port_serves_probes_and_metrics_and_nothing_of_the_mesh(
    tmp_path: Path,
) -> None:
    """The kubelet and Prometheus reach the status port on the pod network; what
    /debug shows (every pod's policies and upstreams) stays on the loopback debug port."""
    port = free_port()
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        async with control_plane(tmp_path, api, status=f"127.0.0.1:{port}") as control:
            await ready(control)

            def get(path: str) -> int:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
                        return int(r.status)
                except urllib.error.HTTPError as exc:
                    return exc.code

            answers = {
                path: await asyncio.to_thread(get, path)
                for path in ("/ready", "/healthz", "/metrics", "/debug/agents", "/debug/config")
            }
            assert (await control.debug("/debug/agents"))[0] == 200
    assert answers == {
        "/ready": 200,
        "/healthz": 200,
        "/metrics": 200,
        "/debug/agents": 404,
        "/debug/config": 404,
    }
