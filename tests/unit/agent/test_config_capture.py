"""The capture keys: `capture:` (the bootstrap's ports), `captured:` (a snapshot's modes and
outbound policy) and an outbound entry's `destinations`, every error with its key path."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.adapters.capture_listeners import agent_ports, capture_configs
from agent.app import load_policies
from agent.config import (
    MAX_SNAPSHOT_LISTENERS,
    CapturePorts,
    ConfigError,
    Document,
    parse,
    parse_snapshot,
)
from agent.core.captured import Captured, PortOverride
from agent.core.policyfile import PolicyError
from agent.core.upstream import Endpoint
from identity.configfile import Listen

BASE = Path("/etc/outrider")
BACKEND = "spiffe://example.org/ns/shop/sa/backend"


def raw(**sections: Any) -> dict[str, Any]:
    return {
        "identity": {"spiffe_id": "spiffe://example.org/ns/shop/sa/web"},
        "ca": {"address": "ca:8443", "bundle_file": "bundle.pem"},
        **sections,
    }


def upstream(name: str = "backend.shop:8080", **extra: Any) -> dict[str, Any]:
    return {"name": name, "endpoints": ["10.64.1.3:8080"], "server_ids": [BACKEND], **extra}


def errors(**sections: Any) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse(raw(**sections), base=BASE)
    return caught.value.errors


def test_capture_is_off_unless_the_bootstrap_says_and_its_ports_default_to_the_injectors() -> None:
    assert parse(raw(), base=BASE).capture is None
    ports = parse(raw(capture={}), base=BASE).capture
    assert ports == CapturePorts(15006, 15007)
    assert (ports.inbound, ports.outbound) == (Listen("0.0.0.0", 15006), Listen("127.0.0.1", 15007))


def test_captured_defaults_to_strict_and_allow_any() -> None:
    assert parse(raw(), base=BASE).captured == Captured("strict", (), "allow-any", frozenset())


def test_captured_as_the_control_plane_sends_it() -> None:
    captured = {
        "inbound": {
            "mtls": "permissive",
            "ports": {"8080": {"protocol": "http"}, "8081": {"mtls": "strict"}},
        },
        "outbound": {"policy": "registry-only", "passthrough": ["10.96.0.1:443", "[fd00::1]:53"]},
    }
    assert parse(raw(captured=captured), base=BASE).captured == Captured(
        "permissive",
        ((8080, PortOverride(None, "http")), (8081, PortOverride("strict", "tcp"))),
        "registry-only",
        frozenset({Endpoint("10.96.0.1", 443), Endpoint("fd00::1", 53)}),
    )


def test_every_capture_error_at_once_with_its_key_path() -> None:
    found = errors(
        capture={"inbound_port": 70000, "outbound_port": "x", "extra": 1},
        captured={
            "inbound": {"mtls": "lenient", "ports": {"http": {}, "8080": {"protocol": "udp"}}},
            "outbound": {"policy": "deny", "passthrough": ["backend.shop.svc:443", "10.0.0.1"]},
        },
    )
    assert found == [
        "capture.extra: unknown key",
        "capture.inbound_port: a port: 1 to 65535",
        "capture.outbound_port: must be an integer >= 1",
        "captured.inbound.mtls: 'lenient' is not one of strict, permissive",
        "captured.inbound.ports.http: not a port: a number 1 to 65535 (in quotes in JSON)",
        "captured.inbound.ports.8080.protocol: 'udp' is not one of tcp, http, http2, grpc",
        "captured.outbound.policy: 'deny' is not one of allow-any, registry-only",
        "captured.outbound.passthrough[0]: 'backend.shop.svc:443' is not ip:port or [v6]:port "
        "(an IP literal, no name)",
        "captured.outbound.passthrough[1]: '10.0.0.1' is not host:port",
    ]


def test_the_capture_ports_are_listeners_no_other_may_take() -> None:
    found = errors(
        capture={"inbound_port": 15020, "outbound_port": 15020},
        status="0.0.0.0:15020",
    )
    assert "capture.outbound_port: 15020 is also capture.inbound_port" in found
    assert any(e.startswith("capture.inbound_port: 0.0.0.0:15020 is already") for e in found)


def test_an_outbound_entry_may_have_destinations_instead_of_a_listener() -> None:
    config = parse(raw(outbound=[upstream(destinations=["10.96.0.20:8080"])]), base=BASE)
    assert config.outbound[0].listen is None
    assert config.outbound[0].destinations == (Endpoint("10.96.0.20", 8080),)
    both = upstream(listen="127.0.0.1:15001", destinations=["[FD00::20]:8080"])
    config = parse(raw(outbound=[both]), base=BASE)
    assert config.outbound[0].listen == Listen("127.0.0.1", 15001)
    assert config.outbound[0].destinations == (Endpoint("fd00::20", 8080),)  # as the kernel says


def test_an_outbound_entry_needs_a_listener_or_destinations() -> None:
    assert errors(outbound=[upstream()]) == [
        "outbound[0].listen: required: 127.0.0.1:<port> the app connects to, or destinations "
        "(captured Service addresses), or both"
    ]


def test_a_destination_belongs_to_one_upstream() -> None:
    found = errors(
        outbound=[
            upstream("a", destinations=["10.96.0.20:8080"]),
            upstream("b", destinations=["10.96.0.21:80", "10.96.0.20:8080", "10.96.0.21:80"]),
        ]
    )
    assert found == [
        "outbound[1].destinations[2]: 10.96.0.21:80 is listed twice",
        "outbound[1].destinations[1]: 10.96.0.20:8080 is also a destination of outbound[0] "
        "('a'); a destination belongs to one upstream",
    ]


def test_a_snapshot_carries_captured_and_destinations_only_entries_open_no_listener() -> None:
    bootstrap = Document(raw(capture={}), BASE, "env")
    entries = [
        upstream(f"svc-{i}.shop:80", destinations=[f"10.96.{i // 250}.{i % 250}:80"])
        for i in range(MAX_SNAPSHOT_LISTENERS + 1)
    ]
    snapshot = {"outbound": entries, "captured": {"inbound": {"mtls": "permissive"}}}
    _, config = parse_snapshot(bootstrap, json.dumps(snapshot).encode(), source="snap")
    assert len(config.outbound) == MAX_SNAPSHOT_LISTENERS + 1
    assert config.captured.mtls == "permissive"
    assert config.capture == CapturePorts()  # the bootstrap's: a snapshot cannot move it


def test_a_snapshot_cannot_set_the_capture_ports() -> None:
    bootstrap = Document(raw(), BASE, "env")
    with pytest.raises(ConfigError) as caught:
        parse_snapshot(bootstrap, b'{"capture": {"inbound_port": 8080}}', source="snap")
    assert caught.value.errors[0].startswith("capture: not a snapshot key")


def test_a_policy_with_http_fields_on_a_captured_tcp_port_is_refused_as_on_an_inbound() -> None:
    http_rule = {
        "name": "get-only",
        "action": "ALLOW",
        "rules": [{"to": {"ports": [8081], "methods": ["GET"]}}],
    }
    captured = {
        "inbound": {"ports": {"8081": {"mtls": "permissive"}, "8080": {"protocol": "http"}}}
    }
    config = parse(raw(capture={}, captured=captured, policy={"policies": [http_rule]}), base=BASE)
    with pytest.raises(PolicyError) as caught:
        load_policies(config)
    assert "applies to TCP port" in caught.value.errors[0]
    http_rule["rules"][0]["to"]["ports"] = [8080]  # type: ignore[index]
    config = parse(raw(capture={}, captured=captured, policy={"policies": [http_rule]}), base=BASE)
    assert load_policies(config).policies


@pytest.mark.parametrize("protocol", ["http2", "grpc"])
def test_a_grpc_method_rule_is_accepted_on_an_h2_port(protocol: str) -> None:
    greeter = {
        "name": "greeter",
        "action": "ALLOW",
        "rules": [
            {"to": {"ports": [9090], "methods": ["POST"], "paths": ["/demo.Greeter/SayHello"]}}
        ],
    }
    captured = {"inbound": {"ports": {"9090": {"protocol": protocol}}}}
    config = parse(raw(capture={}, captured=captured, policy={"policies": [greeter]}), base=BASE)
    assert [p.name for p in load_policies(config).policies] == ["greeter"]
    explicit = [{"listen": "127.0.0.1:15443", "app": "127.0.0.1:9090", "protocol": protocol}]
    config = parse(raw(inbound=explicit, policy={"policies": [greeter]}), base=BASE)
    assert [p.name for p in load_policies(config).policies] == ["greeter"]


def test_every_port_the_agent_listens_on_is_its_own_never_an_apps() -> None:
    """The inbound capture listener refuses these as original ports: relayed to
    127.0.0.1:<port> they would reach the agent (an outbound listener: the mesh, as
    this pod)."""
    config = parse(
        raw(
            capture={},
            status="0.0.0.0:15020",
            outbound=[
                upstream(listen="127.0.0.1:15001"),
                upstream("db.shop:5432", destinations=["10.96.0.9:5432"]),
            ],
        ),
        base=BASE,
    )
    assert agent_ports(config) == {15000, 15001, 15006, 15007, 15020}
    captures = capture_configs(config)
    assert captures is not None and captures[0].agent_ports == agent_ports(config)
