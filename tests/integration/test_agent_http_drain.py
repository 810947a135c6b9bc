"""SIGTERM on an HTTP inbound drains request by request, in a real `outrider agent run`.

Idle keep-alive connections close at once, a request in flight is answered
with `Connection: close`, and a request that starts after the drain began is
not taken: its connection closes, which a client treats like any pooled
connection the server closed. The drain timeout is long (20 s), so a test
that passes shows the drain did not wait for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from aiohttp import web

from tests.httpraw import Responses, connect, get
from tests.mesh import AgentProcess, agent_process, inbound, served_agent_yaml, threaded_app
from tests.support import CaProcess, CaSetup

DRAIN_TIMEOUT = 20.0
WELL_UNDER = 5.0  # seconds: what "did not wait for the drain timeout" means here
SLOW = 1.0  # seconds the app takes over /slow... (each test asks for a path of its own)


class App:
    """The app behind the agent; `seen` lists the paths it was asked for."""

    def __init__(self, port: int, seen: list[str]) -> None:
        self.port, self.seen = port, seen

    def wait_for(self, path: str) -> None:
        for _ in range(500):
            if path in self.seen:
                return
            time.sleep(0.01)
        raise AssertionError(f"the app never got {path}")


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(request.path)
        if request.path.startswith("/slow"):
            await asyncio.sleep(SLOW)
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_get("/{tail:.*}", answer)
    with threaded_app(application) as port:
        yield App(port, seen)


@contextmanager
def http_agent(setup: CaSetup, ca: CaProcess, app: App) -> Iterator[AgentProcess]:
    raw = served_agent_yaml(
        setup,
        ca,
        "backend",
        inbound=inbound(app.port, protocol="http"),
        limits={"drain_timeout": f"{DRAIN_TIMEOUT:.0f}s"},
    )
    with agent_process(setup.root, "backend", raw) as process:
        yield process


def terminate(agent: AgentProcess) -> None:
    """SIGTERM, then wait until the agent says it is draining (/ready 503), or is gone."""
    agent.process.send_signal(signal.SIGTERM)
    for _ in range(500):
        try:
            agent.get("/ready")
        except urllib.error.HTTPError as exc:
            if exc.code == 503:
                return
        except (urllib.error.URLError, ConnectionResetError) as exc:
            # Drained and stopped already; or stopping as it was asked, the probe cut off.
            if isinstance(
                getattr(exc, "reason", exc), ConnectionRefusedError | ConnectionResetError
            ):
                return
        time.sleep(0.01)
    raise AssertionError("the agent never started draining")


def exits_soon(agent: AgentProcess, since: float) -> None:
    assert agent.process.wait(timeout=WELL_UNDER) == 0
    assert time.monotonic() - since < WELL_UNDER


def test_an_idle_keep_alive_connection_closes_at_once(
    setup: CaSetup, ca: CaProcess, app: App
) -> None:
    with http_agent(setup, ca, app) as agent, connect(setup, agent) as pooled:
        responses = Responses(pooled)
        pooled.sendall(get("/"))
        reply = responses.next()
        assert reply is not None and reply.status == 200
        started = time.monotonic()
        terminate(agent)
        exits_soon(agent, started)
        assert responses.next() is None


def test_a_request_in_flight_is_answered_with_connection_close(
    setup: CaSetup, ca: CaProcess, app: App
) -> None:
    with http_agent(setup, ca, app) as agent, connect(setup, agent) as busy:
        busy.sendall(get("/slow/in-flight"))
        app.wait_for("/slow/in-flight")
        started = time.monotonic()
        terminate(agent)
        # A config reloader may signal as the pod terminates: SIGHUP's default action
        # would end the agent here and cut the request off.
        agent.process.send_signal(signal.SIGHUP)
        responses = Responses(busy)
        reply = responses.next()
        assert reply is not None and reply.status == 200 and reply.body == b"ok"
        assert reply.headers["connection"] == "close"
        assert responses.next() is None
        exits_soon(agent, started)


def test_a_new_request_on_a_pooled_connection_after_sigterm_is_not_taken(
    setup: CaSetup, ca: CaProcess, app: App
) -> None:
    with (
        http_agent(setup, ca, app) as agent,
        connect(setup, agent) as pooled,
        connect(setup, agent) as busy,
    ):
        pooled_responses = Responses(pooled)
        pooled.sendall(get("/"))
        first = pooled_responses.next()
        assert first is not None and first.status == 200
        busy.sendall(get("/slow/busy"))  # keeps the agent draining while the pooled one is tried
        app.wait_for("/slow/busy")
        terminate(agent)
        with contextlib.suppress(OSError):  # already closed: just as good
            pooled.sendall(get("/after-sigterm"))
        assert pooled_responses.next() is None  # closed: the client retries elsewhere
        busy_reply = Responses(busy).next()
        assert busy_reply is not None and busy_reply.status == 200
        agent.process.wait(timeout=WELL_UNDER)
    assert "/after-sigterm" not in app.seen


@pytest.mark.parametrize("first", [b"", b"\x16"], ids=["silent", "partial-hello"])
def test_a_connection_still_before_its_handshake_does_not_hold_the_drain(
    setup: CaSetup, ca: CaProcess, app: App, first: bytes
) -> None:
    # It carries no request yet: like a connect to a closed listener, it is refused at once
    # rather than given the rest of its handshake timeout (10 s) to hold the pod up.
    with http_agent(setup, ca, app) as agent:
        host, port = agent.bound["inbound[0]"].rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=WELL_UNDER) as waiting:
            waiting.sendall(first)
            time.sleep(0.1)  # accepted, and its first byte (if any) read
            started = time.monotonic()
            terminate(agent)
            exits_soon(agent, started)
