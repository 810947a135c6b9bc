"""The identity manager: get an SVID from the CA, keep it fresh, never go without.

Every renewal makes a new P-256 key in memory and sends a CSR: with the
current SVID as the TLS client certificate while it is valid, otherwise with
the projected ServiceAccount token, read from its file each time (the
kubelet rotates it). The answer is checked before use. While the CA cannot
be reached the current SVID stays in service until it expires, and attempts
back off exponentially with jitter.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from agent.adapters.ca_client import CaClient, tls_context
from agent.adapters.metrics import AgentMetrics
from agent.adapters.tls import Contexts, client_context, http_server_context, server_context
from agent.config import AgentConfig
from agent.core.svid import Svid, SvidRejected, accept_svid
from identity import TrustBundle, refresh_at
from identity.chain import ChainError, check_chain
from identity.files import PRIVATE, write_atomic
from identity.proto import ca_pb2

log = logging.getLogger("outrider.agent.identity")

#: Sends one CSR: (csr, trusted bundle PEM, current SVID or None, token or None).
SignFn = Callable[[bytes, bytes, Svid | None, str | None], Awaitable[ca_pb2.SignResponse]]

_UNAUTHORIZED = {Status.UNAUTHENTICATED, Status.PERMISSION_DENIED}

#: The longest wait between two looks at the wall clock: a suspend or an NTP step
#: moves the wall clock (which SVIDs expire by) and not the event loop's clock.
RECHECK_SECONDS = 60.0


class RenewalFailed(Exception):
    """`result` is a bounded label for svid_rotations_total."""

    def __init__(self, result: str, message: str) -> None:
        super().__init__(message)
        self.result = result


class IdentityManager:
    def __init__(
        self,
        config: AgentConfig,
        contexts: Contexts,
        metrics: AgentMetrics,
        *,
        now: Callable[[], datetime],
        rng: random.Random,
        sign: SignFn | None = None,
    ) -> None:
        self.config = config
        self.contexts = contexts
        self.metrics = metrics
        self.now = now
        self.rng = rng
        self.sign = sign or self._sign_with_ca
        self.svid: Svid | None = None
        self.next_renewal: datetime | None = None
        self.has_svid = asyncio.Event()
        self._wake = asyncio.Event()

    def renew_now(self) -> None:
        """Cut the current wait short (a reload changed the identity or the CA)."""
        self._wake.set()

    async def run(self) -> None:
        failures = 0
        while True:
            self._wake.clear()  # a renew_now() from here on asks for the renewal after this one
            failure = await self._try_renewal()
            if failure is None:
                failures = 0
                self.metrics.ca_backoff.set(0)
                assert self.next_renewal is not None
                await self._pause_until(self.next_renewal)
                continue
            failures += 1
            delay = self.config.ca.backoff.delay(failures, self.rng).total_seconds()
            self.metrics.rotations.labels(failure.result).inc()
            self.metrics.ca_backoff.set(delay)
            log.warning(
                "SVID renewal failed (%s, attempt %d): %s; retrying in %.1fs; %s",
                failure.result,
                failures,
                failure,
                delay,
                self._standing(),
            )
            await self._pause(delay)

    async def _try_renewal(self) -> RenewalFailed | None:
        try:
            self.install(await self.renew())
        except RenewalFailed as exc:
            return exc
        except Exception as exc:  # the loop must outlive a bug, or the SVID runs out unseen
            log.exception("SVID renewal: unexpected error")
            return RenewalFailed("ca_unavailable", repr(exc))
        return None

    async def renew(self) -> Svid:
        """One CSR to the CA; the checked SVID, or RenewalFailed."""
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([]))
            .sign(key, hashes.SHA256())
            .public_bytes(serialization.Encoding.DER)
        )
        trusted = self._trusted_pem()
        current = self.svid if self.svid and self.now() < self.svid.not_after else None
        try:
            if current is not None:
                try:
                    response = await self.sign(csr, trusted, current, None)
                except GRPCError as exc:
                    if exc.status not in _UNAUTHORIZED:
                        raise
                    log.warning("renewal with the current SVID refused (%s); using the token", exc)
                    response = await self.sign(csr, trusted, None, self._token())
            else:
                response = await self.sign(csr, trusted, None, self._token())
        except GRPCError as exc:
            retriable = exc.status in {Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED}
            result = "ca_unavailable" if retriable else "refused"
            raise RenewalFailed(result, f"CA answered {exc.status.name}: {exc.message}") from None
        except (OSError, TimeoutError, StreamTerminatedError, ProtocolError) as exc:
            # StreamTerminatedError: the connection to the CA dropped mid-call (a CA restart).
            raise RenewalFailed("ca_unavailable", f"cannot reach the CA: {exc!r}") from None
        try:
            svid = accept_svid(
                response.cert_chain,
                response.trust_bundle,
                key,
                self.config.identity.spiffe_id,
                self.now(),
            )
        except SvidRejected as exc:
            message = f"refused the CA's answer ({exc.reason}): {exc}"
            raise RenewalFailed("bad_answer", message) from None
        return svid

    def install(self, svid: Svid) -> None:
        """Put `svid` in service: new connections use it from now on."""
        try:
            server, client = server_context(svid), client_context(svid)
            http_server = http_server_context(svid)
        except ssl.SSLError as exc:
            raise RenewalFailed("bad_answer", f"ssl cannot use the new SVID: {exc}") from None
        self.contexts.server, self.contexts.client = server, client
        self.contexts.http_server = http_server
        self.svid = svid
        # Half of the life left from now, not from NotBefore: the CA backdates
        # NotBefore for clock skew, which would eat most of a short TTL.
        now = self.now()
        start = max(svid.not_before, now)
        self.next_renewal = refresh_at(start, svid.not_after, now, self.rng)
        self.metrics.rotations.labels("success").inc()
        self.metrics.svid_expiry.set(svid.not_after.timestamp())
        self.metrics.bundle_expiry.set(svid.bundle.earliest_expiry.timestamp())
        self._write_files(svid)
        self.has_svid.set()
        log.info(
            "SVID %s serial %s valid until %s; next renewal at %s",
            svid.spiffe_id,
            svid.serial,
            svid.not_after.isoformat(timespec="seconds"),
            self.next_renewal.isoformat(timespec="seconds"),
        )

    async def _pause(self, seconds: float) -> bool:
        """Wait `seconds`, or less if renew_now() is called: True if it was."""
        try:
            await asyncio.wait_for(self._wake.wait(), max(seconds, 0))
        except TimeoutError:
            return False
        return True

    async def _pause_until(self, when: datetime) -> None:
        """Wait until the wall clock says `when`, or renew_now()."""
        while (left := (when - self.now()).total_seconds()) > 0:
            if await self._pause(min(left, RECHECK_SECONDS)):
                return

    def _standing(self) -> str:
        if self.svid is None:
            return "no SVID yet"
        if self.now() >= self.svid.not_after:
            return f"the SVID expired at {self.svid.not_after.isoformat(timespec='seconds')}"
        return f"serving the current SVID until {self.svid.not_after.isoformat(timespec='seconds')}"

    def _token(self) -> str:
        path = self.config.identity.token_file
        try:
            token = path.read_text().strip()
        except OSError as exc:
            raise RenewalFailed("no_credential", f"cannot read the token {path}: {exc}") from None
        if not token:
            raise RenewalFailed("no_credential", f"the token file {path} is empty")
        return token

    def _trusted_pem(self) -> bytes:
        """The bundle file (a ConfigMap may update it) plus the bundle the CA last sent."""
        path = self.config.ca.bundle_file
        try:
            from_file = path.read_bytes()
            from_file.decode()  # PEM: a DER file would fail later with UnicodeDecodeError
        except (OSError, UnicodeDecodeError) as exc:
            if self.svid is None:
                raise RenewalFailed("no_credential", f"cannot read {path} as PEM: {exc}") from None
            from_file = b""
        return from_file + (self.svid.bundle.to_pem() if self.svid else b"")

    async def _sign_with_ca(
        self, csr: bytes, trusted: bytes, svid: Svid | None, token: str | None
    ) -> ca_pb2.SignResponse:
        ca = self.config.ca
        tls = (
            tls_context(trusted, svid.chain_pem(), svid.key_pem()) if svid else tls_context(trusted)
        )
        ttl = int(self.config.identity.ttl.total_seconds())
        async with CaClient(ca.host, ca.port, tls, ca.server_name) as client:
            return await client.sign(
                csr, token=token, ttl_seconds=ttl, deadline=ca.timeout.total_seconds()
            )

    def _write_files(self, svid: Svid) -> None:
        directory = self.config.identity.output_dir
        if directory is None:
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
            write_atomic(directory / "svid.key", svid.key_pem(), PRIVATE)
            write_atomic(directory / "svid.pem", svid.chain_pem())
            write_atomic(directory / "bundle.pem", svid.bundle.to_pem())
        except OSError as exc:
            log.error("cannot write the SVID to %s (keeping the files there): %s", directory, exc)

    def install_bundle(self, bundle: TrustBundle) -> None:
        """Verify peers against `bundle` from now on, still presenting the SVID in use.

        New contexts: new connections verify against `bundle` at once, pooled
        ones made under the old contexts are retired, open ones keep theirs.
        If the SVID's own chain no longer leads to `bundle`, renew now.
        """
        if self.svid is None:
            return
        svid = dataclasses.replace(self.svid, bundle=bundle)
        server, client, http = server_context(svid), client_context(svid), http_server_context(svid)
        self.contexts.server, self.contexts.client, self.contexts.http_server = server, client, http
        self.svid = svid
        self.metrics.bundle_expiry.set(bundle.earliest_expiry.timestamp())
        try:
            check_chain(svid.chain, bundle)
        except ChainError:
            log.warning("the SVID in use does not lead to the new trust bundle; renewing now")
            self.renew_now()
