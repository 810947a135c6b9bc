"""HTTP/2 and gRPC inbound through a real `outrider agent run` process.

A client with the frontend's SVID speaks h2 over mTLS (ALPN h2) to the agent's
`protocol: http2` port; behind it, an h2c app that answers with what it
received (the :path, the identity header, the body) and echoes the identity
header back in its head and its trailers, to show the agent never lets it out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.h2server import H2Stream
from agent.adapters.http import xfcc
from agent.core.grpc import Code
from tests.h2raw import H2Client, Response, h2_connect, request_headers, threaded_h2_app, tls_socket
from tests.mesh import (
    AgentProcess,
    agent_process,
    agent_yaml,
    inbound,
    local_sign,
    running_agent,
    sample,
    served_agent_yaml,
    workload,
)
from tests.path_tricks import PATHS
from tests.support import CaProcess, CaSetup, free_port

POLICY = """\
policies:
  - name: frontend-api
    action: ALLOW
    rules:
      - name: read-api
        from: {principals: ["spiffe://example.org/ns/demo/sa/frontend"]}
        to: {methods: [GET, HEAD, POST], paths: ["/api/*"]}
      - name: greeter
        from: {principals: ["spiffe://example.org/ns/demo/sa/frontend"]}
        to: {methods: [POST], paths: ["/demo.Greeter/*"]}
  - name: guard
    action: DENY
    rules:
      - name: admin
        to: {paths: ["/api/admin*", "/demo.Greeter/Admin"]}
"""

GRPC = {"content_type": "application/grpc", "te": "trailers"}


async def answer(stream: H2Stream) -> None:
    """What an app would do: read the request, say what it got, try to leak the identity."""
    body = b""
    while chunk := await stream.read():
        body += chunk
    if stream.header(b":path") == b"/demo.Greeter/Slow":
        await asyncio.sleep(5)  # an app slower than the call's deadline
    seen = {
        "target": (stream.header(b":path") or b"").decode(),
        "xfcc": [v.decode() for n, v in stream.headers if n == b"x-forwarded-client-cert"],
        "timeout": (stream.header(b"grpc-timeout") or b"").decode(),
        "body": body.decode(),
        "trailers": [[n.decode(), v.decode()] for n, v in stream.trailers or []],
    }
    leak = (b"x-forwarded-client-cert", b"leak")
    if stream.header(b"content-type") == b"application/grpc":
        await stream.respond([(b":status", b"200"), (b"content-type", b"application/grpc"), leak])
        await stream.send(json.dumps(seen).encode())
        await stream.end([(b"grpc-status", b"0"), leak])
        return
    await stream.respond([(b":status", b"200"), (b"content-type", b"application/json"), leak])
    await stream.send(json.dumps(seen).encode(), end=True)


@pytest.fixture(scope="module")
def app() -> Iterator[int]:
    with threaded_h2_app(answer) as port:
        yield port


@pytest.fixture(scope="module")
def agent(setup: CaSetup, ca: CaProcess, app: int) -> Iterator[AgentProcess]:
    policy = setup.root / "h2-policy.yaml"
    policy.write_text(POLICY)
    inbounds = [
        {"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}", "protocol": "http2"},
        {
            "listen": f"127.0.0.1:{free_port()}",
            "app": f"127.0.0.1:{free_port()}",
            "protocol": "grpc",
        },
    ]
    raw = served_agent_yaml(setup, ca, "backend", inbound=inbounds, policy={"files": [str(policy)]})
    with agent_process(setup.root, "h2-backend", raw) as process:
        yield process


@pytest.fixture
def client(setup: CaSetup, agent: AgentProcess) -> Iterator[H2Client]:
    h2 = h2_connect(setup, agent)
    yield h2
    h2.close()


def seen(response: Any) -> dict[str, Any]:
    return dict(json.loads(response.body))


def test_a_request_reaches_the_app_with_the_peers_identity_only(
    client: H2Client, agent: AgentProcess
) -> None:
    response = client.get("/api/items?x=1", x_forwarded_client_cert="By=me;URI=spiffe://evil")
    assert response.status == 200
    got = seen(response)
    assert got["target"] == "/api/items?x=1"
    assert got["xfcc"] == [
        xfcc("spiffe://example.org/ns/demo/sa/backend", str(workload("frontend"))).decode()
    ]
    assert response.header(b"x-forwarded-client-cert") is None  # not in the head
    frontend = str(workload("frontend"))
    assert agent.total("outrider_requests_total", peer_id=frontend, code="200") >= 1


def test_a_denied_request_is_answered_403_in_json(client: H2Client) -> None:
    response = client.get("/api/admin/users")
    assert response.status == 403
    assert json.loads(response.body) == {"error": "denied", "policy": "guard", "rule": "admin"}


def test_a_grpc_call_is_relayed_with_its_trailers_and_counted(
    client: H2Client, agent: AgentProcess
) -> None:
    before = agent.total("outrider_grpc_requests_total", grpc_status="0")
    sid = client.send(
        request_headers("/demo.Greeter/SayHello", "POST", grpc_timeout="5S", **GRPC), b"hi"
    )
    response = client.wait(sid)
    assert response.status == 200
    assert response.trailers[0] == (b"grpc-status", b"0")
    assert all(n != b"x-forwarded-client-cert" for n, _ in response.headers + response.trailers)
    got = seen(response)
    assert got["body"] == "hi"
    assert got["timeout"].endswith("m") and 0 < int(got["timeout"][:-1]) <= 5000
    assert agent.total("outrider_grpc_requests_total", grpc_status="0") == before + 1


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/demo.Greeter/Admin", Code.PERMISSION_DENIED),
        ("/demo.Greeter/../Admin", Code.UNIMPLEMENTED),  # refused before any policy
        ("/demo.Greeter/./SayHello", Code.UNIMPLEMENTED),
        ("//demo.Greeter/SayHello", Code.UNIMPLEMENTED),
        ("/demo.Greeter/Say%48ello", Code.UNIMPLEMENTED),
        ("/demo.Greeter/SayHello/", Code.UNIMPLEMENTED),
        ("/demo.Greeter/Admin;x", Code.UNIMPLEMENTED),  # else past the DENY on .../Admin
    ],
)
def test_a_refused_grpc_call_gets_a_grpc_status_not_a_dropped_stream(
    client: H2Client, agent: AgentProcess, path: str, code: Code
) -> None:
    before = agent.total("outrider_grpc_requests_total", grpc_status=str(int(code)))
    response = client.wait(client.send(request_headers(path, "POST", **GRPC), b"hi"))
    assert response.reset is None and response.ended
    assert response.status == 200
    assert response.header(b"grpc-status") == str(int(code)).encode()
    assert response.body == b""
    after = agent.total("outrider_grpc_requests_total", grpc_status=str(int(code)))
    assert after == before + 1


def test_a_call_past_its_grpc_timeout_is_deadline_exceeded(client: H2Client) -> None:
    started = time.monotonic()
    sid = client.send(
        request_headers("/demo.Greeter/Slow", "POST", grpc_timeout="200m", **GRPC), b"hi"
    )
    response = client.wait(sid)
    assert response.header(b"grpc-status") == str(int(Code.DEADLINE_EXCEEDED)).encode()
    assert time.monotonic() - started < 2


def test_a_call_its_client_cancels_is_counted_cancelled(
    client: H2Client, agent: AgentProcess
) -> None:
    """A call reset by its client before the app answered is counted, as Envoy records a
    client's reset: grpc-status CANCELLED, and the HTTP status 499 (the client went away)."""
    frontend = str(workload("frontend"))
    labels = {"peer_id": frontend}
    before = (
        agent.total("outrider_grpc_requests_total", grpc_status="1", **labels),
        agent.total("outrider_requests_total", code="499", **labels),
    )
    sid = client.send(request_headers("/demo.Greeter/Slow", "POST", **GRPC), b"hi")
    client.pump(0.2)  # the app has it, and sleeps on it
    client.reset(sid)
    deadline = time.monotonic() + 5
    after = before
    # Both counters: one scrape may show the one before the other (seen: 499 alone).
    while (after[0] == before[0] or after[1] == before[1]) and time.monotonic() < deadline:
        client.pump(0.05)
        after = (
            agent.total("outrider_grpc_requests_total", grpc_status="1", **labels),
            agent.total("outrider_requests_total", code="499", **labels),
        )
    assert after == (before[0] + 1, before[1] + 1)


def test_an_unreachable_app_is_unavailable_to_a_grpc_client(
    setup: CaSetup, agent: AgentProcess
) -> None:
    h2 = h2_connect(setup, agent, listener="inbound[1]")
    try:
        call = h2.wait(h2.send(request_headers("/demo.Greeter/SayHello", "POST", **GRPC), b""))
        plain = h2.get("/api/items")
    finally:
        h2.close()
    assert call.header(b"grpc-status") == str(int(Code.UNAVAILABLE)).encode()
    assert plain.status == 503
    assert json.loads(plain.body) == {"error": "app_unreachable"}


@pytest.mark.parametrize("alpn", [("http/1.1",), ()])
def test_a_client_that_does_not_offer_h2_is_told_in_http1_what_to_change(
    setup: CaSetup, agent: AgentProcess, alpn: tuple[str, ...]
) -> None:
    """A peer agent's `http` outbound pointed at this h2-only port: its app gets an answer
    that says what to change (relayed by that agent), not a reset nobody logs there."""
    before = agent.total("outrider_connections_refused_total", reason="protocol_mismatch")
    with tls_socket(setup, agent, alpn=alpn) as tls:
        tls.sendall(b"GET /api/items HTTP/1.1\r\nHost: backend\r\n\r\n")
        answer = b""
        with contextlib.suppress(TimeoutError, ConnectionError, ssl.SSLError):
            while chunk := tls.recv(4096):
                answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 505 ")
    assert json.loads(body) == {
        "error": "protocol_mismatch",
        "detail": "this port is protocol: http2 (HTTP/2 only); the app must speak h2c"
        " (HTTP/2 with prior knowledge), or set appProtocol: http",
    }
    after = agent.total("outrider_connections_refused_total", reason="protocol_mismatch")
    assert after == before + 1


def test_request_trailers_pass_on_only_names_no_app_server_folds(client: H2Client) -> None:
    """A trailer named `x_role` is `HTTP_X_ROLE` to a CGI/WSGI app as a header is, and HTTP/1.1
    refuses it in trailers too; on h2 the head has already gone on, so such a field (and any
    identity header) is dropped from the trailers, the others kept."""
    sid = client.send(request_headers("/api/items", "POST"), b"abc", end=False)
    client.conn.send_headers(
        sid,
        [
            (b"x_role", b"admin"),
            (b"x.role", b"admin"),
            (b"x_forwarded_client_cert", b"By=me;URI=spiffe://evil"),
            (b"x-checksum", b"abc"),
        ],
        end_stream=True,
    )
    client._flush()
    response = client.wait(sid)
    assert response.status == 200
    got = seen(response)
    assert got["body"] == "abc"
    assert got["trailers"] == [["x-checksum", "abc"]]


# --- the path tricks: the decisions HTTP/1.1 makes, made on h2 -------------------------


@pytest.mark.parametrize(("target", "status", "received"), PATHS)
def test_a_path_trick_gets_the_decision_it_gets_over_http1(
    client: H2Client, target: str, status: int, received: str | None
) -> None:
    response = client.get(target)
    assert response.status == status, response.body
    if received is None:
        if status == 403:
            assert json.loads(response.body)["error"] == "denied"
        return
    assert seen(response)["target"] == received
    assert client.get(received).status == 200  # the path the app got, sent as is


# --- plaintext h2c on a permissive port ------------------------------------------------


async def test_a_plaintext_h2c_client_is_decided_per_stream_and_names_no_one(
    setup: CaSetup, tmp_path: Path, app: int
) -> None:
    """A permissive captured port lets a plaintext client in (here an explicit listener told
    so, the one thing capture adds): it speaks h2c, each stream is authorized as
    unauthenticated, and the app gets no x-forwarded-client-cert, not even a forged one."""
    open_api = {"name": "open", "action": "ALLOW", "rules": [{"to": {"paths": ["/api/*"]}}]}
    raw = agent_yaml(
        setup.root,
        "h2c-app",
        inbound=inbound(app, protocol="http2"),
        policy={"policies": [open_api]},
    )
    async with running_agent(raw, local_sign(setup), tmp_path) as agent:
        listener = next(iter(agent.inbound.values()))
        listener.serving = lambda port: (listener.config, True)  # type: ignore[method-assign]
        host, port = agent.bound["inbound[0]"].rsplit(":", 1)

        def ask() -> tuple[Response, Response]:
            client = H2Client(socket.create_connection((host, int(port)), timeout=5))
            try:
                allowed = client.get("/api/items", x_forwarded_client_cert="By=me;URI=forged")
                return allowed, client.get("/admin")
            finally:
                client.close()

        def ask_http1() -> bytes:
            with socket.create_connection((host, int(port)), timeout=5) as plain:
                plain.sendall(b"GET /api/items HTTP/1.1\r\nHost: app\r\n\r\n")
                return plain.makefile("rb").read()

        allowed, denied = await asyncio.to_thread(ask)
        # HTTP/1.1 on this h2-only port: an HTTP/1.1 answer saying what to change.
        told = await asyncio.to_thread(ask_http1)
        assert told.startswith(b"HTTP/1.1 505 ")
        assert b"this port is protocol: http2 (HTTP/2 only)" in told
        mismatched = sample(
            agent,
            "outrider_connections_refused_total",
            direction="inbound",
            reason="protocol_mismatch",
        )
        assert mismatched == 1
        assert (
            sample(
                agent, "outrider_connections_total", direction="inbound", mtls="false", peer_id=""
            )
            == 1
        )
    assert allowed.status == 200
    assert seen(allowed)["xfcc"] == []
    assert denied.status == 403


def test_a_tcp_port_relays_an_h2_peers_bytes_to_its_h2c_app(
    setup: CaSetup, ca: CaProcess, app: int
) -> None:
    # docs/agent.md: a `tcp` port offers h2 by ALPN and relays either protocol as bytes;
    # its app (an h2c server here) is the one that speaks h2, not the agent.
    inbounds = [{"listen": f"127.0.0.1:{free_port()}", "app": f"127.0.0.1:{app}"}]
    raw = served_agent_yaml(setup, ca, "backend", inbound=inbounds)
    with agent_process(setup.root, "h2-over-tcp", raw) as process:
        client = h2_connect(setup, process)
        try:
            response = client.get("/api/admin", x_forwarded_client_cert="By=me")
        finally:
            client.close()
        assert response.status == 200
        # The app's own head, untouched: an agent that parsed the streams would have
        # replaced the caller's header and dropped the app's.
        assert seen(response)["xfcc"] == ["By=me"]
        assert response.header(b"x-forwarded-client-cert") == b"leak"
        assert process.total("outrider_requests_total") == 0
