"""The TLS server context of the CA's gRPC port.

Client certificates are optional: bearer-token callers send none, renewing
workloads present their current SVID, which OpenSSL verifies against the
trust bundle (strict X.509, name constraints included) during the handshake.
No session is ever resumed (TLS 1.3 only, no tickets, no cache: see
`identity.serving.tls_server_context`), so every renewal handshake re-verifies
the chain and callers cannot make the CA keep sessions.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePrivateKey

from identity import TrustBundle
from identity.serving import tls_server_context
from identity.tlsfiles import load_cert_chain


def server_context(
    bundle: TrustBundle, chain: Sequence[x509.Certificate], key: EllipticCurvePrivateKey
) -> ssl.SSLContext:
    context = tls_server_context()
    context.verify_mode = ssl.CERT_OPTIONAL
    context.verify_flags |= ssl.VERIFY_X509_STRICT
    context.set_alpn_protocols(["h2"])
    context.load_verify_locations(cadata=bundle.to_pem().decode())
    load_credentials(context, chain, key)
    return context


def load_credentials(
    context: ssl.SSLContext, chain: Sequence[x509.Certificate], key: EllipticCurvePrivateKey
) -> None:
    """Swap the serving certificate in place; new handshakes use it, open ones go on."""
    load_cert_chain(
        context,
        b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in chain),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


class ServingTls:
    """The gRPC port's TLS, following the signer's trust bundle: a caller's SVID is verified
    against the roots the CA serves now. Its bundle changes under a running CA (a Vault
    root rotation, seen when the intermediate is renewed), and OpenSSL's store of a context
    only grows: so each new bundle gets a context of its own, which the handshake switches
    to as it begins (the listening context's SNI callback, called with or without SNI).
    SVIDs of a root the CA no longer serves are refused in the handshake (their holders
    renew with their token); those of a new one are taken."""

    def __init__(
        self,
        bundle_of: Callable[[], TrustBundle],
        chain: Sequence[x509.Certificate],
        key: EllipticCurvePrivateKey,
    ) -> None:
        self._bundle_of = bundle_of
        self._chain, self._key = chain, key
        self._bundle = bundle_of()
        self.context = server_context(self._bundle, chain, key)  # the listening one
        self._current = self.context
        self.context.sni_callback = self._switch

    def credentials(self, chain: Sequence[x509.Certificate], key: EllipticCurvePrivateKey) -> None:
        """The serving certificate was renewed: new handshakes present it."""
        self._chain, self._key = chain, key
        for context in {self.context, self._current}:
            load_credentials(context, chain, key)

    def _switch(self, ssl_object: ssl.SSLObject, name: str | None, _: ssl.SSLContext) -> None:
        bundle = self._bundle_of()
        if bundle is not self._bundle and bundle != self._bundle:
            self._current = server_context(bundle, self._chain, self._key)
        self._bundle = bundle
        if self._current is not self.context:
            ssl_object.context = self._current
