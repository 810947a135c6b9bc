"""TrafficPolicy: agent.yaml's outbound keys in camelCase, attached to a Service."""

from __future__ import annotations

from typing import Any

import pytest

from control.core.mesh import Mesh, MeshSettings, compile_mesh
from tests.cluster import SHOP, agent_accepts, world, write_statuses

SETTINGS = MeshSettings("example.org")


def _traffic(spec: str, name: str = "backend", generation: int = 1) -> str:
    return f"""\
apiVersion: networking.outrider.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: {name}, namespace: shop, generation: {generation}}}
spec:
  targetRefs: [{{group: "", kind: Service, name: backend}}]
{spec}
---
"""


EVERY_KEY = """\
  balancer: ring_hash
  hashOn: {header: X-User}
  health:
    active: {kind: http, path: /healthz, interval: 5s, timeout: 1s, healthyThreshold: 2,
             unhealthyThreshold: 3}
    outlier: {consecutiveFailures: 5, consecutive5xx: 4, baseEjection: 30s, maxEjection: 300s,
              maxEjectionPercent: 50}
    panicThreshold: 40
  timeouts: {connect: 1s, perTry: 1s, request: 5s}
  retries: {max: 2, retryOn: [connect-failure, refused-stream, "503", unavailable],
            nonIdempotent: false,
            budget: {percent: 20, minConcurrency: 3}}
  circuitBreaker: {maxConnections: 1024, maxPending: 512, maxRequests: 256}
  pool: {idleTimeout: 60s}
"""


def _outbound(mesh: Mesh, pod: str = "frontend-0") -> dict[str, Any]:
    config = mesh.config_for("shop", pod)
    assert config is not None
    agent_accepts(config)
    (outbound,) = config["outbound"]
    return dict(outbound)


def _accepted(mesh: Mesh, name: str = "backend") -> tuple[str, str, str]:
    (c,) = mesh.statuses[("TrafficPolicy", "shop", name)]["conditions"]
    return c["status"], c["reason"], c["message"]


def test_every_key_reaches_the_clients_outbound_in_the_agents_spelling() -> None:
    mesh = compile_mesh(world(SHOP, _traffic(EVERY_KEY)), SETTINGS)
    outbound = _outbound(mesh)
    assert {k: v for k, v in outbound.items() if k not in ("name", "listen", "endpoints")} == {
        "protocol": "http",
        "server_ids": ["spiffe://example.org/ns/shop/sa/backend"],
        "balancer": "ring_hash",
        "hash_on": {"header": "X-User"},
        "health": {
            "active": {
                "kind": "http",
                "path": "/healthz",
                "interval": "5s",
                "timeout": "1s",
                "healthy_threshold": 2,
                "unhealthy_threshold": 3,
            },
            "outlier": {
                "consecutive_failures": 5,
                "consecutive_5xx": 4,
                "base_ejection": "30s",
                "max_ejection": "300s",
                "max_ejection_percent": 50,
            },
            "panic_threshold": 40,
        },
        "timeouts": {"connect": "1s", "per_try": "1s", "request": "5s"},
        "retries": {
            "max": 2,
            "retry_on": ["connect-failure", "refused-stream", 503, "unavailable"],
            "non_idempotent": False,
            "budget": {"percent": 20, "min_concurrency": 3},
        },
        "circuit_breaker": {"max_connections": 1024, "max_pending": 512, "max_requests": 256},
        "pool": {"idle_timeout": "60s"},
    }
    assert _accepted(mesh) == ("True", "Accepted", "applied to the clients of its targets")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("  balancer: fastest\n", "spec.balancer: 'fastest' is not one of round_robin"),
        ("  hashOn: {header: x}\n", "spec.hashOn: only ring_hash and maglev hash"),
        (
            "  health: {outlier: {consecutive5xx: 0}}\n",
            "spec.health.outlier.consecutive5xx: must be",
        ),
        ("  retries: {retryOn: [teapot]}\n", "spec.retries.retryOn[0]: 'teapot' is not one of"),
        ("  timeouts: {perTry: soon}\n", "spec.timeouts.perTry: 'soon' is not a duration"),
        (
            "  pool: {idle_timeout: 5s}\n",
            "spec.pool.idle_timeout: unknown key; expected camelCase: idleTimeout",
        ),
        ("  circuitBreaker: {maxConns: 5}\n", "spec.circuitBreaker.maxConns: unknown key"),
        ("  mirror: {}\n", "spec.mirror: unknown key; expected targetRefs or one of balancer"),
        (  # run by every client's agent, per endpoint: not the Service owner's to make hot
            "  health: {active: {kind: tcp, interval: 999ms, timeout: 1ms}}\n",
            "spec.health.active.interval: must be at least 1s",
        ),
    ],
)
def test_an_invalid_traffic_policy_names_the_field_and_is_not_applied(
    spec: str, message: str
) -> None:
    mesh = compile_mesh(world(SHOP, _traffic(spec)), SETTINGS)
    status, reason, text = _accepted(mesh)
    assert (status, reason) == ("False", "Invalid")
    assert text.startswith(message), text
    assert text.endswith("; it is not applied")
    assert "balancer" not in _outbound(mesh)


def test_an_invalid_edit_keeps_the_previous_version() -> None:
    objects = world(SHOP, _traffic("  balancer: least_request\n"))
    good = compile_mesh(objects, SETTINGS)
    write_statuses(objects, good.statuses)
    (edited,) = world(_traffic("  balancer: fastest\n", generation=2))["TrafficPolicy"].values()
    edited["status"] = objects["TrafficPolicy"][("shop", "backend")]["status"]
    objects["TrafficPolicy"][("shop", "backend")] = edited
    # A replica that never saw the good version (no `previous`) keeps it all the same.
    bad = compile_mesh(objects, SETTINGS)
    assert _outbound(bad)["balancer"] == "least_request"
    assert _accepted(bad)[2].endswith("; the previous version (generation 1) stays in force")


def test_targets_must_be_services_that_exist() -> None:
    missing = _traffic("  balancer: random\n").replace("name: backend}", "name: gone}")
    assert _accepted(compile_mesh(world(SHOP, missing), SETTINGS)) == (
        "False",
        "TargetNotFound",
        "Service shop/gone not found",
    )
    gateway = _traffic("  balancer: random\n").replace('group: "", kind: Service', "kind: Gateway")
    status, reason, message = _accepted(compile_mesh(world(SHOP, gateway), SETTINGS))
    assert (status, reason) == ("False", "Invalid")
    assert message.startswith("spec.targetRefs[0]: kind 'Gateway' (group '') is not supported")


def test_of_two_for_one_service_the_older_applies() -> None:
    mesh = compile_mesh(
        world(SHOP, _traffic("  balancer: random\n"), _traffic("  balancer: maglev\n", "newer")),
        SETTINGS,
    )
    assert _outbound(mesh)["balancer"] == "random"
    assert _accepted(mesh, "newer") == (
        "False",
        "Conflicted",
        "Service backend port 8080: TrafficPolicy backend is older and applies",
    )


def test_hashing_on_a_header_is_left_out_on_a_tcp_port_and_said() -> None:
    tcp = SHOP.replace("appProtocol: http}]", "}]")
    mesh = compile_mesh(
        world(tcp, _traffic("  balancer: ring_hash\n  hashOn: {cookie: s}\n")), SETTINGS
    )
    outbound = _outbound(mesh)
    assert (outbound["protocol"], outbound["balancer"], "hash_on" in outbound) == (
        "tcp",
        "ring_hash",
        False,
    )
    assert _accepted(mesh) == (
        "True",
        "Accepted",
        "Service backend port 8080 is TCP: hashOn a header or cookie is left out there (set"
        " appProtocol: http, http2 or grpc to hash on it)",
    )


@pytest.mark.parametrize("app_protocol", ["grpc", "kubernetes.io/h2c"])
def test_a_key_the_agent_refuses_on_a_ports_protocol_leaves_the_policy_out_there_and_said(
    app_protocol: str,
) -> None:
    """An HTTP/1.1 active check, which an h2c or gRPC upstream refuses: every captured
    pod's snapshot holds this Service's entry, and an agent refuses a snapshot whole."""
    h2c = SHOP.replace("appProtocol: http}]", f"appProtocol: {app_protocol}}}]")
    check = "  health: {active: {kind: http, path: /healthz, interval: 5s}}\n"
    mesh = compile_mesh(world(h2c, _traffic(check + "  balancer: random\n")), SETTINGS)
    outbound = _outbound(mesh)
    assert ("health" in outbound, "balancer" in outbound) == (False, False)  # none of it
    spoken = {"grpc": "gRPC", "kubernetes.io/h2c": "HTTP/2"}[app_protocol]
    protocol = {"grpc": "grpc", "kubernetes.io/h2c": "http2"}[app_protocol]
    assert _accepted(mesh) == (  # on no port: not accepted, though valid
        "False",
        "UnsupportedProtocol",
        f"Service backend port 8080 is {spoken}: the policy is not applied there"
        " (spec.health.active.kind: an http check speaks HTTP/1.1, which a protocol:"
        f" {protocol} upstream refuses; use kind: tcp)",
    )
    http = compile_mesh(world(SHOP, _traffic(check)), SETTINGS)
    assert _outbound(http)["health"]["active"]["kind"] == "http"


@pytest.mark.parametrize("app_protocol", ["grpc", "kubernetes.io/h2c"])
def test_hashing_on_a_header_on_an_h2c_port_is_what_the_agent_takes_and_said(
    app_protocol: str,
) -> None:
    """Kept where the agent hashes those requests, else left out with the reason: never a
    snapshot the agent refuses."""
    h2c = SHOP.replace("appProtocol: http}]", f"appProtocol: {app_protocol}}}]")
    mesh = compile_mesh(
        world(h2c, _traffic("  balancer: ring_hash\n  hashOn: {header: x-user}\n")), SETTINGS
    )
    outbound = _outbound(mesh)  # the agent takes it
    spoken = {"grpc": "gRPC", "kubernetes.io/h2c": "HTTP/2"}[app_protocol]
    if "hash_on" in outbound:
        assert _accepted(mesh) == ("True", "Accepted", "applied to the clients of its targets")
    else:
        status, reason, message = _accepted(mesh)
        assert (status, reason) == ("True", "Accepted")
        assert message.startswith(
            f"Service backend port 8080 is {spoken}: hashOn a header or cookie is left out"
            " there (set appProtocol: http"
        ), message


def test_a_routes_timeouts_win_over_the_traffic_policys() -> None:
    route = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: backend}]
  rules: [{timeouts: {request: 2s}, backendRefs: [{name: backend-v1, port: 8080}]}]
"""
    mesh = compile_mesh(
        world(SHOP, route, _traffic("  timeouts: {connect: 1s, request: 9s}\n")), SETTINGS
    )
    assert _outbound(mesh)["timeouts"] == {"connect": "1s", "request": "2s"}


@pytest.mark.parametrize(
    "spec",
    [
        '  serverIds: ["spiffe://example.org/ns/evil/sa/attacker"]\n',
        '  server_ids: ["spiffe://example.org/ns/evil/sa/attacker"]\n',
        '  endpoints: ["10.9.9.9:15443"]\n',
        "  subsets: [{name: evil, endpoints: [10.9.9.9:15443]}]\n",
        "  dns: {name: evil.example}\n",
        "  protocol: tcp\n",
        "  listen: 0.0.0.0:15001\n",
        "  name: other\n",
    ],
)
def test_an_app_team_cannot_choose_whom_clients_trust_or_reach(spec: str) -> None:
    """What a Service's clients connect to and the identities they accept come from the
    cluster (secure naming), never from a TrafficPolicy."""
    mesh = compile_mesh(world(SHOP, _traffic(spec)), SETTINGS)
    assert _accepted(mesh)[:2] == ("False", "Invalid")
    outbound = _outbound(mesh)
    assert outbound["server_ids"] == ["spiffe://example.org/ns/shop/sa/backend"]
    assert outbound["endpoints"] == ["10.0.0.7:15443", "10.0.0.8:15443"]
    assert (outbound["name"], outbound["listen"], outbound["protocol"]) == (
        "backend.shop:8080",
        "127.0.0.1:15001",
        "http",
    )


def test_a_traffic_policy_past_its_share_of_every_callers_snapshot_is_refused() -> None:
    """Every caller's entry for its Services repeats its settings: eight of 750 KB named in
    one pod's annotation took that pod past what its agent takes, frozen with no word."""
    retries = "  retries: {max: 2, retryOn: [" + ", ".join(["503"] * 3000) + "]}\n"
    mesh = compile_mesh(world(SHOP, _traffic(retries)), SETTINGS)
    status, reason, message = _accepted(mesh)
    assert (status, reason) == ("False", "Invalid")
    assert message.startswith("spec: its settings take 12")
    assert message.endswith(
        "; a TrafficPolicy may take 8192 and 256, as every caller of its Services repeats them;"
        " it is not applied"
    )
    assert "retries" not in _outbound(mesh)


def test_a_policy_left_out_of_a_port_leaves_it_to_the_next_one_that_applies() -> None:
    """An older policy the port's protocol refuses claims nothing there: a younger one
    that the agent takes applies, and neither status says otherwise."""
    grpc = SHOP.replace("appProtocol: http}]", "appProtocol: grpc}]")
    older = _traffic("  health: {active: {kind: http, path: /healthz, interval: 5s}}\n", "old")
    younger = _traffic("  retries: {max: 3}\n", "young").replace(
        "metadata: {name: young",
        "metadata: {creationTimestamp: '2030-01-01T00:00:00Z', name: young",
    )
    mesh = compile_mesh(world(grpc, older, younger), SETTINGS)
    assert _outbound(mesh)["retries"] == {"max": 3}
    assert _accepted(mesh, "young") == ("True", "Accepted", "applied to the clients of its targets")
    assert _accepted(mesh, "old")[:2] == ("False", "UnsupportedProtocol")
