"""TLS contexts from the current SVID, and the checks on a peer after the handshake.

OpenSSL verifies the chain against the trust bundle (strict X.509, name
constraints if a CA carries them, and the certificate's purpose) during the
handshake; stdlib ssl cannot match a URI SAN, so the SPIFFE ID is checked
right after, before a byte is relayed. The bundle holds the roots of one
trust domain, the agent's own, so a peer's ID must be in that trust domain:
a root vouches for its own domain's IDs only, whatever names its
intermediates may sign (go-spiffe and Envoy's SPIFFE validator do the same).
Contexts are built anew for every SVID and bundle and never changed
afterwards: a connection keeps the context it started with, and a new one
picks up the new SVID.

TLS 1.3 session resumption between agents (`tls.resumption`, agent/core/resumption.py
says what makes it safe): a server context issues one stateless ticket per handshake,
sealed with the context's own random ticket keys, so a ticket is good only with the
contexts of the SVID and bundle it was issued under; the server contexts are built
again every `ticket_lifetime` (new keys), so no ticket is taken longer than that. A
client context keeps the sessions of its verified servers (`ResumingContext`) and
offers one to the same endpoint within the ticket's lifetime. A resumed handshake
skips OpenSSL's chain check, which was made with the same roots, never ours: the
leaf's SPIFFE ID, validity and the allow-list are checked on every connection,
resumed or not (the peer's certificate is in the session; without one the peer is
refused). With resumption off the server sends no tickets; a TLS 1.2 client can
still resume by session ID within one context (CPython sets a session ID context and
offers no way to turn the server cache off), under the same checks.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextvars import ContextVar, Token
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from agent.core.resumption import Resumption, SessionCache
from agent.core.svid import Svid
from identity import SpiffeId, SvidError, TrustDomain, check_leaf
from identity.appprotocol import H2, Protocol
from identity.cert import Cert
from identity.tlsfiles import load_cert_chain

# TLS 1.2 only for peers that cannot do 1.3: forward secrecy and AEAD only.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

#: Contexts that send no tickets and offer no sessions (the control plane's, tests').
NO_RESUMPTION = Resumption(resumption=False)

# OpenSSL's X509_V_ERR_* codes worth a label of their own.
_VERIFY_REASONS = {
    2: "unknown_ca",  # unable to get issuer certificate
    9: "not_yet_valid",
    10: "expired",
    18: "unknown_ca",  # self-signed leaf
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",
    26: "wrong_usage",  # invalid purpose: the EKU does not allow this role
    47: "name_constraints",
}
_ALERT_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_client_cert",
    "CERTIFICATE_REQUIRED": "no_client_cert",
    "WRONG_VERSION_NUMBER": "not_tls",
    "HTTP_REQUEST": "not_tls",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "UNSUPPORTED_PROTOCOL": "protocol_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "protocol_version",
}


class Contexts:
    """The TLS contexts of the SVID in use, one per side and port protocol; all replaced at
    once on every rotation.

    ALPN says how a port's bytes are read: a `tcp` port offers h2 and http/1.1 (relayed as
    bytes either way); an `http` port offers both too, and parses both: an h2 peer's
    streams are each decided like an HTTP/1.1 request and sent to the app as one
    (agent/adapters/inbound_h2h1.py), a peer that picks http/1.1 or no ALPN speaks
    HTTP/1.1; an `http2` or `grpc` port offers only h2 (CPython's server goes on without
    ALPN when nothing overlaps, so the listener refuses a connection on such a port whose
    ALPN is not h2). Clients offer h2 only to `http2|grpc` upstreams, and no ALPN to the
    others: HTTP/1.1 from the app goes between agents as HTTP/1.1.
    """

    server: ssl.SSLContext | None = None  # `protocol: tcp|http` inbounds: h2, http/1.1
    h2_server: ssl.SSLContext | None = None  # `protocol: http2|grpc` inbounds: h2 only
    client: ssl.SSLContext | None = None
    h2_client: ssl.SSLContext | None = None  # to `http2|grpc` upstreams: offers h2 only
    #: What the server contexts are built of again when their ticket keys are due.
    svid: Svid | None = None
    resumption: Resumption = NO_RESUMPTION
    #: When the server contexts' ticket keys are due (`clock`'s time), None: no tickets.
    tickets_until: float | None = None
    clock: Callable[[], float] = staticmethod(time.monotonic)

    @classmethod
    def of(cls, svid: Svid, resumption: Resumption = NO_RESUMPTION) -> Contexts:
        """Every context for `svid`; ssl.SSLError if ssl cannot use it."""
        contexts = cls()
        contexts.svid, contexts.resumption = svid, resumption
        contexts._new_servers()
        contexts.client = _context(svid, "client", resumption=resumption)
        contexts.h2_client = _context(svid, "client", alpn=("h2",), resumption=resumption)
        return contexts

    def _new_servers(self) -> None:
        """Server contexts, with new ticket keys when resumption is on."""
        svid, resumption = self.svid, self.resumption
        assert svid is not None, "built by Contexts.of"
        self.server = _context(svid, "server", alpn=("h2", "http/1.1"), resumption=resumption)
        self.h2_server = _context(svid, "server", alpn=("h2",), resumption=resumption)
        if resumption.resumption:
            self.tickets_until = self.clock() + resumption.ticket_lifetime.total_seconds()

    def use(self, new: Contexts) -> None:
        """New connections take `new`'s contexts from now on (all of them at once)."""
        self.server, self.h2_server = new.server, new.h2_server
        self.client, self.h2_client = new.client, new.h2_client
        self.svid, self.resumption, self.tickets_until = new.svid, new.resumption, new.tickets_until

    def server_for(self, protocol: Protocol) -> ssl.SSLContext | None:
        """The server context of an inbound port of `protocol` (new ticket keys when the
        last ones have been issuing tickets for `ticket_lifetime`)."""
        if self.tickets_until is not None and self.clock() >= self.tickets_until:
            self._new_servers()
        return self.h2_server if protocol in H2 else self.server

    def client_for(self, protocol: Protocol) -> ssl.SSLContext | None:
        """The client context to an upstream of `protocol`."""
        return self.h2_client if protocol in H2 else self.client


#: Set around a dial's `create_connection`: the cache the connection's session goes to
#: once its server is verified, the endpoint, and the session to offer (asyncio and
#: uvloop wrap the connection in the dialling task's context: `ResumingContext.wrap_bio`).
_Dialling = tuple[SessionCache[ssl.SSLSession], object, ssl.SSLSession | None]
_DIALLING: ContextVar[_Dialling] = ContextVar("outrider_dialling")


class _AgentObject(ssl.SSLObject):
    """A connection of the agent's data plane, whose peer is checked from its DER
    (`peer_id`): the event loop's TLS transport reads `getpeercert()` once per handshake
    for its `peercert` extra info, and CPython decodes the whole certificate into a dict
    for it (~11 µs a connection, a side), which nothing here reads. It is decoded when
    first read instead (`_PeerCert`); OpenSSL's checks and the agent's are unchanged."""

    def getpeercert(self, binary_form: bool = False) -> Any:
        if binary_form:
            return super().getpeercert(True)
        # ValueError before the handshake, as ever; None without a certificate, as ever.
        return None if super().getpeercert(True) is None else _PeerCert(self)


class _PeerCert(Mapping[str, Any]):
    """`ssl.SSLObject.getpeercert()` of a connection whose peer sent a certificate,
    decoded on first use ({} if it was not verified, as CPython gives with CERT_NONE)."""

    __slots__ = ("_decoded", "_ssl_object")

    def __init__(self, ssl_object: ssl.SSLObject) -> None:
        self._ssl_object: ssl.SSLObject | None = ssl_object
        self._decoded: dict[str, Any] = {}

    def _cert(self) -> dict[str, Any]:
        ssl_object = self._ssl_object
        if ssl_object is not None:
            self._decoded = dict(ssl.SSLObject.getpeercert(ssl_object) or {})
            self._ssl_object = None
        return self._decoded

    def __getitem__(self, key: str) -> Any:
        return self._cert()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._cert())

    def __len__(self) -> int:
        return len(self._cert())

    def __repr__(self) -> str:
        return repr(self._cert())


class _ResumableObject(_AgentObject):
    """A client connection of a `ResumingContext`: once its server is verified (`kept`),
    its latest session is saved for the next dial when the connection is freed (a TLS 1.3
    ticket comes after the handshake, with the first bytes the server sends)."""

    cache: SessionCache[ssl.SSLSession] | None = None
    endpoint: object = None
    peer: SpiffeId | None = None

    def __del__(self) -> None:
        cache, peer = self.cache, self.peer
        if cache is None or peer is None:
            return
        try:
            if self.session_reused and not cache.wants(self.endpoint, time.time()):
                return  # the saved session serves on: see SessionCache.wants
            session = self.session
            if session is not None and session.has_ticket and self.version() == "TLSv1.3":
                cache.save(self.endpoint, peer, session, float(session.time))
        except (AttributeError, ValueError, ssl.SSLError):  # not saved: a full one next time
            pass


class ResumingContext(ssl.SSLContext):
    """A client context that offers a saved session to the endpoint it came from."""

    sslobject_class = _ResumableObject
    sessions: SessionCache[ssl.SSLSession]

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        dialling = _DIALLING.get(None)
        if dialling is None or server_side or dialling[0] is not self.sessions:
            return super().wrap_bio(incoming, outgoing, server_side, server_hostname, session)
        cache, endpoint, offered = dialling
        ssl_object = super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session or offered
        )
        assert isinstance(ssl_object, _ResumableObject)
        ssl_object.cache, ssl_object.endpoint = cache, endpoint
        return ssl_object


class dialling:  # (lower case: a context manager used as a function is)
    """Around the `create_connection` of a dial to `endpoint`: offer its saved session,
    if `context` resumes and one is fresh for a server of `server_ids`.

    A class, not a @contextmanager generator: every dial enters one, and a generator's
    frame and its two trips cost more than the offer itself."""

    __slots__ = ("_context", "_endpoint", "_server_ids", "_token")

    def __init__(
        self, context: ssl.SSLContext, endpoint: object, server_ids: Collection[SpiffeId]
    ) -> None:
        self._context, self._endpoint, self._server_ids = context, endpoint, server_ids
        self._token: Token[_Dialling] | None = None

    def __enter__(self) -> None:
        context = self._context
        if isinstance(context, ResumingContext):
            cache, endpoint = context.sessions, self._endpoint
            offered = cache.offer(endpoint, self._server_ids, time.time())
            self._token = _DIALLING.set((cache, endpoint, offered))

    def __exit__(self, *exc_info: object) -> None:
        token = self._token
        if token is not None:
            self._token = None
            _DIALLING.reset(token)


def kept(ssl_object: ssl.SSLObject, peer: SpiffeId) -> None:
    """`ssl_object`'s server passed every check as `peer`: its session may be saved."""
    if isinstance(ssl_object, _ResumableObject):
        ssl_object.peer = peer


def _context(
    svid: Svid,
    side: Literal["server", "client"],
    alpn: tuple[str, ...] = (),
    resumption: Resumption = NO_RESUMPTION,
    agents: bool = True,
) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT
    resuming = resumption.resumption
    context = _resuming_client(resumption) if resuming and side == "client" else None
    context = context or ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    if not resuming:
        context.options |= ssl.OP_NO_TICKET
    context.check_hostname = False  # SPIFFE names are URI SANs, checked after the handshake
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=svid.bundle.to_pem().decode())
    load_cert_chain(context, svid.chain_pem(), svid.key_pem())
    if side == "server":
        # TLS 1.3: one stateless ticket per handshake when resuming (the server keeps no
        # session: the ticket holds it, sealed with this context's keys), else none.
        context.num_tickets = 1 if resuming else 0
    if alpn:
        context.set_alpn_protocols(list(alpn))  # what the port speaks: see Contexts
    if agents and not isinstance(context, ResumingContext):  # (that one's are already)
        context.sslobject_class = _AgentObject
    return context


def _resuming_client(resumption: Resumption) -> ssl.SSLContext:
    context = ResumingContext(ssl.PROTOCOL_TLS_CLIENT)
    context.sessions = SessionCache(resumption.ticket_lifetime)
    return context


def control_plane_context(svid: Svid) -> ssl.SSLContext:
    """To the control plane: present the SVID, verify its chain against the bundle, speak h2
    (gRPC); the SPIFFE ID is checked after the handshake, as every peer's is."""
    # Not an agent's: grpclib reads the peer's certificate as getpeercert()'s dict.
    return _context(svid, "client", alpn=("h2",), agents=False)


def peer_id(
    ssl_object: ssl.SSLObject,
    usage: Literal["client", "server"],
    now: datetime,
    trust_domain: TrustDomain,
) -> SpiffeId:
    """The peer's SPIFFE ID from its verified leaf; SvidError if it is not an SVID
    of `trust_domain`, the one whose bundle verified the chain.

    The SVID rules depend only on the certificate and the time, so an accepted
    leaf is remembered by its DER with its validity window: the next connection
    from the same peer skips parsing it (a tenth of the agent's time per new
    connection). OpenSSL still verifies the chain in every handshake.
    """
    der = ssl_object.getpeercert(binary_form=True)
    if der is None:  # CERT_REQUIRED makes this unreachable; refuse rather than assume
        raise SvidError("no_uri_san", "the peer presented no certificate")
    known = _ACCEPTED.get((der, usage))
    if known is not None and known[1] <= now < known[2]:
        spiffe_id = known[0]
    else:
        try:
            cert = Cert.from_der(der)
        except ValueError as exc:  # verified by OpenSSL, yet a field holds no valid value
            raise SvidError("malformed_extensions", f"unreadable certificate: {exc}") from None
        spiffe_id = check_leaf(cert, usage=usage, now=now)
        if len(_ACCEPTED) >= _ACCEPTED_MAX:
            _ACCEPTED.clear()
        _ACCEPTED[der, usage] = (spiffe_id, cert.not_before, cert.not_after)
    if not spiffe_id.member_of(trust_domain):
        raise SvidError(
            "foreign_trust_domain", f"{spiffe_id} is not in trust domain {trust_domain}"
        )
    return spiffe_id


# Peers' accepted leaves: (DER, usage) -> (SPIFFE ID, not before, not after).
_ACCEPTED: dict[tuple[bytes, str], tuple[SpiffeId, datetime, datetime]] = {}
_ACCEPTED_MAX = 4096


def refusal_reason(exc: BaseException) -> str:
    """A bounded label for why a handshake failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_REASONS.get(getattr(exc, "verify_code", 0), "bad_certificate")
    if isinstance(exc, ssl.SSLError):
        reason = str(getattr(exc, "reason", None) or "")
        if reason in _ALERT_REASONS:
            return _ALERT_REASONS[reason]
        return "peer_alert" if "ALERT" in reason else "handshake_error"
    if isinstance(exc, TimeoutError) or "taking longer" in str(exc):
        return "timeout"
    if isinstance(exc, ConnectionError | EOFError):
        return "connection_reset"
    return "handshake_error"


#: OpenSSL's verify codes: the CA's certificate names another host, or chains to a root
#: the agent does not trust.
_NAME_MISMATCH = {62, 64}  # hostname mismatch, IP address mismatch
_UNTRUSTED = {2, 18, 19, 20, 21}  # no issuer, self-signed, unable to get local issuer


def unreachable(exc: BaseException, server_name: str, bundle_file: Path) -> str:
    """Why the CA could not be reached, with what to change when the agent's config is
    the cause: OpenSSL's `IP address mismatch` or `unable to get local issuer
    certificate` alone names neither the setting nor the file."""
    code = exc.verify_code if isinstance(exc, ssl.SSLCertVerificationError) else None
    said = exc.verify_message if isinstance(exc, ssl.SSLCertVerificationError) else repr(exc)
    if code in _NAME_MISMATCH:
        return (
            f"the CA's certificate is not valid for {server_name!r} ({said}): set "
            "ca.server_name to a name in the CA's serving certificate (its serving_cert.names; "
            "outrider-ca.outrider-system.svc in a cluster), or add that name there; "
            "ca.server_name defaults to the host of ca.address, an IP address when it is one"
        )
    if code in _UNTRUSTED:
        return (
            f"the CA's certificate does not chain to a root in ca.bundle_file {bundle_file} "
            f"({said}): point ca.bundle_file at this CA's trust bundle (bundle.pem of "
            "`outrider ca init`, or the outrider-trust-bundle ConfigMap in a cluster)"
        )
    if isinstance(exc, ssl.SSLError) and exc.reason == "WRONG_VERSION_NUMBER":
        return (
            f"what answers at ca.address does not speak TLS ({said}): is it the CA's HTTP"
            " port? Sign is served on its gRPC port (8443; listen.grpc of ca.yaml)"
        )
    return said
