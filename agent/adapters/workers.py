"""The main process's side of `workers: N`: starting workers, talking to them, merging
their metrics.

Each worker is `python -m agent.worker FD`, a fresh interpreter (no fork of a running
event loop, OpenSSL or threads) holding one end of a Unix socketpair, inherited at
exec and never named in the filesystem: the SVID's key, chain and bundle travel over
it in memory, never on disk. Messages are length-prefixed frames. What the main process
sends (the settings: a checked config and its policies; the SVID) is pickled: both ends
are this program, under one UID, on a socketpair nobody else holds, and a config's
checked dataclasses then arrive as they were checked. What a worker sends (its answers
and its metrics) is JSON: the main process keeps the identity and the CA channel, and a
worker, which faces the network, can tell it no more than data.

Metrics: the main process asks every worker for its registry's samples at each scrape
and merges them with its own (`merge`), rather than prometheus_client's multiprocess
mode, which needs a directory of memory-mapped files (on disk unless a private tmpfs
is set up and cleaned), cannot serve custom collectors (outrider_listener_info) and
keeps a dead worker's files around. A scrape costs each worker one serialisation of
its registry, at the scraper's pace, and nothing between scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import json
import logging
import os
import pickle
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

log = logging.getLogger("outrider.agent.workers")

_LENGTH = struct.Struct("!I")
#: A frame larger than this ends the channel: a registry of 10k series is ~2 MB of JSON.
MAX_FRAME = 64 * 1024 * 1024
#: How long a scrape waits for each worker's samples; a worker that is late is left out.
SCRAPE_TIMEOUT = 2.0
#: Restarts of workers within RESTART_WINDOW seconds past which the agent gives up and
#: exits non-zero (a worker that cannot stay up is a bug the kubelet's restart shows).
MAX_RESTARTS, RESTART_WINDOW = 5, 60.0

#: Families only the main process keeps the truth of (identity, CA, config, control plane,
#: Workload API, the process it is): the workers' copies are left out of the merge.
MAIN_ONLY = frozenset(
    {
        "outrider_agent_info",
        "outrider_svid_info",
        "outrider_svid_expiry_timestamp_seconds",
        "outrider_svid_rotations",
        "outrider_trust_bundle_expiry_timestamp_seconds",
        "outrider_ca_backoff_seconds",
        "outrider_config_reloads",
        "outrider_control_plane_connected",
        "outrider_control_plane_updates",
        "outrider_workload_keys_handed_out",
        "outrider_workload_api_refusals",
        "outrider_build_info",
        "python_info",
        "process_start_time_seconds",
        "process_max_fds",
        "process_virtual_memory_bytes",
    }
)
#: Families every worker holds alike (same listeners, same upstreams health-checked by
#: each): the largest value, not the sum.
SAME_IN_EVERY_WORKER = frozenset({"outrider_listener_info", "outrider_upstream_endpoints"})

Family = tuple[str, str, str, str, list[tuple[str, dict[str, str], float]]]


def families(collector: Collector) -> list[Family]:
    """`collector`'s samples as plain data: (name, type, help, unit, samples)."""
    return [
        (
            metric.name,
            metric.type,
            metric.documentation,
            metric.unit,
            [(s.name, dict(s.labels), float(s.value)) for s in metric.samples],
        )
        for metric in collector.collect()
    ]


def merge(main: Sequence[Family], workers: Sequence[Sequence[Family]]) -> list[Metric]:
    """One exposition for the whole agent: counters, histograms and gauges summed over
    the processes, MAIN_ONLY families from the main process, SAME_IN_EVERY_WORKER ones
    the largest of the workers'."""
    order: list[str] = []
    heads: dict[str, tuple[str, str, str]] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for process, collected in enumerate([main, *workers]):
        for name, kind, documentation, unit, samples in collected:
            if name in MAIN_ONLY and process > 0:
                continue
            if name not in heads:
                order.append(name)
                heads[name] = (kind, documentation, unit)
                values[name] = {}
            merged = values[name]
            same = name in SAME_IN_EVERY_WORKER
            for sample, labels, value in samples:
                key = (sample, tuple(sorted(labels.items())))
                if key not in merged:
                    merged[key] = value
                else:
                    merged[key] = max(merged[key], value) if same else merged[key] + value
    result = []
    for name in order:
        kind, documentation, unit = heads[name]
        metric = Metric(name, documentation, kind, unit)
        for (sample, pairs), value in values[name].items():
            metric.add_sample(sample, dict(pairs), value)
        result.append(metric)
    return result


class Merged(Collector):
    """Metrics already collected, for generate_latest."""

    def __init__(self, metrics: list[Metric]) -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self.metrics


# --- the channel ------------------------------------------------------------------


async def receive(reader: asyncio.StreamReader) -> bytes | None:
    """One frame; None at the end of the channel."""
    try:
        head = await reader.readexactly(_LENGTH.size)
        (length,) = _LENGTH.unpack(head)
        if length > MAX_FRAME:
            raise ConnectionError(f"a frame of {length} bytes on the worker channel")
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        return None


def send(writer: asyncio.StreamWriter, payload: bytes) -> None:
    writer.write(_LENGTH.pack(len(payload)) + payload)


def to_worker(message: tuple[Any, ...]) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(message)
    return buffer.getvalue()


class _Pickler(pickle.Pickler):
    """Pickles a frozen dataclass that has no `__dict__` (compiled by mypyc: its
    attributes are native, and pickle's default restores them through the class's
    `__setattr__`, which a frozen class refuses) as Python pickles any other: its
    fields, set as they were, without running `__init__` again."""

    def reducer_override(self, obj: Any) -> Any:
        cls = type(obj)
        if (
            dataclasses.is_dataclass(cls)
            and cls.__dataclass_params__.frozen  # type: ignore[attr-defined]
            and not hasattr(obj, "__dict__")
        ):
            state = tuple((f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj))
            return _frozen, (cls, state)
        return NotImplemented


def _frozen(cls: Any, state: tuple[tuple[str, Any], ...]) -> Any:
    obj = cls.__new__(cls)
    for name, value in state:
        object.__setattr__(obj, name, value)
    return obj


def from_main(frame: bytes) -> tuple[Any, ...]:
    message = pickle.loads(frame)  # noqa: S301 (our own main process, on a private socketpair)
    assert isinstance(message, tuple)
    return message


def to_main(message: dict[str, Any]) -> bytes:
    return json.dumps(message).encode()


# --- the main process's workers ----------------------------------------------------


@dataclass(eq=False)
class Worker:
    """One worker process and its end of the channel."""

    index: int
    process: asyncio.subprocess.Process
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    replies: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    #: The settings version it runs (0: none yet).
    running: int = 0
    #: Killed by the supervisor for not answering (a restart it never counts against the
    #: budget), not gone on its own.
    killed: bool = False
    #: Connections it accepted, as of its last scrape.
    accepted: int = 0
    listener: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def tell(self, *message: Any) -> None:
        if not self.writer.is_closing():
            send(self.writer, to_worker(message))

    async def ask(self, seq: int, within: float | None, *message: Any) -> dict[str, Any]:
        """Send `message` and wait for the answer carrying `seq`; ConnectionError if the
        worker goes away first, TimeoutError after `within` seconds."""
        if self.writer.is_closing() or (self.listener is not None and self.listener.done()):
            raise ConnectionError(f"worker {self.index} went away")  # no answer will come
        answer = asyncio.get_running_loop().create_future()
        self.replies[seq] = answer
        try:
            self.tell(*message)
            return await asyncio.wait_for(answer, within)
        finally:
            self.replies.pop(seq, None)

    async def listen(self) -> None:
        """Hand each answer to whoever asked for it, until the channel ends."""
        try:
            while (frame := await receive(self.reader)) is not None:
                message = json.loads(frame)
                waiting = self.replies.get(int(message.get("seq", -1)))
                if waiting is not None and not waiting.done():
                    waiting.set_result(message)
        except (ConnectionError, ValueError) as exc:
            log.error("worker %d (pid %d): channel broken: %s", self.index, self.pid, exc)
        finally:
            for waiting in self.replies.values():
                if not waiting.done():
                    waiting.set_exception(ConnectionError(f"worker {self.index} went away"))
            self.writer.close()


async def spawn(index: int) -> Worker:
    """Start worker `index`: `python -m agent.worker FD`, FD its end of a socketpair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agent.worker",
            str(theirs.fileno()),
            str(index),
            pass_fds=(theirs.fileno(),),
            stdin=asyncio.subprocess.DEVNULL,
        )
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    try:
        reader, writer = await asyncio.open_unix_connection(sock=ours)
    except BaseException:  # cancelled (a drain): no Worker would ever end this process
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.shield(process.wait())
        raise
    worker = Worker(index, process, reader, writer)
    worker.listener = asyncio.get_running_loop().create_task(worker.listen())
    return worker


class Restarts:
    """Recent restarts, to tell a worker that crashed once from one that cannot stay up."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.total = 0

    def allow(self, *, deliberate: bool = False) -> bool:
        """Count one restart; False once more than MAX_RESTARTS fell in RESTART_WINDOW.
        One of a worker the supervisor killed itself (it did not answer) is counted but
        never ends the agent: a node stalled for a while would kill every worker at once."""
        self.total += 1
        if deliberate:
            return True
        now = self.clock()
        self.times = [t for t in self.times if now - t < RESTART_WINDOW] + [now]
        return len(self.times) <= MAX_RESTARTS


async def end(worker: Worker, within: float) -> None:
    """Wait up to `within` seconds for `worker` to exit; kill it then."""
    try:
        await asyncio.wait_for(worker.process.wait(), within)
    except TimeoutError:
        log.warning("worker %d (pid %d) still running: killed", worker.index, worker.pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(worker.pid, signal.SIGKILL)
        await worker.process.wait()
    if worker.listener is not None:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.listener
