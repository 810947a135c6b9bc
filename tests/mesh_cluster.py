"""A cluster of real processes on pods that are network namespaces, for end-to-end tests and bench.

What tests/e2e/test_control_plane.py, tests/e2e/test_capture.py and bench/capture.py share:
a fake Kubernetes API server (tests/apiserver.py) holding what users apply, a real
`outrider ca serve` and `outrider control serve` on the node (this machine's root
namespace, tests/netns.py), pods as network namespaces with real agents and apps, and
what the kubelet and the controllers would write (pod status, EndpointSlices), since
the fake runs no controllers.

`capture_cluster` is the transparent-capture cluster (issue 16): its pods are written
as their Deployments' templates make them, with readiness probes; each goes through the
injector's own `mutate`, then runs what the injected spec says, as the kubelet would:
the `outrider-capture` init container's command as root in the pod, then the agent
container's command as its UID (1337) with its environment (the bootstrap in
$OUTRIDER_AGENT_CONFIG) and its mounts (token and trust bundle) as files of the pod.
A pod with emptyDir volumes (the Workload API's) runs its containers as the
container runtime would (tests/netns.py `Pod.container_command`): each its own
mount namespace with the pod's volumes at their paths and no other pod's in sight.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from identity import SpiffeId, TrustDomain
from identity.injected import STATUS_PORT
from injector.core.mutate import INJECTED, apply_patch, mutate
from injector.core.settings import CaSettings, ControlSettings, Settings
from injector.core.sidecar import AGENT, CONFIG_ENV, agent_config
from tests.apiserver import FakeApiServer, fake_api_server_thread
from tests.control_process import ControlProcess, control_plane, ready
from tests.mesh import AgentProcess, agent_process, threaded_app
from tests.netns import Mount, Pod, PodNetwork
from tests.support import (
    TRUST_DOMAIN,
    CaProcess,
    CaSetup,
    ca_process,
    free_port,
    make_ca_setup,
)

# --- what the kubelet and the controllers write ----------------------------------------


def running(pod: Pod) -> dict[str, Any]:
    """The status the kubelet writes once the pod runs and is ready."""
    return {
        "phase": "Running",
        "podIP": pod.ip,
        "podIPs": [{"ip": pod.ip}],
        "conditions": [{"type": "Ready", "status": "True"}],
    }


def endpoint_slice(service: str, pods: list[Pod]) -> str:
    """The slice the EndpointSlice controller writes for `service` of the shop, behind
    `pods`, all ready (their port 8080, named http: the Service port's targetPort,
    resolved in the pods)."""
    return yaml.safe_dump(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{service}-abcde",
                "namespace": "shop",
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": [pod.ip],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "targetRef": {"kind": "Pod", "namespace": "shop", "name": pod.name},
                }
                for pod in pods
            ],
        }
    )


def status(pod: Pod, path: str, port: int = STATUS_PORT) -> tuple[int, str]:
    """GET from the pod IP, as the kubelet's probes and Prometheus do (the agent's status
    port unless told): (status, body). Blocking: from an event loop that serves an app
    the agent may call, use `asyncio.to_thread`."""
    try:
        with urllib.request.urlopen(f"http://{pod.ip}:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def scraped(text: str, name: str, **labels: str) -> float:
    """The sum of a /metrics page's samples `name` whose labels include `labels`."""
    from prometheus_client.parser import text_string_to_metric_families

    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items())
    )


def metric(pod: Pod, name: str, **labels: str) -> float:
    """`scraped` from the pod's agent, through its status port as Prometheus does."""
    return scraped(status(pod, "/metrics")[1], name, **labels)


async def wait_until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    """Seconds until `check()` (a coroutine function) is true; fails after `timeout`."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.05)
    return time.monotonic() - start


# --- apps in pods ----------------------------------------------------------------------


def app_socket(pod: Pod) -> socket.socket:
    """The pod's app's listening socket, on [::]:8080 for IPv4 and IPv6 as most apps listen:
    the agent hands it a captured connection at the address the caller sent it to."""
    sock = pod.socket(socket.AF_INET6)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 8080))
    sock.listen(128)
    return sock


@asynccontextmanager
async def app_in(pod: Pod, application: web.Application) -> AsyncIterator[None]:
    """The pod's app (app_socket), served from this process's event loop."""
    sock = app_socket(pod)
    sock.setblocking(False)
    runner = web.AppRunner(application, access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.SockSite(runner, sock).start()
    try:
        yield
    finally:
        await runner.cleanup()


@contextmanager
def threaded_app_in(pod: Pod, application: web.Application) -> Iterator[None]:
    """The pod's app (app_socket), served from a thread of its own: the test may block (a
    kubelet's probe through the agent) without starving it."""
    sock = app_socket(pod)
    with threaded_app(application, sock=sock):
        yield


class App:
    """An app's HTTP/1.1 client with keep-alive, inside `pod`, to `host`:`port` (its
    agent's 127.0.0.1:15001 unless told: the first upstream its pod names)."""

    def __init__(self, pod: Pod, port: int = 15001, host: str = "127.0.0.1") -> None:
        self.pod, self.port, self.host = pod, port, host
        self.streams: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        #: Connections this client opened: what its agent's capture should have accepted.
        self.connections = 0

    async def request(
        self, method: str, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[int, str]:
        if self.streams is None:
            self.streams = await self.pod.open_connection(self.host, self.port)
            self.connections += 1
        reader, writer = self.streams
        extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
        try:
            writer.write(f"{method} {path} HTTP/1.1\r\nHost: backend\r\n{extra}\r\n".encode())
            async with asyncio.timeout(5):
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                fields = dict(line.lower().split(": ", 1) for line in head[1:] if line)
                body = await reader.readexactly(int(fields.get("content-length", "0")))
        except BaseException:
            self.close()
            raise
        if fields.get("connection") == "close":
            self.close()
        return int(head[0].split()[1]), body.decode()

    def close(self) -> None:
        if self.streams is not None:
            self.streams[1].close()
            self.streams = None


async def exchange(
    pod: Pod | None, host: str, port: int, data: bytes, timeout: float = 3.0
) -> bytes:
    """Send `data` from `pod` (None: the node) to `host`:`port` and read until the other
    side closes (or `timeout`): every byte that came back; b'' when cut or refused."""
    try:
        if pod is None:
            connecting = asyncio.open_connection(host, port)
            reader, writer = await asyncio.wait_for(connecting, timeout)
        else:
            reader, writer = await pod.open_connection(host, port, timeout)
    except (OSError, TimeoutError):
        return b""
    received = b""
    try:
        writer.write(data)
        async with asyncio.timeout(timeout):
            while chunk := await reader.read(65536):
                received += chunk
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
    return received


# --- the mesh's processes ---------------------------------------------------------------


class Mesh:
    """Everything running, and the handles the checks need."""

    def __init__(self, root: Path, api: FakeApiServer, network: PodNetwork, setup: CaSetup) -> None:
        self.root, self.api, self.network, self.setup = root, api, network, setup
        self.agents: dict[str, AgentProcess] = {}
        self.pods: dict[str, Pod] = {}
        self.control: ControlProcess | None = None
        self.control_port = free_port()
        self._control = AsyncExitStack()

    async def start_control(self, **overrides: object) -> ControlProcess:
        """`outrider control serve`, on the same address each time, as behind its Service;
        `overrides` are control.yaml keys."""
        (self.root / "control").mkdir(exist_ok=True)
        self.control = await self._control.enter_async_context(
            control_plane(
                self.root / "control",
                self.api,
                ca_dir=self.setup.ca_dir,
                listen=f"{self.network.node_ip}:{self.control_port}",
                **overrides,
            )
        )
        # Its Service sends it agents once its readiness probe passes.
        await ready(self.control)
        return self.control

    async def stop_control(self) -> None:
        await self._control.aclose()
        self.control = None

    def settings(self, ca: CaProcess) -> Settings:
        """The injector's settings for this cluster: the CA and control plane on the node."""
        return Settings(
            trust_domain=TrustDomain(str(TRUST_DOMAIN)),
            ca=CaSettings(address=f"{self.network.node_ip}:{ca.grpc_port}"),
            control=ControlSettings(address=f"{self.network.node_ip}:{self.control_port}"),
        )

    def bootstrap(self, pod: Pod, account: str, ca: CaProcess) -> dict[str, Any]:
        """What the injector writes for this pod, with the pod's mounts as test files."""
        spiffe_id = SpiffeId.for_workload(TRUST_DOMAIN, "shop", account)
        config = agent_config(spiffe_id, self.settings(ca))
        token = self.setup.root / f"{pod.name}.token"
        token.write_text(self.setup.issuer.token("shop", account))
        config["identity"]["token_file"] = str(token)
        config["ca"]["bundle_file"] = str(self.setup.ca_dir / "bundle.pem")
        config["ca"]["server_name"] = config["control"]["server_name"] = "localhost"
        return config


# --- pods as the injector writes them, run as the kubelet would -------------------------

#: The capture init container, as injector/core/sidecar.py names it (CONTRACT section 4).
CAPTURE = "outrider-capture"


def inject(pod: Mapping[str, Any], settings: Settings) -> dict[str, Any]:
    """`pod` (as the ReplicaSet creates it from its template) after the injector's webhook."""
    namespace = pod["metadata"]["namespace"]
    mutation = mutate(pod, namespace, settings)
    assert mutation.reason == INJECTED, mutation
    injected = json.loads(json.dumps(pod))
    apply_patch(injected, mutation.patch)
    return injected


def container(pod: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The (init) container `name` of `pod`; fails saying which containers there are."""
    spec = pod["spec"]
    found = [c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == name]
    names = [c["name"] for c in [*spec.get("initContainers", []), *spec["containers"]]]
    assert found, f"no container {name!r} in the injected pod: {names}"
    return dict(found[0])


def container_env(pod: Mapping[str, Any], spec: Mapping[str, Any]) -> dict[str, str]:
    """The container's environment: values, and the downward API's fields of `pod`."""
    env = {}
    for item in spec.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            value: Any = pod
            for key in path.split("."):
                value = value[key]
            env[item["name"]] = str(value)
    return env


def _localized(value: Any, mounts: Mapping[str, Path]) -> Any:
    """`value` (the agent's bootstrap) with each path under a mount moved to the pod's
    copy of that volume."""
    if isinstance(value, dict):
        return {k: _localized(v, mounts) for k, v in value.items()}
    if isinstance(value, list):
        return [_localized(v, mounts) for v in value]
    if isinstance(value, str):
        for mount, local in mounts.items():
            if value.startswith(mount + "/"):
                return str(local) + value[len(mount) :]
    return value


@dataclass
class PodFiles:
    """What the kubelet mounts for the agent: the projected token and the bundle ConfigMap,
    owned by the agent's UID (as fsGroup makes them); and each pod's emptyDirs, under
    `empty_dirs`, mounted into the containers themselves (`container_mounts`)."""

    root: Path
    setup: CaSetup

    @property
    def empty_dirs(self) -> Path:
        """The kubelet's directory of every pod's emptyDirs: no container sees it."""
        return self.root / "empty"

    def empty_dir(self, pod: Mapping[str, Any], volume: str) -> Path:
        """The node's directory for the emptyDir `volume` of `pod`: made on first use,
        mode 0777, as the kubelet makes it."""
        directory = self.empty_dirs / pod["metadata"]["name"] / volume
        if not directory.exists():
            directory.mkdir(parents=True)
            directory.chmod(0o777)
        return directory

    def container_mounts(self, pod: Mapping[str, Any], spec: Mapping[str, Any]) -> list[Mount]:
        """The emptyDir mounts of the container `spec` of `pod`, as its runtime makes them."""
        volumes = {v["name"]: v for v in pod["spec"].get("volumes", [])}
        return [
            Mount(self.empty_dir(pod, m["name"]), m["mountPath"], m.get("readOnly", False))
            for m in spec.get("volumeMounts", [])
            if "emptyDir" in volumes[m["name"]]
        ]

    def mount(self, pod: Mapping[str, Any], agent: Mapping[str, Any]) -> dict[str, Path]:
        """Each of the agent's mount paths -> the directory holding that volume's files
        (emptyDirs aside: `container_mounts`)."""
        uid = agent["securityContext"]["runAsUser"]
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        account = pod["spec"].get("serviceAccountName", "default")
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        mounts = {}
        for mount in agent.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if "emptyDir" in volume:
                continue
            directory = self.root / name / mount["name"]
            directory.mkdir(parents=True, exist_ok=True)
            if "projected" in volume:
                for source in volume["projected"]["sources"]:
                    token = source["serviceAccountToken"]
                    text = self.setup.issuer.token(namespace, account)
                    _owned(directory / token["path"], text, uid)
            elif "configMap" in volume:
                _owned(directory / "bundle.pem", self.setup.bundle_pem.decode(), uid)
            mounts[mount["mountPath"]] = directory
        for path in (self.root / name, *mounts.values()):
            os.chown(path, uid, uid)
        return mounts


def _owned(path: Path, text: str, uid: int) -> None:
    path.write_text(text)
    os.chown(path, uid, uid)
    path.chmod(0o600)


def capture_init(pod: Pod, injected: Mapping[str, Any]) -> str:
    """The `outrider-capture` init container's command, run in the pod as its securityContext
    says: root, with the capabilities it adds (NET_ADMIN, NET_RAW) and no other, no new
    privileges; what it printed."""
    init = container(injected, CAPTURE)
    context = init["securityContext"]
    assert context["runAsUser"] == 0 and context["capabilities"]["drop"] == ["ALL"], context
    capabilities = ",".join(f"+{c.lower()}" for c in context["capabilities"]["add"])
    only = ("setpriv", f"--bounding-set=-all,{capabilities}", "--inh-caps=-all")
    if context.get("allowPrivilegeEscalation") is False:
        only += ("--no-new-privs",)
    done = pod.run([*only, "--", sys.executable, "-m", "outrider", *init["args"]], check=False)
    assert done.returncode == 0, f"{CAPTURE} failed:\n{done.stdout}{done.stderr}"
    return done.stdout


@contextmanager
def agent_container(
    root: Path, pod: Pod, injected: Mapping[str, Any], files: PodFiles
) -> Iterator[AgentProcess]:
    """The agent container of `injected`, run in `pod` as its runAsUser, with its
    environment and its mounts; yields once it is ready."""
    agent = container(injected, AGENT)
    uid = agent["securityContext"]["runAsUser"]
    env = container_env(injected, agent)
    mounts = files.mount(injected, agent)
    bootstrap = _localized(json.loads(env[CONFIG_ENV]), mounts)
    # The CA's and the control plane's serving certificates name localhost, not the node.
    bootstrap["ca"]["server_name"] = bootstrap["control"]["server_name"] = "localhost"
    assert agent["args"] == ["agent", "run", "--config-env", CONFIG_ENV], agent["args"]
    # As the container's runAsUser; with emptyDirs, in a mount namespace of its own.
    own = files.container_mounts(injected, agent)
    prefix = (
        pod.container_command([], user=uid, mounts=own, hidden=[files.empty_dirs])
        if own
        else pod.command([], user=uid)
    )
    with agent_process(
        root, pod.name, bootstrap, env=env, config_env=CONFIG_ENV, prefix=prefix
    ) as process:
        yield process


def app_container(
    pod: Pod,
    injected: Mapping[str, Any],
    name: str,
    files: PodFiles,
    args: Sequence[str],
    user: int = 1000,
) -> list[str]:
    """The command line of the app container `name` of `injected` running `args` in `pod`,
    as the container runtime would run it: as `user` (an app's UID, not the agent's), in
    namespaces of its own (mounts, with its emptyDirs; PIDs) but the pod's network. Its
    environment: `container_env`."""
    spec = container(injected, name)
    mounts = files.container_mounts(injected, spec)
    return pod.container_command(
        args, user=user, mounts=mounts, hidden=[files.empty_dirs], own_pids=True
    )


#: The Services' ClusterIPs: written out (users may), from a range the pods' /24s never
#: take (tests/netns.py picks 10.64-254.*.*), so a ClusterIP is never a pod's address.
#: Pods route it to the node by their default route; nothing there serves it: only a
#: captured connection, which the client's agent maps from its snapshot, reaches a pod.
SERVICE_CIDR = "10.32.0.0/16"
BACKEND_VIP = "10.32.0.10"

#: The users' namespace, injected, and the mesh's own.
NAMESPACES = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {outrider.io/inject: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: outrider-system}
---
"""
CAPTURE_NAMESPACES = (
    NAMESPACES
    + """\
apiVersion: v1
kind: Namespace
metadata: {name: outside}
"""
)
BACKEND_SERVICE = yaml.safe_dump(
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "backend", "namespace": "shop"},
        "spec": {
            "clusterIP": BACKEND_VIP,
            "selector": {"app": "backend"},
            "ports": [{"name": "http", "port": 8080, "targetPort": "http", "appProtocol": "http"}],
        },
    }
)

#: The pods as their Deployments' templates make them: nothing in them knows of the mesh.
#: The frontend names the backend as an explicit upstream too (127.0.0.1:15001), so the
#: same pair can be measured both ways (bench/capture.py).
FRONTEND = """\
apiVersion: v1
kind: Pod
metadata:
  name: frontend-7d9f8-x2k4p
  namespace: shop
  labels: {app: frontend}
  annotations: {outrider.io/upstreams: "backend:8080"}
spec:
  serviceAccountName: frontend
  containers:
    - name: app
      image: "shop/frontend:1"
      ports: [{name: http, containerPort: 3000}]
"""
BACKEND = """\
apiVersion: v1
kind: Pod
metadata:
  name: backend-5c7b9-a1b2c
  namespace: shop
  labels: {app: backend}
spec:
  serviceAccountName: backend
  containers:
    - name: app
      image: "shop/backend:1"
      ports: [{name: http, containerPort: 8080}]
      readinessProbe:
        httpGet: {path: /ready, port: http}
        periodSeconds: 5
        timeoutSeconds: 1
"""
#: A client in a namespace without injection: no agent, no capture.
OUTSIDER = """\
apiVersion: v1
kind: Pod
metadata: {name: curl-0, namespace: outside, labels: {app: curl}}
spec:
  containers: [{name: curl, image: "curlimages/curl:8"}]
"""


@dataclass
class Seen:
    """One request B's app received: its path and every x-forwarded-client-cert it carried."""

    path: str
    xfcc: list[str]


@dataclass
class Backend:
    """B's app (0.0.0.0:8080): answers every path, records what it received; `/ready`
    answers 200 while `ready` (its readiness probe's path)."""

    seen: list[Seen] = field(default_factory=list)
    ready: bool = True
    lock: threading.Lock = field(default_factory=threading.Lock)

    def application(self) -> web.Application:
        async def answer(request: web.Request) -> web.Response:
            xfcc = request.headers.getall("x-forwarded-client-cert", [])
            with self.lock:
                self.seen.append(Seen(request.path_qs, list(xfcc)))
            return web.json_response({"path": request.path_qs, "xfcc": xfcc})

        async def readiness(request: web.Request) -> web.Response:
            return web.Response(status=200 if self.ready else 503, text="ready")

        app = web.Application()
        app.router.add_get("/ready", readiness)
        app.router.add_route("*", "/{tail:.*}", answer)
        return app

    def received(self, prefix: str) -> list[Seen]:
        with self.lock:
            return [s for s in self.seen if s.path.startswith(prefix)]


@dataclass
class CaptureCluster:
    mesh: Mesh
    ca: CaProcess
    frontend: Pod
    backend: Pod
    outsider: Pod
    backend_app: Backend
    #: The pods as the API server holds them, injected.
    specs: dict[str, dict[str, Any]]

    @property
    def api(self) -> FakeApiServer:
        return self.mesh.api

    def agent(self, pod: Pod) -> AgentProcess:
        return self.mesh.agents[pod.name]


@asynccontextmanager
async def capture_cluster(root: Path, network: PodNetwork) -> AsyncIterator[CaptureCluster]:
    """The shop with capture on: a frontend (A) and a backend (B) injected, a client outside
    the mesh (C), the CA and the control plane on the node; yields once every agent is ready."""
    async with AsyncExitStack() as stack:
        mesh, ca = await start_node(
            stack, root, network, CAPTURE_NAMESPACES + "---\n" + BACKEND_SERVICE
        )
        api, setup = mesh.api, mesh.setup
        settings = mesh.settings(ca)
        specs: dict[str, dict[str, Any]] = {}
        for text in (FRONTEND, BACKEND):
            written = yaml.safe_load(text)
            name = written["metadata"]["name"]
            pod = mesh.pods[name] = network.add_pod(name)
            api.apply(yaml.safe_dump(inject(written, settings)))
            api.set_status("v1", "Pod", "shop", name, running(pod))
            specs[name] = api.get("v1", "Pod", "shop", name)  # with its uid, as stored
        outsider = network.add_pod("curl-0")
        api.apply(OUTSIDER)
        api.set_status("v1", "Pod", "outside", "curl-0", running(outsider))
        frontend, backend = (mesh.pods[name] for name in specs)
        api.apply(endpoint_slice("backend", [backend]))
        files = PodFiles(root / "pods", setup)

        def start(name: str) -> AgentProcess:
            """The pod's init container, then its agent (the kubelet's order)."""
            capture_init(mesh.pods[name], specs[name])
            agent = agent_container(root, mesh.pods[name], specs[name], files)
            return stack.enter_context(agent)

        # Both pods at once, each in its order.
        for name, agent in zip(
            specs, await asyncio.gather(*(asyncio.to_thread(start, n) for n in specs)), strict=True
        ):
            mesh.agents[name] = agent
        app = Backend()
        stack.enter_context(threaded_app_in(backend, app.application()))
        yield CaptureCluster(mesh, ca, frontend, backend, outsider, app, specs)


async def start_node(
    stack: AsyncExitStack, root: Path, network: PodNetwork, manifests: str
) -> tuple[Mesh, CaProcess]:
    """What runs on the node, until `stack` closes: the CA, a fake API server holding
    `manifests`, and the control plane, ready."""
    listen = {"grpc": f"{network.node_ip}:0", "http": "127.0.0.1:0"}
    setup = make_ca_setup(root, listen=listen)
    # The CA starts while the API server and the control plane do (it needs neither).
    ca_running = ca_process(setup.config)
    starting_ca = asyncio.create_task(asyncio.to_thread(ca_running.__enter__))
    stack.push_async_callback(_stop_ca, ca_running, starting_ca)
    api = stack.enter_context(fake_api_server_thread(root / "api"))
    api.apply(manifests)
    mesh = Mesh(root, api, network, setup)
    await mesh.start_control()
    stack.push_async_callback(mesh.stop_control)
    return mesh, await starting_ca


async def _stop_ca(
    running: AbstractContextManager[CaProcess], starting: asyncio.Task[CaProcess]
) -> None:
    """Leave `running` (a ca_process), however far `starting` (its entry) got."""
    try:
        await starting
    except BaseException:
        return  # it did not start: ca_process stopped what it began
    await asyncio.to_thread(running.__exit__, None, None, None)
