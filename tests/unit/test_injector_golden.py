"""Recorded AdmissionReviews in, the injector's answers compared with golden files.

Each expected patch must also apply cleanly with an independent JSON Patch
library, give a pod the API server's models accept field for field, and
give the agent a config it accepts. `UPDATE_GOLDEN=1` rewrites the golden
files after an intended change; review their diff.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

import jsonpatch
import pytest

from agent.config import parse_text
from identity.probes import Grpc, HttpGet, TcpSocket
from injector.core import Settings, admit, decode
from injector.core.sidecar import AGENT, CAPTURE, CONFIG_ENV
from tests.k8s import to_model

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "admission"
CASES = sorted(p.stem for p in FIXTURES.glob("*.json") if not p.stem.endswith(".expected"))
SETTINGS = Settings()  # injector.yaml's defaults
DEPTH = 64

#: What each recorded pod must come to: (result, reason, the agent's SPIFFE ID or None).
OUTCOMES = {
    "deployment_pod": ("injected", "injected", "spiffe://cluster.local/ns/shop/sa/web"),
    "init_containers": ("injected", "injected", "spiffe://cluster.local/ns/shop/sa/orders"),
    "probes": ("injected", "injected", "spiffe://cluster.local/ns/shop/sa/orders"),
    "host_network": ("skipped", "host_network", None),
    "opted_out": ("skipped", "opted_out", None),
    "already_injected": ("skipped", "already_injected", None),
    "kube_system": ("skipped", "namespace_excluded", None),
    "workload_api": ("injected", "injected", "spiffe://cluster.local/ns/shop/sa/ledger"),
}


def test_every_recorded_review_has_an_outcome() -> None:
    assert set(CASES) == set(OUTCOMES)


def review(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def answer(body: dict[str, Any]) -> tuple[dict[str, Any], str, str]:
    admission = admit(decode(json.dumps(body).encode(), DEPTH), SETTINGS)
    return admission.review, admission.result, admission.reason


def patch_of(response: dict[str, Any]) -> list[dict[str, Any]] | None:
    if "patch" not in response:
        return None
    assert response["patchType"] == "JSONPatch"
    return json.loads(base64.b64decode(response["patch"]))


def agents(pod: dict[str, Any]) -> list[dict[str, Any]]:
    spec = pod["spec"]
    containers = [*spec.get("initContainers", []), *spec.get("containers", [])]
    return [c for c in containers if c["name"] == AGENT]


@pytest.mark.parametrize("name", CASES)
def test_the_answer_matches_the_golden_file(name: str) -> None:
    answered, _, _ = answer(review(name))
    response = answered["response"]
    actual = {
        "allowed": response["allowed"],
        "patch": patch_of(response),
        "warnings": response.get("warnings", []),
        "auditAnnotations": response.get("auditAnnotations", {}),
    }
    golden = FIXTURES / f"{name}.expected.json"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        golden.write_text(json.dumps(actual, indent=2) + "\n")
    hint = f"if the change is intended, rewrite it: UPDATE_GOLDEN=1 pytest {Path(__file__).name}"
    assert golden.exists(), f"{golden.name} is missing; {hint}"
    assert actual == json.loads(golden.read_text()), (
        f"the answer differs from {golden.name}; {hint}"
    )


@pytest.mark.parametrize("name", CASES)
def test_the_answer_is_an_admission_review_for_this_request(name: str) -> None:
    body = review(name)
    answered, result, reason = answer(body)
    assert answered["apiVersion"] == "admission.k8s.io/v1"
    assert answered["kind"] == "AdmissionReview"
    assert answered["response"]["uid"] == body["request"]["uid"]
    assert answered["response"]["allowed"] is True  # the injector never refuses a pod
    assert (result, reason) == OUTCOMES[name][:2]
    assert answered["response"]["auditAnnotations"] == {"injection": reason}


@pytest.mark.parametrize("name", CASES)
def test_the_patch_applies_and_the_pod_is_one_the_api_server_accepts(name: str) -> None:
    body = review(name)
    pod = body["request"]["object"]
    patch = patch_of(answer(body)[0]["response"])
    spiffe_id = OUTCOMES[name][2]
    if spiffe_id is None:
        assert patch is None
        return
    assert patch is not None
    patched = jsonpatch.apply_patch(pod, patch)
    to_model(patched)  # raises naming any field the API would not know
    [agent] = agents(patched)
    env = {e["name"]: e.get("value") for e in agent["env"]}
    config = parse_text(env[CONFIG_ENV], source=CONFIG_ENV)
    assert str(config.identity.spiffe_id) == spiffe_id
    # A bootstrap: listeners and policy are the control plane's to give.
    assert config.control is not None
    assert (config.inbound, config.outbound, config.policy.policies) == ((), (), ())


@pytest.mark.parametrize("name", CASES)
def test_feeding_the_patched_pod_back_leaves_one_agent(name: str) -> None:
    body = review(name)
    patch = patch_of(answer(body)[0]["response"])
    if patch is not None:
        body["request"]["object"] = jsonpatch.apply_patch(body["request"]["object"], patch)
    again, _, reason = answer(body)
    assert patch_of(again["response"]) is None
    has_agent = OUTCOMES[name][2] is not None or name == "already_injected"
    assert len(agents(body["request"]["object"])) == (1 if has_agent else 0)
    if has_agent:  # quietly: reinvocation is routine, not news for the pod's creator
        assert reason == "already_injected"
        assert "warnings" not in again["response"]


def test_the_namespace_comes_from_the_request_when_the_pod_has_none() -> None:
    body = review("deployment_pod")
    del body["request"]["object"]["metadata"]["namespace"]  # older API servers sent none
    body["request"]["namespace"] = "payments"
    patched = jsonpatch.apply_patch(
        body["request"]["object"], patch_of(answer(body)[0]["response"])
    )
    env = {e["name"]: e.get("value") for e in agents(patched)[0]["env"]}
    config = parse_text(env[CONFIG_ENV], source=CONFIG_ENV)
    assert str(config.identity.spiffe_id) == "spiffe://cluster.local/ns/payments/sa/web"


def test_the_agent_goes_before_the_pods_own_init_container() -> None:
    body = review("init_containers")
    patched = jsonpatch.apply_patch(
        body["request"]["object"], patch_of(answer(body)[0]["response"])
    )
    names = [c["name"] for c in patched["spec"]["initContainers"]]
    assert names == [CAPTURE, AGENT, "migrate"]


def test_the_apps_probes_go_through_the_agent_which_holds_the_originals() -> None:
    body = review("probes")
    answered = answer(body)[0]["response"]
    patched = jsonpatch.apply_patch(body["request"]["object"], patch_of(answered))
    orders, metrics = patched["spec"]["containers"]
    timing = {"periodSeconds": 10, "successThreshold": 1, "failureThreshold": 3}
    assert orders["readinessProbe"] == {
        "httpGet": {"path": "/app-health/orders/readyz", "port": 15020, "scheme": "HTTP"},
        **timing,
        "timeoutSeconds": 2,
    }
    assert orders["livenessProbe"]["httpGet"]["path"] == "/app-health/orders/livez"
    assert orders["startupProbe"]["httpGet"]["path"] == "/app-health/orders/startupz"
    assert (
        orders["startupProbe"]["failureThreshold"],
        orders["livenessProbe"]["periodSeconds"],
    ) == (
        30,
        20,
    )
    original = body["request"]["object"]["spec"]["containers"][1]
    assert metrics == original  # exec, and a probe of another host: left as they are
    assert answered["warnings"] == [
        "outrider: container metrics: readinessProbe asks another host (host: is set), so it "
        "is left as it is: strict mTLS refuses it if that host is this pod"
    ]
    env = {e["name"]: e.get("value") for e in agents(patched)[0]["env"]}
    config = parse_text(env[CONFIG_ENV], source=CONFIG_ENV)
    assert {p.path: (p.action, p.timeout.total_seconds()) for p in config.probes} == {
        "/app-health/orders/livez": (TcpSocket(8080), 1),
        "/app-health/orders/readyz": (
            HttpGet(8080, "/ready", "HTTP", (("X-Probe", "kubelet"),)),
            2,
        ),
        "/app-health/orders/startupz": (Grpc(9090, "orders.v1.Orders"), 1),
    }
