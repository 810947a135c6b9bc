"""What a certificate signing request may ask for.

The CA uses a CSR only for its public key and the proof that the caller holds
the private key. Names in it are ignored, but a CSR that asks for something
the CA will not give (another identity, extra SANs, a CA certificate, a weak
key) is refused rather than silently trimmed: the caller is confused or
hostile, and either way should hear about it.
"""

from __future__ import annotations

import warnings

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

from identity import SpiffeId
from identity.printable import quoted

MAX_CSR_BYTES = 16 * 1024
ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1)
RSA_BITS = (2048, 8192)
#: The one RSA public exponent taken (what every key generator makes): a caller's own
#: exponent would set what each verification of its signature costs the CA.
RSA_EXPONENT = 65537
#: What parsing a caller's CSR may raise: cryptography reports a malformed part with
#: ValueError, and some shapes with exceptions of their own (two extensions of one type,
#: a SAN of a kind it cannot represent), none of them the CA's fault.
_UNPARSABLE = (
    ValueError,
    UnsupportedAlgorithm,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
)


class CsrRejected(ValueError):
    """A CSR the CA will not sign; `reason` is a bounded metric label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def parse(data: bytes) -> x509.CertificateSigningRequest:
    """Parse a PEM or DER CSR, refusing oversized or unparsable input."""
    if not data:
        raise CsrRejected("malformed", "the request carries no CSR")
    if len(data) > MAX_CSR_BYTES:
        raise CsrRejected("malformed", f"CSR is larger than {MAX_CSR_BYTES} bytes")
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except (*_UNPARSABLE, x509.InvalidVersion) as exc:
        raise CsrRejected("malformed", f"CSR is not valid PEM or DER PKCS#10: {exc}") from None


def check(csr: x509.CertificateSigningRequest, identity: SpiffeId) -> CertificatePublicKeyTypes:
    """Return the CSR's public key if the CSR asks for nothing beyond `identity`. The key
    is checked before the signature: a key the CA refuses costs it no verification."""
    try:
        key = csr.public_key()
    except _UNPARSABLE as exc:
        raise CsrRejected("malformed", f"CSR key is unusable: {exc}") from None
    _check_key(key)
    try:
        signed = csr.is_signature_valid
    except _UNPARSABLE as exc:
        raise CsrRejected("malformed", f"CSR signature is unusable: {exc}") from None
    if not signed:
        raise CsrRejected("bad_signature", "CSR signature does not verify with its own key")
    try:
        with warnings.catch_warnings():
            # cryptography warns of odd names (a CN over 64 characters in a directoryName
            # SAN) with their length in the text, so each length would be a line of its own
            # in the CA's log: a caller's to repeat at will. Refused below all the same.
            warnings.simplefilter("ignore")
            extensions = csr.extensions
    except _UNPARSABLE as exc:
        raise CsrRejected("malformed", f"CSR extensions cannot be parsed: {exc}") from None
    for extension in extensions:
        if isinstance(extension.value, x509.BasicConstraints) and extension.value.ca:
            raise CsrRejected("ca_requested", "CSR asks for a CA certificate (cA=true)")
        if isinstance(extension.value, x509.SubjectAlternativeName):
            _check_sans(extension.value, identity)
    return key


def _check_key(key: CertificatePublicKeyTypes) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ALLOWED_CURVES):
            raise CsrRejected("weak_key", f"curve {key.curve.name} is not allowed; use P-256")
    elif isinstance(key, rsa.RSAPublicKey):
        low, high = RSA_BITS
        if not low <= key.key_size <= high:
            raise CsrRejected("weak_key", f"RSA key of {key.key_size} bits; need {low}-{high}")
        if key.public_numbers().e != RSA_EXPONENT:
            raise CsrRejected("weak_key", f"RSA key's public exponent is not {RSA_EXPONENT}")
    else:
        raise CsrRejected("weak_key", f"{type(key).__name__} keys are not supported; use P-256")


def _check_sans(sans: x509.SubjectAlternativeName, identity: SpiffeId) -> None:
    for name in sans:
        if not isinstance(name, x509.UniformResourceIdentifier):
            raise CsrRejected(
                "unexpected_san", f"CSR asks for a {type(name).__name__} SAN; only the SPIFFE ID"
            )
        if name.value != str(identity):
            raise CsrRejected(
                "identity_mismatch",
                f"CSR asks for {quoted(name.value)} but the caller is {identity}",
            )
