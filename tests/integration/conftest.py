"""One CA directory and one `ca serve` process per test module; and a control plane
that reads the module's `api` (a fake API server), for the modules that define one."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.apiserver import FakeApiServer
from tests.control_process import ControlProcess, control_plane, ready
from tests.interop import go_verify  # noqa: F401  (a fixture, shared by the modules here)
from tests.support import CaProcess, CaSetup, ca_process, make_ca_setup


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> CaSetup:
    return make_ca_setup(tmp_path_factory.mktemp("ca"))


@pytest.fixture(scope="module")
def ca(setup: CaSetup) -> Iterator[CaProcess]:
    with ca_process(setup.config) as process:
        yield process


@pytest.fixture
async def control(tmp_path: Path, api: FakeApiServer) -> AsyncIterator[ControlProcess]:
    """`outrider control serve` against the module's `api`, once it is ready."""
    async with control_plane(tmp_path, api) as process:
        await ready(process)
        yield process
