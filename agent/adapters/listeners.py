"""Inbound and outbound listeners: accept, handshake, check the peer, then relay.

Inbound: mTLS in, the peer's SVID checked and authorized, plain TCP to the
app. Outbound: plain TCP in from the app, mTLS out to one of the upstream's
endpoints, whose SPIFFE ID must be one the upstream expects. The TLS context
is looked up per connection, so a rotated SVID applies to the next
connection while open ones keep theirs. The capture listeners
(agent/adapters/capture_listeners.py) serve captured traffic through the
same two paths (`InboundMtls`, `OutboundPath`), chosen per connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import random
import socket
import ssl
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from prometheus_client import Gauge

from agent.adapters.attempts import Droppable, LocalAnswer, Try, attempts, overflow
from agent.adapters.authorize import Authorizer
from agent.adapters.http import HttpExchange, xfcc
from agent.adapters.metrics import AgentMetrics, clock
from agent.adapters.outbound_http import OutboundHttp
from agent.adapters.ports import cannot_listen
from agent.adapters.relay import Relay
from agent.adapters.runtime import Runtime, refusal_line
from agent.adapters.tls import refusal_reason
from agent.adapters.tracing import ConnectionLine
from agent.adapters.upstreams import DialError, LiveUpstream
from agent.config import Inbound, Outbound
from agent.core import http1
from agent.core.authz import AllowList
from agent.core.captured import Captured, OutboundRoutes, looks_like_tls
from agent.core.h2limits import Limit
from agent.core.policy import Decision, Request
from agent.core.tries import DELIVERED, Outcome
from agent.core.upstream import Endpoint
from identity import SpiffeId
from identity.appprotocol import H2, L7
from identity.appprotocol import Protocol as PortProtocol
from identity.configfile import Listen

if TYPE_CHECKING:  # the h2 stack loads with its first use: see H2_INBOUND
    from agent.adapters.h2gate import H2Gate
    from agent.adapters.h2server import H2Server

log = logging.getLogger("outrider.agent")

INBOUND, OUTBOUND = "inbound", "outbound"

#: The h2 stack, which an agent none of whose ports or upstreams speaks h2 never loads
#: (0.6 MiB of its idle RSS): each is imported where the listener builds it, and
#: `agent.app.import_used` imports them as a config that uses them applies, so that its
#: first connection waits on no import.
H2_INBOUND = ("agent.adapters.inbound_h2h1", "agent.adapters.h2gate")
H2_OUTBOUND = ("agent.adapters.outbound_h2", "agent.adapters.h2gate")


@dataclass(frozen=True)
class InboundCapture:
    """What the inbound capture listener serves: every port of the pod, by original port."""

    listen: Listen
    captured: Captured
    allow: AllowList  # the agent's own trust domain, as an inbound without `allow`
    agent_ports: frozenset[int]  # the agent's own: never an app's (a loop, or a bypass)


@dataclass(frozen=True)
class OutboundCapture:
    """What the outbound capture listener serves: the app's connections, by destination."""

    listen: Listen
    routes: OutboundRoutes = field(compare=False)
    upstreams: Mapping[str, Outbound]
    captured: Captured  # what `routes` were built from: two configs differ when it does


ConfigT = TypeVar("ConfigT", Inbound, Outbound, InboundCapture, OutboundCapture)
InboundT = TypeVar("InboundT", Inbound, InboundCapture)


class Closable(Protocol):
    def finish(self) -> None:
        """Draining: close once nothing is owed (HTTP); at L4, no way to tell."""

    def abort(self) -> None: ...


class _OverLimit(asyncio.Protocol):
    """Over a limit: closed as soon as it is accepted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).abort()


class Connections:
    """Every connection from accept to close (a relay, or an HTTP outbound exchange), for the
    connection cap and for draining."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self._open: dict[Closable, str] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics = metrics
        self._active: dict[str, Gauge] = {}  # connections_active by direction, bound once
        self.accepted = 0  # connections ever added
        self._empty = asyncio.Event()
        self._empty.set()

    def __len__(self) -> int:
        return len(self._open)

    def add(self, connection: Closable, direction: str) -> None:
        """From accept: active, and under the caps; not counted as established yet
        (`Runtime.established`)."""
        self._open[connection] = direction
        self.accepted += 1
        self._empty.clear()
        self._gauge(direction).inc()

    def _gauge(self, direction: str) -> Gauge:
        gauge = self._active.get(direction)
        if gauge is None:
            gauge = self._active[direction] = self._metrics.connections_active.labels(direction)
        return gauge

    def setting_up(self, setup: asyncio.Task[None], connection: Closable | None) -> None:
        """A connection's setup (handshake, dial): cancelled if the drain times out. One
        that fails with an error nothing expected (a bug) is logged and aborts its
        `connection`, which would otherwise stay open and counted, served by nothing."""
        self._tasks.add(setup)
        setup.add_done_callback(partial(self._set_up, connection))

    def _set_up(self, connection: Closable | None, setup: asyncio.Task[None]) -> None:
        self._tasks.discard(setup)
        if setup.cancelled() or (error := setup.exception()) is None:
            return
        log.error("a connection's setup failed; closing it", exc_info=error)
        if connection is not None:
            connection.abort()

    def closed(self, connection: Closable) -> None:
        direction = self._open.pop(connection, None)
        if direction is not None:
            self._gauge(direction).dec()
        if not self._open:
            self._empty.set()

    async def drain(self, seconds: float) -> int:
        """Wait for open connections to finish; abort what is left. Returns how many."""
        for connection in list(self._open):
            connection.finish()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._empty.wait(), seconds)
        left = list(self._open)
        for connection in left:
            connection.abort()
        for task in list(self._tasks):
            task.cancel()
        return len(left)


#: At most this many connections taken each time a listening socket is readable: a burst
#: is accepted without a trip through the event loop for each (uvloop's own servers
#: accept until EAGAIN), and a flood still leaves the loop to serve between batches.
ACCEPT_BATCH = 64
#: Seconds an acceptor rests after an accept failed for want of resources (EMFILE...).
ACCEPT_BACKOFF = 0.1


class Acceptor:
    """Accepts on a listening socket in batches, each connection to `admit`.

    The socket stays registered for reading, and each time it is readable up to
    ACCEPT_BATCH connections are taken in one callback. `loop.sock_accept` in a loop
    (what this replaces) registered and unregistered the socket, made a future and
    resumed a task for every connection: bench/l4_micro.py measures the difference.
    An accept that fails for want of resources (`failed` is told) unregisters it for
    ACCEPT_BACKOFF seconds: every retry meanwhile would fail alike.
    """

    def __init__(
        self,
        listening: socket.socket,
        admit: Callable[[socket.socket], None],
        failed: Callable[[OSError], None],
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._listening = listening
        self._admit = admit
        self._failed = failed
        self._resume: asyncio.TimerHandle | None = None
        self._loop.add_reader(listening, self._ready)

    def _ready(self) -> None:
        accept, admit = self._listening.accept, self._admit
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._loop.remove_reader(self._listening)
                self._resume = self._loop.call_later(ACCEPT_BACKOFF, self._rearm)
                self._failed(exc)
                return
            sock.setblocking(False)
            admit(sock)

    def _rearm(self) -> None:
        self._resume = None
        self._loop.add_reader(self._listening, self._ready)

    def cancel(self) -> None:
        """Stop accepting (before the socket is closed)."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        else:
            self._loop.remove_reader(self._listening)


class Listener(Generic[ConfigT]):
    """A listen address and what serves it, in three steps that each undo in `close()`.

    The constructor builds (no socket, no task), `bind` takes the address,
    `start` accepts connections and starts the background work; `close` undoes
    whichever of these ran, so a reload that fails midway leaves nothing behind.
    """

    direction: str
    config: ConfigT

    def __init__(self, config: ConfigT, runtime: Runtime, connections: Connections) -> None:
        self.config = config
        self.runtime = runtime
        self.connections = connections
        self.address = ""
        self._socket: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._server: asyncio.Server | None = None

    def configure(self, config: ConfigT) -> None:
        """Connections accepted from now on follow `config`."""
        self.config = config

    def bind(self, listen: Listen) -> None:
        """Take the address; OSError (in use, not local) says which."""
        try:
            family = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0][0]
            self._socket = socket.create_server(
                (listen.host, listen.port),
                family=family,
                backlog=1024,
                reuse_port=self.runtime.reuse_port,
            )
        except OSError as exc:
            raise cannot_listen(exc, str(listen)) from None
        self._socket.setblocking(False)
        host, port = self._socket.getsockname()[:2]
        self.address = str(Listen(host, port))

    async def start(self) -> None:
        """Accept on the bound address."""
        assert self._socket is not None, "bind() first"
        await self._serve(self._socket)
        log.info("%s listening on %s", self.direction, self.address)

    async def _serve(self, listening: socket.socket) -> None:
        """Start accepting on `listening`, each connection to `_admit`."""
        # Our own accept rather than loop.create_server: each connection is looked at
        # before anything serves it. mTLS in: connect_accepted_socket takes a TLS
        # context per connection (the SVID rotates) and raises the handshake's error, so
        # every refusal is counted with its reason. Outbound capture: the connection's
        # original destination picks the upstream.
        self._acceptor = self._accept(listening)

    def _accept(self, listening: socket.socket) -> Acceptor:
        return Acceptor(listening, self._admit, self._accept_failed)

    def _accept_failed(self, exc: OSError) -> None:
        """EMFILE and friends: the acceptor backs off and keeps the listener. A line a
        while, not one per retry: out of file descriptors, every retry fails alike (10 a
        second a socket, for as long as it lasts)."""
        refusal_line(
            self.runtime.refusal_lines,
            log,
            (self.direction, "accept_failed", exc.errno),
            "%s %s: accept failed: %s",
            self.direction,
            self.address,
            exc,
        )

    def _admit(self, sock: socket.socket) -> None:
        """Take one accepted connection (an accepting `_serve` calls it)."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop accepting and undo what bind and start did; open connections go on."""
        self.release()

    async def retake(self) -> None:
        """Bind and accept on the address again, after `release` (a refused reload)."""
        assert self.config.listen is not None  # only what listens is a listener
        self.bind(self.config.listen)
        assert self._socket is not None
        await self._serve(self._socket)

    def release(self) -> None:
        """Stop accepting and give the address back; the rest (an upstream) stays."""
        if self._acceptor is not None:
            self._acceptor.cancel()
            self._acceptor = None
        if self._server is not None:
            self._server.close()  # and its socket
            self._server = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _refused(self, reason: str) -> None:
        self.runtime.refused(self.direction, reason)


async def _first_bytes(sock: socket.socket, deadline: float) -> bytes | None:
    """Wait until `sock` is readable (the client spoke, or left); TimeoutError at `deadline`.
    The first byte when it was there already (b"": the client left), else None: what
    `_tls_first` would read again.

    No TLS state exists for a connection until then (uvloop's SSL transport: an
    SSLObject, OpenSSL's state and buffers, ~50 KiB once used): a caller that
    connects and says nothing holds a socket and a few small objects.

    Bytes there already (a client's ClientHello comes right after its connect) are
    not waited for: a trip through the event loop, under a burst of new
    connections, waits behind every handshake the burst brought.
    """
    try:
        return sock.recv(1, socket.MSG_PEEK)  # b"" (it left): the handshake says so
    except (BlockingIOError, InterruptedError):
        pass  # nothing yet
    except OSError:
        return None  # readable, with an error the handshake meets and counts, as ever
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()

    def ready() -> None:
        if not readable.done():
            readable.set_result(None)

    loop.add_reader(sock, ready)
    try:
        async with asyncio.timeout_at(deadline):
            await readable
    finally:
        loop.remove_reader(sock)
    return None


class InboundMtls(Listener[InboundT]):
    """mTLS in, the peer checked and authorized, plain to the app: for an explicit inbound
    listener (its one app) and the inbound capture listener (the original port's app).

    `serving(destination)` says, per connection, which app and rules apply, and whether a
    plaintext client may come in (a permissive captured port).
    """

    direction = INBOUND

    def __init__(self, config: InboundT, runtime: Runtime, connections: Connections) -> None:
        # (Any: mypy checks a value-restricted TypeVar's subclass per value, and loses it)
        super().__init__(cast(Any, config), runtime, connections)
        #: Plaintext connections let in (a permissive port), by original destination: those
        #: a reconfigure makes strict are closed (weak: a closed relay leaves by itself).
        self.plaintext: weakref.WeakKeyDictionary[Relay | H2Server | H2Gate, Endpoint] = (
            weakref.WeakKeyDictionary()
        )
        #: Each connection's and request's policy decision, counted and said (compiled:
        #: it runs on every request; agent/adapters/authorize.py).
        self.authorizer = Authorizer(runtime)

    def configure(self, config: InboundT) -> None:
        """Connections accepted from now on follow `config`; plaintext ones already let in
        to a port that is no longer permissive are closed: strict means no plaintext at all,
        not none from now on."""
        self.config = config
        stopped = [
            relay
            for relay, destination in list(self.plaintext.items())
            if not relay.closed and not self.serving(destination)[1]
        ]
        for relay in stopped:
            relay.abort()
        if stopped:
            log.info(
                "%s %s: closed %d plaintext connection(s): their ports are strict now",
                self.direction,
                self.address,
                len(stopped),
            )

    def serving(self, destination: Endpoint | None) -> tuple[Inbound, bool]:
        """The inbound a connection to original `destination` is served as now, and whether
        plaintext is let through (permissive); an explicit listener has one, strict."""
        raise NotImplementedError

    def _admit(self, sock: socket.socket, destination: Endpoint | None = None) -> None:
        """Set up a new connection, or close it at once past max_connections.

        Past max_pending_handshakes, the oldest connection still before its peer is
        verified goes instead: a client's handshake takes milliseconds, so the oldest
        is the likeliest to be one that connects and waits, and a flood of those
        cannot keep every new client out (it could, were the newest refused).
        """
        runtime = self.runtime
        if len(self.connections) >= runtime.limits.max_connections:
            # Counted and said (throttled), but no access-log line: refused at accept, it
            # would name nobody, and anyone who can connect, credentials or not, could
            # write lines far faster than any denial they can cause (Envoy counts listener
            # overflow the same way, downstream_cx_overflow).
            runtime.connection_refused(INBOUND, "max_connections")
            sock.close()
            self._over_limit("max_connections", "refused a new connection")
            return
        if len(runtime.handshaking) >= runtime.limits.max_pending_handshakes:
            evict = self.runtime.not_pending(next(iter(runtime.handshaking)))
            assert evict is not None
            runtime.connection_refused(INBOUND, "max_pending_handshakes")
            evict()
            self._over_limit("max_pending_handshakes", "closed the oldest")
        relay = Relay(runtime.limits.idle_timeout.total_seconds(), self.connections.closed)
        self.connections.add(relay, INBOUND)
        setup = asyncio.get_running_loop().create_task(self._setup(relay, sock, destination))
        setup.add_done_callback(lambda _: self.runtime.not_pending(relay))
        self.connections.setting_up(setup, relay)

        def evict_it() -> None:
            setup.cancel()
            relay.abort()

        runtime.handshaking[relay] = evict_it
        runtime.metrics.pending_handshakes.inc()

    def _over_limit(self, limit: str, done: str) -> None:
        """A line a while: a flood reaches a limit once per connection."""
        refusal_line(
            self.runtime.refusal_lines,
            log,
            (INBOUND, limit),
            "%s %s: limits.%s (%d) reached: %s",
            self.direction,
            self.address,
            limit,
            getattr(self.runtime.limits, limit),
            done,
        )

    async def _setup(self, relay: Relay, sock: socket.socket, destination: Endpoint | None) -> None:
        started = clock()
        authenticated, plaintext = None, False
        try:
            spoke = await self._spoke(relay, sock)
            if spoke is None:
                return
            deadline, first = spoke
            # As of the first byte, not the accept: a port made strict while its client
            # said nothing yet is strict for that client too.
            config, permissive = self.serving(destination)
            # Each port's ALPN is what it parses (tls.Contexts): an HTTP port parses h2 as
            # well as HTTP/1.1 (never relays it at L4, which would hand the app the
            # client's own identity header and skip the paths); an h2 port takes h2 only.
            protocol = config.protocol
            plaintext = not _tls_first(sock, first)
            if plaintext and not permissive:
                self._strict_refused(relay, sock, destination)
                return
            if not plaintext:
                authenticated = await self._authenticate(
                    relay, sock, started, protocol, destination, deadline
                )
        finally:
            self.runtime.not_pending(relay)
        if plaintext:
            await self._plaintext(relay, sock, config)
            return
        if authenticated is None:
            return
        peer, config = authenticated
        l7 = config.protocol in L7
        decision = None
        if not l7:
            decision = self.authorizer.decide(Request(peer, config.app.port), config)
            if not decision.allowed:
                self.runtime.connection_refused(INBOUND, "policy_denied")
                if self.runtime.observer is not None:
                    self._tcp_denied(relay, peer, decision)
                relay.abort()
                return
        await self._to_app(relay, peer, config, decision)

    async def _plaintext(self, relay: Relay, sock: socket.socket, config: Inbound) -> None:
        """A permissive port's plaintext client: authorized as unauthenticated (per
        connection, or per request on an HTTP port), counted, relayed to the app.

        On an L7 port (HTTP/1.1, or h2c on an http2/grpc port) every request is parsed
        as on the mTLS path and every x-forwarded-client-cert it carries is taken out:
        a plaintext client cannot name itself to the app; none is added.
        """
        tcp = config.protocol not in L7
        decision = self.authorizer.decide(Request(None, config.app.port), config) if tcp else None
        if decision is not None and not decision.allowed:
            self.runtime.connection_refused(INBOUND, "policy_denied")
            if self.runtime.observer is not None:
                self._tcp_denied(relay, None, decision)
            sock.close()
            relay.close()
            return
        # Registered before the wrap: a reconfigure to strict while it runs closes this
        # relay too (configure), and the wrapped socket is then let go of at once.
        self.plaintext[relay] = config.app
        loop = asyncio.get_running_loop()
        try:
            down, _ = await loop.connect_accepted_socket(lambda: relay.down, sock)
        except OSError:  # gone already: no handshake to count it under
            sock.close()
            relay.close()
            return
        if relay.closed:  # the port became strict meanwhile
            down.abort()
            return
        down.pause_reading()
        await self._to_app(relay, None, config, decision)

    async def _to_app(
        self,
        relay: Relay,
        peer: SpiffeId | None,
        config: Inbound,
        decision: Decision | None = None,
    ) -> None:
        """Connect to the app and relay: bytes (tcp) or parsed requests (http) with the
        peer's x-forwarded-client-cert (none for a plaintext client).

        A plaintext client is counted (`connections_total{mtls="false"}`) once the app
        has its connection: one the app never got was not let in."""
        # An h2 peer on an http port: its streams parsed too. On a tcp port: bytes, as any.
        if config.protocol in H2 or (config.protocol == "http" and _alpn(relay) == "h2"):
            self._serve_h2(relay, peer, config)
            return
        loop = asyncio.get_running_loop()
        limits = self.runtime.limits
        app = config.app
        http = config.protocol == "http"
        down = relay.down.transport  # its TLS, named in its line should the caller leave
        tls = down.get_extra_info("ssl_object") if down is not None and not http else None
        try:
            up = relay.new_upstream()
            async with asyncio.timeout(limits.connect_timeout.total_seconds()):
                await loop.create_connection(
                    lambda: up, app.host, app.port, local_addr=config.local_addr
                )
        except (OSError, TimeoutError) as exc:
            self._app_unreachable(config, exc)
            if not http:
                # Allowed, but never relayed: its line (mode all) says why, as an outbound
                # connection that reached nothing says it; not a denial (mode denied). The
                # caller may have left during the dial: its line all the same.
                self._tcp_unrelayed(peer, tls, decision, "app_unreachable")
            relay.close()
            return
        if not relay.dialled():  # the client left meanwhile: the app's connection is closed
            if not http:
                self._tcp_unrelayed(peer, tls, decision, None)
            return
        if peer is None:  # plaintext, let in: counted once the app has it, not before
            self.runtime.established(INBOUND, None)
        observer = self.runtime.observer
        if not http:
            line = None if observer is None else self._tcp_line(relay, peer, decision)
            if line is None:
                relay.link()
            else:
                line.link(relay)
            return
        answered = self.runtime.series(INBOUND, peer).answered  # requests_total, bound once

        def refused(reason: str) -> None:
            self.runtime.connection_refused(INBOUND, reason)
            refusal_line(
                self.runtime.refusal_lines,
                log,
                (INBOUND, reason),
                "inbound %s: refused a connection from %s: %s",
                config.listen,
                peer or "a plaintext caller",
                http1.H2_ADVICE if reason == "protocol_mismatch" else reason,
            )

        def broke(detail: str) -> None:
            refusal_line(
                self.runtime.refusal_lines,
                log,
                (INBOUND, "app_broke_http"),
                "inbound %s: the app broke HTTP/1.1 (%s): its connection and the caller's were"
                " closed, after any response it had finished",
                config.listen,
                detail,
            )

        assert relay.down.transport is not None and up.transport is not None
        identity = xfcc(str(self.runtime.spiffe_id), str(peer)) if peer else b""
        watch = None
        if observer is not None:
            ssl_object = relay.down.transport.get_extra_info("ssl_object")
            watch = observer.watch("http", INBOUND, str(peer) if peer else None, ssl_object)
        exchange = HttpExchange(
            relay.down.transport,
            up.transport,
            self.authorizer.caller(peer, config),
            identity,
            answered,
            limits.headers_with_underscores,
            relay.close,
            refused,
            watch,
            broke,
        )
        relay.on_released = exchange.release
        relay.link(exchange.from_client, exchange.from_app)
        relay.drained_by(exchange.finish)

    def _tcp_line(
        self, relay: Relay, peer: SpiffeId | None, decision: Decision | None
    ) -> ConnectionLine | None:
        """An allowed TCP connection's access log line, its decision in it, written when it
        closes (its bytes counted once linked); None if no line of it could be written."""
        observer = self.runtime.observer
        down = relay.down.transport
        assert observer is not None and down is not None
        peer_id = str(peer) if peer else None
        line = observer.connection(relay, INBOUND, peer_id, down.get_extra_info("ssl_object"))
        if line is not None and decision is not None:
            line.watch.decided(line.entry, decision)
        return line

    def _tcp_unrelayed(
        self,
        peer: SpiffeId | None,
        ssl_object: ssl.SSLObject | None,
        decision: Decision | None,
        error: str | None,
    ) -> None:
        """The line (mode all) of an allowed TCP connection that never carried a byte (its
        app unreachable, or its caller gone before the app answered), written now, its
        decision and `error` in it: once, however the relay ended."""
        observer = self.runtime.observer
        if observer is None or not observer.every:
            return
        watch = observer.watch("tcp", INBOUND, str(peer) if peer else None, ssl_object)
        entry = watch.begin()
        if decision is not None:
            watch.decided(entry, decision)
        watch.finish(entry, None, error)

    def _tcp_denied(self, relay: Relay, peer: SpiffeId | None, decision: Decision) -> None:
        """The access log line of a TCP connection the policy refused."""
        observer = self.runtime.observer
        assert observer is not None
        down = relay.down.transport
        ssl_object = down.get_extra_info("ssl_object") if down is not None else None
        watch = observer.watch("tcp", INBOUND, str(peer) if peer else None, ssl_object)
        entry = watch.begin()
        watch.decided(entry, decision)
        watch.finish(entry, None)

    def _app_unreachable(self, config: Inbound, exc: BaseException) -> None:
        """Counted; a line a while: on a captured pod a caller can try every port, most with
        no app."""
        refusal_line(
            self.runtime.refusal_lines,
            log,
            (INBOUND, "app_unreachable"),
            "inbound %s: app %s unreachable: %s%s",
            config.listen,
            config.app,
            str(exc) or type(exc).__name__,  # a TimeoutError says nothing itself
            _unreachable_hint(config, exc),
        )
        self.runtime.connection_refused(INBOUND, "app_unreachable")

    def _serve_h2(self, relay: Relay, peer: SpiffeId | None, config: Inbound) -> None:
        """Serve the client's connection with an H2Server (agent/adapters/inbound_h2.py):
        each stream decided and sent to the app over h2c; the relay that set it up is done.

        A plaintext client is counted once its first bytes are the h2 preface (its app
        connections are per stream); an HTTP/1.x one is told what this port speaks
        (agent/adapters/h2gate.py). An `http` port's h2 peer gets the same decisions,
        its streams sent to the app as HTTP/1.1 (agent/adapters/inbound_h2h1.py).
        """
        transport = relay.down.transport
        assert transport is not None
        metrics, limits = self.runtime.metrics, self.runtime.limits
        app = config.app
        limit_hits = metrics.http2_limits
        series = self.runtime.series(INBOUND, peer)  # the peer's children, bound once

        source = str(peer or "")

        def answered(code: int, grpc_status: int | None) -> None:
            series.answered(code)
            if grpc_status is not None:
                series.grpc(grpc_status)

        def hit(limit: Limit) -> None:
            limit_hits.labels(INBOUND, limit).inc()
            self._limit_line(limit, peer)

        # An http port's app speaks HTTP/1.1: each stream goes to it as an HTTP/1.1 request.
        from agent.adapters.h2server import H2Server
        from agent.adapters.inbound_h2 import InboundH2
        from agent.adapters.inbound_h2h1 import InboundH2ToHttp1

        kind = InboundH2 if config.protocol in H2 else InboundH2ToHttp1
        streams = kind(
            Endpoint(app.host, app.port),
            self.authorizer.caller(peer, config),
            xfcc(str(self.runtime.spiffe_id), str(peer)) if peer else b"",
            answered,
            hit,
            underscores=limits.headers_with_underscores,
            connect_timeout=limits.connect_timeout.total_seconds(),
            idle_timeout=limits.idle_timeout.total_seconds(),
            unreachable=lambda exc: self._app_unreachable(config, exc),
            local_addr=config.local_addr,
            watch=None
            if self.runtime.observer is None
            else self.runtime.observer.watch(
                "http", INBOUND, source or None, transport.get_extra_info("ssl_object")
            ),
        )

        def closed(server: H2Server) -> None:
            streams.close()
            self.connections.closed(server)

        server = H2Server(
            streams.handle,
            hit,
            idle_timeout=limits.idle_timeout.total_seconds(),
            on_closed=closed,
            # An h2 app's responses were h2-checked on receipt; an HTTP/1.1 app's are not.
            checked_heads=kind is InboundH2,
        )
        # The relay hands its connection over: it lets go of the transport (so closing it
        # closes nothing) and leaves the registry, which now holds the h2 server.
        early = b"".join(relay.down.pending)
        relay.down.pending.clear()
        relay.down.transport = None
        relay.close()
        protocol: asyncio.Protocol = server
        held: H2Server | H2Gate = server
        if peer is None:  # plaintext: an HTTP/1.x client is told what this port speaks
            held = protocol = h2_gate(
                self.runtime,
                self.connections,
                INBOUND,
                server,
                config.protocol,
                f"inbound {self.address}",
                streams.close,
                # counted once let in as h2, not before (connections_total{mtls="false"})
                lambda: self.runtime.established(INBOUND, None),
            )
            self.plaintext[held] = config.app
        self.connections.add(held, INBOUND)
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if early:
            protocol.data_received(early)
        if relay.draining:
            held.finish()
        if not transport.is_closing():
            transport.resume_reading()

    def _limit_line(self, limit: Limit, peer: SpiffeId | None) -> None:
        """A line per limit a while: a flood reaches one per connection."""
        refusal_line(
            self.runtime.refusal_lines,
            log,
            (INBOUND, "http2_limit", limit),
            "inbound %s: an HTTP/2 client (%s) reached the %s limit",
            self.address,
            peer or "plaintext",
            limit,
        )

    async def _spoke(self, relay: Relay, sock: socket.socket) -> tuple[float, bytes | None] | None:
        """The client sent its first bytes within limits.handshake_timeout: the handshake's
        deadline (the loop's time) and the first byte if read (`_first_bytes`); else None
        (counted, closed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.runtime.limits.handshake_timeout.total_seconds()
        try:
            first = await _first_bytes(sock, deadline)
        except (OSError, TimeoutError) as exc:
            sock.close()
            self._refused(refusal_reason(exc))
            relay.close()
            return None
        except asyncio.CancelledError:
            sock.close()  # not a transport's yet: the drain's cancel would leave it open
            raise
        return deadline, first

    async def _authenticate(
        self,
        relay: Relay,
        sock: socket.socket,
        started: float,
        protocol: PortProtocol,
        destination: Endpoint | None,
        deadline: float,
    ) -> tuple[SpiffeId, Inbound] | None:
        """Handshake, then check the peer's SVID and the allow-list: the peer and the config
        that admitted it, or None (counted, the relay closed) within limits.handshake_timeout.
        """
        loop = asyncio.get_running_loop()
        context = self.runtime.contexts.server_for(protocol)
        assert context is not None, "listeners start after the first SVID"
        try:
            tls, _ = await loop.connect_accepted_socket(
                lambda: relay.down,
                sock,
                ssl=context,
                ssl_handshake_timeout=max(deadline - loop.time(), 0.001),
            )
        except (OSError, ssl.SSLError, TimeoutError, EOFError) as exc:
            reason = refusal_reason(exc)
            self._refused(reason)
            self._handshake_refused(destination, reason)
            relay.close()
            return None
        tls.pause_reading()
        config = self.serving(destination)[0]  # as of now: a reload may have narrowed `allow`
        ssl_object = tls.get_extra_info("ssl_object")
        peer = self.runtime.peer(ssl_object, "client", INBOUND)
        if peer is None:
            relay.abort()
            return None
        if config.allow.decide(peer) == "deny":
            refusal_line(  # a line a while: any workload of the mesh may keep trying
                self.runtime.refusal_lines,
                log,
                (INBOUND, "not_allowed", config.listen, peer),
                "inbound %s: refused %s: not on the allow-list",
                config.listen,
                peer,
                level=logging.INFO,
            )
            self._refused("not_allowed")
            relay.abort()
            return None
        self.runtime.verified(INBOUND, ssl_object, peer, started)
        if protocol in H2 and ssl_object.selected_alpn_protocol() != "h2":
            # CPython goes on without ALPN when the client offers no h2: this port is h2.
            # The client is a peer's `http` outbound: its app is told what to change.
            self.runtime.connection_refused(INBOUND, "protocol_mismatch")
            self._mismatch_line(config, peer)
            advise_peer(relay, tls, config.protocol)
            return None
        self.runtime.established(INBOUND, peer)
        return peer, config

    def _mismatch_line(self, config: Inbound, peer: SpiffeId) -> None:
        refusal_line(
            self.runtime.refusal_lines,
            log,
            (INBOUND, "protocol_mismatch"),
            "inbound %s: refused %s: it did not offer ALPN h2 and this port is protocol: %s"
            " (h2 only)",
            config.listen,
            peer,
            config.protocol,
        )

    def _strict_refused(
        self, relay: Relay, sock: socket.socket, destination: Endpoint | None
    ) -> None:
        """A plaintext client on a strict port: closed before any handshake, counted
        `connections_refused_total{reason="plaintext"}`: the first byte decides, as it
        lets plaintext through on a permissive port, not OpenSSL's error for the bytes."""
        sock.close()
        self.runtime.connection_refused(INBOUND, "plaintext")
        self._handshake_refused(destination, "plaintext")
        relay.close()

    def _handshake_refused(self, destination: Endpoint | None, reason: str) -> None:
        """A client's handshake failed (counted already): an explicit listener says nothing
        more (its clients are agents); the capture listener tells a plaintext caller's
        owner why (a strict port)."""


def _unreachable_hint(config: Inbound, exc: BaseException) -> str:
    """What a captured port's app owner can do about `exc`: nothing listens where the
    caller sent the connection (the app may listen on loopback only), or the hand-off
    source is not on lo."""
    if config.source is None or not isinstance(exc, OSError):
        return ""
    if exc.errno == errno.EADDRNOTAVAIL:
        return (
            f" ({config.source} is not on lo: the outrider-capture init container adds it;"
            " run `outrider capture apply` again)"
        )
    if exc.errno == errno.ECONNREFUSED:
        everywhere = "::" if ":" in config.app.host else "0.0.0.0 or ::"
        return (
            f" (nothing listens on {config.app}: an app that listens on 127.0.0.1 or ::1 only"
            f" is not reached through capture; listen on {everywhere}, or the pod IP)"
        )
    return ""


class InboundListener(InboundMtls[Inbound]):
    """An explicit inbound listener: mTLS only, to its one app."""

    def serving(self, destination: Endpoint | None) -> tuple[Inbound, bool]:
        return self.config, False


def h2_gate(
    runtime: Runtime,
    connections: Connections,
    direction: str,
    server: H2Server,
    protocol: str,
    where: str,
    on_closed: Callable[[], None] = lambda: None,
    admitted: Callable[[], None] = lambda: None,
) -> H2Gate:
    """An h2c connection's gate (agent/adapters/h2gate.py): an HTTP/1.x client is answered,
    counted `protocol_mismatch`, and logged a line a while; the registry holds the gate."""
    from agent.adapters.h2gate import H2Gate

    def refused() -> None:
        runtime.connection_refused(direction, "protocol_mismatch")
        refusal_line(
            runtime.refusal_lines,
            log,
            (direction, "protocol_mismatch", "http1"),
            "%s: refused an HTTP/1.x request: %s",
            where,
            http1.h1_advice(protocol),
        )

    def closed(gate: H2Gate) -> None:
        on_closed()
        connections.closed(gate)

    idle = runtime.limits.idle_timeout.total_seconds()
    return H2Gate(server, protocol, refused, closed, idle, admitted)


def advise_peer(relay: Relay, transport: asyncio.Transport, protocol: str) -> None:
    """agent/adapters/h2gate.py's `advise_peer`, its module loaded with the first use (a
    peer that did not offer h2 to an h2 port, whose config loaded it already)."""
    from agent.adapters import h2gate

    h2gate.advise_peer(relay, transport, protocol)


def _alpn(relay: Relay) -> str | None:
    """The protocol the client's TLS handshake agreed on (None: plaintext, or none)."""
    transport = relay.down.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport is not None else None
    return ssl_object.selected_alpn_protocol() if ssl_object is not None else None


def _tls_first(sock: socket.socket, first: bytes | None = None) -> bool:
    """Whether the client's first byte (read, not taken; `first` if read already) opens a
    TLS handshake. A client that left, or a read that fails, is taken as TLS: the
    handshake then fails, counted."""
    if first is None:
        try:
            first = sock.recv(1, socket.MSG_PEEK)
        except OSError:
            return True
    return not first or looks_like_tls(first)


class OutboundPath:
    """An app's connection to an upstream, served as its explicit listener serves it: the
    outbound listener and the outbound capture listener (a Service address) both use it.

    `protocol: tcp` balances and retries each connection; `protocol: http`
    each request (agent/adapters/outbound_http.py); `http2` and `grpc` each
    stream (agent/adapters/outbound_h2.py).
    """

    def __init__(self, runtime: Runtime, connections: Connections, rng: random.Random) -> None:
        self.runtime = runtime
        self.connections = connections
        self.rng = rng

    def protocol(self, live: LiveUpstream) -> asyncio.BaseProtocol:
        """The protocol for a connection just accepted for `live`, as its config is now.

        Counted in outbound_app_connections_total{route="upstream"} unless over a limit;
        not in connections_total: what is established is each mTLS connection to an
        endpoint, counted by `LiveUpstream.dial` once its server's SVID verified (a pool
        makes one serve many of the app's connections)."""
        metrics = self.runtime.metrics
        if len(self.connections) >= self.runtime.limits.max_connections:
            self.runtime.connection_refused(OUTBOUND, "max_connections")
            if self.runtime.observer is not None:  # a denial's line, as a captured one's
                self.runtime.observer.refused(OUTBOUND, "max_connections", upstream=live.name)
            return _OverLimit()
        if live.config.protocol == "http":
            exchange = OutboundHttp(live, self.connections.closed, self.rng)
            self.connections.add(exchange, OUTBOUND)
            metrics.routed["upstream"].inc()
            return exchange
        if live.config.protocol in H2:  # h2c from the app: each stream its own request
            from agent.adapters.outbound_h2 import OutboundH2

            server = OutboundH2(live, self.rng).serve(lambda _: None)
            gate = self.gate(server, live.config.protocol, f"outbound {live.name}")
            self.connections.add(gate, OUTBOUND)
            metrics.routed["upstream"].inc()
            return gate
        breaker = live.breaker  # one upstream connection per app connection
        if not breaker.acquire("max_connections"):
            _, error = overflow(live, "max_connections")
            self.runtime.connection_refused(OUTBOUND, "max_connections")
            observer = self.runtime.observer
            if observer is not None and observer.every:  # its line, as a refused request's
                watch = observer.watch("tcp", OUTBOUND, None, None, live.name)
                watch.finish(watch.begin(), None, error)
            return _OverLimit()
        load = live.core.load  # connections open per endpoint, for least_request (reloads keep it)
        linked: list[Endpoint] = []  # the endpoint this connection is relayed to, once linked

        def closed(relay: Closable) -> None:
            self.connections.closed(relay)
            breaker.release("max_connections")
            for endpoint in linked:
                load[endpoint] -= 1

        relay = Relay(self.runtime.limits.idle_timeout.total_seconds(), closed)
        self.connections.add(relay, OUTBOUND)
        metrics.routed["upstream"].inc()

        def made() -> None:
            # The app's first bytes are read while the upstream is dialled, and kept
            # (up to relay.EARLY): they go out as soon as it is linked. Its access log
            # line runs from now (the app's connection) to the relay's close: begun here,
            # before the app can leave, so that even an app that leaves at once gets one.
            observer = self.runtime.observer
            line = None
            if observer is not None:
                line = observer.connection(relay, OUTBOUND, upstream=live.name)
            task = asyncio.get_running_loop().create_task(self._connect(relay, live, linked, line))
            self.connections.setting_up(task, relay)

        relay.down.made = made
        return relay.down

    def gate(self, server: H2Server, protocol: str, where: str) -> H2Gate:
        """`server`, once the app's first bytes are h2c; an HTTP/1.x app is told what to do."""
        return h2_gate(self.runtime, self.connections, OUTBOUND, server, protocol, where)

    async def _connect(
        self,
        relay: Relay,
        live: LiveUpstream,
        linked: list[Endpoint],
        line: ConnectionLine | None,
    ) -> None:
        """Dial an endpoint for a TCP connection from the app, then relay; retried elsewhere
        (agent/adapters/attempts.py) on connect failures only: nothing was sent yet.

        Once relayed, the connection counts as load on its endpoint (in `linked`) until it
        closes. `line`: its access log line (when logged), told where it went.
        """
        if relay.closed:  # the app left before its upstream was even chosen
            return
        key = None
        if live.config.hash_on:  # the app's address, made into a string only when it is used
            transport = relay.down.transport
            peer = transport.get_extra_info("peername") if transport is not None else None
            key = str(peer[0]).encode() if peer else None
        budget = live.budget
        budget.request_started()
        try:
            linked_try = await attempts(
                live, partial(self._dial, relay, line), self.rng, method=None, key=key
            )
            linked_try.end()  # the dial's try is over; the connection counts in `linked` now
            if not relay.closed:  # else the app left during the dial: nothing to count
                endpoint = linked_try.endpoint
                live.core.load[endpoint] = live.core.load.get(endpoint, 0) + 1
                linked.append(endpoint)
            return
        except LocalAnswer as answer:  # nowhere (else) to go
            if line is not None:
                line.entry.error = answer.error
        finally:
            budget.request_finished()
        if not relay.closed:  # else the app left during the dial: not an upstream's failure
            self.runtime.connection_refused(OUTBOUND, "no_endpoint")
        relay.close()

    async def _dial(
        self, relay: Relay, line: ConnectionLine | None, attempt: Try[Droppable, None]
    ) -> Outcome | None:
        """One try of a TCP connection: dial `attempt.endpoint` and link the relay to it
        (its line, if logged, says where: the endpoint, the tries, the peer and its TLS)."""
        live = attempt.live
        side = relay.new_upstream()
        if line is not None:
            entry = line.entry
            entry.endpoint, entry.tries = str(attempt.endpoint), attempt.number
        try:
            _, _, tls = await live.dial(attempt.endpoint, lambda: side)
        except DialError as exc:
            self.runtime.dial_failed(live.name, attempt.endpoint, exc)
            # Its transport is aborted; left as the relay's upstream, the relay's
            # close would linger on it (and its TLS buffers) for LINGER seconds.
            relay.new_upstream()
            # An app that left cannot be replayed: the failure is recorded, not retried.
            attempt.decide("connect-failure", replayable=not relay.closed)
            return None
        live.counted.new.inc()
        if line is None:
            relay.link()
        else:
            line.entry.over(tls)
            line.link(relay)
        return DELIVERED


class OutboundListener(Listener[Outbound]):
    """Plain in from the app; mTLS out to the upstream's endpoints (agent/adapters/upstreams.py)."""

    direction = OUTBOUND

    def __init__(self, config: Outbound, runtime: Runtime, connections: Connections) -> None:
        super().__init__(config, runtime, connections)
        self.rng = random.Random()  # noqa: S311 (balancing, not secrets)
        self.live = LiveUpstream(config, runtime, self.rng)
        self.path = OutboundPath(runtime, connections, self.rng)

    def configure(self, config: Outbound) -> None:
        self.config = config
        self.live.reconfigure(config)

    async def start(self) -> None:
        # Discovery and health first: the first connections find endpoints sooner.
        self.live.start()
        await super().start()

    def close(self) -> None:
        super().close()
        self.live.close()

    async def _serve(self, listening: socket.socket) -> None:
        # Plain TCP in: uvloop's own accept loop, in C, with a protocol per connection.
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: self.path.protocol(self.live), sock=listening, backlog=1024
        )
