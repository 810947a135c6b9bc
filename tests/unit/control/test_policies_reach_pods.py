"""Which AuthorizationPolicies reach which pod: by namespace and selector, never by annotation."""

from __future__ import annotations

from typing import Any

import pytest

from agent.core.policy import PolicySet, Request
from agent.core.policyfile import parse_policy_list
from control.core.mesh import Mesh, MeshSettings, compile_mesh
from identity import SpiffeId, TrustDomain
from tests.cluster import SHOP, agent_accepts, pod, policy_object, world

SETTINGS = MeshSettings("example.org")
FRONTEND = SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend")


def _mesh(*texts: str) -> Mesh:
    return compile_mesh(world(*texts), SETTINGS)


def _names(mesh: Mesh, namespace: str, name: str) -> list[str]:
    config = mesh.config_for(namespace, name)
    assert config is not None
    return [p["name"] for p in config["policy"]["policies"]]


def _policy(name: str, namespace: str = "shop", spec: str = "{}") -> str:
    return policy_object("AuthorizationPolicy", name, spec, namespace)


OTHERS = pod("batch-0", "jobs", labels={"app": "batch"}) + pod(
    "legacy-0", "shop", labels={"app": "legacy"}, injected=False
)


@pytest.mark.parametrize(
    ("policy", "reaches"),
    [
        pytest.param(
            _policy("default-deny"),
            {"frontend-0", "backend-v1-0", "backend-v2-0"},
            id="no selector: the whole namespace",
        ),
        pytest.param(
            _policy("backend-only", spec="{selector: {matchLabels: {app: backend}}}"),
            {"backend-v1-0", "backend-v2-0"},
            id="matchLabels",
        ),
        pytest.param(
            _policy(
                "canary-only",
                spec="{selector: {matchExpressions: [{key: version, operator: NotIn,"
                " values: [v1]}], matchLabels: {app: backend}}}",
            ),
            {"backend-v2-0"},
            id="matchLabels and matchExpressions",
        ),
        pytest.param(
            _policy(
                "unlabelled",
                spec="{selector: {matchExpressions: [{key: version, operator: DoesNotExist}]}}",
            ),
            {"frontend-0"},
            id="DoesNotExist",
        ),
        pytest.param(
            _policy("mesh-wide", "outrider-system"),
            {"frontend-0", "backend-v1-0", "backend-v2-0", "batch-0"},
            id="the mesh namespace: every pod of every namespace",
        ),
        pytest.param(
            _policy(
                "mesh-backends", "outrider-system", "{selector: {matchLabels: {app: backend}}}"
            ),
            {"backend-v1-0", "backend-v2-0"},
            id="the mesh namespace, by selector",
        ),
        pytest.param(_policy("elsewhere", "jobs"), {"batch-0"}, id="another namespace"),
    ],
)
def test_a_policy_reaches_the_pods_it_selects(policy: str, reaches: set[str]) -> None:
    mesh = _mesh(SHOP, OTHERS, policy)
    reached = {name for (namespace, name) in mesh.pods if _names(mesh, namespace, name)}
    assert reached == reaches
    assert ("shop", "legacy-0") not in mesh.pods  # not injected: no agent to configure
    assert mesh.config_for("shop", "legacy-0") is None


def test_policies_are_named_by_namespace_and_sorted() -> None:
    mesh = _mesh(SHOP, _policy("zeta"), _policy("alpha"), _policy("all", "outrider-system"), OTHERS)
    assert _names(mesh, "shop", "frontend-0") == ["outrider-system/all", "shop/alpha", "shop/zeta"]
    assert _names(mesh, "jobs", "batch-0") == ["outrider-system/all"]


@pytest.mark.parametrize(
    "annotations",
    [
        {"outrider.io/policy": "none"},
        {"outrider.io/authorization": "disabled", "outrider.io/inject": "false"},
        {"outrider.io/upstreams": "backend:8080", "outrider.io/policies": "[]"},
    ],
)
def test_no_pod_annotation_removes_a_namespace_policy(annotations: dict[str, str]) -> None:
    objects = world(SHOP, _policy("default-deny"), _policy("mesh", "outrider-system"))
    objects["Pod"][("shop", "frontend-0")]["metadata"]["annotations"].update(annotations)
    mesh = compile_mesh(objects, SETTINGS)
    assert _names(mesh, "shop", "frontend-0") == ["outrider-system/mesh", "shop/default-deny"]


def test_an_empty_spec_allows_nothing_where_it_applies() -> None:
    mesh = _mesh(SHOP, _policy("default-deny"))
    config = mesh.config_for("shop", "backend-v1-0")
    assert config is not None
    assert config["policy"]["policies"] == [
        {"name": "shop/default-deny", "action": "ALLOW", "rules": []}
    ]
    agent_accepts(config)
    decision = _decide(config, Request(FRONTEND, 8080, "GET", "/api/x"))
    assert (decision.allowed, decision.rule) == (False, "no ALLOW rule matched")


def test_a_namespace_default_deny_and_an_allow_for_the_frontend() -> None:
    allow = _policy(
        "frontend-reads-api",
        spec="""
  selector: {matchLabels: {app: backend}}
  action: ALLOW
  rules:
    - from: {principals: ["spiffe://example.org/ns/shop/sa/frontend"]}
      to: {methods: [GET], paths: ["/api/*"]}""",
    )
    mesh = _mesh(SHOP, _policy("default-deny"), allow)
    config = mesh.config_for("shop", "backend-v1-0")
    assert config is not None
    agent_accepts(config)
    assert _decide(config, Request(FRONTEND, 8080, "GET", "/api/orders")).allowed
    assert not _decide(config, Request(FRONTEND, 8080, "POST", "/api/orders")).allowed
    other = SpiffeId.parse("spiffe://example.org/ns/shop/sa/other")
    assert not _decide(config, Request(other, 8080, "GET", "/api/orders")).allowed


def test_the_spec_passes_through_with_mode_and_action() -> None:
    spec = "{action: DENY, mode: dry-run, rules: [{to: {paths: ['/admin*']}}]}"
    mesh = _mesh(SHOP, _policy("trial", spec=spec), _policy("enforced", spec="{mode: enforce}"))
    config = mesh.config_for("shop", "backend-v1-0")
    assert config is not None
    assert config["policy"]["policies"] == [
        {"name": "shop/enforced", "action": "ALLOW", "rules": []},
        {
            "name": "shop/trial",
            "action": "DENY",
            "mode": "dry-run",
            "rules": [{"to": {"paths": ["/admin*"]}}],
        },
    ]


def _decide(config: dict[str, Any], request: Request) -> Any:
    policies = PolicySet(
        parse_policy_list(config["policy"]["policies"], "t"), config["policy"]["default_action"]
    )
    return policies.decide(request, frozenset({TrustDomain("example.org")}))
