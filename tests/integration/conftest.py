"""One CA directory and one `ca serve` process per test module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.interop import go_verify  # noqa: F401  (a fixture, shared by the modules here)
from tests.support import CaProcess, CaSetup, ca_process, make_ca_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> CaSetup:
    return make_ca_setup(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def ca(setup: CaSetup) -> Iterator[CaProcess]:
    with ca_process(setup.config) as process:
        yield process
