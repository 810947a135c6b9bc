"""The signer interface: what the CA needs from a local key or from Vault."""

from __future__ import annotations

from datetime import datetime
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from ca.core.template import LeafRequest
from identity import TrustBundle, TrustDomain


class SignerUnavailable(Exception):
    """The signer cannot sign now (Vault sealed or unreachable); callers may retry.

    `reason` is a bounded label: vault_sealed, vault_unreachable, vault_refused,
    intermediate_expired.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class Signer(Protocol):
    @property
    def trust_domain(self) -> TrustDomain: ...

    @property
    def bundle(self) -> TrustBundle: ...

    @property
    def issuer(self) -> x509.Certificate:
        """The certificate that signs leaves; no leaf may outlive it."""
        ...

    async def run(self) -> None:
        """Background work for the life of the CA (Vault: keep the token and the
        intermediate fresh); returns at once when there is none."""
        ...

    async def sign_leaf(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        """Sign an X.509-SVID; returns the chain, leaf first, without the root."""
        ...

    async def sign_serving(
        self,
        names: tuple[str, ...],
        key: EllipticCurvePrivateKey,
        not_before: datetime,
        not_after: datetime,
        serial: int,
    ) -> tuple[x509.Certificate, ...]:
        """Sign the CA's own TLS server certificate (Vault needs a CSR, hence the key)."""
        ...
