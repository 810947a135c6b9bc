"""One CA for the unit tests: a directory of `outrider ca init` and its signer."""

from __future__ import annotations

from pathlib import Path

import pytest

from ca.signers.local import LocalSigner
from tests.unit.agent.pki import make_signer


@pytest.fixture(scope="session")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root, intermediate and their keys, as `outrider ca init` writes them."""
    directory = tmp_path_factory.mktemp("ca")
    make_signer(directory)
    return directory


@pytest.fixture(scope="session")
def signer(ca_dir: Path) -> LocalSigner:
    return LocalSigner.load(ca_dir)
