"""`outrider inject` on manifest streams: every workload kind, order and untouched text kept."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import yaml

from injector.core import Settings
from injector.core.sidecar import AGENT
from injector.manifests import TEMPLATES, ManifestError, inject_stream
from tests.k8s import to_model

SETTINGS = Settings()

POD_SPEC = {"containers": [{"name": "app", "image": "app:1"}]}
TEMPLATE = {"metadata": {"labels": {"app": "web"}}, "spec": POD_SPEC}
SELECTOR = {"matchLabels": {"app": "web"}}

WORKLOADS: dict[str, dict[str, Any]] = {
    "Pod": {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"}, "spec": POD_SPEC},
    **{
        kind: {
            "apiVersion": "apps/v1",
            "kind": kind,
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {"selector": SELECTOR, "template": TEMPLATE}
            | ({"serviceName": "web"} if kind == "StatefulSet" else {}),
        }
        for kind in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet")
    },
    "Job": {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "once"},
        "spec": {"template": {"spec": POD_SPEC | {"restartPolicy": "Never"}}},
    },
    "CronJob": {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": "nightly"},
        "spec": {
            "schedule": "0 3 * * *",
            "jobTemplate": {"spec": {"template": {"spec": POD_SPEC | {"restartPolicy": "Never"}}}},
        },
    },
}

OTHERS = """\
# the service, kept as written
apiVersion: v1
kind: Service
metadata: {name: web}   # flow style stays flow style
spec:
  ports: [{port: 80, targetPort: 15443}]
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  enabled: "yes"
  since: 2026-11-22T09:00:00Z
"""


def template_of(document: dict[str, Any]) -> dict[str, Any]:
    path = TEMPLATES[(document["apiVersion"], document["kind"])]
    for key in path:
        document = document[key]
    return document


def agents(document: dict[str, Any]) -> list[str]:
    spec = template_of(document)["spec"]
    names = [c["name"] for c in [*spec.get("initContainers", []), *spec["containers"]]]
    return [n for n in names if n == AGENT]


def test_every_workload_kind_is_injected_in_its_pod_template() -> None:
    assert {kind for _, kind in TEMPLATES} == set(WORKLOADS)
    stream = yaml.safe_dump_all(WORKLOADS.values(), sort_keys=False)
    output, results = inject_stream(stream, SETTINGS, "default")
    documents = list(yaml.safe_load_all(output))
    assert [d["kind"] for d in documents] == list(WORKLOADS)
    for document in documents:
        assert agents(document) == [AGENT], document["kind"]
        to_model(document)  # the whole object, as the API server would read it
    assert [(r.index, r.workload, r.mutation.reason) for r in results] == [
        (1, "Pod default/web", "injected"),
        (2, "Deployment shop/web", "injected"),
        (3, "StatefulSet shop/web", "injected"),
        (4, "DaemonSet shop/web", "injected"),
        (5, "ReplicaSet shop/web", "injected"),
        (6, "Job default/once", "injected"),
        (7, "CronJob default/nightly", "injected"),
    ]


def test_other_documents_pass_through_as_the_text_they_were() -> None:
    deployment = yaml.safe_dump(WORKLOADS["Deployment"], sort_keys=False)
    stream = OTHERS + "---\n" + deployment + "---\n# the end\nkind: Unknown\n"
    output, _ = inject_stream(stream, SETTINGS, "default")
    first, second, third, last = output.split("---\n")
    assert first + "---\n" + second == OTHERS
    assert last == "# the end\nkind: Unknown\n"
    assert agents(yaml.safe_load(third)) == [AGENT]


def test_running_it_on_its_own_output_changes_nothing() -> None:
    stream = OTHERS + "---\n" + yaml.safe_dump_all(WORKLOADS.values(), sort_keys=False)
    for settings in (SETTINGS, replace(SETTINGS, native_sidecar=False)):
        once, _ = inject_stream(stream, settings, "default")
        twice, results = inject_stream(once, settings, "default")
        assert twice == once
        assert {r.mutation.reason for r in results} == {"already_injected"}
        for document in yaml.safe_load_all(twice):
            if document["kind"] in WORKLOADS:
                assert agents(document) == [AGENT]


def test_the_namespace_comes_from_the_document_or_the_flag() -> None:
    stream = yaml.safe_dump_all([WORKLOADS["Pod"], WORKLOADS["Deployment"]], sort_keys=False)
    output, results = inject_stream(stream, SETTINGS, "payments")
    assert [r.workload for r in results] == ["Pod payments/web", "Deployment shop/web"]
    pod = next(yaml.safe_load_all(output))
    [agent] = [c for c in pod["spec"]["initContainers"] if c["name"] == AGENT]
    config = next(e["value"] for e in agent["env"])
    assert "spiffe://cluster.local/ns/payments/sa/default" in config


def test_a_skipped_workload_is_left_as_written_and_reported() -> None:
    stream = "kind: Pod\napiVersion: v1\nmetadata: {name: dns, namespace: kube-system}\n"
    stream += "spec: {containers: [{name: dns, image: dns}]}\n"
    output, [result] = inject_stream(stream, SETTINGS, "default")
    assert output == stream
    assert result.mutation.reason == "namespace_excluded"
    assert result.mutation.warnings


def test_a_timestamp_stays_the_string_it_was_in_an_injected_document() -> None:
    # kubectl reads an unquoted timestamp as a string; so must we, or it comes out
    # as `2026-11-22 09:00:00+00:00`, which the API server refuses where it wants RFC 3339.
    deployment = WORKLOADS["Deployment"] | {
        "metadata": {"name": "web", "annotations": {"deployed": "2026-11-22T09:00:00Z"}}
    }
    stream = yaml.safe_dump(deployment).replace("'2026-11-22T09:00:00Z'", "2026-11-22T09:00:00Z")
    assert "deployed: 2026-11-22T09:00:00Z\n" in stream
    output, _ = inject_stream(stream, SETTINGS, "default")
    assert "deployed: '2026-11-22T09:00:00Z'\n" in output


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        ("kind: [unclosed", "not YAML"),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n",
            "no pod template",
        ),
        ("apiVersion: v1\nkind: Pod\nmetadata: {namespace: a/b}\nspec: {containers: []}\n", "a/b"),
    ],
)
def test_a_stream_that_cannot_be_injected_is_an_error(stream: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        inject_stream(stream, SETTINGS, "default")


@pytest.mark.parametrize("stream", ["", "# only a comment\n", "---\n", "--- null\n"])
def test_empty_streams_and_documents_pass_through(stream: str) -> None:
    output, results = inject_stream(stream, SETTINGS, "default")
    assert (output, results) == (stream, [])


def test_the_workloads_of_a_list_are_injected_as_kubectl_get_prints_them() -> None:
    # `kubectl get deploy -o yaml` prints one `kind: List`: its items are the workloads.
    service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"}}
    listed = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [WORKLOADS["Deployment"], service, WORKLOADS["Job"]],
        "metadata": {"resourceVersion": ""},
    }
    output, results = inject_stream(yaml.safe_dump(listed, sort_keys=False), SETTINGS, "default")
    [document] = yaml.safe_load_all(output)
    deployment, kept, job = document["items"]
    assert agents(deployment) == agents(job) == [AGENT]
    assert kept == service
    assert [(r.index, r.workload, r.mutation.reason) for r in results] == [
        (1, "Deployment shop/web", "injected"),
        (1, "Job default/once", "injected"),
    ]
    again, results = inject_stream(output, SETTINGS, "default")
    assert again == output
    assert {r.mutation.reason for r in results} == {"already_injected"}


def test_an_injected_document_is_plain_yaml_without_anchors() -> None:
    # The agent's two probes share one httpGet; `&id001` / `*id001` in the output
    # would be valid YAML, but surprising to read and to diff.
    output, _ = inject_stream(yaml.safe_dump(WORKLOADS["Pod"]), SETTINGS, "default")
    assert "&id" not in output
    assert "*id" not in output
