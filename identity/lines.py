"""Lines written by a thread of their own, never from the event loop.

A reader that stops reading (a stalled container runtime, a full disk behind it)
fills the pipe behind stdout or stderr; a write from the event loop would then
stop every connection of the process at the next line, however rare lines are.
`LineWriter` takes text at once and writes it from its own thread, which alone
blocks, with at most a bound of text waiting; lines beyond are dropped and
counted. The agent's access log (agent/adapters/tracing.py) and every server's
own log lines (identity/logs.py) go out this way.
"""

from __future__ import annotations

import collections
import os
import select
import sys
import threading
from collections.abc import Callable


def _stdout(text: str) -> None:
    """Lines to stdout's file descriptor in writes of at most PIPE_BUF bytes, each ending
    at a line's end: a pipe takes such a write whole, so the lines of processes sharing
    it (workers of one agent) never interleave mid-line. A stdout without a descriptor
    (a test's capture) gets the text as it is."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, ValueError, OSError):
        sys.stdout.write(text)
        sys.stdout.flush()
        return
    sys.stdout.flush()  # anything written through sys.stdout first
    write_lines(fd, text.encode("ascii", "replace"))


def write_lines(fd: int, data: bytes) -> None:
    """`data` (whole lines) to `fd`, PIPE_BUF bytes at most per write, cut at line ends (a
    longer line goes alone, as one write)."""
    view, start, size = memoryview(data), 0, len(data)
    while start < size:
        end = min(start + select.PIPE_BUF, size)
        if end < size:
            cut = data.rfind(b"\n", start, end)
            end = cut + 1 if cut >= 0 else data.find(b"\n", end) + 1 or size
        while start < end:
            start += os.write(fd, view[start:end])


#: The bytes of lines that may wait for a slow stdout before lines are dropped.
MAX_PENDING = 4 << 20


class LineWriter:
    """Text handed over at once and written to `sink` by a thread of its own, which alone
    blocks when the reader is slow; `dropped(n)` counts the lines that did not fit in
    `limit` bytes of waiting text (or that a broken sink lost)."""

    def __init__(
        self,
        sink: Callable[[str], None] = _stdout,
        dropped: Callable[[int], None] = lambda lines: None,
        limit: int = MAX_PENDING,
    ) -> None:
        self.sink, self.dropped, self.limit = sink, dropped, limit
        self.pending: collections.deque[str] = collections.deque()
        self.size = 0
        self.closing = False
        self.ready = threading.Condition(threading.Lock())
        self.thread: threading.Thread | None = None

    def __call__(self, text: str) -> None:
        with self.ready:
            if self.size + len(text) > self.limit or self.closing:
                self.dropped(text.count("\n"))
                return
            self.pending.append(text)
            self.size += len(text)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="access-log", daemon=True)
                self.thread.start()
            self.ready.notify()

    def _run(self) -> None:
        # One batch at a time, as handed over: joined, what waits for a reader that was
        # slow would be held twice (and, encoded, three times): 12 MiB at MAX_PENDING.
        while True:
            with self.ready:
                while not self.pending and not self.closing:
                    self.ready.wait()
                if not self.pending:
                    return
                text = self.pending.popleft()
            try:
                self.sink(text)
            except (OSError, ValueError):  # stdout gone (closed, a broken pipe): lost
                self.dropped(text.count("\n"))
            with self.ready:
                self.size -= len(text)

    def close(self, timeout: float = 2.0) -> None:
        """Write what waits, for at most `timeout` seconds (a stalled reader is not waited
        for longer: the agent's shutdown is bounded by its drain timeout)."""
        with self.ready:
            self.closing = True
            self.ready.notify()
            thread = self.thread
        if thread is not None:
            thread.join(timeout)
