"""`outrider check`'s decisions, from the API's JSON alone: table tests of the core.

The integration test (tests/integration/test_outrider_check.py) runs the command
against the fake API server; these cover the cases it does not build a cluster for.
"""

from __future__ import annotations

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
