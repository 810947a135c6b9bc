"""The access log under attack, on a real agent process whose stdout is a real pipe.

A log pipeline that stops reading (a stalled container runtime, a full disk
behind it) must not stop the data plane: the agent's lines wait in a bounded
buffer and the rest are dropped and counted, never written from the event
loop. And whatever a caller or the app puts in a request target (a query, a
fragment, path parameters such as `;jsessionid=`, userinfo in an absolute-form
target) leaves no secret in a line.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from aiohttp import web

from tests.h2raw import H2Client, request_headers, tls_socket
from tests.httpraw import Responses, connect, exchange, get, one
from tests.mesh import (
    Logged,
    agent_process,
    inbound,
    logged_agent,
    served_agent_yaml,
    threaded_app,
)
from tests.support import CaProcess, CaSetup, free_port

POLICY = {
    "policies": [
        {
            "name": "guard",
            "action": "DENY",
            "rules": [{"name": "admin", "to": {"paths": ["/admin*"]}}],
        }
    ]
}
SECRET = "s3cret-value"


@pytest.fixture(scope="module")
def logged(setup: CaSetup, ca: CaProcess) -> Iterator[Logged]:
    async def answer(request: web.Request) -> web.Response:
        await request.read()  # an app that answers before the body came races its count
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", answer)
    dead = f"127.0.0.1:{free_port()}"  # an upstream nobody serves: each request a 503
    with threaded_app(application) as app_port:
        raw = served_agent_yaml(
            setup,
            ca,
            "backend",
            inbound=inbound(app_port, protocol="http"),
            outbound=[
                {
                    "name": "elsewhere",
                    "listen": "127.0.0.1:0",
                    "protocol": "http",
                    "endpoints": [dead],
                    "server_ids": ["spiffe://example.org/ns/demo/sa/elsewhere"],
                }
            ],
            policy=POLICY,
            access_log={"mode": "all"},
        )
        # A small pipe: full after a few lines.
        with logged_agent(setup.root, "backend", raw, pipe_size=4096) as logged:
            yield logged


def test_a_log_reader_that_stops_reading_never_stalls_requests(
    setup: CaSetup, logged: Logged
) -> None:
    logged.lines()
    dropped_before = logged.agent.total("outrider_access_log_dropped_lines_total")
    long_path = "/api/" + "p" * 1500  # a line of ~1.7 KB: the 4 KB pipe is full at once
    answered = 0
    started = time.monotonic()
    for _ in range(6):  # 6 connections x 40 pipelined requests: ~400 KB of lines, unread
        with connect(setup, logged.agent) as tls:
            tls.settimeout(5)
            tls.sendall(get(long_path) * 40)
            responses = Responses(tls)
            for _ in range(40):
                reply = responses.next()
                assert reply is not None and reply.status == 200
                answered += 1
    assert answered == 240 and time.monotonic() - started < 20
    # The agent is all there (its admin answers) and, the reader back, no line is lost:
    # what did not fit in the pipe waited in the agent (up to MAX_PENDING, then dropped).
    assert logged.agent.total("outrider_access_log_dropped_lines_total") == dropped_before
    assert one(setup, logged.agent, get("/api/after")).status == 200
    seen = logged.wait_for(lambda line: line["path"] == "/api/after")
    assert len([line for line in seen if line["path"] == long_path]) == 240


@pytest.mark.parametrize(
    "target",
    [
        f"/api/a;jsessionid={SECRET}",
        f"/api/a;jsessionid={SECRET}/b",
        f"/api/a;JSESSIONID={SECRET}?x=1",
        f"/api/a;token={SECRET};v=2",
        f"/api/a?token={SECRET}",
        f"/api/a?x=1#{SECRET}",
        f"/api/a#access_token={SECRET}",
    ],
)
def test_no_secret_in_an_inbound_target_reaches_a_line(
    setup: CaSetup, logged: Logged, target: str
) -> None:
    logged.lines()
    one(setup, logged.agent, get(target, f"Authorization: Bearer {SECRET}", f"Cookie: s={SECRET}"))
    seen = logged.wait_for(lambda line: (line["path"] or "").partition(";")[0] == "/api/a")
    assert not any(SECRET in json.dumps(line) for line in seen), seen


def test_an_h2_stream_on_the_http_port_is_logged_with_its_bytes_and_no_secret(
    setup: CaSetup, logged: Logged
) -> None:
    """h2 picked by ALPN on the `protocol: http` port (each stream an HTTP/1.1 request to
    the app): the line counts the body each way, and its :path leaves no secret."""
    logged.lines()
    client = H2Client(tls_socket(setup, logged.agent, alpn=("h2", "http/1.1")))
    try:
        target = f"/api/upload;jsessionid={SECRET}?token={SECRET}"
        headers = request_headers(target, "POST", "backend", authorization=f"Bearer {SECRET}")
        reply = client.wait(client.send(headers, b"x" * 1000))
    finally:
        client.close()
    assert reply.status == 200
    seen = logged.wait_for(lambda line: (line["path"] or "").startswith("/api/upload"))
    (line,) = [line for line in seen if (line["path"] or "").startswith("/api/upload")]
    assert (line["bytes_in"], line["bytes_out"]) == (1000, len("ok")), line
    assert line["path"] == "/api/upload;jsessionid=REDACTED"
    assert not any(SECRET in json.dumps(line) for line in seen)


@pytest.mark.parametrize(
    "value",
    [
        'a"},{"forged":"1',
        "a\\u0000b",
        "caf\xe9\xff\xfe",  # not UTF-8 (obs-text, which HTTP/1.1 allows in a value)
        "x" * 4000,
    ],
)
def test_trace_headers_a_caller_forges_are_replaced_and_leave_one_plain_line(
    setup: CaSetup, logged: Logged, value: str
) -> None:
    logged.lines()
    forged = [f"X-Request-Id: {value}", f"traceparent: 00-{value}", f"tracestate: k={value}"]
    raw = get("/api/forged", *forged)
    replies = exchange(setup, logged.agent, raw)
    assert replies and replies[0].status == 200
    seen = logged.wait_for(lambda line: line["path"] == "/api/forged")
    (line,) = [line for line in seen if line["path"] == "/api/forged"]
    assert len(line["request_id"]) == 36 and line["request_id"][14] == "4"  # a new UUID 4
    assert len(line["trace_id"]) == 32 and value not in json.dumps(line)


def _plain(address: str, raw: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(raw)
        received = b""
        while b"\r\n\r\n" not in received:
            chunk = sock.recv(4096)
            if not chunk:
                break
            received += chunk
        return received


@pytest.mark.parametrize(
    "target",
    [
        f"http://user:{SECRET}@elsewhere/api/a",
        f"http://elsewhere/api/a?token={SECRET}",
        f"/api/a#access_token={SECRET}",
        f"/api/a?x=1#{SECRET}",
        f"/api/a;jsessionid={SECRET}",
        f"/api/a;jsessionid={SECRET}?page=1",
        '/api/a"},{"forged":"line',  # quotes: escaped, one line with the path as sent
    ],
)
def test_no_secret_in_an_outbound_target_reaches_a_line(logged: Logged, target: str) -> None:
    """The app's own requests, as it wrote them: the outbound side logs what it was sent."""
    logged.lines()
    address = logged.agent.bound["outbound[elsewhere]"]
    request = f"GET {target} HTTP/1.1\r\nHost: elsewhere\r\nCookie: s={SECRET}\r\n\r\n"
    answer = _plain(address, request.encode())
    assert answer.startswith(b"HTTP/1.1 "), answer
    seen = logged.wait_for(lambda line: line["direction"] == "outbound")
    assert not any(SECRET in json.dumps(line) for line in seen), seen
    (line,) = [line for line in seen if line["direction"] == "outbound"]
    assert line["path"] is None or line["path"].startswith("/api/a"), line


@contextmanager
def blackhole() -> Iterator[int]:
    """A TCP port that accepts and never answers: an OTLP receiver gone silent."""
    server = socket.create_server(("127.0.0.1", 0), backlog=64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for sock in held:
            sock.close()
        server.close()


def test_a_silent_otlp_receiver_neither_slows_requests_nor_holds_up_the_shutdown(
    setup: CaSetup, ca: CaProcess
) -> None:
    """Spans wait in a bounded queue for a receiver that never answers; requests go on at
    their pace, and SIGTERM ends the agent within its drain timeout and a short flush."""

    async def answer(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", answer)
    with blackhole() as port, threaded_app(application) as app_port:
        raw = served_agent_yaml(
            setup,
            ca,
            "backend",
            inbound=inbound(app_port, protocol="http"),
            tracing={"otlp_endpoint": f"127.0.0.1:{port}"},
            limits={"drain_timeout": "1s"},
        )
        with agent_process(setup.root, "traced", raw) as agent:
            started = time.monotonic()
            with connect(setup, agent) as tls:
                tls.settimeout(5)
                tls.sendall(get("/api/items") * 600)  # more than one export batch (512)
                responses = Responses(tls)
                assert all(responses.next() is not None for _ in range(600))
            assert time.monotonic() - started < 10
            stopping = time.monotonic()
            assert agent.stop(timeout=30) == 0
            assert time.monotonic() - stopping < 4.0  # drain (1 s) and the span flush bound


def test_a_line_stays_bounded_whatever_the_method_and_path_sizes(
    setup: CaSetup, logged: Logged
) -> None:
    logged.lines()
    client = H2Client(tls_socket(setup, logged.agent, alpn=("h2", "http/1.1")))
    try:
        headers = request_headers("/api/big/" + "p" * 6000, "M" * 6000, "backend")
        reply = client.wait(client.send(headers))
    finally:
        client.close()
    seen = logged.wait_for(lambda line: (line["path"] or "").startswith("/api/big/"))
    raw = [json.dumps(line) for line in seen if (line["path"] or "").startswith("/api/big/")]
    assert reply.status in (200, 400, 405, 501) and len(raw) == 1
    assert len(raw[0]) < 4096, (reply.status, len(raw[0]))


def test_an_app_calling_a_dead_upstream_gets_a_line_a_while_not_one_per_request(
    logged: Logged,
) -> None:
    """Every try's dial failure was a warning line: an app in a retry loop wrote the
    agent's stderr as fast as it could call."""
    address = logged.agent.bound["outbound[elsewhere]"]
    before = sum("outbound elsewhere:" in line for line in logged.agent.log)
    for _ in range(20):
        assert _plain(address, b"GET /api/x HTTP/1.1\r\nHost: elsewhere\r\n\r\n").startswith(
            b"HTTP/1.1 503"
        )
    assert logged.agent.logged("outbound elsewhere:")
    assert sum("outbound elsewhere:" in line for line in logged.agent.log) - before <= 1
