"""The CA's audit log as a file: every line whole, written once, where the path says.

Real files on a real filesystem; a full disk is a tmpfs the test mounts (`small_disk`).
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import socket
import subprocess
import sys
import threading
import time
import tty
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ca.audit import PIPE_WAIT, AuditLog, AuditUnavailable
from tests.support import fill_disk


def record(audit: AuditLog, n: int) -> None:
    audit.record(result="issued", reason="token", caller=f"caller-{n}", serial=n)


def callers(path: Path) -> list[str]:
    return [json.loads(line)["caller"] for line in path.read_text().splitlines()]


@contextlib.contextmanager
def collector_behind(take: Callable[[], object], every: float) -> Iterator[None]:
    """A log collector that is behind: `take()` (a page, say) every `every` seconds, from
    a thread, until the block ends."""
    done = threading.Event()

    def run() -> None:
        while not done.wait(every):
            with contextlib.suppress(OSError):  # nothing to take yet
                take()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(5)


@contextlib.contextmanager
def full_fifo(path: Path) -> Iterator[int]:
    """A FIFO at `path`, full already (its reader is behind): yields the reader's end."""
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    filler = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    try:
        with contextlib.suppress(BlockingIOError):
            while True:
                os.write(filler, b"#" * 4096)
        yield reader
    finally:
        os.close(reader)
        os.close(filler)


def test_a_log_rotated_or_removed_under_the_ca_is_opened_again_at_its_path(
    tmp_path: Path,
) -> None:
    """logrotate renames the file (or an operator removes it): the next line goes to a new
    file at the path, never to the renamed one, nor to a removed inode nobody reads."""
    path = tmp_path / "audit.log"
    audit = AuditLog.open(str(path), lambda: datetime.now(UTC))
    record(audit, 1)
    path.rename(tmp_path / "audit.log.1")
    record(audit, 2)
    assert callers(tmp_path / "audit.log.1") == ["caller-1"]
    assert callers(path) == ["caller-2"]
    path.unlink()
    record(audit, 3)
    assert callers(path) == ["caller-3"]


def test_a_line_the_disk_had_no_room_for_is_never_written_later_nor_left_half(
    small_disk: Path,
) -> None:
    """The certificate of a line that failed was not handed out: once the disk has room
    again, the log holds the lines that were written, whole, and none of the failed ones."""
    path = small_disk / "audit.log"
    audit = AuditLog.open(str(path), lambda: datetime.now(UTC))
    try:
        record(audit, 1)
        with path.open("a") as padding:  # the next line straddles a page of the tmpfs
            padding.write("#" * (4096 - 100 - path.stat().st_size - 1) + "\n")
        fill_disk(small_disk, leave=0)
        for n in range(2, 7):
            with pytest.raises(AuditUnavailable, match="free its disk or fix audit_log"):
                record(audit, n)
        assert path.read_bytes().endswith(b"\n"), "a half line was left"
        (small_disk / "filler").unlink()
        record(audit, 7)
    finally:
        audit.close()
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert [json.loads(line)["caller"] for line in lines] == ["caller-1", "caller-7"]


def test_stdout_redirected_to_a_file_on_a_full_disk_gets_no_gap_of_nul_bytes(
    small_disk: Path,
) -> None:
    """`audit_log: "-"` with `> file` (or systemd's `StandardOutput=file:`): stdout is not
    opened to append, so a line cut back off the file left the descriptor past the end,
    and the next line came after a run of NUL bytes: a line no JSON reader takes."""
    path = small_disk / "audit.log"
    script = "\n".join(
        [
            "import sys",
            "from datetime import UTC, datetime",
            "from pathlib import Path",
            "from ca.audit import AuditLog, AuditUnavailable",
            "from tests.support import fill_disk",
            "disk = Path(sys.argv[1])",
            "log = AuditLog.open('-', lambda: datetime.now(UTC))",
            "def say(n): log.record(result='issued', reason='token', caller=f'caller-{n}')",
            "say(1)",
            "import os",  # the next line straddles a page of the tmpfs: room for part of it
            "os.write(1, b'#' * (4096 - 100 - os.fstat(1).st_size - 1) + b'\\n')",
            "fill_disk(disk, leave=0)",
            "try:",
            "    say(2)",
            "    raise SystemExit('a line was written on a full disk')",
            "except AuditUnavailable:",
            "    pass",
            "(disk / 'filler').unlink()",
            "say(3)",
        ]
    )
    with path.open("wb") as stdout:  # as a shell's `>` opens it: not to append
        subprocess.run([sys.executable, "-c", script, str(small_disk)], stdout=stdout, check=True)
    assert b"\0" not in path.read_bytes()
    lines = [line for line in path.read_text().splitlines() if not line.startswith("#")]
    assert [json.loads(line)["caller"] for line in lines] == ["caller-1", "caller-3"]


def test_a_fifo_put_at_the_path_is_refused_not_waited_on(tmp_path: Path) -> None:
    """Opening a FIFO for writing waits for a reader: on the CA's event loop, that froze
    every call (and SIGTERM). Only a regular file is an audit log."""
    path = tmp_path / "audit.log"
    audit = AuditLog.open(str(path), lambda: datetime.now(UTC))
    try:
        path.unlink()
        os.mkfifo(path)
        with pytest.raises(AuditUnavailable, match="cannot write the audit log"):
            record(audit, 1)
    finally:
        audit.close()


def test_a_pipe_whose_reader_stopped_refuses_lines_instead_of_stopping_the_ca(
    tmp_path: Path,
) -> None:
    """A log shipper that hangs: the FIFO fills, and the next line is refused (the call it
    accounts for with it) rather than waited on with the CA's event loop stopped."""
    path = tmp_path / "audit.log"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opened, never read
    audit = AuditLog.open(str(path), lambda: datetime.now(UTC))
    try:
        with pytest.raises(AuditUnavailable, match="cannot write the audit log"):
            for n in range(10_000):  # bounded: a pipe holds 64 KiB, ~300 lines
                record(audit, n)
        started = time.monotonic()  # the wait ran out once: the next lines do not wait
        for n in range(20):
            with pytest.raises(AuditUnavailable):
                record(audit, n)
        assert time.monotonic() - started < PIPE_WAIT
        os.read(reader, 65536)  # the collector reads again: so does the log
        record(audit, 0)
    finally:
        audit.close()
        os.close(reader)


def test_a_pipe_whose_reader_is_only_slow_loses_no_line(tmp_path: Path) -> None:
    """A log collector that reads behind a burst (the pipe full for a moment) gets every
    line: a line waits up to PIPE_WAIT for room."""
    path = tmp_path / "audit.log"
    os.mkfifo(path)
    reader = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    got: list[bytes] = []
    done = threading.Event()

    def read_slowly() -> None:
        while True:
            if select.select([reader], [], [], 0.05)[0]:
                data = os.read(reader, 4096)
                if not data:  # the writer closed: all read
                    return
                got.append(data)
                time.sleep(0.002)  # behind the writer: the pipe fills now and then
            elif done.is_set():
                return

    thread = threading.Thread(target=read_slowly, daemon=True)
    thread.start()
    audit = AuditLog.open(str(path), lambda: datetime.now(UTC))
    try:
        for n in range(2_000):  # ~500 KB: many times what the pipe holds
            record(audit, n)
    finally:
        audit.close()
        done.set()
        thread.join(10)
        os.close(reader)
    lines = b"".join(got).decode().splitlines()
    assert [json.loads(line)["caller"] for line in lines] == [f"caller-{n}" for n in range(2_000)]


def test_a_pipe_read_a_page_at_a_time_holds_the_loop_a_bounded_share(tmp_path: Path) -> None:
    """A collector that takes a page every 0.6 s lets a line through each time: the next
    line waited on the event loop, and the CA stood still 82% of the time (/healthz at
    0.5 s) with no wait ever running out. The waits now take a bounded share of it, and
    as many lines get through."""
    path = tmp_path / "audit.log"
    blocked, written, started = 0.0, 0, time.monotonic()
    with (
        full_fifo(path) as reader,
        collector_behind(lambda: os.read(reader, 4096), every=0.6),
    ):
        audit = AuditLog.open(str(path), lambda: datetime.now(UTC))
        try:
            for n in range(100_000):  # bounded in count and in time
                if time.monotonic() - started > 3.0:
                    break
                before = time.monotonic()
                with contextlib.suppress(AuditUnavailable):
                    record(audit, n)
                    written += 1
                blocked += time.monotonic() - before
                time.sleep(0.005)  # callers keep coming
        finally:
            audit.close()
    share = blocked / (time.monotonic() - started)
    assert share < 0.5, f"the loop stood still {share:.0%} of the time"
    assert written >= 40  # a page every 0.6 s: ~27 lines each


def test_refusals_that_find_the_pipe_full_leave_the_waits_to_issued_certificates(
    tmp_path: Path,
) -> None:
    """Any caller makes refusals (a bad token), each an audit line: when they shared the
    waits with issuances, one caller refusing as fast as it could made 17 of 18 Signs
    fail `audit_unavailable` behind a collector taking a page every half second."""
    path = tmp_path / "audit.log"
    issued = 0
    with full_fifo(path) as reader, collector_behind(lambda: os.read(reader, 4096), every=0.2):
        audit = AuditLog.open(str(path), lambda: datetime.now(UTC))
        try:
            for n in range(8):
                for _ in range(50):  # refused as fast as they come
                    with contextlib.suppress(AuditUnavailable):
                        audit.record(result="refused", reason="bad_signature", caller=None)
                with contextlib.suppress(AuditUnavailable):
                    record(audit, n)
                    issued += 1
                time.sleep(0.3)  # issuances at the pace the collector keeps
        finally:
            audit.close()
    assert issued == 8


ISSUING_BEHIND_REFUSALS = """
import contextlib, sys, time
from datetime import UTC, datetime
from ca.audit import AuditLog, AuditUnavailable
log = AuditLog.open("-", lambda: datetime.now(UTC))
issued = 0
for n in range(8):
    for _ in range(50):  # refused as fast as they come
        with contextlib.suppress(AuditUnavailable):
            log.record(result="refused", reason="bad_signature", caller=None)
    with contextlib.suppress(AuditUnavailable):
        log.record(result="issued", reason="token", caller=f"caller-{n}")
        issued += 1
    time.sleep(0.3)  # issuances at the pace the collector keeps
print(issued, file=sys.stderr)
"""


def issuing_behind_refusals(stdout: int) -> subprocess.CompletedProcess[str]:
    """ISSUING_BEHIND_REFUSALS in a process of its own, its stdout (the log) `stdout`."""
    return subprocess.run(
        [sys.executable, "-c", ISSUING_BEHIND_REFUSALS],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        check=True,
    )


def test_refusals_leave_room_for_issued_certificates_on_a_socket_too() -> None:
    """systemd's journal takes stdout as a socket: a slow reader there, and a caller
    refusing as fast as it could, made 41 of 46 Signs fail `audit_unavailable` while the
    same behind a pipe failed none."""
    ours, theirs = socket.socketpair()
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
    try:
        with collector_behind(lambda: ours.recv(4096, socket.MSG_DONTWAIT), every=0.5):
            ran = issuing_behind_refusals(theirs.fileno())
    finally:
        ours.close()
        theirs.close()
    assert ran.stderr.split()[-1] == "8", ran.stderr


def test_refusals_leave_room_for_issued_certificates_on_a_terminal_too() -> None:
    """`docker run -t`, `kubectl logs -f` behind a pty: what waits is in the terminal's
    other end, unseen from the CA's; a refusal flood made 52 of 57 Signs fail."""
    master, slave = pty.openpty()
    tty.setraw(slave)
    os.set_blocking(master, False)
    try:
        with collector_behind(lambda: os.read(master, 2048), every=0.5):
            ran = issuing_behind_refusals(slave)
    finally:
        os.close(master)
        os.close(slave)
    assert ran.stderr.split()[-1] == "8", ran.stderr


def test_stdout_as_the_audit_log_is_left_as_the_caller_gave_it() -> None:
    """stdout's flags belong to its open file description, which the shell that started
    the CA (and whatever runs beside or after it) shares: writing the log leaves them."""
    script = (
        "import os; from datetime import UTC, datetime; from ca.audit import AuditLog; "
        "log = AuditLog.open('-', lambda: datetime.now(UTC)); "
        "log.record(result='issued', reason='token', caller='c'); "
        "print(os.get_blocking(1))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=True
    )
    line, blocking = done.stdout.splitlines()
    assert json.loads(line)["caller"] == "c" and blocking == "True"
