"""The agent's Prometheus metrics (names from DESIGN.md), on a registry of its own.

Label values are bounded: directions, results, reasons from fixed lists,
TLS versions and ciphers from OpenSSL, and peer SPIFFE IDs, which only the CA
can mint (only verified peers', `""` for none). Children with fixed labels are
bound once here, off the hot path.

The info series say what an auditor cannot infer from counters: which
identity this agent is (`outrider_agent_info`), which SVID it holds now
(`outrider_svid_info`: one series per SVID, the previous one gone on rotation,
so Prometheus keeps the history) and how each port it listens on takes
plaintext (`outrider_listener_info`, read from the running listeners at scrape
time: a reload or a control-plane snapshot shows at the next scrape).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import NamedTuple

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from agent.core.h2limits import LIMITS
from agent.core.svid import Svid
from identity import SpiffeId
from identity.build import VERSION
from identity.registry import SUB_MILLISECOND, component_registry

#: The clock every measured duration is read on: monotonic and sub-microsecond. The event
#: loop's clock is for scheduling only: uvloop's is cached once per loop iteration in whole
#: milliseconds, which put every sub-millisecond handshake or request at 0 or 1 ms.
clock = time.perf_counter


def since(started: float) -> float:
    """Seconds from `started`, a reading of `clock`, until now."""
    return clock() - started


class Tally:
    """A metric child's value, counted by the event loop with a plain `+=`.

    prometheus_client keeps each child's value in a MutexValue (a float behind a lock,
    since any thread may count), and its inc() and observe() are Python calls that take
    that lock: a few microseconds on every request. The counts the request path makes
    per request (`tallied`, `TalliedHistogram`) are made only on the event loop's thread,
    by a `+=` on `value`; a scrape reads them with `get()`, as it reads any child.
    The family, labels and exposition are prometheus_client's, unchanged.
    """

    __slots__ = ("value",)

    def __init__(self, value: float = 0.0) -> None:
        self.value = value

    # prometheus_client's value protocol (values.MutexValue)
    def inc(self, amount: float) -> None:
        self.value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self.value = value

    def set_exemplar(self, exemplar: object) -> None:
        pass  # the agent sets none

    def get(self) -> float:
        return self.value

    def get_exemplar(self) -> None:
        return None


def tallied(child: Counter) -> Tally:
    """`child`'s value as a Tally (once: a child bound again keeps it), its count so far kept."""
    value = child._value  # the value-class extension point (values.py)
    if not isinstance(value, Tally):
        value = child._value = Tally(value.get())
    return value


class TalliedHistogram:
    """A histogram child observed by the event loop (see Tally): `observe` as
    prometheus_client's Histogram.observe does it (the first bucket whose upper bound
    holds the amount, and the sum), its values Tallies."""

    __slots__ = ("bounds", "buckets", "sum")

    def __init__(self, child: Histogram) -> None:
        self.bounds: tuple[float, ...] = tuple(child._upper_bounds)
        buckets = child._buckets
        for i, bucket in enumerate(buckets):
            if not isinstance(bucket, Tally):
                buckets[i] = Tally(bucket.get())
        self.buckets: list[Tally] = buckets
        total = child._sum
        if not isinstance(total, Tally):
            total = child._sum = Tally(total.get())
        self.sum: Tally = total

    def observe(self, amount: float) -> None:
        self.sum.value += amount
        for i, bound in enumerate(self.bounds):
            if amount <= bound:
                self.buckets[i].value += 1.0
                return


_REQUEST_BUCKETS = (
    *SUB_MILLISECOND,
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
_HANDSHAKE_BUCKETS = (
    *SUB_MILLISECOND,
    *(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0),
)


class ListenerRow(NamedTuple):
    """One port the agent serves: `port` is the port number, or `*` for every port of the
    pod the capture listener serves by its default mode; mtls_mode is strict (mTLS only)
    or permissive (plaintext let through too)."""

    direction: str
    port: str
    protocol: str
    mtls_mode: str


def rfc3339(moment: datetime) -> str:
    """`2026-12-06T14:00:00Z`: UTC, whole seconds (a label value, compared as text)."""
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


class _ListenerInfo(Collector):
    """outrider_listener_info, from the listeners running at scrape time."""

    def __init__(self) -> None:
        self.rows: Callable[[], Iterable[ListenerRow]] = tuple

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "outrider_listener_info",
            "1 per port the agent listens on or serves by capture, with its mTLS mode: "
            "strict (mTLS only) or permissive (plaintext let through too)",
            labels=list(ListenerRow._fields),
        )
        for row in sorted(set(self.rows())):
            family.add_metric(list(row), 1)
        yield family


#: The status counted in the HTTP request counters for a request whose client went away
#: (reset its stream, or closed its connection) before any answer went out: nginx's 499,
#: as Envoy and nginx log it; a gRPC call so ended is counted CANCELLED.
CLIENT_CLOSED = 499


class AgentMetrics:
    def __init__(self, spiffe_id: SpiffeId | None = None, *, control_plane: bool = False) -> None:
        """`spiffe_id`: the agent's own, for outrider_agent_info. `control_plane`: the agent
        subscribes to one (`control:`), so /metrics shows the control-plane series; an agent
        of files alone shows none (not a "disconnected" 0)."""
        self.registry = component_registry("agent")
        r = self.registry
        subscribed = r if control_plane else None
        self.agent_info = Gauge(
            "outrider_agent_info",
            "1, labelled with the agent's own SPIFFE ID and version",
            ["spiffe_id", "version"],
            registry=r,
        )
        if spiffe_id is not None:
            self.agent_info.labels(str(spiffe_id), VERSION).set(1)
        self.svid_info = Gauge(
            "outrider_svid_info",
            "1 for the SVID in use: its SPIFFE ID, serial (hex) and validity (RFC 3339 UTC); "
            "a new series per rotation, the previous one removed",
            ["spiffe_id", "serial", "not_before", "not_after"],
            registry=r,
        )
        self.listeners = _ListenerInfo()
        r.register(self.listeners)
        self.authz_denials = Counter(
            "outrider_authz_denials",
            "Enforced denies by policy, rule and the caller's verified SPIFFE ID "
            '("" for a plaintext caller)',
            ["policy", "rule", "peer_id"],
            registry=r,
        )
        self.handshakes = Counter(
            "outrider_tls_handshakes",
            "TLS handshakes and the peer checks after them, by result and reason",
            ["direction", "result", "reason", "tls_version", "cipher"],
            registry=r,
        )
        self.resumed_handshakes = Counter(
            "outrider_tls_resumed_handshakes",
            "Handshakes counted ok in outrider_tls_handshakes_total that resumed a TLS 1.3 "
            "session (tls.resumption), the peer checked as on a full one",
            ["direction"],
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
            "Connections established, counted once each after the handshake: mtls true (with "
            "its peer_id) once the peer's SVID is verified, inbound or on each mTLS "
            "connection this agent makes (pooled ones serve many of the app's); mtls false "
            "when a permissive port let plaintext through (inbound) or the app's connection "
            "was passed through outside the mesh (outbound)",
            ["direction", "mtls", "peer_id"],
            registry=r,
        )
        self.outbound_app_connections = Counter(
            "outrider_outbound_app_connections",
            "The app's connections taken by outbound listeners, by route: upstream (served "
            "over the upstream's mTLS connections), endpoint (a captured pod address: an mTLS "
            "connection to it) or passthrough (plain TCP outside the mesh)",
            ["route"],
            registry=r,
        )
        #: Its children by route, bound once: one is counted per app connection.
        self.routed = {
            route: self.outbound_app_connections.labels(route)
            for route in ("upstream", "endpoint", "passthrough")
        }
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
        self.access_log_dropped = Counter(
            "outrider_access_log_dropped_lines",
            "Access log lines dropped because stdout's reader fell behind (more than 4 MiB "
            "of lines waiting) or stdout was gone: lines are never written from the data "
            "plane's event loop, nor held without bound",
            registry=r,
        )
        self.spans = Counter(
            "outrider_spans",
            "Spans for the OTLP receiver (tracing.otlp_endpoint) by result: sent (the "
            "receiver took them), dropped (the queue of 2,048 was full, or the receiver "
            "refused them, or was away past the retries)",
            ["result"],
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

    def svid_installed(self, svid: Svid) -> None:
        """`svid` is in use from now on: its expiry, and its info series replacing the last."""
        self.svid_expiry.set(svid.not_after.timestamp())
        self.svid_info.clear()
        labels = (str(svid.spiffe_id), svid.serial, rfc3339(svid.not_before))
        self.svid_info.labels(*labels, rfc3339(svid.not_after)).set(1)

    def denied(self, policy: str, rule: str, peer: SpiffeId | None) -> None:
        """An enforced deny of `peer` (verified; None for a plaintext caller)."""
        self.authz_denials.labels(policy, rule, str(peer or "")).inc()

    def listening(self, rows: Callable[[], Iterable[ListenerRow]]) -> None:
        """outrider_listener_info is `rows()` at each scrape."""
        self.listeners.rows = rows
