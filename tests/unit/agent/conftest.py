"""Session fixtures: one CA in a temporary directory, and one SVID it signed."""

from __future__ import annotations

import pytest

from agent.core.svid import Svid, accept_svid
from ca.signers.local import LocalSigner
from tests.unit.agent.pki import NOW, WEB, agent_key, bundle_der, sign_leaf


@pytest.fixture(scope="session")
def svid(signer: LocalSigner) -> Svid:
    key = agent_key()
    return accept_svid(sign_leaf(signer, key), bundle_der(signer), key, WEB, NOW)
