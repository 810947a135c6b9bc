"""FakeClock: a wall clock and a monotonic clock that move only when a test says so.

It satisfies `identity.renewal.Clock` (and its `now` is the `Callable[[], datetime]`
the CA and the agent take elsewhere). `advance(s)` moves both clocks, waking each
sleeper at its deadline in order and letting the woken work run (real I/O
included) until it sleeps on this clock again; `step(s)` moves the wall clock
alone, as an NTP step or a suspend does.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from datetime import UTC, datetime, timedelta

#: How long (real seconds) woken work may take to go back to sleep on the clock.
SETTLE_TIMEOUT = 10.0


class FakeClock:
    def __init__(self, wall: datetime | None = None) -> None:
        self.wall = wall or datetime.now(UTC)
        self.mono = 0.0
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    def now(self) -> datetime:
        return self.wall

    def __call__(self) -> datetime:  # where a plain `Callable[[], datetime]` clock is taken
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.mono + max(seconds, 0.0), next(self._order), future))
        await future

    @property
    def sleeping(self) -> int:
        """How many sleeps are pending (cancelled ones are not counted)."""
        return sum(1 for _, _, future in self._sleepers if not future.done())

    def step(self, seconds: float) -> None:
        """The wall clock jumps; the monotonic clock does not."""
        self.wall += timedelta(seconds=seconds)

    async def advance(self, seconds: float) -> None:
        """Both clocks move `seconds`, through each sleeper's deadline in turn."""
        target = self.mono + seconds
        while True:
            self._drop_cancelled()
            if not self._sleepers or self._sleepers[0][0] > target:
                break
            deadline = self._sleepers[0][0]
            self._move(deadline - self.mono)
            sleeping = self.sleeping
            while self._sleepers and self._sleepers[0][0] <= self.mono:
                _, _, future = heapq.heappop(self._sleepers)
                if not future.done():
                    future.set_result(None)
            await self.settle(sleeping)
        self._move(target - self.mono)

    async def settle(self, sleepers: int) -> None:
        """Let woken work run until `sleepers` sleeps are pending again (bounded in real time)."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        await asyncio.sleep(0)
        while self.sleeping < sleepers:
            if time.monotonic() > deadline:
                raise AssertionError(f"woken work did not sleep again within {SETTLE_TIMEOUT}s")
            await asyncio.sleep(0.005)
        for _ in range(3):  # whatever it scheduled on its way back to sleep
            await asyncio.sleep(0)

    def _move(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += timedelta(seconds=seconds)

    def _drop_cancelled(self) -> None:
        while self._sleepers and self._sleepers[0][2].done():
            heapq.heappop(self._sleepers)
