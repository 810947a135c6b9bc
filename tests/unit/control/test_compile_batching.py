"""The mesh is compiled once per burst of watch events, never before the cluster was read,
and a compiler that fails leaves the last mesh in force."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from control.core.mesh import Mesh, MeshSettings, Objects
from control.metrics import ControlMetrics
from control.sync import MeshState

SETTINGS = MeshSettings(trust_domain="example.org")
NOW = datetime(2026, 1, 1, tzinfo=UTC)


class Compiler:
    def __init__(self) -> None:
        self.calls: list[tuple[Mesh | None, datetime | None]] = []
        self.fail = False

    def __call__(
        self,
        objects: Objects,
        settings: MeshSettings,
        previous: Mesh | None = None,
        *,
        now: datetime | None = None,
    ) -> Mesh:
        self.calls.append((previous, now))
        if self.fail:
            raise RuntimeError("a bug")
        return Mesh()


def state(compiler: Compiler, synced: list[bool]) -> MeshState:
    return MeshState(
        lambda: {},
        lambda: synced[0],
        compiler,
        SETTINGS,
        ControlMetrics(),
        batch=0.01,
        clock=lambda: NOW,
    )


async def test_a_burst_of_changes_is_compiled_once_with_the_previous_mesh_and_the_time() -> None:
    compiler = Compiler()
    mesh = state(compiler, [True])
    woken = mesh.next_mesh()
    for _ in range(100):
        mesh.changed()
    await asyncio.wait_for(woken.wait(), 1)
    assert compiler.calls == [(None, NOW)]
    first = mesh.mesh
    mesh.changed()
    await asyncio.wait_for(mesh.next_mesh().wait(), 1)
    assert compiler.calls[1] == (first, NOW)
    assert mesh.generation == 2


async def test_nothing_is_compiled_before_every_kind_was_listed() -> None:
    compiler = Compiler()
    synced = [False]
    mesh = state(compiler, synced)
    mesh.changed()
    await asyncio.sleep(0.05)
    assert compiler.calls == [] and mesh.mesh is None
    synced[0] = True
    mesh.changed()  # the last kind's first list
    await asyncio.wait_for(mesh.next_mesh().wait(), 1)
    assert mesh.mesh is not None


async def test_a_compiler_that_fails_leaves_the_last_mesh_in_force() -> None:
    compiler = Compiler()
    mesh = state(compiler, [True])
    mesh.changed()
    await asyncio.wait_for(mesh.next_mesh().wait(), 1)
    good = mesh.mesh
    compiler.fail = True
    waiting = mesh.next_mesh()
    mesh.changed()
    await asyncio.sleep(0.05)
    assert len(compiler.calls) == 2
    assert mesh.mesh is good and not waiting.is_set()
