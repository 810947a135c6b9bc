"""A CA directory the CA cannot use is refused at start, saying what is wrong with it, never
with a traceback, and never with advice (`outrider ca init`) that would replace the root."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from ca.signers.local import CaDirectoryError, LocalSigner
from tests.support import make_ca_setup, run_outrider


def encrypt_key(directory: Path) -> None:
    path = directory / "intermediate.key"
    key = serialization.load_pem_private_key(path.read_bytes(), None)
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )


def other_cas_bundle(directory: Path) -> None:
    other = make_ca_setup(directory.parent / "other")
    (directory / "bundle.pem").write_bytes(other.bundle_pem)


BROKEN = {
    "encrypted-key": (encrypt_key, "is encrypted"),
    "empty-bundle": (lambda d: (d / "bundle.pem").write_bytes(b""), "bundle.pem"),
    "bundle-not-pem": (lambda d: (d / "bundle.pem").write_bytes(b"\x30\x82junk"), "bundle.pem"),
    "another-cas-bundle": (other_cas_bundle, "bundle.pem"),
}


@pytest.mark.parametrize("case", BROKEN, ids=list(BROKEN))
def test_a_ca_directory_it_cannot_use_is_refused_with_what_is_wrong(
    tmp_path: Path, case: str
) -> None:
    setup = make_ca_setup(tmp_path / "ca")
    breaks, said = BROKEN[case]
    breaks(setup.ca_dir)
    with pytest.raises(CaDirectoryError, match=said) as refused:
        LocalSigner.load(setup.ca_dir)
    assert "ca init" not in str(refused.value)  # the directory is there: never replace it
    served = run_outrider("ca", "serve", "--config", setup.config, timeout=60)
    assert served.returncode == 2 and said in served.stderr
    assert "Traceback" not in served.stderr
