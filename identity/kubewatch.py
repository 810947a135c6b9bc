"""Blocking Kubernetes client calls on an event loop: daemon threads that hand results over.

The `kubernetes` client blocks. Each call (a list, a watch's stream of
events) runs in a daemon thread that hands its results to the event loop: a
daemon thread never holds up the process's exit, and the default executor
(which asyncio.run waits for) is not used. Shared by the agent's EndpointSlice
discovery and the control plane's informers.

`ObjectCache` is the sans-IO part: the objects of one list and the watch
events that follow it, by the rules of the API's watch protocol (ERROR 410:
list again; BOOKMARK: only a resourceVersion). `ListWatch` is the one loop
around it: list, then watch from the list's resourceVersion, one watch after
another. A 410 Gone lists again at once (after a backoff if not a single
event came since the last list); any other failure lists again after a
capped, jittered backoff, keeping the last state meanwhile (one warning per
outage).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from types import TracebackType
from typing import Any, Generic, TypeVar

from identity.backoff import Backoff

__all__ = [
    "SHORTEST_WATCH",
    "Expired",
    "ListWatch",
    "ObjectCache",
    "Pump",
    "WatchError",
    "WatchStream",
    "call_in_thread",
    "key_of",
    "settle",
]

_GONE = 410
#: A watch that ends this soon without an event counts as a failure, so a
#: server that closes watches at once is not asked again in a tight loop.
SHORTEST_WATCH = 1.0


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


class ListWatch:
    """List, then watch; list again when the watch fails. `run()` until cancelled.

    `list_()` and `watch(resource_version)` are the API's blocking calls; each
    runs in a daemon thread. `on_list()` is called after every list, `on_change()`
    after every event that changed an object; `held()` says what is kept while
    the API fails ("3 endpoints"). `failed(error)` decides what a failure
    costs; by default, a backoff.
    """

    def __init__(
        self,
        what: str,
        cache: ObjectCache,
        list_: Callable[[], tuple[list[dict[str, Any]], str]],
        watch: Callable[[str], Iterator[dict[str, Any]]],
        *,
        on_list: Callable[[], None],
        on_change: Callable[[], None],
        held: Callable[[], str],
        backoff: Backoff,
        rng: random.Random,
        log: logging.Logger,
        thread_name: str,
    ) -> None:
        self.what, self.cache = what, cache
        self._list, self._watch = list_, watch
        self._on_list, self._on_change, self._held = on_list, on_change, held
        self.backoff, self.rng, self.log = backoff, rng, log
        self.thread_name = thread_name
        self.failures = 0
        self.fresh = True  # no watch event since the last list

    async def run(self) -> None:
        while True:
            try:
                items, version = await call_in_thread(self._list, name=self.thread_name)
                self.cache.replace(items, version)
                self.fresh = True
                self._on_list()
                while True:  # one watch after another, each from where the last one ended
                    await self._follow()
            except Expired as expired:
                if self.fresh:  # expired before any event since the list: not the usual gap
                    await self.back_off(expired)
                else:
                    self.log.info("%s: watch expired (%s); listing again", self.what, expired)
            except Exception as error:  # any failure of the API or its stream: list again later
                await self.failed(error)

    async def failed(self, error: Exception) -> None:
        await self.back_off(error)

    async def back_off(self, error: Exception) -> None:
        self.failures += 1
        if self.failures == 1:
            self.log.warning("%s: %s; keeping %s", self.what, error, self._held())
        await asyncio.sleep(self.backoff.delay(self.failures, self.rng).total_seconds())

    async def _follow(self) -> None:
        """One watch, until the server ends it. Raises if it fails, or ends at once with nothing."""
        started = time.monotonic()
        seen = False
        version = self.cache.resource_version
        stream = Pump(lambda: self._watch(version), self.thread_name)
        async with stream:
            async for event in stream:
                if self.cache.apply(event):
                    self._on_change()
                seen, self.fresh = True, False
                self._working()
        if not seen and time.monotonic() - started < SHORTEST_WATCH:
            raise ConnectionError("the watch ended at once")
        self._working()

    def _working(self) -> None:
        """The API answers: end the outage, if there was one."""
        if self.failures:
            self.log.info("%s: watching again", self.what)
            self.failures = 0


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
        _THREADS.add(self.thread)

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


#: Every pump's thread, while it exists: what `settle` waits for.
_THREADS: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
_SETTLE_POLL = 0.01


async def settle(within: float) -> bool:
    """Wait, up to `within` seconds, until no pump's thread runs; True if none does.

    For a process about to exit: a daemon thread still inside OpenSSL (a watch
    just interrupted, closing its connection) when the interpreter and OpenSSL
    tear down makes the process abort. An interrupted watch ends at once; a
    list in flight within its request timeout.
    """
    deadline = time.monotonic() + within
    while any(thread.is_alive() for thread in list(_THREADS)):
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(_SETTLE_POLL)
    return True


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
