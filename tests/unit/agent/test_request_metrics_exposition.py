"""The per-request upstream metrics, counted by the event loop with a plain `+=` (Tally),
are exposed exactly as prometheus_client's own inc() and observe() would expose them."""

from __future__ import annotations

from prometheus_client import generate_latest

from agent.adapters.metrics import AgentMetrics, TalliedHistogram, tallied
from agent.adapters.outbound_http import _observe
from agent.adapters.runtime import PeerSeries
from agent.adapters.upstreams import Counted
from identity import SpiffeId

#: Durations on and around the bucket bounds, none, and past the last.
SECONDS = [0.0, 0.0001, 0.00010001, 0.00025, 0.0007, 0.001, 0.0031, 0.5, 10.0, 10.5, 3600.0]


def _upstream_lines(metrics: AgentMetrics) -> list[str]:
    text = generate_latest(metrics.registry).decode()
    return [
        line
        for line in text.splitlines()
        if "outrider_upstream_" in line and "_created" not in line  # a creation time
    ]


def test_tallied_counts_are_exposed_as_prometheus_counts_them() -> None:
    tallied_metrics, counted_metrics = AgentMetrics(), AgentMetrics()
    counted = Counted(tallied_metrics, "backend")
    compiled = TalliedHistogram(tallied_metrics.upstream_request_duration.labels("compiled"))
    for family in (counted_metrics.upstream_retries, counted_metrics.upstream_ejections):
        family.labels("backend")  # bound by Counted, at 0
    counted_metrics.upstream_connections.labels("backend", "new")
    for n, seconds in enumerate(SECONDS):
        status = 200 if n % 3 else 503
        counted.request(status, seconds)  # what the h2 and gRPC outbounds call
        counted.code(status).value += 1.0  # what the HTTP/1.1 outbound does, compiled
        _observe(counted.duration, seconds)
        counted.reused_count.value += 1.0
        counted.reused.inc()  # the same child, counted by prometheus_client's inc()
        _observe(compiled, seconds)
        expected = counted_metrics.upstream_requests.labels("backend", str(status))
        expected.inc(2)
        counted_metrics.upstream_request_duration.labels("backend").observe(seconds)
        counted_metrics.upstream_request_duration.labels("backend").observe(seconds)
        counted_metrics.upstream_connections.labels("backend", "reused").inc(2)
        counted_metrics.upstream_request_duration.labels("compiled").observe(seconds)
    assert _upstream_lines(tallied_metrics) == _upstream_lines(counted_metrics)
    assert any("le=" in line for line in _upstream_lines(tallied_metrics))


def test_a_child_bound_again_keeps_its_count() -> None:
    """A reload makes a new Counted for a running upstream: the children, and their
    counts, are the ones already exposed."""
    metrics = AgentMetrics()
    metrics.upstream_connections.labels("backend", "reused").inc(3)
    first = Counted(metrics, "backend")
    first.reused_count.value += 1.0
    first.request(200, 0.002)
    again = Counted(metrics, "backend")
    assert again.reused_count is first.reused_count and again.reused_count.get() == 4.0
    assert tallied(metrics.upstream_connections.labels("backend", "reused")).get() == 4.0
    assert again.duration.sum is first.duration.sum and again.code(200).get() == 1.0


def test_a_peers_answered_requests_are_exposed_as_prometheus_counts_them() -> None:
    tallied_metrics, counted_metrics = AgentMetrics(), AgentMetrics()
    peer = SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend")
    series = PeerSeries(tallied_metrics, "inbound", peer)
    counted_metrics.connections.labels("inbound", "true", str(peer))  # bound by PeerSeries
    for status in (200, 200, 403, 200, 503):
        series.answered(status)
        counted_metrics.requests.labels("inbound", str(peer), str(status)).inc()

    def lines(metrics: AgentMetrics) -> list[str]:
        text = generate_latest(metrics.registry).decode()
        return [ln for ln in text.splitlines() if "outrider_" in ln and "_created" not in ln]

    assert lines(tallied_metrics) == lines(counted_metrics)
    assert any('code="403"' in line for line in lines(tallied_metrics))
