"""The audit log: one JSON line per issuance or refusal.

Compliance teams grep it and ship it; it never contains a token, a CSR or a
key, only who asked, what they got or why not.
"""

from __future__ import annotations

import array
import errno
import fcntl
import json
import os
import select
import socket
import stat
import sys
import termios
import time
from collections.abc import Callable
from datetime import datetime

#: Seconds a line waits for a pipe (stdout, a FIFO) whose reader is behind: a burst of
#: Signs against a live log collector waits that long; one that stopped reading refuses
#: the line after it, instead of holding the CA's event loop in a write for good.
PIPE_WAIT = 0.5
#: Only a line that accounts for a certificate waits (`ISSUED`), and only it may take
#: the second half of a pipe: refusals come as fast as any caller likes, and theirs
#: filled each page a slow collector freed, so 17 of 18 Signs behind them were refused.
#: A refusal whose line finds no room refuses its call at once (audit_unavailable).
ISSUED = "issued"
#: Refusal lines a second on a terminal (`kubectl logs -f`, `docker run -t`): a pty's
#: queue cannot be seen from this end, and a refusal flood took every line of room.
TERMINAL_REFUSALS = 2
#: What all those waits may take of the event loop's time (each on the loop): WAIT_SHARE
#: of it over time, after a burst of WAIT_BURST seconds. A reader that drained a page
#: every 0.6 s let one line through each time and the next one wait: the loop stood
#: still 80% of the time, /healthz at 0.5 s, with no wait running out.
WAIT_SHARE = 0.1
WAIT_BURST = 1.0


class AuditUnavailable(Exception):
    """A record could not be written: the CA answers nothing it cannot account for."""


class AuditLog:
    """Each line is one `write` of its own to a descriptor opened for appending: nothing is
    buffered, so a line that failed (a full disk) is never written later beside a
    certificate nobody received, and a line cut short is cut back off the file. A file
    renamed or removed under the CA (logrotate) is opened again at its path before the
    next line: no certificate is recorded only in a file nobody will read."""

    def __init__(self, target: str, clock: Callable[[], datetime]) -> None:
        self.target = target  # a path, or "-": stdout
        self._clock = clock
        self._fd = 1 if target == "-" else -1
        self._file_id: tuple[int, int] | None = None
        self._regular = False  # a regular file: a short write is cut back off it
        self._may_wait = WAIT_BURST  # seconds of waiting on a pipe left to the loop
        self._counted = time.monotonic()  # when `_may_wait` was last topped up
        self._terminal_lines = float(TERMINAL_REFUSALS)  # refusal lines a terminal may take
        self._terminal_counted = self._counted

    @classmethod
    def open(cls, target: str, clock: Callable[[], datetime]) -> AuditLog:
        """'-' is stdout, which must be open; anything else a file appended to (created if
        missing). OSError if it cannot be."""
        log = cls(target, clock)
        if target == "-":
            # Started with stdout closed, Python has none; its descriptor 1 may then be
            # any socket the CA opens later: never written to.
            if sys.stdout is None:
                raise OSError(errno.EBADF, "audit_log is '-' but stdout is closed")
            log._regular = stat.S_ISREG(os.fstat(1).st_mode)
        else:
            log._reopen()
        return log

    def close(self) -> None:
        if self._fd >= 0 and self.target != "-":
            os.close(self._fd)
        self._fd = -1

    def _reopen(self) -> None:
        """Open the path (a file, or /dev/stdout and the like). O_NONBLOCK for the open
        alone: a FIFO nobody reads would block the CA's event loop in it (it is refused
        instead, ENXIO); the descriptor is its own, and blocking again once open."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open(self.target, flags, 0o640)
        os.set_blocking(fd, True)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = fd
        found = os.fstat(fd)
        self._file_id = (found.st_dev, found.st_ino)
        self._regular = stat.S_ISREG(found.st_mode)

    def _follow(self) -> None:
        """The file at the path is not the one open (rotated, removed): open it again."""
        try:
            found = os.stat(self.target)
        except FileNotFoundError:
            self._reopen()
            return
        if (found.st_dev, found.st_ino) != self._file_id:
            self._reopen()

    def _write(self, line: bytes, issued: bool) -> None:
        if self.target != "-":
            self._follow()
        size = os.fstat(self._fd).st_size if self._regular else None
        # A pipe (stdout, a FIFO) whose reader is behind: a moment's wait, never the event
        # loop held in a write for good. Writable, it takes a line whole (under PIPE_BUF).
        # Its descriptor's flags are left alone: stdout's are shared with whoever else has
        # it (the shell that started the CA, a process beside it).
        # Those waits together take at most WAIT_SHARE of the loop's time (`_pipe_ready`).
        if not self._regular and not self._pipe_ready(issued):
            raise OSError(errno.EAGAIN, "its reader is behind: the pipe is full")
        written = os.write(self._fd, line)
        if written < len(line):  # a full disk mid-line: no half line stays behind
            if size is not None:
                os.ftruncate(self._fd, size)
                os.lseek(self._fd, size, os.SEEK_SET)  # a descriptor not opened to append
            raise OSError(errno.ENOSPC, "no space for a whole line")

    def _pipe_ready(self, issued: bool) -> bool:
        """Whether the pipe takes a line now (a refusal's, only while it is less than half
        full), or an issuance's within what is left to wait of PIPE_WAIT and of the loop's
        share."""
        if not issued:
            return bool(select.select([], [self._fd], [], 0.0)[1]) and not self._crowded()
        if select.select([], [self._fd], [], 0.0)[1]:
            return True
        now = time.monotonic()
        self._may_wait = min(self._may_wait + (now - self._counted) * WAIT_SHARE, WAIT_BURST)
        wait = min(PIPE_WAIT, self._may_wait)
        ready = wait > 0 and bool(select.select([], [self._fd], [], wait)[1])
        self._counted = time.monotonic()
        # A wait that ran out: the reader took nothing in it, and the next lines get only
        # what the share gives back from now (a refusal each, nearly at once).
        self._may_wait = self._may_wait - (self._counted - now) if ready else 0.0
        return ready

    def _crowded(self) -> bool:
        """Whether what the log's descriptor leads to holds more unread than a refusal's
        line may leave there: half a pipe or FIFO; an eighth of a socket's buffer
        (systemd's journal; select calls a socket writable only under a quarter); on a
        terminal, more refusal lines than TERMINAL_REFUSALS a second. A refusal's line
        would then take room an issuance may need."""
        queued = array.array("i", [0])
        try:
            mode = os.fstat(self._fd).st_mode
            if stat.S_ISFIFO(mode):
                fcntl.ioctl(self._fd, termios.FIONREAD, queued)
                room = fcntl.fcntl(self._fd, fcntl.F_GETPIPE_SZ) // 2
            elif stat.S_ISSOCK(mode):
                fcntl.ioctl(self._fd, termios.TIOCOUTQ, queued)  # SIOCOUTQ
                with socket.socket(fileno=os.dup(self._fd)) as sock:
                    # Writable (select) only while under a quarter of its buffer: half that.
                    room = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) // 8
            elif os.isatty(self._fd):
                return not self._terminal_allows()
            else:
                return False  # a character device (/dev/null): nothing waits
        except OSError:
            return False
        return queued[0] > room

    def _terminal_allows(self) -> bool:
        """A refusal's line on a terminal, at most TERMINAL_REFUSALS a second: what waits
        on a pseudo-terminal is in its other end, where nothing here can see it."""
        now = time.monotonic()
        grown = (now - self._terminal_counted) * TERMINAL_REFUSALS
        self._terminal_lines = min(self._terminal_lines + grown, float(TERMINAL_REFUSALS))
        self._terminal_counted = now
        if self._terminal_lines < 1:
            return False
        self._terminal_lines -= 1
        return True

    def record(
        self,
        *,
        result: str,
        reason: str,
        caller: str | None,
        peer: str | None = None,
        pod: str | None = None,
        spiffe_id: str | None = None,
        serial: int | None = None,
        not_after: datetime | None = None,
    ) -> None:
        entry = {
            "time": self._clock().isoformat(),
            "event": "svid_sign",
            "result": result,
            "reason": reason,
            "caller": caller,
            "peer": peer,
            "pod": pod,
            "spiffe_id": spiffe_id,
            "serial": None if serial is None else f"{serial:x}",
            "not_after": None if not_after is None else not_after.isoformat(),
        }
        try:
            line = json.dumps(entry, separators=(",", ":")).encode() + b"\n"
            self._write(line, issued=result == ISSUED)
        except OSError as exc:  # a full disk, a file it may no longer write, stdout gone
            where = "stdout" if self.target == "-" else self.target
            said = exc.strerror or str(exc)
            raise AuditUnavailable(
                f"cannot write the audit log ({where}: {said}); free its disk or fix audit_log"
            ) from None
