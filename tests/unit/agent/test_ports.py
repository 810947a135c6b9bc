"""A port the agent cannot take: which address, and for one in use, why it may be."""

from __future__ import annotations

import socket

import pytest

from agent.adapters.listeners import Listener
from identity.configfile import Listen


def test_a_port_in_use_names_the_address_and_the_draining_previous_process() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        listener = Listener.__new__(Listener)
        with pytest.raises(OSError) as raised:
            Listener.bind(listener, Listen("127.0.0.1", port))
    message = raised.value.strerror
    assert message.startswith(f"cannot listen on 127.0.0.1:{port}: Address already in use")
    assert "still draining its connections after a SIGTERM" in message
    assert "up to limits.drain_timeout" in message


def test_another_failure_is_said_as_it_is() -> None:
    listener = Listener.__new__(Listener)
    with pytest.raises(OSError) as raised:
        Listener.bind(listener, Listen("192.0.2.1", 0))  # not an address of this host
    assert raised.value.strerror.startswith("cannot listen on 192.0.2.1:0: ")
    assert "draining" not in raised.value.strerror
