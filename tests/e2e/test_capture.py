"""Transparent capture, end to end (issue 16's acceptance), with real processes and real rules.

One cluster for the module (tests/mesh_cluster.py `capture_cluster`): a fake API server
holding the shop namespace, a real CA and control plane on the node, and three pods
that are network namespaces. The frontend (A) and the backend (B) are written as their
Deployments' templates make them and injected by the injector's own `mutate`; each ran
its `outrider-capture` init container (real nftables rules in the pod) and runs its
agent as UID 1337 from the injected bootstrap. B's app listens on 0.0.0.0:8080, as apps
do. The third pod (C, namespace `outside`) has no agent and no rules: a plaintext
caller. This test is A's app and C: neither knows of the mesh; A's app calls
`http://<Service VIP or B's IP>:8080/` and its agent takes the connection.

Each test leaves the cluster as it found it (strict, allow-any, no policy).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
import yaml

from tests.mesh_cluster import (
    BACKEND_VIP,
    App,
    CaptureCluster,
    capture_cluster,
    container,
    exchange,
    metric,
    status,
    wait_until,
)
from tests.netns import Pod, PodNetwork, pod_network
from tests.support import TRUST_DOMAIN

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

FRONTEND_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/frontend"
BACKEND_ID = f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/backend"
#: What B's app is told of a caller: the peer B's agent verified (as Envoy writes it).
XFCC = f"By={BACKEND_ID};URI={FRONTEND_ID}"
#: What a plaintext caller claims to be: the header an app behind a mesh trusts.
FORGED = f"By={BACKEND_ID};URI=spiffe://{TRUST_DOMAIN}/ns/shop/sa/admin"
REQUESTS = 5000
#: A failed request: what the app's client would see.
FAILED = (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError)


@pytest.fixture(scope="module")
def network(nft: str) -> Iterator[PodNetwork]:
    """The pods' network, for the whole module (the rules need `nft`)."""
    with pod_network() as pods:
        yield pods


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, network: PodNetwork
) -> AsyncIterator[CaptureCluster]:
    async with capture_cluster(tmp_path_factory.mktemp("capture"), network) as running:
        yield running


def peer_authentication(mode: str) -> str:
    """The shop namespace's PeerAuthentication (no selector: the whole namespace)."""
    return yaml.safe_dump(
        {
            "apiVersion": "security.outrider.io/v1alpha1",
            "kind": "PeerAuthentication",
            "metadata": {"name": "migration", "namespace": "shop"},
            "spec": {"mtls": {"mode": mode}},
        }
    )


DENY_ADMIN = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules:
    - to: {paths: ["/admin/*"]}
"""


def plaintext(path: str) -> bytes:
    """C's request: plain HTTP with a forged x-forwarded-client-cert."""
    return (
        f"GET {path} HTTP/1.1\r\nHost: backend\r\n"
        f"x-forwarded-client-cert: {FORGED}\r\nConnection: close\r\n\r\n"
    ).encode()


def no_app_byte(got: bytes) -> bool:
    """Nothing of the app came back: the connection was cut, at most with a TLS alert
    record (0x15) from the agent, never an HTTP response."""
    return got == b"" or got[0] == 0x15


def plaintext_accepted(pod: Pod) -> float:
    """`outrider_connections_total{direction="inbound",mtls="false"}`: the auditor's proof."""
    return metric(pod, "outrider_connections_total", direction="inbound", mtls="false")


def captured_outbound(pod: Pod) -> float:
    """Every connection the pod's outbound capture took: routed (into the mesh, or passed
    through), or refused for a reason."""
    routed = metric(pod, "outrider_outbound_app_connections_total")
    return routed + metric(pod, "outrider_connections_refused_total", direction="outbound")


def capture_loops(pod: Pod) -> float:
    return metric(pod, "outrider_connections_refused_total", reason="capture_loop")


async def reached(app: App, path: str, forged: bool = False) -> bool:
    """`app`'s GET `path` was answered 200 (`forged`: with FORGED as its xfcc)."""
    headers = {"x-forwarded-client-cert": FORGED} if forged else {}
    try:
        return (await app.request("GET", path, headers))[0] == 200
    except FAILED:
        return False


async def test_the_app_unchanged_reaches_the_backend_over_mtls_by_service_and_pod_ip(
    cluster: CaptureCluster,
) -> None:
    a, b = cluster.frontend, cluster.backend
    for host, path in ((BACKEND_VIP, "/api/by-service"), (b.ip, "/api/by-pod-ip")):
        app = App(a, 8080, host)

        async def through(app: App = app, path: str = path) -> bool:
            return await reached(app, path, forged=True)

        await wait_until(through, 15, f"A's app reaches B's app at {host}:8080")
        app.close()
        seen = cluster.backend_app.received(path)
        # The server app knows who called: the peer the agent verified, and only that
        # (what A's app wrote into the header itself is gone).
        assert seen and all(s.xfcc == [XFCC] for s in seen), seen
    assert metric(b, "outrider_connections_total", direction="inbound", peer_id=FRONTEND_ID) > 0
    assert plaintext_accepted(b) == 0


async def test_a_plaintext_caller_gets_no_byte_of_the_app_and_cannot_forge_its_identity(
    cluster: CaptureCluster,
) -> None:
    b = cluster.backend
    got = await exchange(cluster.outsider, b.ip, 8080, plaintext("/outside/strict"))
    assert no_app_byte(got), got
    # Nothing reached the app: not the request, not the forged header.
    assert cluster.backend_app.received("/outside") == []
    assert all(FORGED not in x for s in cluster.backend_app.seen for x in s.xfcc)
    assert plaintext_accepted(b) == 0


async def test_permissive_lets_plaintext_through_counted_and_strict_stops_it_live(
    cluster: CaptureCluster,
) -> None:
    a, b, api = cluster.frontend, cluster.backend, cluster.api
    agent = cluster.agent(b)
    pid, before = agent.process.pid, plaintext_accepted(b)
    passed = 0
    api.apply(peer_authentication("PERMISSIVE"))
    try:

        async def let_through() -> bool:
            nonlocal passed
            got = await exchange(cluster.outsider, b.ip, 8080, plaintext("/outside/permissive"))
            passed += got.startswith(b"HTTP/1.1 200")
            return got.startswith(b"HTTP/1.1 200")

        await wait_until(let_through, 10, "PERMISSIVE lets C's plaintext through")
        seen = cluster.backend_app.received("/outside/permissive")
        assert len(seen) == passed
        # ... without the forged identity: an unauthenticated caller carries none.
        assert all(s.xfcc == [] for s in seen), seen

        # Every plaintext connection let through is counted, once.
        async def counted() -> bool:
            return plaintext_accepted(b) - before == passed

        await wait_until(counted, 5, f"{passed} plaintext connections counted")
        # mTLS callers go on as before.
        app = App(a, 8080, BACKEND_VIP)
        assert await reached(app, "/api/permissive")
        app.close()

        api.apply(peer_authentication("STRICT"))

        async def stopped() -> bool:
            got = await exchange(cluster.outsider, b.ip, 8080, plaintext("/outside/strict-again"))
            return no_app_byte(got)

        await wait_until(stopped, 10, "STRICT stops C's plaintext")
        strict_since = len(cluster.backend_app.received("/outside/strict-again"))
        for _ in range(3):
            got = await exchange(cluster.outsider, b.ip, 8080, plaintext("/outside/strict-again"))
            assert no_app_byte(got), got
        assert len(cluster.backend_app.received("/outside/strict-again")) == strict_since
        counted_now = plaintext_accepted(b)
        assert counted_now - before == passed + strict_since
    finally:
        api.delete("security.outrider.io/v1alpha1", "PeerAuthentication", "shop", "migration")
    # Without a restart: the same agent process all along.
    assert agent.process.pid == pid and agent.process.poll() is None


async def test_the_readiness_probe_passes_in_strict_mode_through_the_rewritten_probe(
    cluster: CaptureCluster,
) -> None:
    b = cluster.backend
    probe = container(cluster.specs[b.name], "app")["readinessProbe"]
    get = probe["httpGet"]
    assert get["port"] == 15020 and get["path"].startswith("/app-health/"), probe
    assert probe["periodSeconds"] == 5 and probe["timeoutSeconds"] == 1, probe

    async def kubelet() -> int:  # from the node, to the pod IP: a thread, the app runs here
        return (await asyncio.to_thread(status, b, get["path"], get["port"]))[0]

    for _ in range(3):
        assert await kubelet() == 200
    # The probe as the user wrote it (the node to 8080, plaintext) gets nothing in strict
    # mode: what the rewrite is for.
    got = await exchange(None, b.ip, 8080, b"GET /ready HTTP/1.1\r\nHost: b\r\n\r\n")
    assert no_app_byte(got), got
    # It tells the truth about the app.
    cluster.backend_app.ready = False
    try:
        assert await kubelet() == 503
    finally:
        cluster.backend_app.ready = True
    assert await kubelet() == 200


async def test_a_destination_outside_the_mesh_passes_with_allow_any_is_refused_with_registry_only(
    cluster: CaptureCluster,
) -> None:
    a, mesh = cluster.frontend, cluster.mesh
    accepted = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.write(b"outside")
        await writer.drain()
        writer.close()

    # A server on the node: no Service, no pod of the mesh.
    server = await asyncio.start_server(answer, mesh.network.node_ip, 0)
    port = server.sockets[0].getsockname()[1]
    outcomes: Counter[bool] = Counter()  # A's app connections: did the outside answer?
    before = {
        "passed": metric(a, "outrider_outbound_passthrough_total", reason="allow_any"),
        "refused": metric(
            a, "outrider_connections_refused_total", direction="outbound", reason="registry_only"
        ),
        "captured": captured_outbound(a),
    }

    async def outside(want: bool) -> bool:
        got = await exchange(a, mesh.network.node_ip, port, b"hello", timeout=2)
        outcomes[got == b"outside"] += 1
        return (got == b"outside") == want

    app = App(a, 8080, BACKEND_VIP)
    try:
        assert await outside(True), "allow-any (the default) passes it through"
        applied = metric(a, "outrider_control_plane_updates_total", result="applied")
        await mesh.stop_control()
        await mesh.start_control(outbound_traffic_policy="registry-only")
        try:
            # No connection of the app's in flight as registry-only lands: the switch
            # closes the plain connections it no longer passes, and one passed through a
            # moment before would reach the outside and be cut (neither answer nor refusal).
            async def switched() -> bool:
                return metric(a, "outrider_control_plane_updates_total", result="applied") > applied

            await wait_until(switched, 20, "registry-only applied")
            assert await outside(False), "registry-only refuses it"
            # The mesh's own Services still answer, and the agent's own connections (the
            # control plane it reconnected to) were never taken for the app's.
            assert await reached(app, "/api/registry-only")
        finally:
            await mesh.stop_control()
            await mesh.start_control()
        await wait_until(lambda: outside(True), 20, "allow-any again")
    finally:
        server.close()
    assert accepted == outcomes[True]

    async def counted() -> bool:
        passed = metric(a, "outrider_outbound_passthrough_total", reason="allow_any")
        refused = metric(
            a, "outrider_connections_refused_total", direction="outbound", reason="registry_only"
        )
        return (passed - before["passed"], refused - before["refused"]) == (
            outcomes[True],
            outcomes[False],
        )

    await wait_until(counted, 5, f"counted either way: {dict(outcomes)}")
    app.close()
    made = sum(outcomes.values()) + app.connections
    assert captured_outbound(a) - before["captured"] == made
    assert capture_loops(a) == 0


async def test_5000_captured_requests_with_a_policy_change_midway_fail_none_and_never_loop(
    cluster: CaptureCluster,
) -> None:
    a, b, api = cluster.frontend, cluster.backend, cluster.api
    before = {
        "captured": captured_outbound(a),
        "plaintext": plaintext_accepted(b),
        "mtls": metric(b, "outrider_connections_total", direction="inbound", mtls="true"),
    }
    clients = [App(a, 8080, BACKEND_VIP) for _ in range(4)]
    checker = App(a, 8080, BACKEND_VIP)
    answered: Counter[str] = Counter()
    midway = asyncio.Event()
    enforced_at: list[float] = []

    async def load(client: App, count: int) -> None:
        for _ in range(count):
            try:
                code, _ = await client.request("GET", "/api/items")
            except FAILED as exc:
                answered[repr(exc)] += 1
            else:
                answered[str(code)] += 1
            if sum(answered.values()) >= REQUESTS * 2 // 5:
                midway.set()

    async def change() -> None:
        await midway.wait()
        api.apply(DENY_ADMIN)

        async def denied() -> bool:
            try:
                return (await checker.request("GET", "/admin/users"))[0] == 403
            except FAILED:
                return False

        await wait_until(denied, 10, "the new policy enforced by B's agent")
        enforced_at.append(time.monotonic())

    started = time.monotonic()
    try:
        await asyncio.gather(change(), *(load(c, REQUESTS // len(clients)) for c in clients))
        ended = time.monotonic()
    finally:
        api.delete("security.outrider.io/v1alpha1", "AuthorizationPolicy", "shop", "no-admin")
        for client in (*clients, checker):
            client.close()
    assert answered == {"200": REQUESTS}, answered
    took = ended - started
    print(
        f"{REQUESTS} captured requests in {took:.2f} s; policy enforced at"
        f" {enforced_at[0] - started:.2f} s"
    )
    assert enforced_at[0] < ended, "the change landed after the load: not midway"
    # No loops: the outbound capture took exactly the app's connections, the agent's own
    # (its upstream connections to B, the CA, the control plane) not among them.
    made = sum(c.connections for c in (*clients, checker))

    async def settled() -> bool:
        return captured_outbound(a) - before["captured"] >= made

    await wait_until(settled, 5, f"{made} app connections counted")
    assert captured_outbound(a) - before["captured"] == made
    assert capture_loops(a) == capture_loops(b) == 0
    # Every connection B's app got was mTLS.
    assert plaintext_accepted(b) == before["plaintext"]
    assert (
        metric(b, "outrider_connections_total", direction="inbound", mtls="true") > before["mtls"]
    )
