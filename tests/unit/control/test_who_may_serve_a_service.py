"""Secure naming: the endpoints of a Service and the identities its clients accept come
only from pods of its namespace at their own IPs, whoever writes EndpointSlices by hand."""

from __future__ import annotations

import random
from typing import Any

import pytest

from control.core.mesh import Mesh, MeshSettings, compile_mesh
from tests.cluster import SHOP, Objects, agent_accepts, pod, world

SETTINGS = MeshSettings("example.org")
BACKEND_IDS = ["spiffe://example.org/ns/shop/sa/backend"]
#: An attacker's pod in a namespace of their own, with the backend's labels.
ATTACKER = pod(
    "backend-x-0",
    "evil",
    labels={"app": "backend", "version": "v1"},
    account="attacker",
    ip="10.9.9.9",
    ports=[(8080, "web")],
)
X_SERVICE = """\
apiVersion: v1
kind: Service
metadata: {name: x, namespace: evil}
spec:
  ports: [{name: http, port: 8080, appProtocol: http}]
---
"""


def _slice(
    namespace: str,
    service: str,
    address: str,
    target: dict[str, str],
    *,
    name: str = "by-hand",
    address_type: str = "IPv4",
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": address_type,
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {
                "addresses": [address],
                "conditions": {"ready": True},
                "targetRef": {"kind": "Pod", **target},
            }
        ],
    }


def _add(objects: Objects, item: dict[str, Any]) -> Objects:
    m = item["metadata"]
    objects["EndpointSlice"][(m["namespace"], m["name"])] = item
    return objects


def _outbound(mesh: Mesh, pod: str = "frontend-0") -> dict[str, dict[str, Any]]:
    config = mesh.config_for("shop", pod)
    assert config is not None
    agent_accepts(config)
    return {o["name"]: o for o in config["outbound"]}


def _calls(objects: Objects, upstreams: str) -> Objects:
    objects["Pod"][("shop", "frontend-0")]["metadata"]["annotations"]["outrider.io/upstreams"] = (
        upstreams
    )
    return objects


@pytest.mark.parametrize(
    "forged",
    [
        # In the Service's namespace, a real backend pod named at the attacker's address.
        _slice("shop", "backend", "10.9.9.9", {"namespace": "shop", "name": "backend-v1-0"}),
        # ... or the attacker's pod, from another namespace, at a backend's own address.
        _slice("shop", "backend", "10.0.0.7", {"namespace": "evil", "name": "backend-x-0"}),
        # ... or the attacker's pod at its own address.
        _slice("shop", "backend", "10.9.9.9", {"namespace": "evil", "name": "backend-x-0"}),
        # In the attacker's namespace, labelled with the backend's name.
        _slice("evil", "backend", "10.9.9.9", {"namespace": "evil", "name": "backend-x-0"}),
        _slice("evil", "backend", "10.9.9.9", {"name": "backend-x-0"}),
    ],
    ids=["victim-pod-at-other-ip", "other-ns-pod", "other-ns-pod-own-ip", "own-ns", "no-ns"],
)
def test_a_forged_slice_adds_no_address_or_identity_to_a_service(forged: dict[str, Any]) -> None:
    objects = _add(world(SHOP, ATTACKER), forged)
    backend = _outbound(compile_mesh(objects, SETTINGS))["backend.shop:8080"]
    assert backend["endpoints"] == ["10.0.0.7:15443", "10.0.0.8:15443"]
    assert backend["server_ids"] == BACKEND_IDS


def test_a_service_cannot_take_another_namespaces_pods_as_its_own() -> None:
    """evil/x, a Service without selector, with a slice naming shop's backend pod: the
    clients of x would otherwise accept shop's backend identity for it."""
    objects = _calls(world(SHOP, ATTACKER, X_SERVICE), "backend:8080,x.evil:8080")
    for address in ("10.9.9.9", "10.0.0.7"):
        _add(objects, _slice("evil", "x", address, {"namespace": "shop", "name": "backend-v1-0"}))
        mesh = compile_mesh(objects, SETTINGS)
        assert list(_outbound(mesh)) == ["backend.shop:8080"]
        assert any("x.evil:8080" in w for w in mesh.pod_warnings[("shop", "frontend-0")])


def test_the_attackers_own_pods_serve_only_the_attackers_service() -> None:
    objects = _calls(world(SHOP, ATTACKER, X_SERVICE), "backend:8080,x.evil:8080")
    _add(objects, _slice("evil", "x", "10.9.9.9", {"namespace": "evil", "name": "backend-x-0"}))
    x = _outbound(compile_mesh(objects, SETTINGS))["x.evil:8080"]
    assert x["endpoints"] == ["10.9.9.9:15443"]
    assert x["server_ids"] == ["spiffe://example.org/ns/evil/sa/attacker"]


def _backend_pod(objects: Objects, name: str = "backend-v2-0") -> dict[str, Any]:
    return objects["Pod"][("shop", name)]


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p["spec"].update(hostNetwork=True),  # the node's IP, shared
        lambda p: p.update(status={"phase": "Pending"}),  # no IP yet
        lambda p: p.update(status={"phase": "Running", "podIP": "10.0.0.99"}),  # not this one
    ],
    ids=["host-network", "no-ip-yet", "other-ip"],
)
def test_a_pod_is_an_endpoint_only_at_its_own_ip(change: Any) -> None:
    objects = world(SHOP)
    change(_backend_pod(objects))
    backend = _outbound(compile_mesh(objects, SETTINGS))["backend.shop:8080"]
    assert backend["endpoints"] == ["10.0.0.7:15443"]


def test_an_address_two_identities_claim_is_left_out_whatever_the_order() -> None:
    """A stale pod object still holding a recycled IP: which identity answers there
    cannot be told, so neither is trusted with it, in whatever order slices come."""
    other = pod(
        "stale-0", labels={"app": "backend"}, account="other", ip="10.0.0.7", ports=[(8080, "web")]
    )
    objects = world(SHOP, other)
    slices = list(objects["EndpointSlice"].items())
    _add(objects, _slice("shop", "backend", "10.0.0.7", {"name": "stale-0"}, name="a-first"))
    answers = set()
    for seed in range(8):
        random.Random(seed).shuffle(slices)
        objects["EndpointSlice"] = dict(slices)
        backend = _outbound(compile_mesh(objects, SETTINGS))["backend.shop:8080"]
        answers.add((tuple(backend["endpoints"]), tuple(backend["server_ids"])))
    assert answers == {(("10.0.0.8:15443",), tuple(BACKEND_IDS))}


def test_ipv6_and_dual_stack_pods_are_endpoints_fqdn_slices_are_not() -> None:
    objects = world(SHOP)
    _backend_pod(objects)["status"]["podIPs"].append({"ip": "fd00::0008"})
    _add(
        objects,
        _slice(
            "shop", "backend", "fd00::8", {"name": "backend-v2-0"}, name="v6", address_type="IPv6"
        ),
    )
    _add(
        objects,
        _slice(
            "shop",
            "backend",
            "backend.example",
            {"name": "backend-v1-0"},
            name="fqdn",
            address_type="FQDN",
        ),
    )
    backend = _outbound(compile_mesh(objects, SETTINGS))["backend.shop:8080"]
    assert backend["endpoints"] == ["10.0.0.7:15443", "10.0.0.8:15443", "[fd00::8]:15443"]
    assert backend["server_ids"] == BACKEND_IDS
