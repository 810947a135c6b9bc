"""A client that leaves while the inbound agent dials its app (a real agent process): the
connection the dial then hands over is closed, not left open on the agent and the app, on
every inbound path (HTTP, and access-logged TCP, as well as plain TCP).

The app's dial is held up the way a busy app holds it up: its accept queue is full, so
the kernel drops the agent's SYN until the test accepts what fills it (the SYN is sent
again a second later)."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.httpraw import mtls_socket
from tests.mesh import AgentProcess, agent_process, served_agent_yaml
from tests.support import CaProcess, CaSetup, free_port

#: /proc/net/tcp's state of a socket whose connect is waiting for the SYN's answer.
SYN_SENT = "02"


@dataclass
class StalledApp:
    """An app whose accept queue is full until `release`: a dial to it waits."""

    listening: socket.socket
    filler: socket.socket | None = None

    @property
    def port(self) -> int:
        return int(self.listening.getsockname()[1])

    def stall(self) -> None:
        self.filler = socket.create_connection(("127.0.0.1", self.port))

    def release(self) -> socket.socket:
        """Take the filler, then the agent's connection (once its SYN is sent again)."""
        filler, _ = self.listening.accept()
        filler.close()
        assert self.filler is not None
        self.filler.close()
        self.filler = None
        dialled, _ = self.listening.accept()
        return dialled


@contextmanager
def stalled_app() -> Iterator[StalledApp]:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen(0)  # one queued connection fills it
        listening.settimeout(10)
        yield StalledApp(listening)


@pytest.fixture(scope="module")
def app() -> Iterator[StalledApp]:
    with stalled_app() as app:
        yield app


@pytest.fixture(scope="module")
def agent(
    setup: CaSetup, ca: CaProcess, app: StalledApp, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    """An HTTP port and a TCP port to the stalled app, every connection access-logged."""
    root: Path = tmp_path_factory.mktemp("gone")
    listeners = [
        {"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app.port}", "protocol": protocol}
        for protocol in ("http", "tcp")
    ]
    raw = served_agent_yaml(setup, ca, "backend", inbound=listeners, access_log={"mode": "all"})
    with agent_process(root, "backend", raw) as process:
        yield process


def open_fds(agent: AgentProcess) -> int:
    return len(os.listdir(f"/proc/{agent.process.pid}/fd"))


def dialling(port: int) -> bool:
    """Whether a connect to 127.0.0.1:`port` is waiting for its SYN's answer."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    return any(
        row.split()[2] == f"0100007F:{port:04X}" and row.split()[3] == SYN_SENT for row in rows
    )


def poll(check: Callable[[], bool], seconds: float = 5.0) -> bool:
    """`check()` became true within `seconds` (a real process does things in its own time)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


@pytest.mark.parametrize("listener", ["inbound[0]", "inbound[1]"], ids=["http", "logged-tcp"])
def test_the_app_connection_dialled_after_its_client_left_is_closed(
    setup: CaSetup, agent: AgentProcess, app: StalledApp, listener: str
) -> None:
    before = open_fds(agent)
    app.stall()
    client = mtls_socket(setup, agent.bound[listener])
    client.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\n\r\n")
    assert poll(lambda: dialling(app.port)), "the agent never dialled the app"
    reset = struct.pack("ii", 1, 0)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, reset)
    client.close()  # gone while the agent's SYN waits
    with app.release() as dialled:
        dialled.settimeout(5)
        try:
            assert dialled.recv(1024) == b"", "the agent sent the app a gone client's bytes"
        except TimeoutError:
            pytest.fail("the app's connection stayed open after its client left")
        except ConnectionResetError:
            pass  # closed, with a reset: as good
    assert poll(lambda: open_fds(agent) <= before), "the agent kept a file descriptor"
    assert not [line for line in agent.log if "Traceback" in line or "Error" in line]
