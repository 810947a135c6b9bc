"""The issuance service shared by `ca serve` and `ca mint`.

Plan the leaf from the authenticated identity, have the signer sign it, and
check what was signed before anyone sees it (SPIRE's credtemplate -> ca ->
credvalidator).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ca.core.issuance import (
    IssuancePolicy,
    IssuedSvid,
    IssuerExpired,
    check_issued,
    plan_leaf,
    validity,
)
from ca.signers.base import Signer, SignerUnavailable
from identity import SpiffeId

Clock = Callable[[], datetime]


class Issuer:
    def __init__(self, signer: Signer, policy: IssuancePolicy, clock: Clock) -> None:
        self.signer = signer
        self.policy = policy
        self._clock = clock

    async def issue(
        self,
        spiffe_id: SpiffeId,
        public_key: CertificatePublicKeyTypes,
        requested_ttl: timedelta | None = None,
        *,
        csr: x509.CertificateSigningRequest | None = None,
    ) -> IssuedSvid:
        now = self._clock()
        try:
            request = plan_leaf(
                spiffe_id,
                public_key,
                requested_ttl,
                self.policy,
                self.signer.issuer.not_valid_after_utc,
                now,
                x509.random_serial_number(),
            )
        except IssuerExpired as exc:
            raise _retriable(exc) from None
        if csr is not None:
            request = dataclasses.replace(request, csr=csr)
        chain = await self.signer.sign_leaf(request)
        check_issued(request, chain, self.signer.bundle, now)
        return IssuedSvid(spiffe_id, chain, self.signer.bundle)

    async def issue_serving(
        self, names: tuple[str, ...], ttl: timedelta
    ) -> tuple[tuple[x509.Certificate, ...], ec.EllipticCurvePrivateKey]:
        """The CA's own TLS certificate and its new key, under the same limits as an SVID."""
        key = ec.generate_private_key(ec.SECP256R1())
        issuer_not_after = self.signer.issuer.not_valid_after_utc
        try:
            not_before, not_after = validity(
                self._clock(), ttl, issuer_not_after, self.policy.backdate
            )
        except IssuerExpired as exc:
            raise _retriable(exc) from None
        serial = x509.random_serial_number()
        chain = await self.signer.sign_serving(names, key, not_before, not_after, serial)
        return chain, key


def _retriable(exc: IssuerExpired) -> SignerUnavailable:
    # A Vault intermediate that could not be renewed in time: the caller may retry.
    return SignerUnavailable("intermediate_expired", str(exc))
