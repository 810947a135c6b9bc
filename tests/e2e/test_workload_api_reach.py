"""The Workload API socket reaches its own pod and no other (issue 21's acceptance).

Two pods, network namespaces on one node (tests/netns.py), each written as its
Deployment's template makes it, annotated outrider.io/workload-api: "enabled" and
injected by the injector's own `mutate` (no capture: the socket is the subject).
Each runs what the injected spec says, as the kubelet and the container runtime
would: the agent as UID 1337 from its bootstrap, its Workload API socket in the
pod's emptyDir; the app containers as another UID, each in a mount and PID
namespace of its own with that emptyDir read-only at /var/run/outrider/workload
and SPIFFE_ENDPOINT_SOCKET from the spec. The node keeps every pod's emptyDir in
one directory, which no container sees (tests/mesh_cluster.py `PodFiles`).

A's app gets A's SVID through py-spiffe, as an app does; B's app gets B's, and
cannot reach A's socket by any path it has. What keeps it out is the volume, not
the network: a process in B's network namespace on the node's filesystem reaches
A's socket (the control, showing the path is the right one).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from identity.injected import WORKLOAD_API_SOCKET, WORKLOAD_API_VOLUME
from tests.mesh import AgentProcess
from tests.mesh_cluster import (
    NAMESPACES,
    PodFiles,
    agent_container,
    app_container,
    container,
    container_env,
    inject,
    running,
    start_node,
)
from tests.netns import Pod, PodNetwork, pod_network
from tests.support import TRUST_DOMAIN

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]

#: Each pod as its Deployment's template makes it: the annotation is all it knows.
TEMPLATE = """\
apiVersion: v1
kind: Pod
metadata:
  name: {name}
  namespace: shop
  labels: {{app: {name}}}
  annotations: {{outrider.io/workload-api: enabled}}
spec:
  serviceAccountName: {name}
  containers: [{{name: app, image: "shop/{name}:1"}}]
"""
A, B = "wl-a", "wl-b"

#: The app: py-spiffe's client as an app uses it (the socket from SPIFFE_ENDPOINT_SOCKET,
#: or a path given), then a bare connect to each path given: one JSON line.
CALLER = """\
import json, os, socket, sys, warnings
warnings.simplefilter("ignore")
from spiffe import WorkloadApiClient
out = {"endpoint": os.environ.get("SPIFFE_ENDPOINT_SOCKET")}
try:
    with WorkloadApiClient(default_timeout=5) as client:
        out["spiffe_id"] = str(client.fetch_x509_svid().spiffe_id)
except Exception as exc:
    out["spiffe_id"] = None
    out["error"] = type(exc).__name__
out["connect"] = {}
for path in sys.argv[1:]:
    directory, name = os.path.split(path)
    with socket.socket(socket.AF_UNIX) as sock:
        try:
            os.chdir(directory)  # a Unix socket's path: 107 bytes at most
            sock.connect(name)
            out["connect"][path] = "connected"
        except OSError as exc:
            out["connect"][path] = exc.strerror
print(json.dumps(out))
"""


@dataclass
class Cluster:
    pods: dict[str, Pod]
    specs: dict[str, dict[str, Any]]
    agents: dict[str, AgentProcess]
    files: PodFiles

    def socket_on_node(self, name: str) -> Path:
        """Where the node keeps pod `name`'s socket (its emptyDir's directory)."""
        volume = self.files.empty_dir(self.specs[name], WORKLOAD_API_VOLUME)
        return volume / Path(WORKLOAD_API_SOCKET).name

    def app(self, name: str, *paths: Path) -> dict[str, Any]:
        """CALLER run as pod `name`'s app container; what it printed."""
        done = self.run_app(name, [sys.executable, "-c", CALLER, *map(str, paths)])
        assert done.returncode == 0, done.stderr
        result: dict[str, Any] = json.loads(done.stdout)
        return result

    def run_app(self, name: str, args: list[str]) -> subprocess.CompletedProcess[str]:
        """`args` run as pod `name`'s app container, with its environment."""
        spec = self.specs[name]
        env = container_env(spec, container(spec, "app"))
        command = app_container(self.pods[name], spec, "app", self.files, args)
        return run(command, env)


def run(command: list[str], env: Mapping[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, capture_output=True, text=True, timeout=30, env={**os.environ, **env}
    )


@pytest.fixture(scope="module")
def network() -> Iterator[PodNetwork]:
    with pod_network() as pods:
        yield pods


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(
    tmp_path_factory: pytest.TempPathFactory, network: PodNetwork
) -> AsyncIterator[Cluster]:
    """The CA, the control plane and a fake API server on the node; pods A and B injected,
    their agents ready and serving the Workload API in their emptyDirs."""
    root = tmp_path_factory.mktemp("wl")
    async with AsyncExitStack() as stack:
        mesh, ca = await start_node(stack, root, network, NAMESPACES)
        api, settings = mesh.api, mesh.settings(ca).without_capture()
        files = PodFiles(root / "pods", mesh.setup)
        pods, specs = {}, {}
        for name in (A, B):
            pods[name] = network.add_pod(name)
            api.apply(yaml.safe_dump(inject(yaml.safe_load(TEMPLATE.format(name=name)), settings)))
            api.set_status("v1", "Pod", "shop", name, running(pods[name]))
            specs[name] = api.get("v1", "Pod", "shop", name)
        started = await asyncio.gather(
            *(
                asyncio.to_thread(
                    stack.enter_context, agent_container(root, pods[n], specs[n], files)
                )
                for n in (A, B)
            )
        )
        yield Cluster(pods, specs, dict(zip((A, B), started, strict=True)), files)


def spiffe_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/shop/sa/{name}"


async def test_an_app_gets_its_own_pods_svid_from_the_socket_the_injector_named(
    cluster: Cluster,
) -> None:
    for name in (A, B):
        seen = cluster.app(name, Path(WORKLOAD_API_SOCKET))
        assert seen["endpoint"] == "unix://" + WORKLOAD_API_SOCKET
        assert seen["spiffe_id"] == spiffe_id(name), seen
        assert seen["connect"] == {WORKLOAD_API_SOCKET: "connected"}
    # The app may connect to the socket, not put another in its place.
    unlink = f"import os; os.unlink({WORKLOAD_API_SOCKET!r})"
    refused = cluster.run_app(A, [sys.executable, "-c", unlink])
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr
    assert cluster.socket_on_node(A).is_socket()


async def test_an_app_of_another_pod_cannot_reach_the_socket(cluster: Cluster) -> None:
    a_socket = cluster.socket_on_node(A)
    assert a_socket.is_socket()  # A's agent serves it, in A's emptyDir on the node
    # Through A's agent's root, as a process that sees the node's processes could.
    # (/var/run is a link to /run: resolved here, as an absolute link would be to our /.)
    inside = Path(WORKLOAD_API_SOCKET).resolve()
    a_root = Path(f"/proc/{cluster.agents[A].process.pid}/root{inside}")
    assert a_root.is_socket()
    seen = cluster.app(B, a_socket, a_root)
    # B's app: its own pod's SVID at the path it was given, and A's socket out of sight.
    assert seen["spiffe_id"] == spiffe_id(B)
    assert seen["connect"] == {
        str(a_socket): "No such file or directory",
        str(a_root): "No such file or directory",
    }


async def test_the_volume_not_the_network_keeps_it_in_the_pod(cluster: Cluster) -> None:
    """The control: in B's network namespace, but with the node's filesystem, A's socket
    answers (a network namespace is no wall for a Unix socket's path): the emptyDir,
    per pod and seen by its containers alone, is what keeps callers out."""
    a_socket = cluster.socket_on_node(A)
    env = {"SPIFFE_ENDPOINT_SOCKET": f"unix://{a_socket}"}
    command = cluster.pods[B].command([sys.executable, "-c", CALLER, str(a_socket)], user=1000)
    done = run(command, env)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["connect"] == {str(a_socket): "connected"}
    assert seen["spiffe_id"] == spiffe_id(A)
