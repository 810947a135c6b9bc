"""A policy with HTTP rules selecting a pod with TCP ports: enforced fail-closed, never dropped.

The agent refuses such a policy (its HTTP fields can never be checked on TCP).
The control plane sends, for that pod, the policy the agent's engine would
enforce anyway, in a form the agent accepts; these tests hold it to exactly
the engine's decisions on every port.
"""

from __future__ import annotations

import itertools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.core.policy import PolicySet, Request
from agent.core.policyfile import parse_policy_list
from control.core.conditions import meta
from control.core.mesh import MeshSettings, compile_mesh
from control.core.policies import CompiledPolicy, compile_policy, fit_to_ports
from identity import SpiffeId, TrustDomain
from tests.cluster import agent_accepts, pod, service, world

TRUSTED = frozenset({TrustDomain("example.org")})
SOURCES = [
    SpiffeId.parse("spiffe://example.org/ns/shop/sa/frontend"),
    SpiffeId.parse("spiffe://example.org/ns/lab/sa/x"),
    None,
]
TCP, HTTP = frozenset({5432, 9090}), frozenset({8080})

_FROM = st.sampled_from(
    [
        None,
        {"principals": ["spiffe://example.org/ns/shop/sa/frontend"]},
        {"not_namespaces": ["lab"]},
    ]
)
_TO_PORTS = st.sampled_from([None, [8080], [5432], [8080, 5432], [9090, 8080]])
_TO_HTTP = st.sampled_from(
    [
        None,
        {"methods": ["GET"]},
        {"paths": ["/admin*"]},
        {"not_paths": ["/api/*"], "hosts": ["a.org"]},
    ]
)
_WHEN = st.sampled_from([None, [{"header": "x-role", "values": ["admin"]}]])


@st.composite
def _rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {}
    if (source := draw(_FROM)) is not None:
        rule["from"] = source
    to: dict[str, Any] = dict(draw(_TO_HTTP) or {})
    if (ports := draw(_TO_PORTS)) is not None:
        to["ports"] = ports
    if draw(st.booleans()):
        to["not_ports"] = [9090]
    if to:
        rule["to"] = to
    if (when := draw(_WHEN)) is not None:
        rule["when"] = when
    if draw(st.booleans()):
        rule["name"] = f"r{draw(st.integers(0, 3))}"
    return rule


@st.composite
def _specs(draw: st.DrawFn) -> dict[str, Any]:
    action = draw(st.sampled_from(["ALLOW", "DENY", "AUDIT"]))
    rules = draw(st.lists(_rules(), min_size=0 if action == "ALLOW" else 1, max_size=3))
    names = [r["name"] for r in rules if "name" in r]
    if len(names) != len(set(names)):
        for i, rule in enumerate(rules):
            rule["name"] = f"r{i}"
    spec: dict[str, Any] = {"action": action, "rules": rules}
    if action != "AUDIT" and draw(st.booleans()):
        spec["mode"] = "dry-run"
    return spec


def _requests() -> list[Request]:
    found = []
    for source in SOURCES:
        found += [Request(source, port) for port in sorted(TCP)]
        for method, path, role in itertools.product(
            ["GET", "POST"], ["/admin/x", "/api/a", "/"], ["admin", None]
        ):
            headers = {"x-role": (role,)} if role else {}
            found.append(Request(source, 8080, method, path, "a.org", headers))
    return found


REQUESTS = _requests()


def _compiled(spec: dict[str, Any]) -> CompiledPolicy:
    obj = {"metadata": {"name": "p", "namespace": "shop", "uid": "u"}, "spec": spec}
    result = compile_policy(obj, meta(obj, ("shop", "p")), "outrider-system")
    assert isinstance(result, CompiledPolicy), result
    return result


def _outcome(policies: PolicySet, request: Request) -> tuple[bool, tuple[tuple[str, str], ...]]:
    decision = policies.decide(request, TRUSTED)
    return decision.allowed, tuple((r.kind, r.policy) for r in decision.records)


@settings(max_examples=400, deadline=None)
@given(_specs(), st.sampled_from(["allow-authenticated", "deny"]))
def test_the_fitted_policy_decides_as_the_engine_would_on_every_port(
    spec: dict[str, Any], default: str
) -> None:
    compiled = _compiled(spec)
    fitted = parse_policy_list([fit_to_ports(compiled, TCP, HTTP)], "fitted")
    assert PolicySet(fitted).http_only_errors(TCP) == []  # the agent accepts it
    original = PolicySet((compiled.policy,), default)  # type: ignore[arg-type]
    sent = PolicySet(fitted, default)  # type: ignore[arg-type]
    for request in REQUESTS:
        assert _outcome(sent, request) == _outcome(original, request), request


def test_rules_keep_their_names_and_the_additions_say_what_they_are() -> None:
    deny = _compiled({"action": "DENY", "rules": [{"to": {"paths": ["/admin*"]}}]})
    assert fit_to_ports(deny, TCP, HTTP)["rules"] == [
        {"to": {"paths": ["/admin*"], "ports": [8080]}},
        {"name": "rules-0-tcp", "to": {"ports": [5432, 9090]}},
    ]
    allow = _compiled({"action": "ALLOW", "rules": [{"name": "get", "to": {"methods": ["GET"]}}]})
    assert fit_to_ports(allow, TCP, HTTP)["rules"] == [
        {"name": "get", "to": {"methods": ["GET"], "ports": [8080]}},
        {"name": "tcp-ports", "to": {"ports": [5432, 9090], "not_ports": [5432, 9090]}},
    ]


POLICY = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  action: DENY
  rules:
    - to: {paths: ["/admin*"]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  selector: {app: db}
  ports: [{port: 8080, appProtocol: http}]
"""


def test_the_status_names_the_pods_and_ports_and_the_fix() -> None:
    mesh = compile_mesh(
        world(POLICY, pod("db-0", labels={"app": "db"}, ports=[8080, 5432])),
        MeshSettings("example.org"),
    )
    config = mesh.config_for("shop", "db-0")
    assert config is not None
    agent_accepts(config)
    (accepted,) = mesh.statuses[("AuthorizationPolicy", "shop", "no-admin")]["conditions"]
    assert (accepted["status"], accepted["reason"]) == ("True", "HTTPRulesOnTCPPorts")
    assert accepted["message"] == (
        "rule 'rules[0]' uses paths and applies to TCP port 5432 of pod shop/db-0. HTTP fields"
        " never match on TCP, so there the rule denies every connection its other fields"
        " match. Set appProtocol (http, kubernetes.io/h2c or grpc) on the Service port that"
        " targets it, or list the rule's HTTP ports in to.ports"
    )


def test_the_pods_of_a_replica_set_are_named_once_by_it() -> None:
    objects = world(
        POLICY,
        pod("db-5c9f-a", labels={"app": "db"}, ports=[8080, 5432]),
        pod("db-5c9f-b", labels={"app": "db"}, ports=[8080, 5432]),
    )
    for name in ("db-5c9f-a", "db-5c9f-b"):
        objects["Pod"][("shop", name)]["metadata"]["ownerReferences"] = [
            {"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "db-5c9f", "controller": True}
        ]
    mesh = compile_mesh(objects, MeshSettings("example.org"))
    (accepted,) = mesh.statuses[("AuthorizationPolicy", "shop", "no-admin")]["conditions"]
    assert accepted["message"].startswith(
        "rule 'rules[0]' uses paths and applies to TCP port 5432 of ReplicaSet shop/db-5c9f."
    )


GRPC_POLICY = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: greeter-callers, namespace: shop}
spec:
  selector: {matchLabels: {app: greeter}}
  action: ALLOW
  rules:
    - from: {principals: ["spiffe://example.org/ns/shop/sa/frontend"]}
      to: {paths: [/demo.Greeter/SayHello]}
---
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: greeter}}
  action: DENY
  rules:
    - to: {paths: [/demo.Greeter/Admin]}
"""


def test_rules_on_grpc_methods_apply_as_written_on_grpc_and_h2c_ports() -> None:
    for app_protocol in ("grpc", "kubernetes.io/h2c"):
        port = f"{{name: grpc, port: 9090, appProtocol: {app_protocol}}}"
        mesh = compile_mesh(
            world(GRPC_POLICY, service("greeter", port), pod("greeter-0", ports=[9090])),
            MeshSettings("example.org"),
        )
        config = mesh.config_for("shop", "greeter-0")
        assert config is not None
        agent_accepts(config)
        assert [p["rules"] for p in config["policy"]["policies"]] == [
            [
                {
                    "from": {"principals": ["spiffe://example.org/ns/shop/sa/frontend"]},
                    "to": {"paths": ["/demo.Greeter/SayHello"]},
                }
            ],
            [{"to": {"paths": ["/demo.Greeter/Admin"]}}],
        ]
        for name in ("greeter-callers", "no-admin"):
            (accepted,) = mesh.statuses[("AuthorizationPolicy", "shop", name)]["conditions"]
            assert (accepted["status"], accepted["reason"]) == ("True", "Accepted"), accepted
