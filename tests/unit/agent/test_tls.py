"""TLS: a bounded label for every handshake failure, contexts that refuse to resume, and
the peer check that remembers accepted leaves no longer than they are valid."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import cast

import pytest

from agent.adapters import tls
from agent.adapters.tls import Contexts, peer_id, refusal_reason
from agent.core.svid import Svid
from ca.signers.local import LocalSigner
from identity import SpiffeId, SvidError, TrustDomain
from identity.appprotocol import Protocol
from tests.unit.agent.pki import (
    NOW,
    WEB,
    der,
    in_memory,
    make_signer,
    new_key,
    sign_leaf,
    svid_now,
)

TD = WEB.trust_domain
API = SpiffeId.for_workload(TD, "shop", "api")


def verify_error(code: int) -> ssl.SSLCertVerificationError:
    exc = ssl.SSLCertVerificationError(
        1, "[SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )
    exc.verify_code = code
    return exc


def ssl_error(reason: str | None) -> ssl.SSLError:
    """An SSLError as the ssl module raises it: OpenSSL's reason code, or None when it has none."""
    exc = ssl.SSLError(1, f"[SSL: {reason}] {reason}")
    exc.reason = reason  # type: ignore[assignment]  # typeshed says str; the C code can set None
    return exc


REASONS = [
    pytest.param(verify_error(2), "unknown_ca", id="unable-to-get-issuer"),
    pytest.param(verify_error(9), "not_yet_valid", id="not-yet-valid"),
    pytest.param(verify_error(10), "expired", id="expired"),
    pytest.param(verify_error(18), "unknown_ca", id="self-signed-leaf"),
    pytest.param(verify_error(19), "unknown_ca", id="self-signed-in-chain"),
    pytest.param(verify_error(20), "unknown_ca", id="no-local-issuer"),
    pytest.param(verify_error(21), "unknown_ca", id="leaf-signature"),
    pytest.param(verify_error(26), "wrong_usage", id="invalid-purpose"),
    pytest.param(verify_error(47), "name_constraints", id="name-constraints"),
    pytest.param(verify_error(7), "bad_certificate", id="other-verify-code"),
    pytest.param(verify_error(62), "bad_certificate", id="hostname-mismatch-code"),
    pytest.param(ssl_error("PEER_DID_NOT_RETURN_A_CERTIFICATE"), "no_client_cert", id="no-cert"),
    pytest.param(ssl_error("CERTIFICATE_REQUIRED"), "no_client_cert", id="tls13-cert-required"),
    pytest.param(
        ssl_error("TLSV13_ALERT_CERTIFICATE_REQUIRED"), "peer_alert", id="alert-cert-required"
    ),
    pytest.param(ssl_error("WRONG_VERSION_NUMBER"), "not_tls", id="plaintext"),
    pytest.param(ssl_error("HTTP_REQUEST"), "not_tls", id="http-to-tls-port"),
    pytest.param(ssl_error("NO_SHARED_CIPHER"), "no_shared_cipher", id="no-shared-cipher"),
    pytest.param(ssl_error("UNSUPPORTED_PROTOCOL"), "protocol_version", id="tls1.0"),
    pytest.param(ssl_error("TLSV1_ALERT_PROTOCOL_VERSION"), "protocol_version", id="alert-proto"),
    pytest.param(ssl_error("SSLV3_ALERT_BAD_CERTIFICATE"), "peer_alert", id="peer-alert"),
    pytest.param(ssl_error("TLSV1_ALERT_UNKNOWN_CA"), "peer_alert", id="peer-unknown-ca"),
    pytest.param(ssl_error("RECORD_LAYER_FAILURE"), "handshake_error", id="other-ssl-reason"),
    pytest.param(ssl_error(None), "handshake_error", id="ssl-without-reason"),
    pytest.param(TimeoutError(), "timeout", id="timeout"),
    pytest.param(
        ConnectionAbortedError(
            "SSL handshake is taking longer than 10 seconds: aborting the connection"
        ),
        "timeout",
        id="asyncio-handshake-timeout",
    ),
    pytest.param(
        ConnectionResetError(104, "Connection reset by peer"), "connection_reset", id="rst"
    ),
    pytest.param(ConnectionAbortedError("aborted"), "connection_reset", id="aborted"),
    pytest.param(BrokenPipeError(), "connection_reset", id="broken-pipe"),
    pytest.param(EOFError(), "connection_reset", id="eof"),
    pytest.param(ValueError("something else"), "handshake_error", id="anything-else"),
]


@pytest.mark.parametrize(("exc", "label"), REASONS)
def test_refusal_reason(exc: BaseException, label: str) -> None:
    assert refusal_reason(exc) == label


LABELS = {
    "unknown_ca", "not_yet_valid", "expired", "wrong_usage", "name_constraints",
    "bad_certificate", "no_client_cert", "not_tls", "no_shared_cipher", "protocol_version",
    "peer_alert", "handshake_error", "timeout", "connection_reset",
}  # fmt: skip


@pytest.mark.parametrize("reason", ["x" * 200, "a\nb", '{label="evil"}', ""])
def test_peer_controlled_text_never_becomes_a_label(reason: str) -> None:
    assert refusal_reason(ssl_error(reason)) in LABELS
    assert refusal_reason(ConnectionError(reason)) in LABELS


SIDES = ["server", "h2_server", "client", "h2_client"]


@pytest.mark.parametrize("side", SIDES)
def test_contexts_require_and_verify_a_peer_certificate(side: str, svid: Svid) -> None:
    context = getattr(Contexts.of(svid), side)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.verify_flags & ssl.VERIFY_X509_STRICT
    assert context.options & ssl.OP_NO_TICKET
    assert context.options & ssl.OP_NO_RENEGOTIATION
    assert context.options & ssl.OP_NO_COMPRESSION
    assert context.check_hostname is False  # the SPIFFE ID is checked after the handshake
    assert len(context.get_ca_certs()) == len(svid.bundle.roots)
    client = side.endswith("client")
    assert context.protocol == (ssl.PROTOCOL_TLS_CLIENT if client else ssl.PROTOCOL_TLS_SERVER)
    if not client:
        assert context.num_tickets == 0


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext, offer: list[str]) -> str | None:
    """A handshake in memory: the ALPN protocol chosen; ssl.SSLError if refused. (The test
    SVID is valid at NOW, not today: certificates are not verified here, ALPN is the point.)"""
    client.set_alpn_protocols(offer)
    server.verify_mode = client.verify_mode = ssl.CERT_NONE
    return in_memory(client, server)[1].selected_alpn_protocol()


@pytest.mark.parametrize(
    ("protocol", "offer", "chosen"),
    [
        ("tcp", ["h2", "http/1.1"], "h2"),
        ("http", ["h2", "http/1.1"], "h2"),
        ("http", ["http/1.1"], "http/1.1"),
        ("http2", ["h2", "http/1.1"], "h2"),
        ("grpc", ["h2"], "h2"),
    ],
)
def test_each_port_protocol_offers_its_own_alpn(
    protocol: Protocol, offer: list[str], chosen: str, svid: Svid
) -> None:
    server = Contexts.of(svid).server_for(protocol)
    assert server is not None
    assert _handshake(server, cast(ssl.SSLContext, Contexts.of(svid).client), offer) == chosen


def test_an_h2_port_agrees_on_nothing_with_a_client_that_cannot_speak_h2(svid: Svid) -> None:
    """CPython's server goes on without ALPN when nothing overlaps: the listener refuses a
    connection whose ALPN is not h2 once the handshake is done."""
    server = Contexts.of(svid).server_for("grpc")
    assert server is not None
    assert _handshake(server, cast(ssl.SSLContext, Contexts.of(svid).client), ["http/1.1"]) is None


def test_h2_upstreams_get_a_client_context_offering_h2_only(svid: Svid) -> None:
    contexts = Contexts.of(svid)
    assert contexts.client_for("grpc") is contexts.h2_client
    assert contexts.client_for("http") is contexts.client is not contexts.h2_client


def test_tls12_ciphers_are_forward_secret_aead_only(svid: Svid) -> None:
    for side in SIDES:
        context = getattr(Contexts.of(svid), side)
        tls12 = [c for c in context.get_ciphers() if c["protocol"] == "TLSv1.2"]
        assert tls12
        for cipher in tls12:
            assert cipher["kea"] == "kx-ecdhe", cipher["name"]
            assert cipher["aead"], cipher["name"]


def test_every_svid_gets_fresh_contexts(svid: Svid) -> None:
    first, second = Contexts.of(svid), Contexts.of(svid)
    for side in SIDES:
        assert getattr(first, side) is not getattr(second, side)


class PeerObject:
    """The one call peer_id makes on an ssl.SSLObject."""

    def __init__(self, der: bytes) -> None:
        self.der = der

    def getpeercert(self, binary_form: bool) -> bytes:
        return self.der


def test_a_remembered_peer_is_still_refused_once_its_svid_expires(svid: Svid) -> None:
    peer = cast(ssl.SSLObject, PeerObject(der(svid.chain[0])))
    assert peer_id(peer, "client", NOW, TD) == WEB
    assert peer_id(peer, "client", NOW + timedelta(minutes=30), TD) == WEB  # remembered
    with pytest.raises(SvidError) as refused:
        peer_id(peer, "client", svid.not_after, TD)
    assert refused.value.reason == "expired"
    with pytest.raises(SvidError):
        peer_id(peer, "client", NOW - timedelta(hours=1), TD)


def test_a_peer_of_another_trust_domain_is_refused_even_when_remembered(svid: Svid) -> None:
    """The bundle that verified the chain vouches for its own trust domain only."""
    peer = cast(ssl.SSLObject, PeerObject(der(svid.chain[0])))
    assert peer_id(peer, "client", NOW, TD) == WEB
    for _ in range(2):
        with pytest.raises(SvidError) as refused:
            peer_id(peer, "client", NOW, TrustDomain("other.org"))
        assert refused.value.reason == "foreign_trust_domain"


def test_a_certificate_that_is_not_an_svid_is_refused_every_time(svid: Svid) -> None:
    intermediate = cast(ssl.SSLObject, PeerObject(der(svid.chain[1])))
    for _ in range(2):
        with pytest.raises(SvidError):
            peer_id(intermediate, "server", NOW, TD)


def test_the_memory_of_peers_is_bounded(
    svid: Svid, signer: LocalSigner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tls, "_ACCEPTED_MAX", 3)
    for _ in range(5):
        leaf = sign_leaf(signer, new_key())[0]
        assert peer_id(cast(ssl.SSLObject, PeerObject(leaf)), "client", NOW, TD) == WEB
        assert len(tls._ACCEPTED) <= 3


@pytest.mark.parametrize("resumption", [tls.NO_RESUMPTION, tls.Resumption()], ids=["off", "on"])
@pytest.mark.parametrize("protocol", ["tcp", "grpc"])
def test_the_peer_certificate_an_agent_connection_gives_is_the_one_it_verified(
    tmp_path: Path, protocol: Protocol, resumption: tls.Resumption
) -> None:
    """The event loop's transport reads getpeercert() once per handshake (its `peercert`
    extra info, which the agent never reads): decoded when read, and then what CPython
    decodes; the DER (what peer_id checks) as ever."""
    signer = make_signer(tmp_path)
    server_svid, client_svid = svid_now(signer, WEB), svid_now(signer, API)
    server = Contexts.of(server_svid, resumption).server_for(protocol)
    client = Contexts.of(client_svid, resumption).client_for(protocol)
    assert server is not None and client is not None
    c, s = in_memory(client, server)
    for ssl_object, peer in ((c, server_svid), (s, client_svid)):
        decoded = ssl.SSLObject.getpeercert(ssl_object)
        assert decoded
        assert dict(ssl_object.getpeercert()) == decoded
        assert ssl_object.getpeercert()["subjectAltName"] == (("URI", str(peer.spiffe_id)),)
        assert ssl_object.getpeercert(binary_form=True) == der(peer.leaf)
    now = datetime.now(UTC)
    assert peer_id(s, "client", now, TD) == API
    assert peer_id(c, "server", now, TD) == WEB


def test_an_agent_connection_has_no_peer_certificate_before_its_handshake(tmp_path: Path) -> None:
    client = Contexts.of(svid_now(make_signer(tmp_path), API)).client
    assert client is not None
    ssl_object = client.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO())
    with pytest.raises(ValueError, match="handshake not done"):
        ssl_object.getpeercert()


def test_the_control_planes_connection_gives_the_decoded_certificate_itself(
    tmp_path: Path,
) -> None:
    """grpclib reads the control plane's certificate as getpeercert()'s dict."""
    signer = make_signer(tmp_path)
    server_svid, client_svid = svid_now(signer, WEB), svid_now(signer, API)
    server = Contexts.of(server_svid).server
    assert server is not None
    c, _ = in_memory(tls.control_plane_context(client_svid), server)
    assert type(c.getpeercert()) is dict
    assert c.getpeercert()["subjectAltName"] == (("URI", str(WEB)),)


def test_an_agent_connection_whose_peer_sent_no_certificate_gives_none(tmp_path: Path) -> None:
    """As CPython's getpeercert() does (None, not an empty certificate): whoever reads the
    transport's `peercert` tells "no certificate" apart. CERT_REQUIRED never lets such a
    peer through the handshake; here the server asks for one without requiring it."""
    server = Contexts.of(svid_now(make_signer(tmp_path), WEB)).server
    assert server is not None
    server.verify_mode = ssl.CERT_OPTIONAL
    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.check_hostname, anonymous.verify_mode = False, ssl.CERT_NONE
    _, s = in_memory(anonymous, server)
    assert ssl.SSLObject.getpeercert(s) is None
    assert s.getpeercert() is None
    assert s.getpeercert(binary_form=True) is None
    with pytest.raises(SvidError, match="no certificate"):
        peer_id(s, "client", datetime.now(UTC), TD)
