"""The control plane's full garbage collections run on its schedule, not inside pushes:
cycles are still freed, and the collector's own heuristic is back once serving ends."""

from __future__ import annotations

import asyncio
import gc
import time
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from control.app import collect_fully


class Node:
    """Garbage only the cycle collector frees: it refers to itself."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def full_collections() -> Iterator[list[float]]:
    """The start time of each collection of the oldest generation, as it runs."""
    started: list[float] = []

    def seen(phase: str, info: dict[str, Any]) -> None:
        if phase == "start" and info["generation"] == 2:
            started.append(time.monotonic())

    gc.callbacks.append(seen)
    yield started
    gc.callbacks.remove(seen)


async def test_cycles_are_freed_on_the_schedule_and_by_no_heuristic(
    full_collections: list[float],
) -> None:
    running = asyncio.create_task(collect_fully(every=0.2, look=0.01, allocated=lambda: 0))
    await asyncio.sleep(0)  # it has set the thresholds
    try:
        holder = [Node()]
        freed = weakref.ref(holder[0])
        gc.collect(1)  # the cycle, still held, is moved to the oldest generation
        holder.clear()  # garbage there: a full collection alone frees it
        # Survivors enough for the heuristic to collect the oldest generation many times.
        kept = [[Node() for _ in range(1_000)] for _ in range(300)]
        assert full_collections == []
        assert freed() is not None
        for _ in range(200):  # the schedule's 0.2 s, ten times over
            if freed() is None:
                break
            await asyncio.sleep(0.01)
        assert freed() is None
        assert len(full_collections) == 1  # the schedule's
        del kept
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running


async def test_allocations_grown_by_a_quarter_are_collected_at_once(
    full_collections: list[float],
) -> None:
    """A fleet that reconnects at once leaves its old connections' cycles behind: they go
    when Python's allocations have grown by a quarter, not a minute later."""
    blocks = [100_000]
    running = asyncio.create_task(collect_fully(every=60, look=0.01, allocated=lambda: blocks[0]))
    try:
        await asyncio.sleep(0.1)
        blocks[0] = 124_000
        await asyncio.sleep(0.1)
        assert full_collections == []
        blocks[0] = 126_000
        for _ in range(100):
            if full_collections:
                break
            await asyncio.sleep(0.01)
        assert len(full_collections) == 1
        await asyncio.sleep(0.1)  # counted again after it: 126,000 is the new base
        assert len(full_collections) == 1
    finally:
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running


async def test_the_heuristic_is_back_when_the_last_schedule_ends() -> None:
    """As it was before the first, however many ran at once (serve() twice in a test)."""
    before = gc.get_threshold()
    gc.set_threshold(*before[:2], 50)
    try:
        first = asyncio.create_task(collect_fully(every=60))
        await asyncio.sleep(0)
        second = asyncio.create_task(collect_fully(every=60))
        await asyncio.sleep(0)
        assert gc.get_threshold()[:2] == before[:2]  # the younger generations as before
        for running in (first, second):
            assert gc.get_threshold()[2] > 1_000_000
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
        assert gc.get_threshold() == (*before[:2], 50)
    finally:
        gc.set_threshold(*before)
