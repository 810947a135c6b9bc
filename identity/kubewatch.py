"""Blocking Kubernetes client calls on an event loop: daemon threads that hand results over.

The `kubernetes` client blocks. Each call (a list, a watch's stream of
events) runs in a daemon thread that hands its results to the event loop: a
daemon thread never holds up the process's exit, and the default executor
(which asyncio.run waits for) is not used. Shared by the agent's EndpointSlice
discovery and the control plane's informers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Generator, Iterator
from types import TracebackType
from typing import Any, Generic, TypeVar

__all__ = ["Pump", "WatchStream", "call_in_thread"]

T = TypeVar("T")
_ITEM, _END, _FAILED = range(3)


class Pump(Generic[T]):
    """Runs a blocking iterator in a daemon thread and hands its items to the event loop.

    Entering the `async with` starts the thread (the constructor only builds);
    leaving it tells the thread to stop: it drops whatever the iterator yields
    next, and the iterator is interrupted if it can be.
    """

    def __init__(self, produce: Callable[[], Iterator[T]], name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        self._stop = threading.Event()
        self._iterator: Iterator[T] | None = None
        self.thread = threading.Thread(target=self._run, args=(produce,), name=name, daemon=True)

    def _run(self, produce: Callable[[], Iterator[T]]) -> None:
        try:
            self._iterator = produce()
            if self._stop.is_set():
                self._interrupt()
            for item in self._iterator:
                if self._stop.is_set():
                    return
                self._post(_ITEM, item)
            self._post(_END, None)
        except Exception as error:
            self._post(_FAILED, error)
        finally:
            close = getattr(self._iterator, "close", None)
            if callable(close):  # release what a stream abandoned midway holds, here
                close()

    def _post(self, kind: int, value: Any) -> None:
        if self._stop.is_set():
            return
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self._stop.set()

    def _interrupt(self) -> None:
        interrupt = getattr(self._iterator, "interrupt", None)
        if callable(interrupt):
            interrupt()

    def __aiter__(self) -> Pump[T]:
        return self

    async def __anext__(self) -> T:
        kind, value = await self._queue.get()
        if kind == _END:
            raise StopAsyncIteration
        if kind == _FAILED:
            raise value
        item: T = value
        return item

    async def __aenter__(self) -> Pump[T]:
        self.thread.start()
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._interrupt()


async def call_in_thread(function: Callable[..., T], *args: Any, name: str) -> T:
    """`function(*args)` in a daemon thread."""
    async with Pump(lambda: iter((function(*args),)), name) as answers:
        async for answer in answers:
            return answer
    raise AssertionError("unreachable: the thread yields one answer or raises")


class WatchStream:
    """The lines of a watch response, one JSON event each; `interrupt()` ends it from any thread."""

    def __init__(self, response: Any) -> None:
        self._response = response
        self._lines = self._read()

    def _read(self) -> Generator[dict[str, Any], None, None]:
        from kubernetes.watch.watch import iter_resp_lines

        try:
            for line in iter_resp_lines(self._response):  # type: ignore[no-untyped-call]
                if line.strip():
                    event: dict[str, Any] = json.loads(line)
                    yield event
        finally:
            self._response.close()
            self._response.release_conn()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        return next(self._lines)

    def close(self) -> None:
        """Close the response; from the thread that reads it."""
        self._lines.close()
        self._response.close()
        self._response.release_conn()

    def interrupt(self) -> None:
        # Shutting the socket down wakes the thread blocked reading it, as
        # kubernetes.watch.Watch.stop does.
        sock = getattr(getattr(self._response, "connection", None), "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
