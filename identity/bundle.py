"""Trust bundles: the X.509 roots a trust domain's SVIDs chain up to.

A bundle always belongs to exactly one trust domain; keeping the two together
in one value stops a root for ``a.org`` from being used to accept an SVID
that claims ``b.org`` (SPIFFE Trust Domain and Bundle spec, section 6.4).

Three encodings are supported: concatenated PEM (what TLS stacks load), a
list of DER blobs (what the CA protocol carries), and the SPIFFE bundle
format, a JWK Set with ``x509-svid`` keys (what federation endpoints serve).
All parsing is strict and raises :class:`BundleError`; the bytes come from
disk or from another trust domain, and a half-understood bundle is worse
than none. PEM and DER are read by OpenSSL (`identity.cert`); the SPIFFE
format needs `cryptography` and PyJWT, imported by its functions on first
use, so an agent that never federates never loads them.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from identity.cert import Cert, distinct
from identity.spiffe_id import TrustDomain

if TYPE_CHECKING:
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

__all__ = ["BundleError", "TrustBundle"]

X509_SVID_USE = "x509-svid"

# JWK key types we can turn into public keys (`_algorithm`). Unknown types are
# skipped rather than rejected, as the bundle spec (section 4.2.1) requires.
_KEY_TYPES = frozenset({"EC", "RSA", "OKP"})


def _algorithm(kty: str) -> type[ECAlgorithm | RSAAlgorithm | OKPAlgorithm]:
    """PyJWT's codec for a key type, imported on first use: only the SPIFFE bundle
    format (federation, the Workload API) needs it, and an agent mostly never does."""
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

    if kty == "EC":
        return ECAlgorithm
    return RSAAlgorithm if kty == "RSA" else OKPAlgorithm


# JWK members that hold private key material (RFC 7518 section 6). A bundle is
# published to other trust domains, so one of these in it is a leak, not a key.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")


class BundleError(ValueError):
    """Bytes or certificates that do not form a valid trust bundle."""


#: A PEM private key's label (PKCS#8, "EC", "RSA", "ENCRYPTED"): words alone, such as a
#: comment saying never to put one here, are not a key.
_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----")


@dataclass(frozen=True)
class TrustBundle:
    """The CA certificates trusted to issue SVIDs for ``trust_domain``.

    Several roots are normal: during root rotation the old and the new root
    are both published until every SVID signed by the old one has expired.
    """

    trust_domain: TrustDomain
    roots: tuple[Cert, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.trust_domain, TrustDomain):
            raise TypeError(f"trust_domain must be a TrustDomain, not {self.trust_domain!r}")
        roots = _without_duplicates(self.roots)
        if not roots:
            raise BundleError(f"trust bundle for {self.trust_domain} has no roots")
        for index, root in enumerate(roots):
            _check_root(index, root)
        object.__setattr__(self, "roots", roots)

    @classmethod
    def from_pem(cls, trust_domain: TrustDomain, data: bytes) -> TrustBundle:
        """Load concatenated PEM ``CERTIFICATE`` blocks."""
        if _PRIVATE_KEY.search(data):
            raise BundleError("PEM data contains a private key; a trust bundle holds certificates")
        try:
            roots = Cert.all_from_pem(data)
        except ValueError as exc:
            raise BundleError(f"no PEM certificates could be loaded: {exc}") from exc
        return cls(trust_domain, tuple(roots))

    def to_pem(self) -> bytes:
        return b"".join(root.to_pem() for root in self.roots)

    @classmethod
    def from_der(cls, trust_domain: TrustDomain, ders: Iterable[bytes]) -> TrustBundle:
        """Load one DER-encoded certificate per item (each different one read once)."""
        listed = list(ders)
        try:
            first = distinct(listed)
        except ValueError as exc:
            raise BundleError(f"trust bundle for {trust_domain}: {exc}") from None
        return cls(trust_domain, tuple(_load_der(index, der) for der, index in first.items()))

    def to_der(self) -> list[bytes]:
        return [root.der for root in self.roots]

    @classmethod
    def from_spiffe_json(cls, trust_domain: TrustDomain, data: bytes | str) -> TrustBundle:
        """Load the ``x509-svid`` keys of a SPIFFE bundle (a JWK Set).

        ``jwt-svid`` keys and keys with a use or key type this code does not
        know are skipped, as the spec requires; every ``x509-svid`` key must
        carry exactly one certificate whose public key is the JWK's own key.
        """
        document = _load_json_object(data)
        _check_optional_int(document, "spiffe_refresh_hint")
        _check_optional_int(document, "spiffe_sequence")
        roots = tuple(_roots_from_jwks(document.get("keys")))
        return cls(trust_domain, roots)

    def to_spiffe_json(
        self, *, refresh_hint: int | None = None, sequence: int | None = None
    ) -> bytes:
        """Encode as a SPIFFE bundle; optional members are omitted when ``None``."""
        document: dict[str, Any] = {"keys": [_jwk_for_root(root) for root in self.roots]}
        if refresh_hint is not None:
            document["spiffe_refresh_hint"] = _non_negative("refresh_hint", refresh_hint)
        if sequence is not None:
            document["spiffe_sequence"] = _non_negative("sequence", sequence)
        return json.dumps(document, separators=(",", ":")).encode("utf-8")

    @property
    def earliest_expiry(self) -> datetime:
        """When the first root expires: the deadline for rotating it out."""
        return min(root.not_after for root in self.roots)


def _without_duplicates(roots: Iterable[Cert]) -> tuple[Cert, ...]:
    for root in roots:
        if not isinstance(root, Cert):
            raise TypeError(f"trust bundle roots must be Cert, not {type(root)}")
    return tuple(dict.fromkeys(roots))  # a Cert is equal to another with its DER


def _check_root(index: int, root: Cert) -> None:
    subject = _name(root)
    if root.malformed is not None:
        raise BundleError(f"root {index} ({subject}) has malformed extensions: {root.malformed}")
    if root.ca is None:
        raise BundleError(f"root {index} ({subject}) is not a CA certificate: no BasicConstraints")
    if not root.ca:
        raise BundleError(f"root {index} ({subject}) is not a CA certificate: ca=False")


def _load_der(index: int, der: bytes) -> Cert:
    try:
        return Cert.from_der(der)
    except ValueError as exc:
        raise BundleError(f"certificate {index} is not valid DER: {exc}") from exc


def _load_json_object(data: bytes | str) -> dict[str, Any]:
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"SPIFFE bundle is not valid JSON: {exc}") from exc
    if not isinstance(document, dict):
        raise BundleError("SPIFFE bundle must be a JSON object (a JWK Set)")
    return document


def _check_optional_int(document: dict[str, Any], member: str) -> None:
    value = document.get(member)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise BundleError(f"SPIFFE bundle member {member!r} must be an integer, not {value!r}")


def _roots_from_jwks(keys: object) -> Iterator[Cert]:
    if not isinstance(keys, list):
        raise BundleError("SPIFFE bundle must have a 'keys' array")
    for index, jwk in enumerate(keys):
        if not isinstance(jwk, dict):
            raise BundleError(f"key {index} must be a JSON object")
        if _is_x509_svid_key(index, jwk):
            yield _root_from_jwk(index, jwk)


def _is_x509_svid_key(index: int, jwk: dict[str, Any]) -> bool:
    """Whether this JWK is an X.509 root we understand (spec sections 4.2.1-4.2.2)."""
    use, kty = jwk.get("use"), jwk.get("kty")
    if not isinstance(use, str):
        raise BundleError(f"key {index} has no 'use'; the SPIFFE bundle spec requires it")
    if not isinstance(kty, str):
        raise BundleError(f"key {index} has no 'kty'; the SPIFFE bundle spec requires it")
    return use == X509_SVID_USE and kty in _KEY_TYPES


def _root_from_jwk(index: int, jwk: dict[str, Any]) -> Cert:
    leaked = [member for member in _PRIVATE_MEMBERS if member in jwk]
    if leaked:
        raise BundleError(f"key {index} carries private key material {leaked}; refusing it")
    root = _certificate_from_x5c(index, jwk.get("x5c"))
    if _spki(_public_key_from_jwk(index, jwk)) != root.spki:
        raise BundleError(f"key {index}: the x5c certificate's public key does not match the JWK")
    return root


def _certificate_from_x5c(index: int, x5c: object) -> Cert:
    if not isinstance(x5c, list) or len(x5c) != 1:
        count = len(x5c) if isinstance(x5c, list) else 0
        raise BundleError(f"key {index} must have exactly one certificate in 'x5c', has {count}")
    if not isinstance(x5c[0], str):
        raise BundleError(f"key {index}: 'x5c' entries must be base64 strings")
    try:
        der = base64.b64decode(x5c[0], validate=True)
    except binascii.Error as exc:
        raise BundleError(f"key {index}: 'x5c' entry is not valid base64: {exc}") from exc
    return _load_der(index, der)


def _public_key_from_jwk(index: int, jwk: dict[str, Any]) -> Any:
    from jwt.exceptions import InvalidKeyError

    algorithm = _algorithm(jwk["kty"])
    try:
        return algorithm.from_jwk(jwk)
    except (InvalidKeyError, ValueError, TypeError, AttributeError) as exc:
        # PyJWT reports malformed members (non-string, bad base64, off-curve
        # points) with any of these; all mean the same thing here.
        raise BundleError(f"key {index} has invalid {jwk['kty']} key material: {exc}") from exc


def _spki(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    encoded: bytes = public_key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return encoded


def _jwk_for_root(root: Cert) -> dict[str, Any]:
    members = _public_jwk(root)
    # PyJWT adds "key_ops"; RFC 7517 says not to combine it with "use".
    key_material = {name: value for name, value in members.items() if name != "key_ops"}
    return {"use": X509_SVID_USE, **key_material, "x5c": [base64.b64encode(root.der).decode()]}


def _public_jwk(root: Cert) -> dict[str, Any]:
    """The JWK members for the root's public key, encoded by PyJWT."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_der_public_key
    from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
    from jwt.exceptions import InvalidKeyError

    try:
        public_key = load_der_public_key(root.spki)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise BundleError(f"root {_name(root)} has a key this code cannot read: {exc}") from exc
    try:
        if isinstance(public_key, ec.EllipticCurvePublicKey):
            return ECAlgorithm.to_jwk(public_key, as_dict=True)
        if isinstance(public_key, rsa.RSAPublicKey):
            return RSAAlgorithm.to_jwk(public_key, as_dict=True)
        if isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            return OKPAlgorithm.to_jwk(public_key, as_dict=True)
    except InvalidKeyError as exc:  # e.g. an EC curve JWK has no name for
        raise BundleError(f"root {_name(root)} has a key JWK cannot express: {exc}") from exc
    raise BundleError(f"root {_name(root)} has an unsupported key type for a SPIFFE bundle")


def _name(cert: Cert) -> str:
    return repr(cert.subject)


def _non_negative(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return value
