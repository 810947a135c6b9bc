"""The CA's audit log as a file: every line whole, written once, where the path says.

Real files on a real filesystem; a full disk is a tmpfs the test mounts (`small_disk`).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from ca.audit import PIPE_WAIT, AuditLog, AuditUnavailable
from tests.support import fill_disk


def record(audit: AuditLog, n: int) -> None:
    audit.record(result="issued", reason="token", caller=f"caller-{n}", serial=n)


def callers(path: Path) -> list[str]:
    return [json.loads(line)["caller"] for line in path.read_text().splitlines()]


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
