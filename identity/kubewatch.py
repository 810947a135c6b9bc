"""Blocking Kubernetes client calls on an event loop: daemon threads that hand results over.

The `kubernetes` client blocks. Each call (a list, a watch's stream of
events) runs in a daemon thread that hands its results to the event loop: a
daemon thread never holds up the process's exit, and the default executor
(which asyncio.run waits for) is not used. Shared by the agent's EndpointSlice
discovery and the control plane's informers.

`ObjectCache` is the sans-IO part: the objects of one list and the watch
events that follow it, by the rules of the API's watch protocol (ERROR 410:
list again; BOOKMARK: only a resourceVersion).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

__all__ = [
    "Expired",
    "ObjectCache",
    "Pump",
    "WatchError",
    "WatchStream",
    "call_in_thread",
    "key_of",
]

_GONE = 410


class WatchError(Exception):
    """The watch stream said something other than a change: list again."""


class Expired(WatchError):
    """410 Gone: the resourceVersion is older than the API server keeps; list again."""


def key_of(obj: Mapping[str, Any]) -> tuple[str, str]:
    """(namespace, name); namespace "" for cluster-scoped objects."""
    metadata = obj.get("metadata") or {}
    name = metadata.get("name")
    if not name:
        raise WatchError("an object without metadata.name")
    return str(metadata.get("namespace") or ""), str(name)


class ObjectCache:
    """The objects of one list, kept from the list and the watch events after it."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.resource_version = ""

    def replace(self, items: Iterable[dict[str, Any]], resource_version: str) -> None:
        """Start over from a list: its items and the list's resourceVersion."""
        self.objects = {key_of(item): item for item in items}
        self.resource_version = resource_version

    def apply(self, event: Mapping[str, Any]) -> bool:
        """Apply one watch event; True when an object changed.

        Raises Expired for a 410 ERROR event and WatchError for any other
        ERROR or an event it does not understand.
        """
        kind = event.get("type")
        obj: dict[str, Any] = event.get("object") or {}
        if kind == "ERROR":
            message = f"{obj.get('reason', 'error')}: {obj.get('message', '')}"
            raise Expired(message) if obj.get("code") == _GONE else WatchError(message)
        if kind not in ("ADDED", "MODIFIED", "DELETED", "BOOKMARK"):
            raise WatchError(f"unknown watch event type {kind!r}")
        version = (obj.get("metadata") or {}).get("resourceVersion")
        if not version:
            raise WatchError(f"{kind} event without a resourceVersion")
        self.resource_version = str(version)
        if kind == "BOOKMARK":
            return False
        if kind == "DELETED":
            return self.objects.pop(key_of(obj), None) is not None
        self.objects[key_of(obj)] = obj
        return True

    def __len__(self) -> int:
        """How many objects are kept."""
        return len(self.objects)


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
