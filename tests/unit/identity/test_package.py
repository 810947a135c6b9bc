"""The package's public surface: what other parts of Outrider import."""

from __future__ import annotations

import importlib

import identity.bundle
import identity.rotation
import identity.spiffe_id
import identity.svid

EXPECTED = {
    "TrustDomain": identity.spiffe_id.TrustDomain,
    "SpiffeId": identity.spiffe_id.SpiffeId,
    "InvalidSpiffeId": identity.spiffe_id.InvalidSpiffeId,
    "check_leaf": identity.svid.check_leaf,
    "spiffe_id_of": identity.svid.spiffe_id_of,
    "SvidError": identity.svid.SvidError,
    "TrustBundle": identity.bundle.TrustBundle,
    "BundleError": identity.bundle.BundleError,
    "refresh_at": identity.rotation.refresh_at,
}


def test_package_reexports_the_public_api() -> None:
    package = importlib.import_module("identity")
    assert package.__file__ is not None
    assert not package.__file__.replace("\\", "/").endswith("tests/unit/identity/__init__.py"), (
        "the test package tests/unit/identity is being imported as `identity` and shadows the"
        " real package; tests/ and tests/unit/ need an __init__.py (or pytest needs"
        " --import-mode=importlib)"
    )
    assert set(package.__all__) == set(EXPECTED)
    for name, value in EXPECTED.items():
        assert getattr(package, name) is value, name
