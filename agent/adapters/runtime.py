"""What every connection and request reads when it starts, and the counting of peer checks."""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

from agent.adapters.metrics import AgentMetrics, since
from agent.adapters.tls import Contexts, peer_id
from agent.adapters.tracing import Observer
from agent.config import Limits
from agent.core.policy import PolicySet
from agent.core.throttle import LogThrottle, held_back
from identity import SpiffeId, SvidError

log = logging.getLogger("outrider.agent")


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
    #: Lines about refusals a caller can cause at will: bounded (agent/core/throttle.py).
    refusal_lines: LogThrottle = field(default_factory=LogThrottle)
    #: Access log and tracing (agent/adapters/tracing.py); None when both are off, so each
    #: request pays one `if` for them.
    observer: Observer | None = None
    #: Listeners bind with SO_REUSEPORT: one of `workers:` processes sharing each port.
    reuse_port: bool = False

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
        self.metrics.handshakes.labels(direction, "refused", reason, "", "").inc()

    def verified(
        self, direction: str, ssl_object: ssl.SSLObject, peer: SpiffeId, started: float
    ) -> None:
        metrics = self.metrics
        version = ssl_object.version() or ""
        cipher = (ssl_object.cipher() or ("",))[0]
        metrics.handshakes.labels(direction, "ok", "", version, cipher).inc()
        if ssl_object.session_reused:
            metrics.resumed_handshakes.labels(direction).inc()
        metrics.handshake_duration.labels(direction).observe(since(started))
        metrics.peer_connections.labels(direction, str(peer), version).inc()


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
