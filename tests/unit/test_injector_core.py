"""The mutation core: which pods get the agent, and what exactly they get."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from typing import Any

import jsonpatch
import pytest

from agent.config import parse_text
from injector.core import Settings, apply_patch, mutate
from injector.core.mutate import pointer
from injector.core.settings import ControlSettings
from injector.core.sidecar import AGENT, CAPTURE, CONFIG_ENV
from tests.k8s import to_model

SETTINGS = Settings()


def pod(**spec: Any) -> dict[str, Any]:
    """A pod as a user writes it: no defaults, no volumes, no annotations."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"containers": [{"name": "app", "image": "app:1"}], **spec},
    }


def annotated(annotations: dict[str, Any], **spec: Any) -> dict[str, Any]:
    result = pod(**spec)
    result["metadata"]["annotations"] = annotations
    return result


def labelled(labels: dict[str, Any], **spec: Any) -> dict[str, Any]:
    result = pod(**spec)
    result["metadata"]["labels"] = labels
    return result


def injected(source: dict[str, Any], settings: Settings = SETTINGS) -> dict[str, Any]:
    mutation = mutate(source, "shop", settings)
    assert mutation.reason == "injected", mutation
    patched = jsonpatch.apply_patch(source, list(mutation.patch))
    to_model(patched)
    return patched


def agent_of(patched: dict[str, Any]) -> dict[str, Any]:
    spec = patched["spec"]
    [agent] = [
        c for c in [*spec.get("initContainers", []), *spec["containers"]] if c["name"] == AGENT
    ]
    return agent


def agent_config(patched: dict[str, Any]) -> Any:
    env = {e["name"]: e.get("value") for e in agent_of(patched)["env"]}
    return parse_text(env[CONFIG_ENV], source=CONFIG_ENV)


def test_the_agent_is_a_native_sidecar_placed_first_after_the_capture_container() -> None:
    patched = injected(pod(initContainers=[{"name": "setup", "image": "setup:1"}]))
    capture, first, second = patched["spec"]["initContainers"]
    assert capture["name"] == CAPTURE and "restartPolicy" not in capture  # runs, then exits
    assert first["name"] == AGENT and first["restartPolicy"] == "Always"
    assert second["name"] == "setup"
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app"]
    for probe in ("startupProbe", "readinessProbe"):
        assert first[probe]["httpGet"] == {"path": "/ready", "port": 15020}
    assert first["args"] == ["agent", "run", "--config-env", CONFIG_ENV]


def test_only_probes_and_metrics_listen_on_the_pod_network() -> None:
    # /config_dump and /certs show the mesh's topology and who may call the pod: the
    # admin server stays on loopback; the kubelet and Prometheus get the status port.
    patched = injected(pod())
    config, agent = agent_config(patched), agent_of(patched)
    assert (str(config.admin), str(config.status)) == ("127.0.0.1:15000", "0.0.0.0:15020")
    assert agent["ports"] == [
        {"name": "outrider-status", "containerPort": 15020, "protocol": "TCP"}
    ]
    assert {agent[p]["httpGet"]["port"] for p in ("startupProbe", "readinessProbe")} == {15020}


def test_without_native_sidecars_the_agent_is_the_first_regular_container() -> None:
    patched = injected(pod(), replace(SETTINGS, native_sidecar=False))
    assert [c["name"] for c in patched["spec"]["initContainers"]] == [CAPTURE]
    names = [c["name"] for c in patched["spec"]["containers"]]
    assert names == [AGENT, "app"]
    assert "restartPolicy" not in patched["spec"]["containers"][0]
    # `kubectl logs` and `exec` keep going to the app, not to the agent.
    assert patched["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] == "app"


def test_the_token_is_mounted_into_the_agent_alone() -> None:
    patched = injected(pod(initContainers=[{"name": "setup", "image": "setup:1"}]))
    [token] = [v for v in patched["spec"]["volumes"] if v["name"] == "outrider-token"]
    assert token["projected"]["sources"] == [
        {
            "serviceAccountToken": {
                "audience": "outrider-ca",
                "expirationSeconds": 3600,
                "path": "token",
            }
        }
    ]
    mounts = {
        c["name"]: [m["name"] for m in c.get("volumeMounts", [])]
        for c in [*patched["spec"]["initContainers"], *patched["spec"]["containers"]]
    }
    assert mounts == {
        CAPTURE: [],
        AGENT: ["outrider-token", "outrider-bundle"],
        "setup": [],
        "app": [],
    }
    # The agent reads the token and the bundle where the patch mounts them.
    config = agent_config(patched)
    assert str(config.identity.token_file) == "/var/run/secrets/outrider/token"
    assert str(config.ca.bundle_file) == "/etc/outrider/bundle/bundle.pem"
    assert {m["mountPath"] for m in agent_of(patched)["volumeMounts"]} == {
        "/var/run/secrets/outrider",
        "/etc/outrider/bundle",
    }


def test_the_projected_token_is_there_even_when_the_pod_turns_automount_off() -> None:
    patched = injected(pod(automountServiceAccountToken=False))
    assert patched["spec"]["automountServiceAccountToken"] is False
    assert "outrider-token" in {v["name"] for v in patched["spec"]["volumes"]}


def test_the_agent_runs_hardened_with_bounded_resources() -> None:
    agent = agent_of(injected(pod()))
    assert agent["securityContext"] == {
        "runAsNonRoot": True,
        "runAsUser": 1337,
        "runAsGroup": 1337,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert agent["resources"] == {
        "requests": {"cpu": "50m", "memory": "64Mi"},
        "limits": {"cpu": "1", "memory": "256Mi"},
    }
    assert agent["image"] == SETTINGS.agent.image


def test_the_pod_identity_reaches_the_agent_through_the_downward_api() -> None:
    env = {e["name"]: e.get("valueFrom") for e in agent_of(injected(pod()))["env"]}
    assert env["POD_NAME"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert env["POD_UID"] == {"fieldRef": {"fieldPath": "metadata.uid"}}


@pytest.mark.parametrize(
    ("spec", "account"),
    [({}, "default"), ({"serviceAccountName": "web"}, "web"), ({"serviceAccount": "old"}, "old")],
)
def test_the_identity_is_the_pods_service_account(spec: dict[str, Any], account: str) -> None:
    config = agent_config(injected(pod(**spec)))
    assert str(config.identity.spiffe_id) == f"spiffe://cluster.local/ns/shop/sa/{account}"
    assert str(config.trust_domain) == "cluster.local"


def test_missing_arrays_and_objects_are_added_whole() -> None:
    source = pod()
    del source["metadata"]
    paths = [op["path"] for op in mutate(source, "shop", SETTINGS).patch]
    assert paths == ["/spec/initContainers", "/spec/volumes", "/metadata"]
    patched = jsonpatch.apply_patch(source, list(mutate(source, "shop", SETTINGS).patch))
    assert patched["metadata"] == {"annotations": {"outrider.io/status": "injected"}}


def test_existing_arrays_are_extended_and_annotation_keys_escaped() -> None:
    source = annotated(
        {"team": "a"}, volumes=[{"name": "data", "emptyDir": {}}], initContainers=[{"name": "i"}]
    )
    paths = [op["path"] for op in mutate(source, "shop", SETTINGS).patch]
    assert paths == [
        "/spec/initContainers/0",  # the agent
        "/spec/initContainers/0",  # then the capture container, ahead of it
        "/spec/volumes/-",
        "/spec/volumes/-",
        "/metadata/annotations/outrider.io~1status",
    ]


@pytest.mark.parametrize(
    ("key", "token"), [("a/b", "a~1b"), ("a~b", "a~0b"), ("~1", "~01"), ("/~", "~1~0")]
)
def test_json_pointer_tokens_escape_tilde_then_slash(key: str, token: str) -> None:
    assert pointer(key) == token
    document: dict[str, Any] = {"a": {}}
    jsonpatch.apply_patch(
        document, [{"op": "add", "path": f"/a/{token}", "value": 1}], in_place=True
    )
    assert document == {"a": {key: 1}}


def test_the_input_pod_is_never_changed() -> None:
    source = annotated({"outrider.io/log-level": "debug"})
    before = copy.deepcopy(source)
    mutate(source, "shop", SETTINGS)
    assert source == before


@pytest.mark.parametrize(
    "source",
    [
        pod(),
        annotated({"x": "1"}, volumes=[{"name": "v", "emptyDir": {}}]),
        pod(initContainers=[{"name": "a"}, {"name": "b"}]),
        {"spec": {"containers": [{"name": "app"}]}},
    ],
)
def test_our_patch_applier_agrees_with_jsonpatch(source: dict[str, Any]) -> None:
    for settings in (SETTINGS, replace(SETTINGS, native_sidecar=False)):
        patch = mutate(source, "shop", settings).patch
        ours = copy.deepcopy(source)
        apply_patch(ours, patch)
        assert ours == jsonpatch.apply_patch(source, list(patch))


@pytest.mark.parametrize(
    ("source", "namespace", "reason"),
    [
        (pod(), "kube-system", "namespace_excluded"),
        (pod(), "outrider-system", "namespace_excluded"),
        (annotated({"outrider.io/inject": "false"}), "shop", "opted_out"),
        # The label the webhook's objectSelector skips on: `outrider inject` skips it too.
        (labelled({"outrider.io/inject": "false"}), "shop", "opted_out"),
        (pod(hostNetwork=True), "shop", "host_network"),
        (pod(initContainers=[{"name": AGENT}]), "shop", "already_injected"),
        (
            pod(volumes=[{"name": "outrider-bundle", "hostPath": {"path": "/"}}]),
            "shop",
            "name_conflict",
        ),
        # The control plane reads a pod with this init container as captured.
        (pod(initContainers=[{"name": CAPTURE, "image": "x"}]), "shop", "name_conflict"),
    ],
)
def test_pods_left_alone_get_no_patch_and_a_reason(
    source: dict[str, Any], namespace: str, reason: str
) -> None:
    mutation = mutate(source, namespace, SETTINGS)
    assert (mutation.reason, mutation.patch) == (reason, ())
    if reason == "already_injected":
        assert mutation.warnings == ()
    else:
        assert len(mutation.warnings) == 1
        assert mutation.warnings[0].startswith("outrider: not injected: ")


def test_an_injected_annotation_without_the_agent_is_left_with_a_warning() -> None:
    """Copied into a template from a live pod, the annotation keeps the agent out: the
    pod's author is told, where a reinvocation (the agent there) stays quiet."""
    mutation = mutate(annotated({"outrider.io/status": "injected"}), "shop", SETTINGS)
    assert (mutation.reason, mutation.patch) == ("already_injected", ())
    (warning,) = mutation.warnings
    assert warning.startswith("outrider: not injected: outrider.io/status: injected is set")
    assert "remove the annotation" in warning


def test_the_system_namespace_comes_from_the_settings() -> None:
    settings = replace(SETTINGS, system_namespace="mesh")
    assert mutate(pod(), "mesh", settings).reason == "namespace_excluded"
    assert mutate(pod(), "outrider-system", settings).reason == "injected"


@pytest.mark.parametrize(("value", "warned"), [("true", False), ("enabled", False), ("no", True)])
def test_only_false_opts_out(value: str, warned: bool) -> None:
    mutation = mutate(annotated({"outrider.io/inject": value}), "shop", SETTINGS)
    assert mutation.reason == "injected"
    assert any("outrider.io/inject" in w for w in mutation.warnings) is warned


def test_host_network_false_is_injected() -> None:
    assert mutate(pod(hostNetwork=False), "shop", SETTINGS).reason == "injected"


def test_injecting_the_result_again_changes_nothing() -> None:
    for settings in (SETTINGS, replace(SETTINGS, native_sidecar=False)):
        once = injected(annotated({"outrider.io/log-level": "debug"}), settings)
        again = mutate(once, "shop", settings)
        assert (again.reason, again.patch) == ("already_injected", ())


def test_a_malformed_pod_raises_rather_than_guessing() -> None:
    with pytest.raises((AttributeError, TypeError)):
        mutate({"spec": {"containers": "app"}}, "shop", SETTINGS)


def test_the_agent_config_is_json_not_spliced_text() -> None:
    settings = replace(SETTINGS, control=ControlSettings('cp"\n.svc:1'))  # not checked here
    agent = agent_of(injected(annotated({}), settings))
    raw = next(e["value"] for e in agent["env"] if e["name"] == CONFIG_ENV)
    assert json.loads(raw)["control"]["address"] == 'cp"\n.svc:1'
    assert "\n" not in raw
