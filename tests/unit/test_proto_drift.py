"""The committed protocol code is what `make proto` makes from identity/proto/*.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from identity.proto.generate import OUTPUTS, PROTO_DIR, generate


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run of protoc for every file compared (each run takes about half a second)."""
    out = tmp_path_factory.mktemp("proto")
    generate(out)
    return out


@pytest.mark.parametrize("name", OUTPUTS)
def test_generated_code_matches_the_proto(generated: Path, name: str):
    committed = (PROTO_DIR / name).read_text()
    assert (generated / name).read_text() == committed, (
        f"identity/proto/{name} is stale: run `make proto` and commit the result"
    )
