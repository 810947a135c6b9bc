"""Outbound access log lines under faults, from real agent processes: a line never names a
peer its request or connection did not reach, each connection gets exactly one, and the
agent keeps nothing of a connection whose line is written.

The mesh: a `ca serve`; two server agents, `backend` and `other` (two SPIFFE IDs), each with
an HTTP app, a TCP echo and an h2 (gRPC) app behind it; and `frontend` (mode all), whose
upstreams spread over both servers and an endpoint nobody serves: a compliance auditor
reads from its lines which peer each request reached, over which TLS, after any retry.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, ExitStack, suppress
from dataclasses import dataclass
from functools import partial
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from aiohttp import web

from agent.adapters import h2client
from agent.core.grpc import Code
from tests.floods import left_at_once, open_fds
from tests.h2backend import Answer, exchange, grpc_error, grpc_head, h2_backend
from tests.h2backend import Request as H2Request
from tests.integration.test_access_log_and_tracing import http_server
from tests.integration.test_access_log_outbound import echoed, outbound_lines, relayed
from tests.mesh import Logged, echo_server, eventually, logged_agent, served_agent_yaml, workload
from tests.support import CaProcess, CaSetup, free_port

pytestmark = pytest.mark.asyncio(loop_scope="module")

BACKEND, OTHER = str(workload("backend")), str(workload("other"))


@dataclass
class Mesh:
    backend: Logged
    other: Logged
    frontend: Logged
    dead: str  # an endpoint nobody listens on
    peers: dict[str, str | None]  # endpoint -> the SPIFFE ID that serves it
    endpoints: dict[str, dict[str, str]]  # SPIFFE ID -> kind -> its endpoint

    def outbound(self, name: str) -> str:
        return self.frontend.agent.bound[f"outbound[{name}]"]

    def peers_at(self, peer: str, kind: str) -> str:
        """The endpoint of `peer`'s inbound port for `kind` (http, tcp or grpc)."""
        return self.endpoints[peer][kind]


async def _http_app(name: str, request: web.Request) -> web.Response:
    await request.read()
    if request.path == "/flaky" and name == "backend":  # retried on the other server
        return web.Response(status=503, text="unavailable")
    return web.Response(text=name)


def _h2_reply(name: str) -> Any:
    async def reply(request: H2Request) -> Answer:
        path = request.header(b":path") or b""
        if path.endswith(b"/Slow"):  # past the per-try timeout
            await asyncio.sleep(1)
        if path.endswith(b"/Flaky") and name == "backend":
            return grpc_error(Code.UNAVAILABLE, "busy")
        return Answer(
            [(b":status", b"200"), (b"content-type", b"application/grpc")],
            request.body,
            [(b"grpc-status", b"0")],
        )

    return reply


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def mesh(setup: CaSetup, ca: CaProcess) -> AsyncIterator[Mesh]:
    async with AsyncExitStack() as apps:
        servers: dict[str, Logged] = {}
        addresses: dict[str, dict[str, str]] = {}
        with ExitStack() as stack:
            for name in ("backend", "other"):
                http_port = await apps.enter_async_context(http_server(partial(_http_app, name)))
                echo_port = await apps.enter_async_context(echo_server())
                grpc_app = await apps.enter_async_context(h2_backend(name, _h2_reply(name)))
                ports = [
                    {
                        "listen": f"127.0.0.1:{free_port()}",  # (told apart by address)
                        "app": f"127.0.0.1:{port}",
                        "protocol": kind,
                    }
                    for port, kind in (
                        (http_port, "http"),
                        (echo_port, "tcp"),
                        (grpc_app.port, "grpc"),
                    )
                ]
                raw = served_agent_yaml(setup, ca, name, inbound=ports, access_log={"mode": "all"})
                servers[name] = stack.enter_context(logged_agent(setup.root, name, raw))
                bound = servers[name].agent.bound
                addresses[name] = {
                    kind: bound[f"inbound[{n}]"] for n, kind in enumerate(("http", "tcp", "grpc"))
                }
            dead = f"127.0.0.1:{free_port()}"

            def upstream(name: str, protocol: str, *endpoints: str, **extra: Any) -> Any:
                return {
                    "name": name,
                    "listen": f"127.0.0.1:{free_port()}",
                    "protocol": protocol,
                    "endpoints": list(endpoints),
                    "server_ids": [BACKEND, OTHER],
                    **extra,
                }

            both = {
                kind: (addresses["backend"][kind], addresses["other"][kind])
                for kind in addresses["backend"]
            }
            upstreams = [
                upstream("echo", "tcp", addresses["backend"]["tcp"]),
                upstream(
                    "echoes",
                    "tcp",
                    dead,
                    *both["tcp"],
                    retries={"max": 2, "retry_on": ["connect-failure"]},
                ),
                upstream(
                    "web",
                    "http",
                    *both["http"],
                    retries={"max": 1, "retry_on": ["connect-failure", 503]},
                ),
                upstream(
                    "greeters",
                    "grpc",
                    *both["grpc"],
                    retries={"max": 1, "retry_on": ["connect-failure", "unavailable"]},
                ),
                upstream(
                    "slow",
                    "grpc",
                    addresses["backend"]["grpc"],
                    timeouts={"per_try": "200ms"},
                    retries={"max": 0},
                ),
                upstream("h2nowhere", "grpc", dead),
                upstream("nowhere", "tcp", dead),
                upstream(
                    "capped",
                    "tcp",
                    addresses["backend"]["tcp"],
                    circuit_breaker={"max_connections": 1},
                ),
            ]
            raw = served_agent_yaml(
                setup, ca, "frontend", outbound=upstreams, access_log={"mode": "all"}
            )
            frontend = stack.enter_context(logged_agent(setup.root, "frontend", raw))
            peers: dict[str, str | None] = {dead: None}
            for name, spiffe in (("backend", BACKEND), ("other", OTHER)):
                for address in addresses[name].values():
                    peers[address] = spiffe
            endpoints = {BACKEND: addresses["backend"], OTHER: addresses["other"]}
            yield Mesh(servers["backend"], servers["other"], frontend, dead, peers, endpoints)


async def test_an_app_that_leaves_during_the_dial_leaves_no_upstream_connection_open(
    mesh: Mesh,
) -> None:
    """Apps that close their TCP connection at once, before the upstream's mTLS dial is
    done: each gets its one line, and the agent keeps no upstream connection (nor its file
    descriptor) for any: none reaches the backend's app either."""
    frontend, backend = mesh.frontend, mesh.backend
    frontend.lines()
    pid = frontend.agent.process.pid
    before = open_fds(pid)
    backend_before = backend.agent.sample("outrider_connections_active", direction="inbound")
    count = 20
    for n in range(count):
        await left_at_once(socket.socket(), mesh.outbound("echo"), reset=n % 2 == 1)
    lines: list[dict[str, Any]] = []

    def all_logged() -> bool:
        lines.extend(outbound_lines(frontend.lines(), "echo"))
        return len(lines) >= count

    assert await eventually(all_logged, 10), f"{len(lines)} lines of {count}"
    assert len(lines) == count
    assert await eventually(lambda: open_fds(pid) <= before, 10), (open_fds(pid), before)
    assert await eventually(
        lambda: (
            backend.agent.sample("outrider_connections_active", direction="inbound")
            <= backend_before
        ),
        10,
    )
    assert not any("Traceback" in line for line in frontend.agent.log), "".join(
        frontend.agent.log[-20:]
    )


async def _h2_call(address: str, path: str) -> Any:
    host, port = address.rsplit(":", 1)
    connection = await h2client.connect(host, int(port))
    try:
        return await exchange(connection, grpc_head(path))
    finally:
        connection.close()


async def test_an_h2_call_the_agent_answered_names_its_last_try_as_an_http1_request_does(
    mesh: Mesh,
) -> None:
    """A gRPC call the backend did not answer within its try's timeout (the agent answers
    it) went out on a connection to the backend: its line names that endpoint, the try, the
    peer and the TLS. A call whose every try failed to connect names the last endpoint it tried, how
    many tries, and no peer."""
    frontend = mesh.frontend
    frontend.lines()
    answered = await _h2_call(mesh.outbound("slow"), "/demo.Greeter/Slow")
    assert answered.grpc_status == Code.DEADLINE_EXCEEDED, answered
    (reset,) = outbound_lines(
        await frontend.arrived(lambda line: line["upstream"] == "slow"), "slow"
    )
    assert reset["error"] == "upstream_timeout", reset
    assert (reset["endpoint"], reset["tries"]) == (mesh.peers_at(BACKEND, "grpc"), 1), reset
    assert reset["peer_id"] == BACKEND and reset["tls_version"] == "TLSv1.3", reset
    assert reset["cipher"], reset

    answered = await _h2_call(mesh.outbound("h2nowhere"), "/demo.Greeter/SayHello")
    assert answered.grpc_status == Code.UNAVAILABLE
    (failed,) = outbound_lines(
        await frontend.arrived(lambda line: line["upstream"] == "h2nowhere"), "h2nowhere"
    )
    assert (failed["error"], failed["endpoint"]) == ("upstream_connect_failure", mesh.dead)
    assert failed["tries"] is not None and failed["tries"] >= 1, failed
    assert failed["peer_id"] is failed["tls_version"] is failed["cipher"] is None


async def test_no_line_names_a_peer_other_than_its_endpoints_under_retries_and_pooling(
    mesh: Mesh,
) -> None:
    """Concurrent HTTP/1.1 requests on pooled keep-alive connections to both servers (the
    backend answers /flaky 503: retried on the other), gRPC calls multiplexed on h2
    connections to both (the backend answers /Flaky UNAVAILABLE: retried), TCP connections
    whose first try may be an endpoint nobody serves: every line names exactly the peer
    that serves its endpoint (none for the dead one), with TLS fields iff a peer."""
    frontend = mesh.frontend
    frontend.lines()
    rounds = 6

    async def http_client() -> list[int]:
        statuses = []
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(timeout=timeout) as client:
            for n in range(rounds):
                path = "/flaky" if n % 2 else "/plain"
                async with client.get(f"http://{mesh.outbound('web')}{path}") as response:
                    await response.read()
                    statuses.append(response.status)
        return statuses

    async def grpc_client() -> list[int | None]:
        host, port = mesh.outbound("greeters").rsplit(":", 1)
        connection = await h2client.connect(host, int(port))
        try:
            calls = [
                exchange(connection, grpc_head("/demo.Greeter/Flaky" if n % 2 else "/x/Hi"))
                for n in range(rounds)
            ]
            return [answered.grpc_status for answered in await asyncio.gather(*calls)]
        finally:
            connection.close()

    async def tcp_client() -> list[bytes]:
        return [await relayed(mesh.outbound("echoes"), b"ping %d" % n) for n in range(rounds)]

    results = await asyncio.wait_for(
        asyncio.gather(*(http_client() for _ in range(3)), grpc_client(), tcp_client()), 30
    )
    assert all(status == 200 for statuses in results[:3] for status in statuses)
    assert results[3] == [Code.OK] * rounds
    assert results[4] == [b"ping %d" % n for n in range(rounds)]
    expected = {"web": 3 * rounds, "greeters": rounds, "echoes": rounds}
    lines: list[dict[str, Any]] = []

    def all_logged() -> bool:
        lines.extend(line for line in frontend.lines() if line["upstream"] in expected)
        return len(lines) >= sum(expected.values())

    assert await eventually(all_logged, 10), lines
    for name, count in expected.items():
        assert len(outbound_lines(lines, name)) == count, name
    retried = 0
    for line in lines:
        if line["endpoint"] is None:
            print("NOEP", line)
            continue
        peer = mesh.peers[line["endpoint"]]
        assert line["peer_id"] == peer, line
        assert (line["tls_version"] == "TLSv1.3") is (peer is not None), line
        assert bool(line["cipher"]) is (peer is not None), line
        retried += line["tries"] > 1
    assert retried  # some request or connection was retried elsewhere


async def _short_connection(mesh: Mesh, n: int) -> str:
    """One of several ways an app's TCP connection goes, by `n`; the upstream it used."""
    way = n % 5
    if way == 0:  # echoed whole, closed by the app's EOF
        assert await relayed(mesh.outbound("echo"), b"x" * (n % 700 + 1)) == b"x" * (n % 700 + 1)
        return "echo"
    if way == 1:  # retried past the endpoint nobody serves, maybe
        assert await relayed(mesh.outbound("echoes"), b"hello") == b"hello"
        return "echoes"
    if way == 2:  # left at once (FIN or RST)
        await left_at_once(socket.socket(), mesh.outbound("echo"), reset=n % 2 == 0)
        return "echo"
    if way == 3:  # bytes, then a half-close without waiting for anything
        host, port = mesh.outbound("echo").rsplit(":", 1)
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"half")
        writer.write_eof()
        with suppress(ConnectionError):
            await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return "echo"
    host, port = mesh.outbound("nowhere").rsplit(":", 1)  # reaches no endpoint
    reader, writer = await asyncio.open_connection(host, int(port))
    with suppress(ConnectionError):
        await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return "nowhere"


async def test_each_of_many_short_connections_gets_exactly_one_line_and_leaves_nothing(
    mesh: Mesh,
) -> None:
    """300 short TCP connections, 20 at a time, in every way an app ends one (echoed, retried,
    left at once by FIN or RST, half-closed, reaching no endpoint): exactly one line each,
    and the agent's open connections and descriptors back where they were."""
    frontend = mesh.frontend
    frontend.lines()
    pid = frontend.agent.process.pid
    fds_before = open_fds(pid)
    active_before = frontend.agent.sample("outrider_connections_active", direction="outbound")
    count, at_once = 300, 20
    used: dict[str, int] = {}
    for start in range(0, count, at_once):
        names = await asyncio.wait_for(
            asyncio.gather(*(_short_connection(mesh, n) for n in range(start, start + at_once))),
            30,
        )
        for name in names:
            used[name] = used.get(name, 0) + 1
    lines: list[dict[str, Any]] = []

    def all_logged() -> bool:
        lines.extend(line for line in frontend.lines() if line["upstream"] in used)
        return len(lines) >= count

    assert await eventually(all_logged, 15), (len(lines), used)
    await asyncio.sleep(0.2)  # (a line more than one per connection would show now)
    lines.extend(line for line in frontend.lines() if line["upstream"] in used)
    assert {name: len(outbound_lines(lines, name)) for name in used} == used
    for line in lines:  # an app gone before its dial was done (or began) reached no peer
        peer = mesh.peers[line["endpoint"]] if line["endpoint"] is not None else None
        assert line["peer_id"] == (peer if line["bytes_in"] else line["peer_id"]), line
        assert line["peer_id"] in (None, peer), line
    nowhere = outbound_lines(lines, "nowhere")
    assert {line["error"] for line in nowhere} == {"upstream_connect_failure"}
    assert await eventually(
        lambda: (
            frontend.agent.sample("outrider_connections_active", direction="outbound")
            <= active_before
        ),
        10,
    )
    assert await eventually(lambda: open_fds(pid) <= fds_before, 10), (open_fds(pid), fds_before)
    assert not any("Traceback" in line for line in frontend.agent.log)


async def test_connections_closed_by_the_idle_timeout_and_by_a_drain_each_get_their_line(
    mesh: Mesh, setup: CaSetup, ca: CaProcess
) -> None:
    """An idle TCP connection the agent aborts, and two still open when it is told to stop
    (SIGTERM: drained, then aborted at the drain timeout): each has its line, with its bytes,
    on the agent's stdout before it exits."""
    echo = mesh.endpoints[BACKEND]["tcp"]
    outbound = [
        {
            "name": "echo",
            "listen": "127.0.0.1:0",
            "protocol": "tcp",
            "endpoints": [echo],
            "server_ids": [BACKEND],
        }
    ]
    raw = served_agent_yaml(  # (a name of its own: an agent reloads its file when it changes)
        setup,
        ca,
        "stopping",
        outbound=outbound,
        access_log={"mode": "all"},
        limits={"idle_timeout": "1s", "drain_timeout": "1s"},
    )
    with logged_agent(setup.root, "stopping", raw) as frontend:
        listen = frontend.agent.bound["outbound[echo]"]
        opened = []
        for n in range(3):
            reader, writer = await asyncio.open_connection(*listen.rsplit(":", 1))
            writer.write(b"%d" % n * (n + 1))
            assert await asyncio.wait_for(reader.readexactly(n + 1), 5) == b"%d" % n * (n + 1)
            opened.append(writer)
        # The idle timeout (1-2 s) closes all three: keep two busy meanwhile.
        for _ in range(10):
            for writer in opened[1:]:
                writer.write(b"k")
            await asyncio.sleep(0.15)
        (idle,) = outbound_lines(
            await frontend.arrived(lambda line: line["bytes_in"] == 1, 5), "echo"
        )
        assert idle["peer_id"] == BACKEND and idle["bytes_out"] == 1
        assert frontend.agent.stop() == 0
        lines = outbound_lines(frontend.lines(), "echo")
        assert sorted(line["bytes_in"] for line in lines) == [2 + 10, 3 + 10], lines
        assert all(line["peer_id"] == BACKEND for line in lines)
        for writer in opened:
            writer.close()


SECRET = "s3cret-value"


async def _plain_request(address: str, raw: bytes) -> bytes:
    """`raw` sent on an app's plain connection to an HTTP outbound; what came back (once
    the response's head arrived, or the agent closed)."""
    reader, writer = await asyncio.open_connection(*address.rsplit(":", 1))
    try:
        writer.write(raw)
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    except (asyncio.IncompleteReadError, ConnectionError):
        return b""
    finally:
        writer.close()


async def test_outbound_lines_hold_no_secret_and_stay_bounded_whatever_the_app_sends(
    mesh: Mesh,
) -> None:
    """What an app chooses (an absolute-form target with userinfo, a query and path
    parameters with secrets, headers, a 6,000-byte path, an h2 path and method of any
    size) never puts a secret in an outbound line, nor one longer than a few KB."""
    frontend = mesh.frontend
    frontend.lines()
    long_path = "/" + "%ff" * 2000
    targets = [
        f"http://user:{SECRET}@backend/p;jsessionid={SECRET}?token={SECRET}",
        f"/cart;jsessionid={SECRET}/x?code={SECRET}&a=1",
        long_path,
    ]
    for target in targets:
        raw = (
            f"GET {target} HTTP/1.1\r\nHost: {SECRET}.example\r\n"
            f"Authorization: Bearer {SECRET}\r\nCookie: sid={SECRET}\r\n"
            f"x-request-id: {SECRET}/not-a-token\r\nConnection: close\r\n\r\n"
        ).encode()
        answered = await _plain_request(mesh.outbound("web"), raw)
        # (an absolute-form target with userinfo may be refused: 400, said why)
        assert answered.startswith((b"HTTP/1.1 200", b"HTTP/1.1 400")), (target, answered)
    host, port = mesh.outbound("greeters").rsplit(":", 1)
    connection = await h2client.connect(host, int(port))
    try:
        head = grpc_head(f"/x/y;session={SECRET}?" + "q" * 9000, authorization=SECRET)
        head[0] = (b":method", b"M" * 3000)
        await exchange(connection, head)
    finally:
        connection.close()
    lines: list[dict[str, Any]] = []

    def all_logged() -> bool:
        lines.extend(frontend.lines())
        return len(outbound_lines(lines, "web")) >= 2 and bool(outbound_lines(lines, "greeters"))

    assert await eventually(all_logged, 10), lines
    await asyncio.sleep(0.1)  # (the lines of every request are out by now)
    lines.extend(frontend.lines())
    for line in lines:
        text = json.dumps(line, separators=(",", ":"))
        assert SECRET not in text, text
        assert len(text) < 16_000, len(text)
        assert line["request_id"] != f"{SECRET}/not-a-token"
    (greeter,) = outbound_lines(lines, "greeters")
    assert len(greeter["method"]) <= 32 and "?" not in greeter["path"]


async def test_a_tcp_connection_past_the_circuit_breaker_is_logged_with_why(mesh: Mesh) -> None:
    """The upstream's circuit breaker allows one connection: a second, refused while the
    first is open, reached no endpoint and gets its line saying why, as an HTTP request
    the breaker refuses does; the first gets its own when it ends."""
    frontend = mesh.frontend
    frontend.lines()
    host, port = mesh.outbound("capped").rsplit(":", 1)
    first = await asyncio.open_connection(host, int(port))
    first[1].write(b"one")
    assert await asyncio.wait_for(first[0].readexactly(3), 5) == b"one"
    reader, writer = await asyncio.open_connection(host, int(port))
    with suppress(ConnectionError):
        assert await asyncio.wait_for(reader.read(), 5) == b""  # refused: closed at once
    writer.close()
    (refused,) = outbound_lines(
        await frontend.arrived(lambda line: line["upstream"] == "capped"), "capped"
    )
    assert refused["error"] == "overflow_max_connections", refused
    assert refused["peer_id"] is refused["endpoint"] is refused["tls_version"] is None
    assert refused["bytes_in"] == refused["bytes_out"] == 0
    assert await echoed(first, b"two") == b"two"
    (ended,) = outbound_lines(
        await frontend.arrived(lambda line: line["upstream"] == "capped"), "capped"
    )
    assert (ended["error"], ended["peer_id"], ended["bytes_in"]) == (None, BACKEND, 6)


async def test_a_pooled_connection_to_a_peer_a_reload_no_longer_trusts_carries_no_request(
    mesh: Mesh, setup: CaSetup, ca: CaProcess
) -> None:
    """A reload takes the backend out of two upstreams' server_ids (only `other` now): a
    keep-alive app's next request (HTTP/1.1) or call (gRPC, on its open h2c connection)
    must not go out on the connection pooled to the backend before, as no new connection
    to it would be made; no line names the backend after."""
    outbound = [
        {
            "name": name,
            "listen": f"127.0.0.1:{free_port()}",
            "protocol": kind,
            "endpoints": [mesh.endpoints[BACKEND][kind]],
            "server_ids": [BACKEND],
        }
        for name, kind in (("web", "http"), ("greeter", "grpc"))
    ]
    raw = served_agent_yaml(setup, ca, "reloading", outbound=outbound, access_log={"mode": "all"})
    with logged_agent(setup.root, "reloading", raw) as frontend:
        url = f"http://{frontend.agent.bound['outbound[web]']}/api"
        host, port = frontend.agent.bound["outbound[greeter]"].rsplit(":", 1)
        timeout = aiohttp.ClientTimeout(total=10)
        h2 = await h2client.connect(host, int(port))
        async with aiohttp.ClientSession(timeout=timeout) as client:
            async with client.get(url) as response:
                assert response.status == 200
            assert (await exchange(h2, grpc_head())).grpc_status == Code.OK
            lines = await frontend.arrived(lambda line: line["upstream"] == "greeter")
            assert [line["peer_id"] for line in lines] == [BACKEND, BACKEND]
            for upstream in raw["outbound"]:
                upstream["server_ids"] = [OTHER]
            (setup.root / "reloading.yaml").write_text(yaml.safe_dump(raw))
            frontend.agent.process.send_signal(signal.SIGHUP)
            assert await eventually(
                lambda: (
                    frontend.agent.sample(
                        "outrider_config_reloads_total", kind="agent", result="ok"
                    )
                    == 1
                ),
                10,
            ), "".join(frontend.agent.log[-10:])
            async with client.get(url) as response:
                assert response.status == 503, await response.text()
            assert (await exchange(h2, grpc_head())).grpc_status == Code.UNAVAILABLE
            lines = await frontend.arrived(lambda line: line["upstream"] == "greeter")
            assert len(lines) == 2
            for after in lines:
                assert after["peer_id"] is None and after["error"] is not None, after
        h2.close()
