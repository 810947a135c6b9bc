"""Header names with an underscore, through real `outrider agent run` processes, to a real WSGI app.

Python's wsgiref, like every CGI/WSGI server, hands the app `X_Role` and
`X-Role` alike as `HTTP_X_ROLE` (PHP `X.Role` too). A DENY on `x-role: admin` must therefore
hold for every spelling: the agent refuses a request naming a header with an
underscore (by default) or drops the header (`headers_with_underscores:
drop`), in both directions, framing headers included.

The same holds for a header's values: a rule reads what the app will. A field a
`Connection` header names never reaches the app, so no rule reads it; and of several
values, any of which the app may read (wsgiref joins the lines), a DENY's
`not_values` needs only one outside its list.
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.request
from collections.abc import Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from tests.httpraw import get, one
from tests.mesh import AgentProcess, agent_process, inbound, served_agent_yaml, workload
from tests.support import DENY_ADMIN_ROLE, CaProcess, CaSetup


class WsgiApp:
    """A wsgiref server in a thread; records the environ's HTTP_* keys and body of each request."""

    def __init__(self) -> None:
        self.seen: list[dict[str, str]] = []
        self.server: WSGIServer = make_server("127.0.0.1", 0, self, handler_class=_Quiet)
        self.port = self.server.server_port

    def __call__(self, environ: dict[str, Any], start: Any) -> Iterable[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        seen = {k: v for k, v in environ.items() if k.startswith("HTTP_") or k == "CONTENT_LENGTH"}
        seen["body"] = environ["wsgi.input"].read(length).decode()
        self.seen.append(seen)
        body = json.dumps(seen).encode()
        start("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def app() -> Iterator[WsgiApp]:
    wsgi = WsgiApp()
    thread = threading.Thread(target=wsgi.server.serve_forever, daemon=True)
    thread.start()
    try:
        yield wsgi
    finally:
        wsgi.server.shutdown()
        wsgi.server.server_close()


def _backend(
    setup: CaSetup,
    ca: CaProcess,
    app: WsgiApp,
    name: str,
    policies: str = DENY_ADMIN_ROLE,
    **limits: str,
) -> dict[str, Any]:
    policy = setup.root / f"{name}-policy.yaml"
    policy.write_text(policies)
    return served_agent_yaml(
        setup,
        ca,
        name,
        inbound=inbound(app.port, protocol="http"),
        policy={"files": [str(policy)]},
        limits=limits,
    )


@pytest.fixture(scope="module")
def backend(setup: CaSetup, ca: CaProcess, app: WsgiApp) -> Iterator[AgentProcess]:
    with agent_process(setup.root, "backend", _backend(setup, ca, app, "backend")) as process:
        yield process


@pytest.fixture(scope="module")
def dropping(setup: CaSetup, ca: CaProcess, app: WsgiApp) -> Iterator[AgentProcess]:
    raw = _backend(setup, ca, app, "dropping", headers_with_underscores="drop")
    with agent_process(setup.root, "dropping", raw) as process:
        yield process


@pytest.fixture(scope="module")
def frontend(setup: CaSetup, ca: CaProcess, backend: AgentProcess) -> Iterator[AgentProcess]:
    raw = served_agent_yaml(
        setup,
        ca,
        "frontend",
        outbound=[
            {
                "name": "backend",
                "listen": "127.0.0.1:0",
                "protocol": "http",
                "endpoints": [backend.bound["inbound[0]"]],
                "server_ids": [str(workload("backend"))],
            }
        ],
    )
    with agent_process(setup.root, "frontend", raw) as process:
        yield process


ROLE_SPELLINGS = ["X_Role", "x_role", "X_ROLE", "x-Role_", "_x-role"]
#: PHP turns `.` into `_` in every $_SERVER key: each of these is its HTTP_X_ROLE too.
PHP_SPELLINGS = ["X.Role", "x.role", "X-Role.", "X~Role"]


def test_the_hyphen_spelling_is_denied(setup: CaSetup, backend: AgentProcess) -> None:
    assert one(setup, backend, get("/", "X-Role: admin")).status == 403
    assert one(setup, backend, get("/", "X-Role: viewer")).status == 200


def test_dropping_instead_passes_the_request_on_without_the_header(
    setup: CaSetup, dropping: AgentProcess, app: WsgiApp
) -> None:
    raw = get("/", "X_Role: admin", "Transfer_Encoding: chunked", "Content-Length: 5") + b"hello"
    reply = one(setup, dropping, raw)
    assert reply.status == 200
    seen = app.seen[-1]
    assert "HTTP_X_ROLE" not in seen and "HTTP_TRANSFER_ENCODING" not in seen
    assert seen["body"] == "hello"
    assert one(setup, dropping, get("/", "X-Role: admin", "X_Role: viewer")).status == 403


def test_an_apps_outbound_request_with_an_underscore_is_refused_before_it_leaves(
    frontend: AgentProcess, app: WsgiApp
) -> None:
    seen = len(app.seen)
    host, port = frontend.bound["outbound[backend]"].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: backend\r\nX_Role: admin\r\n\r\n")
        answer = sock.makefile("rb").read()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"underscore" in body
    assert len(app.seen) == seen
    # the hyphen spelling goes through, to be decided by the backend's agent
    request = urllib.request.Request(
        f"http://{frontend.bound['outbound[backend]']}/", headers={"X-Role": "viewer"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
    assert len(app.seen) == seen + 1


TENANTS = """\
policies:
  - name: tenants
    action: DENY
    rules:
      - name: only-acme
        when: [{header: x-tenant, not_values: [acme]}]
"""


@pytest.fixture(scope="module")
def tenants(setup: CaSetup, ca: CaProcess, app: WsgiApp) -> Iterator[AgentProcess]:
    raw = _backend(setup, ca, app, "tenants", TENANTS)
    with agent_process(setup.root, "tenants", raw) as process:
        yield process


def test_a_header_with_a_second_value_outside_a_denys_list_is_denied(
    setup: CaSetup, tenants: AgentProcess, app: WsgiApp
) -> None:
    assert one(setup, tenants, get("/", "X-Tenant: acme")).status == 200
    assert app.seen[-1]["HTTP_X_TENANT"] == "acme"
    for lines in (("X-Tenant: globex", "X-Tenant: acme"), ("X-Tenant: globex, acme",)):
        assert one(setup, tenants, get("/", *lines)).status == 403, lines


@pytest.mark.parametrize("spelling", ["admin\xa0", "\xa0admin", "admin\x85"])
def test_a_value_the_app_strips_of_unicode_spaces_is_read_so_by_the_policy(
    setup: CaSetup, backend: AgentProcess, app: WsgiApp, spelling: str
) -> None:
    """wsgiref, as Python's str.strip, takes U+00A0 and U+0085 off a value's ends."""
    seen = len(app.seen)
    assert one(setup, backend, get("/", f"X-Role: {spelling}")).status == 403
    assert len(app.seen) == seen


def test_a_header_the_connection_header_names_is_not_read_by_the_policy(
    setup: CaSetup, tenants: AgentProcess, app: WsgiApp
) -> None:
    """It is dropped on the way to the app: the policy decides as if it were missing."""
    seen = len(app.seen)
    reply = one(setup, tenants, get("/", "X-Tenant: acme", "Connection: x-tenant"))
    assert reply.status == 403
    assert len(app.seen) == seen
