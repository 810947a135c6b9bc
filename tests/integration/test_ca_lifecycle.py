"""The CA when its JWKS cannot be fetched, and its own serving certificate's renewal."""

from __future__ import annotations

import asyncio
import socket
import ssl
from pathlib import Path

import pytest
from cryptography import x509
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ca import config as ca_config
from ca.app import Bound, serve
from tests.support import SERVER_NAME, ca_client, ca_process, free_port, make_ca_setup, make_csr


async def test_unreachable_jwks_fails_closed(tmp_path: Path):
    """No JWKS, no identity: the CA refuses rather than trusting an unchecked token, and says
    UNAVAILABLE: the token was not judged, so the caller retries."""
    url = f"https://127.0.0.1:{free_port()}/openid/v1/jwks"
    setup = make_ca_setup(
        tmp_path, authn={"kubernetes": {"issuer": "https://k8s", "jwks_url": url}}
    )
    with ca_process(setup.config) as ca:
        async with ca_client(setup, ca) as client:
            for _ in range(2):  # the second call must not be served from a cache either
                with pytest.raises(GRPCError) as refused:
                    await client.sign(make_csr(), token=setup.issuer.token("shop", "web"))
                assert refused.value.status is Status.UNAVAILABLE
                assert (refused.value.message or "").startswith("jwks_unavailable")
    assert setup.issued_count() == 0


def _serving_serial(port: int, bundle_pem: bytes) -> int:
    context = ssl.create_default_context(cadata=bundle_pem.decode())
    with (
        socket.create_connection(("127.0.0.1", port)) as raw,
        context.wrap_socket(raw, server_hostname=SERVER_NAME) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


async def test_serving_certificate_is_renewed_before_it_expires(tmp_path: Path):
    setup = make_ca_setup(tmp_path, serving_cert={"names": [SERVER_NAME], "ttl": "3s"})
    config = ca_config.load(setup.config)
    stop = asyncio.Event()
    ready: asyncio.Future[Bound] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(config, stop, on_ready=ready))
    try:
        port = (await asyncio.wait_for(ready, 10)).grpc[1]
        first = await asyncio.to_thread(_serving_serial, port, setup.bundle_pem)
        # Renewal is due at half of 3 s plus the 60 s backdate, i.e. at once, with a
        # one-second floor between renewals so a clock jump cannot spin the loop.
        await asyncio.sleep(2.5)
        second = await asyncio.to_thread(_serving_serial, port, setup.bundle_pem)
        assert first != second
    finally:
        stop.set()
        await server
