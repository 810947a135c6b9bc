"""Every async test runs on uvloop, the event loop the agent and the CA run on; `pods`, `nft`;
property tests (hypothesis) judged on what they find, never on how long an example took."""

from __future__ import annotations

import asyncio
import subprocess
import time
import tomllib
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path

import pytest
import uvloop
from hypothesis import HealthCheck, settings

from identity import openssl_engine
from tests.interop import ensure_command
from tests.netns import PodNetwork, pod_network
from tests.support import waited_for_a_cpu

# Hypothesis fails an example that takes over 200 ms, and a run whose data generation is
# slow: on two cores shared by two xdist workers and real processes, that is the
# scheduler, not the code under test (properties flaked that way under load). Speed is
# measured in bench/, not asserted in tests.
settings.register_profile("outrider", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("outrider")


ROOT = Path(__file__).resolve().parent.parent


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stops a run that would test stale compiled modules: an extension built by `make`
    (setup.py) imports instead of its .py file, so an edit since would go untested.
    Gives EC keys OpenSSL's built-in method, as every agent process does
    (identity.openssl_engine), so handshakes in tests are the agent's."""
    openssl_engine.install()
    with open(ROOT / "pyproject.toml", "rb") as f:
        compiled = tomllib.load(f)["tool"]["outrider"]["compiled"]
    # A module's own .so only loads the group's library (agent/*__mypyc*.so), which holds
    # the code: rebuilt, it is new even where the module's loader is not.
    groups = [p.stat().st_mtime for p in (ROOT / "agent").glob("*__mypyc.*.so")]
    for name in compiled:
        source = ROOT / name
        for built in source.parent.glob(f"{source.stem}.*.so"):
            if max([built.stat().st_mtime, *groups]) < source.stat().st_mtime:
                pytest.exit(
                    f"{name} changed after it was compiled: run `make compiled` to build it "
                    "again (or `make pure` to test everything as Python)",
                    returncode=4,
                )


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def watchdog() -> AsyncIterator[None]:
    """Fails the test if anything holds the event loop for more than 100 ms.

    Time the loop's thread waited for a CPU is not counted: on a machine busy with
    other tests (two pytest-xdist workers on two cores) that is the scheduler, not
    code holding the loop. Code running on the loop, blocking calls and the GIL held
    by another thread all still count."""
    worst = 0.0

    async def tick() -> None:
        nonlocal worst
        while True:
            before, queued = time.perf_counter(), waited_for_a_cpu()
            await asyncio.sleep(0.005)
            late = time.perf_counter() - before - 0.005
            worst = max(worst, late - (waited_for_a_cpu() - queued))

    task = asyncio.create_task(tick())
    yield
    task.cancel()
    assert worst < 0.1, f"event loop blocked for {worst:.3f}s"


@pytest.fixture
def pods() -> Iterator[PodNetwork]:
    """A node (this machine, at `pods.node_ip`) and pods made by `pods.add_pod(name)`, each
    a network namespace of its own (tests/netns.py); all removed after the test."""
    with pod_network() as network:
        yield network


@pytest.fixture(scope="session")
def nft() -> str:
    """The path of `nft`, installed (Debian's nftables) when missing: the capture tests
    run real rules and must not skip on a fresh CI machine."""
    return ensure_command("nft", "nftables")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs of its own, so that the test can fill it (`tests.support.fill_disk`)."""
    mountpoint = tmp_path / "disk"
    mountpoint.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(mountpoint)]
    subprocess.run(mount, check=True)  # as root, as the suite runs: never skipped
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=True)
