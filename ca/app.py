"""`outrider ca serve`: wire config, signer, authentication and the two listeners."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from ca.api.grpc import CertificateAuthorityService
from ca.api.http import make_app
from ca.api.tls import ServingTls
from ca.audit import AuditLog
from ca.authn import dev
from ca.authn.callers import Authenticator, TokenAuthenticator
from ca.authn.dev import DevIssuer, DevModeError
from ca.authn.jwks import FileJwks, HttpsJwks, JwksSource
from ca.authn.kubernetes import TokenPolicy, TokenVerifier
from ca.authn.tokenreview import ReviewPolicy, TokenReviewer
from ca.config import JWKS_READ, CaConfig
from ca.issuer import Clock, Issuer
from ca.metrics import CaMetrics
from ca.signers.base import Signer, SignerUnavailable
from ca.signers.local import CaDirectoryError, LocalSigner
from ca.signers.vault import vault_signer
from identity.configfile import Listen
from identity.grpcserving import BoundedServer
from identity.renewal import Renewer, SystemClock, Validity
from identity.serving import Acceptor

log = logging.getLogger("outrider.ca")


def utcnow() -> datetime:
    return datetime.now(UTC)


class StartupError(Exception):
    """The CA cannot start with this config and these files."""


@dataclass(frozen=True)
class Bound:
    grpc: tuple[str, int]
    http: tuple[str, int]


async def open_signer(config: CaConfig, clock: Clock) -> Signer:
    """The local key, or a Vault session with what signing needs fetched from Vault."""
    if config.vault is not None:
        assert config.trust_domain is not None  # config requires it with Vault
        signer = vault_signer(config.vault, config.trust_domain, clock)
        try:
            await signer.start()
        except SignerUnavailable as exc:
            raise StartupError(
                f"cannot sign through Vault at {config.vault.address}: {exc}"
            ) from None
        return signer
    assert config.signer_dir is not None  # config requires a directory without Vault
    try:
        local = LocalSigner.load(config.signer_dir)
    except CaDirectoryError as exc:
        raise StartupError(str(exc)) from None
    if config.trust_domain is not None and config.trust_domain != local.trust_domain:
        raise StartupError(
            f"trust_domain is {config.trust_domain} but {config.signer_dir} holds a CA for "
            f"{local.trust_domain}"
        )
    return local


def jwks_source(config: CaConfig, clock: Clock) -> JwksSource:
    k8s = config.kubernetes
    assert k8s is not None  # not in dev mode
    if k8s.jwks_file is not None:
        if not k8s.jwks_file.exists():  # a ConfigMap not mounted yet, or a wrong path
            log.warning("authn.kubernetes.jwks_file %s is not here: %s", k8s.jwks_file, JWKS_READ)
        return FileJwks(k8s.jwks_file)
    assert k8s.jwks_url is not None  # config guarantees exactly one
    ca_file = str(k8s.jwks_ca_file) if k8s.jwks_ca_file else None
    return HttpsJwks(k8s.jwks_url, clock=clock, ca_file=ca_file, refresh_interval=k8s.jwks_refresh)


def token_authenticator(
    config: CaConfig, clock: Clock
) -> tuple[TokenAuthenticator, Callable[[], Awaitable[None]]]:
    """Offline JWKS verification, TokenReview, or dev tokens; and what to close at shutdown."""
    k8s = config.kubernetes
    if k8s is None:  # dev mode: config guarantees a local signer
        assert config.dev and config.signer_dir is not None
        try:
            return DevIssuer.open(config.signer_dir).verifier(clock), _nothing
        except DevModeError as exc:
            raise StartupError(str(exc)) from None
    if k8s.tokenreview is None:
        jwks = jwks_source(config, clock)
        policy = TokenPolicy(k8s.issuer, k8s.audience, k8s.leeway)
        closer = jwks.close if isinstance(jwks, HttpsJwks) else _nothing
        return TokenVerifier(policy, jwks, clock), closer
    review = k8s.tokenreview
    try:
        settings = ReviewPolicy(
            audience=k8s.audience,
            require_pod_binding=review.require_pod_binding,
            cache_ttl=review.cache_ttl,
        )
        reviewer = (
            TokenReviewer.from_kubeconfig(str(review.kubeconfig), settings, clock)
            if review.kubeconfig
            else TokenReviewer.in_cluster(settings, clock)
        )
    except ValueError as exc:
        raise StartupError(f"TokenReview: {exc}") from None
    return reviewer, reviewer.close


async def _nothing() -> None:
    return None


async def serve(
    config: CaConfig,
    stop: asyncio.Event,
    *,
    clock: Clock = utcnow,
    on_ready: asyncio.Future[Bound] | None = None,
) -> None:
    """Serve until `stop` is set; `on_ready` learns the bound addresses."""
    if config.dev:
        refused = dev.refusal(os.environ)
        if refused is not None:
            raise StartupError(refused)
        log.warning(dev.WARNING, dev.DEV_ISSUER)
    signer = await open_signer(config, clock)
    metrics = CaMetrics()
    # Read at every scrape: a Vault intermediate is replaced while the CA runs.
    metrics.root_expiry.set_function(lambda: signer.bundle.earliest_expiry.timestamp())
    metrics.intermediate_expiry.set_function(lambda: signer.issuer.not_valid_after_utc.timestamp())
    try:
        audit = AuditLog.open(config.audit_log, clock)
    except OSError as exc:
        raise StartupError(
            f"cannot open the audit log {config.audit_log}: {exc.strerror or exc} (audit_log)"
        ) from None
    tokens, close_tokens = token_authenticator(config, clock)
    service = CertificateAuthorityService(
        Issuer(signer, config.issuance, clock),
        Authenticator(signer.trust_domain, tokens, clock),
        metrics,
        audit,
    )
    try:
        chain, key = await _issue_serving(config, signer, clock)
    except SignerUnavailable as exc:
        raise StartupError(f"cannot issue the CA's own serving certificate: {exc}") from None
    tls = ServingTls(lambda: signer.bundle, chain, key)
    limits = config.limits
    grpc_server = BoundedServer([service], limits.grpc)
    http_runner = web.AppRunner(
        make_app(lambda: signer.bundle, metrics),
        access_log=None,
        keepalive_timeout=limits.connections.idle_timeout.total_seconds(),
    )
    await http_runner.setup()
    grpc_sock, http_sock = _bind(config.grpc, "listen.grpc"), _bind(config.http, "listen.http")
    assert http_runner.server is not None
    connections = limits.connections
    closed = metrics.connection_closed
    grpc = await grpc_server.serve(grpc_sock, tls.context, connections, closed("grpc"))
    http = Acceptor(http_sock, http_runner.server, None, connections, closed("http"))
    http.start()
    metrics.connections_open.labels("grpc").set_function(grpc.held)
    metrics.connections_open.labels("http").set_function(http.held)
    bound = Bound(grpc_sock.getsockname()[:2], http_sock.getsockname()[:2])
    log.info(
        "serving trust domain %s: gRPC (TLS) on %s:%d, HTTP on %s:%d%s",
        signer.trust_domain,
        *bound.grpc,
        *bound.http,
        " (DEV MODE: unsafe outside a laptop)" if config.dev else "",
    )
    if on_ready is not None:
        on_ready.set_result(bound)
    background = [
        asyncio.create_task(_rotate_serving(config, signer, tls, chain[0], clock)),
        asyncio.create_task(signer.run()),
    ]
    stopping = asyncio.create_task(stop.wait())
    pending = {stopping, *background}
    try:
        while stopping in pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done - {stopping}:
                # A renewal loop that failed would leave the CA serving until its
                # certificates expire: end the process instead, so it is restarted.
                task.result()
    finally:
        log.info("shutting down")
        for task in (stopping, *background):
            task.cancel()
        grpc_server.close()
        await grpc_server.wait_closed()
        http.close()
        await http.wait_closed()
        await http_runner.cleanup()
        await close_tokens()
        audit.close()


async def _issue_serving(
    config: CaConfig, signer: Signer, clock: Clock
) -> tuple[tuple[x509.Certificate, ...], ec.EllipticCurvePrivateKey]:
    issuer = Issuer(signer, config.issuance, clock)
    return await issuer.issue_serving(config.serving_names, config.serving_ttl)


#: Seconds between two looks at the signer's bundle (`_rotate_serving`).
BUNDLE_CHECK = 5.0


async def _rotate_serving(
    config: CaConfig, signer: Signer, tls: ServingTls, leaf: x509.Certificate, clock: Clock
) -> None:
    """Keep the CA's own serving certificate fresh, by the rules of every credential.

    While the signer is unavailable the current certificate stays; any other
    error ends the CA (see serve), so that it is restarted.
    """

    async def renew() -> Validity:
        chain, key = await _issue_serving(config, signer, clock)
        tls.credentials(chain, key)
        log.info("serving certificate renewed, valid until %s", chain[0].not_valid_after_utc)
        return Validity(chain[0].not_valid_before_utc, chain[0].not_valid_after_utc)

    renewer = Renewer(
        "the serving certificate",
        renew,
        clock=SystemClock(clock),
        rng=random.SystemRandom(),
        held=Validity(leaf.not_valid_before_utc, leaf.not_valid_after_utc),
        retriable=(SignerUnavailable,),
    )

    async def follow_bundle() -> None:
        """A new bundle (Vault's root rotated) means a new issuer: the serving certificate
        is issued again under it at once, or callers that trust only the new root could
        not reach the CA until its own renewal, hours later."""
        seen = signer.bundle
        while True:
            await asyncio.sleep(BUNDLE_CHECK)
            bundle = signer.bundle
            if bundle is not seen and bundle != seen:
                log.info("the trust bundle changed: issuing the serving certificate again")
                renewer.renew_now()
            seen = bundle

    await asyncio.gather(renewer.run(), follow_bundle())


def _bind(listen: Listen, key: str) -> socket.socket:
    """The listening socket of `key` (`listen.grpc`): a port in use names the key."""
    family = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0][0]
    try:
        return socket.create_server((listen.host, listen.port), family=family, backlog=1024)
    except OSError as exc:
        said = exc.strerror or str(exc)
        if exc.errno == errno.EADDRINUSE:
            said += (
                ": another process listens there (another `outrider ca serve`?): stop it,"
                f" or change {key} in the config"
            )
        raise StartupError(f"cannot listen on {listen} ({key}): {said}") from None
