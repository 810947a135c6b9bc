"""The roots that verify peers: those both the CA and the bundle file list."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from agent.core.trust import peer_bundle
from ca.signers.local import init_ca
from identity import BundleError, TrustBundle, TrustDomain

TD = TrustDomain("example.org")


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> list[TrustBundle]:
    """Three single-root bundles of example.org: a, b, c."""
    made = []
    for name in "abc":
        directory = tmp_path_factory.mktemp(name)
        init_ca(directory, TD, datetime.now(UTC), force=False)
        made.append(TrustBundle.from_pem(TD, Path(directory / "root.pem").read_bytes()))
    return made


def bundle(*parts: TrustBundle) -> TrustBundle:
    return TrustBundle(TD, tuple(root for part in parts for root in part.roots))


@pytest.mark.parametrize(
    ("ca", "file", "trusted"),
    [
        ("ab", "ab", "ab"),
        ("ab", "a", "a"),  # removed from the file: the CA still lists it
        ("a", "ab", "a"),  # removed from the CA: the file still lists it
        ("ab", "bc", "b"),  # c is not trusted until the CA lists it too
        ("ba", "ab", "ba"),  # the CA's order
    ],
)
def test_a_root_is_trusted_only_while_both_list_it(
    roots: list[TrustBundle], ca: str, file: str, trusted: str
) -> None:
    pick = {"abc"[i]: roots[i] for i in range(3)}
    result = peer_bundle(bundle(*(pick[n] for n in ca)), bundle(*(pick[n] for n in file)))
    assert result == bundle(*(pick[n] for n in trusted))


def test_no_shared_root_is_an_error(roots: list[TrustBundle]) -> None:
    with pytest.raises(BundleError, match="no root is in both"):
        peer_bundle(roots[0], roots[1])


def test_another_trust_domains_bundle_is_an_error(roots: list[TrustBundle]) -> None:
    other = TrustBundle(TrustDomain("other.org"), roots[0].roots)
    with pytest.raises(BundleError, match=r"other\.org"):
        peer_bundle(roots[0], other)
