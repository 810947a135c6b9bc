"""`outrider inject`: the webhook's mutation applied to the pod templates of a manifest file.

A multi-document YAML stream goes in and comes out in the same order. Pods,
Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs get the
agent in their pod template, also as the items of a `kind: List` (what
`kubectl get -o yaml` prints); every other document, and every workload left
alone (opted out, already injected, ...), is copied through as the very text
it was, comments included. Only injected documents are written out anew.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from injector.core import Mutation, Settings, apply_patch, mutate

__all__ = ["Injected", "ManifestError", "inject_stream"]

#: Where each workload keeps its pod template.
TEMPLATES: dict[tuple[str, str], tuple[str, ...]] = {
    ("v1", "Pod"): (),
    ("apps/v1", "Deployment"): ("spec", "template"),
    ("apps/v1", "StatefulSet"): ("spec", "template"),
    ("apps/v1", "DaemonSet"): ("spec", "template"),
    ("apps/v1", "ReplicaSet"): ("spec", "template"),
    ("batch/v1", "Job"): ("spec", "template"),
    ("batch/v1", "CronJob"): ("spec", "jobTemplate", "spec", "template"),
}


class ManifestError(Exception):
    """The stream is not YAML, or a workload has no pod template to inject."""


class _Dumper(yaml.SafeDumper):
    """Plain YAML: an object the mutation shares (the agent's probes) is written out twice."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


class _Loader(yaml.SafeLoader):
    """YAML as kubectl reads it: a timestamp stays the string it was written as."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass(frozen=True)
class Injected:
    """What happened to one workload document (1-based `index` in the stream)."""

    index: int
    workload: str  # "Deployment shop/web"
    mutation: Mutation


def inject_stream(text: str, settings: Settings, namespace: str) -> tuple[str, list[Injected]]:
    """The stream with the agent added; `namespace` is for documents that name none."""
    out: list[str] = []
    results: list[Injected] = []
    for index, chunk in enumerate(_documents(text), 1):
        try:
            document = yaml.load(chunk, Loader=_Loader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as exc:
            raise ManifestError(f"document {index}: not YAML: {exc}") from None
        injected = [
            result
            for item in _listed(document)
            if (result := _inject(item, index, settings, namespace)) is not None
        ]
        if any(result.mutation.patch for result in injected):
            dumped = yaml.dump(document, Dumper=_Dumper, sort_keys=False, allow_unicode=True)
            out.append("---\n" + dumped)
        else:
            out.append(chunk)
        results.extend(injected)
    return "".join(_separated(out)), results


def _listed(document: Any) -> list[Any]:
    """The items of a `kind: List` (`kubectl get -o yaml`), else the document itself."""
    if (
        isinstance(document, dict)
        and document.get("apiVersion") == "v1"
        and document.get("kind") == "List"
        and isinstance(document.get("items"), list)
    ):
        return list(document["items"])
    return [document]


def _inject(document: Any, index: int, settings: Settings, default: str) -> Injected | None:
    if not isinstance(document, dict):
        return None
    path = TEMPLATES.get((document.get("apiVersion"), document.get("kind")))  # type: ignore[arg-type]
    if path is None:
        return None
    metadata = document.get("metadata") or {}
    namespace = metadata.get("namespace") or default
    workload = f"{document['kind']} {namespace}/{metadata.get('name') or '?'}"
    template: Any = document
    for key in path:
        template = template.get(key) if isinstance(template, dict) else None
    if not isinstance(template, dict):
        raise ManifestError(f"document {index} ({workload}): no pod template at {'.'.join(path)}")
    try:
        mutation = mutate(template, str(namespace), settings)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise ManifestError(f"document {index} ({workload}): {exc}") from None
    apply_patch(template, mutation.patch)
    return Injected(index, workload, mutation)


def _documents(text: str) -> Iterator[str]:
    """The stream's documents as text, each from its start (`---`, directives) to the next."""
    try:
        starts = [
            event.start_mark.index
            for event in yaml.parse(text, Loader=_Loader)
            if isinstance(event, yaml.DocumentStartEvent) and event.start_mark is not None
        ]
    except yaml.YAMLError as exc:
        raise ManifestError(f"not YAML: {exc}") from None
    if not starts:
        yield text
        return
    starts[0] = 0  # comments before the first document stay with it
    for start, end in zip(starts, [*starts[1:], len(text)], strict=True):
        yield text[start:end]


def _separated(chunks: list[str]) -> Iterator[str]:
    """Join documents so each still starts on its own line after a `---`."""
    for i, chunk in enumerate(chunks):
        if i and not chunk.startswith("---"):
            yield "---\n"
        yield chunk if chunk.endswith("\n") or not chunk else chunk + "\n"
