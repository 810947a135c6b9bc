"""The agent's side of the CA protocol: Sign and GetBundle calls over TLS.

The caller authenticates with its projected ServiceAccount token or, once it
has one, its current SVID as the TLS client certificate. The answer is
checked by the identity manager (chain, SPIFFE ID, expiry), not here.
"""

from __future__ import annotations

import ssl
from types import TracebackType

from grpclib.client import Channel
from grpclib.config import Configuration

from identity.proto import ca_pb2
from identity.proto.ca_grpc import CertificateAuthorityStub
from identity.tlsfiles import load_cert_chain


def tls_context(
    bundle_pem: bytes, client_chain_pem: bytes | None = None, client_key_pem: bytes | None = None
) -> ssl.SSLContext:
    """Trust only the trust bundle; present the current SVID when renewing."""
    context = ssl.create_default_context(cadata=bundle_pem.decode())
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    if client_chain_pem is not None and client_key_pem is not None:
        load_cert_chain(context, client_chain_pem, client_key_pem)
    return context


class CaClient:
    """A channel to the CA; reuse it for many calls, close it when done."""

    def __init__(self, host: str, port: int, context: ssl.SSLContext, server_name: str) -> None:
        self._channel = Channel(
            host, port, ssl=context, config=Configuration(ssl_target_name_override=server_name)
        )
        self._stub = CertificateAuthorityStub(self._channel)

    async def sign(
        self, csr: bytes, *, token: str | None = None, ttl_seconds: int = 0, deadline: float = 10.0
    ) -> ca_pb2.SignResponse:
        metadata = {"authorization": f"Bearer {token}"} if token is not None else None
        request = ca_pb2.SignRequest(csr=csr, ttl_seconds=ttl_seconds)
        response: ca_pb2.SignResponse = await self._stub.Sign(
            request, metadata=metadata, timeout=deadline
        )
        return response

    async def get_bundle(self, *, deadline: float = 10.0) -> list[bytes]:
        """The CA's current trust bundle: DER roots."""
        response: ca_pb2.GetBundleResponse = await self._stub.GetBundle(
            ca_pb2.GetBundleRequest(), timeout=deadline
        )
        return list(response.trust_bundle)

    def close(self) -> None:
        self._channel.close()

    async def __aenter__(self) -> CaClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
