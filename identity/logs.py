"""A server's own log lines go to stderr from a thread, never from the event loop.

A log reader that stops reading (a stalled container runtime, a collector behind
`2>&1`, a full disk behind it) fills the pipe behind stderr; a `logging.StreamHandler`
writing from the event loop would then block it, and every connection with it, at
the next line, however rare lines are: the agent's, and the CA's, control plane's
and injector's too. So their lines take the access log's way out
(identity/lines.py `LineWriter`): handed over at once to a thread that alone
blocks, at most `MAX_PENDING` bytes waiting, lines beyond dropped; the first line
that gets through after a loss says how many were lost. What is waiting is written
at exit, for at most LineWriter's close timeout.
"""

from __future__ import annotations

import atexit
import logging
import sys

from identity.lines import LineWriter, write_lines

#: The bytes of log lines that may wait for a stalled stderr before lines are dropped.
MAX_PENDING = 1 << 20


class ThreadedLines(logging.Handler):
    """Formats each record on the caller's thread, and hands the line to `writer`."""

    def __init__(self, writer: LineWriter | None = None) -> None:
        super().__init__()
        self.lost = 0
        self.writer = writer or LineWriter(_stderr, self._dropped, MAX_PENDING)

    def _dropped(self, lines: int) -> None:
        self.lost += lines

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = self.format(record) + "\n"
        except Exception:  # as logging's own handlers do: a bad record is reported, not raised
            self.handleError(record)
            return
        if self.lost:
            lost, self.lost = self.lost, 0
            text = f"outrider: {lost} log line(s) dropped: stderr was not being read\n{text}"
        self.writer(text)


def _stderr(text: str) -> None:
    write_lines(sys.stderr.fileno(), text.encode("utf-8", "replace"))


def off_the_loop() -> None:
    """Moves the lines of the root logger's stderr handlers (logging.basicConfig's) to a
    ThreadedLines with the same level and format; what waits is written at exit."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stderr:
            threaded = ThreadedLines()
            threaded.setLevel(handler.level)
            threaded.setFormatter(handler.formatter)
            root.removeHandler(handler)
            root.addHandler(threaded)
            atexit.register(threaded.writer.close)
