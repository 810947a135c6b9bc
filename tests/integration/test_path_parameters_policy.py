"""Path parameters against a real agent process: `/admin;x/users` is `/admin/users` to a
Java app (Tomcat, Jetty, Spring strip each segment's `;...` before routing), so a DENY
on `/admin/*` must deny it, on HTTP/1.1, h2 to an HTTP/1.1 app and an h2 port alike;
a `;jsessionid=` still reaches an app its ALLOW lets in, with the parameter intact,
and the access log redacts it as before.

The ALLOW below lets `/admin;x/users` in as sent (`/admin*`): only the DENY matching
the path as the app routes it stands between the caller and `/admin/users`.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.adapters.h2server import H2Stream
from agent.core.accesslog import MAX_PATH
from agent.core.policy import MAX_REASON
from tests.h2raw import H2Client, request_headers, threaded_h2_app, tls_socket
from tests.httpraw import get, one
from tests.mesh import AgentProcess, agent_process, served_agent_yaml, threaded_app
from tests.support import CaProcess, CaSetup, free_port

POLICY = {
    "policies": [
        {"name": "no-admin", "action": "DENY", "rules": [{"to": {"paths": ["/admin/*"]}}]},
        {
            "name": "app",
            "action": "ALLOW",
            "rules": [
                {"to": {"paths": ["/app/*", "/admin*"]}},
                {
                    "to": {"paths": ["/keyed/*"]},
                    "when": [{"header": "x-api-key", "values": ["k1"]}],
                },
            ],
        },
    ]
}
SESSION = "/app/page;jsessionid=abc"


@dataclass
class Served:
    agent: AgentProcess
    log: Path  # the agent's stdout: its access log, a JSON line per request
    seen: list[str] = field(default_factory=list)  # each path an app received, as received

    def lines(self, path: str, deadline: float = 10.0) -> list[dict[str, Any]]:
        """The access log lines of `path` (as logged), once there is one."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            text = self.log.read_text()
            found = [json.loads(line) for line in text.splitlines() if f'"{path}"' in line]
            if found:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no access log line for {path}")


@pytest.fixture(scope="module")
def served(
    setup: CaSetup, ca: CaProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    """One agent: inbound[0] `protocol: http` before an HTTP/1.1 app, inbound[1]
    `protocol: http2` before an h2 app; both apps record the paths they get."""
    seen: list[str] = []

    async def http1(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        return web.Response(text="ok")

    async def h2(stream: H2Stream) -> None:
        seen.append((stream.header(b":path") or b"").decode())
        while await stream.read():
            pass
        await stream.respond([(b":status", b"200")])
        await stream.send(b"ok")
        await stream.end()

    application = web.Application()
    application.router.add_route("*", "/{tail:.*}", http1)
    log = tmp_path_factory.mktemp("path-parameters") / "access.log"
    with threaded_app(application) as http1_port, threaded_h2_app(h2) as h2_port:
        # Two ports of their own: the agent names listeners by their `listen`.
        inbounds = [
            {
                "listen": f"127.0.0.1:{free_port()}",
                "app": f"127.0.0.1:{http1_port}",
                "protocol": "http",
            },
            {
                "listen": f"127.0.0.1:{free_port()}",
                "app": f"127.0.0.1:{h2_port}",
                "protocol": "http2",
            },
        ]
        raw = served_agent_yaml(
            setup, ca, "backend", inbound=inbounds, policy=POLICY, access_log={"mode": "all"}
        )
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        try:
            with agent_process(setup.root, "path-parameters", raw, stdout=fd) as agent:
                yield Served(agent, log, seen)
        finally:
            os.close(fd)


def _h2(setup: CaSetup, served: Served, path: str, listener: str, alpn: tuple[str, ...]) -> int:
    client = H2Client(tls_socket(setup, served.agent, listener=listener, alpn=alpn))
    try:
        return client.wait(client.send(request_headers(path, authority="backend"))).status
    finally:
        client.close()


def _status(setup: CaSetup, served: Served, path: str, how: str) -> int:
    if how == "http1":
        return one(setup, served.agent, get(path)).status
    if how == "h2-to-http1":  # h2 by ALPN on the `protocol: http` port
        return _h2(setup, served, path, "inbound[0]", ("h2", "http/1.1"))
    return _h2(setup, served, path, "inbound[1]", ("h2",))


WAYS = ["http1", "h2-to-http1", "h2"]


@pytest.mark.parametrize("how", WAYS)
@pytest.mark.parametrize("path", ["/admin;x/users", "/;x/admin/users", "/admin/users;"])
def test_a_deny_on_the_path_the_app_routes_denies_it_with_parameters(
    setup: CaSetup, served: Served, how: str, path: str
) -> None:
    before = served.agent.total(
        "outrider_authz_decisions_total", decision="deny", policy="no-admin"
    )
    assert _status(setup, served, path, how) == 403
    assert path not in served.seen  # refused before the app
    after = served.agent.total("outrider_authz_decisions_total", decision="deny", policy="no-admin")
    assert after == before + 1  # the DENY decided, not a missing ALLOW


@pytest.mark.parametrize("how", WAYS)
def test_a_session_id_parameter_still_reaches_an_allowed_app_intact(
    setup: CaSetup, served: Served, how: str
) -> None:
    served.seen.clear()
    assert _status(setup, served, SESSION, how) == 200
    assert served.seen == [SESSION]  # the app gets the parameter: its session is its business
    assert _status(setup, served, "/admin;x", how) == 200  # /admin: only /admin/* is denied


def test_the_access_log_still_redacts_the_parameter(setup: CaSetup, served: Served) -> None:
    assert _status(setup, served, "/app/logged;jsessionid=SeCrEt-session", "http1") == 200
    (line,) = served.lines("/app/logged;jsessionid=REDACTED")
    assert line["status"] == 200
    assert "SeCrEt" not in json.dumps(line)  # not hex: no trace or request id holds it


def test_a_denied_request_logs_its_path_without_the_parameters_values(
    setup: CaSetup, served: Served
) -> None:
    """The agent's own denial line (one per caller a while: a caller of its own here)
    shows the path as the access log does: a session ID is a secret there too."""
    path = "/admin;jsessionid=s3cr3t/users"
    assert one(setup, served.agent, get(path), who="java-prober").status == 403
    end = time.monotonic() + 10
    while not (lines := [line for line in served.agent.log if "java-prober" in line]):
        assert time.monotonic() < end, "no denial line for the caller"
        time.sleep(0.02)
    assert "/admin;jsessionid=REDACTED/users" in lines[0]
    assert "s3cr3t" not in "".join(served.agent.log)


def _denial_line(served: Served, who: str) -> str:
    end = time.monotonic() + 10
    while not (lines := [line for line in served.agent.log if who in line]):
        assert time.monotonic() < end, f"no denial line for {who}"
        time.sleep(0.02)
    return lines[0]


def test_a_denial_line_never_holds_a_header_value_the_policy_read(
    setup: CaSetup, served: Served
) -> None:
    """A wrong API key (or any header a `when` reads) is denied; the agent's line says which
    header missed which rule, as the access log, without the value: it may be a secret."""
    raw = get("/keyed/x;jsessionid=s3ss", "X-Api-Key: wr0ng-key", "Cookie: JSESSIONID=c00k")
    assert one(setup, served.agent, raw, who="key-prober").status == 403
    line = _denial_line(served, "key-prober")
    assert "x-api-key" in line  # still says which condition missed
    for secret in ("wr0ng-key", "s3ss", "c00k"):
        assert secret not in "".join(served.agent.log)


def test_a_long_path_makes_a_denial_line_of_bounded_size(setup: CaSetup, served: Served) -> None:
    """The reason quotes the path without parameters (40 KB here) in each form and rule
    that decided: the line is cut, not a copy of the path per rule (a log pipeline splits
    or drops long lines)."""
    path = "/admin;x/" + "z" * 40_000
    assert one(setup, served.agent, get(path), who="long-prober").status == 403
    line = _denial_line(served, "long-prober")
    assert "no-admin" in line  # the line still says what denied it
    assert len(line) < 3 * MAX_PATH + MAX_REASON


@pytest.mark.parametrize(("listener", "alpn"), [("inbound[0]", ("h2",)), ("inbound[1]", ("h2",))])
def test_one_connection_gets_each_request_decided_in_both_forms(
    setup: CaSetup, served: Served, listener: str, alpn: tuple[str, ...]
) -> None:
    """Streams with and without parameters, interleaved on one h2 connection (one caller,
    one port: the policy's fast path for them is planned once), are decided one by one
    (HTTP/1.1 closes its connection after a denial)."""
    paths = ["/app/a", "/admin;x/users", "/app/b;x", "/;x/admin/users", "/admin;x", "/app/c"]
    client = H2Client(tls_socket(setup, served.agent, listener=listener, alpn=alpn))
    try:
        statuses = [
            client.wait(client.send(request_headers(path, authority="backend"))).status
            for path in paths
        ]
    finally:
        client.close()
    assert statuses == [200, 403, 200, 403, 200, 200]


def test_a_long_h2_method_makes_a_denial_line_of_bounded_size(
    setup: CaSetup, served: Served
) -> None:
    """h2 lets a caller send any token as :method; the line shows it cut, as the access log."""
    client = H2Client(tls_socket(setup, served.agent, who="method-prober"))
    try:
        headers = request_headers("/nowhere;x", method="Q" * 12_000, authority="backend")
        assert client.wait(client.send(headers)).status == 403
    finally:
        client.close()
    line = _denial_line(served, "method-prober")
    assert len(line) < 3 * MAX_PATH + MAX_REASON
