"""`watch(source, publish)` on a real event loop.

DNS against the real resolver and against a scripted one; Kubernetes against
a fake SliceApi that replays the recorded EndpointSlices and watch events
(tests/fixtures/endpointslices), and against a stub API server on 127.0.0.1
that serves the same bytes to the real `KubernetesSliceApi`.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from kubernetes import client

from agent.adapters.discovery import KubernetesSliceApi, Resolver, SliceApi, watch
from agent.core.discovery import DnsSource, KubernetesSource, Source, StaticSource
from agent.core.endpoint import Endpoint
from identity.backoff import Backoff
from tests.k8s import StubApiServer, stub_api_server
from tests.unit.agent.test_discovery import FIXTURES, PODS, PORT, load
from tests.unit.agent.test_discovery import pods as recorded_pods

SOURCE = KubernetesSource("backend", "shop", PORT)
#: How long a silent FakeStream lasts if nobody ends it: far beyond any wait here.
WATCH_LIMIT = 30.0
FAST = Backoff(initial=timedelta(milliseconds=10), maximum=timedelta(milliseconds=50))
# What the agent publishes over the recorded list, rolling update, 410 and relist.
RECORDED_SETS = ["ABD", "ABCD", "ABCDV", "BCDEV", "BCDEFV", "BCEFV", "BCEF", "CEFG"]


def lines(name: str) -> list[str]:
    return (FIXTURES / name).read_text().splitlines()


def pods(letters: str) -> dict[Endpoint, int]:
    return dict.fromkeys(recorded_pods(letters), 1)


def as_letters(published: dict[Endpoint, int]) -> str:
    by_address = {address: letter for letter, address in PODS.items()}
    assert set(published.values()) == {1}
    return "".join(sorted(by_address[endpoint.host] for endpoint in published))


class Recorder:
    """A publish function: keeps every set, and wakes whoever waits for a count."""

    def __init__(self) -> None:
        self.sets: list[dict[Endpoint, int]] = []
        self._changed = asyncio.Event()

    def __call__(self, endpoints: dict[Endpoint, int]) -> None:
        self.sets.append(endpoints)
        self._changed.set()

    async def wait_for(self, count: int, seconds: float = 2.0) -> None:
        async with asyncio.timeout(seconds):
            while len(self.sets) < count:
                self._changed.clear()
                await self._changed.wait()


@asynccontextmanager
async def watching(source: Source, publish: Recorder, **options: Any) -> AsyncIterator[None]:
    task = asyncio.create_task(watch(source, publish, **options))
    try:
        yield
        assert not task.done(), task
    finally:
        task.cancel()
        async with asyncio.timeout(2):
            await asyncio.gather(task, return_exceptions=True)


@pytest.fixture
def collected() -> None:
    """A full garbage collection, requested before `watchdog`: with the kubernetes
    client loaded, one takes ~40 ms (80-130 ms on a loaded machine), and the next
    one due would otherwise land on whatever test allocates then."""
    gc.collect()


async def wait_until(condition: Callable[[], bool], seconds: float = 2.0) -> None:
    """Polls: the conditions are about threads and fakes, which have no event to await."""
    async with asyncio.timeout(seconds):
        while not condition():  # noqa: ASYNC110
            await asyncio.sleep(0.005)


# --- static ------------------------------------------------------------------------


async def test_static_publishes_its_endpoints_once_and_runs_until_cancelled() -> None:
    recorder = Recorder()
    source = StaticSource(((Endpoint("10.0.0.1", 8443), 3), (Endpoint("10.0.0.2", 8443), 1)))
    async with watching(source, recorder):
        await recorder.wait_for(1)
        await asyncio.sleep(0.05)
    assert recorder.sets == [{Endpoint("10.0.0.1", 8443): 3, Endpoint("10.0.0.2", 8443): 1}]


# --- DNS ---------------------------------------------------------------------------


async def test_dns_resolves_localhost_with_the_real_resolver() -> None:
    recorder = Recorder()
    async with watching(DnsSource("localhost", 8443, refresh=0.05), recorder):
        await recorder.wait_for(1)
        await asyncio.sleep(0.2)  # a few refreshes: the same answer publishes nothing
    (published,) = recorder.sets
    assert published
    assert set(published) <= {Endpoint("127.0.0.1", 8443), Endpoint("::1", 8443)}
    assert set(published.values()) == {1}


def scripted(answers: list[set[str] | OSError]) -> tuple[Resolver, asyncio.Event]:
    """A resolver giving these answers in turn, then the last one forever.

    The event is set once the last answer has been given."""
    done = asyncio.Event()
    calls: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> frozenset[Endpoint]:
        calls.append((host, port))
        answer = answers[min(len(calls), len(answers)) - 1]
        if len(calls) >= len(answers):
            done.set()
        if isinstance(answer, OSError):
            raise answer
        return frozenset(Endpoint(host, port) for host in answer)

    return resolve, done


async def test_dns_publishes_on_change_only_and_keeps_the_set_through_failures(
    caplog: pytest.LogCaptureFixture,
) -> None:
    failure = OSError(-3, "Temporary failure in name resolution")
    resolve, done = scripted(
        [
            {"10.0.0.1"},
            {"10.0.0.1"},
            {"10.0.0.1", "10.0.0.2"},
            failure,
            failure,
            {"10.0.0.2", "10.0.0.1"},
            {"10.0.0.2"},
        ]
    )
    recorder = Recorder()
    with caplog.at_level(logging.INFO, logger="outrider.agent.discovery"):
        async with watching(DnsSource("backend", 8443, refresh=0.05), recorder, resolve=resolve):
            async with asyncio.timeout(2):
                await done.wait()
            await asyncio.sleep(0.12)  # the last answer again: nothing new
    assert recorder.sets == [
        {Endpoint("10.0.0.1", 8443): 1},
        {Endpoint("10.0.0.1", 8443): 1, Endpoint("10.0.0.2", 8443): 1},
        {Endpoint("10.0.0.2", 8443): 1},
    ]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "DNS backend:8443: lookup failed ([Errno -3] Temporary failure in name resolution);"
        " keeping 2 endpoints"
    ]
    assert any("lookups work again" in r.getMessage() for r in caplog.records)


async def test_dns_publishes_nothing_before_the_first_answer() -> None:
    failure = OSError("no network yet")
    resolve, done = scripted([failure, failure, set(), {"10.0.0.7"}])
    recorder = Recorder()
    async with watching(DnsSource("backend", 8443, refresh=0.05), recorder, resolve=resolve):
        async with asyncio.timeout(2):
            await done.wait()
        await recorder.wait_for(1)
    assert recorder.sets == [{Endpoint("10.0.0.7", 8443): 1}]


# --- Kubernetes, with a fake API ---------------------------------------------------


class FakeStream:
    """One watch: its recorded events then its end; without events, silence until the
    'server' ends it (`time_out()`, as its timeoutSeconds would) or it is interrupted.
    Silence lasts at most WATCH_LIMIT seconds, so a thread left reading it still ends."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self._events = iter(events)
        self._ended = threading.Event()
        if events:
            self._ended.set()
        self.closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        event = next(self._events, None)
        if event is not None:
            return event
        self._ended.wait(WATCH_LIMIT)
        raise StopIteration

    def time_out(self) -> None:
        self._ended.set()

    def interrupt(self) -> None:
        self._ended.set()

    def close(self) -> None:
        self.closed = True


@dataclass
class FakeSliceApi:
    """Replays recorded lists and watch sessions; records what it was asked, and by whom."""

    lists: list[dict[str, Any] | Exception]
    sessions: list[list[dict[str, Any]]]
    interruptible: bool = True
    listed: list[tuple[str, str]] = field(default_factory=list)
    watched: list[str] = field(default_factory=list)
    streams: list[FakeStream] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def list(self, namespace: str, label_selector: str) -> tuple[list[dict[str, Any]], str]:
        self.threads.append(threading.current_thread())
        self.listed.append((namespace, label_selector))
        answer = self.lists[min(len(self.listed), len(self.lists)) - 1]
        if isinstance(answer, Exception):
            raise answer
        return answer["items"], answer["metadata"]["resourceVersion"]

    def watch(
        self, namespace: str, label_selector: str, resource_version: str
    ) -> Iterator[dict[str, Any]]:
        assert (namespace, label_selector) == ("shop", "kubernetes.io/service-name=backend")
        self.threads.append(threading.current_thread())
        self.watched.append(resource_version)
        index = len(self.watched) - 1
        events = self.sessions[index] if index < len(self.sessions) else []
        stream = FakeStream(events)
        self.streams.append(stream)
        return stream if self.interruptible else self._plain(stream)

    def time_out_watches(self) -> None:
        """The server closes every open watch, as it does after timeoutSeconds."""
        for stream in self.streams:
            stream.time_out()

    def running_threads(self) -> tuple[threading.Thread, ...]:
        return tuple(thread for thread in self.threads if thread.is_alive())

    @staticmethod
    def _plain(stream: FakeStream) -> Iterator[dict[str, Any]]:
        yield from stream  # a generator: nothing to interrupt it with


def recorded_api(**options: Any) -> FakeSliceApi:
    events = [json.loads(line) for line in lines("watch.jsonl")]
    expired = [json.loads(line) for line in lines("watch_expired.jsonl")]
    return FakeSliceApi([load("list.json"), load("relist.json")], [events, expired], **options)


def discovery_threads(besides: Collection[threading.Thread] = ()) -> list[threading.Thread]:
    """The adapter's running threads (it names them), but for those in `besides`:
    threads an earlier test left are not this test's to wait for."""
    return [
        thread
        for thread in threading.enumerate()
        if thread.name.startswith("outrider-discovery") and thread not in besides
    ]


async def test_kubernetes_publishes_the_recorded_rolling_update_then_relists_after_410(
    collected: None,
    watchdog: None,
) -> None:
    api, recorder = recorded_api(), Recorder()
    async with watching(SOURCE, recorder, kubernetes=api, backoff=FAST):
        await recorder.wait_for(len(RECORDED_SETS))
        await wait_until(lambda: len(api.watched) == 3)
        await asyncio.sleep(0.05)
    assert [as_letters(published) for published in recorder.sets] == RECORDED_SETS
    assert api.listed == [("shop", "kubernetes.io/service-name=backend")] * 2
    # The first watch from the list; the next from the last bookmark, which
    # expired (410); the third from the relist.
    assert api.watched == ["48213", "48388", "49130"]


async def test_kubernetes_lists_again_after_a_failure_with_backoff(
    caplog: pytest.LogCaptureFixture,
) -> None:
    refused = client.ApiException(status=403, reason="Forbidden")
    api = FakeSliceApi([refused, refused, load("list.json")], [])
    recorder = Recorder()
    with caplog.at_level(logging.INFO, logger="outrider.agent.discovery"):
        async with watching(SOURCE, recorder, kubernetes=api, backoff=FAST):
            await recorder.wait_for(1)
            await wait_until(lambda: len(api.watched) == 1)
    assert [as_letters(published) for published in recorder.sets] == ["ABD"]
    assert len(api.listed) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "EndpointSlices of shop/backend" in warnings[0]
    assert "Forbidden" in warnings[0]


async def test_a_watch_that_expires_at_once_each_time_backs_off_instead_of_spinning() -> None:
    expired = [json.loads(line) for line in lines("watch_expired.jsonl")]
    api = FakeSliceApi([load("list.json")], [expired] * 1000)
    slow = Backoff(initial=timedelta(milliseconds=50), maximum=timedelta(milliseconds=50))
    recorder = Recorder()
    async with watching(SOURCE, recorder, kubernetes=api, backoff=slow):
        await asyncio.sleep(0.5)
    assert 3 <= len(api.listed) <= 21, len(api.listed)  # at most one list per 25 ms
    assert [as_letters(published) for published in recorder.sets] == ["ABD"]


@pytest.mark.parametrize("interruptible", [True, False], ids=["interrupted", "server-timeout"])
async def test_cancelling_the_task_stops_its_thread(interruptible: bool) -> None:
    api, recorder = recorded_api(interruptible=interruptible), Recorder()
    async with watching(SOURCE, recorder, kubernetes=api, backoff=FAST):
        await recorder.wait_for(len(RECORDED_SETS))
        await wait_until(lambda: len(api.watched) == 3)
        assert api.running_threads()  # the third watch is open, and silent
    if not interruptible:
        # Nothing can stop the thread before the server closes the watch; once it
        # does, the thread ends and starts no other watch.
        assert api.running_threads()
        api.time_out_watches()
    await wait_until(lambda: not api.running_threads(), seconds=2)
    assert len(api.watched) == 3
    assert all(thread.name.startswith("outrider-discovery") for thread in api.threads)
    if interruptible:  # every stream is closed, the abandoned one too, by the thread reading it
        assert [stream.closed for stream in api.streams] == [True, True, True]


@dataclass
class SlowToAnswerApi(FakeSliceApi):
    """The watch request is answered only once `answer` is set: a task can be
    cancelled while its watch is still being opened."""

    answer: threading.Event = field(default_factory=threading.Event)

    def watch(
        self, namespace: str, label_selector: str, resource_version: str
    ) -> Iterator[dict[str, Any]]:
        stream = super().watch(namespace, label_selector, resource_version)
        self.answer.wait(WATCH_LIMIT)
        return stream


async def test_a_watch_answered_after_cancelling_is_interrupted_and_closed_at_once() -> None:
    api, recorder = SlowToAnswerApi([load("list.json")], []), Recorder()
    async with watching(SOURCE, recorder, kubernetes=api, backoff=FAST):
        await recorder.wait_for(1)
        await wait_until(lambda: len(api.watched) == 1)
    api.answer.set()  # the API server answers after the task is gone: a silent watch
    await wait_until(lambda: not api.running_threads(), seconds=2)
    assert [stream.closed for stream in api.streams] == [True]
    assert len(api.watched) == 1


class BusyApi(FakeSliceApi):
    """A Service whose watch never goes quiet: a bookmark every 5 ms, forever."""

    def watch(
        self, namespace: str, label_selector: str, resource_version: str
    ) -> Iterator[dict[str, Any]]:
        self.threads.append(threading.current_thread())
        self.watched.append(resource_version)
        version = int(resource_version)
        while True:
            version += 1
            time.sleep(0.005)
            yield {"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": str(version)}}}


async def test_cancelling_stops_the_thread_of_a_watch_that_never_goes_quiet() -> None:
    api, recorder = BusyApi([load("list.json")], []), Recorder()
    async with watching(SOURCE, recorder, kubernetes=api, backoff=FAST):
        await recorder.wait_for(1)
        await asyncio.sleep(0.1)
        assert api.running_threads()
    await wait_until(lambda: not api.running_threads(), seconds=2)


# --- Kubernetes, the real client against a stub API server ----------------------------


@pytest.fixture
async def api_server() -> AsyncIterator[StubApiServer]:
    async with stub_api_server() as stub:
        yield stub


async def test_the_real_client_lists_and_watches_with_the_right_query(
    api_server: StubApiServer, collected: None, watchdog: None
) -> None:
    configuration = client.Configuration(host=f"http://127.0.0.1:{api_server.port}")
    # Off the loop, as watch() makes its own: the client imports its API modules
    # on first use, which holds the loop for ~70 ms.
    api: SliceApi = await asyncio.to_thread(KubernetesSliceApi, configuration, watch_seconds=30)
    earlier = discovery_threads()
    recorder = Recorder()
    async with watching(SOURCE, recorder, kubernetes=api, backoff=FAST):
        await recorder.wait_for(len(RECORDED_SETS))
        await wait_until(lambda: len(api_server.queries) == 5)
        await asyncio.sleep(0.05)
    assert [as_letters(published) for published in recorder.sets] == RECORDED_SETS
    selector = {"labelSelector": "kubernetes.io/service-name=backend"}
    watch_query = {
        **selector,
        "watch": "true",
        "allowWatchBookmarks": "true",
        "timeoutSeconds": "30",
    }
    assert api_server.queries == [
        selector,
        {**watch_query, "resourceVersion": "48213"},
        {**watch_query, "resourceVersion": "48388"},
        selector,
        {**watch_query, "resourceVersion": "49130"},
    ]
    # The last watch was still open: interrupting it ends the thread at once.
    await wait_until(lambda: not discovery_threads(besides=earlier), seconds=2)
