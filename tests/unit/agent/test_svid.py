"""accept_svid: the agent checks what the CA sent back before it uses it."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.core.svid import Svid, SvidRejected, accept_svid
from ca.signers.local import LocalSigner
from identity import SpiffeId
from identity.cert import Cert, PrivateKey
from tests.unit.agent.pki import NOW, TD, WEB, agent_key, bundle_der, make_signer, sign_leaf


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> LocalSigner:
    """Another CA for the same trust domain, which our bundle does not hold."""
    return make_signer(tmp_path_factory.mktemp("stranger"))


@pytest.fixture(scope="module")
def key() -> PrivateKey:
    return agent_key()


def refusal(*args: object) -> SvidRejected:
    with pytest.raises(SvidRejected) as info:
        accept_svid(*args)  # type: ignore[arg-type]
    return info.value


def test_a_good_answer_is_accepted(signer: LocalSigner, key: PrivateKey) -> None:
    chain = sign_leaf(signer, key)
    svid = accept_svid(chain, bundle_der(signer), key, WEB, NOW)
    assert svid.spiffe_id == WEB
    assert svid.key is key
    assert svid.bundle == signer.bundle
    assert [c.der for c in svid.chain] == list(chain)
    assert svid.leaf is svid.chain[0]
    assert svid.not_after == NOW + timedelta(hours=1)
    assert svid.serial == f"{svid.leaf.serial:x}"


def test_an_answer_is_accepted_until_its_last_second(signer: LocalSigner, key: PrivateKey) -> None:
    chain = sign_leaf(signer, key)
    accept_svid(chain, bundle_der(signer), key, WEB, NOW + timedelta(minutes=59))


def test_the_repr_never_shows_key_material(svid: Svid) -> None:
    loaded = serialization.load_der_private_key(svid.key.der, password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    private = loaded.private_numbers().private_value
    secrets = [
        str(private),
        f"{private:x}",
        svid.key_pem().decode(),
        svid.key_pem().decode().splitlines()[1],  # the first line of base64
    ]
    for text in (repr(svid), str(svid), f"{svid!r}", f"{[svid]}"):
        assert "key=..." in text
        assert str(WEB) in text
        for secret in secrets:
            assert secret not in text


def test_chain_and_key_pem_round_trip(svid: Svid) -> None:
    loaded_chain = x509.load_pem_x509_certificates(svid.chain_pem())
    assert [c.public_bytes(serialization.Encoding.DER) for c in loaded_chain] == [
        c.der for c in svid.chain
    ]
    loaded = serialization.load_pem_private_key(svid.key_pem(), password=None)
    assert (
        loaded.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        == svid.key.der
    )


def test_a_chain_from_a_foreign_ca_is_refused(
    signer: LocalSigner, stranger: LocalSigner, key: PrivateKey
) -> None:
    chain = sign_leaf(stranger, key)
    assert refusal(chain, bundle_der(signer), key, WEB, NOW).reason == "untrusted_chain"


def test_a_leaf_alone_from_a_foreign_ca_is_refused(
    signer: LocalSigner, stranger: LocalSigner, key: PrivateKey
) -> None:
    leaf = sign_leaf(stranger, key)[:1]
    assert refusal(leaf, bundle_der(signer), key, WEB, NOW).reason == "untrusted_chain"


def test_a_leaf_spliced_onto_our_intermediate_is_refused(
    signer: LocalSigner, stranger: LocalSigner, key: PrivateKey
) -> None:
    (leaf, _) = sign_leaf(stranger, key)
    (_, ours) = sign_leaf(signer, key)
    assert refusal((leaf, ours), bundle_der(signer), key, WEB, NOW).reason == "untrusted_chain"


@pytest.mark.parametrize(
    "issued",
    [
        pytest.param(SpiffeId.for_workload(TD, "shop", "admin"), id="other-workload"),
        pytest.param(SpiffeId.parse("spiffe://example.org/ns/shop/sa/web/x"), id="child-path"),
        pytest.param(SpiffeId.parse("spiffe://other.org/ns/shop/sa/web"), id="other-domain"),
    ],
)
def test_an_svid_for_another_id_is_refused(
    signer: LocalSigner, key: PrivateKey, issued: SpiffeId
) -> None:
    chain = sign_leaf(signer, key, issued)
    error = refusal(chain, bundle_der(signer), key, WEB, NOW)
    assert error.reason == "wrong_id"
    assert str(issued) in str(error)


def test_an_svid_for_another_key_is_refused(signer: LocalSigner, key: PrivateKey) -> None:
    chain = sign_leaf(signer, agent_key())
    assert refusal(chain, bundle_der(signer), key, WEB, NOW).reason == "wrong_key"


@pytest.mark.parametrize(
    ("now", "reason"),
    [
        pytest.param(NOW + timedelta(hours=1, seconds=1), "expired", id="expired"),
        pytest.param(NOW + timedelta(days=30), "expired", id="long-expired"),
        pytest.param(NOW - timedelta(hours=1), "not_yet_valid", id="not-yet-valid"),
    ],
)
def test_an_svid_outside_its_validity_is_refused(
    signer: LocalSigner, key: PrivateKey, now: datetime, reason: str
) -> None:
    chain = sign_leaf(signer, key)
    assert refusal(chain, bundle_der(signer), key, WEB, now).reason == reason


def test_a_chain_whose_intermediate_has_expired_is_refused(
    signer: LocalSigner, key: PrivateKey
) -> None:
    """The leaf is valid, its intermediate is not: every peer's handshake would refuse it,
    so it must not replace the SVID in use (the chain check itself ignores time)."""
    chain = sign_leaf(signer, key, lifetime=timedelta(days=4000))
    intermediate = Cert.from_der(chain[1])
    later = intermediate.not_after + timedelta(days=1)
    error = refusal(chain, bundle_der(signer), key, WEB, later)
    assert error.reason == "expired_chain"
    assert intermediate.subject in str(error)
    accept_svid(chain, bundle_der(signer), key, WEB, intermediate.not_after - timedelta(days=1))


def test_a_ca_certificate_is_not_an_svid(signer: LocalSigner, key: PrivateKey) -> None:
    (_, intermediate) = sign_leaf(signer, key)
    error = refusal((intermediate,), bundle_der(signer), key, WEB, NOW)
    assert error.reason == "invalid_spiffe_id"  # a trust domain's own ID, which only a CA has


@pytest.mark.parametrize(
    ("chain", "bundle"),
    [
        pytest.param([b"not a certificate"], None, id="junk-leaf"),
        pytest.param([b""], None, id="empty-bytes"),
        pytest.param("truncated", None, id="truncated-leaf"),
        pytest.param([], None, id="empty-chain"),
        pytest.param(None, [b"junk"], id="junk-bundle"),
        pytest.param(None, [], id="empty-bundle"),
        pytest.param(None, "leaf-as-bundle", id="bundle-holds-a-leaf"),
    ],
)
def test_an_answer_that_does_not_parse_is_malformed(
    signer: LocalSigner, key: PrivateKey, chain: object, bundle: object
) -> None:
    good = sign_leaf(signer, key)
    if chain is None:
        chain = good
    elif chain == "truncated":
        chain = [good[0][: len(good[0]) // 2], good[1]]
    if bundle is None:
        bundle = bundle_der(signer)
    elif bundle == "leaf-as-bundle":
        bundle = good[:1]
    assert refusal(chain, bundle, key, WEB, NOW).reason == "malformed"


def test_the_bundle_is_read_for_the_expected_trust_domain(
    signer: LocalSigner, key: PrivateKey
) -> None:
    svid = accept_svid(sign_leaf(signer, key), bundle_der(signer), key, WEB, NOW)
    assert svid.bundle.trust_domain == WEB.trust_domain
