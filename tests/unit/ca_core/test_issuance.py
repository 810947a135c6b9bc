"""Lifetime arithmetic and the check of what a signer returned (pure, no sockets)."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from ca.core import template
from ca.core.issuance import IssuanceError, IssuancePolicy, TtlRejected, check_issued, plan_leaf
from ca.signers.local import LocalSigner, init_ca
from identity import SpiffeId, TrustDomain

NOW = datetime(2026, 11, 22, 12, 0, tzinfo=UTC)
TD = TrustDomain("example.org")
WEB = SpiffeId.for_workload(TD, "shop", "web")
FAR = NOW + timedelta(days=365)


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> LocalSigner:
    directory: Path = tmp_path_factory.mktemp("ca")
    init_ca(directory, TD, NOW - timedelta(days=1), force=False)
    return LocalSigner.load(directory)


def key() -> ec.EllipticCurvePublicKey:
    return ec.generate_private_key(ec.SECP256R1()).public_key()


@pytest.mark.parametrize(
    ("requested", "lifetime"),
    [
        (None, timedelta(hours=1)),
        (timedelta(0), timedelta(hours=1)),
        (timedelta(minutes=5), timedelta(minutes=5)),
        (timedelta(days=30), timedelta(hours=24)),
    ],
    ids=["default", "zero-means-default", "shorter", "capped"],
)
def test_plan_leaf_lifetime(requested, lifetime):
    request = plan_leaf(WEB, key(), requested, IssuancePolicy(), FAR, NOW, 7)
    assert request.not_after - NOW == lifetime
    assert request.not_before == NOW - timedelta(seconds=60)


def test_plan_leaf_never_outlives_the_issuer():
    issuer_end = NOW + timedelta(minutes=10)
    request = plan_leaf(WEB, key(), None, IssuancePolicy(), issuer_end, NOW, 7)
    assert request.not_after == issuer_end


def test_plan_leaf_refuses_negative_ttl_and_expired_issuer():
    with pytest.raises(TtlRejected, match="negative"):
        plan_leaf(WEB, key(), timedelta(seconds=-1), IssuancePolicy(), FAR, NOW, 7)
    with pytest.raises(IssuanceError, match="expired"):
        plan_leaf(WEB, key(), None, IssuancePolicy(), NOW, NOW, 7)


def test_a_faithful_signer_passes_the_check(signer: LocalSigner):
    request = plan_leaf(WEB, key(), None, IssuancePolicy(), FAR, NOW, 7)
    check_issued(request, signer.sign_leaf_now(request), signer.bundle, NOW)


def _sign(builder: x509.CertificateBuilder, signer: LocalSigner) -> x509.Certificate:
    return builder.sign(signer._key, hashes.SHA256())


def test_the_check_catches_a_signer_that_changed_the_identity(signer: LocalSigner):
    request = plan_leaf(WEB, key(), None, IssuancePolicy(), FAR, NOW, 7)
    other = dataclasses.replace(request, spiffe_id=SpiffeId.for_workload(TD, "shop", "admin"))
    chain = signer.sign_leaf_now(other)
    with pytest.raises(IssuanceError, match="names spiffe://example"):
        check_issued(request, chain, signer.bundle, NOW)


def test_the_check_catches_a_swapped_key(signer: LocalSigner):
    request = plan_leaf(WEB, key(), None, IssuancePolicy(), FAR, NOW, 7)
    chain = signer.sign_leaf_now(dataclasses.replace(request, public_key=key()))
    with pytest.raises(IssuanceError, match="different public key"):
        check_issued(request, chain, signer.bundle, NOW)


def test_the_check_catches_a_longer_life(signer: LocalSigner):
    request = plan_leaf(WEB, key(), None, IssuancePolicy(), FAR, NOW, 7)
    longer = dataclasses.replace(request, not_after=request.not_after + timedelta(hours=1))
    with pytest.raises(IssuanceError, match="outlives"):
        check_issued(request, signer.sign_leaf_now(longer), signer.bundle, NOW)


def test_the_check_catches_a_ca_certificate(signer: LocalSigner):
    request = plan_leaf(WEB, key(), None, IssuancePolicy(), FAR, NOW, 7)
    leaf = template.leaf(request, signer.issuer)
    leaf._extensions = [e for e in leaf._extensions if e.oid != x509.BasicConstraints.oid]
    leaf = leaf.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    with pytest.raises(IssuanceError, match="not a valid X"):
        check_issued(request, (_sign(leaf, signer), signer.issuer), signer.bundle, NOW)


def test_the_check_catches_a_chain_that_does_not_link(signer: LocalSigner, tmp_path: Path):
    init_ca(tmp_path, TD, NOW - timedelta(days=1), force=False)
    stranger = LocalSigner.load(tmp_path)
    request = plan_leaf(WEB, key(), None, IssuancePolicy(), FAR, NOW, 7)
    (leaf, _) = stranger.sign_leaf_now(request)
    with pytest.raises(IssuanceError, match="does not lead to a root"):
        check_issued(request, (leaf, signer.issuer), signer.bundle, NOW)
    with pytest.raises(IssuanceError, match="root of the trust bundle"):
        check_issued(request, stranger.sign_leaf_now(request), signer.bundle, NOW)
