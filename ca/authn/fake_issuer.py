"""A fake Kubernetes API server, as far as ServiceAccount tokens go.

It mints tokens with the exact claim shape of a projected token and
publishes the matching JWKS, so tests exercise the real verifier without a
cluster, with any claim a test wants to forge. Its key lives only in memory.

Test code only: no production path may import this module. The supported way
to issue without a cluster is dev mode (ca/authn/dev.py), which shares the
claim shape (`projected_claims`) and the JWKS (`es256_jwks`).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from ca.authn.dev import es256_jwks, projected_claims

DEFAULT_ISSUER = "https://kubernetes.default.svc.cluster.local"


class FakeTokenIssuer:
    """Signs ES256 tokens for any namespace and service account it is asked."""

    def __init__(self, issuer: str = DEFAULT_ISSUER, kid: str = "fake-1") -> None:
        self.issuer = issuer
        self.kid = kid
        self._key = ec.generate_private_key(ec.SECP256R1())

    def __repr__(self) -> str:
        return f"FakeTokenIssuer(issuer={self.issuer!r}, kid={self.kid!r})"

    def jwks(self) -> dict[str, Any]:
        """The public JWKS, as the API server serves it at /openid/v1/jwks."""
        return es256_jwks(self._key, self.kid)

    def claims(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str | list[str] = "outrider-ca",
        lifetime: timedelta = timedelta(minutes=10),
        now: datetime | None = None,
        pod_name: str | None = "pod-0",
        **claim_overrides: Any,
    ) -> dict[str, Any]:
        """The claims of a projected token. An override of ``None`` removes
        the claim; nested ``kubernetes.io`` values are replaced whole."""
        claims = projected_claims(
            self.issuer,
            namespace,
            service_account,
            audience=audience,
            lifetime=lifetime,
            now=now or datetime.now(UTC),
            pod_name=pod_name,
        )
        claims.update(claim_overrides)
        return {name: value for name, value in claims.items() if value is not None}

    def token(
        self,
        namespace: str,
        service_account: str,
        *,
        audience: str | list[str] = "outrider-ca",
        lifetime: timedelta = timedelta(minutes=10),
        now: datetime | None = None,
        pod_name: str | None = "pod-0",
        extra_header: dict[str, Any] | None = None,
        **claim_overrides: Any,
    ) -> str:
        """A signed token. ``extra_header`` adds JOSE header fields (``None``
        removes one, e.g. ``kid``). It cannot change ``alg``: PyJWT would sign
        with that algorithm, so forged algorithms are built by hand in tests."""
        claims = self.claims(
            namespace,
            service_account,
            audience=audience,
            lifetime=lifetime,
            now=now,
            pod_name=pod_name,
            **claim_overrides,
        )
        merged = {"kid": self.kid, **(extra_header or {})}
        headers = {name: value for name, value in merged.items() if value is not None}
        return jwt.encode(claims, self._key, algorithm="ES256", headers=headers)
