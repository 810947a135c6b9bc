"""An SVID chain from `outrider ca init` verifies in OpenSSL, Go and Python cryptography.

A critical URI name constraint in the intermediate made Python
cryptography's verifier and rustls-webpki refuse every chain, so `ca init`
leaves it out unless asked (`--name-constraints`). These stacks verify the
chain as a peer would: strict X.509, the client and server purposes.
"""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.verification import PolicyBuilder, Store

from tests.interop import GoVerify

SPIFFE_ID = "spiffe://example.org/ns/shop/sa/web"


def outrider(*args: str | Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "outrider", *map(str, args)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr


def openssl_verify(svid: Path, purpose: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", "verify", "-x509_strict", "-purpose", purpose,
         "-CAfile", svid / "bundle.pem", "-untrusted", svid / "svid.pem", svid / "leaf.pem"],
        capture_output=True, text=True,
    )  # fmt: skip


def mint(tmp_path: Path, *init_flags: str, spiffe_id: str = SPIFFE_ID) -> Path:
    """`ca init` then `ca mint`, as a user runs them: svid.pem, bundle.pem and leaf.pem."""
    ca, out = tmp_path / "ca", tmp_path / "svid"
    outrider("ca", "init", "--trust-domain", "example.org", "--dir", ca, *init_flags)
    outrider("ca", "mint", "--dir", ca, "--spiffe-id", spiffe_id, "--out", out)
    leaf = x509.load_pem_x509_certificates((out / "svid.pem").read_bytes())[0]
    (out / "leaf.pem").write_bytes(leaf.public_bytes(Encoding.PEM))
    return out


@pytest.fixture(scope="module")
def svid(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return mint(tmp_path_factory.mktemp("default"))


@pytest.mark.parametrize("purpose", ["sslclient", "sslserver"])
def test_openssl_verifies_the_chain(svid: Path, purpose: str) -> None:
    verified = openssl_verify(svid, purpose)
    assert verified.returncode == 0, verified.stderr


@pytest.mark.parametrize("usage", ["client", "server"])
def test_go_verifies_the_chain(svid: Path, go_verify: GoVerify, usage: str) -> None:
    verified = go_verify(svid / "bundle.pem", svid / "svid.pem", usage)
    assert verified.returncode == 0, verified.stderr


def test_python_cryptography_verifies_the_chain(svid: Path) -> None:
    """The client verifier: a server verifier needs a DNS or IP name, and SVIDs carry a URI."""
    roots = x509.load_pem_x509_certificates((svid / "bundle.pem").read_bytes())
    leaf, *intermediates = x509.load_pem_x509_certificates((svid / "svid.pem").read_bytes())
    verifier = PolicyBuilder().store(Store(roots)).time(datetime.now(UTC)).build_client_verifier()
    verified = verifier.verify(leaf, intermediates)
    assert verified.chain[-1] == roots[0]
    assert verified.subjects == [x509.UniformResourceIdentifier(SPIFFE_ID)]


def test_with_name_constraints_the_intermediate_carries_one_openssl_enforces(
    tmp_path: Path,
) -> None:
    svid = mint(tmp_path, "--name-constraints")
    intermediate = x509.load_pem_x509_certificates((svid / "svid.pem").read_bytes())[1]
    constraint = intermediate.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraint.critical
    assert constraint.value.permitted_subtrees == [x509.UniformResourceIdentifier("example.org")]
    for purpose in ("sslclient", "sslserver"):
        verified = openssl_verify(svid, purpose)
        assert verified.returncode == 0, verified.stderr
