"""`outrider check`'s decisions, from the API's JSON alone: table tests of the core.

The integration test (tests/integration/test_outrider_check.py) runs the command
against the fake API server; these cover the cases it does not build a cluster for.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest

from outrider.check import (
    Check,
    Observed,
    Probe,
    agents_in_sync,
    bundle_configmaps,
    ca_serving,
    evaluate,
    kubernetes_version,
    network_policy,
    objects_accepted,
    result,
    text,
    webhook,
)

PEM = "-----BEGIN CERTIFICATE-----\nMIIBroot\n-----END CERTIFICATE-----\n"
OTHER = "-----BEGIN CERTIFICATE-----\nMIIBother\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    ("version", "status"),
    [
        ({"major": "1", "minor": "29", "gitVersion": "v1.29.0"}, "ok"),
        ({"major": "1", "minor": "31+", "gitVersion": "v1.31.2-gke.1"}, "ok"),  # GKE, EKS
        ({"major": "1", "minor": "28", "gitVersion": "v1.28.9"}, "fail"),
        ({}, "fail"),
    ],
)
def test_native_sidecars_need_kubernetes_1_29(version: dict[str, str], status: str) -> None:
    assert kubernetes_version(version).status == status


@pytest.mark.parametrize(
    ("pods", "status", "detail"),
    [
        (["cilium-abcde", "coredns-1"], "ok", "cilium runs in kube-system"),
        (["kindnet-x1"], "warn", "kindnet does not enforce it"),
        (["coredns-1"], "warn", "cannot tell: no known CNI in kube-system"),
    ],
)
def test_network_policy_is_judged_by_the_cni_running(
    pods: list[str], status: str, detail: str
) -> None:
    found = network_policy(pods)
    assert (found.status, found.detail) == (status, detail)


def test_no_labelled_namespace_is_a_warning_not_a_failure() -> None:
    (found,) = bundle_configmaps({"default": {}}, {}, None)
    assert found.status == "warn" and "kubectl label namespace" in found.fix


def test_a_bundle_configmap_with_the_cas_root_among_others_passes() -> None:
    labelled = {"shop": {"outrider.io/inject": "enabled"}}
    configmap = {"data": {"bundle.pem": OTHER + PEM}}
    (found,) = bundle_configmaps(labelled, {"shop": configmap}, Probe(200, PEM))
    assert found.status == "ok"
    (empty,) = bundle_configmaps(labelled, {"shop": {"data": {}}}, Probe(200, PEM))
    assert empty.status == "fail" and "no certificate under bundle.pem" in empty.detail


def test_a_ca_that_answers_without_a_bundle_fails() -> None:
    assert ca_serving(Probe(200, "ok\n"), Probe(200, "")).status == "fail"
    down = ca_serving(Probe(503, '{"message": "no endpoints available"}'), None)
    assert down.detail == "/healthz: 503 no endpoints available"


def test_a_stale_agent_fails_and_says_how_long_is_too_long() -> None:
    agent = {"pod": "shop/web", "spiffe_id": "x", "sent": "v2", "acked": "v1", "latest": "v2"}
    (found,) = agents_in_sync([agent], "")
    assert found.status == "fail" and found.detail == "STALE at version v1"
    assert "more than a few seconds" in found.fix


def test_the_text_marks_each_line_and_fails_only_on_a_cross() -> None:
    seen = Observed(
        version={"major": "1", "minor": "30", "gitVersion": "v1.30.0"},
        crds=frozenset(),
        kube_system_pods=("calico-node-1",),
    )
    shown = result(evaluate(seen, pre=True))
    assert shown["ok"] is True  # the missing Gateway API CRDs are a warning
    printed = text(shown)
    assert printed.splitlines()[:3] == [
        "pre-install",
        "✓ Kubernetes runs native sidecars: Kubernetes v1.30.0",
        "‼ Gateway API CRDs (routes): not installed: httproutes.gateway.networking.k8s.io,"
        " grpcroutes.gateway.networking.k8s.io; routes are not read",
    ]
    assert printed.rstrip().endswith("all checks passed")
    failed = result([Check("post-install", "x", "fail", "broken", "do this")])
    assert failed["ok"] is False
    assert "✗ x: broken\n    fix: do this\n\n1 check failed" in text(failed)


def test_a_webhook_called_by_url_is_not_probed_and_says_so() -> None:
    configuration = {
        "webhooks": [{"name": "inject.outrider.io", "clientConfig": {"url": "https://x/mutate"}}]
    }
    configured, answers = webhook(configuration, {}, None)
    assert configured.status == "fail" and "no caBundle" in configured.detail
    assert answers.status == "warn"
    assert answers.detail == "it calls https://x/mutate, which is not probed from here"


def judged(kind: str, name: str, generation: int = 1, **status: object) -> dict[str, object]:
    meta = {"namespace": "shop", "name": name, "generation": generation}
    return {"kind": kind, "metadata": meta, "spec": {}, "status": status}


def accepted(
    ok: bool, generation: int = 1, reason: str = "Accepted", message: str = ""
) -> dict[str, object]:
    """An `Accepted` condition as control/core/conditions.py writes it."""
    state = "True" if ok else "False"
    said = {"reason": reason, "message": message, "observedGeneration": generation}
    return {"type": "Accepted", "status": state, **said}


def service_route(name: str, *parents: Mapping[str, object]) -> dict[str, object]:
    route = judged("HTTPRoute", name, parents=list(parents))
    route["spec"] = {"parentRefs": [{"group": "", "kind": "Service", "name": "backend"}]}
    return route


def test_a_refused_policy_fails_saying_why_and_what_stays_in_force() -> None:
    typo = accepted(False, 4, "Invalid", "spec.rules[0].to.paths[0]: must start with /")
    checks = objects_accepted(
        {
            "AuthorizationPolicy": [
                judged(
                    "AuthorizationPolicy",
                    "deny-admin",
                    4,
                    conditions=[typo],
                    inForce={"generation": 3, "spec": {}},
                ),
                judged("AuthorizationPolicy", "new", 1, conditions=[typo]),
                judged("AuthorizationPolicy", "fine", 2, conditions=[accepted(True, 2)]),
            ]
        },
        {},
    )
    assert [(c.name, c.status) for c in checks] == [
        ("AuthorizationPolicy shop/deny-admin", "fail"),
        ("AuthorizationPolicy shop/new", "fail"),
    ]
    assert checks[0].detail == (
        "not accepted: Invalid: spec.rules[0].to.paths[0]: must start with /;"
        " its generation 3 stays in force"
    )
    assert checks[1].detail.endswith("; no version of it is in force")
    assert "kubectl -n shop get authorizationpolicy deny-admin -o yaml" in checks[0].fix


def test_a_policy_fitted_to_tcp_ports_is_a_warning_saying_what_it_does_there() -> None:
    """Accepted, but a DENY on paths now denies every connection to a TCP port: a
    security team writing "deny /admin" must hear that its database port is shut."""
    said = "on shop/db (Deployment) port 5432 (tcp): ... so there it denies every connection"
    fitted = accepted(True, 2, "HTTPRulesOnTCPPorts", said)
    checks = objects_accepted(
        {
            "AuthorizationPolicy": [
                judged("AuthorizationPolicy", "deny-admin", 2, conditions=[fitted]),
                judged("AuthorizationPolicy", "fine", 2, conditions=[accepted(True, 2)]),
            ]
        },
        {},
    )
    (check,) = checks
    assert (check.name, check.status) == ("AuthorizationPolicy shop/deny-admin", "warn")
    assert check.detail == f"accepted, not as written: {said}"
    assert "kubectl -n shop get authorizationpolicy deny-admin -o yaml" in check.fix


def test_an_edit_not_yet_judged_is_a_warning_naming_it() -> None:
    checks = objects_accepted(
        {
            "TrafficPolicy": [
                judged("TrafficPolicy", "retries", 3, conditions=[accepted(True, 2)]),
                judged("TrafficPolicy", "just-applied"),  # no status yet
            ]
        },
        {},
    )
    (check,) = checks
    assert check.status == "warn"
    assert check.detail == (
        "the control plane has not judged the latest edit of TrafficPolicy shop/retries,"
        " TrafficPolicy shop/just-applied"
    )


def test_only_routes_with_a_service_parent_are_judged_and_only_our_entries() -> None:
    ours = {"controllerName": "outrider.io/control-plane", "conditions": [accepted(True)]}
    refused = {
        "controllerName": "outrider.io/control-plane",
        "conditions": [accepted(False, reason="NoMatchingParent", message="no Service")],
    }
    gateways = {"controllerName": "example.net/gateway", "conditions": [accepted(False)]}
    gateway_route = judged("HTTPRoute", "edge", parents=[gateways])
    gateway_route["spec"] = {"parentRefs": [{"kind": "Gateway", "name": "edge"}]}
    checks = objects_accepted(
        {
            "HTTPRoute": [
                gateway_route,  # another controller's to judge
                service_route("canary", ours, gateways),
                service_route("unjudged", gateways),
            ],
            "GRPCRoute": [service_route("split", refused)],
        },
        {},
    )
    assert [(c.name, c.status) for c in checks] == [
        ("GRPCRoute shop/split", "fail"),
        ("policies and routes judged", "warn"),
    ]
    assert checks[0].detail == "not accepted: NoMatchingParent: no Service"  # nothing in force
    assert checks[1].detail.endswith("latest edit of HTTPRoute shop/unjudged")


def test_every_object_accepted_is_one_line_and_an_unreadable_kind_a_warning() -> None:
    policies = [judged("PeerAuthentication", "strict", conditions=[accepted(True)])]
    (check,) = objects_accepted({"PeerAuthentication": policies, "HTTPRoute": []}, {})
    assert (check.status, check.detail) == ("ok", "1 object, all accepted")
    (check,) = objects_accepted({}, {})
    assert (check.status, check.detail) == ("ok", "none applied")
    (check,) = objects_accepted({}, {"TrafficPolicy": "the API server refused it: 403"})
    assert check.status == "warn" and "403" in check.detail


def test_a_route_whose_service_parent_has_no_group_is_said_not_waited_for() -> None:
    """Gateway API reads `{kind: Service}` as its own group's kind: no Service, so the
    control plane writes no status, and waiting for one would never end."""
    route = judged("HTTPRoute", "canary")
    route["spec"] = {"parentRefs": [{"kind": "Service", "name": "backend"}]}
    (check,) = objects_accepted({"HTTPRoute": [route]}, {})
    assert (check.name, check.status) == ("routes attached to Services", "warn")
    assert check.detail.startswith('HTTPRoute shop/canary names kind Service without group ""')
    assert check.fix == 'add group: "" to the parentRef'


def test_only_a_current_false_verdict_is_a_failure_said_on_one_line_each() -> None:
    forged = "Invalid\n✓ all fine"
    stale = judged("TrafficPolicy", "stale", 3, conditions=[accepted(False, 2, "Invalid", "x")])
    unknown = judged("TrafficPolicy", "unknown", conditions=[{"type": "Accepted", "status": "?"}])
    conflicted = judged(
        "TrafficPolicy",
        "second",
        conditions=[accepted(False, 1, "Conflicted", forged)],
        inForce={"generation": 1, "spec": {}},
    )
    checks = objects_accepted({"TrafficPolicy": [stale, unknown, conflicted]}, {})
    assert [(c.name, c.status) for c in checks] == [
        ("TrafficPolicy shop/second", "fail"),
        ("policies and routes judged", "warn"),
    ]
    assert checks[0].detail == "not accepted: Conflicted: Invalid ✓ all fine"  # one line
    assert checks[0].fix.startswith("an older object applies to the same target")
    assert checks[1].detail.endswith("TrafficPolicy shop/stale, TrafficPolicy shop/unknown")
    many = [judged("TrafficPolicy", f"p{i}", conditions=[accepted(False)]) for i in range(25)]
    shown = objects_accepted({"TrafficPolicy": many}, {})
    assert len(shown) == 21 and shown[-1].detail == "5 more objects the control plane refused"
