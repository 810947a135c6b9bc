"""L7 inbound through a real `outrider agent run` process: the THREATS.md cases.

A client with the frontend's SVID speaks HTTP/1.1 over mTLS to the agent's
`protocol: http` port; behind it, an app that answers with what it received
(method, request-target, identity headers, body) and echoes the identity
header back, to show the agent never lets it out. Requests are sent as raw
bytes, so every path and header trick reaches the agent exactly as written.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h2.connection
import h2.errors
import h2.events
import pytest
from aiohttp import web

from tests.h2raw import H2Client, request_headers, tls_socket
from tests.httpraw import Responses, connect, get, one
from tests.mesh import (
    AgentProcess,
    agent_process,
    agent_yaml,
    inbound,
    served_agent_yaml,
    threaded_app,
    workload,
)
from tests.path_tricks import PATHS
from tests.support import CaProcess, CaSetup, whole_milliseconds

POLICY = """\
policies:
  - name: frontend-api
    action: ALLOW
    rules:
      - name: read-api
        from: {principals: ["spiffe://example.org/ns/demo/sa/frontend"]}
        to: {methods: [GET, HEAD, POST], paths: ["/api/*"]}
  - name: guard
    action: DENY
    rules:
      - name: admin
        to: {paths: ["/api/admin*"]}
      - name: internal-host
        to: {hosts: ["internal.example.org"]}
      - name: intruder
        when: [{header: x-role, values: [intruder]}]
"""


SEEN = web.AppKey("seen", list[dict[str, Any]])


@dataclass
class App:
    port: int
    seen: list[dict[str, Any]]


async def _answer(request: web.Request) -> web.Response:
    if request.path == "/api/early":  # answers before reading the body, as many apps do
        return web.json_response({"early": True})
    if request.path == "/api/slow":
        await asyncio.sleep(3)
    seen = {
        "method": request.method,
        "target": request.raw_path,
        "xfcc": request.headers.getall("x-forwarded-client-cert", []),
        "xfcc_underscore": request.headers.getall("x_forwarded_client_cert", []),
        "hosts": request.headers.getall("host", []),
        "body": (await request.read()).decode(),
    }
    request.app[SEEN].append(seen)
    echoed = {
        "x-forwarded-client-cert": ",".join(seen["xfcc"]) or "none",
        "X_Forwarded-Client-Cert": "leak",  # a spelling servers fold onto the same name
    }
    return web.json_response(seen, headers=echoed)


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    """The app, on its own event loop in a thread, for the whole module."""
    application = web.Application()
    application[SEEN] = []
    application.router.add_route("*", "/{tail:.*}", _answer)
    with threaded_app(application) as port:
        yield App(port, application[SEEN])


@pytest.fixture(scope="module")
def agent(setup: CaSetup, ca: CaProcess, app: App) -> Iterator[AgentProcess]:
    policy = setup.root / "policy.yaml"
    policy.write_text(POLICY)
    raw = served_agent_yaml(
        setup,
        ca,
        "backend",
        inbound=inbound(app.port, protocol="http"),
        policy={"files": [str(policy)]},
    )
    with agent_process(setup.root, "backend", raw) as process:
        yield process


# --- paths (the table: tests/path_tricks.py) ------------------------------------------


@pytest.mark.parametrize(("target", "status", "received"), PATHS)
def test_a_path_trick_is_decided_on_the_path_the_app_receives(
    setup: CaSetup, agent: AgentProcess, app: App, target: str, status: int, received: str | None
) -> None:
    before = len(app.seen)
    reply = one(setup, agent, get(target))
    assert reply.status == status, reply.body
    if received is None:
        assert len(app.seen) == before, "a refused request reached the app"
        if status == 403:
            assert reply.json()["error"] == "denied"
        return
    assert app.seen[-1]["target"] == received
    # The path the app received is decided the same way when sent as is.
    assert one(setup, agent, get(received)).status == 200


def test_a_denied_request_names_the_policy_and_rule_and_is_counted(
    setup: CaSetup, agent: AgentProcess
) -> None:
    assert one(setup, agent, get("/api/items")).status == 200
    before = agent.total("outrider_authz_decisions_total", decision="deny", policy="guard")
    reply = one(setup, agent, get("/api/admin/users"))
    assert reply.status == 403
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"error": "denied", "policy": "guard", "rule": "admin"}
    after = agent.total("outrider_authz_decisions_total", decision="deny", policy="guard")
    assert after == before + 1
    frontend = str(workload("frontend"))
    assert agent.total("outrider_requests_total", peer_id=frontend, code="403") >= 1
    assert agent.total("outrider_requests_total", peer_id=frontend, code="200") >= 1


def test_another_caller_is_not_allowed_by_the_frontends_rule(
    setup: CaSetup, agent: AgentProcess
) -> None:
    reply = one(setup, agent, get("/api/items"), who="billing")
    assert reply.status == 403
    assert reply.json()["policy"] == "default"


# --- hosts and headers ----------------------------------------------------------------


def test_identity_headers_from_the_client_are_replaced_and_never_leak_back(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    forged = "By=spiffe://example.org/ns/demo/sa/backend;URI=spiffe://example.org/ns/demo/sa/admin"
    reply = one(
        setup,
        agent,
        get(
            "/api/items",
            f"x-forwarded-client-cert: {forged}",
            f"X-Forwarded-Client-Cert: {forged}",
        ),
    )
    assert reply.status == 200
    seen = app.seen[-1]
    backend, frontend = workload("backend"), workload("frontend")
    assert seen["xfcc"] == [f"By={backend};URI={frontend}"]
    assert seen["xfcc_underscore"] == []
    # The app echoed the header it got; the agent does not pass it back to the client.
    assert not {"x-forwarded-client-cert", "x_forwarded-client-cert"} & {
        k.lower() for k in reply.headers
    }


def test_a_trailer_never_reaches_the_app_as_a_header_the_policy_did_not_see(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    # The guard denies Host internal.example.org; a trailer must not smuggle it in as a
    # second Host (aiohttp refuses two; other servers route by either one).
    reply = one(
        setup,
        agent,
        b"POST /api/items HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nhi\r\n0\r\nHost: internal.example.org\r\n\r\n",
    )
    assert reply.status == 200
    assert app.seen[-1]["hosts"] == ["backend"] and app.seen[-1]["body"] == "hi"


def test_identity_header_spellings_an_app_server_may_fold_are_refused(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    # WSGI/CGI servers read X-Forwarded-Client_Cert as HTTP_X_FORWARDED_CLIENT_CERT.
    seen = len(app.seen)
    for name in ("X-Forwarded-Client_Cert", "x_forwarded_client_cert"):
        forged = f"{name}: By=x;URI=spiffe://example.org/ns/demo/sa/admin"
        assert one(setup, agent, get("/api/items", forged)).status == 400
    assert len(app.seen) == seen


def test_handshake_latency_is_measured_below_a_millisecond(
    setup: CaSetup, agent: AgentProcess
) -> None:
    for _ in range(3):
        assert one(setup, agent, get("/api/items")).status == 200
    total = agent.total("outrider_tls_handshake_duration_seconds_sum", direction="inbound")
    assert total > 0
    assert not whole_milliseconds(total), "handshakes timed on a millisecond clock"


def test_plaintext_never_reaches_the_app(agent: AgentProcess, app: App) -> None:
    before = len(app.seen)
    host, port = agent.bound["inbound[0]"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as plain:
        plain.sendall(get("/api/items"))
        try:
            answer = plain.recv(4096)
        except ConnectionError:
            answer = b""
    assert b"HTTP/1.1 200" not in answer
    assert len(app.seen) == before


# --- limits and framing ---------------------------------------------------------------


def test_pipelined_requests_held_behind_a_slow_one_are_bounded(
    setup: CaSetup, agent: AgentProcess
) -> None:
    def rss() -> int:
        status = Path(f"/proc/{agent.process.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) * 1024

    before = rss()
    head = get("/api/items", "x-pad: " + "a" * 50_000)
    with connect(setup, agent) as tls:
        tls.sendall(get("/api/slow"))  # the app takes 3 s over this one
        tls.settimeout(0.5)
        try:
            for _ in range(40):  # 40 MiB of heads, unless the agent stops reading
                tls.sendall(head * 20)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass  # the agent stopped reading: flow control at work
        grown = rss() - before
    assert grown < 16 << 20, f"the agent held {grown >> 20} MiB of pipelined requests"


def test_an_h2_client_on_an_http_port_is_told_to_change_the_port_protocol(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    # h2 the port did not agree to in ALPN, relayed unparsed, would hand the app the
    # client's own identity header and escape every path rule: it gets a GOAWAY
    # HTTP_1_1_REQUIRED whose debug data a client logs: what to change.
    before = len(app.seen)
    refused = agent.sample(
        "outrider_connections_refused_total", direction="inbound", reason="protocol_mismatch"
    )
    client = h2.connection.H2Connection()
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":path", "/api/admin"), (":scheme", "https"),
                            (":authority", "backend")], end_stream=True)  # fmt: skip
    with connect(setup, agent) as tls:  # prior knowledge: h2 without asking for it in ALPN
        assert tls.selected_alpn_protocol() is None
        tls.sendall(client.data_to_send())
        events = client.receive_data(tls.recv(4096))
    [goaway] = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
    assert goaway.error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
    assert b"set appProtocol: kubernetes.io/h2c or grpc" in (goaway.additional_data or b"")
    assert len(app.seen) == before
    assert _eventually(
        lambda: (
            agent.sample(
                "outrider_connections_refused_total",
                direction="inbound",
                reason="protocol_mismatch",
            )
            == refused + 1
        )
    )
    assert agent.logged("set appProtocol: kubernetes.io/h2c or grpc on the Service port")


# --- h2 from a peer on the same port: each stream an HTTP/1.1 request to the app -------


@pytest.fixture(scope="module")
def h2_client(setup: CaSetup, agent: AgentProcess) -> Iterator[H2Client]:
    """An h2 client (ALPN h2) to the same `protocol: http` port the HTTP/1.1 tests use."""
    sock = tls_socket(setup, agent, alpn=("h2", "http/1.1"))
    assert sock.selected_alpn_protocol() == "h2"
    client = H2Client(sock)
    yield client
    client.close()


@pytest.mark.parametrize(("target", "status", "received"), PATHS)
def test_an_h2_and_an_http1_client_get_the_same_decision_on_one_http_port(
    setup: CaSetup,
    agent: AgentProcess,
    app: App,
    h2_client: H2Client,
    target: str,
    status: int,
    received: str | None,
) -> None:
    before = len(app.seen)
    over_http1 = one(setup, agent, get(target))
    assert over_http1.status == status, over_http1.body
    http1_seen = app.seen[before:]
    over_h2 = h2_client.get(target, authority="backend")
    assert over_h2.status == status, over_h2.body
    h2_seen = app.seen[before + len(http1_seen) :]
    if received is None:
        assert http1_seen == h2_seen == [], "a refused request reached the app"
        assert json.loads(over_h2.body) == over_http1.json()
        return
    # The app got the same HTTP/1.1 request either way: the same normalized target.
    assert [s["target"] for s in http1_seen] == [s["target"] for s in h2_seen] == [received]
    assert h2_seen[0]["method"] == "GET"


def test_each_h2_stream_and_http1_request_is_counted_once(
    setup: CaSetup, agent: AgentProcess, h2_client: H2Client
) -> None:
    """requests_total and authz_decisions_total (Tallies, added to on the loop) count every
    request once, over either protocol, allowed or denied."""
    frontend = str(workload("frontend"))

    def counts() -> tuple[float, ...]:
        return (
            agent.total("outrider_requests_total", peer_id=frontend, code="200"),
            agent.total("outrider_requests_total", peer_id=frontend, code="403"),
            agent.total("outrider_authz_decisions_total", decision="allow", rule="read-api"),
            agent.total("outrider_authz_decisions_total", decision="deny", rule="admin"),
        )

    before = counts()
    for _ in range(3):
        assert h2_client.get("/api/items", authority="backend").status == 200
        assert h2_client.get("/api/admin/x", authority="backend").status == 403
        assert one(setup, agent, get("/api/items")).status == 200
        assert one(setup, agent, get("/api/admin/x")).status == 403
    assert [a - b for a, b in zip(counts(), before, strict=True)] == [6, 6, 6, 6]


def test_an_h2_stream_reaches_the_http1_app_with_the_peers_identity_only(
    app: App, h2_client: H2Client
) -> None:
    forged = "By=spiffe://example.org/ns/demo/sa/backend;URI=spiffe://example.org/ns/demo/sa/admin"
    response = h2_client.get("/api/items", authority="backend", x_forwarded_client_cert=forged)
    assert response.status == 200
    backend, frontend = workload("backend"), workload("frontend")
    assert app.seen[-1]["xfcc"] == [f"By={backend};URI={frontend}"]
    # The app echoed it, in two spellings: neither goes back, nor does any hop-by-hop field.
    names = {n.lower() for n, _ in response.headers}
    assert not {b"x-forwarded-client-cert", b"x_forwarded-client-cert"} & names
    assert not {b"connection", b"keep-alive", b"transfer-encoding"} & names
    # A spelling an app server folds onto it is refused, as over HTTP/1.1.
    folded = request_headers("/api/items", authority="backend")
    folded.append((b"x_forwarded_client_cert", b"By=x;URI=spiffe://example.org/ns/demo/sa/admin"))
    assert h2_client.wait(h2_client.send(folded)).status == 400


def test_concurrent_h2_streams_with_bodies_reach_the_http1_app_whole(
    app: App, h2_client: H2Client
) -> None:
    """Bodies without a length go to the app chunked, with one Content-Length as they came;
    twenty streams at once share the client connection's few keep-alive app connections."""
    bodies = {f"/api/upload/{i}": (b"%d-" % i) * (1000 * i + 1) for i in range(20)}
    streams = {}
    for path, body in bodies.items():
        head = request_headers(path, "POST", "backend")
        if path.endswith("0"):
            head.append((b"content-length", str(len(body)).encode()))
        streams[h2_client.send(head, body)] = path
    for stream_id, path in streams.items():
        response = h2_client.wait(stream_id)
        assert response.status == 200, response.body
        assert json.loads(response.body)["body"] == bodies[path].decode()
    head = h2_client.wait(h2_client.send(request_headers("/api/items", "HEAD", "backend")))
    assert head.status == 200 and head.body == b""


@pytest.mark.parametrize("ending", ["on its headers", "by trailers", "after the app answered"])
def test_an_h2_stream_whose_body_falls_short_of_its_content_length_never_reaches_the_app(
    setup: CaSetup, agent: AgentProcess, app: App, ending: str
) -> None:
    """RFC 9113 8.1.1: a content-length that the DATA does not add up to is malformed.

    Sent on, the app would read that many bytes more as its body: the head of the next
    stream on the same keep-alive app connection, whose own body then reaches the app
    as a request no policy saw (here a denied path, which could carry a forged identity
    header too). A stream found short is reset PROTOCOL_ERROR. One the app answered
    before its body ended has had its answer (and a reset NO_ERROR: the rest is not
    wanted, RFC 9113 8.1), and its app connection, owed the rest, carries nothing more."""
    smuggled = b"GET /api/admin/users HTTP/1.1\r\nHost: backend\r\nContent-Length: 0\r\n\r\n"
    backend, frontend = workload("backend"), workload("frontend")
    # The next stream's head as the app gets it: what the first one's length swallows.
    next_head = (
        f"POST /api/items HTTP/1.1\r\nhost: backend\r\ncontent-length: {len(smuggled)}\r\n"
        f"x-forwarded-client-cert: By={backend};URI={frontend}\r\n\r\n"
    ).encode()
    sent = b"" if ending == "on its headers" else b"0123456789"
    trailers = [(b"x-checksum", b"1")]
    client = H2Client(tls_socket(setup, agent, alpn=("h2",)))
    try:
        length = str(len(sent) + len(next_head))
        # /api/early answers before reading the body, as many apps do.
        head = request_headers("/api/early", "POST", "backend", content_length=length)
        if ending == "after the app answered":
            first = client.send(head, sent, end=False)
            answer = client.wait(first)
            assert answer.status == 200 and json.loads(answer.body) == {"early": True}
        else:  # one write: the agent finds the stream short before the app can answer
            first = client.send(head, sent, trailers=trailers if sent else None, together=True)
            answer = client.wait(first)
            assert answer.reset == h2.errors.ErrorCodes.PROTOCOL_ERROR and not answer.headers
        before = len(app.seen)
        head = request_headers("/api/items", "POST", "backend", content_length=str(len(smuggled)))
        second = client.wait(client.send(head, smuggled))
        assert second.status == 200, second.body
    finally:
        client.close()
    assert [s["target"] for s in app.seen[before:]] == ["/api/items"]
    assert app.seen[-1]["body"] == smuggled.decode()


# --- hot reload -------------------------------------------------------------------------


def test_a_new_policy_applies_at_once_and_a_broken_one_is_refused(
    setup: CaSetup, agent: AgentProcess
) -> None:
    """A connection open across the reload too: its next request is decided by the new
    policy (its caller's ID is the one object the old set planned for: issue 19's memo)."""
    policy = setup.root / "policy.yaml"
    opened = POLICY.replace('paths: ["/api/*"]', 'paths: ["/api/*", "/public/*"]')
    held = connect(setup, agent)
    replies = Responses(held)
    try:
        held.sendall(get("/api/before"))
        assert (reply := replies.next()) is not None and reply.status == 200
        assert one(setup, agent, get("/public/page")).status == 403
        policy.write_text(opened)
        assert _eventually(lambda: one(setup, agent, get("/public/page")).status == 200)
        held.sendall(get("/public/page"))
        assert (reply := replies.next()) is not None and reply.status == 200
        errors = agent.total("outrider_config_reloads_total", kind="policy", result="error")
        policy.write_text("policies:\n  - name: broken\n    action: PERMIT\n")
        assert _eventually(
            lambda: (
                agent.total("outrider_config_reloads_total", kind="policy", result="error") > errors
            )
        )
        assert one(setup, agent, get("/public/page")).status == 200  # the last good policy
        policy.write_text(POLICY)
        assert _eventually(lambda: one(setup, agent, get("/public/page")).status == 403)
        held.sendall(get("/public/page"))
        assert (reply := replies.next()) is not None and reply.status == 403
    finally:
        held.close()
        policy.write_text(POLICY)
        assert _eventually(lambda: one(setup, agent, get("/public/page")).status == 403)


def _eventually(check: Any, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return bool(check())


def test_http_rules_on_a_tcp_port_refuse_to_start(setup: CaSetup, tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    raw = agent_yaml(tmp_path, "web", inbound=inbound(8080), policy={"files": [str(policy)]})
    (tmp_path / "ca").mkdir(exist_ok=True)
    (tmp_path / "ca" / "bundle.pem").write_bytes(setup.bundle_pem)
    config = tmp_path / "agent.yaml"
    config.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "outrider", "agent", "run", "--config", str(config)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    assert done.returncode == 2, done.stderr
    assert "invalid policy" in done.stderr
    assert "8080" in done.stderr
