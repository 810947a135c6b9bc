"""HTTPRoute and GRPCRoute on a Service (GAMMA): weighted subsets, or a status saying why not."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from control.core.mesh import Mesh, MeshSettings, compile_mesh
from tests.cluster import SHOP, agent_accepts, world
from tests.unit.control.test_captured_pods import _captured_shop

SETTINGS = MeshSettings("example.org")
SPLIT = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: backend-split, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: backend, port: 8080}]
  rules:
    - backendRefs:
        - {name: backend-v1, port: 8080, weight: 90}
        - {name: backend-v2, port: 8080, weight: 10}
"""


def _outbound(mesh: Mesh) -> dict[str, Any]:
    config = mesh.config_for("shop", "frontend-0")
    assert config is not None
    agent_accepts(config)
    (outbound,) = config["outbound"]
    return dict(outbound)


def _parents(mesh: Mesh, name: str = "backend-split", kind: str = "HTTPRoute") -> list[Any]:
    return list(mesh.statuses[(kind, "shop", name)]["parents"])


def _conditions(mesh: Mesh, name: str = "backend-split", kind: str = "HTTPRoute") -> dict[str, Any]:
    (parent,) = [
        p for p in _parents(mesh, name, kind) if p["controllerName"] == "outrider.io/control-plane"
    ]
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in parent["conditions"]}


def test_a_90_10_split_becomes_weighted_subsets() -> None:
    mesh = compile_mesh(world(SHOP, SPLIT), SETTINGS)
    assert _outbound(mesh) == {
        "name": "backend.shop:8080",
        "listen": "127.0.0.1:15001",
        "protocol": "http",
        "subsets": [
            {"name": "backend-v1", "weight": 90, "endpoints": ["10.0.0.7:15443"]},
            {"name": "backend-v2", "weight": 10, "endpoints": ["10.0.0.8:15443"]},
        ],
        "server_ids": ["spiffe://example.org/ns/shop/sa/backend"],
    }
    (parent,) = _parents(mesh)
    assert parent["parentRef"] == {"group": "", "kind": "Service", "name": "backend", "port": 8080}
    assert parent["controllerName"] == "outrider.io/control-plane"
    assert _conditions(mesh) == {
        "Accepted": ("True", "Accepted", "used by the clients of Service backend"),
        "ResolvedRefs": ("True", "ResolvedRefs", "every backendRef is a Service of this namespace"),
    }


def test_the_default_match_and_timeouts_are_supported() -> None:
    route = SPLIT.replace(
        "    - backendRefs:",
        "    - matches: [{path: {type: PathPrefix, value: /}}]\n"
        "      timeouts: {request: 1m30s, backendRequest: 500ms}\n"
        "      backendRefs:",
    )
    outbound = _outbound(compile_mesh(world(SHOP, route), SETTINGS))
    assert outbound["timeouts"] == {"request": "90s", "per_try": "500ms"}
    assert [s["weight"] for s in outbound["subsets"]] == [90, 10]


UNSUPPORTED = [
    (
        "    - matches: [{path: {type: PathPrefix, value: /api}}]\n      backendRefs:",
        "spec.rules[0].matches[0]: matching on path is not supported yet; only a rule for every"
        " request (leave matches out)",
    ),
    (
        "    - matches: [{headers: [{name: x-canary, value: 'yes'}]}]\n      backendRefs:",
        "spec.rules[0].matches[0]: matching on headers is not supported yet",
    ),
    (
        "    - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: backend-v2,"
        " port: 8080}}}]\n      backendRefs:",
        "spec.rules[0].filters[0]: RequestMirror is not supported yet",
    ),
    (
        "    - retry: {attempts: 2}\n      backendRefs:",
        "spec.rules[0].retry: not supported yet",
    ),
    (
        "    - timeouts: {request: 5x}\n      backendRefs:",
        "spec.rules[0].timeouts.request: '5x' is not a Gateway API duration",
    ),
    (
        "    - timeouts: {request: 1s, backendRequest: 2s}\n      backendRefs:",
        "spec.rules[0].timeouts.backendRequest: must not exceed request",
    ),
]


@pytest.mark.parametrize(("change", "message"), UNSUPPORTED)
def test_a_route_asking_for_more_is_not_used_and_says_which_field(
    change: str, message: str
) -> None:
    route = SPLIT.replace("    - backendRefs:", change)
    mesh = compile_mesh(world(SHOP, route), SETTINGS)
    accepted = _conditions(mesh)["Accepted"]
    assert accepted[:2] == ("False", "UnsupportedValue")
    assert accepted[2].startswith(message), accepted[2]
    assert accepted[2].endswith("; the route is not used")
    outbound = _outbound(mesh)  # the Service's own endpoints, unsplit
    assert outbound["endpoints"] == ["10.0.0.7:15443", "10.0.0.8:15443"]
    assert "subsets" not in outbound


def test_more_than_one_rule_hostnames_and_consumer_routes_are_not_supported() -> None:
    route = SPLIT + "    - backendRefs: [{name: backend-v1, port: 8080}]\n"
    route = route.replace(
        '  parentRefs: [{group: "", kind: Service, name: backend, port: 8080}]',
        "  hostnames: [backend.example.org]\n"
        '  parentRefs: [{group: "", kind: Service, name: backend, namespace: other, port: 8080}]',
    )
    message = _conditions(compile_mesh(world(SHOP, route), SETTINGS))["Accepted"][2]
    assert "spec.hostnames: not supported yet" in message
    assert "spec.parentRefs[0].namespace: a route for a Service in another namespace" in message
    assert "spec.rules[1]: more than one rule is not supported yet" in message


def test_a_missing_backend_is_reported_and_the_others_are_used() -> None:
    route = SPLIT.replace("name: backend-v2, port: 8080", "name: backend-v3, port: 8080")
    route += "        - {name: backend-v1, port: 9999, weight: 5}\n"
    route += "        - {name: backend-v2, namespace: other, port: 8080, weight: 5}\n"
    mesh = compile_mesh(world(SHOP, route), SETTINGS)
    resolved = _conditions(mesh)["ResolvedRefs"]
    assert resolved == (
        "False",
        "BackendNotFound",
        "spec.rules[0].backendRefs[1]: Service shop/backend-v3 not found;"
        " spec.rules[0].backendRefs[2].port: Service backend-v1 has no port 9999;"
        " spec.rules[0].backendRefs[3].namespace: a backend in another namespace needs a"
        " ReferenceGrant, which is not supported yet; the other backends are used",
    )
    assert _conditions(mesh)["Accepted"][0] == "True"
    assert [s["name"] for s in _outbound(mesh)["subsets"]] == ["backend-v1"]


def test_a_backend_of_weight_zero_gets_no_traffic() -> None:
    route = SPLIT.replace("weight: 10", "weight: 0")
    assert [
        s["name"] for s in _outbound(compile_mesh(world(SHOP, route), SETTINGS))["subsets"]
    ] == ["backend-v1"]


@pytest.mark.parametrize(
    "backends",
    [
        "- {name: backend-v3, port: 8080, weight: 100}",  # a flip to a Service not up yet
        "- {name: backend-v1, port: 8080, weight: 0}",  # every weight 0
    ],
)
def test_a_route_with_no_backend_to_send_to_keeps_the_services_own_endpoints(
    backends: str,
) -> None:
    """Never no entry: a captured app's call to the ClusterIP would pass through the
    mesh in plaintext, to pods that take mTLS."""
    route = SPLIT.split("        - {name: backend-v1")[0] + f"        {backends}\n"
    mesh = compile_mesh(world(SHOP, route), SETTINGS)
    outbound = _outbound(mesh)
    assert (outbound["endpoints"], "subsets" in outbound) == (
        ["10.0.0.7:15443", "10.0.0.8:15443"],
        False,
    )
    said = _conditions(mesh)["ResolvedRefs"][2]
    assert said.endswith(
        "until one resolves with weight, calls go to the parent Service's own endpoints"
        " (Gateway API would answer them 500)"
    )
    captured = _captured_shop(route)
    config = captured.config_for("shop", "frontend-0")
    assert config is not None
    assert config["captured"]["outbound"]["passthrough"] == []
    listed = {entry["name"]: entry for entry in config["outbound"]}
    assert listed["backend.shop:8080"]["endpoints"] == ["10.0.0.7:8080", "10.0.0.8:8080"]


def test_a_route_for_a_missing_service_or_port_matches_no_parent() -> None:
    mesh = compile_mesh(
        world(SHOP, SPLIT.replace("name: backend, port: 8080", "name: gone")), SETTINGS
    )
    assert _conditions(mesh)["Accepted"] == (
        "False",
        "NoMatchingParent",
        "Service shop/gone not found",
    )
    mesh = compile_mesh(world(SHOP, SPLIT.replace("port: 8080}]", "port: 81}]")), SETTINGS)
    assert _conditions(mesh)["Accepted"] == (
        "False",
        "NoMatchingParent",
        "Service backend has no port 81",
    )


def test_of_two_routes_for_one_service_port_the_older_applies() -> None:
    newer = SPLIT.replace("backend-split", "backend-newer").replace("weight: 90", "weight: 50")
    mesh = compile_mesh(world(SHOP, SPLIT, newer), SETTINGS)
    assert [s["weight"] for s in _outbound(mesh)["subsets"]] == [90, 10]
    assert _conditions(mesh, "backend-newer")["Accepted"] == (
        "False",
        "UnsupportedValue",
        "HTTPRoute shop/backend-split is older and routes Service backend port 8080; more than"
        " one route for a Service port is not supported yet",
    )


def test_entries_of_other_controllers_are_kept() -> None:
    objects = world(SHOP, SPLIT)
    theirs = {
        "parentRef": {"name": "edge", "namespace": "gateways"},
        "controllerName": "example.com/gateway",
        "conditions": [{"type": "Accepted", "status": "True"}],
    }
    objects["HTTPRoute"][("shop", "backend-split")]["status"] = {"parents": [theirs]}
    objects["HTTPRoute"][("shop", "backend-split")]["spec"]["parentRefs"].insert(
        0, {"name": "edge", "namespace": "gateways"}
    )
    mesh = compile_mesh(objects, SETTINGS)
    parents = _parents(mesh)
    assert parents[0] == theirs
    assert [p["controllerName"] for p in parents] == [
        "example.com/gateway",
        "outrider.io/control-plane",
    ]


def test_a_grpc_route_splits_too() -> None:
    route = SPLIT.replace("kind: HTTPRoute", "kind: GRPCRoute").replace(
        "backend-split", "grpc-split"
    )
    mesh = compile_mesh(world(SHOP, route), SETTINGS)
    assert [s["weight"] for s in _outbound(mesh)["subsets"]] == [90, 10]
    assert _conditions(mesh, "grpc-split", "GRPCRoute")["Accepted"][0] == "True"
    with_match = route.replace(
        "    - backendRefs:", "    - matches: [{method: {service: shop.Cart}}]\n      backendRefs:"
    )
    mesh = compile_mesh(world(SHOP, with_match), SETTINGS)
    assert _conditions(mesh, "grpc-split", "GRPCRoute")["Accepted"][2].startswith(
        "spec.rules[0].matches[0]: matching on method is not supported yet"
    )


def test_a_route_status_is_rewritten_only_when_it_changes() -> None:
    objects = world(SHOP, SPLIT)
    first = compile_mesh(objects, SETTINGS, now=datetime(2024, 5, 1, tzinfo=UTC))
    written = first.statuses[("HTTPRoute", "shop", "backend-split")]
    objects["HTTPRoute"][("shop", "backend-split")]["status"] = written
    later = compile_mesh(objects, SETTINGS, first, now=datetime(2024, 6, 1, tzinfo=UTC))
    assert later.statuses[("HTTPRoute", "shop", "backend-split")] == written


def test_a_route_only_for_a_gateway_gets_no_status_from_here() -> None:
    gateway_only = SPLIT.replace(
        '[{group: "", kind: Service, name: backend, port: 8080}]', "[{name: edge}]"
    )
    mesh = compile_mesh(world(SHOP, gateway_only), SETTINGS)
    assert ("HTTPRoute", "shop", "backend-split") not in mesh.statuses
    assert "subsets" not in _outbound(mesh)


@pytest.mark.parametrize(
    ("refs", "names"),
    [
        (["backend-v1", "backend-v1"], ["backend-v1", "backend-v1-1"]),
        (
            ["backend-v1", "backend-v1-2", "backend-v1"],
            ["backend-v1", "backend-v1-2", "backend-v1-1"],
        ),
        (
            ["backend-v1", "backend-v1-1", "backend-v1"],
            ["backend-v1", "backend-v1-1", "backend-v1-2"],
        ),
        (
            ["backend-v1", "backend-v1", "backend-v1-1", "backend-v1"],
            ["backend-v1", "backend-v1-1", "backend-v1-1-1", "backend-v1-2"],
        ),
    ],
)
def test_subset_names_are_unique_whatever_the_services_are_called(
    refs: list[str], names: list[str]
) -> None:
    """A name the agent sees twice makes it refuse the whole snapshot, and with it every
    policy change for every pod that calls the Service, in any namespace."""
    services = "".join(
        f"""\
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: shop}}
spec:
  selector: {{app: backend, version: v1}}
  ports: [{{name: http, port: 8080, targetPort: web, appProtocol: http}}]
---
"""
        for name in sorted(set(refs) - {"backend-v1"})
    )
    backends = ", ".join(f"{{name: {ref}, port: 8080}}" for ref in refs)
    route = SPLIT.replace(
        "        - {name: backend-v1, port: 8080, weight: 90}\n"
        "        - {name: backend-v2, port: 8080, weight: 10}\n",
        f"        [{backends}]\n",
    )
    mesh = compile_mesh(world(SHOP, services, route), SETTINGS)
    assert [s["name"] for s in _outbound(mesh)["subsets"]] == names
