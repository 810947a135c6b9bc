"""The Sign RPC: authenticate, check the CSR, issue, and account for every answer.
GetBundle: the current trust bundle, for agents to follow root changes."""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.serialization import Encoding
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ca.audit import ISSUED, AuditLog, AuditUnavailable
from ca.authn.callers import Authenticator, Caller
from ca.authn.kubernetes import AuthnError
from ca.core import csr
from ca.core.issuance import IssuanceError, IssuedSvid, TtlRejected
from ca.issuer import Issuer
from ca.metrics import CaMetrics
from ca.signers.base import SignerUnavailable
from identity import TrustBundle
from identity.proto import ca_pb2
from identity.proto.ca_grpc import CertificateAuthorityBase
from identity.throttle import LogThrottle, held_back

if TYPE_CHECKING:
    from grpclib.server import Stream

log = logging.getLogger("outrider.ca")


class Refusal(Exception):
    """A refused Sign call: the gRPC status, a bounded reason label, a human message.

    The caller sees `reason: message`, so scripts can match the label and
    people can read the rest.
    """

    def __init__(self, status: Status, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.status = status
        self.reason = reason


_CHECKER_DOWN = {"jwks_unavailable", "tokenreview_unavailable"}


def refusal_for(exc: Exception) -> Refusal | None:
    """Map a domain error to what the caller is told; None for a bug."""
    if isinstance(exc, AuthnError):
        # The checker being down judged nothing: the caller may retry.
        unchecked = exc.reason in _CHECKER_DOWN
        status = Status.UNAVAILABLE if unchecked else Status.UNAUTHENTICATED
        return Refusal(status, exc.reason, exc.message)
    if isinstance(exc, csr.CsrRejected):
        status = (
            Status.PERMISSION_DENIED
            if exc.reason == "identity_mismatch"
            else Status.INVALID_ARGUMENT
        )
        return Refusal(status, exc.reason, str(exc))
    if isinstance(exc, TtlRejected):
        return Refusal(Status.INVALID_ARGUMENT, "bad_ttl", str(exc))
    if isinstance(exc, SignerUnavailable):
        return Refusal(Status.UNAVAILABLE, exc.reason, str(exc))
    if isinstance(exc, IssuanceError):
        return Refusal(Status.INTERNAL, "validation_failed", "the CA refused its own certificate")
    if isinstance(exc, AuditUnavailable):
        return Refusal(Status.UNAVAILABLE, "audit_unavailable", str(exc))
    return None


class CertificateAuthorityService(CertificateAuthorityBase):
    def __init__(
        self, issuer: Issuer, authenticator: Authenticator, metrics: CaMetrics, audit: AuditLog
    ) -> None:
        self._issuer = issuer
        self._authenticator = authenticator
        self._metrics = metrics
        self._audit = audit
        self._bundle_answer: tuple[TrustBundle, ca_pb2.GetBundleResponse] | None = None
        #: What goes wrong in the CA itself is said once a while per kind, with what it
        #: stood for: any caller can repeat the call that met it, as fast as it likes.
        self._lines = LogThrottle()

    async def Sign(self, stream: Stream[ca_pb2.SignRequest, ca_pb2.SignResponse]) -> None:
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "empty request")
        caller: Caller | None = None
        try:
            caller = await self._authenticator.authenticate(
                _authorization(stream), _peer_certificate(stream)
            )
            parsed = csr.parse(request.csr)
            public_key = csr.check(parsed, caller.spiffe_id)
            started = time.perf_counter()
            issued = await self._issuer.issue(
                caller.spiffe_id, public_key, self._ttl(request), csr=parsed
            )
            self._metrics.sign_duration.observe(time.perf_counter() - started)
            # Recorded before it is sent: a certificate the log cannot account for is not
            # handed out (AuditUnavailable refuses the call instead).
            self._issued(issued, caller, _peer_address(stream))
        except Exception as exc:
            refusal = refusal_for(exc) or self._failed(exc)
            self._refused(refusal, caller, _peer_address(stream))
            raise GRPCError(refusal.status, str(refusal)) from None
        await stream.send_message(_response(issued))

    async def GetBundle(
        self, stream: Stream[ca_pb2.GetBundleRequest, ca_pb2.GetBundleResponse]
    ) -> None:
        """The current bundle to anyone who completed the TLS handshake: it is public.

        The answer is built once per bundle (a Vault signer changes it on
        renewal), so a caller costs one small write and nothing else.
        """
        await stream.recv_message()  # empty; nothing to read in it
        bundle = self._issuer.signer.bundle
        if self._bundle_answer is None or self._bundle_answer[0] is not bundle:
            answer = ca_pb2.GetBundleResponse(trust_bundle=bundle.to_der())
            self._bundle_answer = (bundle, answer)
        await stream.send_message(self._bundle_answer[1])

    def _ttl(self, request: ca_pb2.SignRequest) -> timedelta | None:
        if request.ttl_seconds < 0:
            raise TtlRejected(f"ttl_seconds {request.ttl_seconds} is negative")
        if request.ttl_seconds == 0:
            return None
        cap = self._issuer.policy.max_ttl.total_seconds()
        return timedelta(seconds=min(request.ttl_seconds, cap))

    def _failed(self, exc: Exception) -> Refusal:
        """A Sign the CA itself failed (a bug): INTERNAL, counted and audited as every
        answer is, and its traceback in the log once a while per kind."""
        self._say(type(exc).__name__, "a Sign call failed in the CA itself", exc)
        return Refusal(Status.INTERNAL, "internal", "the CA failed this call; its log says why")

    def _say(self, kind: str, message: str, exc: Exception | None = None) -> None:
        held = self._lines.admit(kind, time.monotonic())
        if held is not None:
            log.error("%s%s", message, held_back(held), exc_info=exc)

    def _refused(self, refusal: Refusal, caller: Caller | None, peer: str | None) -> None:
        self._metrics.csr.labels("refused", refusal.reason).inc()
        if refusal.status is Status.UNAUTHENTICATED:
            self._metrics.authn_failures.labels(refusal.reason).inc()
        try:
            self._audit.record(
                result="refused",
                reason=str(refusal),
                caller=caller.subject if caller else None,
                peer=peer,
                pod=caller.pod if caller else None,
                spiffe_id=str(caller.spiffe_id) if caller else None,
            )
        except AuditUnavailable as exc:  # the refusal stands; the CA's log says what is lost
            self._say(
                "audit", f"{exc}: refusals go unrecorded, and each call is refused, while it lasts"
            )

    def _issued(self, issued: IssuedSvid, caller: Caller, peer: str | None) -> None:
        leaf = issued.leaf
        backdated = leaf.not_valid_before_utc + self._issuer.policy.backdate
        self._audit.record(
            result=ISSUED,
            reason=caller.credential,
            caller=caller.subject,
            peer=peer,
            pod=caller.pod,
            spiffe_id=str(caller.spiffe_id),
            serial=leaf.serial_number,
            not_after=leaf.not_valid_after_utc,
        )
        self._metrics.csr.labels("issued", caller.credential).inc()
        self._metrics.issued_ttl.observe((leaf.not_valid_after_utc - backdated).total_seconds())


def _response(issued: IssuedSvid) -> ca_pb2.SignResponse:
    return ca_pb2.SignResponse(
        cert_chain=[cert.public_bytes(Encoding.DER) for cert in issued.chain],
        trust_bundle=issued.bundle.to_der(),
        not_after=int(issued.leaf.not_valid_after_utc.timestamp()),
        spiffe_id=str(issued.spiffe_id),
    )


def _authorization(stream: Stream[ca_pb2.SignRequest, ca_pb2.SignResponse]) -> str | None:
    values = stream.metadata.getall("authorization", []) if stream.metadata else []
    if len(values) > 1:
        raise AuthnError("malformed", "send one authorization value, not several")
    return str(values[0]) if values else None


def _peer_address(stream: Stream[ca_pb2.SignRequest, ca_pb2.SignResponse]) -> str | None:
    address = stream.peer.addr()
    return None if address is None else f"{address[0]}:{address[1]}"


def _peer_certificate(stream: Stream[ca_pb2.SignRequest, ca_pb2.SignResponse]) -> bytes | None:
    """The DER client certificate OpenSSL verified against the bundle, if one was sent.

    grpclib's Peer exposes only the decoded dict; the DER is on its transport.
    """
    ssl_object = stream.peer._transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    der: bytes | None = ssl_object.getpeercert(binary_form=True)
    return der
