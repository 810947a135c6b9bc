"""The committed protocol code is what `make proto` makes from ca.proto."""

from __future__ import annotations

from pathlib import Path

import pytest

from identity.proto.generate import OUTPUTS, PROTO_DIR, generate


@pytest.mark.parametrize("name", OUTPUTS)
def test_generated_code_matches_the_proto(tmp_path: Path, name: str):
    generate(tmp_path)
    committed = (PROTO_DIR / name).read_text()
    assert (tmp_path / name).read_text() == committed, (
        f"identity/proto/{name} is stale: run `make proto` and commit the result"
    )
