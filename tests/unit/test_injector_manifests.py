"""`outrider inject` on manifest streams: every workload kind, order and untouched text kept."""

from __future__ import annotations

import io
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from injector.core import Settings
from injector.core.sidecar import AGENT
from injector.manifests import (
    INVALID,
    TEMPLATES,
    ManifestError,
    inject_files,
    inject_sources,
    inject_stream,
    manifest_files,
)
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


def test_a_timestamp_stays_as_written_in_an_injected_document() -> None:
    # kubectl reads an unquoted timestamp as a string; a YAML library that reads it as a
    # date writes `2026-11-22 09:00:00+00:00`, which the API server refuses where it wants
    # RFC 3339. The round trip writes every scalar as it was: 0777 and yes too.
    deployment = WORKLOADS["Deployment"] | {
        "metadata": {
            "name": "web",
            "annotations": {"deployed": "2026-11-22T09:00:00Z", "mode": "0777", "on": "yes"},
        }
    }
    stream = yaml.safe_dump(deployment).replace("'", "")
    assert "deployed: 2026-11-22T09:00:00Z\n" in stream
    assert "mode: 0777\n" in stream
    output, _ = inject_stream(stream, SETTINGS, "default")
    assert agents(yaml.safe_load(output)) == [AGENT]
    for line in ("deployed: 2026-11-22T09:00:00Z\n", "mode: 0777\n", "on: yes\n"):
        assert line in output


def test_a_workload_that_cannot_be_injected_is_left_as_written_and_named() -> None:
    bad = "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: x}\nspec: {}\n"
    slash = "apiVersion: v1\nkind: Pod\nmetadata: {namespace: a/b}\nspec: {containers: []}\n"
    stream = bad + "---\n" + slash + "---\n" + yaml.safe_dump(WORKLOADS["Pod"])
    output, results = inject_stream(stream, SETTINGS, "default")
    first, second, third = output.split("---\n")
    assert (first, second) == (bad, slash)
    assert agents(yaml.safe_load(third)) == [AGENT]
    assert [(r.where, r.workload, r.mutation.reason) for r in results] == [
        ("document 1", "Deployment default/x", INVALID),
        ("document 2", "Pod a/b/?", INVALID),
        ("document 3", "Pod default/web", "injected"),
    ]
    assert results[0].mutation.warnings == (
        "outrider: not injected, left as written (document 1): no pod template at spec.template",
    )
    assert "a/b" in results[1].mutation.warnings[0]


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        ("kind: [unclosed", "not YAML"),
        ("apiVersion: v1\nkind: Pod\n---\nmetadata: {a: [}\n", "not YAML"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a, name: b}\n", 'duplicate key "name"'),
    ],
)
def test_a_stream_that_is_not_yaml_is_an_error(stream: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message) as refused:
        inject_stream(stream, SETTINGS, "default")
    assert "suppress" not in str(refused.value)  # kubectl refuses a duplicate key too


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


COMMENTED = """\
# web: the shop's front end
apiVersion: apps/v1
kind: Deployment
metadata:
    name: web   # the Service selects it
    namespace: shop
    labels: {app: web, tier: "front"}
spec:
    # two, for the rolling update
    replicas: 2
    selector:
        matchLabels: {app: web}
    template:
        metadata:
            labels: {app: web}
        spec:
            containers:
              - name: web  # the app
                image: 'web:1'
                ports: [{containerPort: 8080}]
                env:
                  - name: MODE
                    value: "on"
            # no volumes yet
# the end of web
"""


def comment_lines(text: str) -> list[str]:
    return [line.split("#", 1)[1] for line in text.splitlines() if "#" in line]


def test_an_injected_document_keeps_its_comments_key_order_quotes_and_indentation() -> None:
    output, [result] = inject_stream(COMMENTED, SETTINGS, "default")
    assert result.mutation.reason == "injected"
    assert comment_lines(output) == comment_lines(COMMENTED)
    document = yaml.safe_load(output)
    assert agents(document) == [AGENT]
    to_model(document)
    assert list(document) == ["apiVersion", "kind", "metadata", "spec"]
    assert list(document["spec"]) == ["replicas", "selector", "template"]
    # Every line of the input is still there, as written: only the agent's are new.
    lines = output.splitlines()
    kept = iter(lines)
    for line in COMMENTED.splitlines():
        if "#" not in line:  # an end-of-line comment may move to one space after its value
            assert line in kept, line
    assert '    labels: {app: web, tier: "front"}' in lines
    assert "                ports: [{containerPort: 8080}]" in lines
    assert "            initContainers:" in lines  # the document's four-space indent
    # A comment that ended the document still ends it, after the agent's additions.
    assert output.endswith("\n# the end of web\n")
    assert "&id" not in output and "*id" not in output
    again, [result] = inject_stream(output, SETTINGS, "default")
    assert (again, result.mutation.reason) == (output, "already_injected")


def test_an_alias_of_the_input_becomes_a_copy_and_only_the_copy_is_annotated() -> None:
    # `annotations: *labels` is one object twice: the agent's annotation must not become
    # a label too (kubectl reads an alias as a copy).
    stream = (
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web\n  labels: &labels {app: web}\n"
        "  annotations: *labels\nspec:\n  containers:\n  - {name: web, image: web:1}\n"
    )
    output, _ = inject_stream(stream, SETTINGS, "default")
    assert "&" not in output and "*" not in output
    assert "  labels: {app: web}\n" in output
    metadata = yaml.safe_load(output)["metadata"]
    assert metadata["labels"] == {"app": "web"}
    assert metadata["annotations"] == {"app": "web", "outrider.io/status": "injected"}


def test_a_bad_item_of_a_list_is_left_as_written_and_the_others_injected() -> None:
    bad = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "x"}, "spec": {}}
    listed = {
        "apiVersion": "v1",
        "kind": "List",
        "items": [WORKLOADS["Job"], bad, WORKLOADS["Pod"]],
    }
    output, results = inject_stream(yaml.safe_dump(listed, sort_keys=False), SETTINGS, "default")
    job, kept, pod = yaml.safe_load(output)["items"]
    assert agents(job) == agents(pod) == [AGENT]
    assert kept == bad
    assert [(r.where, r.workload, r.mutation.reason) for r in results] == [
        ("document 1, items[0]", "Job default/once", "injected"),
        ("document 1, items[1]", "Deployment default/x", INVALID),
        ("document 1, items[2]", "Pod default/web", "injected"),
    ]
    assert "(document 1, items[1]): no pod template" in results[1].mutation.warnings[0]


def test_a_directory_is_every_manifest_under_it_in_path_order(tmp_path: Path) -> None:
    (tmp_path / "apps" / "web").mkdir(parents=True)
    (tmp_path / ".git").mkdir()
    (tmp_path / "apps" / "web" / "deploy.yaml").write_text(COMMENTED)
    (tmp_path / "apps" / "job.yml").write_text(yaml.safe_dump(WORKLOADS["Job"]))
    (tmp_path / "pod.json").write_text(json.dumps(WORKLOADS["Pod"]))
    (tmp_path / "service.yaml").write_text(OTHERS)
    (tmp_path / "README.md").write_text("kind: Pod\n")
    (tmp_path / ".git" / "x.yaml").write_text("kind: Pod\n")
    assert [p.relative_to(tmp_path).as_posix() for p in manifest_files(tmp_path)] == [
        "apps/job.yml",
        "apps/web/deploy.yaml",
        "pod.json",
        "service.yaml",
    ]
    output, results = inject_files([tmp_path], SETTINGS, "default")
    assert [(p.name, r.workload, r.mutation.reason) for p, r in results] == [
        ("job.yml", "Job default/once", "injected"),
        ("deploy.yaml", "Deployment shop/web", "injected"),
        ("pod.json", "Pod default/web", "injected"),
    ]
    documents = list(yaml.safe_load_all(output))
    assert [d["kind"] for d in documents] == ["Job", "Deployment", "Pod", "Service", "ConfigMap"]
    assert output.endswith(OTHERS)
    assert set(comment_lines(COMMENTED)) <= set(comment_lines(output))
    assert "&id" not in output
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "all.yaml").write_text(output)
    again, results = inject_files([tmp_path / "out"], SETTINGS, "default")
    assert again == output
    assert {r.mutation.reason for _, r in results} == {"already_injected"}


def test_a_directory_without_manifests_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("kind: Pod\n")
    with pytest.raises(ManifestError, match=r"no \.yaml, \.yml, \.json files"):
        inject_files([tmp_path], SETTINGS, "default")


def test_a_kustomization_is_refused_with_the_command_that_builds_it(tmp_path: Path) -> None:
    """kustomization.yaml is not a manifest: copied through, it made `kubectl apply -f -`
    fail on the output (no kind) far from its cause, and its patches were never applied."""
    (tmp_path / "app").mkdir()
    (tmp_path / "app" / "deploy.yaml").write_text(COMMENTED)
    (tmp_path / "app" / "kustomization.yaml").write_text("resources: [deploy.yaml]\n")
    with pytest.raises(ManifestError) as raised:
        inject_files([tmp_path], SETTINGS, "default")
    said = str(raised.value)
    assert f"{tmp_path / 'app' / 'kustomization.yaml'}: a kustomization, not a manifest" in said
    assert f"kustomize build {tmp_path / 'app'} | outrider inject -f -" in said


def test_stdin_is_read_alone_and_its_workloads_name_no_file(tmp_path: Path) -> None:
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(WORKLOADS["Pod"]))
    with pytest.raises(ManifestError, match="stdin is read alone, not with files"):
        inject_sources(["-", str(tmp_path)], io.StringIO(""), SETTINGS, "default")
    stdin = io.StringIO(yaml.safe_dump(WORKLOADS["Pod"]))
    from_stdin, results = inject_sources(["-"], stdin, SETTINGS, "default")
    assert [(where, r.workload) for where, r in results] == [("", "Pod default/web")]
    from_file, results = inject_sources([str(tmp_path)], io.StringIO(""), SETTINGS, "default")
    assert [(where, r.workload) for where, r in results] == [
        (str(tmp_path / "pod.yaml"), "Pod default/web")
    ]
    assert from_stdin == from_file


def test_without_ruamel_yaml_it_says_which_group_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "ruamel.yaml", None)  # as if not installed
    with pytest.raises(ManifestError, match=r"pip install 'outrider\[injector\]'"):
        inject_stream(yaml.safe_dump(WORKLOADS["Pod"]), SETTINGS, "default")


# --- hostile and unusual inputs: each workload is injected or named, nothing else lost ---

POD_TEXT = yaml.safe_dump(WORKLOADS["Pod"], sort_keys=False)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec:\n", "spec is not a mapping"),
        ("apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: [1]\n", "spec is not a mapping"),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: web}\n",
            "spec.containers is not a list",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a}\nspec: {containers: [web]}\n",
            "spec.containers[0] is not a mapping",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: [a]\nspec: {containers: []}\n",
            "metadata is not a mapping",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, annotations: [x]}\n"
            "spec: {containers: []}\n",
            "metadata.annotations is not a mapping",
        ),
        (
            "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: a}\n"
            "spec: {template: {spec: {volumes: 3}}}\n",
            "spec.template.spec.volumes is not a list",
        ),
        (  # an unquoted false is a boolean: the opt-out was read as "inject, with a warning"
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: a\n  annotations:\n"
            "    outrider.io/inject: false\nspec: {containers: []}\n",
            "metadata.annotations[outrider.io/inject] is not a string: quote it",
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: a, labels: {port: 8080}}\n"
            "spec: {containers: []}\n",
            "metadata.labels[port] is not a string: quote it",
        ),
    ],
)
def test_a_workload_of_the_wrong_shape_is_named_with_the_field_and_the_rest_injected(
    document: str, problem: str
) -> None:
    output, results = inject_stream(document + "---\n" + POD_TEXT, SETTINGS, "default")
    kept, injected = output.split("---\n")
    assert kept == document
    assert agents(yaml.safe_load(injected)) == [AGENT]
    assert [r.mutation.reason for r in results] == [INVALID, "injected"]
    assert problem in results[0].mutation.warnings[0]
    assert "(document 1)" in results[0].mutation.warnings[0]


@pytest.mark.parametrize(
    "document",
    [
        "apiVersion: v1\nkind: [Pod]\n",
        "apiVersion: {v: 1}\nkind: Pod\n",
        "apiVersion: v1\nkind: {List: 1}\nitems: []\n",
    ],
)
def test_a_document_whose_kind_is_not_a_string_passes_through(document: str) -> None:
    output, results = inject_stream(document + "---\n" + POD_TEXT, SETTINGS, "default")
    assert output.split("---\n")[0] == document
    assert [r.mutation.reason for r in results] == ["injected"]


def test_lists_in_lists_and_typed_lists_are_injected_as_kubectl_apply_flattens_them() -> None:
    # `kubectl apply -f` reads any kind with `items` (PodList, DeploymentList, a List in
    # a List) as its items; a workload in one must not pass through silently.
    inner = {"apiVersion": "v1", "kind": "List", "items": [WORKLOADS["Job"]]}
    typed = {"apiVersion": "apps/v1", "kind": "DeploymentList", "items": [WORKLOADS["Deployment"]]}
    listed = {"apiVersion": "v1", "kind": "List", "items": [WORKLOADS["Pod"], inner]}
    stream = yaml.safe_dump_all([listed, typed], sort_keys=False)
    output, results = inject_stream(stream, SETTINGS, "default")
    first, second = yaml.safe_load_all(output)
    pod, nested = first["items"]
    assert agents(pod) == agents(nested["items"][0]) == [AGENT]
    assert agents(second["items"][0]) == [AGENT]
    assert [(r.where, r.mutation.reason) for r in results] == [
        ("document 1, items[0]", "injected"),
        ("document 1, items[1].items[0]", "injected"),
        ("document 2, items[0]", "injected"),
    ]
    assert inject_stream(output, SETTINGS, "default")[0] == output


@pytest.mark.parametrize("indent", [None, 2, 4, "\t"])
def test_json_in_is_json_out_as_kubectl_reads_a_stream_that_starts_with_a_brace(
    indent: int | str | None,
) -> None:
    # kubectl decodes a stream that starts with `{` as JSON: YAML flow style added to it
    # (`annotations: {outrider.io/status: injected}`) is not JSON, and neither jq nor
    # kubectl reads it.
    for workload in (
        WORKLOADS["Deployment"],
        {"apiVersion": "v1", "kind": "List", "items": [WORKLOADS["Pod"]]},
    ):
        text = json.dumps(workload, indent=indent) + "\n"
        output, [result] = inject_stream(text, SETTINGS, "default")
        assert result.mutation.reason == "injected"
        document = json.loads(output)
        assert list(document) == list(workload)
        template = document["items"][0] if document["kind"] == "List" else document
        assert agents(template) == [AGENT]
        assert output.endswith("}\n")
        if indent is not None:
            assert output.startswith(
                "{\n" + (indent if isinstance(indent, str) else " " * indent) + '"apiVersion"'
            )
        else:
            assert output.count("\n") == 1
        again, [result] = inject_stream(output, SETTINGS, "default")
        assert (again, result.mutation.reason) == (output, "already_injected")


def test_a_kept_block_scalar_at_the_end_keeps_its_trailing_lines() -> None:
    # `|+` keeps the blank lines after it: they are the value's, not the document's.
    document = POD_TEXT.replace(
        "    image: app:1\n", "    image: app:1\n    command:\n    - |+\n      echo hi\n\n\n"
    )
    assert yaml.safe_load(document)["spec"]["containers"][0]["command"] == ["echo hi\n\n\n"]
    output, _ = inject_stream(document + "---\n" + POD_TEXT, SETTINGS, "default")
    first = next(yaml.safe_load_all(output))
    assert first["spec"]["containers"][0]["command"] == ["echo hi\n\n\n"]
    assert inject_stream(output, SETTINGS, "default")[0] == output


def test_a_large_document_that_is_not_a_workload_is_copied_without_the_round_trip() -> None:
    # A 4 MB ConfigMap (a dashboard, a bundle) is no workload: reading it with the
    # pure-Python round trip took ~30 s; it is text to copy.
    import time

    data = "".join(f"  key{i}: value{i}\n" for i in range(100_000))
    document = f"apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: big}}\ndata:\n{data}"
    started = time.monotonic()
    output, results = inject_stream(document, SETTINGS, "default")
    assert (output, results) == (document, [])
    assert time.monotonic() - started < 5


def test_a_crlf_stream_comes_out_crlf_throughout() -> None:
    # The agent's lines were LF among the document's CRLF ones: a file of mixed line ends.
    stream = (OTHERS + "---\n" + POD_TEXT).replace("\n", "\r\n")
    output, [result] = inject_stream(stream, SETTINGS, "default")
    assert result.mutation.reason == "injected"
    assert output.count("\n") == output.count("\r\n") > stream.count("\n")
    assert output.startswith(OTHERS.replace("\n", "\r\n"))
    assert inject_stream(output, SETTINGS, "default")[0] == output
