"""Authenticate an agent by its projected Kubernetes ServiceAccount token.

The token is a JWS the API server signed. The CA checks it offline: the
signature against the issuer's JWKS (with PyJWT, never by hand), then the
issuer, audience and validity window (against the injected clock), then the
``kubernetes.io`` claims that become the caller's SPIFFE ID. The names are
validated here, before anything builds an ID from them, so that no token
can smuggle a ``/``, ``..`` or ``%`` into a path.

Offline checks cannot tell that the pod the token was bound to has since
been deleted; the pod name and UID are kept so a later check (or the audit
log) can.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.exceptions import InvalidJTIError, InvalidSubjectError
from jwt.types import Options

# AuthnError and Clock are re-exported: callers import the whole API from here.
from ca.authn.errors import AuthnError as AuthnError
from ca.authn.errors import TokenReason
from ca.authn.jwks import Clock as Clock
from ca.authn.jwks import JwksSource
from identity.printable import quoted

# Real tokens are about 1 KB; the cap bounds the work an unauthenticated caller can cause.
MAX_TOKEN_CHARS = 16 * 1024

# Asymmetric algorithms only: HS* would treat a published public key as a shared secret.
SUPPORTED_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
_MAX_LEEWAY = timedelta(minutes=5)

_LABEL = r"[a-z0-9](?:[-a-z0-9]*[a-z0-9])?"
_DNS_LABEL = re.compile(_LABEL)
_DNS_SUBDOMAIN = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_UID = re.compile(r"[A-Za-z0-9-]{1,64}")

_PUBLIC_KEY_TYPES = (
    rsa.RSAPublicKey,
    ec.EllipticCurvePublicKey,
    ed25519.Ed25519PublicKey,
    ed448.Ed448PublicKey,
)

# PyJWT checks signature, issuer and audience; time is checked against our clock.
_DECODE_OPTIONS: Options = {
    "verify_signature": True,
    "verify_aud": True,
    "verify_iss": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "require": ["iss", "aud", "exp", "sub"],
    "enforce_minimum_key_length": True,
}

# Checked in order: InvalidSignatureError is a DecodeError, so it must come first.
_REFUSALS: tuple[tuple[type[jwt.PyJWTError], TokenReason, str], ...] = (
    (jwt.InvalidSignatureError, "bad_signature", "signature does not verify"),
    (jwt.InvalidAudienceError, "wrong_audience", "token is for another audience"),
    (jwt.InvalidIssuerError, "unknown_issuer", "token is from an unknown issuer"),
    (jwt.ExpiredSignatureError, "expired", "token has expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid", "token is not yet valid"),
    (jwt.MissingRequiredClaimError, "invalid_claims", "token lacks a required claim"),
    (InvalidSubjectError, "invalid_claims", "token subject is not a string"),
    (InvalidJTIError, "invalid_claims", "token ID is not a string"),
    (jwt.InvalidIssuedAtError, "invalid_claims", "token iat is not a NumericDate"),
    (jwt.InvalidAlgorithmError, "unsupported_alg", "algorithm does not fit the key"),
    (jwt.InvalidKeyError, "unknown_key", "signing key is unusable (too short?)"),
    (jwt.DecodeError, "malformed", "token is not a well-formed JWS"),
)


def _is_dns_label(value: str) -> bool:
    return len(value) <= 63 and _DNS_LABEL.fullmatch(value) is not None


def _is_dns_subdomain(value: str) -> bool:
    # Kubernetes' own rule for ServiceAccount and pod names; it bounds the
    # whole name, not each label.
    return len(value) <= 253 and _DNS_SUBDOMAIN.fullmatch(value) is not None


@dataclass(frozen=True)
class KubernetesCaller:
    """An authenticated workload. Construction validates every field, so
    holding one means the namespace and account are safe to put in an ID."""

    namespace: str
    service_account: str
    pod_name: str | None
    pod_uid: str | None
    subject: str

    def __post_init__(self) -> None:
        if not _is_dns_label(self.namespace):
            raise ValueError(f"namespace {quoted(self.namespace)} is not a DNS-1123 label")
        account = self.service_account
        if not _is_dns_subdomain(account):
            raise ValueError(f"service account {quoted(account)} is not a DNS-1123 subdomain")
        expected = f"system:serviceaccount:{self.namespace}:{self.service_account}"
        if self.subject != expected:
            raise ValueError(f"sub {quoted(self.subject)} is not {expected!r}")
        if self.pod_name is not None and not _is_dns_subdomain(self.pod_name):
            raise ValueError(f"pod name {quoted(self.pod_name)} is not a DNS-1123 subdomain")
        if self.pod_uid is not None and _UID.fullmatch(self.pod_uid) is None:
            raise ValueError(f"pod uid {quoted(self.pod_uid)} is not a UID")


@dataclass(frozen=True)
class TokenPolicy:
    """What a token must say to be accepted: who issued it, for whom, how."""

    issuer: str
    audience: str = "outrider-ca"
    leeway: timedelta = timedelta(seconds=30)
    algorithms: tuple[str, ...] = ("RS256", "ES256", "ES384", "PS256")

    def __post_init__(self) -> None:
        if not self.issuer or not self.audience:
            raise ValueError("token policy needs an issuer and an audience")
        if not timedelta(0) <= self.leeway <= _MAX_LEEWAY:
            raise ValueError(f"token leeway must be between 0 and {_MAX_LEEWAY}")
        unsafe = [alg for alg in self.algorithms if alg not in SUPPORTED_ALGORITHMS]
        if unsafe or not self.algorithms:
            raise ValueError(f"token algorithms must be asymmetric JWS algorithms: {unsafe}")


def _claim_str(claims: Mapping[str, Any], name: str, where: str) -> str:
    value = claims.get(name)
    if not isinstance(value, str):
        raise AuthnError("invalid_claims", f"token lacks a string {where}{name}")
    return value


def _claim_map(claims: Mapping[str, Any], name: str, where: str) -> Mapping[str, Any]:
    value = claims.get(name)
    if not isinstance(value, Mapping):
        raise AuthnError("invalid_claims", f"token lacks the {where}{name} claim")
    return value


def caller_from_claims(claims: Mapping[str, Any]) -> KubernetesCaller:
    """Turn verified claims into a caller, refusing any unsafe name."""
    k8s = _claim_map(claims, "kubernetes.io", "")
    account = _claim_map(k8s, "serviceaccount", "kubernetes.io.")
    pod = k8s.get("pod")
    if pod is not None and not isinstance(pod, Mapping):
        raise AuthnError("invalid_claims", "token's kubernetes.io.pod is not an object")
    pod = pod or {}
    pod_name, pod_uid = pod.get("name"), pod.get("uid")
    if not isinstance(pod_name, str | None) or not isinstance(pod_uid, str | None):
        raise AuthnError("invalid_claims", "token's pod name or uid is not a string")
    try:
        return KubernetesCaller(
            namespace=_claim_str(k8s, "namespace", "kubernetes.io."),
            service_account=_claim_str(account, "name", "kubernetes.io.serviceaccount."),
            pod_name=pod_name,
            pod_uid=pod_uid,
            subject=_claim_str(claims, "sub", ""),
        )
    except ValueError as exc:
        raise AuthnError("invalid_claims", str(exc)) from exc


def _numeric_date(claims: Mapping[str, Any], name: str) -> datetime | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthnError("invalid_claims", f"token {name} is not a NumericDate")
    try:
        return datetime.fromtimestamp(value, UTC)
    except (OverflowError, ValueError, OSError) as exc:
        raise AuthnError("invalid_claims", f"token {name} is out of range") from exc


def check_validity_window(claims: Mapping[str, Any], now: datetime, leeway: timedelta) -> None:
    """Refuse a token outside [nbf - leeway, exp + leeway). ``exp`` is required:
    a token that never expires is a credential that can never be revoked."""
    expires = _numeric_date(claims, "exp")
    if expires is None:
        raise AuthnError("invalid_claims", "token has no exp")
    if now >= expires + leeway:
        raise AuthnError("expired", f"token expired at {expires.isoformat()}")
    not_before = _numeric_date(claims, "nbf")
    if not_before is not None and now < not_before - leeway:
        raise AuthnError("not_yet_valid", f"token is valid from {not_before.isoformat()}")


def _read_header(token: str) -> Mapping[str, Any]:
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise AuthnError("malformed", "token is empty or too long")
    try:
        return jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise AuthnError("malformed", "token is not a compact JWS") from exc


def _refusal(exc: jwt.PyJWTError) -> AuthnError:
    """Map a PyJWT error to a bounded reason. PyJWT's own text can echo
    attacker-chosen header values, so only our fixed messages go out."""
    for kind, reason, message in _REFUSALS:
        if isinstance(exc, kind):
            if isinstance(exc, jwt.MissingRequiredClaimError):
                message = f"token lacks the {exc.claim!r} claim"
            return AuthnError(reason, message)
    return AuthnError("malformed", f"token refused by the JWS parser ({type(exc).__name__})")


def _matching_keys(keys: jwt.PyJWKSet, kid: str | None, alg: str) -> list[jwt.PyJWK]:
    """Keys that may verify this token: same kid (any, if the token has none),
    bound to the token's algorithm, and public. PyJWT binds a key to the
    JWK's ``alg``, or infers it from the key type and curve when absent."""
    return [
        key
        for key in keys
        if (kid is None or key.key_id == kid)
        and key.algorithm_name == alg
        and isinstance(key.key, _PUBLIC_KEY_TYPES)
    ]


class TokenVerifier:
    """Verifies ServiceAccount tokens against one issuer's key set."""

    def __init__(self, policy: TokenPolicy, jwks: JwksSource, clock: Clock) -> None:
        self._policy = policy
        self._jwks = jwks
        self._clock = clock

    async def verify(self, token: str) -> KubernetesCaller:
        """Return the authenticated caller, or raise ``AuthnError``."""
        header = _read_header(token)
        alg = self._check_alg(header)
        kid = header.get("kid")  # PyJWT has checked it is a string when present
        claims = self._decode(token, alg, await self._candidate_keys(kid, alg))
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the clock must return an aware datetime")
        check_validity_window(claims, now, self._policy.leeway)
        return caller_from_claims(claims)

    def _check_alg(self, header: Mapping[str, Any]) -> str:
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthnError("malformed", "token header has no alg")
        if alg.lower() == "none":
            raise AuthnError("unsigned", "token is unsigned (alg none)")
        if alg not in self._policy.algorithms:
            raise AuthnError("unsupported_alg", f"algorithm {quoted(alg)} is not accepted")
        return alg

    async def _candidate_keys(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        """Find the keys for this token, asking the source to look again once
        when none fit: the issuer may have rotated since we last fetched."""
        found = _matching_keys(await self._jwks.key_set(), kid, alg)
        if not found:
            found = _matching_keys(await self._jwks.key_set(refresh=True), kid, alg)
        if not found:
            named = "no key id" if kid is None else f"key id {quoted(kid)}"
            raise AuthnError("unknown_key", f"no {alg} key for {named}")
        return found

    def _decode(self, token: str, alg: str, keys: list[jwt.PyJWK]) -> dict[str, Any]:
        """Verify against each candidate; only a signature mismatch moves on
        to the next key, since every other error means a key did verify."""
        mismatch: jwt.PyJWTError | None = None
        for key in keys:
            try:
                claims: dict[str, Any] = jwt.decode(
                    token,
                    key,
                    algorithms=[alg],
                    audience=self._policy.audience,
                    issuer=self._policy.issuer,
                    options=_DECODE_OPTIONS,
                )
            except jwt.InvalidSignatureError as exc:
                mismatch = exc
            except jwt.PyJWTError as exc:
                raise _refusal(exc) from exc
            else:
                return claims
        raise AuthnError("bad_signature", "signature does not verify") from mismatch
