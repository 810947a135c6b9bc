"""Handshakes as an agent on OpenSSL 3.0 makes them: EC keys through OpenSSL's built-in
method (identity.openssl_engine; `serve` installs it, and tests/conftest.py for the agents
tests run in their own process).

What that method could change is tried against real peers: key shares on P-256 alone,
made and derived by it, with openssl's s_client and s_server, each way; a peer key whose
curve is spelt out, which the strict verifier must still refuse; and that every agent
process says at start which way it decodes EC keys, and takes the operator's switch.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest

from agent.app import Agent
from identity import openssl_engine
from tests import certs
from tests.certs import Credential
from tests.mesh import (
    agent_process,
    agent_yaml,
    echo_server,
    eventually,
    inbound,
    local_sign,
    mtls_exchange,
    outbound,
    round_trip,
    running_agent,
    served_agent_yaml,
    workload,
)
from tests.support import EC_ENGINE_APPLIES, CaProcess, CaSetup, free_port

FRONTEND, BACKEND = workload("frontend"), workload("backend")
LIMITS = {"drain_timeout": "500ms"}


pytestmark = pytest.mark.skipif(
    not EC_ENGINE_APPLIES, reason="OpenSSL 3.0 and the compiled build only"
)


def written(directory: Path, credential: Credential, bundle_pem: bytes) -> dict[str, Path]:
    """`credential` as openssl's commands take it: leaf, the rest of the chain, key, roots."""
    leaf_end = credential.chain_pem.index(b"-----END CERTIFICATE-----\n") + 26
    files = {
        "cert": credential.chain_pem[:leaf_end],
        "chain": credential.chain_pem[leaf_end:],
        "key": credential.key_pem,
        "roots": bundle_pem,
    }
    for name, data in files.items():
        (directory / f"{name}.pem").write_bytes(data)
    return {name: directory / f"{name}.pem" for name in files}


def handshakes(agent: Agent, direction: str) -> dict[str, float]:
    """outrider_tls_handshakes_total on `direction`, by result."""
    counted: dict[str, float] = {}
    for metric in agent.metrics.registry.collect():
        for s in metric.samples:
            if s.name == "outrider_tls_handshakes_total" and s.labels["direction"] == direction:
                counted[s.labels["result"]] = counted.get(s.labels["result"], 0) + s.value
    return counted


async def test_a_client_whose_only_key_share_is_p256_gets_through_to_the_app(
    setup: CaSetup, tmp_path: Path
) -> None:
    files = written(tmp_path, certs.valid_svid(setup, FRONTEND), setup.bundle_pem)
    async with echo_server() as app_port:
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port), limits=LIMITS)
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            host, port = agent.bound["inbound[0]"].rsplit(":", 1)
            client = await asyncio.create_subprocess_exec(
                "openssl", "s_client", "-connect", f"{host}:{port}", "-groups", "P-256",
                "-tls1_3", "-cert", files["cert"], "-cert_chain", files["chain"],
                "-key", files["key"], "-CAfile", files["roots"], "-verify_return_error",
                "-quiet", "-ign_eof",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )  # fmt: skip
            assert client.stdin is not None and client.stdout is not None
            client.stdin.write(b"over P-256\n")
            echoed = await asyncio.wait_for(client.stdout.readexactly(11), 10)
            client.kill()
            await client.wait()
            assert echoed == b"over P-256\n"
            assert handshakes(agent, "inbound") == {"ok": 1}


async def test_an_outbound_reaches_a_server_that_takes_only_p256(
    setup: CaSetup, tmp_path: Path
) -> None:
    """The agent offers X25519 first; the server asks again for P-256 (a retry request),
    and the agent makes that share too."""
    files = written(tmp_path, certs.valid_svid(setup, BACKEND), setup.bundle_pem)
    port = free_port()
    server = await asyncio.create_subprocess_exec(
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-groups", "P-256", "-tls1_3",
        "-cert", files["cert"], "-cert_chain", files["chain"], "-key", files["key"],
        "-CAfile", files["roots"], "-Verify", "1", "-verify_return_error", "-rev",
        "-naccept", "1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    try:
        assert server.stdout is not None
        while b"ACCEPT" not in (line := await asyncio.wait_for(server.stdout.readline(), 10)):
            assert line, "openssl s_server ended before it listened"
        upstream = outbound(f"127.0.0.1:{port}", BACKEND)
        raw = agent_yaml(setup.root, "frontend", outbound=upstream, limits=LIMITS)
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            answer = await round_trip(agent.bound["outbound[backend]"], b"p256\n")
            assert answer == b"652p\n"  # s_server -rev: each line back, reversed
            assert handshakes(agent, "outbound") == {"ok": 1}
    finally:
        with contextlib.suppress(ProcessLookupError):  # -naccept 1: it ends after the one
            server.kill()
        await server.wait()


async def test_a_peer_key_with_its_curve_spelt_out_is_refused_either_way(
    setup: CaSetup,
) -> None:
    """RFC 5480 allows only a named curve; the strict verifier checks it on the key the
    built-in method decoded, as on a provider's."""
    accepted: list[int] = []
    async with echo_server(accepted) as app_port:
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port), limits=LIMITS)
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            spelt_out = certs.explicit_curve_svid(setup, FRONTEND)
            context = certs.client_context(setup.bundle_pem, spelt_out)
            assert await mtls_exchange(agent.bound["inbound[0]"], context) == b""
            assert await eventually(lambda: "refused" in handshakes(agent, "inbound"))
            assert accepted == []
    impostor = certs.server_context(setup.bundle_pem, certs.explicit_curve_svid(setup, BACKEND))
    received: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received.append(await reader.read(100))
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0, ssl=impostor)
    try:
        port = server.sockets[0].getsockname()[1]
        upstream = outbound(f"127.0.0.1:{port}", BACKEND)
        raw = agent_yaml(setup.root, "frontend", outbound=upstream, limits=LIMITS)
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            assert await round_trip(agent.bound["outbound[backend]"], b"secret", 2) == b""
            assert await eventually(lambda: "refused" in handshakes(agent, "outbound"))
            assert handshakes(agent, "outbound").get("ok", 0) == 0
    finally:
        server.close()
    assert b"".join(received) == b"", "the impostor received the app's bytes"


@pytest.mark.parametrize(
    ("environ", "said"),
    [({}, "built-in method"), ({openssl_engine.SWITCH: "off"}, f"{openssl_engine.SWITCH}=off")],
)
def test_an_agent_process_says_how_it_decodes_ec_keys_and_takes_the_switch(
    setup: CaSetup, ca: CaProcess, environ: dict[str, str], said: str
) -> None:
    name = "switched" if environ else "default"
    with agent_process(setup.root, name, served_agent_yaml(setup, ca, name), env=environ) as agent:
        lines = [line for line in agent.log if "EC key" in line]
        assert len(lines) == 1 and said in lines[0], agent.log


def test_every_worker_has_it_as_the_main_does(setup: CaSetup, ca: CaProcess) -> None:
    raw = served_agent_yaml(setup, ca, "workers", workers=2)
    with agent_process(setup.root, "workers", raw) as agent:
        for worker in ("[worker 0]", "[worker 1]"):
            assert agent.logged(f"{worker}: EC keys through OpenSSL 3.0's built-in method")
