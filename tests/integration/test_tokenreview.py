"""TokenReview authentication against an HTTPS stub of the API server.

Why a stub: no Kubernetes API server runs where these tests run. The stub
is a real HTTPS server on 127.0.0.1 (its certificate trusted only through
the reviewer's CA file). It checks what a real API server would check (the
CA's own bearer token, the path, the body) and answers with TokenReview
bodies written to match kube-apiserver's, from tests/fixtures/tokenreview/
(its README says where each shape comes from). The token a test sends names
the file the stub answers with, so every case runs the real client, the real
TLS and the real parsing.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import ssl
import time
import traceback
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from aiohttp import web
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from kubernetes.client import Configuration, V1TokenReview, V1TokenReviewStatus

from ca.authn.errors import TOKEN_REASONS, AuthnError
from ca.authn.kubernetes import KubernetesCaller
from ca.authn.tokenreview import (
    REVIEW_REASONS,
    ReviewPolicy,
    ReviewReason,
    TokenReviewer,
    caller_from_review,
)
from tests.support import (
    LoopbackTls,
    ca_client,
    ca_process,
    free_port,
    loopback_tls,
    make_ca_setup,
    make_csr,
)

FIXTURES = Path(__file__).parents[1] / "fixtures" / "tokenreview"
TOKENREVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
CA_OWN_TOKEN = "ca-own-serviceaccount-token"
TTL = timedelta(seconds=10)
NOW = datetime.fromtimestamp(1_700_000_000, UTC)

FRONTEND = KubernetesCaller(
    namespace="demo",
    service_account="frontend",
    pod_name="frontend-7d4b9c8f6d-x2k9p",
    pod_uid="4f6c2a1e-9b3d-4c8e-a7f5-1d2e3f4a5b6c",
    subject="system:serviceaccount:demo:frontend",
)


def token(case: str) -> str:
    """A JWS-shaped token whose middle names the stub's answer."""
    return f"eyJhbGciOiJSUzI1NiIsImtpZCI6InRlc3QifQ.{case}.c2lnbmF0dXJlLW9mLXRoZS10b2tlbg"


def recorded(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((FIXTURES / f"{name}.json").read_text())
    return body


def status_of(body: dict[str, Any]) -> V1TokenReviewStatus | None:
    review = V1TokenReview.from_dict(body)
    assert review is not None
    return review.status


class FakeClock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> datetime:
        return self.now


# --- the stub API server -----------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LoopbackTls:
    return loopback_tls(tmp_path_factory.mktemp("apiserver"), "kube-apiserver stub")


@dataclass
class ApiServer:
    """POST /apis/authentication.k8s.io/v1/tokenreviews, answered from the fixtures."""

    runner: web.AppRunner | None = None
    url: str = ""
    specs: list[dict[str, Any]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or credential != CA_OWN_TOKEN:
            return web.json_response(recorded("status_401"), status=401)
        review = await request.json()
        assert review["kind"] == "TokenReview"
        assert review["apiVersion"] == "authentication.k8s.io/v1"
        spec = review["spec"]
        self.specs.append(spec)
        case = spec["token"].split(".")[1]
        if case == "slow":
            await asyncio.wait_for(self.release.wait(), timeout=2)
        if case == "redirect":
            return web.Response(status=307, headers={"Location": "/somewhere-else"})
        if case == "truncated":
            return web.Response(status=201, body=b'{"kind": "TokenReview", "spec": {')
        if case == "garbled":  # not a TokenReview, and the echoed token is in the part that fails
            return web.json_response({"kind": "TokenReview", "spec": spec["token"]}, status=201)
        body = recorded(case if case != "slow" else "accepted")
        if body["kind"] == "Status":
            return web.json_response(body, status=body["code"])
        body["spec"] = spec  # the API server echoes the spec, token and all
        return web.json_response(body, status=201)

    async def start(self, context: ssl.SSLContext) -> None:
        app = web.Application()
        app.router.add_post(TOKENREVIEWS, self.handle)
        self.runner = web.AppRunner(app, shutdown_timeout=1)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=context).start()
        self.url = f"https://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def server(pki: LoopbackTls, watchdog: None) -> AsyncIterator[ApiServer]:
    served = ApiServer()
    await served.start(pki.server_context)
    yield served
    await served.stop()


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca-token"
    path.write_text(CA_OWN_TOKEN + "\n")
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_reviewer(
    url: str, ca_file: Path, token_file: Path, clock: FakeClock, **policy: Any
) -> TokenReviewer:
    return TokenReviewer.for_host(
        url,
        ca_file=str(ca_file),
        token_file=str(token_file),
        policy=ReviewPolicy(**{"timeout": 1.0, **policy}),
        clock=clock,
    )


@pytest.fixture
async def reviewer(
    server: ApiServer, pki: LoopbackTls, token_file: Path, clock: FakeClock
) -> AsyncIterator[TokenReviewer]:
    made = make_reviewer(server.url, pki.ca_file, token_file, clock)
    yield made
    await made.close()


async def refused(reviewer: TokenReviewer, case: str, reason: str) -> AuthnError:
    with pytest.raises(AuthnError) as caught:
        await reviewer.verify(token(case))
    assert caught.value.reason == reason, caught.value
    assert caught.value.reason in REVIEW_REASONS
    return caught.value


# --- the acceptance cases ------------------------------------------------------------


async def test_accepted_token_becomes_the_pod_bound_caller(
    reviewer: TokenReviewer, server: ApiServer
) -> None:
    assert await reviewer.verify(token("accepted")) == FRONTEND
    assert server.specs == [{"token": token("accepted"), "audiences": ["outrider-ca"]}]


@pytest.mark.parametrize("case", ["wrong_audience", "audience_unaware"])
async def test_wrong_audience_is_refused(reviewer: TokenReviewer, case: str) -> None:
    """Refused whether the API server says so or just fails to confirm our audience."""
    await refused(reviewer, case, "wrong_audience")


async def test_unauthenticated_review_is_refused(reviewer: TokenReviewer) -> None:
    error = await refused(reviewer, "unauthenticated", "not_authenticated")
    assert "error in cryptographic primitive" in error.message  # the API server's own words


@pytest.mark.parametrize("case", ["pod_deleted", "pod_uid_mismatch"])
async def test_pod_binding_mismatch_is_refused(reviewer: TokenReviewer, case: str) -> None:
    """The API server itself fails the review once the bound pod is gone or replaced."""
    await refused(reviewer, case, "revoked")


async def test_token_not_bound_to_a_pod(
    server: ApiServer, pki: LoopbackTls, token_file: Path, clock: FakeClock
) -> None:
    strict = make_reviewer(server.url, pki.ca_file, token_file, clock)
    lenient = make_reviewer(server.url, pki.ca_file, token_file, clock, require_pod_binding=False)
    try:
        await refused(strict, "not_pod_bound", "pod_binding")
        caller = await lenient.verify(token("not_pod_bound"))
    finally:
        await strict.close()
        await lenient.close()
    assert (caller.pod_name, caller.pod_uid) == (None, None)
    assert caller.subject == FRONTEND.subject


async def test_api_5xx_is_refused(reviewer: TokenReviewer) -> None:
    error = await refused(reviewer, "status_500", "tokenreview_unavailable")
    assert "HTTP 500" in error.message


async def test_api_unreachable_is_refused(
    pki: LoopbackTls, token_file: Path, clock: FakeClock
) -> None:
    # Nothing listens on the port, so connecting is refused.
    unreachable = make_reviewer(f"https://127.0.0.1:{free_port()}", pki.ca_file, token_file, clock)
    try:
        await refused(unreachable, "accepted", "tokenreview_unavailable")
    finally:
        await unreachable.close()


# --- the CA's own side of the call -------------------------------------------------------


async def test_api_refusing_the_cas_credentials_is_refused(
    server: ApiServer, pki: LoopbackTls, tmp_path: Path, clock: FakeClock, reviewer: TokenReviewer
) -> None:
    stale = tmp_path / "stale-token"
    stale.write_text("not-the-ca-token")
    wrong = make_reviewer(server.url, pki.ca_file, stale, clock)
    try:
        error = await refused(wrong, "accepted", "tokenreview_unavailable")
    finally:
        await wrong.close()
    assert "HTTP 401" in error.message and "CA's own credentials" in error.message
    error = await refused(reviewer, "status_403", "tokenreview_unavailable")
    assert "HTTP 403" in error.message


async def test_rotated_ca_token_is_picked_up(
    reviewer: TokenReviewer, token_file: Path, server: ApiServer
) -> None:
    token_file.write_text("rotated-away")
    await refused(reviewer, "accepted", "tokenreview_unavailable")
    token_file.write_text(CA_OWN_TOKEN)
    assert await reviewer.verify(token("accepted")) == FRONTEND


async def test_untrusted_server_certificate_is_refused(
    server: ApiServer, tmp_path: Path, token_file: Path, clock: FakeClock
) -> None:
    other_ca = loopback_tls(tmp_path, "some other CA").ca_file
    mistrusting = make_reviewer(server.url, other_ca, token_file, clock)
    try:
        error = await refused(mistrusting, "accepted", "tokenreview_unavailable")
    finally:
        await mistrusting.close()
    assert "SSLError" in error.message
    assert server.specs == []  # the token never left the CA


async def test_redirect_is_not_followed(reviewer: TokenReviewer, server: ApiServer) -> None:
    """urllib3 would re-POST the body, token included, to wherever Location points."""
    error = await refused(reviewer, "redirect", "tokenreview_unavailable")
    assert "HTTP 307" in error.message
    assert len(server.specs) == 1


@pytest.mark.parametrize("case", ["truncated", "garbled"])
async def test_unparseable_body_is_refused(reviewer: TokenReviewer, case: str) -> None:
    await refused(reviewer, case, "tokenreview_unavailable")


async def test_slow_api_times_out(
    server: ApiServer, pki: LoopbackTls, token_file: Path, clock: FakeClock
) -> None:
    impatient = make_reviewer(server.url, pki.ca_file, token_file, clock, timeout=0.2)
    started = time.perf_counter()
    try:
        error = await refused(impatient, "slow", "tokenreview_unavailable")
    finally:
        await impatient.close()
    assert time.perf_counter() - started < 0.6
    assert "0.2s" in error.message


# --- the cache ----------------------------------------------------------------------


async def test_cache_serves_within_the_ttl_and_asks_again_after(
    reviewer: TokenReviewer, server: ApiServer, clock: FakeClock
) -> None:
    assert await reviewer.verify(token("accepted")) == FRONTEND
    clock.now += TTL - timedelta(seconds=1)
    assert await reviewer.verify(token("accepted")) == FRONTEND
    assert len(server.specs) == 1
    clock.now += timedelta(seconds=1)
    assert await reviewer.verify(token("accepted")) == FRONTEND
    assert len(server.specs) == 2


async def test_refusals_are_not_cached(reviewer: TokenReviewer, server: ApiServer) -> None:
    await refused(reviewer, "pod_deleted", "revoked")
    await refused(reviewer, "pod_deleted", "revoked")
    assert len(server.specs) == 2


async def test_cache_is_bounded(
    server: ApiServer, pki: LoopbackTls, token_file: Path, clock: FakeClock
) -> None:
    small = make_reviewer(server.url, pki.ca_file, token_file, clock, max_cached=1)
    try:
        first, second = token("accepted"), token("accepted") + "x"
        await small.verify(first)
        await small.verify(second)  # evicts the first
        await small.verify(first)
    finally:
        await small.close()
    assert [spec["token"] for spec in server.specs] == [first, second, first]


# --- the token stays secret ------------------------------------------------------------


def leaks(secret: str, text: str, window: int = 10) -> bool:
    """Whether any stretch of the token's header or signature shows in text.

    Stretches, not the whole token: pydantic, for one, quotes long inputs by
    their first and last characters. The middle names the case, which the
    reasons echo (e.g. "wrong_audience"), so it is left out.
    """
    header, _, signature = secret.split(".")
    return any(
        part[i : i + window] in text
        for part in (header, signature)
        for i in range(len(part) - window + 1)
    )


SECRET_CASES = [
    "accepted",
    "unauthenticated",
    "wrong_audience",
    "audience_unaware",
    "pod_deleted",
    "status_500",
    "status_403",
    "redirect",
    "truncated",
    "garbled",
]


async def test_token_never_appears_in_logs_or_errors(
    reviewer: TokenReviewer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    shown: list[str] = [repr(reviewer)]
    refusals = 0
    for case in SECRET_CASES:
        try:
            shown.append(repr(await reviewer.verify(token(case))))
        except AuthnError as exc:
            refusals += 1
            shown += [str(exc), repr(exc), exc.message, "".join(traceback.format_exception(exc))]
    assert refusals == len(SECRET_CASES) - 1  # all but "accepted"
    for text in [*shown, caplog.text]:
        for case in SECRET_CASES:
            assert not leaks(token(case), text)


async def test_a_server_echoing_the_token_in_its_error_is_redacted() -> None:
    review = recorded("unauthenticated")
    secret = token("unauthenticated")
    review["status"]["error"] = f"webhook said: token {secret} is unknown"
    with pytest.raises(AuthnError) as caught:
        caller_from_review(status_of(review), ReviewPolicy(), secret)
    assert secret not in caught.value.message
    assert "<token>" in caught.value.message


# --- the decision, as a table ---------------------------------------------------------


def edited(**status: Any) -> dict[str, Any]:
    review = copy.deepcopy(recorded("accepted"))
    review["status"].update(status)
    return review


def with_extra(**extra: list[str]) -> dict[str, Any]:
    review = edited()
    for key, values in extra.items():
        name = f"authentication.kubernetes.io/{key.replace('_', '-')}"
        if values:
            review["status"]["user"]["extra"][name] = values
        else:
            del review["status"]["user"]["extra"][name]
    return review


def with_username(username: str) -> dict[str, Any]:
    review = edited()
    review["status"]["user"]["username"] = username
    return review


@pytest.mark.parametrize(
    ("review", "reason"),
    [
        (edited(authenticated=False), "not_authenticated"),
        (edited(audiences=["https://kubernetes.default.svc"]), "wrong_audience"),
        (edited(audiences=[]), "wrong_audience"),
        (recorded("expired"), "expired"),
        (with_username("kubernetes-admin"), "invalid_claims"),
        (with_username("system:serviceaccount:demo:frontend:x"), "invalid_claims"),
        (with_username("system:serviceaccount:Demo:frontend"), "invalid_claims"),
        (with_username("system:serviceaccount:demo"), "invalid_claims"),
        (with_extra(pod_name=["a", "b"]), "pod_binding"),
        (with_extra(pod_uid=["4f6c2a1e", "0c5f8e2d"]), "pod_binding"),
        (with_extra(pod_name=["../etc"]), "pod_binding"),
        (with_extra(pod_uid=["not a uid!"]), "pod_binding"),
        (with_extra(pod_uid=[]), "pod_binding"),
        (with_extra(pod_name=[]), "pod_binding"),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_refusals(review: dict[str, Any], reason: str) -> None:
    status = status_of(review)
    with pytest.raises(AuthnError) as caught:
        caller_from_review(status, ReviewPolicy(), token("x"))
    assert caught.value.reason == reason


def test_a_review_without_status_is_refused() -> None:
    with pytest.raises(AuthnError) as caught:
        caller_from_review(None, ReviewPolicy(), token("x"))
    assert caught.value.reason == "not_authenticated"


def test_extras_other_than_the_pod_do_not_matter() -> None:
    review = with_extra(node_name=[], node_uid=[], credential_id=["JTI=a", "JTI=b"])
    status = status_of(review)
    assert caller_from_review(status, ReviewPolicy(), token("x")) == FRONTEND


# --- configuration ------------------------------------------------------------------


async def test_in_cluster_config(
    server: ApiServer, pki: LoopbackTls, token_file: Path, clock: FakeClock
) -> None:
    port = server.url.rsplit(":", 1)[1]
    token_file.write_text(CA_OWN_TOKEN)  # kubelet writes no newline
    in_pod = TokenReviewer.in_cluster(
        ReviewPolicy(),
        clock,
        environ={"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": port},
        token_file=str(token_file),
        ca_file=str(pki.ca_file),
    )
    try:
        assert await in_pod.verify(token("accepted")) == FRONTEND
    finally:
        await in_pod.close()


async def test_kubeconfig(
    server: ApiServer, pki: LoopbackTls, tmp_path: Path, clock: FakeClock
) -> None:
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {
                        "name": "stub",
                        "cluster": {
                            "server": server.url,
                            "certificate-authority": str(pki.ca_file),
                        },
                    }
                ],
                "users": [{"name": "outrider-ca", "user": {"token": CA_OWN_TOKEN}}],
                "contexts": [{"name": "ca", "context": {"cluster": "stub", "user": "outrider-ca"}}],
                "current-context": "ca",
            }
        )
    )
    reviewer = TokenReviewer.from_kubeconfig(str(kubeconfig), ReviewPolicy(), clock)
    try:
        assert await reviewer.verify(token("accepted")) == FRONTEND
    finally:
        await reviewer.close()


def test_missing_in_cluster_environment_is_a_config_error() -> None:
    with pytest.raises(ValueError, match="in-cluster"):
        TokenReviewer.in_cluster(ReviewPolicy(), FakeClock(), environ={})


@pytest.mark.parametrize(
    "configuration",
    [
        Configuration(host="http://127.0.0.1:8080"),
        Configuration(host="https://x", verify_ssl=False),
    ],
    ids=["plain-http", "unverified-tls"],
)
def test_insecure_api_server_settings_are_refused(configuration: Configuration) -> None:
    with pytest.raises(ValueError):
        TokenReviewer(configuration, ReviewPolicy(), FakeClock())


@pytest.mark.parametrize(
    "settings",
    [
        {"audience": ""},
        {"cache_ttl": timedelta(minutes=2)},
        {"cache_ttl": timedelta(seconds=-1)},
        {"timeout": 0},
        {"max_cached": 0},
        {"max_in_flight": 0},
    ],
)
def test_policy_is_validated(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ReviewPolicy(**settings)


def test_shared_reasons_are_the_offline_verifiers() -> None:
    """A reason the reviewer shares with the offline verifier means the same there."""
    assert REVIEW_REASONS - set(get_args(ReviewReason)) <= TOKEN_REASONS


# --- wired into ca serve ------------------------------------------------------------------


async def test_ca_serve_lets_the_review_decide_the_identity(
    pki: LoopbackTls, tmp_path: Path
) -> None:
    """`ca serve` with authn.kubernetes.tokenreview and a kubeconfig, against the stub."""
    api = ApiServer()
    await api.start(pki.server_context)
    kubeconfig = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "c", "cluster": {"server": api.url, "certificate-authority": str(pki.ca_file)}}
        ],
        "users": [{"name": "ca", "user": {"token": CA_OWN_TOKEN}}],
        "contexts": [{"name": "ca", "context": {"cluster": "c", "user": "ca"}}],
        "current-context": "ca",
    }
    (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
    authn = {"kubernetes": {"tokenreview": {"kubeconfig": "kubeconfig"}}}
    setup = make_ca_setup(tmp_path, authn=authn)
    running = ca_process(setup.config)
    ca = await asyncio.to_thread(running.__enter__)  # the stub serves from this loop
    try:
        async with ca_client(setup, ca) as client:
            issued = await client.sign(make_csr(), token=token("accepted"))
            with pytest.raises(GRPCError) as refused:
                await client.sign(make_csr(), token=token("pod_deleted"))
    finally:
        await asyncio.to_thread(running.__exit__, None, None, None)
        await api.stop()
    assert issued.spiffe_id == "spiffe://example.org/ns/demo/sa/frontend"
    assert refused.value.status is Status.UNAUTHENTICATED
    assert str(refused.value.message).startswith("revoked:")
    assert [spec["audiences"] for spec in api.specs] == [["outrider-ca"]] * 2
