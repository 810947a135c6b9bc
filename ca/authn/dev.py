"""Dev mode: a CA that issues without Kubernetes, to workloads on this machine. Unsafe elsewhere.

`outrider ca serve --dev` trusts one token issuer instead of a cluster's: a dev issuer whose
ES256 key lives in the CA directory (``dev-issuer.key``, mode 0600), made on
first use. `outrider ca dev-token` signs tokens with it, shaped exactly like
projected ServiceAccount tokens, and an agent reads one from its
``identity.token_file`` as it would in a pod. The CA checks them with the
verifier it uses in a cluster (`TokenVerifier`), against the dev issuer's
public key only.

Why this design, and not a shared secret or an SVID-only bootstrap:
- The CA decides an identity from the credential alone (ca.proto): a dev
  credential must name the workload and be signed, which is what a projected
  token is. A shared secret would have to let the caller choose its identity.
- Reading the dev key grants nothing new: whoever can read the CA directory
  already holds the intermediate key, which signs any SVID of the trust domain.
- One code path: the agent needs no dev mode, and the CA's verifier is the
  one a cluster uses. A dev token names its own issuer and audience, so no
  cluster CA accepts one, and a dev CA accepts no cluster's tokens.

A dev CA still must not run in a cluster: a pod that can read the CA's
volume, or a CA exposed by mistake, would issue without the cluster's say.
So `refusal` refuses when the process looks like it runs in a pod, and the
config allows only loopback listen addresses with --dev (ca/config.py).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from jwt.algorithms import ECAlgorithm

from ca.authn.jwks import Clock, StaticJwks
from ca.authn.kubernetes import KubernetesCaller, TokenPolicy, TokenVerifier
from ca.signers.local import CaDirectoryError, LocalSigner
from identity import SpiffeId
from identity.files import PRIVATE, write_atomic

#: No cluster has this issuer (".invalid" is reserved), so no cluster token passes for a dev one.
DEV_ISSUER = "https://dev.outrider.invalid"
DEV_AUDIENCE = "outrider-ca-dev"
KEY_FILE = "dev-issuer.key"
DEFAULT_TOKEN_LIFETIME = timedelta(days=7)

#: Where the kubelet mounts a pod's ServiceAccount token.
SA_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")

WARNING = (
    "DEV MODE: this CA issues an SVID to anyone holding a token signed by %s, made by "
    "`outrider ca dev-token` without any Kubernetes check. For a laptop only: never run "
    "--dev in a cluster or where others can reach it"
)


class DevModeError(Exception):
    """Dev mode cannot run here, or its key cannot be read; the message says what to do."""


def refusal(environ: Mapping[str, str], sa_token: Path = SA_TOKEN) -> str | None:
    """Why dev mode must not run in this process, or None.

    Either sign means a pod: the kubelet sets KUBERNETES_SERVICE_HOST in every
    container and mounts the ServiceAccount token unless the pod opts out.
    """
    signs = []
    if environ.get("KUBERNETES_SERVICE_HOST"):
        signs.append("KUBERNETES_SERVICE_HOST is set")
    if sa_token.exists():
        signs.append(f"a ServiceAccount token is mounted at {sa_token}")
    if not signs:
        return None
    return (
        f"refusing --dev: this looks like a Kubernetes pod ({'; '.join(signs)}). Dev mode "
        "issues without asking the cluster; in a cluster, run `outrider ca serve` without "
        "--dev and with authn.kubernetes in ca.yaml (docs/install.md)"
    )


def _uid(*parts: str) -> str:
    # Stable per name, like a real object that keeps its UID.
    return str(uuid.uuid5(uuid.NAMESPACE_URL, "/".join(parts)))


def projected_claims(
    issuer: str,
    namespace: str,
    service_account: str,
    *,
    audience: str | list[str],
    lifetime: timedelta,
    now: datetime,
    pod_name: str | None,
) -> dict[str, Any]:
    """The claims of a projected ServiceAccount token, as the API server writes them."""
    issued = int(now.timestamp())
    k8s: dict[str, Any] = {
        "namespace": namespace,
        "serviceaccount": {"name": service_account, "uid": _uid(namespace, "sa", service_account)},
    }
    if pod_name is not None:
        k8s["pod"] = {"name": pod_name, "uid": _uid(namespace, "pod", pod_name)}
    return {
        "aud": [audience] if isinstance(audience, str) else list(audience),
        "exp": issued + int(lifetime.total_seconds()),
        "iat": issued,
        "nbf": issued,
        "iss": issuer,
        "sub": f"system:serviceaccount:{namespace}:{service_account}",
        "kubernetes.io": k8s,
    }


def es256_jwks(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    """The JWKS that verifies tokens `key` signs, as the API server serves /openid/v1/jwks."""
    jwk = ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {"keys": [{**jwk, "kid": kid, "use": "sig", "alg": "ES256"}]}


def workload_names(spiffe_id: SpiffeId) -> tuple[str, str]:
    """(namespace, service account) of ``spiffe://<td>/ns/<ns>/sa/<sa>``; ValueError if not that."""
    segments = spiffe_id.segments
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise ValueError(
            f"{spiffe_id} is not spiffe://<trust domain>/ns/<namespace>/sa/<service account>,"
            " the only shape the CA issues"
        )
    namespace, account = segments[1], segments[3]
    # The names the CA will accept, checked now rather than refused at the CA later.
    KubernetesCaller(namespace, account, None, None, f"system:serviceaccount:{namespace}:{account}")
    return namespace, account


class DevIssuer:
    """The dev token issuer of one CA directory: its key, its JWKS, its tokens."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    def __repr__(self) -> str:
        return "DevIssuer(key=...)"

    @classmethod
    def open(cls, ca_dir: Path) -> DevIssuer:
        """The issuer whose key is in `ca_dir`, made there (0600) on first use."""
        path = ca_dir / KEY_FILE
        try:
            pem = path.read_bytes()
        except FileNotFoundError:
            if not ca_dir.is_dir():
                raise DevModeError(
                    f"{ca_dir} is not a CA directory: make one with `outrider ca init`"
                ) from None
            key = ec.generate_private_key(ec.SECP256R1())
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            write_atomic(path, pem, PRIVATE)
        except OSError as exc:
            raise DevModeError(f"cannot read the dev issuer's key {path}: {exc}") from None
        try:
            loaded = serialization.load_pem_private_key(pem, password=None)
        except ValueError as exc:
            raise DevModeError(
                f"{path} is not a PEM private key ({exc}); remove it to make a new one"
            ) from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey):
            raise DevModeError(f"{path} is not an EC key; remove it to make a new one")
        return cls(loaded)

    def jwks(self) -> dict[str, Any]:
        return es256_jwks(self._key, "dev")

    def verifier(self, clock: Clock) -> TokenVerifier:
        """What `ca serve --dev` checks tokens with: the cluster's verifier, this key only."""
        return TokenVerifier(TokenPolicy(DEV_ISSUER, DEV_AUDIENCE), StaticJwks(self.jwks()), clock)

    def token(
        self,
        spiffe_id: SpiffeId,
        *,
        now: datetime | None = None,
        lifetime: timedelta = DEFAULT_TOKEN_LIFETIME,
    ) -> str:
        """A token the dev CA takes as `spiffe_id` (ns/<ns>/sa/<sa>) until `lifetime` ends."""
        namespace, account = workload_names(spiffe_id)
        claims = projected_claims(
            DEV_ISSUER,
            namespace,
            account,
            audience=DEV_AUDIENCE,
            lifetime=lifetime,
            now=now or datetime.now(UTC),
            pod_name=None,
        )
        return jwt.encode(claims, self._key, algorithm="ES256", headers={"kid": "dev"})


def mint_token(ca_dir: Path, spiffe_id: SpiffeId, lifetime: timedelta) -> tuple[str, datetime]:
    """`outrider ca dev-token`: a token for `spiffe_id`, which must be one the CA in
    `ca_dir` issues, and when it expires; ValueError or DevModeError saying why not."""
    workload_names(spiffe_id)
    try:
        trust_domain = LocalSigner.load(ca_dir).trust_domain
    except CaDirectoryError as exc:
        raise DevModeError(str(exc)) from None
    if not spiffe_id.member_of(trust_domain):
        raise ValueError(f"{spiffe_id} is not in trust domain {trust_domain}")
    now = datetime.now(UTC)
    return DevIssuer.open(ca_dir).token(spiffe_id, now=now, lifetime=lifetime), now + lifetime
