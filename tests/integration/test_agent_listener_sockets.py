"""The agent's listening sockets (agent/adapters/listeners.py, capture_listeners.py), in
process over loopback: a burst is accepted whole, in batches; out of file descriptors the
acceptor backs off, says so a line a while, and keeps its listener; a capture listener
holds its IPv4 and IPv6 sockets together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import pytest

from agent.adapters.capture_listeners import OutboundCaptureListener
from agent.adapters.listeners import ACCEPT_BATCH, Connections, Listener
from identity.configfile import Listen
from identity.throttle import LogThrottle
from tests.mesh import eventually


class Taking(Listener[Any]):
    """A listener that keeps what it accepts."""

    direction = "inbound"

    def __init__(self) -> None:
        runtime = SimpleNamespace(refusal_lines=LogThrottle(), reuse_port=False)
        super().__init__(cast(Any, None), cast(Any, runtime), cast(Any, None))
        self.taken: list[socket.socket] = []

    def _admit(self, sock: socket.socket) -> None:
        self.taken.append(sock)


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """No file descriptor left to the process: its limit at its highest one, the holes
    below filled."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
    fillers: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while len(fillers) <= highest:
                fillers.append(os.dup(0))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_out_of_descriptors_the_loop_backs_off_says_it_once_and_accepts_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    listener = Taking()
    listener.bind(Listen("127.0.0.1", 0))
    await listener.start()
    port = int(listener.address.rsplit(":", 1)[1])
    clients: list[socket.socket] = []
    try:
        # Queued by the kernel; the loop runs (and accepts) only once the limit is reached.
        clients.append(socket.create_connection(("127.0.0.1", port)))
        with caplog.at_level(logging.WARNING, "outrider.agent"), out_of_descriptors():
            cpu = time.process_time()
            await asyncio.sleep(0.35)  # ~3 retries of the accept
            assert time.process_time() - cpu < 0.2  # backed off, not spinning
        assert listener.taken == []
        failed = [r for r in caplog.records if "accept failed" in r.getMessage()]
        assert len(failed) == 1, [r.getMessage() for r in failed]
        assert await eventually(lambda: len(listener.taken) == 1)  # the listener kept
    finally:
        listener.close()
        for sock in [*clients, *listener.taken]:
            sock.close()


async def test_a_burst_larger_than_a_batch_is_accepted_whole_and_each_socket_non_blocking() -> None:
    listener = Taking()
    listener.bind(Listen("127.0.0.1", 0))
    port = int(listener.address.rsplit(":", 1)[1])
    burst = 3 * ACCEPT_BATCH + 1  # queued by the kernel before the listener accepts
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(burst)]
    try:
        await listener.start()
        assert await eventually(lambda: len(listener.taken) == burst)
        assert not any(sock.getblocking() for sock in listener.taken)
    finally:
        listener.close()
        for sock in [*clients, *listener.taken]:
            sock.close()


def test_a_capture_listener_that_cannot_take_its_ipv6_port_holds_no_ipv4_port_either() -> None:
    """As at a refused reload's retake, [::1]:P taken meanwhile: 127.0.0.1:P is let go too,
    not left queueing the app's connections with nobody accepting them."""
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    taken = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    taken.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    with taken:
        taken.bind(("::1", port))
        taken.listen()
        config, runtime = cast(Any, None), cast(Any, SimpleNamespace(reuse_port=False))
        listener = OutboundCaptureListener(config, runtime, cast(Connections, None))
        with pytest.raises(OSError, match=rf"cannot listen on \[::1\]:{port}"):
            listener.bind(Listen("127.0.0.1", port))
        socket.create_server(("127.0.0.1", port)).close()  # free: nobody holds it
