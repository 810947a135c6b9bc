"""Authenticate an agent by asking the API server about its token (TokenReview).

The offline verifier (``kubernetes.py``) proves who signed a token, not that
what it names still exists. A TokenReview asks the API server, which checks
the signature, audience and validity window and also that the ServiceAccount
and the pod the token is bound to are still there: a token whose pod was
deleted, or replaced by a namesake, is refused now rather than at its expiry.

The decision is a pure function over the returned review
(``caller_from_review``). Around it, ``TokenReviewer`` runs the official,
synchronous ``kubernetes`` client on a small thread pool of its own, under a
deadline, so the event loop never waits on the API server and a slow one
cannot take every thread of the loop's default pool. Anything short of a
well-formed review refuses the caller with ``tokenreview_unavailable``: there
is no fallback to the offline verifier or to an expired answer, because a CA
that issues identities it could not check is what it exists to prevent.

Accepted reviews are cached for a few seconds under the token's SHA-256; the
token itself is never stored, logged, or put into an error. The price is that
a pod deleted within the TTL is still believed until its entry expires.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections import OrderedDict
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal, get_args
from urllib.parse import urlsplit

import jwt
import urllib3
from kubernetes.client import (
    ApiClient,
    AuthenticationV1Api,
    Configuration,
    V1TokenReview,
    V1TokenReviewSpec,
    V1TokenReviewStatus,
)
from kubernetes.client.exceptions import ApiException, OpenApiException
from kubernetes.config.config_exception import ConfigException
from kubernetes.config.incluster_config import (
    SERVICE_CERT_FILENAME,
    SERVICE_TOKEN_FILENAME,
    InClusterConfigLoader,
)
from kubernetes.config.kube_config import load_kube_config

from ca.authn.errors import AuthnError
from ca.authn.jwks import Clock
from ca.authn.kubernetes import MAX_TOKEN_CHARS, KubernetesCaller

ReviewReason = Literal["not_authenticated", "revoked", "pod_binding", "tokenreview_unavailable"]

# Every reason the reviewer can give: its own, and those it shares with the
# offline verifier (errors.TOKEN_REASONS), so metrics can pre-register them.
REVIEW_REASONS: frozenset[str] = frozenset(get_args(ReviewReason)) | frozenset(
    {"malformed", "wrong_audience", "expired", "not_yet_valid", "invalid_claims"}
)

POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
_SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"

# The API server explains a refusal only in prose. These fragments are
# kube-apiserver's own (pkg/serviceaccount); they choose the metric label and
# nothing else: a text not listed here is still a refusal, "not_authenticated".
_REFUSAL_TEXTS: tuple[tuple[str, str], ...] = (
    ("is invalid for the target audiences", "wrong_audience"),
    ("service account token has expired", "expired"),
    ("service account token is not valid yet", "not_yet_valid"),
    ("service account token has been invalidated", "revoked"),  # bound pod or secret deleted
    ("does not match service account pod ref claim", "revoked"),  # pod replaced by a namesake
    ("does not match service account secret ref claim", "revoked"),
    ("does not match claim", "revoked"),  # ServiceAccount deleted and recreated
    ("has been deleted", "revoked"),  # ServiceAccount being deleted
)
_MAX_SHOWN_CHARS = 200
_MAX_CACHE_TTL = timedelta(minutes=1)


@dataclass(frozen=True)
class ReviewPolicy:
    """What a review must say, and how long the CA may believe it."""

    audience: str = "outrider-ca"
    # Refuse tokens that are not bound to a pod (legacy Secret tokens, or
    # `kubectl create token` without --bound-object-kind Pod).
    require_pod_binding: bool = True
    cache_ttl: timedelta = timedelta(seconds=10)
    max_cached: int = 4096
    timeout: float = 5.0  # seconds, for the whole review
    max_in_flight: int = 8  # reviews at once; more wait their turn within the timeout

    def __post_init__(self) -> None:
        if not self.audience:
            raise ValueError("a TokenReview needs an audience")
        if not timedelta(0) <= self.cache_ttl <= _MAX_CACHE_TTL:
            # The cache is how long a deleted pod is still believed: keep it short.
            raise ValueError(f"TokenReview cache TTL must be between 0 and {_MAX_CACHE_TTL}")
        if self.max_cached < 1 or self.max_in_flight < 1:
            raise ValueError("TokenReview max_cached and max_in_flight must be at least 1")
        if not 0 < self.timeout <= 60:
            raise ValueError("TokenReview timeout must be in (0, 60] seconds")


# --- the decision ---------------------------------------------------------------


def _shown(text: str | None, token: str) -> str:
    """A server-supplied text fit for an error: the token cut out, escaped, short."""
    if not text:
        return "no reason given"
    if token:
        text = text.replace(token, "<token>")
    return repr(text[:_MAX_SHOWN_CHARS])


def _refusal(error: str | None, token: str) -> AuthnError:
    reason = next((r for fragment, r in _REFUSAL_TEXTS if fragment in (error or "")), None)
    return AuthnError(
        reason or "not_authenticated",
        f"API server did not authenticate the token: {_shown(error, token)}",
    )


def _one_value(extra: Mapping[str, list[str]], key: str) -> str | None:
    values = extra.get(key) or []
    if len(values) > 1:
        raise AuthnError("pod_binding", f"review gives {len(values)} values for {key}")
    return values[0] if values else None


def _account_caller(username: str | None, token: str) -> KubernetesCaller:
    if not username or not username.startswith(_SERVICE_ACCOUNT_PREFIX):
        raise AuthnError(
            "invalid_claims", f"review names {_shown(username, token)}, not a ServiceAccount"
        )
    namespace, _, account = username.removeprefix(_SERVICE_ACCOUNT_PREFIX).partition(":")
    try:
        return KubernetesCaller(namespace, account, None, None, subject=username)
    except ValueError as exc:  # the caller's own message is already escaped and short
        raise AuthnError("invalid_claims", f"review names an invalid identity: {exc}") from None


def _bind_pod(
    caller: KubernetesCaller, extra: Mapping[str, list[str]], required: bool
) -> KubernetesCaller:
    name, uid = _one_value(extra, POD_NAME_EXTRA), _one_value(extra, POD_UID_EXTRA)
    if name is None and uid is None:
        if required:
            raise AuthnError("pod_binding", "token is not bound to a pod")
        return caller
    if name is None or uid is None:
        raise AuthnError("pod_binding", "review names a pod without its UID, or a UID alone")
    try:
        return dataclasses.replace(caller, pod_name=name, pod_uid=uid)
    except ValueError as exc:
        raise AuthnError("pod_binding", f"review names an invalid pod: {exc}") from None


def caller_from_review(
    status: V1TokenReviewStatus | None, policy: ReviewPolicy, token: str
) -> KubernetesCaller:
    """Decide who the token belongs to from the API server's review, or refuse.

    ``token`` is only used to keep it out of error messages. Audiences must be
    confirmed: an authenticator that ignores ``spec.audiences`` returns none,
    which means "valid for the API server", and that is not us.
    """
    if status is None or status.authenticated is not True:
        raise _refusal(status.error if status else None, token)
    if policy.audience not in (status.audiences or []):
        shown = _shown(", ".join(status.audiences or []), token)
        raise AuthnError(
            "wrong_audience", f"review confirms audiences {shown}, not {policy.audience!r}"
        )
    user = status.user
    caller = _account_caller(user.username if user else None, token)
    return _bind_pod(caller, (user.extra if user else None) or {}, policy.require_pod_binding)


# --- the adapter ----------------------------------------------------------------


def _unavailable(message: str) -> AuthnError:
    return AuthnError("tokenreview_unavailable", message)


def _http_failure(status: int | None) -> AuthnError:
    if status in (401, 403):
        return _unavailable(
            f"API server refused the CA's own credentials (HTTP {status}): check its"
            " ServiceAccount token and its RBAC permission to create tokenreviews"
        )
    return _unavailable(f"API server answered the TokenReview with HTTP {status}")


def _client_failure(exc: Exception) -> AuthnError:
    # Only type names: the client's messages can quote the response body, and
    # the body echoes the token in spec.token.
    cause = getattr(exc, "reason", None)
    detail = type(cause).__name__ if isinstance(cause, Exception) else type(exc).__name__
    return _unavailable(f"TokenReview failed: {detail}")


@dataclass(frozen=True)
class _Entry:
    caller: KubernetesCaller
    at: datetime
    token_expiry: datetime | None  # the API server checked exp; a cached answer must too


def _expiry(token: str) -> datetime | None:
    """The `exp` of a token the API server has just accepted (so it is the real one)."""
    try:
        exp = jwt.decode(token, options={"verify_signature": False}).get("exp")
        return datetime.fromtimestamp(int(exp), UTC) if exp is not None else None
    except (jwt.PyJWTError, TypeError, ValueError, OverflowError):
        return None


class TokenReviewer:
    """Verifies tokens by TokenReview; ``verify`` matches ``TokenVerifier.verify``.

    Takes ownership of ``configuration``. Call ``close()`` when done.
    """

    def __init__(self, configuration: Configuration, policy: ReviewPolicy, clock: Clock) -> None:
        host = urlsplit(configuration.host)
        if host.scheme != "https" or not host.hostname:
            raise ValueError(f"the API server must be reached over https: {configuration.host!r}")
        if not configuration.verify_ssl:
            raise ValueError("will not send tokens to an API server whose certificate is unchecked")
        # One retry covers a pooled connection the server had closed. Redirects
        # are refused: urllib3 would re-send the POST, token and all, wherever
        # the Location header points.
        configuration.retries = urllib3.Retry(total=1, redirect=False)
        self._host = configuration.host
        self._policy = policy
        self._clock = clock
        self._client = ApiClient(configuration)
        self._api = AuthenticationV1Api(self._client)
        self._executor = ThreadPoolExecutor(policy.max_in_flight, thread_name_prefix="tokenreview")
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()

    @classmethod
    def in_cluster(
        cls,
        policy: ReviewPolicy,
        clock: Clock,
        *,
        environ: Mapping[str, str] = os.environ,
        token_file: str = SERVICE_TOKEN_FILENAME,
        ca_file: str = SERVICE_CERT_FILENAME,
    ) -> TokenReviewer:
        """The CA's own pod: KUBERNETES_SERVICE_HOST/PORT and the mounted
        ServiceAccount token (re-read as kubelet rotates it) and CA."""
        configuration = Configuration()
        try:
            loader = InClusterConfigLoader(token_file, ca_file, environ=environ)  # type: ignore[no-untyped-call]
            loader.load_and_set(configuration)  # type: ignore[no-untyped-call]
        except ConfigException as exc:
            raise ValueError(f"in-cluster Kubernetes config: {exc}") from exc
        return cls(configuration, policy, clock)

    @classmethod
    def from_kubeconfig(
        cls, path: str, policy: ReviewPolicy, clock: Clock, *, context: str | None = None
    ) -> TokenReviewer:
        configuration = Configuration()
        try:
            load_kube_config(  # type: ignore[no-untyped-call]
                path, context, client_configuration=configuration, persist_config=False
            )
        except (ConfigException, OSError) as exc:
            raise ValueError(f"kubeconfig {path}: {exc}") from exc
        return cls(configuration, policy, clock)

    @classmethod
    def for_host(
        cls, host: str, *, ca_file: str, token_file: str, policy: ReviewPolicy, clock: Clock
    ) -> TokenReviewer:
        """An API server named outright, with the CA's own token read from
        ``token_file`` for every review (so a rotated token is picked up)."""
        configuration = Configuration(host=host, ssl_ca_cert=ca_file)

        def read_token(config: Configuration) -> None:
            token = Path(token_file).read_text(encoding="utf-8").strip()
            config.api_key = {"BearerToken": f"Bearer {token}"}

        # The client only calls the hook once a key is set, so read it now:
        # that also makes a missing token file a startup error.
        try:
            read_token(configuration)
        except OSError as exc:
            raise ValueError(f"cannot read the CA's own token {token_file}: {exc}") from exc
        # The client declares the hook as None, though it calls it when set.
        configuration.refresh_api_key_hook = read_token  # type: ignore[assignment]
        return cls(configuration, policy, clock)

    def __repr__(self) -> str:
        return f"TokenReviewer({self._host!r})"

    async def verify(self, token: str) -> KubernetesCaller:
        """Return the authenticated caller, or raise ``AuthnError``."""
        if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
            raise AuthnError("malformed", "token is empty or too long")
        key = hashlib.sha256(token.encode()).digest()
        cached = self._lookup(key)
        if cached is not None:
            return cached
        started = self._clock()
        caller = caller_from_review(await self._review(token), self._policy, token)
        self._remember(key, _Entry(caller, started, _expiry(token)))
        return caller

    async def close(self) -> None:
        # Nothing waits: a review still running ends at its own socket timeout.
        self._executor.shutdown(wait=False, cancel_futures=True)
        self._client.close()  # type: ignore[no-untyped-call]

    def _lookup(self, key: bytes) -> KubernetesCaller | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        now = self._clock()
        age = now - entry.at
        # A clock that went backwards makes the age negative: trust nothing then.
        expired = entry.token_expiry is not None and now >= entry.token_expiry
        if expired or not timedelta(0) <= age < self._policy.cache_ttl:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        return entry.caller

    def _remember(self, key: bytes, entry: _Entry) -> None:
        if self._policy.cache_ttl <= timedelta(0):
            return
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self._policy.max_cached:
            self._cache.popitem(last=False)

    async def _review(self, token: str) -> V1TokenReviewStatus | None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._policy.timeout):
                return await loop.run_in_executor(self._executor, self._create, token)
        except TimeoutError:
            raise _unavailable(f"TokenReview took over {self._policy.timeout}s") from None

    def _create(self, token: str) -> V1TokenReviewStatus | None:
        """The blocking call, on the reviewer's own threads."""
        body = V1TokenReview(
            api_version="authentication.k8s.io/v1",
            kind="TokenReview",
            spec=V1TokenReviewSpec(token=token, audiences=[self._policy.audience]),
        )
        try:
            review = self._api.create_token_review(body, _request_timeout=self._policy.timeout)
        except ApiException as exc:
            raise _http_failure(exc.status) from None
        # HTTPError: connection refused, TLS, timeouts. ValueError: a body that
        # is not JSON or not a TokenReview. OSError: our own token file.
        except (OpenApiException, urllib3.exceptions.HTTPError, ValueError, OSError) as exc:
            raise _client_failure(exc) from None
        if not isinstance(review, V1TokenReview):
            raise _unavailable("API server sent no TokenReview")
        return review.status
