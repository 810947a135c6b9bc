"""A misspelt field in an AuthorizationPolicy or a TrafficPolicy, written by a client that
asks for no strict field validation (Helm, Argo CD, a client library): the API server keeps
it, the control plane refuses the object by the field's name, and the version in force
stays. Dropped instead, it would change what the policy means without a word."""

from __future__ import annotations

from typing import Any

import pytest

from control.core.mesh import Mesh, MeshSettings, compile_mesh
from tests.cluster import SHOP, ApiServer, policy_object, world

SETTINGS = MeshSettings("example.org")
FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
BACKEND = "{matchLabels: {app: backend}}"


def _policy(spec: str) -> str:
    return policy_object("AuthorizationPolicy", "api", spec)


def _traffic(spec: str) -> str:
    return policy_object("TrafficPolicy", "backend", spec)


def _accepted(mesh: Mesh, kind: str, name: str) -> tuple[str, str, str]:
    (c,) = mesh.statuses[(kind, "shop", name)]["conditions"]
    return c["status"], c["reason"], c["message"]


def _policies(mesh: Mesh, pod: str) -> list[Any]:
    config = mesh.config_for("shop", pod)
    assert config is not None
    return list(config["policy"]["policies"])


def _outbound(mesh: Mesh) -> dict[str, Any]:
    config = mesh.config_for("shop", "frontend-0")
    assert config is not None
    (outbound,) = config["outbound"]
    return dict(outbound)


def _edited(kind: str, good: str, bad: str) -> tuple[Mesh, Mesh, dict[str, Any]]:
    """The mesh with the good version, then after the bad edit; and the edit as stored."""
    objects = world(SHOP)
    api = ApiServer(objects)
    api.write(good)
    before = compile_mesh(objects, SETTINGS)
    assert _accepted(before, kind, "api" if kind == "AuthorizationPolicy" else "backend")[0] == (
        "True"
    )
    api.write_statuses(before.statuses)
    stored = api.write(bad)
    return before, compile_mesh(objects, SETTINGS, before), stored


@pytest.mark.parametrize(
    ("good", "bad", "field", "error"),
    [
        pytest.param(
            f"{{selector: {BACKEND}, rules: [{{from: {{principals: [{FRONTEND}]}}}}]}}",
            f"{{selector: {BACKEND}, rules: [{{form: {{principals: [{FRONTEND}]}}}}]}}",
            ("rules", 0, "form"),
            "spec.rules[0].form: unknown key (did you mean 'from'?); expected one of from,"
            " name, to, when",
            id="rules form: a rule that would match every request",
        ),
        pytest.param(
            f"{{selector: {BACKEND}, action: DENY, rules: [{{from: {{namespaces: [sandbox]}}}}]}}",
            f"{{selector: {BACKEND}, actoin: DENY, rules: [{{from: {{namespaces: [sandbox]}}}}]}}",
            ("actoin",),
            "spec.actoin: unknown key; expected one of action, mode, rules, selector",
            id="actoin: a DENY that would be an ALLOW",
        ),
        pytest.param(
            f"{{selector: {BACKEND}, action: DENY, rules: [{{from: {{namespaces: [sandbox]}}}}]}}",
            "{selector: {matchLabel: {app: backend}}, action: DENY,"
            " rules: [{from: {namespaces: [sandbox]}}]}",
            ("selector", "matchLabel"),
            "spec.selector.matchLabel: unknown key; expected matchLabels or matchExpressions",
            id="matchLabel: a selector that would be the whole namespace",
        ),
    ],
)
def test_a_misspelt_authorization_policy_field_is_refused_by_name(
    good: str, bad: str, field: tuple[str | int, ...], error: str
) -> None:
    before, after, stored = _edited("AuthorizationPolicy", _policy(good), _policy(bad))
    node: Any = stored["spec"]
    for step in field:  # kept as written, for the control plane to see
        node = node[step]
    assert _accepted(after, "AuthorizationPolicy", "api") == (
        "False",
        "Invalid",
        f"{error}; the previous version (generation 1) stays in force",
    )
    for pod in ("backend-v1-0", "backend-v2-0", "frontend-0"):
        assert _policies(after, pod) == _policies(before, pod)
    assert _policies(after, "frontend-0") == []  # never the whole namespace


TARGET = '{group: "", kind: Service, name: backend}'


@pytest.mark.parametrize(
    ("bad", "field", "error"),
    [
        pytest.param(
            f"{{targetRefs: [{TARGET}], circuitBreaker: {{maxConnection: 10}}}}",
            ("circuitBreaker", "maxConnection"),
            "spec.circuitBreaker.maxConnection: unknown key",
            id="maxConnection: no limit",
        ),
        pytest.param(
            f"{{targetRefs: [{TARGET}], circuitBreaker: {{maxConnections: 10}},"
            " timeout: {request: 1s}}",
            ("timeout",),
            "spec.timeout: unknown key; expected targetRefs or one of balancer, hashOn, health,"
            " timeouts, retries, circuitBreaker, pool",
            id="timeout: no request timeout",
        ),
        pytest.param(
            '{targetRefs: [{group: "", kind: Service, name: backend, sectioName: http}],'
            " circuitBreaker: {maxConnections: 20}}",
            ("targetRefs", 0, "sectioName"),
            "spec.targetRefs[0].sectioName: unknown key; expected one of group, kind, name,"
            " sectionName",
            id="sectioName: every port of the Service",
        ),
        pytest.param(
            f"{{targetRefs: [{TARGET}], circuitBreaker: {{maxConnections: 10}},"
            " balancer: ring_hash, hashOn: {source: {header: x-user}}}",
            ("hashOn", "source", "header"),
            "spec.hashOn.source.header: unknown key; expected {source: {}}",
            id="hashOn.source with a key",
        ),
    ],
)
def test_a_misspelt_traffic_policy_field_is_refused_by_name(
    bad: str, field: tuple[str | int, ...], error: str
) -> None:
    good = f"{{targetRefs: [{TARGET}], circuitBreaker: {{maxConnections: 10}}}}"
    before, after, stored = _edited("TrafficPolicy", _traffic(good), _traffic(bad))
    node: Any = stored["spec"]
    for step in field:
        node = node[step]
    assert _accepted(after, "TrafficPolicy", "backend") == (
        "False",
        "Invalid",
        f"{error}; the previous version (generation 1) stays in force",
    )
    assert _outbound(after) == _outbound(before)
    assert _outbound(after)["circuit_breaker"] == {"max_connections": 10}


@pytest.mark.parametrize(
    ("section", "accepted"),
    [
        ("http", ("True", "Accepted", "applied to the clients of its targets")),
        ("grpc", ("False", "TargetNotFound", "Service backend has no port named 'grpc'")),
    ],
)
def test_a_traffic_policy_reaches_one_port_by_its_name(
    section: str, accepted: tuple[str, str, str]
) -> None:
    objects = world(SHOP)
    ApiServer(objects).write(
        _traffic(
            f'{{targetRefs: [{{group: "", kind: Service, name: backend, sectionName: {section}}}],'
            " balancer: random}"
        )
    )
    mesh = compile_mesh(objects, SETTINGS)
    assert _accepted(mesh, "TrafficPolicy", "backend") == accepted
    assert ("balancer" in _outbound(mesh)) is (section == "http")
