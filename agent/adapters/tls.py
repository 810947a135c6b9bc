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
picks up the new SVID. Session tickets are off; a TLS 1.2
client can still resume by session ID within one context (CPython sets a
session ID context and offers no way to turn the server cache off), which
skips OpenSSL's chain check but not ours: the leaf's SPIFFE ID, validity and
the allow-list are checked on every connection, resumed or not. A new context
starts with an empty session cache, so a rotation or bundle change
invalidates every session that came before it.
"""

from __future__ import annotations

import ssl
from datetime import datetime
from pathlib import Path
from typing import Literal

from cryptography import x509

from agent.core.svid import Svid
from identity import SpiffeId, SvidError, TrustDomain, check_leaf
from identity.appprotocol import H2, Protocol
from identity.tlsfiles import load_cert_chain

# TLS 1.2 only for peers that cannot do 1.3: forward secrecy and AEAD only.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"

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

    @classmethod
    def of(cls, svid: Svid) -> Contexts:
        """Every context for `svid`; ssl.SSLError if ssl cannot use it."""
        contexts = cls()
        contexts.server = _context(svid, "server", alpn=("h2", "http/1.1"))
        contexts.h2_server = _context(svid, "server", alpn=("h2",))
        contexts.client = _context(svid, "client")
        contexts.h2_client = _context(svid, "client", alpn=("h2",))
        return contexts

    def use(self, new: Contexts) -> None:
        """New connections take `new`'s contexts from now on (all of them at once)."""
        self.server, self.h2_server = new.server, new.h2_server
        self.client, self.h2_client = new.client, new.h2_client

    def server_for(self, protocol: Protocol) -> ssl.SSLContext | None:
        """The server context of an inbound port of `protocol`."""
        return self.h2_server if protocol in H2 else self.server

    def client_for(self, protocol: Protocol) -> ssl.SSLContext | None:
        """The client context to an upstream of `protocol`."""
        return self.h2_client if protocol in H2 else self.client


def _context(
    svid: Svid, side: Literal["server", "client"], alpn: tuple[str, ...] = ()
) -> ssl.SSLContext:
    protocol = ssl.PROTOCOL_TLS_SERVER if side == "server" else ssl.PROTOCOL_TLS_CLIENT
    context = ssl.SSLContext(protocol)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_TICKET | ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.check_hostname = False  # SPIFFE names are URI SANs, checked after the handshake
    context.verify_mode = ssl.CERT_REQUIRED
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.load_verify_locations(cadata=svid.bundle.to_pem().decode())
    load_cert_chain(context, svid.chain_pem(), svid.key_pem())
    if side == "server":
        context.num_tickets = 0  # TLS 1.3: no resumption tickets
    if alpn:
        context.set_alpn_protocols(list(alpn))  # what the port speaks: see Contexts
    return context


def control_plane_context(svid: Svid) -> ssl.SSLContext:
    """To the control plane: present the SVID, verify its chain against the bundle, speak h2
    (gRPC); the SPIFFE ID is checked after the handshake, as every peer's is."""
    return _context(svid, "client", alpn=("h2",))


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
        cert = x509.load_der_x509_certificate(der)
        spiffe_id = check_leaf(cert, usage=usage, now=now)
        if len(_ACCEPTED) >= _ACCEPTED_MAX:
            _ACCEPTED.clear()
        _ACCEPTED[der, usage] = (spiffe_id, cert.not_valid_before_utc, cert.not_valid_after_utc)
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
    return said
