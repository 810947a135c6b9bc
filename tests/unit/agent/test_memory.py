"""The agent hands freed memory back while connections churn, and leaves an idle heap alone."""

from __future__ import annotations

import asyncio

import pytest

from agent.adapters import memory


async def test_the_heap_is_trimmed_only_after_connections_came_and_went(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "TRIM_INTERVAL", 0.01)
    accepted, trims = [0], []
    task = asyncio.create_task(
        memory.return_freed_memory(lambda: accepted[0], lambda pad: trims.append(pad) or 1)
    )
    await asyncio.sleep(0.05)
    assert trims == []  # idle: nothing to give back
    accepted[0] += 3
    await asyncio.sleep(0.05)
    assert trims == [0]  # once for the churn, not on every tick after it
    task.cancel()


def test_glibc_malloc_trim_is_found_here() -> None:
    trim = memory._malloc_trim()
    assert trim is not None and trim(0) in (0, 1)
