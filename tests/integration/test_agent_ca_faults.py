"""The identity manager against a CA endpoint that misbehaves, on real loopback sockets."""

from __future__ import annotations

import asyncio
import random
import ssl
from pathlib import Path

import pytest

from agent import config as agent_config
from agent.adapters.metrics import AgentMetrics
from agent.adapters.rotator import IdentityManager, RenewalFailed
from agent.adapters.tls import Contexts
from agent.app import utcnow
from identity.tlsfiles import load_cert_chain
from tests.certs import Shape, SigningCa, foreign_ca, issue
from tests.mesh import agent_yaml
from tests.support import CaSetup, loopback_tls


def manager(
    setup: CaSetup, port: int, bundle_file: Path, server_name: str = "127.0.0.1"
) -> IdentityManager:
    raw = agent_yaml(setup.root, "web", ca_address=f"127.0.0.1:{port}")
    raw["ca"].update(
        {
            "server_name": server_name,
            "bundle_file": str(bundle_file),
            "timeout": "300ms",
            "backoff": {"initial": "100ms", "max": "200ms"},
        }
    )
    config = agent_config.parse(raw, base=setup.root)
    return IdentityManager(config, Contexts(), AgentMetrics(), now=utcnow, rng=random.Random(7))


async def test_a_ca_that_accepts_tcp_and_says_nothing(setup: CaSetup, tmp_path: Path) -> None:
    tls = loopback_tls(tmp_path, "fake-ca")
    held = []

    async def hold(r, w):
        held.append(w)
        await asyncio.sleep(30)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    m = manager(setup, port, tls.ca_file)
    try:
        with pytest.raises(RenewalFailed):
            await asyncio.wait_for(m.renew(), 5)
    finally:
        server.close()


async def test_a_ca_that_drops_the_connection_mid_request(setup: CaSetup, tmp_path: Path) -> None:
    tls = loopback_tls(tmp_path, "fake-ca")
    tls.server_context.set_alpn_protocols(["h2"])

    async def drop(r, w):
        await r.read(100)  # the h2 preface and the request start
        w.transport.abort()

    server = await asyncio.start_server(drop, "127.0.0.1", 0, ssl=tls.server_context)
    port = server.sockets[0].getsockname()[1]
    m = manager(setup, port, tls.ca_file)
    try:
        with pytest.raises(RenewalFailed):
            await asyncio.wait_for(m.renew(), 5)
    finally:
        server.close()


@pytest.mark.parametrize("content", [b"", b"\x30\x82\x01\x00\xff\xfe binary DER"])
async def test_a_bundle_file_that_is_not_pem(
    setup: CaSetup, tmp_path: Path, content: bytes
) -> None:
    bundle = tmp_path / "bundle.der"
    bundle.write_bytes(content)
    m = manager(setup, 1, bundle)
    with pytest.raises(RenewalFailed):
        await asyncio.wait_for(m.renew(), 5)


async def test_run_survives_a_dropped_connection(setup: CaSetup, tmp_path: Path) -> None:
    """run() must keep retrying: the task must not die."""
    tls = loopback_tls(tmp_path, "fake-ca")
    tls.server_context.set_alpn_protocols(["h2"])

    async def drop(r, w):
        await r.read(100)
        w.transport.abort()

    server = await asyncio.start_server(drop, "127.0.0.1", 0, ssl=tls.server_context)
    port = server.sockets[0].getsockname()[1]
    m = manager(setup, port, tls.ca_file)
    task = asyncio.create_task(m.run())
    await asyncio.sleep(1.5)
    try:
        assert not task.done(), f"identity loop died: {task.exception()!r}"
    finally:
        task.cancel()
        server.close()


async def refused_renewal(setup: CaSetup, server_name: str, trusted: Path) -> str:
    """The renewal's failure against a TLS server on 127.0.0.1 that presents a serving
    certificate of the CA's (for outrider-ca.test only), the agent checking `server_name`
    and trusting the roots in `trusted`."""
    serving = issue(SigningCa.load(setup.ca_dir), Shape(dns=("outrider-ca.test",)))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    load_cert_chain(context, serving.chain_pem, serving.key_pem)
    context.set_alpn_protocols(["h2"])
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    m = manager(setup, port, trusted, server_name)
    try:
        with pytest.raises(RenewalFailed) as failed:
            await asyncio.wait_for(m.renew(), 5)
    finally:
        server.close()
    return str(failed.value)


async def test_dialling_the_ca_by_ip_says_to_set_ca_server_name(setup: CaSetup) -> None:
    # ca.address an IP (a Service's ClusterIP), ca.server_name not set.
    message = await refused_renewal(setup, "127.0.0.1", setup.ca_dir / "bundle.pem")
    assert "IP address mismatch" in message
    assert "not valid for '127.0.0.1'" in message
    assert "set ca.server_name to a name in the CA's serving certificate" in message


async def test_dialling_the_cas_http_port_says_to_use_its_grpc_port(setup: CaSetup) -> None:
    """A plain HTTP server where TLS was expected: OpenSSL says only 'wrong version number'."""

    async def answer_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        writer.close()

    server = await asyncio.start_server(answer_http, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    m = manager(setup, port, setup.ca_dir / "bundle.pem", "outrider-ca.test")
    try:
        with pytest.raises(RenewalFailed) as failed:
            await asyncio.wait_for(m.renew(), 5)
    finally:
        server.close()
    assert "does not speak TLS" in str(failed.value)
    assert "Sign is served on its gRPC port" in str(failed.value)


async def test_a_bundle_file_of_another_ca_is_named(setup: CaSetup, tmp_path: Path) -> None:
    foreign_ca(tmp_path)
    wrong = tmp_path / "bundle.pem"
    message = await refused_renewal(setup, "outrider-ca.test", wrong)
    assert "unable to get local issuer certificate" in message
    assert f"does not chain to a root in ca.bundle_file {wrong}" in message
    assert "point ca.bundle_file at this CA's trust bundle" in message
