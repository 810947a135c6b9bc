"""The mesh, compiled again shortly after the objects change, and the statuses it asks for.

Watch events come in bursts (a rollout changes a Pod, an EndpointSlice and
its Service at once): `MeshState` compiles once per burst, `BATCH` after the
first event, and wakes every subscriber waiting for a new mesh. Nothing is
compiled before every kind has been listed once: a mesh missing a namespace's
DENY policy would send agents a configuration that lets through what the
policy forbids.

`StatusWriter` replaces each object's status, whole, through the status
subresource when, and only when, it differs from the status the object has
(times of transition aside), so that its own write, seen again through the
watch, asks for nothing more. Whole: the status carries the version of a
policy in force (control.core.inforce), which a merge patch would corrupt.
The write carries the resourceVersion it judged: if the object changed
meanwhile (409) the newer one is judged again.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

from control.core.mesh import Mesh, MeshSettings, Objects
from control.informers import RESOURCES, ClusterApi, Conflict, Gone, Refused
from control.metrics import ControlMetrics
from identity.backoff import Backoff
from identity.kubewatch import call_in_thread

log = logging.getLogger("outrider.control")

#: From the first watch event of a burst to the compile that takes it in.
BATCH = 0.02


class Compile(Protocol):
    """control.core.mesh.compile_mesh: `previous` keeps each policy's last valid version
    in force while an edit of it is invalid; `now` stamps the conditions that change."""

    def __call__(
        self,
        objects: Objects,
        settings: MeshSettings,
        previous: Mesh | None = None,
        *,
        now: datetime | None = None,
    ) -> Mesh: ...


StatusKey = tuple[str, str, str]  # kind, namespace, name
WRITE_BACKOFF = Backoff(initial=timedelta(seconds=1), maximum=timedelta(seconds=30))


class MeshState:
    """The current mesh (None until the first compile) and a wake-up for each new one."""

    def __init__(
        self,
        objects: Callable[[], Objects],
        synced: Callable[[], bool],
        compile: Compile,
        settings: MeshSettings,
        metrics: ControlMetrics,
        *,
        on_compiled: Callable[[Mesh], None] = lambda mesh: None,
        batch: float = BATCH,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.mesh: Mesh | None = None
        self.generation = 0
        self._objects, self._synced = objects, synced
        self._compile, self._settings = compile, settings
        self._metrics = metrics
        self._on_compiled = on_compiled
        self._batch = batch
        self._clock = clock
        self._pending: asyncio.TimerHandle | None = None
        self._next = asyncio.Event()

    def changed(self) -> None:
        """Objects changed: compile within `batch`, once for the whole burst."""
        if self._pending is None:
            self._pending = asyncio.get_running_loop().call_later(self._batch, self._recompile)

    def next_mesh(self) -> asyncio.Event:
        """Set once a newer mesh than the current one is in place."""
        return self._next

    def _recompile(self) -> None:
        self._pending = None
        if not self._synced():
            return  # the last kind's first list calls `changed` again
        started = time.perf_counter()
        try:
            mesh = self._compile(self._objects(), self._settings, self.mesh, now=self._clock())
        except Exception:  # a bug in the compiler: keep serving the last mesh
            log.exception("cannot compile the mesh; keeping the previous one")
            return
        self._metrics.compiles.observe(time.perf_counter() - started)
        self.mesh = mesh
        self.generation += 1
        woken, self._next = self._next, asyncio.Event()
        woken.set()
        self._on_compiled(mesh)


def comparable(status: object) -> object:
    """`status` without lastTransitionTime anywhere: a write that changes only when a
    condition last changed changes nothing anyone acts on."""
    if isinstance(status, Mapping):
        return {k: comparable(v) for k, v in status.items() if k != "lastTransitionTime"}
    if isinstance(status, list):
        return [comparable(item) for item in status]
    return status


class StatusWriter:
    """Writes the statuses the mesh asks for, one at a time, retrying failures with backoff."""

    def __init__(
        self,
        api: ClusterApi,
        objects: Callable[[], Objects],
        metrics: ControlMetrics,
        *,
        backoff: Backoff = WRITE_BACKOFF,
        rng: random.Random | None = None,
    ) -> None:
        self._api = api
        self._objects = objects
        self._metrics = metrics
        self._backoff = backoff
        self._rng = rng or random.Random()  # noqa: S311 - jitter needs no secrecy
        self._pending: dict[StatusKey, Mapping[str, Any]] = {}
        # What was written last, at which resourceVersion of the object: until the
        # watch brings the object back with it, the cached status is older than ours.
        self._written: dict[StatusKey, tuple[str, object]] = {}
        # What the API server refused: the same status is not sent again.
        self._refused: dict[StatusKey, object] = {}
        self._wake = asyncio.Event()
        self.failures = 0
        self.conflicts = 0

    def offer(self, statuses: Mapping[StatusKey, Mapping[str, Any]]) -> None:
        """Queue every status that differs from its object's; forget what was written for,
        or refused of, objects the mesh no longer has (deleted ones, or the memory of
        every policy and route that ever existed would be kept)."""
        for memo in (self._written, self._refused):
            for key in memo.keys() - statuses.keys():
                del memo[key]
        self._pending = {key: s for key, s in statuses.items() if self._differs(key, s)}
        if self._pending:
            self._wake.set()

    def _current(self, key: StatusKey) -> Mapping[str, Any] | None:
        kind, namespace, name = key
        return self._objects().get(kind, {}).get((namespace, name))

    def _differs(self, key: StatusKey, status: Mapping[str, Any]) -> bool:
        obj = self._current(key)
        if obj is None:
            return False
        wanted = comparable(status)
        if comparable(obj.get("status") or {}) == wanted:
            return False
        if self._refused.get(key) == wanted:
            return False
        return self._written.get(key) != (_version(obj), wanted)

    @property
    def remembered(self) -> int:
        """How many objects' last write or refusal is kept."""
        return len(self._written.keys() | self._refused.keys())

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                key, status = next(iter(self._pending.items()))
                del self._pending[key]
                if self._differs(key, status):
                    await self._write(key, status)

    async def _write(self, key: StatusKey, status: Mapping[str, Any]) -> None:
        kind, namespace, name = key
        obj = self._current(key)
        assert obj is not None  # _differs checked, and nothing ran in between
        version = _version(obj)
        try:
            await call_in_thread(
                self._api.replace_status,
                RESOURCES[kind],
                {**obj, "status": dict(status)},
                name="outrider-status",
            )
        except Conflict:  # written meanwhile (the other replica?): judge the newer object
            self._metrics.status_writes.labels("conflict").inc()
            self._pending.setdefault(key, status)
            self.conflicts += 1
            delay = self._backoff.delay(self.conflicts, self._rng) / 10  # the watch is close
            await asyncio.sleep(delay.total_seconds())
            return
        except Gone:
            self._metrics.status_writes.labels("gone").inc()
            return
        except Refused as refused:  # a bug in the status or the CRD: say so once, never loop
            self._metrics.status_writes.labels("refused").inc()
            self._refused[key] = comparable(status)
            log.error("the API server refused the status of %s %s/%s: %s", *key, refused)
            return
        except Exception as error:
            self._metrics.status_writes.labels("failed").inc()
            self.failures += 1
            if self.failures == 1:
                log.warning("cannot write the status of %s %s/%s: %s", kind, namespace, name, error)
            self._pending.setdefault(key, status)  # unless a newer one came meanwhile
            delay = self._backoff.delay(self.failures, self._rng)
            await asyncio.sleep(delay.total_seconds())
            return
        if self.failures:
            log.info("status writes work again")
            self.failures = 0
        self.conflicts = 0
        self._metrics.status_writes.labels("written").inc()
        self._written[key] = (version, comparable(status))
        log.info("wrote the status of %s %s/%s", kind, namespace, name)


def _version(obj: Mapping[str, Any]) -> str:
    return str((obj.get("metadata") or {}).get("resourceVersion", ""))
