"""A log reader that stops reading (a stalled container runtime) never stops the agent.

The agent's stderr is a pipe of one page that the test stops reading once the agent
is ready. Each SIGHUP with a broken config file then logs a refusal of some 300
bytes: a line written from the event loop would block it at the pipe's 14th or so,
and with it /metrics, SIGHUP's next reload and every connection. The agent's lines
go out from a thread instead (identity/logs.py): it keeps answering, and once
the pipe is read again every refusal is there.
"""

from __future__ import annotations

import fcntl
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from tests.mesh import AgentProcess, served_agent_yaml
from tests.support import CaProcess, CaSetup

RELOADS = 40
PAGE = 4096


@contextmanager
def agent_with_stalled_log(
    setup: CaSetup, ca: CaProcess, workers: int
) -> Iterator[tuple[AgentProcess, Path, int]]:
    """`outrider agent run` whose stderr is a one-page pipe, read until the agent is
    ready and then left alone; yields the agent, its config file and the read end."""
    path = setup.root / f"stalled{workers}.yaml"
    raw = served_agent_yaml(setup, ca, f"stalled{workers}", workers=workers)
    path.write_text(yaml.safe_dump(raw))
    read_fd, write_fd = os.pipe()
    fcntl.fcntl(read_fd, fcntl.F_SETPIPE_SZ, PAGE)
    process = subprocess.Popen(
        [sys.executable, "-m", "outrider", "agent", "run", "--config", str(path)],
        stderr=write_fd,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    os.close(write_fd)
    try:
        text = read_until(read_fd, b"ready as ", seconds=20)
        admin = text.split("admin listening on ", 1)[1].split()[0]
        yield AgentProcess(path.stem, process, {"admin": admin}), path, read_fd
    finally:
        process.kill()
        process.wait(10)
        os.close(read_fd)


def read_until(fd: int, needle: bytes, seconds: float) -> str:
    data, deadline = b"", time.monotonic() + seconds
    while needle not in data.rsplit(b"\n", 1)[0] and time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            data += chunk
    assert needle in data, data.decode(errors="replace")[-2000:]
    return data.decode(errors="replace")


@pytest.mark.parametrize("workers", [1, 2])
def test_an_agent_whose_log_is_not_read_keeps_answering(
    setup: CaSetup, ca: CaProcess, workers: int
) -> None:
    with agent_with_stalled_log(setup, ca, workers) as (agent, path, read_fd):
        path.write_text("identity: [this is not a config\n")
        for reload in range(1, RELOADS + 1):
            agent.process.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            refused = 0.0
            while refused < reload and time.monotonic() < deadline:
                try:
                    refused = agent.sample(
                        "outrider_config_reloads_total", kind="agent", result="error"
                    )
                except OSError:  # /metrics not answered in its 5 s: the loop is stuck
                    break
            assert refused == reload, f"the agent stopped answering at reload {reload}"
        logged = read_until(read_fd, b"reload refused", seconds=5)
        deadline = time.monotonic() + 10
        while logged.count("reload refused") < RELOADS and time.monotonic() < deadline:
            if select.select([read_fd], [], [], 0.1)[0]:
                logged += os.read(read_fd, 65536).decode(errors="replace")
        assert logged.count("reload refused") == RELOADS  # none lost: a MiB may wait
