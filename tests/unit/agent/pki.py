"""A real CA (the CA's own code) and the chains it signs, for the agent's unit tests."""

from __future__ import annotations

import ssl
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core.svid import Svid, accept_svid
from ca.core.template import LeafRequest
from ca.signers.local import LocalSigner, init_ca
from identity import SpiffeId, TrustDomain
from identity.cert import Cert, PrivateKey

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "shop", "web")


def der(cert: x509.Certificate | Cert) -> bytes:
    return cert.der if isinstance(cert, Cert) else cert.public_bytes(serialization.Encoding.DER)


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def agent_key() -> PrivateKey:
    """The agent's kind of key: what it generates and holds in its Svid."""
    return PrivateKey.generate_p256()


def public_key(key: ec.EllipticCurvePrivateKey | PrivateKey) -> ec.EllipticCurvePublicKey:
    """`key`'s public half as the CA's template takes it."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.public_key()
    public = serialization.load_der_public_key(key.spki)
    assert isinstance(public, ec.EllipticCurvePublicKey)
    return public


def make_signer(directory: Path) -> LocalSigner:
    init_ca(directory, TD, NOW - timedelta(days=1), force=False)
    return LocalSigner.load(directory)


def sign_leaf(
    signer: LocalSigner,
    key: ec.EllipticCurvePrivateKey | PrivateKey,
    spiffe_id: SpiffeId = WEB,
    lifetime: timedelta = timedelta(hours=1),
) -> tuple[bytes, ...]:
    """The chain (leaf first, DER) the CA would send for `key`, valid from NOW."""
    request = LeafRequest(
        spiffe_id,
        public_key(key),
        NOW - timedelta(minutes=1),
        NOW + lifetime,
        x509.random_serial_number(),
    )
    return tuple(der(cert) for cert in signer.sign_leaf_now(request))


def bundle_der(signer: LocalSigner) -> tuple[bytes, ...]:
    return tuple(signer.bundle.to_der())


def svid_now(signer: LocalSigner, spiffe_id: SpiffeId) -> Svid:
    """An SVID valid now (OpenSSL verifies chains against the real clock)."""
    key, now = agent_key(), datetime.now(UTC)
    request = LeafRequest(
        spiffe_id,
        public_key(key),
        now - timedelta(minutes=1),
        now + timedelta(hours=1),
        x509.random_serial_number(),
    )
    chain = tuple(der(cert) for cert in signer.sign_leaf_now(request))
    return accept_svid(chain, bundle_der(signer), key, spiffe_id, now)


def in_memory(
    client: ssl.SSLContext, server: ssl.SSLContext, session: ssl.SSLSession | None = None
) -> tuple[ssl.SSLObject, ssl.SSLObject]:
    """A handshake in memory (offering `session`), then a byte from the server (a TLS 1.3
    ticket comes before it): (the client's object, the server's); ssl.SSLError if either
    side refuses."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    c = client.wrap_bio(c_in, c_out, server_hostname=None, session=session)
    s = server.wrap_bio(s_in, s_out, server_side=True)
    done: set[str] = set()
    for _ in range(10):
        for name, side, out, into in (("c", c, c_out, s_in), ("s", s, s_out, c_in)):
            if name not in done:
                try:
                    side.do_handshake()
                    done.add(name)
                except ssl.SSLWantReadError:
                    pass
            into.write(out.read())
        if done == {"c", "s"}:
            break
    else:
        raise AssertionError("handshake did not finish")
    s.write(b"!")
    c_in.write(s_out.read())
    assert c.read(1) == b"!"
    return c, s
