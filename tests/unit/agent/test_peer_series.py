"""The metric children bound once per verified peer (agent/adapters/runtime.py): the same
series as `labels()` would give, and a bounded number of bindings however many peers."""

from __future__ import annotations

from datetime import UTC, datetime

from agent.adapters.metrics import AgentMetrics
from agent.adapters.runtime import PEER_SERIES, Runtime
from agent.adapters.tls import Contexts
from agent.config import Limits
from identity import SpiffeId


def _runtime() -> Runtime:
    me = SpiffeId.parse("spiffe://example.org/ns/demo/sa/me")
    return Runtime(Limits(), Contexts(), AgentMetrics(), lambda: datetime.now(UTC), me)


def _peer(n: int) -> SpiffeId:
    return SpiffeId.parse(f"spiffe://example.org/ns/demo/sa/peer-{n}")


def _value(runtime: Runtime, name: str, **labels: str) -> float:
    return runtime.metrics.registry.get_sample_value(name, labels) or 0.0


def test_counts_land_in_the_series_labels_would_name() -> None:
    runtime = _runtime()
    runtime.established("inbound", _peer(1))
    runtime.established("inbound", None)  # a permissive port's plaintext client
    runtime.established("outbound", None)  # passed through outside the mesh
    runtime.series("inbound", _peer(1)).answered(200)
    runtime.series("inbound", None).answered(403)
    runtime.series("inbound", _peer(1)).grpc(0)
    connections = "outrider_connections_total"
    assert _value(runtime, connections, direction="inbound", mtls="true", peer_id=str(_peer(1)))
    assert _value(runtime, connections, direction="inbound", mtls="false", peer_id="") == 1
    assert _value(runtime, connections, direction="outbound", mtls="false", peer_id="") == 1
    requests = "outrider_requests_total"
    assert _value(runtime, requests, direction="inbound", peer_id=str(_peer(1)), code="200") == 1
    assert _value(runtime, requests, direction="inbound", peer_id="", code="403") == 1
    grpc = "outrider_grpc_requests_total"
    assert _value(runtime, grpc, direction="inbound", peer_id=str(_peer(1)), grpc_status="0") == 1


def test_bindings_stay_bounded_and_a_dropped_peer_counts_on_in_its_series() -> None:
    runtime = _runtime()
    for n in range(PEER_SERIES + 50):
        runtime.established("inbound", _peer(n))
    runtime.established("inbound", _peer(0))  # its binding was the first dropped
    assert len(runtime._series) <= PEER_SERIES
    labels = {"direction": "inbound", "mtls": "true", "peer_id": str(_peer(0))}
    assert _value(runtime, "outrider_connections_total", **labels) == 2
