"""Access log lines of inbound connections the agent could not relay, on a real agent
process whose stdout is a real pipe: a caller past `limits.max_connections` is refused
before its handshake, counted and never logged (it would name nobody); an app's connection
past it on an outbound listener is a denial's line; an allowed TCP
connection whose app is unreachable gets its line in mode all, with why (not a denial: the
policy allowed it, as an outbound connection that reached nothing is logged).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from agent.core.accesslog import FIELDS
from tests.httpraw import mtls_socket
from tests.mesh import Logged, inbound, logged_agent, outbound, served_agent_yaml, workload
from tests.support import CaProcess, CaSetup, free_port


@pytest.fixture(scope="module")
def logged(setup: CaSetup, ca: CaProcess) -> Iterator[Logged]:
    """An agent whose tcp inbound's app never listens, one connection at most."""
    raw = served_agent_yaml(
        setup,
        ca,
        "backend",
        inbound=inbound(free_port(), protocol="tcp"),
        limits={"max_connections": 1},
        access_log={"mode": "all"},
    )
    with logged_agent(setup.root, "backend", raw) as logged:
        yield logged


@pytest.fixture(scope="module")
def stuck(setup: CaSetup, ca: CaProcess) -> Iterator[tuple[Logged, socket.socket]]:
    """An agent whose tcp inbound's app takes no connection: its listener's queue is full,
    so the agent's dial hangs until `connect_timeout` (3s: the kernel's SYN retried after
    1s), unless the app (the socket yielded) accepts what waits."""
    with ExitStack() as stack:
        app = stack.enter_context(socket.socket())
        app.bind(("127.0.0.1", 0))
        app.listen(0)
        for _ in range(3):  # the queue filled: further SYNs go unanswered
            filler = stack.enter_context(socket.socket())
            filler.setblocking(False)
            filler.connect_ex(app.getsockname())
        raw = served_agent_yaml(
            setup,
            ca,
            "backend",
            inbound=inbound(app.getsockname()[1], protocol="tcp"),
            limits={"connect_timeout": "3s"},
            access_log={"mode": "all"},
        )
        yield stack.enter_context(logged_agent(setup.root, "backend", raw)), app


@pytest.fixture(scope="module")
def calling(setup: CaSetup, ca: CaProcess) -> Iterator[Logged]:
    """An agent whose http outbound listener takes one of the app's connections at most
    (mode denied): the app's silent connection holds the one place."""
    listener = outbound(f"127.0.0.1:{free_port()}", workload("backend"))
    listener[0]["protocol"] = "http"
    raw = served_agent_yaml(
        setup,
        ca,
        "frontend",
        outbound=listener,
        limits={"max_connections": 1},
        access_log={"mode": "denied"},
    )
    with logged_agent(setup.root, "frontend", raw) as logged:
        yield logged


def _closed_unread(sock: socket.socket) -> bool:
    sock.settimeout(5)
    try:
        return sock.recv(1) == b""
    except ConnectionError:
        return True


def test_an_allowed_connection_whose_app_is_unreachable_says_why(
    setup: CaSetup, logged: Logged
) -> None:
    logged.lines()
    with mtls_socket(setup, logged.agent.bound["inbound[0]"]) as tls:
        assert _closed_unread(tls)
    lines = logged.wait_for(lambda line: line["error"] == "app_unreachable")
    (line,) = [line for line in lines if line["error"] == "app_unreachable"]
    assert list(line) == list(FIELDS)
    assert (line["kind"], line["direction"], line["decision"]) == ("tcp", "inbound", "allow")
    assert line["peer_id"] == str(workload("frontend")) and line["tls_version"] == "TLSv1.3"
    assert line["bytes_in"] == line["bytes_out"] == 0


def test_a_caller_past_max_connections_is_counted_but_writes_no_line(
    setup: CaSetup, logged: Logged
) -> None:
    """Refused at accept, before any handshake: such a line would name nobody, and anyone
    who can connect, without credentials, could write lines far faster than any denial
    they can cause (20,000 connects gave 10,001 lines in 5 s); the metric counts it."""
    logged.lines()
    address = logged.agent.bound["inbound[0]"]
    host, port = address.rsplit(":", 1)
    refused = "outrider_connections_refused_total"
    before = logged.agent.sample(refused, direction="inbound", reason="max_connections")
    with socket.create_connection((host, int(port)), 5):  # held: the one place taken
        with socket.create_connection((host, int(port)), 5) as caller:
            assert _closed_unread(caller)
        after = logged.agent.sample(refused, direction="inbound", reason="max_connections")
        assert after == before + 1
    # A line written after the refusal (an allowed connection's): lines keep their order,
    # so whatever the refusal wrote has been read by the time this one is. The held
    # connection's place comes free once the agent has seen it close: until then this
    # one is refused too (reset, and counted: still no line).
    deadline = time.monotonic() + 10
    while True:
        try:
            with mtls_socket(setup, address) as tls:
                assert _closed_unread(tls)
            break
        except (ConnectionError, ssl.SSLError):  # refused at accept: reset, or shut
            assert time.monotonic() < deadline, "the held connection's place never came free"
            time.sleep(0.05)
    lines = logged.wait_for(lambda line: line["error"] == "app_unreachable")
    assert not [line for line in lines if line["error"] == "max_connections"]


def test_an_app_connection_past_max_connections_on_an_outbound_listener_is_logged(
    calling: Logged,
) -> None:
    """The same refusal, counted under the same labels, as a captured one past
    max_connections: a denial's line in mode denied, naming the upstream it was for."""
    calling.lines()
    host, port = calling.agent.bound["outbound[backend]"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), 5):  # held: the one place taken
        with socket.create_connection((host, int(port)), 5) as refused:
            assert _closed_unread(refused)
        lines = calling.wait_for(lambda line: line["error"] == "max_connections")
        (line,) = [line for line in lines if line["error"] == "max_connections"]
    assert list(line) == list(FIELDS)
    assert (line["kind"], line["direction"], line["decision"]) == ("tcp", "outbound", "deny")
    assert line["upstream"] == "backend"
    for name in ("peer_id", "tls_version", "cipher", "endpoint", "policy", "rule"):
        assert line[name] is None, name


def test_a_caller_that_leaves_while_its_app_is_dialled_still_gets_its_line(
    setup: CaSetup, stuck: tuple[Logged, socket.socket]
) -> None:
    """Allowed, counted as app_unreachable, never relayed: its one line (mode all) says
    so, whether the caller waited for the dial to fail or left before."""
    logged, _ = stuck
    logged.lines()
    address = logged.agent.bound["inbound[0]"]
    before = logged.agent.total("outrider_connections_refused_total", reason="app_unreachable")
    with mtls_socket(setup, address) as tls:  # leaves at once, the dial under way
        tls.sendall(b"x")
    with mtls_socket(setup, address) as tls:  # waits for the dial to fail
        assert _closed_unread(tls)
    lines = logged.wait_for(lambda line: line["error"] == "app_unreachable")
    if len(lines) < 2:  # the other one's
        lines += logged.wait_for(lambda line: True, timeout=3)
    unreachable = [line for line in lines if line["error"] == "app_unreachable"]
    assert len(unreachable) == 2 == len(lines), lines
    after = logged.agent.total("outrider_connections_refused_total", reason="app_unreachable")
    assert after == before + 2
    for line in unreachable:
        assert (line["decision"], line["peer_id"]) == ("allow", str(workload("frontend")))
        assert line["tls_version"] == "TLSv1.3" and line["bytes_in"] == line["bytes_out"] == 0
    assert logged.agent.total("outrider_connections_active") == 0


def test_a_caller_gone_before_its_late_app_answers_gets_its_line(
    setup: CaSetup, stuck: tuple[Logged, socket.socket]
) -> None:
    """The app takes the agent's connection after the caller left: nothing relayed, one
    line (allowed, no error, no bytes). Last: it unsticks
    the app."""
    logged, app = stuck
    logged.lines()
    with mtls_socket(setup, logged.agent.bound["inbound[0]"]) as tls:
        tls.sendall(b"x")
    app.settimeout(0.2)
    taken: list[socket.socket] = []
    lines: list[dict[str, Any]] = []
    deadline = time.monotonic() + 8
    try:  # the app takes what waits (the fillers, then the agent's) until the line comes
        while not lines and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                taken.append(app.accept()[0])
            lines = logged.lines()
    finally:
        for sock in taken:
            sock.close()
    (line,) = lines
    assert (line["decision"], line["error"], line["bytes_in"], line["bytes_out"]) == (
        "allow",
        None,
        0,
        0,
    )
    assert line["peer_id"] == str(workload("frontend")) and line["tls_version"] == "TLSv1.3"
    assert logged.agent.total("outrider_connections_active") == 0
