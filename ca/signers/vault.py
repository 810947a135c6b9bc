"""`signer: vault`: the root stays in Vault's (or OpenBao's) PKI engine.

Two modes:

- `intermediate` (the default; SPIRE's UpstreamAuthority model): the CA makes
  an intermediate key in memory and has Vault's root sign it
  (`<mount>/root/sign-intermediate`, short TTL). Leaves are signed locally, so
  Vault is contacted once per intermediate, not per workload. The
  intermediate is renewed at half its life with a fresh key; while Vault is
  away the current one keeps signing until it expires.
- `per-certificate`: Vault signs every leaf (`<mount>/sign/<role>`, never
  `sign-verbatim`) from the workload's own CSR, with the URI SAN set by the
  CA from the authenticated identity; the role fixes key usage, allowed URI
  SANs and the maximum TTL.

hvac is synchronous, so every call runs in a thread with Vault's timeout.
Whatever goes wrong with Vault becomes `SignerUnavailable` with a bounded
reason, which the Sign RPC answers as UNAVAILABLE: the agent retries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca.config import VaultSettings
from ca.core import template
from ca.core.certs import as_certs, bundle_of
from ca.core.csr import CsrRejected
from ca.core.template import LeafRequest
from ca.signers.base import SignerUnavailable
from identity import TrustBundle, TrustDomain
from identity.chain import ChainError, check_chain
from identity.renewal import Clock as RenewalClock
from identity.renewal import Renewer, SystemClock, Validity

log = logging.getLogger("outrider.ca.vault")

T = TypeVar("T")
Clock = Callable[[], datetime]

#: Vault calls at once, on threads of their own: a hung Vault must not take
#: the event loop's default executor, and waiting callers give up at the timeout.
MAX_IN_FLIGHT = 8
#: Vault's TTLs are whole seconds, rounded either way.
ROUNDING = 2
#: How often a token without a TTL is looked at again.
NO_TTL_RECHECK = timedelta(hours=1)


class VaultSession:
    """An hvac client whose token is kept fresh: renewed at half its TTL, or logged in again."""

    def __init__(self, settings: VaultSettings, clock: RenewalClock) -> None:
        self.settings = settings
        self.clock = clock
        verify: str | bool = str(settings.ca_file) if settings.ca_file else True
        self._client = hvac.Client(
            url=settings.address, verify=verify, timeout=settings.timeout.total_seconds()
        )
        self._threads = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="vault")
        self._login_lock = asyncio.Lock()
        self._logins = 0  # how many times a login succeeded: which token a refusal was for

    async def call(self, work: Callable[[hvac.Client], T], what: str) -> T:
        """Run `work` against Vault in a thread; SignerUnavailable on any Vault trouble.

        A refusal may mean the token expired (Vault says "permission denied"
        either way), so a Forbidden is tried once more after logging in again;
        callers refused with the same token share one login.
        """
        logins = self._logins
        try:
            return await self._call(work, what)
        except hvac.exceptions.Forbidden:
            log.warning("%s: Vault said permission denied; logging in again", what)
        async with self._login_lock:
            if self._logins == logins:  # nobody has logged in since this token was refused
                await self._login_now()
        try:
            return await self._call(work, what)
        except hvac.exceptions.Forbidden as exc:
            raise SignerUnavailable("vault_refused", f"{what}: Vault refused: {exc}") from None

    async def _call(self, work: Callable[[hvac.Client], T], what: str) -> T:
        timeout = self.settings.timeout.total_seconds()
        try:
            async with asyncio.timeout(timeout):
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._threads, work, self._client)
        except CsrRejected:
            raise  # the caller's fault, not Vault's: not retriable
        except TimeoutError:  # before OSError, of which it is one
            raise SignerUnavailable(
                "vault_unreachable", f"{what}: Vault did not answer within {timeout:g}s"
            ) from None
        except hvac.exceptions.Forbidden:
            raise
        except hvac.exceptions.VaultDown as exc:
            raise SignerUnavailable("vault_sealed", f"{what}: Vault is sealed ({exc})") from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise SignerUnavailable(
                "vault_unreachable", f"{what}: cannot reach Vault at {self.settings.address}"
            ) from exc
        except hvac.exceptions.VaultError as exc:
            raise SignerUnavailable("vault_refused", f"{what}: Vault refused: {exc}") from None
        except (requests.RequestException, OSError) as exc:
            # Only the type: requests quotes a bad header's value, the token, in its message.
            raise SignerUnavailable(
                "vault_refused", f"{what}: request to Vault failed ({type(exc).__name__})"
            ) from None
        except (KeyError, TypeError, IndexError, ValueError) as exc:  # an answer of another shape
            raise SignerUnavailable(
                "vault_refused", f"{what}: unexpected answer from Vault ({type(exc).__name__})"
            ) from None

    async def login(self) -> None:
        async with self._login_lock:
            await self._login_now()

    async def _login_now(self) -> None:
        try:
            await self._call(self._login, "login")
        except hvac.exceptions.Forbidden as exc:
            raise SignerUnavailable("vault_refused", f"login: Vault refused: {exc}") from None
        self._logins += 1

    async def keep_fresh(self) -> None:
        """Forever: renew the token at half its TTL; log in again when it cannot be extended."""
        try:
            held: Validity | None = await self._token_validity()
        except SignerUnavailable:
            held = None  # the loop tries at once, and backs off
        await Renewer(
            "the Vault token",
            self._refresh_token,
            clock=self.clock,
            rng=random.SystemRandom(),
            held=held,
            retriable=(SignerUnavailable,),
        ).run()

    async def _refresh_token(self) -> Validity:
        """Extend the token if Vault will grant it a full TTL again, or log in again.

        Judged by Vault's own numbers (the lease granted against the token's
        creation TTL), never by our clock: near its max TTL Vault "renews" a
        token only up to that max, and a new login gives a whole TTL instead.
        """
        info = await self._lookup()
        full = int(info.get("creation_ttl") or info.get("ttl") or 0)
        if full and info.get("renewable"):
            renewed = await self.call(lambda c: c.auth.token.renew_self(), "renewal")
            lease = int(renewed["auth"]["lease_duration"])
            if lease + ROUNDING >= full:
                log.info("Vault token renewed")
                return self._validity(lease)
        if full:
            await self.login()
            log.info("logged in to Vault again (the token could not be extended)")
        return await self._token_validity()

    async def _token_validity(self) -> Validity:
        return self._validity(int((await self._lookup()).get("ttl") or 0))

    async def _lookup(self) -> dict[str, Any]:
        return await self.call(lambda c: dict(c.auth.token.lookup_self()["data"]), "lookup")

    def _validity(self, ttl: int) -> Validity:
        # A token that never expires (a root token in tests): look again in an hour.
        now = self.clock.now()
        return Validity(now, now + (timedelta(seconds=ttl) if ttl else NO_TTL_RECHECK * 2))

    def _login(self, client: hvac.Client) -> None:
        auth = self.settings.auth
        if auth.method == "token":
            assert auth.token_file is not None
            token = auth.token_file.read_text().strip()
            if not token or not token.isprintable() or any(char.isspace() for char in token):
                raise hvac.exceptions.Forbidden(f"{auth.token_file} does not hold one token")
            client.token = token
        elif auth.method == "approle":
            assert auth.secret_id_file is not None
            secret_id = auth.secret_id_file.read_text().strip()
            client.auth.approle.login(auth.role_id, secret_id, mount_point=auth.mount)
        else:
            jwt = auth.jwt_file.read_text().strip()
            client.auth.kubernetes.login(auth.role, jwt, mount_point=auth.mount)
        if not client.is_authenticated():
            raise hvac.exceptions.Forbidden(f"Vault did not accept the {auth.method} credential")


def _certs(*pems: str | list[str] | None) -> list[x509.Certificate]:
    found: list[x509.Certificate] = []
    for pem in pems:
        for text in pem if isinstance(pem, list) else [pem] if pem else []:
            found += x509.load_pem_x509_certificates(text.encode())
    return found


def _split(certs: list[x509.Certificate]) -> tuple[list[x509.Certificate], list[x509.Certificate]]:
    """(intermediates, roots) of Vault's issuer chain, without duplicates."""
    unique = list({cert.fingerprint(hashes.SHA256()): cert for cert in certs}.values())
    roots = [cert for cert in unique if cert.subject == cert.issuer]
    return [cert for cert in unique if cert.subject != cert.issuer], roots


class VaultSigner:
    """What both modes share: the trust domain, the bundle from Vault, the session."""

    def __init__(self, session: VaultSession, trust_domain: TrustDomain, clock: Clock) -> None:
        self.session = session
        self.settings = session.settings
        self.trust_domain = trust_domain
        self._clock = clock
        self._above: list[x509.Certificate] = []  # Vault's intermediates, if its mount is one
        self.bundle: TrustBundle
        self.issuer: x509.Certificate

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.trust_domain}, {self.settings.address}, key=...)"

    async def start(self) -> None:
        """Log in and fetch what signing needs; SignerUnavailable if Vault cannot be used."""
        await self.session.login()

    async def run(self) -> None:
        """Background work for the life of the CA: keep the token fresh."""
        await self.session.keep_fresh()

    def _path(self, tail: str) -> str:
        return f"{self.settings.mount}/{tail}"


class VaultIntermediateSigner(VaultSigner):
    """Signs leaves locally with an intermediate that Vault's root signed."""

    _key: ec.EllipticCurvePrivateKey

    async def start(self) -> None:
        await super().start()
        await self.renew()

    async def run(self) -> None:
        await asyncio.gather(super().run(), self._keep_intermediate_fresh())

    async def renew(self) -> None:
        """A fresh key and a new intermediate from Vault; the old one signs until then."""
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, template.ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, f"intermediate {self.trust_domain}"),
            ]
        )
        builder = x509.CertificateSigningRequestBuilder().subject_name(name)
        if self.settings.name_constraints:  # Vault copies it from the CSR (use_csr_values)
            builder = builder.add_extension(
                template.uri_name_constraint(self.trust_domain), critical=True
            )
        csr = builder.sign(key, hashes.SHA256())
        data = {  # subject and extensions come from the CSR (use_csr_values)
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "ttl": f"{int(self.settings.intermediate_ttl.total_seconds())}s",
            "max_path_length": 0,
            "format": "pem",
            "use_csr_values": True,
        }

        def sign_intermediate(c: hvac.Client) -> tuple[x509.Certificate, list[x509.Certificate]]:
            response = c.write_data(self._path("root/sign-intermediate"), data=data)["data"]
            chain = _certs(response.get("issuing_ca"), response.get("ca_chain"))
            return _certs(response["certificate"])[0], chain

        intermediate, chain = await self.session.call(sign_intermediate, "sign-intermediate")
        above, roots = _split(chain)
        above = [cert for cert in above if cert != intermediate]  # ca_chain starts with it
        self._check(intermediate, key, above, roots)
        self._key, self.issuer, self._above = key, intermediate, above
        self.bundle = bundle_of(self.trust_domain, roots)
        log.info(
            "intermediate from Vault, serial %x, valid until %s",
            intermediate.serial_number,
            intermediate.not_valid_after_utc.isoformat(timespec="seconds"),
        )

    def _check(
        self,
        intermediate: x509.Certificate,
        key: ec.EllipticCurvePrivateKey,
        above: list[x509.Certificate],
        roots: list[x509.Certificate],
    ) -> None:
        try:
            is_ca = intermediate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
        except x509.ExtensionNotFound:
            is_ca = False
        if intermediate.public_key() != key.public_key() or not is_ca:
            raise SignerUnavailable("vault_refused", "Vault returned an unusable intermediate")
        # Required only when asked for: without it, peers check trust domains themselves.
        try:
            limited = intermediate.extensions.get_extension_for_class(x509.NameConstraints)
        except x509.ExtensionNotFound:
            limited = None
        wanted = template.uri_name_constraint(self.trust_domain)
        if self.settings.name_constraints and (
            limited is None or not limited.critical or limited.value != wanted
        ):
            raise SignerUnavailable(
                "vault_refused", f"Vault's intermediate is not limited to {self.trust_domain}"
            )
        try:
            check_chain(as_certs([intermediate, *above]), bundle_of(self.trust_domain, roots))
        except (ChainError, ValueError) as exc:
            raise SignerUnavailable(
                "vault_refused", f"Vault's chain does not link: {exc}"
            ) from None

    async def _keep_intermediate_fresh(self) -> None:
        """Renew at half the life left when it arrived: Vault backdates NotBefore (30 s
        by default), which would eat most of a short intermediate_ttl."""

        async def renewed() -> Validity:
            await self.renew()
            return self._validity()

        def failed(exc: Exception, failures: int, retry_in: float) -> None:
            left = max(self.issuer.not_valid_after_utc - self._clock(), timedelta(0))
            log.warning(
                "cannot renew the intermediate (%s, attempt %d); the current one signs for %s"
                " more; retrying in %.1fs",
                exc,
                failures,
                left,
                retry_in,
            )

        await Renewer(
            "the intermediate",
            renewed,
            clock=self.session.clock,
            rng=random.SystemRandom(),
            held=self._validity(),
            retriable=(SignerUnavailable,),
            on_failure=failed,
        ).run()

    def _validity(self) -> Validity:
        return Validity(self.issuer.not_valid_before_utc, self.issuer.not_valid_after_utc)

    async def sign_leaf(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        leaf = template.leaf(request, self.issuer).sign(self._key, hashes.SHA256())
        return (leaf, self.issuer, *self._above)

    async def sign_serving(
        self,
        names: tuple[str, ...],
        key: ec.EllipticCurvePrivateKey,
        not_before: datetime,
        not_after: datetime,
        serial: int,
    ) -> tuple[x509.Certificate, ...]:
        builder = template.serving(
            names, key.public_key(), self.issuer, not_before, not_after, serial
        )
        return (builder.sign(self._key, hashes.SHA256()), self.issuer, *self._above)


class VaultPerCertificateSigner(VaultSigner):
    """Vault signs every leaf from the workload's CSR, under a role that fixes its shape."""

    async def start(self) -> None:
        await super().start()
        chain = await self.session.call(
            lambda c: _certs(c.read(self._path("cert/ca_chain"))["data"]["ca_chain"]),
            "read CA chain",
        )
        above, roots = _split(chain)
        if not roots:
            raise SignerUnavailable(
                "vault_refused",
                f"{self._path('cert/ca_chain')} has no root: give the issuer its whole chain",
            )
        self.issuer = above[0] if above else roots[0]
        self._above = above
        self.bundle = bundle_of(self.trust_domain, roots)

    async def sign_leaf(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        if request.csr is None:
            raise SignerUnavailable("vault_refused", "per-certificate signing needs the CSR")
        data = {
            "csr": request.csr.public_bytes(serialization.Encoding.PEM).decode(),
            "uri_sans": str(request.spiffe_id),
            "not_after": _vault_time(request.not_after),
            "exclude_cn_from_sans": True,
            "format": "pem",
        }
        return await self._sign(self.settings.role, data, "sign")

    async def sign_serving(
        self,
        names: tuple[str, ...],
        key: ec.EllipticCurvePrivateKey,
        not_before: datetime,
        not_after: datetime,
        serial: int,
    ) -> tuple[x509.Certificate, ...]:
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .sign(key, hashes.SHA256())
        )
        ips = [n for n in names if _is_ip(n)]
        data = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "common_name": names[0],
            "alt_names": ",".join(n for n in names if not _is_ip(n)),
            "ip_sans": ",".join(ips),
            "not_after": _vault_time(not_after),
            "format": "pem",
        }
        return await self._sign(self.settings.serving_role, data, "sign serving certificate")

    async def _sign(
        self, role: str, data: dict[str, Any], what: str
    ) -> tuple[x509.Certificate, ...]:
        def sign(
            c: hvac.Client,
        ) -> tuple[x509.Certificate, list[x509.Certificate], list[x509.Certificate]]:
            try:
                response = c.write_data(self._path(f"sign/{role}"), data=data)["data"]
            except hvac.exceptions.InvalidRequest as exc:  # the role refuses this CSR for good
                raise CsrRejected("vault_rejected", f"Vault's role {role}: {exc}") from None
            above, roots = _split(_certs(response.get("issuing_ca"), response.get("ca_chain")))
            return _certs(response["certificate"])[0], above, roots

        leaf, above, roots = await self.session.call(sign, what)
        issuer = above[0] if above else roots[0] if roots else None
        if issuer is not None and issuer != self.issuer and roots:
            # Vault's default issuer changed (a root rotation): follow it, or every leaf
            # would be refused as not leading to the bundle the CA started with.
            self.issuer, self._above = issuer, above
            self.bundle = bundle_of(self.trust_domain, roots)
            log.warning(
                "Vault signs under another issuer now (%s): the trust bundle served is its"
                " root's; agents take it at their next bundle sync",
                issuer.subject.rfc4514_string(),
            )
        return (leaf, *above)


def _vault_time(moment: datetime) -> str:
    """Vault's `not_after`: UTC to the second, never later than asked."""
    return moment.replace(microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def vault_signer(
    settings: VaultSettings, trust_domain: TrustDomain, clock: Clock
) -> VaultIntermediateSigner | VaultPerCertificateSigner:
    session = VaultSession(settings, SystemClock(clock))
    if settings.mode == "per-certificate":
        return VaultPerCertificateSigner(session, trust_domain, clock)
    return VaultIntermediateSigner(session, trust_domain, clock)
