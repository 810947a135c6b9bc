"""The app's probes, performed by a real `outrider agent run` for the kubelet.

With capture on, the injector rewrites each probe to GET /app-health/<container>/<kind>
on the agent's status port and hands the agent the original (`probes:`). Here one
agent process holds a probe of every kind, against apps on loopback: an HTTP app
whose readiness the test switches, an HTTPS one with a self-signed certificate, a
gRPC health server (grpcio, the reference implementation), a port nobody listens
on, and one that accepts and never answers.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent import futures
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web

from agent.adapters.probes import LOOPBACK, AppAddress, Prober
from identity.probes import AppProbe, Grpc, HttpGet, TcpSocket
from identity.proto import health_pb2
from tests.httpraw import Responses
from tests.mesh import (
    AgentProcess,
    agent_process,
    agent_yaml,
    eventually,
    local_sign,
    running_agent,
    served_agent_yaml,
    threaded_app,
)
from tests.support import CaProcess, CaSetup, free_port, loopback_tls

SERVING, NOT_SERVING = (
    health_pb2.HealthCheckResponse.SERVING,
    health_pb2.HealthCheckResponse.NOT_SERVING,
)
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def app_server(handler: Handler) -> AsyncIterator[int]:
    """An app on 127.0.0.1 that `handler` serves: yields its port."""
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


class HeldApp:
    """An HTTP app whose every answer, 200, waits for `answer`: counts its connections
    (the probes waiting on it)."""

    def __init__(self) -> None:
        self.answer = asyncio.Event()
        self.connections = 0

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        await self.answer.wait()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()


@dataclass
class Apps:
    http: int
    https: int
    grpc: int
    silent: int  # accepts (the kernel's backlog) and never answers
    closed: int  # nobody listens
    state: dict[str, Any] = field(default_factory=dict)


def _http_app(state: dict[str, Any]) -> web.Application:
    async def ready(request: web.Request) -> web.Response:
        state["seen"] = dict(request.headers)
        state["http from"] = request.remote
        return web.Response(status=200 if state["ready"] else 500, text="app\n")

    async def moved(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "http://elsewhere.example/"})

    async def redirect(request: web.Request) -> web.Response:
        location = request.query["to"].replace("PORT", str(request.url.port))
        return web.Response(
            status=int(request.query.get("status", "302")), headers={"Location": location}
        )

    async def loop(request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/loop"})

    app = web.Application()
    app.router.add_get("/ready", ready)
    app.router.add_get("/moved", moved)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/loop", loop)
    return app


def _grpc_server(state: dict[str, Any]) -> tuple[grpc.Server, int]:
    def check(request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext) -> Any:
        state["grpc from"] = context.peer()
        if request.service not in state["grpc"]:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return health_pb2.HealthCheckResponse(status=state["grpc"][request.service])

    handler = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=health_pb2.HealthCheckRequest.FromString,
                response_serializer=health_pb2.HealthCheckResponse.SerializeToString,
            )
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Apps]:
    state: dict[str, Any] = {"ready": True, "grpc": {"": SERVING, "orders": NOT_SERVING}}
    tls = loopback_tls(tmp_path_factory.mktemp("app-tls"), "app.local")
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)
    server, grpc_port = _grpc_server(state)
    try:
        with (
            threaded_app(_http_app(state)) as http,
            threaded_app(_http_app(state), tls.server_context) as https,
        ):
            yield Apps(http, https, grpc_port, silent.getsockname()[1], free_port(), state)
    finally:
        server.stop(0)
        silent.close()


def redirects() -> dict[str, str]:
    """Probe paths by kind, each a redirect of the app's: /redirect?to=<Location> (PORT: the
    app's own port)."""
    return {
        "slash": "/redirect?status=301&to=/ready",  # as a framework adds a trailing slash
        "absolute": "/redirect?to=http://127.0.0.1:PORT/ready",
        "loop": "/loop",
        "admin": f"/redirect?to=http://127.0.0.1:{ADMIN_PORT}/ready",
    }


def probes(apps: Apps) -> dict[str, Any]:
    header = [{"name": "X-Probe", "value": "from the pod spec"}, {"name": "Host", "value": "web"}]
    return {
        "/app-health/web/readyz": {
            "httpGet": {"path": "/ready", "port": apps.http, "httpHeaders": header}
        },
        "/app-health/web/startupz": {"httpGet": {"path": "/moved", "port": apps.http}},
        "/app-health/tls/readyz": {
            "httpGet": {"path": "/ready", "port": apps.https, "scheme": "HTTPS"}
        },
        "/app-health/web/livez": {"tcpSocket": {"port": apps.http}},
        "/app-health/gone/livez": {"tcpSocket": {"port": apps.closed}},
        "/app-health/grpc/readyz": {"grpc": {"port": apps.grpc}},
        "/app-health/grpc/livez": {"grpc": {"port": apps.grpc, "service": "orders"}},
        "/app-health/grpc/startupz": {"grpc": {"port": apps.grpc, "service": "billing"}},
        **{
            f"/app-health/redirect/{kind}": {"httpGet": {"path": to, "port": apps.http}}
            for kind, to in redirects().items()
        },
        "/app-health/slow/readyz": {
            "httpGet": {"path": "/", "port": apps.silent},
            "timeoutSeconds": 1,
        },
    }


#: Fixed before the agent starts, so a probe can name them.
ADMIN_PORT, STATUS_PORT = free_port(), free_port()


def loops() -> dict[str, Any]:
    """Probes of the agent's own servers, which serve /app-health too: performed, each
    would ask the agent to perform itself again."""
    return {
        f"/app-health/loop{port}/readyz": {
            "httpGet": {"path": f"/app-health/loop{port}/readyz", "port": port}
        }
        for port in (ADMIN_PORT, STATUS_PORT)
    }


@pytest.fixture(scope="module")
def agent(setup: CaSetup, ca: CaProcess, apps: Apps) -> Iterator[AgentProcess]:
    raw = served_agent_yaml(
        setup,
        ca,
        "web",
        admin=f"127.0.0.1:{ADMIN_PORT}",
        status=f"127.0.0.1:{STATUS_PORT}",
        probes={**probes(apps), **loops()},
    )
    with agent_process(setup.root, "web", raw) as process:
        yield process


def ask(agent: AgentProcess, *paths: str, server: str = "status") -> list[tuple[int, str]]:
    """GET each path on one connection, pipelined: the answers, in order."""
    host, port = agent.bound[server].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(b"".join(b"GET %s HTTP/1.1\r\nHost: k\r\n\r\n" % p.encode() for p in paths))
        responses = Responses(sock)
        replies = [responses.next() for _ in paths]
    return [(r.status, r.body.decode()) if r else (0, "closed") for r in replies]


def test_an_http_probe_passes_on_2xx_and_3xx_and_fails_otherwise(
    agent: AgentProcess, apps: Apps
) -> None:
    assert ask(agent, "/app-health/web/readyz") == [(200, "HTTP 200\n")]
    assert ask(agent, "/app-health/web/startupz") == [(200, "HTTP 302\n")]  # not followed
    apps.state["ready"] = False
    try:
        assert ask(agent, "/app-health/web/readyz") == [(503, "HTTP 500\n")]
    finally:
        apps.state["ready"] = True
    assert ask(agent, "/app-health/web/readyz") == [(200, "HTTP 200\n")]


def test_a_redirect_to_the_same_host_is_followed_as_the_kubelet_follows_it(
    agent: AgentProcess, apps: Apps
) -> None:
    """The kubelet follows a redirect to the host it asked (up to 10 of them) and takes
    the final answer: a health check behind a trailing-slash redirect fails when it
    fails. To another host, the redirect itself passes (test above)."""
    paths = [f"/app-health/redirect/{kind}" for kind in ("slash", "absolute")]
    assert ask(agent, *paths) == [(200, "HTTP 200\n")] * 2
    apps.state["ready"] = False
    try:
        assert ask(agent, *paths) == [(503, "HTTP 500\n")] * 2
    finally:
        apps.state["ready"] = True
    assert ask(agent, "/app-health/redirect/loop", "/app-health/redirect/admin") == [
        (503, "stopped after 10 redirects\n"),
        (503, f"port {ADMIN_PORT} is the agent's own\n"),
    ]


def test_an_http_probe_sends_the_pod_specs_headers(agent: AgentProcess, apps: Apps) -> None:
    ask(agent, "/app-health/web/readyz")
    seen = apps.state["seen"]
    assert seen["X-Probe"] == "from the pod spec"
    assert seen["Host"] == "web"  # the probe's own Host replaces the default
    assert seen["User-Agent"].startswith("kube-probe/")


def test_an_https_probe_does_not_verify_the_apps_certificate(agent: AgentProcess) -> None:
    assert ask(agent, "/app-health/tls/readyz") == [(200, "HTTP 200\n")]


def test_a_tcp_probe_passes_when_the_port_accepts_and_fails_when_nothing_listens(
    agent: AgentProcess,
) -> None:
    assert ask(agent, "/app-health/web/livez", "/app-health/gone/livez") == [
        (200, "connected\n"),
        (503, "Connection refused\n"),
    ]


def test_a_grpc_probe_passes_only_while_the_service_is_serving(
    agent: AgentProcess, apps: Apps
) -> None:
    assert ask(agent, "/app-health/grpc/readyz", "/app-health/grpc/livez") == [
        (200, "SERVING\n"),
        (503, "NOT_SERVING\n"),
    ]
    assert ask(agent, "/app-health/grpc/startupz") == [(503, "gRPC status NOT_FOUND\n")]
    apps.state["grpc"]["orders"] = SERVING
    assert ask(agent, "/app-health/grpc/livez") == [(200, "SERVING\n")]


def test_a_probe_fails_at_its_timeout_and_the_answers_behind_it_keep_their_order(
    agent: AgentProcess,
) -> None:
    started = time.monotonic()
    answers = ask(agent, "/app-health/slow/readyz", "/ready", "/app-health/web/livez")
    assert answers == [(503, "timed out after 1s\n"), (200, "ready\n"), (200, "connected\n")]
    assert 0.9 < time.monotonic() - started < 3


def test_only_the_configured_probe_paths_are_served_on_both_servers(
    agent: AgentProcess,
) -> None:
    unknown = ["/app-health/other/readyz", "/app-health/web", "/app-health/web/readyz/x"]
    assert [status for status, _ in ask(agent, *unknown)] == [404, 404, 404]
    assert ask(agent, "/app-health/web/livez", server="admin") == [(200, "connected\n")]


def test_the_agent_never_probes_its_own_servers(agent: AgentProcess) -> None:
    for port in (ADMIN_PORT, STATUS_PORT):
        assert ask(agent, f"/app-health/loop{port}/readyz") == [
            (503, f"port {port} is the agent's own\n")
        ]
    assert ask(agent, "/app-health/web/livez") == [(200, "connected\n")]


async def test_probes_beyond_the_bound_in_flight_fail_at_once(tmp_path: Path) -> None:
    silent = socket.create_server(("127.0.0.1", 0), backlog=16)
    try:
        prober = Prober(max_in_flight=2)
        port = silent.getsockname()[1]
        slow = [
            AppProbe(f"/app-health/{name}/readyz", HttpGet(port), timedelta(seconds=5))
            for name in ("a", "b", "c")
        ]
        held = [asyncio.create_task(prober.check(probe)) for probe in slow[:2]]
        await asyncio.sleep(0.05)
        started = time.monotonic()
        beyond = await prober.check(slow[2])
        assert not beyond.passed and "in flight" in beyond.reason
        assert time.monotonic() - started < 0.1
        for task in held:
            task.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        assert prober.in_flight == 0  # a cancelled probe (its connection closed) frees its place
    finally:
        silent.close()


async def test_probes_held_at_other_addresses_leave_the_kubelets_its_places() -> None:
    """Each address has places of its own: the bound full at 127.0.0.1, and at another
    address of the pod, the pod IP's probes still run."""
    app = HeldApp()
    async with app_server(app) as port:
        prober = Prober(max_in_flight=2)
        slow = [
            AppProbe(f"/app-health/{name}/readyz", HttpGet(port), timedelta(seconds=5))
            for name in ("a", "b")
        ]
        elsewhere = AppAddress("127.0.0.1", "127.0.0.7")  # another address of the pod
        kubelets = AppAddress("127.0.0.1", "127.0.0.6")
        held = [
            asyncio.create_task(prober.check(p, at)) for p in slow for at in (LOOPBACK, elsewhere)
        ]
        await asyncio.sleep(0.05)
        refused = await prober.check(
            AppProbe("/app-health/c/readyz", HttpGet(port), timedelta(seconds=5))
        )
        assert "in flight" in refused.reason
        kubelet = [asyncio.create_task(prober.check(p, kubelets)) for p in slow]
        await asyncio.sleep(0.05)
        assert app.connections == 6
        app.answer.set()
        assert all(outcome.passed for outcome in await asyncio.gather(*held, *kubelet))


async def test_a_flood_of_one_probe_costs_the_app_one_request_and_never_fails_the_kubelet() -> None:
    """Anyone on the pod network can ask /app-health: asked 100 times at once, the
    probe runs once, and the kubelet's own request, among them, gets its outcome,
    never "in flight" (or a flood would fail the liveness probe and restart the pod)."""
    app = HeldApp()
    async with app_server(app) as port:
        prober = Prober(max_in_flight=2)
        probe = AppProbe("/app-health/web/livez", HttpGet(port), timedelta(seconds=5))
        flood = [asyncio.create_task(prober.check(probe)) for _ in range(100)]
        await asyncio.sleep(0.05)
        kubelet = asyncio.create_task(prober.check(probe))
        flood[0].cancel()  # one caller going away stops nobody else's answer
        await asyncio.sleep(0.01)
        app.answer.set()
        outcomes = await asyncio.gather(*flood[1:], kubelet)
        assert {(o.passed, o.reason) for o in outcomes} == {(True, "HTTP 200")}
        assert app.connections == 1
        assert prober.in_flight == 0


@pytest.mark.parametrize(
    ("answer", "outcome"),
    [
        (
            b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n",
            (True, "HTTP 204"),
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\n" * 6 + b"HTTP/1.1 200 OK\r\n\r\n",
            (False, "more than 5 informational answers"),
        ),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", (False, "HTTP 101")),
        (
            b"HTTP/1.1 103 Early Hints\r\n" + b"X: y\r\n" * 200,
            (False, "the app's answer is not HTTP/1.x"),
        ),
    ],
)
async def test_informational_answers_are_skipped_as_the_kubelet_skips_them(
    answer: bytes, outcome: tuple[bool, str]
) -> None:
    """Go's client, the kubelet's, reads past up to five 1xx answers (103 Early Hints,
    100 Continue) to the final one; 101 is final."""

    async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(answer)
        await writer.drain()
        await reader.read(1)  # until the agent closes
        writer.close()

    async with app_server(app) as port:
        probe = AppProbe("/app-health/web/readyz", HttpGet(port), timedelta(seconds=2))
        checked = await Prober().check(probe)
        assert (checked.passed, checked.reason) == outcome


async def test_a_probe_reaches_the_app_at_its_address_from_its_source(apps: Apps) -> None:
    """A captured pod's probes go to the pod IP from the hand-off source (agent/adapters/
    admin.py); here 127.0.0.1, from 127.0.0.6: HTTP (with the Host the kubelet would send
    there), TCP and gRPC each dial from the source."""
    address = AppAddress("127.0.0.1", "127.0.0.6")
    second = timedelta(seconds=2)
    http = await Prober().check(
        AppProbe("/app-health/a/readyz", HttpGet(apps.http, "/ready"), second), address
    )
    assert http.passed and apps.state["http from"] == "127.0.0.6"
    assert apps.state["seen"]["Host"] == f"127.0.0.1:{apps.http}"
    grpc_probe = AppProbe("/app-health/a/livez", Grpc(apps.grpc), second)
    assert (await Prober().check(grpc_probe, address)).passed
    assert apps.state["grpc from"].startswith("ipv4:127.0.0.6:")
    with socket.create_server(("127.0.0.1", 0)) as tcp_app:  # the kernel accepts for it
        tcp_probe = AppProbe("/app-health/a/startupz", TcpSocket(tcp_app.getsockname()[1]), second)
        assert (await Prober().check(tcp_probe, address)).passed
        connection, caller = tcp_app.accept()
        connection.close()
        assert caller[0] == "127.0.0.6"


async def test_every_probe_of_a_pod_with_many_containers_can_run_at_once(
    setup: CaSetup,
) -> None:
    """The kubelet runs each probe on its own clock: with slow apps, 20 probes of 7
    containers overlap, and none may fail for want of a place (a liveness probe so
    refused restarts the container). Each probe runs once at a time, so the bound is
    the pod's own probes."""
    app = HeldApp()
    paths = [f"/app-health/c{i}/readyz" for i in range(20)]
    async with app_server(app) as port:
        raw = agent_yaml(
            setup.root,
            "many",  # not "web": that one's token file is the served agent's
            status="127.0.0.1:0",
            probes={
                p: {"httpGet": {"path": "/", "port": port}, "timeoutSeconds": 5} for p in paths
            },
        )
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            host, status = agent.bound["status"].rsplit(":", 1)

            async def kubelet(path: str) -> bytes:
                reader, writer = await asyncio.open_connection(host, int(status))
                writer.write(f"GET {path} HTTP/1.1\r\nHost: k\r\n\r\n".encode())
                line = await reader.readline()
                writer.close()
                return line

            asked = [asyncio.create_task(kubelet(p)) for p in paths]
            assert await eventually(
                lambda: app.connections == len(paths) or any(t.done() for t in asked)
            )
            app.answer.set()
            assert {await t for t in asked} == {b"HTTP/1.1 200 OK\r\n"}
