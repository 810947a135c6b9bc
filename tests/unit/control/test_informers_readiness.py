"""The informers are synced once every kind is listed or known missing, whichever comes last.

A kind the API does not serve (Gateway API not installed) is found missing by its
404, which may come after every other kind is listed: the change that makes the
informers synced must still be announced, or the control plane never compiles its
first mesh and is never ready.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

from control.informers import Informers, NotInstalled, Resource

NOT_SERVED = {"HTTPRoute", "GRPCRoute"}


class Watch:
    """A watch that sends nothing until it is interrupted."""

    def __init__(self) -> None:
        self._ended = threading.Event()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._ended.wait(timeout=10)
        return iter(())

    def interrupt(self) -> None:
        self._ended.set()


class LateNotFound:
    """Serves every kind but the Gateway API ones, whose 404s come after every list."""

    def __init__(self, served: int) -> None:
        self._served, self._listed = served, 0
        self._lock = threading.Lock()
        self._all_listed = threading.Event()

    def list(self, resource: Resource) -> tuple[list[dict[str, Any]], str]:
        if resource.kind in NOT_SERVED:
            self._all_listed.wait(timeout=10)
            raise NotInstalled(resource.kind)
        with self._lock:
            self._listed += 1
            if self._listed == self._served:
                self._all_listed.set()
        return [], "1"

    def watch(self, resource: Resource, resource_version: str) -> Watch:
        return Watch()

    def replace_status(self, resource: Resource, obj: Any) -> None:
        raise AssertionError("not in this test")


async def test_kinds_found_missing_after_the_last_list_still_announce_the_sync() -> None:
    from control.core.mesh import KINDS

    api = LateNotFound(served=len(set(KINDS) - NOT_SERVED))
    synced_at_a_change = asyncio.Event()
    informers: Informers

    def changed() -> None:
        if informers.synced():
            synced_at_a_change.set()

    informers = Informers(api, changed, not_installed_retry=3600, not_found_confirm=0.01)
    running = asyncio.create_task(informers.run())
    try:
        await asyncio.wait_for(synced_at_a_change.wait(), timeout=5)
        assert informers.missing == NOT_SERVED
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


class OneNotFound(LateNotFound):
    """Serves every kind; HTTPRoute's first list is a 404, as a kube-apiserver that
    just restarted answers for a custom resource that exists."""

    def __init__(self) -> None:
        super().__init__(served=0)
        self.not_found = 1

    def list(self, resource: Resource) -> tuple[list[dict[str, Any]], str]:
        if resource.kind == "HTTPRoute" and self.not_found:
            self.not_found -= 1
            raise NotInstalled(resource.kind)
        return [{"metadata": {"name": "a", "namespace": "shop"}}], "1"


async def test_a_404_for_a_route_kind_that_exists_holds_the_sync_until_it_is_listed() -> None:
    """One 404 is no proof a CRD is missing: the informers are not synced (no mesh is
    compiled, the control plane is not ready) until HTTPRoute is listed, so the first
    mesh carries its routes instead of leaving them out for NOT_INSTALLED_RETRY."""
    api = OneNotFound()
    synced = asyncio.Event()
    informers: Informers
    seen_at_sync: list[int] = []

    def changed() -> None:
        if informers.synced() and not synced.is_set():
            seen_at_sync.append(len(informers.caches["HTTPRoute"]))
            synced.set()

    informers = Informers(api, changed, not_installed_retry=3600, not_found_confirm=0.01)
    running = asyncio.create_task(informers.run())
    try:
        await asyncio.wait_for(synced.wait(), timeout=5)
        assert seen_at_sync == [1] and not informers.missing
    finally:
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
