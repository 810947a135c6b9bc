"""The agent's Prometheus metrics (names from DESIGN.md), on a registry of its own.

Label values are bounded: directions, results, reasons from fixed lists,
TLS versions and ciphers from OpenSSL, and peer SPIFFE IDs, which only the CA
can mint. Children with fixed labels are bound once here, off the hot path.
"""

from __future__ import annotations

import time

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from agent.core.h2limits import LIMITS

# The *_created series double every counter and tell an auditor nothing.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: The clock every measured duration is read on: monotonic and sub-microsecond. The event
#: loop's clock is for scheduling only: uvloop's is cached once per loop iteration in whole
#: milliseconds, which put every sub-millisecond handshake or request at 0 or 1 ms.
clock = time.perf_counter


def since(started: float) -> float:
    """Seconds from `started`, a reading of `clock`, until now."""
    return clock() - started


_REQUEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_HANDSHAKE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0)


#: The status counted in the HTTP request counters for a request whose client went away
#: (reset its stream, or closed its connection) before any answer went out: nginx's 499,
#: as Envoy and nginx log it; a gRPC call so ended is counted CANCELLED.
CLIENT_CLOSED = 499


class AgentMetrics:
    def __init__(self, *, control_plane: bool = False) -> None:
        """`control_plane`: the agent subscribes to one (`control:`), so /metrics shows the
        control-plane series; an agent of files alone shows none (not a "disconnected" 0)."""
        self.registry = CollectorRegistry()
        r = self.registry
        subscribed = r if control_plane else None
        self.handshakes = Counter(
            "outrider_tls_handshakes",
            "TLS handshakes and the peer checks after them, by result and reason",
            ["direction", "result", "reason", "tls_version", "cipher"],
            registry=r,
        )
        self.handshake_duration = Histogram(
            "outrider_tls_handshake_duration_seconds",
            "Time from TCP accept or connect to a verified peer",
            ["direction"],
            buckets=_HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.connections_active = Gauge(
            "outrider_connections_active", "Open relayed connections", ["direction"], registry=r
        )
        self.connections = Counter(
            "outrider_connections",
            "Connections established, counted once each: inbound once the peer's SVID is "
            "verified (mtls true, its ID) or a permissive port let plaintext through (mtls "
            "false); outbound once the app's connection is routed (mtls false: passed through)",
            ["direction", "mtls", "peer_id"],
            registry=r,
        )
        self.outbound_passthrough = Counter(
            "outrider_outbound_passthrough",
            "Captured outbound connections sent on in plain TCP, by reason: registry (a "
            "Service outside the mesh) or allow_any (an address outside the registry)",
            ["reason"],
            registry=r,
        )
        self.peer_connections = Counter(
            "outrider_peer_connections",
            "mTLS connections whose peer SPIFFE ID this side verified, by TLS version "
            "(outbound with TLS 1.3 the server checks our certificate after this count)",
            ["direction", "peer_id", "tls_version"],
            registry=r,
        )
        self.connections_refused = Counter(
            "outrider_connections_refused",
            "Connections closed before relaying for a reason other than the peer's certificate",
            ["direction", "reason"],
            registry=r,
        )
        self.pending_handshakes = Gauge(
            "outrider_pending_handshakes",
            "Inbound connections accepted whose peer is not verified yet "
            "(at most limits.max_pending_handshakes)",
            registry=r,
        )
        self.svid_expiry = Gauge(
            "outrider_svid_expiry_timestamp_seconds",
            "NotAfter of the SVID in use (Unix time)",
            registry=r,
        )
        self.rotations = Counter(
            "outrider_svid_rotations", "SVID renewals by result", ["result"], registry=r
        )
        self.workload_keys_handed_out = Counter(
            "outrider_workload_keys_handed_out",
            "Private keys sent to the pod's processes over the Workload API socket (`workload_api:`"
            "), by API: the only keys that leave the agent's memory (docs/workload-api.md)",
            ["api"],
            registry=r,
        )
        self.workload_api_refusals = Counter(
            "outrider_workload_api_refusals",
            "Calls and connections on the Workload API socket refused, by API and reason",
            ["api", "reason"],
            registry=r,
        )
        self.bundle_expiry = Gauge(
            "outrider_trust_bundle_expiry_timestamp_seconds",
            "Earliest NotAfter among the trust bundle's roots (Unix time)",
            registry=r,
        )
        self.authz_decisions = Counter(
            "outrider_authz_decisions",
            "Authorization decisions by policy and rule: allow and deny are enforced; audit, "
            "dry_run_allow and dry_run_deny are recorded only",
            ["decision", "policy", "rule"],
            registry=r,
        )
        self.requests = Counter(
            "outrider_requests",
            "HTTP requests on L7 ports by the peer that sent them and the status answered",
            ["direction", "peer_id", "code"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "outrider_upstream_requests",
            "Requests on HTTP outbound listeners by upstream and the status the app got "
            "(5xx from the agent itself when no endpoint could answer)",
            ["upstream", "code"],
            registry=r,
        )
        self.grpc_requests = Counter(
            "outrider_grpc_requests",
            "gRPC calls on inbound L7 ports by the peer that made them and the grpc-status "
            "the caller got (the agent's own refusals included)",
            ["direction", "peer_id", "grpc_status"],
            registry=r,
        )
        self.upstream_grpc_requests = Counter(
            "outrider_upstream_grpc_requests",
            "gRPC calls on outbound listeners by upstream and the grpc-status the app got",
            ["upstream", "grpc_status"],
            registry=r,
        )
        self.http2_limits = Counter(
            "outrider_http2_limits",
            "HTTP/2 connections or streams stopped at a limit, by the limit: " + ", ".join(LIMITS),
            ["direction", "limit"],
            registry=r,
        )
        self.upstream_request_duration = Histogram(
            "outrider_upstream_request_duration_seconds",
            "Time from a request's head to the end of its response, retries included",
            ["upstream"],
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.upstream_endpoints = Gauge(
            "outrider_upstream_endpoints",
            "Endpoints of each upstream by health state",
            ["upstream", "state"],
            registry=r,
        )
        self.upstream_retries = Counter(
            "outrider_upstream_retries",
            "Tries after the first, by upstream",
            ["upstream"],
            registry=r,
        )
        self.upstream_ejections = Counter(
            "outrider_upstream_ejections",
            "Endpoints ejected by outlier detection, by upstream",
            ["upstream"],
            registry=r,
        )
        self.upstream_overflows = Counter(
            "outrider_upstream_overflows",
            "Requests or connections refused at once (503) because a circuit breaker limit "
            "was reached or the retry budget was spent",
            ["upstream", "reason"],
            registry=r,
        )
        self.upstream_connections = Counter(
            "outrider_upstream_connections",
            "mTLS connections opened to upstream endpoints, and how they were used "
            "(new: dialled for a request or a TCP connection; reused: taken from the pool)",
            ["upstream", "kind"],
            registry=r,
        )
        self.config_reloads = Counter(
            "outrider_config_reloads",
            "Config reloads by kind and result",
            ["kind", "result"],
            registry=r,
        )
        self.ca_backoff = Gauge(
            "outrider_ca_backoff_seconds",
            "Seconds until the next attempt to reach the CA after a failure (0 when healthy)",
            registry=r,
        )
        self.control_plane_connected = Gauge(
            "outrider_control_plane_connected",
            "1 while the agent holds a verified stream to the control plane, else 0 "
            "(the last config it applied keeps serving meanwhile)",
            registry=subscribed,
        )
        self.control_plane_updates = Counter(
            "outrider_control_plane_updates",
            "Snapshots from the control plane by result: applied (acknowledged) or "
            "rejected (answered with the reason; the running config stays)",
            ["result"],
            registry=subscribed,
        )
        for result in ("applied", "rejected"):
            self.control_plane_updates.labels(result)  # 0 from the start, for rate()
