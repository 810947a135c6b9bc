"""`kubectl apply` to enforcement, live: the control plane's acceptance, with real processes.

A fake Kubernetes API server (tests/apiserver.py) holds what users apply:
a namespace default-deny AuthorizationPolicy, an ALLOW for GET /api/* from
the frontend, a Service with `appProtocol: http`, two Deployments' pods
behind it and an HTTPRoute splitting 90/10 between them. A real `outrider
control serve` watches it; a real `outrider ca serve` issues SVIDs. Three
pods are real network namespaces (tests/netns.py), each with a real agent
that has only the injector's bootstrap (identity, CA, control plane) and an
app: the agents' listeners are the ones every injected pod has
(0.0.0.0:15443 inbound, 127.0.0.1:15001 outbound). The test is the
frontend's app: it calls its own 127.0.0.1:15001, as an app in the pod would.

Pods and EndpointSlices are written as the kubelet and the EndpointSlice
controller would, since the fake runs no controllers.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.apiserver import fake_api_server_thread
from tests.control_process import ControlProcess
from tests.mesh import agent_process
from tests.mesh_cluster import (
    NAMESPACES,
    App,
    Mesh,
    app_in,
    endpoint_slice,
    running,
    status,
    wait_until,
)
from tests.netns import Pod, PodNetwork
from tests.support import ca_process, make_ca_setup, scraped

pytestmark = pytest.mark.slow

#: What the users apply: the namespace, its Services, the route and the policies.
SHOP = (
    NAMESPACES
    + """\
apiVersion: v1
kind: Service
metadata: {name: backend, namespace: shop}
spec:
  selector: {app: backend}
  ports: [{name: http, port: 8080, targetPort: http, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: backend-v1, namespace: shop}
spec:
  selector: {app: backend, version: v1}
  ports: [{name: http, port: 8080, targetPort: http, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: backend-v2, namespace: shop}
spec:
  selector: {app: backend, version: v2}
  ports: [{name: http, port: 8080, targetPort: http, appProtocol: http}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-canary, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: backend, port: 8080}]
  rules:
    - backendRefs:
        - {name: backend-v1, port: 8080, weight: 90}
        - {name: backend-v2, port: 8080, weight: 10}
"""
)
DEFAULT_DENY = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: default-deny, namespace: shop}
spec: {}
"""
ALLOW_API = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: frontend-reads-api, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
    - name: frontend-get-api
      from: {principals: ["spiffe://example.org/ns/shop/sa/frontend"]}
      to: {methods: [GET], paths: ["%s"]}
"""
#: Pods as their Deployments' templates make them, injected. The backends' authors try
#: to opt out of the namespace's policy by annotation: nothing reads those.
POD = """\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels: {labels}
  annotations: {annotations}
spec:
  serviceAccountName: {account}
  initContainers:
    - {{name: outrider-agent, image: "outrider/agent:dev", restartPolicy: Always}}
  containers:
    - name: app
      image: "shop/app:1"
      ports: [{{name: http, containerPort: 8080}}]
"""
OPT_OUT = {
    "outrider.io/policy": "none",
    "outrider.io/inject-policy": "false",
    "security.outrider.io/exempt": "true",
}
REQUESTS = 2000


def policy(paths: str = "/api/*") -> str:
    return ALLOW_API % paths


def pod_yaml(name: str, account: str, labels: dict[str, str], annotations: dict[str, str]) -> str:
    return POD.format(
        name=name, account=account, labels=json.dumps(labels), annotations=json.dumps(annotations)
    )


def backend_app(version: str) -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text=version)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


@asynccontextmanager
async def shop(root: Path, network: PodNetwork) -> AsyncIterator[Mesh]:
    """The shop namespace applied, a CA, the control plane and three injected pods running."""
    async with AsyncExitStack() as stack:
        # On a loop of its own: starting an agent process blocks this one.
        api = stack.enter_context(fake_api_server_thread(root / "api"))
        api.apply(SHOP + "---\n" + DEFAULT_DENY + "---\n" + policy())
        listen = {"grpc": f"{network.node_ip}:0", "http": "127.0.0.1:0"}
        setup = make_ca_setup(root, listen=listen)
        ca = stack.enter_context(ca_process(setup.config))
        mesh = Mesh(root, api, network, setup)
        # The frontend calls the Service, and each version directly (to check each agent).
        upstreams = {"outrider.io/upstreams": "backend:8080,backend-v1:8080,backend-v2:8080"}
        specs = {
            "frontend-7d9f8-x2k4p": ("frontend", {"app": "frontend"}, upstreams),
            "backend-v1-5c7b9-a1b2c": ("backend", {"app": "backend", "version": "v1"}, OPT_OUT),
            "backend-v2-6b8d7-d3e4f": ("backend", {"app": "backend", "version": "v2"}, OPT_OUT),
        }
        for name, (account, labels, annotations) in specs.items():
            pod = mesh.pods[name] = network.add_pod(name)
            api.apply(pod_yaml(name, account, labels, annotations))
            api.set_status("v1", "Pod", "shop", name, running(pod))
        v1, v2 = mesh.pods["backend-v1-5c7b9-a1b2c"], mesh.pods["backend-v2-6b8d7-d3e4f"]
        api.apply(endpoint_slice("backend", [v1, v2]))
        api.apply(endpoint_slice("backend-v1", [v1]))
        api.apply(endpoint_slice("backend-v2", [v2]))
        await mesh.start_control()
        stack.push_async_callback(mesh.stop_control)
        await stack.enter_async_context(app_in(v1, backend_app("v1")))
        await stack.enter_async_context(app_in(v2, backend_app("v2")))
        for name, (account, _, _) in specs.items():
            pod = mesh.pods[name]
            raw = mesh.bootstrap(pod, account, ca)
            mesh.agents[name] = stack.enter_context(
                agent_process(root, name, raw, env={"POD_NAME": name}, prefix=pod.prefix)
            )
        yield mesh


async def split(app: App, requests: int) -> Counter[str]:
    """Which version answered each of `requests` GETs to the Service, 4 connections at once."""
    clients = [app] + [App(app.pod, app.port) for _ in range(3)]
    answered: Counter[str] = Counter()

    async def run(client: App, count: int) -> None:
        for _ in range(count):
            code, body = await client.request("GET", "/api/items")
            answered[body if code == 200 else str(code)] += 1

    try:
        await asyncio.gather(*(run(c, requests // len(clients)) for c in clients))
    finally:
        for client in clients[1:]:
            client.close()
    return answered


async def test_policies_and_routes_reach_every_agent_live(tmp_path: Path, pods: PodNetwork) -> None:
    async with shop(tmp_path, pods) as mesh:
        frontend = mesh.pods["frontend-7d9f8-x2k4p"]
        service, to_v1, to_v2 = App(frontend), App(frontend, 15002), App(frontend, 15003)
        # As written: GET /api/* from the frontend, nothing else.
        assert await service.request("GET", "/api/items") in ((200, "v1"), (200, "v2"))
        assert (await service.request("POST", "/api/items"))[0] == 403
        assert (await service.request("GET", "/admin"))[0] == 403
        # 90/10 over 2,000 requests, per request on kept-alive connections.
        answered = await split(service, REQUESTS)
        assert sum(answered.values()) == REQUESTS and set(answered) == {"v1", "v2"}, answered
        assert 0.07 <= answered["v2"] / REQUESTS <= 0.13, answered
        print(f"90/10 route over {REQUESTS} requests: {dict(answered)}")
        # Each version's own agent enforces the namespace policies: the backends' opt-out
        # annotations changed nothing.
        for app, version in ((to_v1, "v1"), (to_v2, "v2")):
            assert await app.request("GET", "/api/items") == (200, version)
            assert (await app.request("DELETE", "/api/items"))[0] == 403

        # A change in the API is enforced by both backends' agents within 2 s, no restart.
        before = {name: agent.process.pid for name, agent in mesh.agents.items()}
        mesh.api.apply(policy("/v2/*"))
        changed = time.monotonic()

        async def enforced() -> bool:
            answers = [await app.request("GET", "/api/items") for app in (to_v1, to_v2)]
            answers += [await app.request("GET", "/v2/items") for app in (to_v1, to_v2)]
            return [code for code, _ in answers] == [403, 403, 200, 200]

        await wait_until(enforced, 2.0, "the changed policy enforced by both backends")
        took = time.monotonic() - changed
        assert {name: agent.process.pid for name, agent in mesh.agents.items()} == before
        assert all(agent.process.poll() is None for agent in mesh.agents.values())
        print(f"policy change enforced by both backends {took * 1000:.0f} ms after the apply")

        # An invalid edit: refused in its status with the field path; the agents keep
        # enforcing the version before it.
        mesh.api.apply(policy("/v3/*/items"))

        def accepted() -> dict[str, Any]:
            found = mesh.api.get(
                "security.outrider.io/v1alpha1", "AuthorizationPolicy", "shop", "frontend-reads-api"
            )
            conditions = found.get("status", {}).get("conditions", [])
            return next((c for c in conditions if c["type"] == "Accepted"), {})

        async def refused() -> bool:
            return accepted().get("status") == "False"

        await wait_until(refused, 5.0, "Accepted=False in the policy's status")
        condition = accepted()
        assert condition["reason"] == "Invalid"
        assert "spec.rules[0].to.paths[0]" in condition["message"], condition
        for app in (to_v1, to_v2):
            assert (await app.request("GET", "/v2/items"))[0] == 200
            assert (await app.request("GET", "/v3/a/items"))[0] == 403

        # Every agent acknowledged what it runs, as `outrider proxy-status` shows.
        assert mesh.control is not None
        shown = await proxy_status(mesh.control)
        rows = {line.split()[0]: line for line in shown.splitlines() if line.startswith("shop/")}
        assert set(rows) == {f"shop/{name}" for name in mesh.agents}, shown
        assert all("SYNCED" in row for row in rows.values()), shown
        for client in (service, to_v1, to_v2):
            client.close()


async def proxy_status(control: ControlProcess) -> str:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outrider",
        "proxy-status",
        "--control",
        control.debug_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    print(out.decode())
    return out.decode()


#: How long the control plane stays away in the outage test: the issue's figure.
AWAY = 30.0


def connected(pod: Pod) -> float:
    return scraped(status(pod, "/metrics")[1], "outrider_control_plane_connected")


async def test_agents_keep_serving_while_the_control_plane_is_away(
    tmp_path: Path, pods: PodNetwork
) -> None:
    """30 s without a control plane under traffic: no request fails, and a policy changed
    meanwhile reaches every agent once it is back."""
    async with shop(tmp_path, pods) as mesh:
        frontend = mesh.pods["frontend-7d9f8-x2k4p"]
        answered: Counter[int] = Counter()
        stop = asyncio.Event()

        async def traffic() -> None:
            app = App(frontend)
            try:
                while not stop.is_set() and sum(answered.values()) < 20_000:
                    try:
                        code, _ = await app.request("GET", "/api/items")
                    except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                        answered[-1] += 1
                        print("failed:", repr(exc))
                        continue
                    answered[code] += 1
                    await asyncio.sleep(0.005)
            finally:
                app.close()

        load = asyncio.create_task(traffic())
        await asyncio.sleep(1)
        await mesh.stop_control()
        mesh.api.apply(policy("/*"))  # written while the control plane is away: GET /v2 too
        away = time.monotonic()

        async def all_disconnected() -> bool:
            return all(connected(pod) == 0 for pod in mesh.pods.values())

        await wait_until(all_disconnected, 10, "every agent reports the control plane away")
        await asyncio.sleep(max(0.0, AWAY - (time.monotonic() - away)))
        during = dict(answered)
        await mesh.start_control()

        async def resynced() -> bool:
            return all(connected(pod) == 1 for pod in mesh.pods.values())

        back = await wait_until(resynced, 15, "every agent reconnected")
        stop.set()
        await load
        assert answered[200] > 1000 and set(answered) == {200}, answered
        assert during.get(200, 0) > 0 and -1 not in during, during
        # The change made while away reached the backends' agents after the return.
        to_v1 = App(frontend, 15002)

        async def new_policy() -> bool:
            return (await to_v1.request("GET", "/v2/items"))[0] == 200

        await wait_until(new_policy, 5, "the policy changed during the outage enforced")
        to_v1.close()
        print(f"{sum(answered.values())} requests, all answered; reconnected {back:.1f} s after")
