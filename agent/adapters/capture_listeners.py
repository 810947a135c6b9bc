"""The capture listeners: the pod's redirected TCP, served by where it was going.

The nft rules `outrider capture apply` writes send every inbound TCP
connection to 0.0.0.0:<inbound_port> and every outbound one of the app (any
UID but the agent's) to 127.0.0.1:<outbound_port>. Each connection's original
destination (SO_ORIGINAL_DST, agent/adapters/capture.py) picks its path, as
agent/core/captured.py decides:

- inbound to port P: strict, mTLS as an explicit inbound listener serves it,
  to 127.0.0.1:P; permissive, a first byte that opens no TLS handshake goes
  to the app in plain (authorized as an unauthenticated source, counted
  `mtls="false"`, its x-forwarded-client-cert stripped on an HTTP port);
- outbound to D: a Service address of an upstream (the upstream's own
  balancing, retries and protocol), a mesh pod's own address (mTLS pinned to
  it), or plain TCP for what is outside the mesh (counted), or refused.

Both follow reloads and snapshots from the next connection on. An upstream
known only by its `destinations` (a captured pod gets one for every Service
of the mesh) is built, and its discovery and health checks started, at its
first connection: most pods call few of them.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import random
import socket
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from functools import partial
from typing import Any, TypeVar

from prometheus_client import Counter

from agent.adapters.capture import original_destination
from agent.adapters.listeners import (
    INBOUND,
    OUTBOUND,
    Acceptor,
    Connections,
    InboundCapture,
    InboundMtls,
    Listener,
    OutboundCapture,
    OutboundPath,
)
from agent.adapters.ports import cannot_listen
from agent.adapters.relay import Relay
from agent.adapters.runtime import Runtime
from agent.adapters.tracing import ConnectionLine
from agent.adapters.upstreams import DialError, LiveUpstream
from agent.config import AgentConfig, Inbound
from agent.core.authz import AllowList
from agent.core.captured import (
    OutboundRoutes,
    Passthrough,
    Refused,
    ToEndpoint,
    ToUpstream,
    UpstreamAddresses,
)
from agent.core.discovery import StaticSource
from agent.core.upstream import Endpoint
from identity.capture import handoff_source, pod_address
from identity.configfile import Listen
from identity.throttle import held_back

log = logging.getLogger("outrider.agent")


def capture_configs(config: AgentConfig) -> tuple[InboundCapture, OutboundCapture] | None:
    """What the two capture listeners serve under `config`; None without `capture:`."""
    ports = config.capture
    if ports is None:
        return None
    capture_ports = frozenset({ports.inbound_port, ports.outbound_port})
    own = agent_ports(config)
    inbound = InboundCapture(
        ports.inbound,
        config.captured,
        AllowList(frozenset(), frozenset({config.trust_domain})),
        own,
    )
    addresses = [
        UpstreamAddresses(
            item.name,
            item.destinations,
            tuple(
                endpoint
                for subset in item.subsets
                if isinstance(subset.source, StaticSource)
                for endpoint, _ in subset.source.endpoints
            ),
        )
        for item in config.outbound
    ]
    outbound = OutboundCapture(
        ports.outbound,
        OutboundRoutes(addresses, config.captured, capture_ports),
        {item.name: item for item in config.outbound},
        config.captured,
    )
    return inbound, outbound


def agent_ports(config: AgentConfig) -> frozenset[int]:
    """Every port the agent itself listens on: never an app's.

    An inbound connection captured on its way to one of these is refused, not
    relayed to 127.0.0.1:<port>: there it would reach the agent, and an explicit
    outbound listener (127.0.0.1:15001...) would carry the caller's bytes into
    the mesh under this pod's own SVID (a plaintext caller on a permissive pod,
    or any peer, would borrow the pod's identity); the admin port would answer it.
    """
    ports = {config.admin.port}
    if config.status is not None:
        ports.add(config.status.port)
    if config.capture is not None:
        ports |= {config.capture.inbound_port, config.capture.outbound_port}
    ports |= {item.listen.port for item in config.inbound}
    ports |= {item.listen.port for item in config.outbound if item.listen is not None}
    return frozenset(ports)


#: What each refusal of a captured connection means, for the log (`{}`: where it was going).
_WHY = {
    (INBOUND, "no_original_destination"): (
        "a connection to the inbound capture port itself, not redirected by the capture rules:"
        " it names no app port"
    ),
    (INBOUND, "capture_loop"): (
        "a connection to port {} of the pod, one of the agent's own ports: never relayed"
    ),
    (INBOUND, "local_destination"): (
        "a connection to {}, a loopback, link-local or hand-off address, from the network:"
        " never relayed (a loopback-only port is the pod's own)"
    ),
    (OUTBOUND, "no_original_destination"): (
        "a connection to the outbound capture port itself, not redirected by the capture"
        " rules: it names no destination"
    ),
    (OUTBOUND, "capture_loop"): "the app's connection to {}, a capture port: it would loop",
    (OUTBOUND, "registry_only"): (
        "the app's connection to {}: not in the registry, and the outbound policy is registry-only"
    ),
    (OUTBOUND, "max_connections"): "the app's connection to {}: max_connections reached",
}


def _refuse(
    runtime: Runtime,
    direction: str,
    reason: str,
    sock: socket.socket,
    where: object = "",
    destination: Endpoint | None = None,
) -> None:
    """Closed and counted; an access log line (to `destination`, when known) in mode
    denied and all, as a denial's; said in the agent's log at most once a while per kind
    (a caller can cause these as fast as it connects: identity/throttle.py)."""
    runtime.connection_refused(direction, reason)
    sock.close()
    if runtime.observer is not None:
        runtime.observer.refused(direction, reason, destination)
    held = runtime.refusal_lines.admit((direction, reason), time.monotonic())
    if held is not None:
        why = _WHY.get((direction, reason), reason).format(where)
        log.warning("%s capture: refused %s%s", direction, why, held_back(held))


CaptureT = TypeVar("CaptureT", InboundCapture, OutboundCapture)


class _AlsoIpv6(Listener[CaptureT]):
    """The capture ports on IPv6 too: the rules redirect a pod's IPv6 TCP as well (inbound
    to [pod IPv6]:<inbound_port>, the app's outbound to [::1]:<outbound_port>), and with
    nobody there the app's IPv6 would be refused (closed, but broken). Where the kernel
    has no IPv6 the rules have nothing to redirect either: the IPv4 socket alone serves.
    """

    IPV6_HOST: str  # "::" inbound (every address of the pod), "::1" outbound (the app's own)
    _v6: socket.socket | None = None
    _v6_acceptor: Acceptor | None = None

    def bind(self, listen: Listen) -> None:
        """Both sockets, or neither: an IPv4 socket left bound without its IPv6 one (taken
        meanwhile, at a refused reload's retake) would queue callers nobody accepts."""
        super().bind(listen)
        try:
            self._bind_ipv6()
        except OSError:
            self.release()
            raise

    async def _serve(self, listening: socket.socket) -> None:
        await super()._serve(listening)
        if self._v6 is not None:
            self._v6_acceptor = self._accept(self._v6)
            log.info(
                "%s listening on [%s]:%d too",
                self.address,
                self.IPV6_HOST,
                self._v6.getsockname()[1],
            )

    def release(self) -> None:
        super().release()
        if self._v6_acceptor is not None:
            self._v6_acceptor.cancel()
            self._v6_acceptor = None
        if self._v6 is not None:
            self._v6.close()
            self._v6 = None

    def _bind_ipv6(self) -> None:
        assert self._socket is not None
        port = self._socket.getsockname()[1]
        sock = None
        try:
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.runtime.reuse_port:  # workers share it, as they share the IPv4 one
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((self.IPV6_HOST, port))
            sock.listen(1024)
        except OSError as exc:
            if sock is not None:
                sock.close()
            if exc.errno in (errno.EAFNOSUPPORT, errno.EADDRNOTAVAIL):
                log.info("%s: no IPv6 here (%s): IPv4 only", self.address, exc.strerror)
                return
            raise cannot_listen(exc, f"[{self.IPV6_HOST}]:{port}") from None
        sock.setblocking(False)
        self._v6 = sock


class InboundCaptureListener(_AlsoIpv6[InboundCapture], InboundMtls[InboundCapture]):
    """0.0.0.0:<inbound_port>: every port of the pod, mTLS (strict) or either (permissive)."""

    #: Every port the agent has bound, as bound (the agent keeps it current): with
    #: `agent_ports` of the config, which may name a port 0 the kernel chose.
    bound_ports: frozenset[int] = frozenset()
    IPV6_HOST = "::"

    def _admit(self, sock: socket.socket, destination: Endpoint | None = None) -> None:
        original = original_destination(sock)
        if original is None:
            _refuse(self.runtime, INBOUND, "no_original_destination", sock)
            return
        where = Endpoint(*original)
        if where.port in self.config.agent_ports or where.port in self.bound_ports:
            _refuse(self.runtime, INBOUND, "capture_loop", sock, where.port, where)
            return
        if pod_address(where.host) is None:
            _refuse(self.runtime, INBOUND, "local_destination", sock, where, where)
            return
        super()._admit(sock, where)

    def _handshake_refused(self, destination: Endpoint | None, reason: str) -> None:
        held = self.runtime.refusal_lines.admit((INBOUND, "handshake"), time.monotonic())
        if held is None:
            return
        assert destination is not None, "a captured connection has its original destination"
        permissive = self.serving(destination)[1]
        strict = "" if permissive else "; the port is strict: plaintext is refused"
        log.warning(
            "inbound capture: refused a connection to port %d: no mTLS handshake (%s)%s%s",
            destination.port,
            reason,
            strict,
            held_back(held),
        )

    def serving(self, destination: Endpoint | None) -> tuple[Inbound, bool]:
        """The app is where the caller sent the connection (the pod IP), dialled from the
        hand-off source: a port the app binds on loopback only is not reached, as without
        the mesh (identity/capture.py)."""
        assert destination is not None, "a captured connection has its original destination"
        capture = self.config
        mode = capture.captured.inbound(destination.port)
        source = handoff_source(destination.host)
        inbound = Inbound(capture.listen, destination, capture.allow, mode.protocol, source)
        return inbound, mode.mtls == "permissive"


class OutboundCaptureListener(_AlsoIpv6[OutboundCapture]):
    """127.0.0.1:<outbound_port> (and [::1]): the app's connections, routed by original
    destination."""

    direction = OUTBOUND
    IPV6_HOST = "::1"

    def __init__(self, config: OutboundCapture, runtime: Runtime, connections: Connections) -> None:
        super().__init__(config, runtime, connections)
        self.rng = random.Random()  # noqa: S311 (balancing, not secrets)
        self.path = OutboundPath(runtime, connections, self.rng)
        #: The explicit outbound listeners' upstreams by name (the agent keeps it current):
        #: an entry with both `listen` and `destinations` is one upstream, one pool.
        self.explicit: Mapping[str, LiveUpstream] = {}
        self._own: dict[str, LiveUpstream] = {}  # destinations-only entries, built on use
        #: Connections passed through in plain, by destination: closed when a new config
        #: would not pass them (registry-only, or the address joined the mesh). Weak: a
        #: closed relay leaves by itself.
        self.passed: weakref.WeakKeyDictionary[Relay, Endpoint] = weakref.WeakKeyDictionary()
        self._passthrough: dict[str, Counter] = {}

    def configure(self, config: OutboundCapture) -> None:
        self.config = config
        stopped = [
            relay
            for relay, target in list(self.passed.items())
            if not relay.closed and not isinstance(config.routes.route(target), Passthrough)
        ]
        for relay in stopped:
            relay.abort()
        if stopped:
            log.info(
                "outbound capture: closed %d plain connection(s) the outbound policy no longer"
                " passes through",
                len(stopped),
            )
        for name in list(self._own):
            wanted = config.upstreams.get(name)
            if wanted is None or wanted.listen is not None:  # gone, or served by a listener
                self._own.pop(name).close()
            else:
                self._own[name].reconfigure(wanted)

    def close(self) -> None:
        super().close()
        for live in self._own.values():
            live.close()
        self._own.clear()

    def upstream(self, name: str, *, start: bool = True) -> LiveUpstream:
        """The running upstream `name`: the explicit listener's, or one of our own, started
        (discovery, health checks) on its first connection when `start`."""
        live = self.explicit.get(name)
        if live is not None:
            return live
        live = self._own.get(name)
        if live is None:
            live = self._own[name] = LiveUpstream(
                self.config.upstreams[name], self.runtime, self.rng
            )
        if start and not live.running:
            live.start()
        return live

    def _admit(self, sock: socket.socket) -> None:
        """Route the app's connection by where it was going."""
        runtime = self.runtime
        destination = original_destination(sock)
        if destination is None:
            _refuse(runtime, OUTBOUND, "no_original_destination", sock)
            return
        target = Endpoint(*destination)
        route = self.config.routes.route(target)
        if isinstance(route, Refused):
            _refuse(runtime, OUTBOUND, route.reason, sock, target, target)
            return
        if len(self.connections) >= runtime.limits.max_connections:
            _refuse(runtime, OUTBOUND, "max_connections", sock, target, target)
            return
        loop = asyncio.get_running_loop()
        if isinstance(route, ToUpstream):
            protocol = self.path.protocol(self.upstream(route.name))
            task = loop.create_task(_adopt(loop, sock, protocol))
            relay = None  # the upstream's protocol owns the connection once adopted
        else:
            relay = Relay(runtime.limits.idle_timeout.total_seconds(), self.connections.closed)
            self.connections.add(relay, OUTBOUND)
            pinned = route.name if isinstance(route, ToEndpoint) else None
            line = self._line(relay, pinned, target)
            if isinstance(route, ToEndpoint):  # established: by the dial, once verified
                runtime.metrics.routed["endpoint"].inc()
                live = self.upstream(route.name, start=False)
                dial = self._pinned(relay, live, target, line)
            else:
                assert isinstance(route, Passthrough)
                self._passed_through(route.reason)
                runtime.metrics.routed["passthrough"].inc()
                runtime.established(OUTBOUND, None)
                self.passed[relay] = target
                dial = self._plain(relay, target)
            refused = partial(runtime.connection_refused, OUTBOUND, "no_endpoint")
            task = loop.create_task(_relayed(loop, sock, relay, dial, refused, line))
        self.connections.setting_up(task, relay)

    def _line(self, relay: Relay, upstream: str | None, target: Endpoint) -> ConnectionLine | None:
        """A pinned or passed-through connection's access log line (when logged): to
        `target`, the one endpoint it is dialled once (of `upstream`, if pinned). A
        passed-through one is plain TCP: no peer and no TLS, its line says so with nulls."""
        observer = self.runtime.observer
        line = None if observer is None else observer.connection(relay, OUTBOUND, upstream=upstream)
        if line is not None:
            line.entry.endpoint, line.entry.tries = str(target), 1
        return line

    async def _pinned(
        self, relay: Relay, live: LiveUpstream, target: Endpoint, line: ConnectionLine | None
    ) -> bool:
        """mTLS to `target` itself, a pod of upstream `live`, checked against its IDs."""
        side = relay.new_upstream()
        try:
            _, _, tls = await live.dial(target, lambda: side)
        except DialError as exc:
            self._say(("pinned",), "outbound capture %s (%s): %s", target, live.name, exc)
            relay.new_upstream()  # the aborted side must not linger in the relay's close
            return False
        if line is not None:
            line.entry.over(tls)
        return True

    async def _plain(self, relay: Relay, target: Endpoint) -> bool:
        """Plain TCP to `target`, outside the mesh, as the app asked."""
        side = relay.new_upstream()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.runtime.limits.connect_timeout.total_seconds()):
                await loop.create_connection(lambda: side, target.host, target.port)
        except (OSError, TimeoutError) as exc:
            self._say(("unreachable",), "outbound capture: %s unreachable: %s", target, exc)
            relay.new_upstream()
            return False
        return True

    def _passed_through(self, reason: str) -> None:
        """outbound_passthrough_total, its children bound once (one per connection)."""
        child = self._passthrough.get(reason)
        if child is None:
            child = self._passthrough[reason] = self.runtime.metrics.outbound_passthrough.labels(
                reason
            )
        child.inc()

    def _say(self, kind: tuple[str], message: str, *args: object) -> None:
        """A failed dial, in the log a line a while: an app in a retry loop dials as fast as
        it connects (counted each in connections_refused_total{reason="no_endpoint"})."""
        held = self.runtime.refusal_lines.admit((OUTBOUND, *kind), time.monotonic())
        if held is not None:
            log.warning(message + "%s", *args, held_back(held))


async def _adopt(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.BaseProtocol
) -> None:
    """An accepted socket handed to `protocol`, as the explicit listener's server would."""
    try:
        await loop.connect_accepted_socket(lambda: protocol, sock)
    except OSError as exc:
        sock.close()
        protocol.connection_lost(exc)  # what it holds (a relay, a breaker slot) lets go


async def _relayed(
    loop: asyncio.AbstractEventLoop,
    sock: socket.socket,
    relay: Relay,
    dial: Coroutine[Any, Any, bool],
    refused: Callable[[], None],
    line: ConnectionLine | None,
) -> None:
    """The app's socket as the relay's downstream, then `dial` the upstream, then relay
    (its bytes counted in `line`, when it is logged)."""
    try:
        down, _ = await loop.connect_accepted_socket(lambda: relay.down, sock)
    except OSError:
        dial.close()  # never started
        sock.close()
        relay.close()
        return
    down.pause_reading()  # until the upstream is connected
    if not await dial:
        if not relay.closed:  # else the app left during the dial: nobody's failure
            refused()
            if line is not None:
                line.entry.error = "upstream_connect_failure"  # as agent/core/tries.py says it
        relay.close()
        return
    if line is None:
        relay.link()
    else:
        line.link(relay)
