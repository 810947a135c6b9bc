"""A port the agent cannot take: which address, and for one in use, why it may be."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import pytest

from agent.adapters.listeners import Listener
from agent.supervisor import reserve
from identity.configfile import Listen


def bare() -> Listener:  # type: ignore[type-arg]
    """A listener with nothing but what bind reads."""
    listener = Listener.__new__(Listener)
    listener.runtime = SimpleNamespace(reuse_port=False)  # type: ignore[assignment]
    return listener


def test_a_port_in_use_names_the_address_and_the_draining_previous_process() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as raised:
            Listener.bind(bare(), Listen("127.0.0.1", port))
    message = raised.value.strerror
    assert message.startswith(f"cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "still draining its connections after a SIGTERM" in message
    assert "up to limits.drain_timeout" in message


def test_another_failure_is_said_as_it_is() -> None:
    with pytest.raises(OSError) as raised:
        Listener.bind(bare(), Listen("192.0.2.1", 0))  # not an address of this host
    assert raised.value.strerror.startswith("cannot listen on 192.0.2.1:0: ")
    assert "draining" not in raised.value.strerror


def test_workers_share_a_port_that_another_process_cannot_take() -> None:
    """`workers:`: the main process reserves each address before any worker binds it:
    one held without SO_REUSEPORT is refused with the same words; the workers' own
    listeners bind beside the reservation, and get its connections."""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(OSError) as raised:
            reserve(Listen("127.0.0.1", port))
    assert raised.value.strerror.startswith(f"cannot listen on 127.0.0.1:{port}: Address already")
    with reserve(Listen("127.0.0.1", 0)) as reserved:
        port = reserved.getsockname()[1]
        with (
            socket.create_server(("127.0.0.1", port), reuse_port=True) as worker,
            socket.create_connection(("127.0.0.1", port)),
        ):
            worker.settimeout(5)
            accepted, _ = worker.accept()
            accepted.close()
