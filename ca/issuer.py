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
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from ca.core.issuance import IssuancePolicy, IssuedSvid, check_issued, plan_leaf
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
        if now >= self.signer.issuer.not_valid_after_utc:
            # A Vault intermediate that could not be renewed in time: retriable.
            raise SignerUnavailable("intermediate_expired", "the issuing certificate has expired")
        request = plan_leaf(
            spiffe_id,
            public_key,
            requested_ttl,
            self.policy,
            self.signer.issuer.not_valid_after_utc,
            now,
            x509.random_serial_number(),
        )
        if csr is not None:
            request = dataclasses.replace(request, csr=csr)
        chain = await self.signer.sign_leaf(request)
        check_issued(request, chain, self.signer.bundle, now)
        return IssuedSvid(spiffe_id, chain, self.signer.bundle)
