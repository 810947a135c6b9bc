"""Who is asking: a ServiceAccount token or a current SVID, turned into an identity.

The identity is decided here and only here, from a verified credential. A
bearer token wins over a client certificate when a caller sends both, so a
workload that lost its SVID can always start over with its token.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

from ca.authn.kubernetes import AuthnError, KubernetesCaller
from identity import InvalidSpiffeId, SpiffeId, SvidError, TrustDomain, check_leaf
from identity.cert import Cert


class TokenAuthenticator(Protocol):
    """Offline JWT verification (TokenVerifier) or the API server's TokenReview."""

    async def verify(self, token: str) -> KubernetesCaller: ...


@dataclass(frozen=True)
class Caller:
    spiffe_id: SpiffeId
    subject: str  # token subject, or the SPIFFE ID of a renewing SVID
    pod: str | None
    credential: str  # "token" or "svid"


class Authenticator:
    def __init__(
        self,
        trust_domain: TrustDomain,
        tokens: TokenAuthenticator,
        clock: Callable[[], datetime],
    ) -> None:
        self.trust_domain = trust_domain
        self._tokens = tokens
        self._clock = clock

    async def authenticate(self, authorization: str | None, peer_cert: bytes | None) -> Caller:
        """`authorization` is the metadata value; `peer_cert` the DER the TLS layer verified."""
        if authorization is not None:
            return await self._from_token(authorization)
        if peer_cert is not None:
            return self._from_svid(peer_cert)
        raise AuthnError("no_credential", "send a bearer token or present your current SVID")

    async def _from_token(self, authorization: str) -> Caller:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthnError("malformed", "authorization metadata must be 'Bearer <token>'")
        k8s = await self._tokens.verify(token.strip())
        try:
            spiffe_id = SpiffeId.for_workload(self.trust_domain, k8s.namespace, k8s.service_account)
        except InvalidSpiffeId as exc:
            raise AuthnError("invalid_claims", f"token names an invalid identity: {exc}") from None
        return Caller(spiffe_id, k8s.subject, k8s.pod_name, "token")

    def _from_svid(self, der: bytes) -> Caller:
        """Renewal: the TLS layer verified the chain against the bundle; check the SVID."""
        try:
            spiffe_id = check_leaf(Cert.from_der(der), usage="client", now=self._clock())
        except (SvidError, ValueError) as exc:
            raise AuthnError("bad_svid", f"client certificate is not a valid SVID: {exc}") from None
        if not spiffe_id.member_of(self.trust_domain):
            raise AuthnError("bad_svid", f"{spiffe_id} is not in trust domain {self.trust_domain}")
        return Caller(spiffe_id, str(spiffe_id), None, "svid")
