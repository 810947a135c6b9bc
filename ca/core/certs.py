"""The CA's certificates as the shared checks read them.

The CA builds and signs with `cryptography`; the SVID rules, the chain check
and the trust bundle (`identity`) read `identity.cert.Cert`, the facts OpenSSL
parsed, because the agent must not load `cryptography` to run them. This is
the one crossing, by DER, so the CA checks exactly the bytes it hands out.
"""

from __future__ import annotations

from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from identity import TrustBundle, TrustDomain
from identity.cert import Cert


def as_cert(cert: x509.Certificate) -> Cert:
    return Cert.from_der(cert.public_bytes(Encoding.DER))


def as_certs(certs: Iterable[x509.Certificate]) -> tuple[Cert, ...]:
    return tuple(as_cert(cert) for cert in certs)


def bundle_of(trust_domain: TrustDomain, roots: Iterable[x509.Certificate]) -> TrustBundle:
    """The bundle of `roots`; BundleError as TrustBundle says."""
    return TrustBundle(trust_domain, as_certs(roots))
