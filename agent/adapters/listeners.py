"""Inbound and outbound listeners: accept, handshake, check the peer, then relay.

Inbound: mTLS in, the peer's SVID checked and authorized, plain TCP to the
app. Outbound: plain TCP in from the app, mTLS out to one of the upstream's
endpoints, whose SPIFFE ID must be one the upstream expects. The TLS context
is looked up per connection, so a rotated SVID applies to the next
connection while open ones keep theirs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Generic, Literal, TypeVar

from agent.adapters.http import HttpExchange, xfcc
from agent.adapters.metrics import AgentMetrics
from agent.adapters.relay import Relay
from agent.adapters.tls import Contexts, peer_id, refusal_reason
from agent.config import Inbound, Limits, Outbound
from agent.core.policy import Decision, PolicySet, Request
from agent.core.upstream import Endpoint, StaticUpstream
from identity import SpiffeId, SvidError
from identity.configfile import Listen

log = logging.getLogger("outrider.agent")

INBOUND, OUTBOUND = "inbound", "outbound"
ConfigT = TypeVar("ConfigT", Inbound, Outbound)


@dataclass
class Runtime:
    """What every connection (and every L7 request) reads when it starts.

    `policies` is replaced whole on reload: a request is decided by the set in
    place when it arrives.
    """

    limits: Limits
    contexts: Contexts
    metrics: AgentMetrics
    now: Callable[[], datetime]
    spiffe_id: SpiffeId
    policies: PolicySet = field(default_factory=PolicySet)


class Connections:
    """Every relay from accept to close, for the connection cap and for draining."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._open: dict[Relay, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics = metrics
        self.accepted = 0  # connections ever added
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, relay: Relay, direction: str, setup: asyncio.Task[None]) -> None:
        self._open[relay] = direction
        self.accepted += 1
        self._empty.clear()
        self._tasks.add(setup)
        setup.add_done_callback(self._tasks.discard)
        self._metrics.connections_active.labels(direction).inc()
        self._metrics.connections.labels(direction, "true").inc()

    def closed(self, relay: Relay) -> None:
        direction = self._open.pop(relay, None)
        if direction is not None:
            self._metrics.connections_active.labels(direction).dec()
        if not self._open:
            self._empty.set()

    async def drain(self, seconds: float) -> int:
        """Wait for open connections to finish; abort what is left. Returns how many."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), seconds)
        left = list(self._open)
        for relay in left:
            relay.abort()
        for task in list(self._tasks):
            task.cancel()
        return len(left)


class Listener(Generic[ConfigT]):
    direction: str
    config: ConfigT

    def __init__(self, config: ConfigT, runtime: Runtime, connections: Connections) -> None:
        self.runtime = runtime
        self.connections = connections
        self.configure(config)
        self.address = ""
        self._socket: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None

    def configure(self, config: ConfigT) -> None:
        """Connections accepted from now on follow `config`."""
        self.config = config

    async def start(self, listen: Listen) -> None:
        # Our own accept loop rather than loop.create_server: connect_accepted_socket
        # takes a TLS context per connection (the SVID rotates) and raises the
        # handshake's error, so every refusal is counted with its reason.
        try:
            family = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0][0]
            self._socket = socket.create_server(
                (listen.host, listen.port), family=family, backlog=1024
            )
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {listen}: {exc.strerror}") from None
        self._socket.setblocking(False)
        host, port = self._socket.getsockname()[:2]
        self.address = str(Listen(host, port))
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_loop())
        log.info("%s listening on %s", self.direction, self.address)

    def close(self) -> None:
        """Stop accepting; open connections go on."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            self._acceptor = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._socket is not None
        listening = self._socket
        while True:
            try:
                sock, _ = await loop.sock_accept(listening)
            except OSError as exc:  # EMFILE and friends: back off, keep the listener
                log.warning("%s %s: accept failed: %s", self.direction, self.address, exc)
                await asyncio.sleep(0.1)
                continue
            if len(self.connections) >= self.runtime.limits.max_connections:
                self.runtime.metrics.connections_refused.labels(
                    self.direction, "max_connections"
                ).inc()
                sock.close()
                continue
            relay = Relay(self.runtime.limits.idle_timeout.total_seconds(), self.connections.closed)
            task = loop.create_task(self._setup(relay, sock))
            self.connections.add(relay, self.direction, task)

    async def _setup(self, relay: Relay, sock: socket.socket) -> None:
        raise NotImplementedError

    def _peer(
        self, ssl_object: ssl.SSLObject, usage: Literal["client", "server"]
    ) -> SpiffeId | None:
        """The peer's SPIFFE ID, or None (counted) when its certificate is not an SVID."""
        try:
            return peer_id(ssl_object, usage, self.runtime.now())
        except SvidError as exc:
            self._refused(exc.reason)
            return None

    def _refused(self, reason: str) -> None:
        self.runtime.metrics.handshakes.labels(self.direction, "refused", reason, "", "").inc()

    def _verified(self, ssl_object: ssl.SSLObject, peer: SpiffeId, started: float) -> None:
        metrics = self.runtime.metrics
        version = ssl_object.version() or ""
        cipher = (ssl_object.cipher() or ("",))[0]
        metrics.handshakes.labels(self.direction, "ok", "", version, cipher).inc()
        metrics.handshake_duration.labels(self.direction).observe(
            asyncio.get_running_loop().time() - started
        )
        metrics.peer_connections.labels(self.direction, str(peer), version).inc()


class InboundListener(Listener[Inbound]):
    direction = INBOUND

    async def _setup(self, relay: Relay, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        contexts, limits = self.runtime.contexts, self.runtime.limits
        # An HTTP port offers no h2 in ALPN, so every request on it is parsed: h2 relayed
        # at L4 would hand the app the client's own identity header and skip the paths.
        http = self.config.protocol == "http"
        context = contexts.http_server if http else contexts.server
        assert context is not None, "listeners start after the first SVID"
        try:
            tls, _ = await loop.connect_accepted_socket(
                lambda: relay.down,
                sock,
                ssl=context,
                ssl_handshake_timeout=limits.handshake_timeout.total_seconds(),
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            self._refused(refusal_reason(exc))
            relay.close()
            return
        tls.pause_reading()
        config = self.config  # as of now: a reload during the handshake may have narrowed `allow`
        ssl_object = tls.get_extra_info("ssl_object")
        peer = self._peer(ssl_object, "client")
        if peer is None:
            relay.abort()
            return
        if config.allow.decide(peer) == "deny":
            log.info("inbound %s: refused %s: not on the allow-list", config.listen, peer)
            self._refused("not_allowed")
            relay.abort()
            return
        self._verified(ssl_object, peer, started)
        app = config.app
        if not http and not self._authorize(Request(peer, app.port), config).allowed:
            self.runtime.metrics.connections_refused.labels(INBOUND, "policy_denied").inc()
            relay.abort()
            return
        try:
            up = relay.new_upstream()
            async with asyncio.timeout(limits.connect_timeout.total_seconds()):
                await loop.create_connection(lambda: up, app.host, app.port)
        except (OSError, TimeoutError) as exc:
            log.warning("inbound %s: app %s unreachable: %s", config.listen, app, exc)
            self.runtime.metrics.connections_refused.labels(INBOUND, "app_unreachable").inc()
            relay.close()
            return
        if not http:
            relay.link()
            return
        requests = self.runtime.metrics.requests

        def authorize(
            method: str, path: str, host: str | None, headers: dict[str, tuple[str, ...]]
        ) -> Decision:
            return self._authorize(Request(peer, app.port, method, path, host, headers), config)

        def answered(code: int) -> None:
            requests.labels(INBOUND, str(peer), str(code)).inc()

        assert relay.down.transport is not None and up.transport is not None
        identity = xfcc(str(self.runtime.spiffe_id), str(peer))
        exchange = HttpExchange(relay.down.transport, up.transport, authorize, identity, answered)
        relay.link(exchange.from_client, exchange.from_app)

    def _authorize(self, request: Request, config: Inbound) -> Decision:
        """The policy's decision on a connection (L4) or a request (L7), counted."""
        decision = self.runtime.policies.decide(request, config.allow.trusted_domains)
        counter = self.runtime.metrics.authz_decisions
        counter.labels(
            "allow" if decision.allowed else "deny", decision.policy, decision.rule
        ).inc()
        for record in decision.records:
            counter.labels(record.kind, record.policy, record.rule).inc()
        if not decision.allowed:
            log.info(
                "inbound %s: denied %s %s %s: %s",
                config.listen,
                request.source,
                request.method or "connection",
                request.path or "",
                decision.reason,
            )
        return decision


class OutboundListener(Listener[Outbound]):
    direction = OUTBOUND

    def configure(self, config: Outbound) -> None:
        self.config = config
        self.upstream = StaticUpstream(config.endpoints)

    async def _setup(self, relay: Relay, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        transport, _ = await loop.connect_accepted_socket(lambda: relay.down, sock)
        transport.pause_reading()  # until the upstream is connected
        config, upstream = self.config, self.upstream
        tried: list[Endpoint] = []
        while (endpoint := upstream.choose(tried)) is not None:
            tried.append(endpoint)
            if await self._connect(relay, endpoint, config, started):
                relay.link()
                return
            if relay.closed:  # the app gave up meanwhile
                break
        self.runtime.metrics.connections_refused.labels(OUTBOUND, "no_endpoint").inc()
        relay.close()

    async def _connect(
        self, relay: Relay, endpoint: Endpoint, config: Outbound, started: float
    ) -> bool:
        loop = asyncio.get_running_loop()
        context, limits = self.runtime.contexts.client, self.runtime.limits
        assert context is not None, "listeners start after the first SVID"
        side = relay.new_upstream()
        deadline = limits.connect_timeout + limits.handshake_timeout
        try:
            async with asyncio.timeout(deadline.total_seconds()):
                tls, _ = await loop.create_connection(
                    lambda: side,
                    endpoint.host,
                    endpoint.port,
                    ssl=context,
                    server_hostname="",
                    ssl_handshake_timeout=limits.handshake_timeout.total_seconds(),
                )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            log.warning("outbound %s: %s failed: %s", config.name, endpoint, exc)
            if not _before_tls(exc):
                self._refused(refusal_reason(exc))
            return False
        ssl_object = tls.get_extra_info("ssl_object")
        peer = self._peer(ssl_object, "server")
        if peer is None:
            tls.abort()
            return False
        if peer not in config.server_ids:
            log.warning(
                "outbound %s: %s presented %s, not one of the upstream's IDs",
                config.name,
                endpoint,
                peer,
            )
            self._refused("wrong_server_id")
            tls.abort()
            return False
        self._verified(ssl_object, peer, started)
        return True


def _before_tls(exc: BaseException) -> bool:
    """A TCP connect that failed: no handshake took place, so none is counted."""
    return isinstance(exc, ConnectionRefusedError) or type(exc) is OSError  # unreachable
