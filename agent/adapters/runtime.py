"""What every connection and request reads when it starts, and the counting of peer checks
and of established connections."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from prometheus_client import Counter, Histogram

from agent.adapters.metrics import AgentMetrics, Tally, since, tallied
from agent.adapters.tls import Contexts, peer_id
from agent.adapters.tracing import Observer
from agent.config import Limits
from agent.core.policy import PolicySet
from identity import SpiffeId, SvidError
from identity.throttle import LogThrottle, held_back

log = logging.getLogger("outrider.agent")


#: At most this many (direction, peer) bindings stay in `Runtime.series`: peers are SPIFFE
#: IDs only the CA can mint, so a mesh has few; past it the oldest binding is dropped (its
#: series stay in /metrics: only the shortcut to them goes).
PEER_SERIES = 512


class PeerSeries:
    """One (direction, peer)'s metric children, bound once: prometheus_client's `labels()`
    takes a lock, makes a string of every value and builds a key on each call, and these
    are counted on every connection, and the request ones on every request.

    `peer` is a verified SPIFFE ID, or None (a plaintext client let in, or an app's
    connection passed through outside the mesh): the label values are as `labels()`
    was given them before (`peer_id` "" for None, `mtls` "true" only with a peer).
    """

    __slots__ = ("_grpc", "_labels", "_metrics", "_requests", "_tls", "connections")

    def __init__(self, metrics: AgentMetrics, direction: str, peer: SpiffeId | None) -> None:
        self._metrics = metrics
        self._labels = (direction, str(peer or ""))
        self.connections: Counter = metrics.connections.labels(
            direction, "true" if peer is not None else "false", self._labels[1]
        )
        self._tls: dict[tuple[str, str], tuple[Counter, Counter]] = {}
        self._requests: dict[int, Tally] = {}  # counted on every request: Tallies
        self._grpc: dict[int, Counter] = {}

    def handshake(self, version: str, cipher: str) -> None:
        """A verified handshake: tls_handshakes_total (ok) and peer_connections_total."""
        children = self._tls.get((version, cipher))
        if children is None:
            direction, peer = self._labels
            children = self._tls[(version, cipher)] = (
                self._metrics.handshakes.labels(direction, "ok", "", version, cipher),
                self._metrics.peer_connections.labels(direction, peer, version),
            )
        children[0].inc()
        children[1].inc()

    def answered(self, code: int) -> None:
        """requests_total: a request of this peer's answered `code`."""
        tally = self._requests.get(code)
        if tally is None:
            child = self._metrics.requests.labels(*self._labels, str(code))
            tally = self._requests[code] = tallied(child)
        tally.value += 1.0

    def grpc(self, status: int) -> None:
        """grpc_requests_total: a call of this peer's ended with grpc-status `status`."""
        child = self._grpc.get(status)
        if child is None:
            labels = (*self._labels, str(status))
            child = self._grpc[status] = self._metrics.grpc_requests.labels(*labels)
        child.inc()


@dataclass
class Runtime:
    """Shared by the listeners and upstreams of one agent.

    `policies` is replaced whole on reload: a request is decided by the set in
    place when it arrives.
    """

    limits: Limits
    contexts: Contexts
    metrics: AgentMetrics
    now: Callable[[], datetime]
    spiffe_id: SpiffeId
    policies: PolicySet = field(default_factory=PolicySet)
    #: Inbound connections accepted whose peer is not verified yet, on every listener,
    #: oldest first: each with what closes it.
    handshaking: dict[object, Callable[[], None]] = field(default_factory=dict)
    #: Lines about refusals a caller can cause at will: bounded (identity/throttle.py).
    refusal_lines: LogThrottle = field(default_factory=LogThrottle)
    #: Access log and tracing (agent/adapters/tracing.py); None when both are off, so each
    #: request pays one `if` for them.
    observer: Observer | None = None
    #: Listeners bind with SO_REUSEPORT: one of `workers:` processes sharing each port.
    reuse_port: bool = False
    #: Metric children bound once (PeerSeries), by (direction, peer); handshake durations
    #: by direction.
    _series: dict[tuple[str, SpiffeId | None], PeerSeries] = field(default_factory=dict, repr=False)
    _durations: dict[str, Histogram] = field(default_factory=dict, repr=False)
    _resumed: dict[str, Counter] = field(default_factory=dict, repr=False)
    _refusals: dict[tuple[str, str], Counter] = field(default_factory=dict, repr=False)
    _closed: dict[tuple[str, str], Counter] = field(default_factory=dict, repr=False)

    def series(self, direction: str, peer: SpiffeId | None) -> PeerSeries:
        """`peer`'s metric children for `direction`, bound on first use (PEER_SERIES at most)."""
        key = (direction, peer)
        found = self._series.get(key)
        if found is None:
            if len(self._series) >= PEER_SERIES:
                del self._series[next(iter(self._series))]
            found = self._series[key] = PeerSeries(self.metrics, direction, peer)
        return found

    def established(self, direction: str, peer: SpiffeId | None) -> None:
        """Count a connection once, when established (issue 18): `connections_total`
        {mtls="true", peer_id} once `peer`'s SVID is verified on it (inbound: and the
        allow-list let it in; outbound: it is one the upstream expects); {mtls="false",
        peer_id=""} (`peer` None) when a permissive port let a plaintext client through to
        its app, or the app's connection was passed through outside the mesh.

        `outrider_connections_total{mtls="false"}` staying 0 is how an auditor sees that no
        plaintext came in, so nothing refused before this point is counted here.
        """
        self.series(direction, peer).connections.inc()

    def not_pending(self, connection: object) -> Callable[[], None] | None:
        """`connection` is verified, refused, evicted or cancelled: what would have closed it
        while pending, the first time only."""
        close = self.handshaking.pop(connection, None)
        if close is not None:
            self.metrics.pending_handshakes.dec()
        return close

    def close_pending(self) -> None:
        """Draining: close every connection still before its peer is verified. None has
        sent a request yet, so it is refused like a connect to the closed listener, not
        given the rest of its handshake timeout to hold the drain up."""
        for connection in list(self.handshaking):
            close = self.not_pending(connection)
            if close is not None:
                close()

    def peer(
        self, ssl_object: ssl.SSLObject, usage: Literal["client", "server"], direction: str
    ) -> SpiffeId | None:
        """The peer's SPIFFE ID, or None (counted) when its certificate is not an SVID."""
        try:
            return peer_id(ssl_object, usage, self.now(), self.spiffe_id.trust_domain)
        except SvidError as exc:
            self.refused(direction, exc.reason)
            return None

    def connection_refused(self, direction: str, reason: str) -> None:
        """connections_refused_total: a connection closed before relaying, for `reason` (a
        word from a fixed list); bound once: a flood is refused once per connection."""
        child = self._closed.get((direction, reason))
        if child is None:
            labels = (direction, reason)
            child = self._closed[labels] = self.metrics.connections_refused.labels(*labels)
        child.inc()

    def dial_failed(self, upstream: str, endpoint: object, exc: BaseException) -> None:
        """An upstream endpoint could not be dialled: a line a while per endpoint, not one
        per try (an app calling a dead upstream makes one a request, or more)."""
        refusal_line(
            self.refusal_lines,
            log,
            ("dial_failed", upstream, str(endpoint)),
            "outbound %s: %s",
            upstream,
            exc,
        )

    def refused(self, direction: str, reason: str) -> None:
        """A handshake or peer check failed for `reason` (a word from a fixed list)."""
        child = self._refusals.get((direction, reason))
        if child is None:  # bound once: a flood of bad handshakes counts one per connection
            labels = (direction, "refused", reason, "", "")
            child = self._refusals[(direction, reason)] = self.metrics.handshakes.labels(*labels)
        child.inc()

    def verified(
        self, direction: str, ssl_object: ssl.SSLObject, peer: SpiffeId, started: float
    ) -> None:
        """`peer`'s SVID verified on a handshake that started at `started` (`clock`)."""
        version = ssl_object.version() or ""
        cipher = (ssl_object.cipher() or ("",))[0]
        self.series(direction, peer).handshake(version, cipher)
        if ssl_object.session_reused:
            resumed = self._resumed.get(direction)
            if resumed is None:
                labels = direction
                resumed = self._resumed[labels] = self.metrics.resumed_handshakes.labels(labels)
            resumed.inc()
        duration = self._durations.get(direction)
        if duration is None:
            duration = self._durations[direction] = self.metrics.handshake_duration.labels(
                direction
            )
        duration.observe(since(started))


def refusal_line(
    lines: LogThrottle,
    logger: logging.Logger,
    key: tuple[object, ...],
    message: str,
    *args: object,
    level: int = logging.WARNING,
) -> None:
    """Log `message % args` at most once a while per `key` (`Runtime.refusal_lines`), saying
    how many it stands for: a caller can cause one per connection, or faster."""
    held = lines.admit(key, asyncio.get_running_loop().time())
    if held is not None:
        logger.log(level, message + "%s", *args, held_back(held), stacklevel=2)
