"""The identity manager: get an SVID from the CA, keep it fresh, never go without.

Every renewal makes a new P-256 key in memory and sends a CSR: with the
current SVID as the TLS client certificate while it is valid, otherwise with
the projected ServiceAccount token, read from its file each time (the
kubelet rotates it). With `identity.svid_file` the first SVID comes from
files instead (`outrider ca mint`, or the agent's own output_dir), so an
agent starts without a token. The answer is checked before use. When to
renew, how to back off while the CA cannot be reached (keeping the current
SVID until it expires) and how fast to retry once it has expired are
`identity.renewal`'s decisions, shared with every other credential Outrider
keeps fresh.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING

from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from agent.adapters.metrics import AgentMetrics
from agent.adapters.tls import Contexts, unreachable
from agent.config import AgentConfig
from agent.core.svid import Svid, SvidRejected, accept_svid, svid_from_pem
from identity import BundleError, TrustBundle
from identity.cert import Cert, PrivateKey
from identity.chain import ChainError, check_chain
from identity.files import PRIVATE, PUBLIC, write_set
from identity.renewal import Clock, RenewalPolicy, Renewer, SystemClock, Validity
from identity.throttle import LogThrottle, held_back

if TYPE_CHECKING:
    from identity.proto import ca_pb2

log = logging.getLogger("outrider.agent.identity")

#: Sends one CSR: (csr, trusted bundle PEM, current SVID or None, token or None).
SignFn = Callable[[bytes, bytes, Svid | None, str | None], Awaitable["ca_pb2.SignResponse"]]

_UNAUTHORIZED = {Status.UNAUTHENTICATED, Status.PERMISSION_DENIED}
#: How a CA that refuses the client certificate shows: under TLS 1.3 the client's
#: handshake completes first, so the refusal arrives as an alert or a lost connection.
_HANDSHAKE_REFUSED = (OSError, StreamTerminatedError, ProtocolError)


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
        clock: Clock | None = None,
    ) -> None:
        self.config = config
        self.contexts = contexts
        self.metrics = metrics
        self.now = now
        self.rng = rng
        self.sign = sign or self._sign_with_ca
        self.svid: Svid | None = None  # its bundle: the roots peers are verified against
        self.ca_bundle: TrustBundle | None = None  # the bundle the CA sent with it
        #: The roots to verify peers against, given the CA's bundle (`BundleSync.peer_roots`).
        self.peer_roots: Callable[[TrustBundle], TrustBundle] = lambda bundle: bundle
        self.has_svid = asyncio.Event()
        self._files_tried = False  # identity.svid_file is read once, before the first CSR
        #: Called after every change of the SVID or of its roots: what holds a connection
        #: made with the old ones (the control-plane stream) makes a new one.
        self.changed: list[Callable[[], None]] = []
        self._failures = 0  # failed renewals since the last that worked
        self._lines = LogThrottle(interval=60.0)  # what a long CA outage would repeat
        self.renewal = Renewer(
            "the SVID",
            self._renew_and_install,
            clock=clock or SystemClock(now),
            rng=rng,
            policy=RenewalPolicy(config.ca.backoff),
            on_failure=self._failed,
            on_expired=self.expired,
        )

    @property
    def next_renewal(self) -> datetime | None:
        return self.renewal.next_attempt

    def renew_now(self) -> None:
        """Cut the current wait short (a reload changed the identity or the CA)."""
        self.renewal.renew_now()

    async def run(self) -> None:
        await self.renewal.run()

    async def _renew_and_install(self) -> Validity:
        try:
            svid = await self.renew()
        except RenewalFailed:
            raise
        except Exception as exc:  # the loop must outlive a bug, or the SVID runs out unseen
            log.exception("SVID renewal: unexpected error")
            raise RenewalFailed("ca_unavailable", repr(exc)) from None
        self.install(svid)
        if self._failures:
            log.info("SVID renewed after %d failed attempt(s)", self._failures)
            self._failures = 0
            self._lines = LogThrottle(interval=60.0)  # the next outage is said at once
        return Validity(svid.not_before, svid.not_after)

    def _failed(self, exc: Exception, failures: int, retry_in: float) -> None:
        """Counted every time; said at most once a minute (a CA down for an hour is
        retried every second or two once the SVID has expired), with how many attempts
        the line stands for, and once more when a renewal works again."""
        result = exc.result if isinstance(exc, RenewalFailed) else "bad_answer"
        self.metrics.rotations.labels(result).inc()
        self.metrics.ca_backoff.set(retry_in)
        self._failures = failures
        held = self._lines.admit(("failed", result), time.monotonic())  # a new cause: said
        if held is not None:
            log.warning(
                "SVID renewal failed (%s, attempt %d): %s; retrying in %.1fs; %s%s",
                result,
                failures,
                exc,
                retry_in,
                self._standing(),
                held_back(held),
            )

    def expired(self) -> None:
        """Once the SVID has expired, no pooled connection may carry traffic on it.

        Pools close the connections made under any context but the current one
        (at once when a connection is taken, within a second when idle), as they
        do after every rotation: a fresh context for the expired SVID retires them
        all. New connections still present it, and peers refuse them. (A worker of
        `workers:` calls it at the NotAfter of the SVID the main process sent.)
        """
        if self.svid is not None:
            fresh = Contexts.of(self.svid, self.config.tls)
            self.contexts.client, self.contexts.h2_client = fresh.client, fresh.h2_client
            log.warning("the SVID expired: closing pooled connections made with it")

    async def renew(self) -> Svid:
        """One CSR to the CA (or, the first time, identity.svid_file); the checked SVID,
        or RenewalFailed."""
        if not self._files_tried:
            self._files_tried = True
            if (from_files := self._from_files()) is not None:
                return from_files
        key = PrivateKey.generate_p256()
        csr = key.csr()
        trusted = self._trusted_pem()
        current = self._presentable()
        try:
            if current is not None:
                try:
                    response = await self.sign(csr, trusted, current, None)
                except (GRPCError, *_HANDSHAKE_REFUSED) as exc:
                    if isinstance(exc, GRPCError) and exc.status not in _UNAUTHORIZED:
                        raise
                    if isinstance(exc, ConnectionRefusedError | TimeoutError):
                        raise  # nothing listens, or it hangs: the token would not get further
                    try:
                        token = self._token()
                    except RenewalFailed:
                        raise exc from None  # no token to fall back on: this failure stands
                    held = self._lines.admit("fallback", time.monotonic())
                    if held is not None:
                        log.warning(
                            "renewal with the current SVID failed (%r); using the token%s",
                            exc,
                            held_back(held),
                        )
                    response = await self.sign(csr, trusted, None, token)
            else:
                response = await self.sign(csr, trusted, None, self._token())
        except GRPCError as exc:
            retriable = exc.status in {Status.UNAVAILABLE, Status.DEADLINE_EXCEEDED}
            result = "ca_unavailable" if retriable else "refused"
            raise RenewalFailed(result, f"CA answered {exc.status.name}: {exc.message}") from None
        except (OSError, TimeoutError, StreamTerminatedError, ProtocolError) as exc:
            # StreamTerminatedError: the connection to the CA dropped mid-call (a CA restart).
            ca = self.config.ca
            why = unreachable(exc, ca.server_name, ca.bundle_file)
            raise RenewalFailed("ca_unavailable", f"cannot reach the CA: {why}") from None
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

    def _from_files(self) -> Svid | None:
        """identity.svid_file and key_file, if set and usable now; else None, said why."""
        identity = self.config.identity
        if identity.svid_file is None or identity.key_file is None:
            return None
        try:
            svid = svid_from_pem(
                identity.svid_file.read_bytes(),
                identity.key_file.read_bytes(),
                self._trusted_pem(),
                identity.spiffe_id,
                self.now(),
            )
        except (OSError, SvidRejected, RenewalFailed) as exc:
            log.warning(
                "cannot start from svid_file %s and key_file %s (%s); asking the CA with the"
                " token %s",
                identity.svid_file,
                identity.key_file,
                exc,
                identity.token_file,
            )
            return None
        log.info("starting from the SVID in %s", identity.svid_file)
        return svid

    def _presentable(self) -> Svid | None:
        """The SVID to renew with: valid now and chaining to the roots trusted now.

        One whose root was removed (`install_bundle`) would be refused in the
        CA's handshake on every try until it expired; the token is the way back.
        """
        svid = self.svid
        if svid is None or self.now() >= svid.not_after:
            return None
        try:
            check_chain(svid.chain, svid.bundle)
        except ChainError:
            return None
        return svid

    def install(self, svid: Svid) -> None:
        """Put `svid` in service: new connections use it from now on, verifying peers
        against `peer_roots` of the CA's bundle, never for a moment the CA's alone.
        RenewalFailed if those leave no root, or none the new chain leads to: a CA's
        answer cannot bring a root the agent does not trust already."""
        ca_bundle = svid.bundle
        try:
            roots = self.peer_roots(ca_bundle)
            check_chain(svid.chain, roots)
        except BundleError as exc:
            raise RenewalFailed("bad_answer", f"refused the CA's answer: {exc}") from None
        except ChainError as exc:
            raise RenewalFailed(
                "bad_answer",
                f"refused the CA's answer: its SVID does not lead to a root trusted now ({exc})",
            ) from None
        self.use(dataclasses.replace(svid, bundle=roots), ca_bundle)

    def use(self, svid: Svid, ca_bundle: TrustBundle | None = None) -> None:
        """Put `svid` in service as it is, its bundle the roots peers are verified against:
        checked already, by `install` here or in the main process (a worker takes the
        main's SVID with the roots it chose, `ca_bundle` then unknown: the same)."""
        try:
            contexts = Contexts.of(svid, self.config.tls)
        except ssl.SSLError as exc:
            raise RenewalFailed("bad_answer", f"ssl cannot use the new SVID: {exc}") from None
        self.contexts.use(contexts)
        self.svid, self.ca_bundle = svid, ca_bundle or svid.bundle
        self.metrics.rotations.labels("success").inc()
        self.metrics.svid_installed(svid)
        self.metrics.bundle_expiry.set(svid.bundle.earliest_expiry.timestamp())
        self.metrics.ca_backoff.set(0)
        self._write_files(svid)
        self.has_svid.set()
        self._tell_changed()
        log.info(
            "SVID %s serial %s valid until %s",
            svid.spiffe_id,
            svid.serial,
            svid.not_after.isoformat(timespec="seconds"),
        )

    def reconfigured(self) -> None:
        """A reload may have changed `tls`: new contexts then (the ticket keys and saved
        sessions go with the old ones)."""
        if self.svid is not None and self.contexts.resumption != self.config.tls:
            self.contexts.use(Contexts.of(self.svid, self.config.tls))

    def _tell_changed(self) -> None:
        for callback in self.changed:
            callback()

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
        """The bundle file (a ConfigMap may update it) plus the bundle the CA last sent.

        Read as certificates and encoded again, never joined as text: a file
        without a final newline (`vault read -field=certificate ...`) would run
        its last line into the next certificate.
        """
        path = self.config.ca.bundle_file
        try:
            data = path.read_bytes()
            if self.svid is None:  # the first SVID's roots come from it: a bundle, or none
                TrustBundle.from_pem(self.config.identity.spiffe_id.trust_domain, data)
            from_file = Cert.all_from_pem(data)
        except BundleError as exc:
            raise RenewalFailed(
                "no_credential",
                f"{path} is not a trust bundle ({exc}): ca.bundle_file must hold the trust"
                " domain's CA certificates only",
            ) from None
        except (OSError, ValueError) as exc:
            if self.svid is None:
                raise RenewalFailed("no_credential", f"cannot read {path} as PEM: {exc}") from None
            log.warning("cannot read %s as PEM (%s); trusting the CA's last bundle", path, exc)
            from_file = []
        sent = list(self.svid.bundle.roots) if self.svid else []
        return b"".join(cert.to_pem() for cert in dict.fromkeys([*from_file, *sent]))

    async def _sign_with_ca(
        self, csr: bytes, trusted: bytes, svid: Svid | None, token: str | None
    ) -> ca_pb2.SignResponse:
        # gRPC's client and the CA's protos load with the first CA call (an agent whose
        # identity comes from files never makes one).
        from agent.adapters.ca_client import CaClient, tls_context

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
        files = {
            "svid.key": (svid.key_pem(), PRIVATE),
            "svid.pem": (svid.chain_pem(), PUBLIC),
            "bundle.pem": (svid.bundle.to_pem(), PUBLIC),
        }
        try:
            write_set(directory, files)
        except OSError as exc:
            log.error("cannot write the SVID to %s (the previous set stays): %s", directory, exc)

    def install_bundle(self, bundle: TrustBundle) -> None:
        """Verify peers against `bundle` from now on, still presenting the SVID in use.

        New contexts: new connections verify against `bundle` at once, pooled
        ones made under the old contexts are retired, open ones keep theirs;
        output_dir gets the new set.
        If the SVID's own chain no longer leads to `bundle`, renew now.
        """
        if self.svid is None:
            return
        svid = dataclasses.replace(self.svid, bundle=bundle)
        self.contexts.use(Contexts.of(svid, self.config.tls))
        self.svid = svid
        self.metrics.bundle_expiry.set(bundle.earliest_expiry.timestamp())
        self._write_files(svid)  # an app reading output_dir verifies its peers by it too
        self._tell_changed()
        try:
            check_chain(svid.chain, bundle)
        except ChainError:
            log.warning("the SVID in use does not lead to the new trust bundle; renewing now")
            self.renew_now()
