"""A root removed from the trust bundle stops being trusted within seconds, not at renewal.

A real CA and two agents run as processes. The CA's bundle holds two roots:
the one it issues under now and an old one. A peer whose SVID chains only to
the old root is accepted inbound and outbound until the old root is removed,
from the bundle file, from the CA (restarted on the smaller bundle), or
both; then new connections refuse it within seconds, while the agents go on
talking to each other. Their SVIDs live an hour: no renewal is involved.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractContextManager, ExitStack, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from grpclib.exceptions import StreamTerminatedError

from ca.signers.local import init_ca
from identity import TrustBundle
from tests import certs
from tests.certs import Credential, Shape, SigningCa
from tests.mesh import (
    AgentProcess,
    agent_process,
    agent_yaml,
    echo_server,
    inbound,
    local_sign,
    mtls_exchange,
    outbound,
    round_trip,
    running_agent,
    workload,
)
from tests.support import (
    TRUST_DOMAIN,
    CaProcess,
    CaSetup,
    ca_client,
    ca_process,
    free_port,
    make_ca_setup,
    make_csr,
)

PAYLOAD = b"over the old root"
#: How long a removal may take to reach new connections: the file is read every
#: second and the CA asked every second here; a loaded machine gets some slack.
REACH = 8.0
OLD_CLIENT, OLD_SERVER = workload("old-client"), workload("old-server")


class Roots:
    """A CA directory issuing under a new root, with an old root still in its bundle."""

    def __init__(self, root: Path) -> None:
        self.ca_address = f"127.0.0.1:{free_port()}"  # the same after a restart
        listen = {"grpc": self.ca_address, "http": "127.0.0.1:0"}
        self.setup: CaSetup = make_ca_setup(root, listen=listen)
        ca_dir = self.setup.ca_dir
        self.old = SigningCa.load(ca_dir)  # the first root's intermediate, for old peers
        self.old_root = (ca_dir / "root.pem").read_bytes()
        init_ca(root / "new", TRUST_DOMAIN, datetime.now(UTC), force=False)
        for name in ("intermediate.pem", "intermediate.key", "root.pem"):
            shutil.copy(root / "new" / name, ca_dir / name)
        self.new_root = (ca_dir / "root.pem").read_bytes()
        self.both = self.old_root + self.new_root
        self.agents_file = root / "agents-bundle.pem"  # the ConfigMap the agents mount
        for path in (ca_dir / "bundle.pem", self.agents_file):
            path.write_bytes(self.both)

    def old_svid(self, spiffe_id: object) -> Credential:
        return certs.issue(self.old, Shape(uris=(str(spiffe_id),)))

    def agent(
        self, name: str, refresh: str, **sections: Any
    ) -> AbstractContextManager[AgentProcess]:
        """`outrider agent run` for workload `name` of this CA; enter it to start it."""
        setup = self.setup
        token = setup.issuer.token("demo", name)
        raw = agent_yaml(setup.root, name, ca_address=self.ca_address, token=token, **sections)
        raw["ca"].update({"bundle_file": str(self.agents_file), "bundle_refresh": refresh})
        return agent_process(setup.root, name, raw)

    def remove_old_root(self, ca: CaProcess, removal: str, stack: ExitStack) -> None:
        if removal in ("file-and-ca", "file-only"):
            self.agents_file.write_bytes(self.new_root)
        if removal != "file-only":  # the CA restarted on the smaller bundle, same address
            ca.process.send_signal(signal.SIGTERM)
            assert ca.process.wait(10) == 0
            (self.setup.ca_dir / "bundle.pem").write_bytes(self.new_root)
            stack.enter_context(ca_process(self.setup.config))


@asynccontextmanager
async def tls_echo(context: ssl.SSLContext) -> AsyncIterator[int]:
    """An upstream that is not an agent: it echoes over TLS with `context`."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def within(seconds: float, check: Callable[[], Awaitable[bool]]) -> bool:
    """`check()` came true within `seconds`, trying a new connection every 200 ms."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.2)
    return await check()


@pytest.mark.parametrize("removal", ["file-and-ca", "file-only", "ca-only", "ca-only-sighup"])
async def test_a_removed_root_is_refused_on_new_connections_within_seconds(
    tmp_path: Path, removal: str
) -> None:
    """`ca-only-sighup` asks the CA only hourly: SIGHUP makes the agents ask at once."""
    roots = Roots(tmp_path)
    refresh = "1h" if removal == "ca-only-sighup" else "1s"
    old_client = certs.client_context(roots.both, roots.old_svid(OLD_CLIENT))
    old_server = certs.server_context(roots.both, roots.old_svid(OLD_SERVER))
    with ExitStack() as stack:
        ca = stack.enter_context(ca_process(roots.setup.config))
        async with echo_server() as app_port, tls_echo(old_server) as old_port:
            backend = stack.enter_context(
                roots.agent("backend", refresh, inbound=inbound(app_port))
            )
            upstreams = outbound(backend.bound["inbound[0]"], workload("backend"))
            upstreams += outbound(f"127.0.0.1:{old_port}", OLD_SERVER, name="old")
            upstreams[1]["listen"] = f"127.0.0.1:{free_port()}"  # two listeners on port 0 are one
            frontend = stack.enter_context(roots.agent("frontend", refresh, outbound=upstreams))

            async def old_peer_accepted() -> tuple[bool, bool]:
                inbound_old = mtls_exchange(backend.bound["inbound[0]"], old_client, PAYLOAD)
                outbound_old = round_trip(frontend.bound["outbound[old]"], PAYLOAD, 2)
                return await inbound_old == PAYLOAD, await outbound_old == PAYLOAD

            assert await old_peer_accepted() == (True, True), "refused before the removal"
            roots.remove_old_root(ca, removal, stack)
            if removal == "ca-only-sighup":
                for agent in (backend, frontend):
                    agent.process.send_signal(signal.SIGHUP)
            refused = await within(REACH, lambda: _none(old_peer_accepted()))
            assert refused, f"the old root is still trusted {REACH}s after its removal"
            assert await round_trip(frontend.bound["outbound[backend]"], PAYLOAD) == PAYLOAD
            for agent in (backend, frontend):
                roots_in_use = agent.certs()["bundle"]["roots"]
                assert len(roots_in_use) == 1, agent.name


async def _none(accepted: Awaitable[tuple[bool, bool]]) -> bool:
    return not any(await accepted)


async def test_the_ca_serves_its_bundle_to_a_caller_without_a_credential(
    setup: CaSetup, ca: CaProcess
) -> None:
    """The bundle is public; an agent whose SVID the CA no longer trusts must still get it."""
    async with ca_client(setup, ca) as client:
        ders = await client.get_bundle(deadline=5)
    assert TrustBundle.from_der(TRUST_DOMAIN, ders) == TrustBundle.from_pem(
        TRUST_DOMAIN, setup.bundle_pem
    )
    assert setup.issued_count() == 0


async def test_a_file_change_is_applied_while_the_ca_hangs(tmp_path: Path) -> None:
    """A CA that accepts and never answers holds up its own question, not the file's."""
    roots = Roots(tmp_path)
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    old_client = certs.client_context(roots.both, roots.old_svid(OLD_CLIENT))
    try:
        async with echo_server() as app_port:
            raw = agent_yaml(tmp_path, "backend", inbound=inbound(app_port))
            port = silent.sockets[0].getsockname()[1]
            raw["ca"].update(
                {"address": f"127.0.0.1:{port}", "bundle_file": str(roots.agents_file)}
            )
            async with running_agent(raw, local_sign(roots.setup), tmp_path) as agent:
                address = agent.bound["inbound[0]"]
                assert await mtls_exchange(address, old_client, PAYLOAD) == PAYLOAD
                roots.agents_file.write_bytes(roots.new_root)

                async def refused() -> bool:
                    return await mtls_exchange(address, old_client, PAYLOAD) == b""

                assert await within(REACH / 2, refused)
                assert held, "the agent never asked the silent CA"
    finally:
        silent.close()
        for writer in held:
            writer.close()


def _rotate_ca_to_a_new_root(setup: CaSetup, root: Path) -> bytes:
    """The CA directory now issues under a new root, and its bundle holds only that root."""
    init_ca(root / "new", TRUST_DOMAIN, datetime.now(UTC), force=False)
    for name in ("intermediate.pem", "intermediate.key", "root.pem"):
        shutil.copy(root / "new" / name, setup.ca_dir / name)
    new_root = (setup.ca_dir / "root.pem").read_bytes()
    (setup.ca_dir / "bundle.pem").write_bytes(new_root)
    return new_root


async def test_an_agent_whose_root_was_removed_renews_with_its_token(tmp_path: Path) -> None:
    """The CA restarted on a new root only refuses the agent's SVID in the handshake: the
    agent must not keep presenting it until it expires, but fall back to its token."""
    ca_address = f"127.0.0.1:{free_port()}"
    setup = make_ca_setup(tmp_path, listen={"grpc": ca_address, "http": "127.0.0.1:0"})
    with ExitStack() as stack:
        ca = stack.enter_context(ca_process(setup.config))
        token = setup.issuer.token("demo", "backend")
        raw = agent_yaml(tmp_path, "backend", ca_address=ca_address, token=token)
        raw["ca"]["bundle_refresh"] = "1s"
        agent = stack.enter_context(agent_process(tmp_path, "backend", raw))
        first = agent.certs()["serial"]
        new_root = _rotate_ca_to_a_new_root(setup, tmp_path)
        ca.process.send_signal(signal.SIGTERM)
        assert ca.process.wait(10) == 0
        stack.enter_context(ca_process(setup.config))

        new_sha = x509.load_pem_x509_certificate(new_root).fingerprint(hashes.SHA256()).hex()

        async def renewed_under_the_new_root() -> bool:
            shown = agent.certs()
            roots = [root["sha256"] for root in shown["bundle"]["roots"]]
            return shown["serial"] != first and roots == [new_sha]

        assert await within(REACH, renewed_under_the_new_root), agent.log[-5:]


@pytest.mark.parametrize("file_after", ["kept", "broken"])
async def test_a_renewal_does_not_bring_back_a_root_the_file_removed(
    tmp_path: Path, file_after: str
) -> None:
    """The CA's answer to a renewal still lists the root the file dropped: the new SVID
    goes into service with the roots both list, not for a second with the CA's alone;
    nor, once the file cannot be parsed (a bad ConfigMap edit), with the CA's roots: the
    agent keeps the roots in use."""
    roots = Roots(tmp_path)
    old_client = certs.client_context(roots.both, roots.old_svid(OLD_CLIENT))
    async with echo_server() as app_port:
        raw = agent_yaml(tmp_path, "backend", inbound=inbound(app_port))
        raw["ca"]["bundle_file"] = str(roots.agents_file)  # no CA listens: it never answers
        async with running_agent(raw, local_sign(roots.setup), tmp_path) as agent:
            address = agent.bound["inbound[0]"]
            roots.agents_file.write_bytes(roots.new_root)

            async def refused() -> bool:
                return await mtls_exchange(address, old_client, PAYLOAD) == b""

            assert await within(REACH / 2, refused)
            if file_after == "broken":
                roots.agents_file.write_bytes(b"not a bundle\n")
            agent.identity.install(await agent.identity.renew())
            assert agent.identity.svid is not None
            assert len(agent.identity.svid.bundle.roots) == 1
            assert await refused()


async def test_output_dir_follows_a_bundle_change(tmp_path: Path) -> None:
    """An app that reads `identity.output_dir` verifies its peers against bundle.pem there:
    a root the file dropped leaves it when it leaves the agent's own connections."""
    roots = Roots(tmp_path)
    out = tmp_path / "out"
    raw = agent_yaml(tmp_path, "backend")
    raw["identity"]["output_dir"] = str(out)
    raw["ca"]["bundle_file"] = str(roots.agents_file)  # no CA listens: it never answers
    async with running_agent(raw, local_sign(roots.setup), tmp_path):
        assert len(x509.load_pem_x509_certificates((out / "bundle.pem").read_bytes())) == 2
        roots.agents_file.write_bytes(roots.new_root)

        async def written() -> bool:
            return (out / "bundle.pem").read_bytes() == roots.new_root

        assert await within(REACH / 2, written), "bundle.pem still lists the removed root"


async def test_agents_following_the_bundle_leave_the_ca_room_for_renewals(tmp_path: Path) -> None:
    """Each agent asks the CA for its bundle every `bundle_refresh`. Were its connection kept
    between asks, as many agents as the CA's `limits.max_connections` would fill the CA
    for good, and (asked every second, never quiet long enough to be displaced) lock
    every other caller out of Sign: a new pod would never get its first SVID."""
    setup = make_ca_setup(tmp_path, limits={"max_connections": 2})
    with ca_process(setup.config) as ca:
        async with contextlib.AsyncExitStack() as agents:
            for name in ("a", "b"):
                raw = agent_yaml(tmp_path, name, ca_address=f"127.0.0.1:{ca.grpc_port}")
                raw["ca"]["bundle_refresh"] = "1s"
                await agents.enter_async_context(running_agent(raw, local_sign(setup), tmp_path))
            token = setup.issuer.token("demo", "new-pod")

            async def signed() -> bool:  # as a new pod's agent tries, again and again
                try:
                    async with ca_client(setup, ca) as client:
                        return bool((await client.sign(make_csr(), token=token)).cert_chain)
                except (OSError, StreamTerminatedError):
                    return False  # closed before the handshake: no room

            for _ in range(2):  # and again after a round of the agents' asks
                assert await within(3, signed), "no room at the CA for a new pod's Sign"
