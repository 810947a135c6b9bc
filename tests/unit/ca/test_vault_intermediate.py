"""What the CA accepts as an intermediate from Vault: name constraint required only if asked."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ca.config import VaultAuth, VaultSettings
from ca.core import template
from ca.signers.base import SignerUnavailable
from ca.signers.vault import VaultIntermediateSigner, VaultSession
from identity import TrustDomain
from tests.clock import FakeClock

TD = TrustDomain("example.org")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


def from_vault(
    constrained: bool,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, list[x509.Certificate]]:
    """(intermediate, its key, [root]) as Vault's root/sign-intermediate would return them."""
    root_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = template.root(TD, root_key.public_key(), NOW, 1).sign(root_key, hashes.SHA256())
    builder = template.intermediate(TD, key.public_key(), root, NOW, 2, name_constraint=constrained)
    return builder.sign(root_key, hashes.SHA256()), key, [root]


def signer(name_constraints: bool) -> VaultIntermediateSigner:
    settings = VaultSettings(
        address="https://vault.invalid:8200",
        auth=VaultAuth(method="token"),
        name_constraints=name_constraints,
    )
    clock = FakeClock(NOW)
    return VaultIntermediateSigner(VaultSession(settings, clock), TD, clock)


@pytest.mark.parametrize("constrained", [False, True], ids=["plain", "constrained"])
def test_by_default_either_intermediate_is_accepted(constrained: bool) -> None:
    intermediate, key, roots = from_vault(constrained)
    signer(name_constraints=False)._check(intermediate, key, [], roots)


def test_when_asked_for_an_intermediate_without_the_constraint_is_refused() -> None:
    intermediate, key, roots = from_vault(constrained=False)
    with pytest.raises(SignerUnavailable, match=r"not limited to example\.org"):
        signer(name_constraints=True)._check(intermediate, key, [], roots)
    constrained, key, roots = from_vault(constrained=True)
    signer(name_constraints=True)._check(constrained, key, [], roots)


def test_an_intermediate_for_another_key_is_refused() -> None:
    intermediate, _, roots = from_vault(constrained=False)
    with pytest.raises(SignerUnavailable, match="unusable intermediate"):
        signer(name_constraints=False)._check(
            intermediate, ec.generate_private_key(ec.SECP256R1()), [], roots
        )
