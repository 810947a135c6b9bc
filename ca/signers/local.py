"""The local signer: root and intermediate in a directory made by `outrider ca init`.

Layout of the CA directory:
  root.pem, root.key                  the trust domain's root (root.key is not
                                      needed by `serve`; keep it offline)
  intermediate.pem, intermediate.key  the issuing CA used by `serve` and `mint`
  bundle.pem                          the trust bundle handed to workloads
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ca.core import template
from ca.core.certs import as_cert
from ca.core.template import LeafRequest
from identity import BundleError, SpiffeId, SvidError, TrustBundle, TrustDomain, spiffe_id_of
from identity.chain import ChainError, check_chain
from identity.files import PRIVATE, write_atomic

ROOT_CERT, ROOT_KEY = "root.pem", "root.key"
INTERMEDIATE_CERT, INTERMEDIATE_KEY = "intermediate.pem", "intermediate.key"
BUNDLE = "bundle.pem"
ALL_FILES = (ROOT_CERT, ROOT_KEY, INTERMEDIATE_CERT, INTERMEDIATE_KEY, BUNDLE)


class CaDirectoryError(Exception):
    """The CA directory is missing, incomplete, or would be overwritten."""


def init_ca(
    directory: Path,
    trust_domain: TrustDomain,
    now: datetime,
    *,
    force: bool,
    name_constraint: bool = False,
) -> None:
    """Create a P-256 root (10 years) and intermediate (1 year) in `directory`.

    `name_constraint` puts a critical URI name constraint in the intermediate
    (see `template`: some TLS stacks then refuse every chain).
    """
    existing = [name for name in ALL_FILES if (directory / name).exists()]
    if existing and not force:
        raise CaDirectoryError(
            f"{directory} already holds {', '.join(existing)}; pass --force to replace them"
        )
    directory.mkdir(parents=True, exist_ok=True)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = template.root(trust_domain, root_key.public_key(), now, x509.random_serial_number())
    root_cert = root.sign(root_key, hashes.SHA256())
    intermediate_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = template.intermediate(
        trust_domain,
        intermediate_key.public_key(),
        root_cert,
        now,
        x509.random_serial_number(),
        name_constraint=name_constraint,
    )
    intermediate_cert = intermediate.sign(root_key, hashes.SHA256())
    write_atomic(directory / ROOT_KEY, _key_pem(root_key), PRIVATE)
    write_atomic(directory / INTERMEDIATE_KEY, _key_pem(intermediate_key), PRIVATE)
    write_atomic(directory / ROOT_CERT, _cert_pem(root_cert))
    write_atomic(directory / INTERMEDIATE_CERT, _cert_pem(intermediate_cert))
    write_atomic(directory / BUNDLE, _cert_pem(root_cert))


@dataclass(frozen=True, repr=False)
class LocalSigner:
    """Signs with the intermediate key held in memory."""

    bundle: TrustBundle
    issuer: x509.Certificate
    _key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"LocalSigner(trust_domain={self.trust_domain}, key=...)"

    @property
    def trust_domain(self) -> TrustDomain:
        return self.bundle.trust_domain

    @classmethod
    def load(cls, directory: Path) -> LocalSigner:
        try:
            bundle_pem = (directory / BUNDLE).read_bytes()
            issuer = x509.load_pem_x509_certificate((directory / INTERMEDIATE_CERT).read_bytes())
            key = serialization.load_pem_private_key(
                (directory / INTERMEDIATE_KEY).read_bytes(), password=None
            )
        except FileNotFoundError as exc:
            raise CaDirectoryError(
                f"cannot load the CA from {directory}: {exc} (run `outrider ca init` first)"
            ) from None
        except TypeError:  # cryptography: a key that needs a password, and none was given
            raise CaDirectoryError(
                f"{directory / INTERMEDIATE_KEY} is encrypted: the CA reads an unencrypted"
                " PKCS#8 or SEC1 key (`openssl pkey -in KEY -out KEY`)"
            ) from None
        except (OSError, ValueError) as exc:  # there, but unreadable: never `init --force`
            raise CaDirectoryError(f"cannot load the CA from {directory}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaDirectoryError(f"{directory / INTERMEDIATE_KEY} is not an ECDSA key")
        if key.public_key() != issuer.public_key():
            raise CaDirectoryError(f"{INTERMEDIATE_KEY} does not match {INTERMEDIATE_CERT}")
        try:
            trust_domain = _trust_domain_of(issuer)
            bundle = TrustBundle.from_pem(trust_domain, bundle_pem)
            check_chain([as_cert(issuer)], bundle)
        except (SvidError, BundleError, ChainError, ValueError) as exc:
            raise CaDirectoryError(
                f"{directory}: {INTERMEDIATE_CERT} and {BUNDLE} are no CA of a trust domain"
                f" together: {exc}"
            ) from None
        return cls(bundle, issuer, key)

    async def run(self) -> None:
        """Nothing to keep fresh: the key is on disk."""

    async def sign_leaf(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        return self.sign_leaf_now(request)

    def sign_leaf_now(self, request: LeafRequest) -> tuple[x509.Certificate, ...]:
        """Synchronous signing: a P-256 signature takes tens of microseconds."""
        leaf = template.leaf(request, self.issuer).sign(self._key, hashes.SHA256())
        return (leaf, self.issuer)

    async def sign_serving(
        self,
        names: tuple[str, ...],
        key: ec.EllipticCurvePrivateKey,
        not_before: datetime,
        not_after: datetime,
        serial: int,
    ) -> tuple[x509.Certificate, ...]:
        builder = template.serving(
            names, key.public_key(), self.issuer, not_before, not_after, serial
        )
        return (builder.sign(self._key, hashes.SHA256()), self.issuer)


def _trust_domain_of(ca_cert: x509.Certificate) -> TrustDomain:
    spiffe_id: SpiffeId = spiffe_id_of(as_cert(ca_cert))
    return spiffe_id.trust_domain


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)
