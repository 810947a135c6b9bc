"""The real control plane for tests: `outrider control serve` as a process, and agents' streams.

`control_plane(root, api)` writes the control plane's SVID (from a test CA),
control.yaml and a kubeconfig for the fake API server, starts the process
and waits for its ready line. `Subscription` is an agent's side of the
Subscribe stream, with an SVID of the test CA: Hello, then snapshots in,
Acks and Nacks out.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import ssl
import sys
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from grpclib.client import Channel, Stream

from ca.signers.local import init_ca
from identity.proto import control_pb2
from identity.proto.control_grpc import ControlPlaneStub
from tests.apiserver import FakeApiServer
from tests.certs import Credential, Shape, SigningCa, issue
from tests.k8s import in_cluster
from tests.support import TRUST_DOMAIN

CONTROL_ID = f"spiffe://{TRUST_DOMAIN}/ns/outrider-system/sa/outrider-control"
NAMESPACES = """\
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: Namespace
metadata: {name: billing}
"""
POD = """\
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{app: {name}}}}}
spec:
  serviceAccountName: {account}
  containers:
    - {{name: app, image: app:1, ports: [{{containerPort: 8080}}]}}
    - {{name: outrider-agent, image: agent:1}}
"""
DEFAULT_DENY = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: default-deny, namespace: shop}
spec: {}
"""
#: Namespace shop's ports permissive: plaintext callers may come in while they migrate.
PERMISSIVE = """\
apiVersion: security.outrider.io/v1alpha1
kind: PeerAuthentication
metadata: {name: migration, namespace: shop}
spec:
  mtls: {mode: PERMISSIVE}
"""
ALLOW_FRONTEND = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: frontend-reads-api, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
    - from: {principals: ["spiffe://example.org/ns/shop/sa/frontend"]}
      to: {methods: [GET], paths: ["/api/*"]}
"""


def pod(namespace: str, name: str, account: str, *, captured: bool = False) -> str:
    """An injected pod, as its Deployment's template would make it; `captured`: with the
    capture init container the injector adds."""
    text = POD.format(namespace=namespace, name=name, account=account)
    if captured:
        text += "  initContainers: [{name: outrider-capture, image: agent:1}]\n"
    return text


_READY = re.compile(r"on [^ ]+:(\d+) \(gRPC, mTLS\), debug on http://[^ ]+:(\d+)")


@dataclass
class TestCa:
    """A CA directory of the test trust domain; issues SVIDs for any SPIFFE ID."""

    directory: Path

    @classmethod
    def create(cls, directory: Path) -> TestCa:
        if not (directory / "intermediate.pem").exists():
            init_ca(directory, TRUST_DOMAIN, datetime.now(UTC), force=False)
        return cls(directory)

    @property
    def bundle_pem(self) -> bytes:
        return (self.directory / "bundle.pem").read_bytes()

    def svid(self, spiffe_id: str) -> Credential:
        return issue(SigningCa.load(self.directory), Shape(uris=(spiffe_id,)))

    def workload(self, namespace: str, account: str) -> Credential:
        return self.svid(f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{account}")


@dataclass
class ControlProcess:
    grpc_port: int
    debug_port: int
    ca: TestCa
    log: list[str]
    process: asyncio.subprocess.Process

    @property
    def debug_url(self) -> str:
        return f"http://127.0.0.1:{self.debug_port}"

    def get(self, path: str) -> tuple[int, Any]:
        """GET from the debug port (blocking: call through asyncio.to_thread)."""
        try:
            with urllib.request.urlopen(self.debug_url + path, timeout=5) as answer:
                body = answer.read()
                status = answer.status
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        kind = answer.headers.get("Content-Type", "")
        return status, json.loads(body) if "json" in kind else body.decode()

    async def debug(self, path: str) -> tuple[int, Any]:
        return await asyncio.to_thread(self.get, path)

    def client_context(self, credential: Credential | None) -> ssl.SSLContext:
        """An agent's TLS: trusts the bundle, presents `credential`, speaks h2."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False  # the control plane's name is its SPIFFE ID
        context.load_verify_locations(cadata=self.ca.bundle_pem.decode())
        context.set_alpn_protocols(["h2"])
        if credential is not None:
            from identity.tlsfiles import load_cert_chain

            load_cert_chain(context, credential.chain_pem, credential.key_pem)
        return context

    def channel(self, credential: Credential | None) -> Channel:
        return Channel("127.0.0.1", self.grpc_port, ssl=self.client_context(credential))


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


async def outrider(*args: str) -> Ran:
    """`outrider ARGS...` as a process, to its end."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outrider",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await process.communicate()
    return Ran(process.returncode or 0, out.decode(), err.decode())


async def ready(control: ControlProcess) -> None:
    """Until /ready answers 200: every kind listed, the mesh compiled."""

    async def answers() -> bool:
        return (await control.debug("/ready"))[0] == 200

    try:
        await eventually(answers, timeout=10)
    except TimeoutError:
        raise AssertionError("not ready in 10 s:\n" + "".join(control.log)) from None


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Wait until `check()` is true; TimeoutError after `timeout`."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110 - a poll of another process's state
            await asyncio.sleep(0.05)


@asynccontextmanager
async def control_plane(
    root: Path,
    api: FakeApiServer,
    *,
    ca_dir: Path | None = None,
    pod: bool = False,
    **overrides: object,
) -> AsyncIterator[ControlProcess]:
    """`outrider control serve` against `api`; stopped with SIGTERM, which must exit 0.

    Its SVID and bundle come from the CA directory `ca_dir` (another test's, so that
    its agents trust it), else from a new one under `root`. `pod`: it reaches the API
    server as from a pod (in-cluster config: the service host and port, the token and
    CA files), not with a kubeconfig.
    """
    ca = TestCa.create(ca_dir or root / "ca")
    own = ca.svid(CONTROL_ID)
    svid_dir = root / "svid"
    svid_dir.mkdir(parents=True, exist_ok=True)
    (svid_dir / "svid.pem").write_bytes(own.chain_pem)
    (svid_dir / "svid.key").write_bytes(own.key_pem)
    (svid_dir / "bundle.pem").write_bytes(ca.bundle_pem)
    config: dict[str, object] = {
        "trust_domain": str(TRUST_DOMAIN),
        "listen": "127.0.0.1:0",
        "debug": "127.0.0.1:0",
        "tls": {
            "cert_file": "svid/svid.pem",
            "key_file": "svid/svid.key",
            "bundle_file": "svid/bundle.pem",
        },
        **overrides,
    }
    (root / "control.yaml").write_text(yaml.safe_dump(config))
    command = ["control", "serve", "--config", str(root / "control.yaml")]
    launcher, env = ["-m", "outrider"], {}
    if pod:
        launcher, env = _in_cluster(api, root)
    else:
        command += ["--kubeconfig", str(api.kubeconfig(root / "kubeconfig"))]
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *launcher,
        *command,
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
        env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
    )
    log: list[str] = []
    assert process.stderr is not None
    ready = None
    async with asyncio.timeout(20):
        while ready is None:
            line = (await process.stderr.readline()).decode()
            if not line:
                raise AssertionError("the control plane did not start:\n" + "".join(log))
            log.append(line)
            ready = _READY.search(line)
    drain = asyncio.create_task(_drain(process.stderr, log))
    try:
        yield ControlProcess(int(ready[1]), int(ready[2]), ca, log, process)
    finally:
        process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            code = await process.wait()
        await drain
        assert code == 0, f"the control plane exited {code} on SIGTERM:\n" + "".join(log)


def _in_cluster(api: FakeApiServer, root: Path) -> tuple[list[str], dict[str, str]]:
    """tests.k8s.in_cluster for the fake API server: its address, CA file and token."""
    port = urllib.parse.urlsplit(api.url).port
    assert port is not None
    arguments, env = in_cluster(port, api.ca_file, root)
    (root / "serviceaccount-token").write_text(api.token)
    return arguments, env


async def _drain(stream: asyncio.StreamReader, log: list[str]) -> None:
    while line := await stream.readline():
        log.append(line.decode())


@dataclass
class Subscription:
    """One agent's Subscribe stream."""

    stream: Stream[control_pb2.AgentMessage, control_pb2.Snapshot]
    snapshots: list[control_pb2.Snapshot] = field(default_factory=list)

    async def next(self, timeout: float = 5.0) -> tuple[str, dict[str, Any]]:
        async with asyncio.timeout(timeout):
            snapshot = await self.stream.recv_message()
        assert snapshot is not None, "the control plane ended the stream"
        self.snapshots.append(snapshot)
        return snapshot.version, json.loads(snapshot.config_json)

    async def ack(self, version: str) -> None:
        await self.stream.send_message(
            control_pb2.AgentMessage(ack=control_pb2.Ack(version=version))
        )

    async def nack(self, version: str, error: str) -> None:
        message = control_pb2.AgentMessage(nack=control_pb2.Nack(version=version, error=error))
        await self.stream.send_message(message)


@asynccontextmanager
async def subscribed(
    control: ControlProcess,
    credential: Credential | None,
    pod: str,
    *,
    running_version: str = "",
) -> AsyncIterator[Subscription]:
    """A stream that has sent its Hello for `pod`."""
    channel = control.channel(credential)
    try:
        async with ControlPlaneStub(channel).Subscribe.open() as stream:
            hello = control_pb2.Hello(
                pod_name=pod, agent_version="tests", running_version=running_version
            )
            await stream.send_message(control_pb2.AgentMessage(hello=hello))
            yield Subscription(stream)
            await stream.cancel()
    finally:
        channel.close()


__all__ = [
    "ALLOW_FRONTEND",
    "DEFAULT_DENY",
    "NAMESPACES",
    "ControlProcess",
    "Ran",
    "Subscription",
    "TestCa",
    "control_plane",
    "eventually",
    "outrider",
    "pod",
    "ready",
    "subscribed",
]
