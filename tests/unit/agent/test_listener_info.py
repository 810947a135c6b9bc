"""outrider_listener_info tells a strict port from a permissive one, as the listeners
run now: an audit flags plaintext accepted where the port says strict."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from prometheus_client import generate_latest

from agent.adapters.listener_info import listener_rows
from agent.adapters.listeners import InboundCapture, OutboundCapture
from agent.adapters.metrics import AgentMetrics, ListenerRow
from agent.config import Inbound
from agent.core.authz import AllowList
from agent.core.captured import Captured, OutboundRoutes, PortOverride
from agent.core.upstream import Endpoint
from identity.configfile import Listen

ANY = Listen("0.0.0.0", 0)


def running(direction: str, config: object, address: str = "127.0.0.1:15006") -> Any:
    """What listener_rows reads of a listener: its direction, config and bound address."""
    return SimpleNamespace(direction=direction, config=config, address=address)


def inbound_capture(captured: Captured) -> InboundCapture:
    return InboundCapture(ANY, captured, AllowList(), frozenset())


def outbound_capture(captured: Captured) -> OutboundCapture:
    return OutboundCapture(ANY, OutboundRoutes((), captured, frozenset()), {}, captured)


def test_an_explicit_inbound_is_strict_on_its_bound_port() -> None:
    config = Inbound(ANY, Endpoint("127.0.0.1", 8080), AllowList(), "http")
    rows = list(listener_rows([running("inbound", config, "127.0.0.1:15443")]))
    assert rows == [ListenerRow("inbound", "15443", "http", "strict")]


def test_a_captured_pod_lists_each_named_port_and_its_default_for_the_rest() -> None:
    captured = Captured(
        "strict", ((8080, PortOverride("permissive", "http")), (9090, PortOverride(None, "grpc")))
    )
    rows = list(listener_rows([running("inbound", inbound_capture(captured))]))
    assert rows == [
        ListenerRow("inbound", "8080", "http", "permissive"),
        ListenerRow("inbound", "9090", "grpc", "strict"),
        ListenerRow("inbound", "*", "tcp", "strict"),
    ]


def test_outbound_capture_is_permissive_unless_nothing_may_leave_in_plain() -> None:
    open_ = running("outbound", outbound_capture(Captured()), "127.0.0.1:15001")
    closed = running("outbound", outbound_capture(Captured(policy="registry-only")))
    assert [row.mtls_mode for row in listener_rows([open_, closed])] == ["permissive", "strict"]


def test_an_unbound_listener_is_not_listed_and_rows_are_read_at_each_scrape() -> None:
    config = Inbound(ANY, Endpoint("127.0.0.1", 8080), AllowList(), "tcp")
    listeners = [running("inbound", config, "")]
    metrics = AgentMetrics()
    metrics.listening(lambda: listener_rows(listeners))
    assert b"outrider_listener_info{" not in generate_latest(metrics.registry)
    listeners.append(running("inbound", config, "127.0.0.1:15443"))
    page = generate_latest(metrics.registry).decode()
    assert (
        'outrider_listener_info{direction="inbound",mtls_mode="strict",port="15443",'
        'protocol="tcp"} 1.0' in page
    )
