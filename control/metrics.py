"""The control plane's Prometheus metrics, on a registry of its own."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram

from control.core.mesh import KINDS
from identity.registry import SUB_MILLISECOND, component_registry
from identity.serving import CLOSE_REASONS

#: What became of a snapshot sent: the agent applied it, refused it, was sent a
#: newer one before answering, or went away without answering.
PUSH_RESULTS = ("acked", "nacked", "superseded", "abandoned")
STATUS_RESULTS = ("written", "conflict", "failed", "refused", "gone")
_COMPILE_BUCKETS = (*SUB_MILLISECOND, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
_ACK_BUCKETS = (*_COMPILE_BUCKETS, 2.5, 5.0, 10.0)


#: The control plane's ports, each behind an acceptor of its own (control/app.py).
LISTENERS = ("grpc", "debug", "status")


class ControlMetrics:
    def __init__(self) -> None:
        self.registry = component_registry("control")
        r = self.registry
        self.agents = Gauge(
            "outrider_control_agents_connected", "Agents subscribed now", registry=r
        )
        self.pushes = Counter(
            "outrider_control_pushes",
            f"Snapshots sent to agents, by what became of them ({', '.join(PUSH_RESULTS)})",
            ["result"],
            registry=r,
        )
        self.push_ack = Histogram(
            "outrider_control_push_ack_seconds",
            "From sending a snapshot to the agent's Ack or Nack of it",
            buckets=_ACK_BUCKETS,
            registry=r,
        )
        self.denied = Counter(
            "outrider_control_subscriptions_denied",
            "Subscriptions refused: the SVID may not speak for the pod it names",
            registry=r,
        )
        self.watch_restarts = Counter(
            "outrider_control_watch_restarts",
            "Lists of a kind after the first: a watch expired (410) or failed",
            ["kind"],
            registry=r,
        )
        self.objects = Gauge(
            "outrider_control_objects", "Objects held, by kind", ["kind"], registry=r
        )
        self.compiles = Histogram(
            "outrider_control_compile_seconds",
            "Time to compile the mesh from every object held",
            buckets=_COMPILE_BUCKETS,
            registry=r,
        )
        self.status_writes = Counter(
            "outrider_control_status_writes",
            f"Status subresource writes, by result ({', '.join(STATUS_RESULTS)})",
            ["result"],
            registry=r,
        )
        self.services_left_out = Gauge(
            "outrider_control_captured_services_left_out",
            "Services left out of every captured pod's snapshot, to keep it within what an"
            " agent takes (the log names them)",
            registry=r,
        )
        self.connections_closed = Counter(
            "outrider_control_connections_closed",
            f"Connections closed at a limit, by port ({', '.join(LISTENERS)}) and reason"
            f" ({', '.join(CLOSE_REASONS)})",
            ["listener", "reason"],
            registry=r,
        )
        for result in PUSH_RESULTS:  # exported at 0 from the start, for rates and alerts
            self.pushes.labels(result)
        for result in STATUS_RESULTS:
            self.status_writes.labels(result)
        for kind in KINDS:
            self.watch_restarts.labels(kind)
        for listener in LISTENERS:
            for reason in CLOSE_REASONS:
                self.connections_closed.labels(listener, reason)

    def connection_closed(self, listener: str) -> Callable[[str], None]:
        """What the acceptor of `listener` calls with the reason it closed a connection."""
        return lambda reason: self.connections_closed.labels(listener, reason).inc()

    def count_objects(self, count: Callable[[str], int]) -> None:
        for kind in KINDS:
            self.objects.labels(kind).set_function(lambda kind=kind: count(kind))  # type: ignore[misc]
