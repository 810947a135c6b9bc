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
from collections.abc import Sequence

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
