"""L7 inbound through a real `outrider agent run` process: the THREATS.md cases.

A client with the frontend's SVID speaks HTTP/1.1 over mTLS to the agent's
`protocol: http` port; behind it, an app that answers with what it received
(method, request-target, identity headers, body) and echoes the identity
header back, to show the agent never lets it out. Requests are sent as raw
bytes, so every path and header trick reaches the agent exactly as written.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.adapters.http import xfcc
from tests import certs
from tests.httpraw import exchange, get, one
from tests.mesh import (
    AgentProcess,
    agent_process,
    agent_yaml,
    inbound,
    served_agent_yaml,
    threaded_app,
    workload,
)
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


def metric(agent: AgentProcess, name: str, **labels: str) -> float:
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in agent.metrics().splitlines()
        if line.startswith(name + "{") and all(w in line for w in wanted)
    )


# --- paths ----------------------------------------------------------------------------

# raw target -> (status, what the app receives). The app gets the very path the policy saw.
PATHS = [
    ("/api/items", 200, "/api/items"),
    ("/api//items", 200, "/api/items"),
    ("/api/./items", 200, "/api/items"),
    ("/api/%69tems", 200, "/api/items"),  # an encoded unreserved letter
    ("/api/items?next=../../admin", 200, "/api/items?next=../../admin"),
    ("/api/%252e%252e/admin", 200, "/api/%252e%252e/admin"),  # decoded once, by nobody else
    ("/api/../admin", 403, None),
    ("/api/%2e%2e/admin", 403, None),
    ("/api/%2E%2e/%2e%2E/admin", 403, None),
    ("/api\\..\\admin", 403, None),
    ("/api/admin", 403, None),
    ("/api/./admin", 403, None),
    ("//api/admin/../admin", 403, None),
    ("/API/items", 403, None),  # paths are case-sensitive
    ("/api/%2fadmin", 400, None),  # an encoded / could become a separator in the app
    ("/api/%5cadmin", 400, None),
    ("/api/items%00.json", 400, None),
    ("/api/%zz", 400, None),
    ("/api/%4", 400, None),
]


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
    before = metric(agent, "outrider_authz_decisions_total", decision="deny", policy="guard")
    reply = one(setup, agent, get("/api/admin/users"))
    assert reply.status == 403
    assert reply.headers["content-type"] == "application/json"
    assert reply.json() == {"error": "denied", "policy": "guard", "rule": "admin"}
    after = metric(agent, "outrider_authz_decisions_total", decision="deny", policy="guard")
    assert after == before + 1
    frontend = str(workload("frontend"))
    assert metric(agent, "outrider_requests_total", peer_id=frontend, code="403") >= 1
    assert metric(agent, "outrider_requests_total", peer_id=frontend, code="200") >= 1


def test_another_caller_is_not_allowed_by_the_frontends_rule(
    setup: CaSetup, agent: AgentProcess
) -> None:
    reply = one(setup, agent, get("/api/items"), who="billing")
    assert reply.status == 403
    assert reply.json()["policy"] == "default"


# --- hosts and headers ----------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["internal.example.org", "INTERNAL.Example.ORG", "internal.example.org:8080",
             "internal.example.org."],
)  # fmt: skip
def test_a_host_rule_holds_whatever_the_case_port_or_trailing_dot(
    setup: CaSetup, agent: AgentProcess, host: str
) -> None:
    raw = f"GET /api/items HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    assert one(setup, agent, raw).status == 403


def test_two_host_headers_are_a_bad_request(setup: CaSetup, agent: AgentProcess) -> None:
    raw = b"GET /api/items HTTP/1.1\r\nHost: backend\r\nHost: internal.example.org\r\n\r\n"
    assert one(setup, agent, raw).status == 400


@pytest.mark.parametrize(
    ("host_line", "status"),
    [
        (b"Host: internal.example.org \r\n", 403),  # the app drops the trailing space
        (b"Host: internal.example.org\t\r\n", 403),
        (b"Host: evil.com, x.example.org\r\n", 400),  # not a host
        (b"", 400),  # HTTP/1.1 without Host
    ],
)
def test_host_is_read_the_way_the_app_reads_it(
    setup: CaSetup, agent: AgentProcess, host_line: bytes, status: int
) -> None:
    raw = b"GET /api/items HTTP/1.1\r\n" + host_line + b"\r\n"
    assert one(setup, agent, raw).status == status


@pytest.mark.parametrize(
    "headers",
    [
        ("x-role: intruder",),
        ("x-role: viewer", "x-role: intruder"),
        ("x-role: viewer, intruder",),
        ("X-Role: viewer,intruder",),
    ],
)
def test_every_value_of_a_repeated_header_is_evaluated(
    setup: CaSetup, agent: AgentProcess, headers: tuple[str, ...]
) -> None:
    assert one(setup, agent, get("/api/items", *headers)).status == 403
    assert one(setup, agent, get("/api/items", "x-role: viewer")).status == 200


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
    total = metric(agent, "outrider_tls_handshake_duration_seconds_sum", direction="inbound")
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


def test_headers_over_the_limits_get_431(setup: CaSetup, agent: AgentProcess) -> None:
    many = [f"x-h{i}: v" for i in range(101)]
    assert one(setup, agent, get("/api/items", *many)).status == 431
    big = "x-big: " + "a" * (61 * 1024)
    assert one(setup, agent, get("/api/items", big)).status == 431


def test_a_huge_header_value_is_refused_before_it_is_whole(
    setup: CaSetup, agent: AgentProcess
) -> None:
    context = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, workload("frontend")))
    host, port = agent.bound["inbound[0]"].rsplit(":", 1)
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=5)) as tls:
        tls.sendall(b"GET /api/items HTTP/1.1\r\nHost: backend\r\nX-Big: ")
        started = time.monotonic()
        try:
            for _ in range(64):  # up to 4 MiB of one value, never ended
                tls.sendall(b"a" * 65536)
        except (ConnectionError, ssl.SSLError):
            pass  # refused mid-way: what we want
        answer = tls.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431"), answer
    assert time.monotonic() - started < 3


def test_an_early_answer_ends_the_connection_so_a_body_cannot_smuggle_a_request(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    # The app answers /api/early without reading its body and reads on: whatever the
    # agent sent next on that connection would be read as that body, and what follows
    # it as a request no policy saw.
    smuggled = b"GET /api/admin HTTP/1.1\r\nHost: backend\r\nContent-Length: 0\r\n\r\n"
    second = f"POST /api/items HTTP/1.1\r\nHost: backend\r\nContent-Length: {len(smuggled)}"
    identity = xfcc(str(workload("backend")), str(workload("frontend")))
    forwarded = second.encode() + b"\r\nx-forwarded-client-cert: " + identity + b"\r\n\r\n"
    first = f"POST /api/early HTTP/1.1\r\nHost: backend\r\nContent-Length: {len(forwarded)}"
    before = len(app.seen)
    context = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, workload("frontend")))
    host, port = agent.bound["inbound[0]"].rsplit(":", 1)
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=5)) as tls:
        tls.sendall(first.encode() + b"\r\n\r\n")
        time.sleep(0.5)  # the early answer
        try:
            tls.sendall(b"x" * len(forwarded) + second.encode() + b"\r\n\r\n" + smuggled)
            time.sleep(1)
        except (ConnectionError, ssl.SSLError):
            pass
    assert "/api/admin" not in [seen["target"] for seen in app.seen[before:]]


def test_pipelined_requests_held_behind_a_slow_one_are_bounded(
    setup: CaSetup, agent: AgentProcess
) -> None:
    def rss() -> int:
        status = Path(f"/proc/{agent.process.pid}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) * 1024

    before = rss()
    head = get("/api/items", "x-pad: " + "a" * 50_000)
    context = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, workload("frontend")))
    host, port = agent.bound["inbound[0]"].rsplit(":", 1)
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=5)) as tls:
        tls.sendall(get("/api/slow"))  # the app takes 3 s over this one
        tls.settimeout(0.5)
        try:
            for _ in range(40):  # 40 MiB of heads, unless the agent stops reading
                tls.sendall(head * 20)
        except (TimeoutError, ConnectionError, ssl.SSLError):
            pass  # the agent stopped reading: flow control at work
        grown = rss() - before
    assert grown < 16 << 20, f"the agent held {grown >> 20} MiB of pipelined requests"


def test_conflicting_framing_is_a_bad_request_not_a_smuggled_request(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    before = len(app.seen)
    smuggle = (
        b"POST /api/items HTTP/1.1\r\nHost: backend\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: backend\r\n\r\n"
    )
    replies = exchange(setup, agent, smuggle, methods=("POST", "GET"))
    assert [r.status for r in replies] == [400]
    assert len(app.seen) == before


def test_a_chunked_http10_request_is_a_bad_request(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    before = len(app.seen)
    raw = (
        b"POST /api/items HTTP/1.0\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n"
    )
    assert one(setup, agent, raw).status == 400
    assert len(app.seen) == before


def test_an_upgrade_is_refused_rather_than_relayed_unseen(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    before = len(app.seen)
    upgrade = get("/api/items", "Connection: Upgrade", "Upgrade: websocket")
    assert one(setup, agent, upgrade + get("/admin")).status == 501
    assert len(app.seen) == before


def test_keep_alive_pipelining_chunked_bodies_and_head(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    chunked = (
        b"POST /api/items HTTP/1.1\r\nHost: backend\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n7\r\n, world\r\n0\r\n\r\n"
    )
    head = b"HEAD /api/items HTTP/1.1\r\nHost: backend\r\n\r\n"
    raw = get("/api/one") + chunked + head + get("/api/two")
    replies = exchange(setup, agent, raw, methods=("GET", "POST", "HEAD", "GET"))
    assert [r.status for r in replies] == [200, 200, 200, 200]
    assert replies[0].json()["target"] == "/api/one"
    assert replies[1].json()["body"] == "hello, world"
    assert replies[2].body == b""
    assert replies[3].json()["target"] == "/api/two"


def test_a_denied_request_after_allowed_ones_is_answered_in_order(
    setup: CaSetup, agent: AgentProcess
) -> None:
    raw = get("/api/one") + get("/api/admin") + get("/api/two")
    replies = exchange(setup, agent, raw, methods=("GET", "GET", "GET"))
    assert [r.status for r in replies] == [200, 403]  # and then the connection is closed


def test_an_http_port_does_not_negotiate_h2_so_nothing_skips_the_parser(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    # h2 relayed unparsed would hand the app the client's own identity header and
    # escape every path rule: the port offers http/1.1 only, and h2 bytes are refused.
    context = certs.client_context(setup.bundle_pem, certs.valid_svid(setup, workload("frontend")))
    context.set_alpn_protocols(["h2"])
    host, port = agent.bound["inbound[0]"].rsplit(":", 1)
    before = len(app.seen)
    with context.wrap_socket(socket.create_connection((host, int(port)), timeout=5)) as tls:
        assert tls.selected_alpn_protocol() is None
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + get("/api/admin"))
        answer = tls.recv(4096)
    assert answer.startswith((b"HTTP/1.1 400", b"HTTP/1.1 501")), answer
    assert len(app.seen) == before


# --- hot reload -------------------------------------------------------------------------


def test_a_new_policy_applies_at_once_and_a_broken_one_is_refused(
    setup: CaSetup, agent: AgentProcess
) -> None:
    policy = setup.root / "policy.yaml"
    opened = POLICY.replace('paths: ["/api/*"]', 'paths: ["/api/*", "/public/*"]')
    try:
        assert one(setup, agent, get("/public/page")).status == 403
        policy.write_text(opened)
        assert _eventually(lambda: one(setup, agent, get("/public/page")).status == 200)
        errors = metric(agent, "outrider_config_reloads_total", kind="policy", result="error")
        policy.write_text("policies:\n  - name: broken\n    action: PERMIT\n")
        assert _eventually(
            lambda: (
                metric(agent, "outrider_config_reloads_total", kind="policy", result="error")
                > errors
            )
        )
        assert one(setup, agent, get("/public/page")).status == 200  # the last good policy
    finally:
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
