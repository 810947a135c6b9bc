"""Agents for tests: in-process (fast, same event loop) or as real processes.

In-process agents get their SVIDs from an in-process `Issuer` over the same
LocalSigner that `ca serve` uses, through the agent's injectable `sign`
function; tests of the CA protocol itself use a real `ca serve` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from grpclib.exceptions import GRPCError
from prometheus_client.parser import text_string_to_metric_families

from agent import config as agent_config
from agent.adapters.rotator import SignFn
from agent.app import Agent
from agent.core.svid import Svid
from ca.core.issuance import IssuancePolicy
from ca.issuer import Issuer
from ca.signers.local import LocalSigner
from identity import SpiffeId
from identity.proto import ca_pb2
from tests.prometheus import Prometheus, Target, start_prometheus
from tests.support import (
    TRUST_DOMAIN,
    CaProcess,
    CaSetup,
    ca_client,
    ca_process,
    free_port,
    make_ca_setup,
    make_csr,
    scraped,
    wait_for_line,
)

_READY = re.compile(r"ready as (\S+): (.*)$")
_ADMIN = re.compile(r"admin listening on (\S+)$")

#: `agent_process(launcher=MODULES_AT_EXIT, env={MODULES_FILE: path})`: the agent as ever,
#: and as it exits (SIGTERM: `AgentProcess.stop`) the names of every module it loaded go
#: to `path`, one a line (`loaded_modules` reads them): what an agent imports when.
MODULES_FILE = "OUTRIDER_TEST_MODULES"
MODULES_AT_EXIT = (
    "-c",
    "import atexit, os, runpy, sys\n"
    "def dump():\n"
    f"    with open(os.environ['{MODULES_FILE}'], 'w') as out:\n"
    "        out.write('\\n'.join(sorted(sys.modules)))\n"
    "atexit.register(dump)\n"
    "runpy.run_module('outrider', run_name='__main__', alter_sys=True)",
)


def loaded_modules(path: Path) -> set[str]:
    """What a MODULES_AT_EXIT agent that has exited had loaded."""
    return set(path.read_text().splitlines())


def workload(name: str, namespace: str = "demo") -> SpiffeId:
    return SpiffeId.parse(f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{name}")


def local_sign(
    setup: CaSetup,
    ttl: timedelta = timedelta(hours=1),
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> SignFn:
    """Issue straight from the CA directory, as `ca serve` would, without the network,
    by the CA's clock `now`."""
    signer = LocalSigner.load(setup.ca_dir)
    issuer = Issuer(signer, IssuancePolicy(default_ttl=ttl, max_ttl=ttl), now)

    async def sign(
        csr_der: bytes, trusted: bytes, svid: Svid | None, token: str | None
    ) -> ca_pb2.SignResponse:
        csr = x509.load_der_x509_csr(csr_der)
        # The identity comes from the "credential": the token names the workload here.
        spiffe_id = svid.spiffe_id if svid else SpiffeId.parse(str(token))
        issued = await issuer.issue(spiffe_id, csr.public_key())
        der = serialization.Encoding.DER
        return ca_pb2.SignResponse(
            cert_chain=[c.public_bytes(der) for c in issued.chain],
            trust_bundle=issued.bundle.to_der(),
            not_after=int(issued.leaf.not_valid_after_utc.timestamp()),
            spiffe_id=str(spiffe_id),
        )

    return sign


def agent_yaml(
    root: Path,
    name: str,
    *,
    ca_address: str = "127.0.0.1:1",
    token: str | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """A minimal agent.yaml for workload `name`, every port chosen by the kernel.

    Without `token` the token file holds the SPIFFE ID, which `local_sign`
    reads; agents of a real `ca serve` need a real token from the CaSetup's issuer.
    """
    token_file = root / f"{name}.token"
    if token is not None or not token_file.exists():
        token_file.write_text(token or str(workload(name)))
    config: dict[str, Any] = {
        "identity": {"spiffe_id": str(workload(name)), "token_file": str(token_file)},
        "ca": {
            "address": ca_address,
            "server_name": "localhost",
            "bundle_file": str(root / "ca" / "bundle.pem"),
        },
        "admin": "127.0.0.1:0",
    }
    config.update(sections)
    return config


def served_agent_yaml(setup: CaSetup, ca: CaProcess, name: str, **sections: Any) -> dict[str, Any]:
    """agent.yaml for workload `name` (namespace demo), with its SVID from the `ca serve` `ca`."""
    return agent_yaml(
        setup.root,
        name,
        ca_address=f"127.0.0.1:{ca.grpc_port}",
        token=setup.issuer.token("demo", name),
        **sections,
    )


def inbound(app_port: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"listen": "127.0.0.1:0", "app": f"127.0.0.1:{app_port}", **extra}]


def outbound(address: str, *server_ids: SpiffeId, name: str = "backend") -> list[dict[str, Any]]:
    return [
        {
            "name": name,
            "listen": "127.0.0.1:0",
            "endpoints": [address],
            "server_ids": [str(i) for i in server_ids],
        }
    ]


@asynccontextmanager
async def running_agent(raw: dict[str, Any], sign: SignFn, root: Path) -> AsyncIterator[Agent]:
    document = agent_config.Document(raw, root, "agent.yaml")  # what snapshots merge into
    agent = Agent(document.parse(), sign=sign, document=document)
    await asyncio.wait_for(agent.start(), 10)
    try:
        yield agent
    finally:
        await agent.drain()
        await agent.stop()


def sample(agent: Agent, name: str, **labels: str) -> float:
    """One sample of an in-process agent's metrics; 0 when absent."""
    return agent.metrics.registry.get_sample_value(name, labels) or 0.0


async def eventually(check: Callable[[], bool], seconds: float = 2.0) -> bool:
    """`check()` became true within `seconds`: an agent may count after its peer sees a close."""
    for _ in range(int(seconds / 0.01)):
        if check():
            return True
        await asyncio.sleep(0.01)
    return check()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A plain TCP app's connection: echoes until the other side closes."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@asynccontextmanager
async def echo_server(accepted: list[int] | None = None) -> AsyncIterator[int]:
    """A plain TCP app that echoes; yields its port. Appends 1 to `accepted` per connection."""

    async def counted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if accepted is not None:
            accepted.append(1)
        await echo(reader, writer)

    server = await asyncio.start_server(counted, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


@contextmanager
def threaded_app(
    application: web.Application,
    tls: ssl.SSLContext | None = None,
    sock: socket.socket | None = None,
) -> Iterator[int]:
    """An aiohttp app on an event loop of its own in a thread, so tests that block on
    sockets and agent processes can reach it (over HTTPS with `tls`); yields its port.
    On 127.0.0.1 unless given a bound, listening `sock` (e.g. one of a pod's,
    tests.netns.Pod.socket). The loop is driven only in its thread: the caller may be
    running a loop of its own."""
    loop = asyncio.new_event_loop()
    runner = web.AppRunner(application, access_log=None)

    async def start() -> int:
        await runner.setup()
        if sock is None:
            site: web.BaseSite = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=tls)
        else:
            site = web.SockSite(runner, sock, ssl_context=tls)
        await site.start()
        return int(runner.addresses[0][1])

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@asynccontextmanager
async def closing_http_server() -> AsyncIterator[int]:
    """An HTTP/1.1 app that answers each connection's first request `200 ok` and closes it."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def round_trip(address: str, payload: bytes = b"ping", timeout: float = 5.0) -> bytes:
    """Send `payload` through `address` and read back as many bytes; b'' if refused."""
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(payload)
        await writer.drain()
        received = b""
        while len(received) < len(payload):
            chunk = await asyncio.wait_for(reader.read(65536), timeout)
            if not chunk:
                break
            received += chunk
        return received
    except ConnectionError:
        return b""
    finally:
        writer.close()


async def mtls_exchange(
    address: str, context: ssl.SSLContext, payload: bytes = b"secret for the app"
) -> bytes:
    """What comes back for `payload` over mTLS; b'' if the server refused us.

    Under TLS 1.3 the client's handshake completes before the server has
    checked the client certificate, so a refusal shows on the first read: an
    alert, a reset or EOF. A connection the server neither answers nor
    closes fails the test with a TimeoutError rather than passing as refused.
    """
    host, port = address.rsplit(":", 1)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(host, int(port), ssl=context, server_hostname=""), 2
        )
    except ssl.SSLCertVerificationError:
        raise  # the client distrusts the agent: a broken test, not a refusal
    except (ssl.SSLError, ConnectionError):
        return b""
    received = b""
    try:
        writer.write(payload)
        while len(received) < len(payload):
            chunk = await asyncio.wait_for(reader.read(65536), 2)
            if not chunk:
                break
            received += chunk
    except (ssl.SSLError, ConnectionError):
        pass
    finally:
        writer.close()
    return received


# --- agents as real processes -------------------------------------------------


@dataclass
class AgentProcess:
    name: str
    process: subprocess.Popen[str]
    bound: dict[str, str]
    log: list[str] = field(default_factory=list)

    def get(self, path: str) -> str:
        url = f"http://{self.bound['admin']}{path}"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def metrics(self) -> str:
        return self.get("/metrics")

    def sample(self, name: str, **labels: str) -> float:
        """One sample of /metrics (`name` as exposed, e.g. with _total); 0 when absent."""
        return scraped(self.metrics(), name, **labels)

    def total(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` whose labels include `labels` (0 when none)."""
        return sum(
            sample.value
            for family in text_string_to_metric_families(self.metrics())
            for sample in family.samples
            if sample.name == name and labels.items() <= sample.labels.items()
        )

    def threads(self) -> int:
        """The process's threads now (Linux)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"^Threads:\s+(\d+)", status, re.MULTILINE)[1])  # type: ignore[index]

    def certs(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/certs")))

    def config_dump(self) -> dict[str, Any]:
        return dict(json.loads(self.get("/config_dump")))

    def status(self, path: str) -> int:
        """The admin server's status code for `path` (/ready: 200 or 503)."""
        try:
            with urllib.request.urlopen(f"http://{self.bound['admin']}{path}", timeout=5) as page:
                return int(page.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    def wait_ready(self, timeout: float = 10.0) -> dict[str, str]:
        """Once it logs that it is ready: its listeners (name -> address), also in `bound`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.log):
                if match := _READY.search(line):
                    self.bound = dict(part.split(" ", 1) for part in match[2].split(", "))
                    return self.bound
            time.sleep(0.02)
        raise AssertionError(f"agent {self.name} not ready in {timeout}s:\n" + "".join(self.log))

    def logged(self, text: str, timeout: float = 10.0) -> bool:
        """`text` appeared in its log within `timeout`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in line for line in list(self.log)):
                return True
            time.sleep(0.02)
        return False

    def stop(self, timeout: float = 10.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)


@contextmanager
def agent_process(
    root: Path,
    name: str,
    raw: dict[str, Any],
    timeout: float = 20.0,
    *,
    launcher: Sequence[str] = ("-m", "outrider"),
    env: Mapping[str, str] | None = None,
    ready: bool = True,
    prefix: Sequence[str] = (),
    config_env: str | None = None,
    stdout: int = subprocess.DEVNULL,
) -> Iterator[AgentProcess]:
    """`outrider agent run` as a real process; yields once it logs that it is ready
    (`ready` False: once its admin server listens, `bound` holding only that).

    `launcher` and `env` run it another way (tests.k8s.in_cluster: as in a pod);
    `prefix` goes before the command line: `Pod.prefix` (tests.netns) runs it in a
    pod's network namespace. `config_env`: `raw` goes in that environment variable
    (`--config-env`, as the injector's container passes it), not in a file.
    `stdout`: where its stdout goes (a pipe's write end: its access log).
    """
    extra = dict(env or {})
    if config_env is None:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(raw))
        arguments = ["--config", str(path)]
    else:
        extra[config_env] = json.dumps(raw)
        arguments = ["--config-env", config_env]
    process = subprocess.Popen(
        [*prefix, sys.executable, *launcher, "agent", "run", *arguments],
        stderr=subprocess.PIPE,
        stdout=stdout,
        text=True,
        env={**os.environ, **extra, "PYTHONUNBUFFERED": "1"},
    )
    log: list[str] = []
    match = wait_for_line(process, _READY if ready else _ADMIN, log, timeout, f"agent {name}")
    if ready:
        bound = dict(part.split(" ", 1) for part in match[2].split(", "))
    else:
        bound = {"admin": match[1]}
    agent = AgentProcess(name, process, bound, log)
    try:
        yield agent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@dataclass
class Logged:
    """An agent process and the read end of its stdout (its access log), read only when
    asked: `lines()` takes what waits, without blocking."""

    agent: AgentProcess
    read_fd: int
    rest: bytes = b""  # a line read in part

    def lines(self) -> list[dict[str, Any]]:
        """Every whole line waiting in the pipe now, parsed (each must be JSON)."""
        chunks = []
        while True:
            try:
                chunk = os.read(self.read_fd, 1 << 16)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        whole, _, self.rest = (self.rest + b"".join(chunks)).rpartition(b"\n")
        text = whole.decode("ascii")  # ensure_ascii: any byte beyond is a defect
        return [json.loads(line) for line in text.splitlines()]

    def wait_for(self, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Lines read until one satisfies `predicate`; all of them."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen += self.lines()
            if any(predicate(line) for line in seen):
                return seen
            time.sleep(0.02)
        raise AssertionError(f"no such line in {len(seen)} lines: {seen[-3:]}")

    async def arrived(self, predicate: Any, timeout: float = 10.0) -> list[dict[str, Any]]:
        """`wait_for` for a test whose servers run on its own event loop (never blocked)."""
        seen: list[dict[str, Any]] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen += self.lines()
            if any(predicate(line) for line in seen):
                return seen
            await asyncio.sleep(0.02)
        raise AssertionError(f"no such line in {len(seen)} lines: {seen[-3:]}")


@contextmanager
def logged_agent(
    root: Path, name: str, raw: dict[str, Any], *, pipe_size: int = 0, **options: Any
) -> Iterator[Logged]:
    """`agent_process` (`options` as it takes them) whose stdout is a pipe the test reads:
    its access log (`pipe_size`: the pipe's capacity in bytes, if not the default)."""
    read_fd, write_fd = os.pipe()
    if pipe_size:
        fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, pipe_size)
    os.set_blocking(read_fd, False)
    try:
        with agent_process(root, name, raw, stdout=write_fd, **options) as agent:
            os.close(write_fd)
            write_fd = -1
            yield Logged(agent, read_fd)
    finally:
        if write_fd >= 0:
            os.close(write_fd)
        os.close(read_fd)


# --- a mesh for the audit questions (issue 18), scraped by a real Prometheus ----------

#: The server agent's policy: one DENY rule, so a deny has a policy, a rule and a caller.
AUDITED_POLICY = {
    "policies": [
        {
            "name": "guard",
            "action": "DENY",
            "rules": [{"name": "no-admin", "to": {"paths": ["/admin*"]}}],
        }
    ]
}
#: Paths, query strings and header values the audited mesh's traffic carries: none may
#: ever show up in a label value (or a log an auditor ships).
ODD_STRINGS = ("hunter2", "etc/passwd", "%2e%2e", "x-secret-header-value", "zzzz")


@dataclass
class AuditedMesh:
    """`audited_mesh`'s parts: the CA, its setup (audit log), two agents, Prometheus."""

    setup: CaSetup
    ca: CaProcess
    server: AgentProcess
    client: AgentProcess
    prometheus: Prometheus
    server_port: str  # the server's inbound listener's port
    began: datetime  # before the CA and the agents started: an audit's --since
    odd_strings: tuple[str, ...] = ODD_STRINGS


@contextmanager
def audited_mesh(root: Path) -> Iterator[AuditedMesh]:
    """A real `ca serve`, agents `server` (an HTTP app behind a strict inbound, the
    AUDITED_POLICY) and `client` (an HTTP outbound to it; an SVID of 4 s, backdated 1 s:
    it rotates every 2-3 s), scraped every second by a real Prometheus (jobs `agent`
    with namespace demo, `ca` with namespace outrider-system); then the traffic an audit
    looks for: allowed requests, one denied (GET /admin), one plaintext caller on the
    strict port, one TLS caller without a certificate, odd paths (ODD_STRINGS), and one
    CSR the CA refuses (`intruder`'s token, meant for another audience).

    Prometheus starts first, with every address chosen in advance: its first scrape
    comes ~5 s after it starts, while the CA and the agents start.
    """
    began = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    setup = make_ca_setup(
        root,
        listen={"grpc": "127.0.0.1:0", "http": f"127.0.0.1:{free_port()}"},
        issuance={"backdate": "1s"},
    )
    ca_http = yaml.safe_load(setup.config.read_text())["listen"]["http"]
    admins = {name: f"127.0.0.1:{free_port()}" for name in ("server", "client")}
    targets = {
        "agent": [Target(address, {"namespace": "demo"}) for address in admins.values()],
        "ca": [Target(ca_http, {"namespace": "outrider-system"})],
    }
    with (
        start_prometheus(targets, root / "prometheus") as prometheus,
        threaded_app(_audited_app()) as app_port,
        ca_process(setup.config) as ca,
    ):
        server_raw = served_agent_yaml(
            setup, ca, "server", inbound=inbound(app_port, protocol="http"), policy=AUDITED_POLICY
        )
        server_raw["admin"] = admins["server"]
        with agent_process(root, "server", server_raw) as server:
            server_address = server.bound["inbound[0]"]
            client_raw = served_agent_yaml(
                setup, ca, "client", outbound=outbound(server_address, workload("server"))
            )
            client_raw["outbound"][0]["protocol"] = "http"
            client_raw["identity"]["ttl"] = "4s"
            client_raw["admin"] = admins["client"]
            with agent_process(root, "client", client_raw) as client:
                _audited_traffic(client.bound["outbound[backend]"], server_address, setup)
                asyncio.run(_refused_csr(setup, ca))
                prometheus.wait_for_targets()
                port = server_address.rsplit(":", 1)[1]
                yield AuditedMesh(setup, ca, server, client, prometheus, port, began)


def _audited_app() -> web.Application:
    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", answer)
    return application


def _audited_traffic(outbound_address: str, server_address: str, setup: CaSetup) -> None:
    """Allowed and odd requests through the client agent, one denied; a plaintext caller
    and a TLS caller without a certificate straight at the server's strict port."""

    def get(path: str, **headers: str) -> int:
        request = urllib.request.Request(f"http://{outbound_address}{path}", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return int(response.status)
        except urllib.error.HTTPError as exc:
            return int(exc.code)

    assert get("/api/orders") == 200
    assert get("/api/orders?token=hunter2", authorization="Bearer hunter2") == 200
    assert get("/api/../../etc/passwd") in (200, 400, 404)
    assert get("/%2e%2e/api", **{"x-secret": "x-secret-header-value"}) in (200, 400, 404)
    assert get("/" + "zzzz" * 200) in (200, 400, 414, 431)
    assert get("/admin/users?token=hunter2") == 403
    host, port = server_address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as plaintext:
        plaintext.sendall(b"GET /etc/passwd?token=hunter2 HTTP/1.1\r\nHost: x\r\n\r\n")
        plaintext.settimeout(5)
        with contextlib.suppress(ConnectionResetError):
            assert plaintext.recv(1024) == b""  # closed: no byte of the app's
    anonymous = ssl.create_default_context(cadata=setup.bundle_pem.decode())
    anonymous.check_hostname = False
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        try:
            with anonymous.wrap_socket(raw, server_hostname="server") as tls:
                tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert tls.recv(1024) == b""
        except (ssl.SSLError, ConnectionError):
            pass  # refused: no certificate


async def _refused_csr(setup: CaSetup, ca: CaProcess) -> None:
    """A CSR with a token for another audience: the CA refuses it and logs the refusal."""
    token = setup.issuer.token("demo", "intruder", audience="someone-else")
    async with ca_client(setup, ca) as client:
        try:
            await client.sign(make_csr(), token=token)
        except GRPCError:
            return
    raise AssertionError("the CA signed a CSR whose token was meant for another audience")
