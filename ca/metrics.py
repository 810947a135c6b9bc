"""The CA's Prometheus metrics (names from DESIGN.md), on a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from identity.registry import SUB_MILLISECOND, component_registry
from identity.serving import CLOSE_REASONS

_TTL_BUCKETS = (300, 900, 1800, 3600, 7200, 14400, 43200, 86400)
LISTENERS = ("grpc", "http")
_SIGN_BUCKETS = (*SUB_MILLISECOND, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class CaMetrics:
    def __init__(self) -> None:
        self.registry = component_registry("ca")
        r = self.registry
        self.csr = Counter(
            "outrider_ca_csr",
            "CSRs answered, by result and reason",
            ["result", "reason"],
            registry=r,
        )
        self.sign_duration = Histogram(
            "outrider_ca_sign_duration_seconds",
            "Time to build, sign and check one SVID",
            buckets=_SIGN_BUCKETS,
            registry=r,
        )
        self.authn_failures = Counter(
            "outrider_ca_authn_failures", "Callers refused authentication", ["reason"], registry=r
        )
        self.issued_ttl = Histogram(
            "outrider_ca_issued_ttl_seconds",
            "Lifetime of issued SVIDs",
            buckets=_TTL_BUCKETS,
            registry=r,
        )
        self.root_expiry = Gauge(
            "outrider_ca_root_expiry_timestamp_seconds",
            "Earliest root expiry (Unix time)",
            registry=r,
        )
        self.intermediate_expiry = Gauge(
            "outrider_ca_intermediate_expiry_timestamp_seconds",
            "Issuing certificate expiry (Unix time)",
            registry=r,
        )
        self.connections_closed = Counter(
            "outrider_ca_connections_closed",
            "Connections the CA closed at a limit, by port (grpc, http) and reason"
            f" ({', '.join(CLOSE_REASONS)})",
            ["listener", "reason"],
            registry=r,
        )
        for listener in LISTENERS:  # exported at 0 from the start, for rates and alerts
            for reason in CLOSE_REASONS:
                self.connections_closed.labels(listener, reason)
        self.connections_open = Gauge(
            "outrider_ca_connections_open",
            "Connections open now, TLS handshakes in progress included, by port",
            ["listener"],
            registry=r,
        )

    def connection_closed(self, listener: str) -> Callable[[str], None]:
        """What the acceptor of `listener` calls with the reason it closed a connection."""
        return lambda reason: self.connections_closed.labels(listener, reason).inc()
