"""One CA directory and one `ca serve` process per test module; and a control plane
that reads the module's `api` (a fake API server), for the modules that define one:
`control` for each test, `shared_control` (reading `shared_api`) once per module, for
the tests that change nothing it holds (refusals)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

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


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_control(
    tmp_path_factory: pytest.TempPathFactory, shared_api: FakeApiServer
) -> AsyncIterator[ControlProcess]:
    """One `outrider control serve` against the module's `shared_api`, for every test of
    the module that only reads (each starts in ~1.5 s, more than such a test takes).
    Its tests run on the module's event loop: `@pytest.mark.asyncio(loop_scope="module")`."""
    async with control_plane(tmp_path_factory.mktemp("control"), shared_api) as process:
        await ready(process)
        yield process
