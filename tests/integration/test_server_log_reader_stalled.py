"""A log reader that stops reading never stops a server's event loop: the CA's, the
control plane's or the injector's, as it never stops the agent's
(tests/integration/test_agent_log_reader_stalled.py).

A container runtime that stalls, or a collector behind `2>&1` that stops reading,
leaves stderr a full pipe. The agent's lines already went out from a thread; the
other servers wrote theirs from the event loop, so the line after the pipe filled
stopped everything they serve: a review found the CA frozen by its own
"cannot write the audit log" lines. Every server the `outrider` command runs goes
through one place (`_until_signalled`), which now moves them all off the loop.
"""

from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

PAGE = 4096

SERVER = """
import asyncio, logging, sys
from pathlib import Path
from outrider.cli import _until_signalled

logging.basicConfig(level=logging.INFO, stream=sys.stderr)

async def serve(stop):
    for n in range(100):  # ~25 KB of lines: six times what the pipe holds
        logging.getLogger("outrider.test").info("line %d %s", n, "x" * 200)
        await asyncio.sleep(0)
    Path(sys.argv[1]).write_text("served")

_until_signalled(serve)
"""


def test_a_server_whose_log_is_not_read_goes_on_serving(tmp_path: Path) -> None:
    done = tmp_path / "served"
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PAGE)  # never read
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER, str(done)], stderr=write_fd, stdout=subprocess.DEVNULL
        )
        os.close(write_fd)
        try:
            process.wait(timeout=15)  # lines still waiting are given up at exit, after 2 s
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
        assert done.exists(), "the event loop stopped at a log line"
    finally:
        os.close(read_fd)
