"""The agent's HTTP servers: admin on loopback, status on the pod network.

admin (`admin:`, 127.0.0.1:15000) serves every route: /ready, /healthz,
/metrics, /config_dump and /certs. The last two show the mesh's topology, the
allow-lists (who may call this pod) and the SVID's chain, so they belong on
loopback, where `kubectl port-forward` still reaches them. status (`status:`,
the injector puts it on 0.0.0.0:15020) serves only what the kubelet's probes
and Prometheus need: /ready, /healthz and /metrics. Istio splits its sidecar
the same way (Envoy's admin on localhost; health and telemetry on 15021,
15020 and 15090). Both serve the app's own probes (`probes:`, which the
injector writes when capture is on) at /app-health/<container>/<kind>, and
only the paths listed there: the kubelet asks the status port, and an
operator can try one on the admin port through `kubectl port-forward`.
Those answers take a probe of the app, so they are asynchronous; the
answers on one connection still go out in the order of its requests.

Nothing here can change the agent, and nothing shows key material: the config
holds none, and /certs shows certificates only.

HTTP/1.1 is parsed by llhttp (httptools), the parser aiohttp and uvicorn use;
aiohttp itself would add 12 MB to every pod's sidecar for five GET routes.
Only GET and HEAD are served, and a client may keep its connection alive.
Nobody authenticates a caller here, so each server holds little for one:
at most limits.admin_max_connections connections, past which the oldest goes
(a probe's request takes a millisecond: a flood of idle connections cannot
keep the kubelet out, as it could if the newest were refused); a request head
of 16 KiB, finished within limits.admin_request_timeout of its first byte;
limits.admin_idle_timeout between requests; and a client that stops reading
its responses is closed, not buffered for.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timedelta
from http import HTTPStatus
from pathlib import Path
from typing import Any, Protocol, cast

import httptools
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from agent.adapters.metrics import AgentMetrics
from agent.adapters.ports import cannot_listen
from agent.adapters.probes import LOOPBACK, MAX_IN_FLIGHT, AppAddress, Prober
from agent.config import AgentConfig, Limits
from agent.core.svid import Svid
from agent.core.upstream import Endpoint
from identity import SpiffeId, TrustDomain
from identity.capture import handoff_source, pod_address
from identity.cert import Cert
from identity.configfile import Listen
from identity.probes import APP_HEALTH, AppProbe

log = logging.getLogger("outrider.agent")

#: A request head larger than this is refused (431) and the connection closed.
MAX_REQUEST_BYTES = 16 * 1024
#: Responses a client has left unread, past which it is closed instead of answered.
MAX_UNREAD_BYTES = 256 * 1024
#: What the status server serves: the kubelet's probes and Prometheus (and /app-health/...).
STATUS_PATHS = ("/ready", "/healthz", "/metrics")
#: Answers one connection may have waiting behind an app probe still in flight.
MAX_QUEUED_ANSWERS = 64

Response = tuple[int, str, bytes]  # status, content type, body
#: An answer now, or one being made (a probe of the app; /metrics of several workers).
Handler = Callable[[], "Response | asyncio.Task[Response]"]
TEXT, JSON = "text/plain; charset=utf-8", "application/json"


class AgentView(Protocol):
    config: AgentConfig
    metrics: AgentMetrics
    bound: dict[str, str]

    @property
    def ready(self) -> bool: ...

    @property
    def svid(self) -> Svid | None: ...

    @property
    def next_renewal(self) -> datetime | None: ...

    @property
    def control_state(self) -> dict[str, Any] | None: ...


def routes(
    agent: AgentView, scrape: Callable[[], Awaitable[bytes]] | None = None
) -> dict[str, Handler]:
    """Path -> handler; each handler answers from the agent's state at that moment.
    `scrape`: what /metrics serves, when not this process's registry alone (`workers:`)."""

    def ready() -> Response:
        return (200, TEXT, b"ready\n") if agent.ready else (503, TEXT, b"not ready\n")

    def healthz() -> Response:
        return 200, TEXT, b"ok\n"

    def metrics() -> Response | asyncio.Task[Response]:
        if scrape is not None:
            return _task(_exposition(scrape))
        return 200, CONTENT_TYPE_LATEST, generate_latest(agent.metrics.registry)

    def config_dump() -> Response:
        dump = {"config": plain(agent.config), "bound": agent.bound}
        return _json({**dump, "control_plane": agent.control_state})

    def certs() -> Response:
        svid = agent.svid
        if svid is None:
            return _json({"svid": None}, 503)
        renewal = agent.next_renewal
        return _json(
            {
                "spiffe_id": str(svid.spiffe_id),
                "serial": svid.serial,
                "not_before": svid.not_before.isoformat(),
                "not_after": svid.not_after.isoformat(),
                "next_renewal": renewal.isoformat() if renewal else None,
                "chain": [describe(cert) for cert in svid.chain],
                "bundle": {
                    "trust_domain": str(svid.bundle.trust_domain),
                    "roots": [describe(root) for root in svid.bundle.roots],
                },
            }
        )

    return {
        "/ready": ready,
        "/healthz": healthz,
        "/metrics": metrics,
        "/config_dump": config_dump,
        "/certs": certs,
    }


async def _exposition(scrape: Callable[[], Awaitable[bytes]]) -> Response:
    try:
        return 200, CONTENT_TYPE_LATEST, await scrape()
    except Exception:  # a bug of ours: a 500 the scraper records, not a hung connection
        log.exception("/metrics failed")
        return 500, TEXT, b"the agent could not collect its metrics\n"


def _json(value: object, status: int = 200) -> Response:
    return status, JSON, json.dumps(value, indent=2).encode()


class Servers:
    """The admin server and, when configured, the status server."""

    def __init__(self) -> None:
        self.servers: dict[str, Server] = {}

    @property
    def bound(self) -> dict[str, str]:
        """Name ("admin", "status") -> the address it listens on."""
        return {name: server.address for name, server in self.servers.items()}

    def close(self) -> None:
        for server in self.servers.values():
            server.close()


async def serve(agent: AgentView, scrape: Callable[[], Awaitable[bytes]] | None = None) -> Servers:
    """Start the admin server, and the status server if the config asks for one."""
    handlers = routes(agent, scrape)
    # One bound on probes in flight at each address (`app_address`), for both servers. Each
    # probe runs once at a time at an address, so the pod's own probes are all that can
    # be in flight there: the kubelet runs each on its own clock and, with slow apps,
    # every one of them may overlap the others. As of the config now: a reload may bring
    # probes.
    prober = Prober(lambda: max(MAX_IN_FLIGHT, len(agent.config.probes)))
    servers = Servers()
    if not _loopback(agent.config.admin.host):
        log.warning(
            "admin %s is not loopback: /config_dump and /certs are open to the network; "
            "give the kubelet and Prometheus `status:` instead",
            agent.config.admin,
        )
    try:
        servers.servers["admin"] = await Server.start(
            agent, "admin", handlers, agent.config.admin, prober
        )
        if agent.config.status is not None:
            status = {path: handlers[path] for path in STATUS_PATHS}
            servers.servers["status"] = await Server.start(
                agent, "status", status, agent.config.status, prober
            )
    except OSError:
        servers.close()
        raise
    prober.own_ports = frozenset(server.port for server in servers.servers.values())
    return servers


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class Server:
    """One HTTP listener, its open connections (oldest first) and its limits."""

    def __init__(
        self, agent: AgentView, name: str, handlers: dict[str, Handler], prober: Prober
    ) -> None:
        self.agent = agent
        self.name = name
        self.handlers = handlers
        self.prober = prober
        self.connections: dict[AdminProtocol, None] = {}
        self.address = ""
        self.port = 0
        self._server: asyncio.Server | None = None

    @classmethod
    async def start(
        cls,
        agent: AgentView,
        name: str,
        handlers: dict[str, Handler],
        listen: Listen,
        prober: Prober,
    ) -> Server:
        server = cls(agent, name, handlers, prober)
        loop = asyncio.get_running_loop()
        try:
            server._server = await loop.create_server(server.accepted, listen.host, listen.port)
        except OSError as exc:
            raise cannot_listen(exc, str(listen)) from None
        host, port = server._server.sockets[0].getsockname()[:2]
        server.address, server.port = str(Listen(host, port)), port
        log.info("%s listening on %s", name, server.address)
        return server

    @property
    def limits(self) -> Limits:
        return self.agent.config.limits  # as of now: a reload may have changed them

    def accepted(self) -> AdminProtocol:
        if len(self.connections) >= self.limits.admin_max_connections:
            oldest = next(iter(self.connections))
            self.refused("max_connections")
            oldest.abort()
        return AdminProtocol(self)

    def app_probe(self, path: str) -> AppProbe | None:
        """The app's probe served at `path`, as of the config now; None: not one of them."""
        if not path.startswith(APP_HEALTH):
            return None
        return next((p for p in self.agent.config.probes if p.path == path), None)

    def app_address(self, transport: asyncio.BaseTransport | None) -> AppAddress:
        """Where the app's probes go for a request on `transport`: on a captured pod, the
        pod IP the kubelet called (the status port's), from the hand-off source, as the
        kubelet's own probe reaches the app there; else, and for a caller at any other
        address (loopback, link-local), 127.0.0.1."""
        local = transport.get_extra_info("sockname") if transport is not None else None
        if self.agent.config.capture is None or not local:
            return LOOPBACK
        host = pod_address(local[0])
        return LOOPBACK if host is None else AppAddress(host, handoff_source(host))

    async def app_health(self, probe: AppProbe, address: AppAddress) -> Response:
        try:
            outcome = await self.prober.check(probe, address)
        except Exception:  # a bug of ours fails the probe; it must not hang the connection
            log.exception("probe %s failed", probe.path)
            return 503, TEXT, b"the agent could not perform the probe\n"
        return (200 if outcome.passed else 503), TEXT, f"{outcome.reason}\n".encode()

    def refused(self, reason: str) -> None:
        self.agent.metrics.connections_refused.labels(self.name, reason).inc()

    def close(self) -> None:
        """Stop accepting and close what is open."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.abort()


class AdminProtocol(asyncio.Protocol):
    """One connection: parse requests with llhttp, answer each from the server's handlers.

    One timer at a time: the idle timeout while no request has begun, the
    request timeout from a request's first byte to its end.
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.received = 0
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        #: Answers in request order, each a response or an app probe's task, whether to
        #: keep the connection after it, and whether it answers a HEAD.
        self.answers: collections.deque[tuple[Response | asyncio.Task[Response], bool, bool]]
        self.answers = collections.deque()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections[self] = None
        self._wait(self.server.limits.admin_idle_timeout, "")

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.pop(self, None)
        if self.timer is not None:
            self.timer.cancel()
        self.transport = self.timer = None  # nothing of a closed connection waits for gc
        for answer, _, _ in self.answers:
            if isinstance(answer, asyncio.Task):
                answer.cancel()  # the probe stops, and its place in flight is free
        self.answers.clear()

    def pause_writing(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()  # no more requests until the answers are read

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.received > MAX_REQUEST_BYTES:
            return self._respond((431, TEXT, b"request too large\n"), keep_alive=False)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._respond((400, TEXT, b"bad request\n"), keep_alive=False)

    def on_message_begin(self) -> None:
        # A request's first byte, wherever it falls: one that begins in the same read
        # as the end of the one before gets this timeout too, not the idle timeout.
        self._wait(self.server.limits.admin_request_timeout, "request_timeout")

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        path = httptools.parse_url(self.url).path.decode("ascii", "replace")
        handler = self.server.handlers.get(path)
        probe = self.server.app_probe(path) if handler is None else None
        answer: Response | asyncio.Task[Response]
        if handler is None and probe is None:
            answer = (404, TEXT, b"not found\n")
        elif method not in (b"GET", b"HEAD"):
            answer = (405, TEXT, b"method not allowed\n")
        elif probe is not None:
            answer = _task(self.server.app_health(probe, self.server.app_address(self.transport)))
            answer.add_done_callback(self._answered)
        else:
            assert handler is not None
            answer = handler()
            if isinstance(answer, asyncio.Task):
                answer.add_done_callback(self._answered)
        self.url, self.received = b"", 0
        self._wait(self.server.limits.admin_idle_timeout, "")
        if len(self.answers) >= MAX_QUEUED_ANSWERS:
            self.server.refused("unread_responses")  # pipelining behind a slow probe
            return self.abort()
        self.answers.append((answer, self.parser.should_keep_alive(), method == b"HEAD"))
        self._answered()

    def _answered(self, _: object = None) -> None:
        """Send the answers that are ready, in request order."""
        while self.answers and not _pending(self.answers[0][0]):
            answer, keep_alive, head = self.answers.popleft()
            response = answer.result() if isinstance(answer, asyncio.Task) else answer
            if head:
                response = (response[0], response[1], b"")
            self._respond(response, keep_alive=keep_alive)
            if not keep_alive:
                self.answers.clear()

    def _respond(self, response: Response, *, keep_alive: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if transport.get_write_buffer_size() > MAX_UNREAD_BYTES:
            self.server.refused("unread_responses")  # pipelining, and never reading
            return self.abort()
        status, content_type, body = response
        head = (
            f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
        )
        transport.write(head.encode() + body)
        if not keep_alive:
            transport.close()

    def _wait(self, timeout: timedelta, reason: str) -> None:
        """Close the connection `timeout` from now, counting `reason` if it has one."""
        if self.timer is not None:
            self.timer.cancel()
        loop = asyncio.get_running_loop()
        self.timer = loop.call_later(timeout.total_seconds(), self._expired, reason)

    def _expired(self, reason: str) -> None:
        if reason:
            self.server.refused(reason)
        self.abort()

    def abort(self) -> None:
        self.server.connections.pop(self, None)
        if self.transport is not None:
            self.transport.abort()


def _task(coroutine: Coroutine[None, None, Response]) -> asyncio.Task[Response]:
    return asyncio.get_running_loop().create_task(coroutine)


def _pending(answer: Response | asyncio.Task[Response]) -> bool:
    return isinstance(answer, asyncio.Task) and not answer.done()


def describe(cert: Cert) -> dict[str, str]:
    return {
        "subject": cert.subject,
        "serial": f"{cert.serial:x}",
        "not_before": cert.not_before.isoformat(),
        "not_after": cert.not_after.isoformat(),
        "sha256": cert.sha256(),
    }


def plain(value: object) -> Any:
    """A config value as JSON: durations in seconds, names and paths as strings."""
    if isinstance(value, SpiffeId | TrustDomain | Listen | Endpoint | Path):
        return str(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.metadata.get("config", True)
        }
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, tuple | list):
        return [plain(item) for item in value]
    if isinstance(value, frozenset | set):
        return sorted(str(item) for item in value)
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)
