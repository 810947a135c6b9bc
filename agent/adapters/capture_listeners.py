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
import logging
import random
import socket
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

from agent.adapters.capture import original_destination
from agent.adapters.listeners import (
    INBOUND,
    OUTBOUND,
    Connections,
    InboundCapture,
    InboundMtls,
    Listener,
    OutboundCapture,
    OutboundPath,
)
from agent.adapters.relay import Relay
from agent.adapters.runtime import Runtime
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

log = logging.getLogger("outrider.agent")


def capture_configs(config: AgentConfig) -> tuple[InboundCapture, OutboundCapture] | None:
    """What the two capture listeners serve under `config`; None without `capture:`."""
    ports = config.capture
    if ports is None:
        return None
    capture_ports = frozenset({ports.inbound_port, ports.outbound_port})
    own = {config.admin.port} | ({config.status.port} if config.status else set())
    inbound = InboundCapture(
        ports.inbound,
        config.captured,
        AllowList(frozenset(), frozenset({config.trust_domain})),
        capture_ports | own,
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


def _refuse(runtime: Runtime, direction: str, reason: str, sock: socket.socket) -> None:
    runtime.metrics.connections_refused.labels(direction, reason).inc()
    sock.close()


class InboundCaptureListener(InboundMtls[InboundCapture]):
    """0.0.0.0:<inbound_port>: every port of the pod, mTLS (strict) or either (permissive)."""

    def _admit(self, sock: socket.socket, port: int = 0) -> None:
        destination = original_destination(sock)
        if destination is None:
            _refuse(self.runtime, INBOUND, "no_original_destination", sock)
            return
        if destination[1] in self.config.agent_ports:
            _refuse(self.runtime, INBOUND, "capture_loop", sock)
            return
        super()._admit(sock, destination[1])

    def serving(self, port: int) -> tuple[Inbound, bool]:
        capture = self.config
        mode = capture.captured.inbound(port)
        inbound = Inbound(capture.listen, Endpoint("127.0.0.1", port), capture.allow, mode.protocol)
        return inbound, mode.mtls == "permissive"


class OutboundCaptureListener(Listener[OutboundCapture]):
    """127.0.0.1:<outbound_port>: the app's connections, routed by original destination."""

    direction = OUTBOUND

    def __init__(self, config: OutboundCapture, runtime: Runtime, connections: Connections) -> None:
        super().__init__(config, runtime, connections)
        self.rng = random.Random()  # noqa: S311 (balancing, not secrets)
        self.path = OutboundPath(runtime, connections, self.rng)
        #: The explicit outbound listeners' upstreams by name (the agent keeps it current):
        #: an entry with both `listen` and `destinations` is one upstream, one pool.
        self.explicit: Mapping[str, LiveUpstream] = {}
        self._own: dict[str, LiveUpstream] = {}  # destinations-only entries, built on use

    def configure(self, config: OutboundCapture) -> None:
        self.config = config
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

    async def _serve(self, listening: socket.socket) -> None:
        self._acceptor = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        assert self._socket is not None
        listening = self._socket
        while True:
            try:
                sock, _ = await loop.sock_accept(listening)
            except OSError as exc:  # EMFILE and friends: back off, keep the listener
                log.warning("outbound capture %s: accept failed: %s", self.address, exc)
                await asyncio.sleep(0.1)
                continue
            self._route(sock)

    def _route(self, sock: socket.socket) -> None:
        runtime = self.runtime
        destination = original_destination(sock)
        if destination is None:
            _refuse(runtime, OUTBOUND, "no_original_destination", sock)
            return
        target = Endpoint(*destination)
        route = self.config.routes.route(target)
        if isinstance(route, Refused):
            if route.reason == "registry_only":
                log.info("outbound capture: refused %s: not in the registry", target)
            _refuse(runtime, OUTBOUND, route.reason, sock)
            return
        if len(self.connections) >= runtime.limits.max_connections:
            _refuse(runtime, OUTBOUND, "max_connections", sock)
            return
        loop = asyncio.get_running_loop()
        if isinstance(route, ToUpstream):
            protocol = self.path.protocol(self.upstream(route.name))
            task = loop.create_task(_adopt(loop, sock, protocol))
        else:
            relay = Relay(runtime.limits.idle_timeout.total_seconds(), self.connections.closed)
            self.connections.add(relay, OUTBOUND)
            if isinstance(route, ToEndpoint):
                self.connections.established(OUTBOUND, None)
                dial = self._pinned(relay, self.upstream(route.name, start=False), target)
            else:
                assert isinstance(route, Passthrough)
                runtime.metrics.outbound_passthrough.labels(route.reason).inc()
                self.connections.established(OUTBOUND, None, mtls=False)
                dial = self._plain(relay, target)
            refused = runtime.metrics.connections_refused.labels(OUTBOUND, "no_endpoint").inc
            task = loop.create_task(_relayed(loop, sock, relay, dial, refused))
        self.connections.setting_up(task)

    async def _pinned(self, relay: Relay, live: LiveUpstream, target: Endpoint) -> bool:
        """mTLS to `target` itself, a pod of upstream `live`, checked against its IDs."""
        side = relay.new_upstream()
        try:
            await live.dial(target, lambda: side)
        except DialError as exc:
            log.warning("outbound capture %s (%s): %s", target, live.name, exc)
            relay.new_upstream()  # the aborted side must not linger in the relay's close
            return False
        return True

    async def _plain(self, relay: Relay, target: Endpoint) -> bool:
        """Plain TCP to `target`, outside the mesh, as the app asked."""
        side = relay.new_upstream()
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.runtime.limits.connect_timeout.total_seconds()):
                await loop.create_connection(lambda: side, target.host, target.port)
        except (OSError, TimeoutError) as exc:
            log.info("outbound capture: %s unreachable: %s", target, exc)
            relay.new_upstream()
            return False
        return True


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
) -> None:
    """The app's socket as the relay's downstream, then `dial` the upstream, then relay."""
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
        relay.close()
        return
    relay.link()
