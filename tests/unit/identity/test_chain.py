"""check_chain: a chain handed over by a CA or a signer leads to the trust bundle, and
every certificate in it is on the way (as the signature walk it replaced required)."""

from __future__ import annotations

import pytest

import identity.chain
from ca.signers.local import LocalSigner
from identity.cert import Cert
from identity.chain import ChainError, check_chain
from tests.unit.agent import pki


def certs(ders: tuple[bytes, ...]) -> list[Cert]:
    return [Cert.from_der(der) for der in ders]


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> LocalSigner:
    """Another CA of the same trust domain: its certificates bear our CA's names."""
    return pki.make_signer(tmp_path_factory.mktemp("stranger"))


@pytest.fixture(scope="module")
def chain(signer: LocalSigner) -> list[Cert]:
    return certs(pki.sign_leaf(signer, pki.new_key()))


def refusal(chain: list[Cert], signer: LocalSigner) -> str:
    with pytest.raises(ChainError) as refused:
        check_chain(chain, signer.bundle)
    return str(refused.value)


def test_a_chain_of_our_ca_leads_to_the_bundle(signer: LocalSigner, chain: list[Cert]) -> None:
    check_chain(chain, signer.bundle)
    check_chain([*chain, *signer.bundle.roots], signer.bundle)  # the root sent along


def test_an_empty_chain_is_refused(signer: LocalSigner) -> None:
    assert refusal([], signer) == "the chain is empty"


def test_a_chain_of_another_ca_is_refused(signer: LocalSigner, stranger: LocalSigner) -> None:
    theirs = certs(pki.sign_leaf(stranger, pki.new_key()))
    assert "does not lead to a root of the trust bundle" in refusal(theirs, signer)
    assert "does not lead to a root" in refusal(theirs[:1], signer)


def test_a_stray_certificate_after_a_good_chain_is_refused(
    signer: LocalSigner, stranger: LocalSigner, chain: list[Cert]
) -> None:
    """Their root has our root's name: OpenSSL would verify the leaf and intermediate
    and pass over it, the old walk refused it (our intermediate is not signed by it)."""
    (their_root,) = stranger.bundle.roots
    assert chain[1].issuer == their_root.subject
    assert "does not lead to a root" in refusal([*chain, their_root], signer)


def test_a_certificate_that_is_not_the_issuer_is_refused(
    signer: LocalSigner, chain: list[Cert]
) -> None:
    """The leaf, then the root: the root did not issue the leaf (the intermediate did)."""
    (root,) = signer.bundle.roots
    assert "is not issued by the next cert" in refusal([chain[0], root], signer)


def test_a_leaf_spliced_onto_our_intermediate_is_refused(
    signer: LocalSigner, stranger: LocalSigner, chain: list[Cert]
) -> None:
    (their_leaf, _) = certs(pki.sign_leaf(stranger, pki.new_key()))
    assert "does not lead to a root" in refusal([their_leaf, chain[1]], signer)


def test_a_rotation_verifies_the_intermediate_once(signer: LocalSigner) -> None:
    check_chain(certs(pki.sign_leaf(signer, pki.new_key())), signer.bundle)
    before = identity.chain._ca_verdict.cache_info()
    for _ in range(3):
        check_chain(certs(pki.sign_leaf(signer, pki.new_key())), signer.bundle)
    after = identity.chain._ca_verdict.cache_info()
    assert (after.hits - before.hits, after.misses - before.misses) == (3, 0)
