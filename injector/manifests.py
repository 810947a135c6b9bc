"""`outrider inject`: the webhook's mutation applied to the pod templates of manifest files.

A multi-document YAML stream goes in and comes out in the same order. Pods,
Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs get the
agent in their pod template, also as the items of a `kind: List` (what
`kubectl get -o yaml` prints). A directory is read as `kubectl apply -f DIR`
would, but recursively: every .yaml, .yml and .json file under it, in path
order, one stream after the other.

Every document left alone (not a workload, opted out, already injected, ...)
is copied through as the very text it was. An injected document is read and
written with ruamel.yaml's round trip, so it keeps its comments, key order,
quoting and indentation, and only the agent's additions are new text. It has no
YAML anchors: an alias of the input becomes a copy (as kubectl reads it, and so
that the agent's annotation lands only where it is added), and an object the
mutation shares (the agent's probes) is written out twice. Running it on its
own output changes nothing.

A workload that cannot be injected (no pod template, a bad namespace) is left
as written and reported with where it is (`document 2, items[3]`); the rest of
the stream, and of its List, is still injected. Only a stream that is not YAML
is an error.
"""

from __future__ import annotations

import copy
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from injector.core import Mutation, Settings, apply_patch, mutate

__all__ = [
    "INVALID",
    "MANIFEST_SUFFIXES",
    "Injected",
    "ManifestError",
    "inject_files",
    "inject_stream",
    "manifest_files",
]

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
#: The files of a directory that are manifests, as kubectl picks them.
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
#: The reason of a workload left as written because it cannot be injected.
INVALID = "invalid"


class ManifestError(Exception):
    """The stream is not YAML, or a path holds no manifest."""


class _Loader(yaml.SafeLoader):
    """Finds the documents' boundaries; never builds objects (ruamel.yaml does)."""


@dataclass(frozen=True)
class Injected:
    """What happened to one workload: `index` is its document in the stream (1-based),
    `item` its place among a List's items (None outside a List)."""

    index: int
    workload: str  # "Deployment shop/web"
    mutation: Mutation
    item: int | None = None

    @property
    def where(self) -> str:
        """`document 2` or `document 2, items[3]`: where to look in the input."""
        item = "" if self.item is None else f", items[{self.item}]"
        return f"document {self.index}{item}"


def inject_stream(text: str, settings: Settings, namespace: str) -> tuple[str, list[Injected]]:
    """The stream with the agent added; `namespace` is for documents that name none."""
    out: list[str] = []
    results: list[Injected] = []
    for index, chunk in enumerate(_documents(text), 1):
        head, body, tail = _parts(chunk)
        yaml_rt = _round_trip(body)
        try:
            document = yaml_rt.load(body)
        except Exception as exc:  # ruamel's errors share no base class with a message
            raise ManifestError(f"document {index}: not YAML: {exc}") from None
        _unshared(document)
        listed = _listed(document)
        injected = [
            _inject(entry, index, None if listed is None else item, settings, namespace)
            for item, entry in enumerate([document] if listed is None else listed)
            if _template_path(entry) is not None
        ]
        if any(result.mutation.patch for result in injected):
            dumped = io.StringIO()
            yaml_rt.dump(document, dumped)
            out.append(head + dumped.getvalue() + tail)
        else:
            out.append(chunk)
        results.extend(injected)
    return "".join(_separated(out)), results


def inject_files(
    paths: Sequence[Path], settings: Settings, namespace: str
) -> tuple[str, list[tuple[Path, Injected]]]:
    """Every manifest at `paths` (files or directories), injected, as one stream in
    order (what `kubectl apply -f` would apply), with each workload's file."""
    streams: list[str] = []
    results: list[tuple[Path, Injected]] = []
    for file in [file for path in paths for file in manifest_files(path)]:
        try:
            text = file.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ManifestError(f"cannot read {file}: {exc}") from None
        try:
            output, injected = inject_stream(text, settings, namespace)
        except ManifestError as exc:
            raise ManifestError(f"{file}: {exc}") from None
        streams.append(output)
        results += [(file, result) for result in injected]
    return "".join(_separated([s for s in streams if s.strip()])), results


#: kustomize's own file names: inputs to `kustomize build`, not manifests.
KUSTOMIZATIONS = frozenset({"kustomization.yaml", "kustomization.yml", "Kustomization"})


def manifest_files(path: Path) -> list[Path]:
    """The manifests at `path`: the file itself, or every .yaml/.yml/.json file under the
    directory (recursively, hidden ones skipped), in path order. A kustomization is
    refused with the command that builds it: copied through, it is a document without a
    kind that `kubectl apply` refuses, and its patches would never be applied."""
    if not path.is_dir():
        _not_a_kustomization(path)
        return [path]
    found = sorted(
        file
        for file in path.rglob("*")
        if file.suffix in MANIFEST_SUFFIXES
        and file.is_file()
        and not any(part.startswith(".") for part in file.relative_to(path).parts)
    )
    if not found:
        raise ManifestError(f"{path}: no {', '.join(MANIFEST_SUFFIXES)} files in the directory")
    for file in found:
        _not_a_kustomization(file)
    return found


def _not_a_kustomization(file: Path) -> None:
    if file.name in KUSTOMIZATIONS:
        raise ManifestError(
            f"{file}: a kustomization, not a manifest: inject what it builds,"
            f" `kustomize build {file.parent} | outrider inject -f -`"
        )


def _unshared(node: Any, seen: set[int] | None = None) -> None:
    """Every alias of the input made a copy of its anchor's object, and the anchor dropped.

    An alias is one object twice: adding the agent's annotation to `annotations: *labels`
    would add it to the labels too. kubectl reads aliases as copies; so do we.
    """
    seen = set() if seen is None else seen
    seen.add(id(node))
    anchor = getattr(node, "anchor", None)
    if anchor is not None and getattr(anchor, "value", None) is not None:
        anchor.value = None
    keys: Iterable[Any] = ()
    if isinstance(node, dict):
        keys = node.keys()
    elif isinstance(node, list):
        keys = range(len(node))
    for key in keys:
        child = node[key]
        if not isinstance(child, (dict, list)):
            continue
        if id(child) in seen:
            child = node[key] = copy.deepcopy(child)
        _unshared(child, seen)


def _listed(document: Any) -> list[Any] | None:
    """The items of a `kind: List` (`kubectl get -o yaml`); None for any other document."""
    if (
        isinstance(document, dict)
        and document.get("apiVersion") == "v1"
        and document.get("kind") == "List"
        and isinstance(document.get("items"), list)
    ):
        return list(document["items"])
    return None


def _template_path(document: Any) -> tuple[str, ...] | None:
    if not isinstance(document, dict):
        return None
    return TEMPLATES.get((document.get("apiVersion"), document.get("kind")))  # type: ignore[arg-type]


def _inject(
    document: dict[str, Any], index: int, item: int | None, settings: Settings, default: str
) -> Injected:
    path = _template_path(document) or ()
    metadata = document.get("metadata")
    metadata = metadata if isinstance(metadata, dict) else {}
    namespace = metadata.get("namespace") or default
    workload = f"{document['kind']} {namespace}/{metadata.get('name') or '?'}"
    template: Any = document
    for key in path:
        template = template.get(key) if isinstance(template, dict) else None
    if not isinstance(template, dict):
        return _invalid(index, item, workload, f"no pod template at {'.'.join(path)}")
    try:
        mutation = mutate(template, str(namespace), settings)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        return _invalid(index, item, workload, str(exc))
    apply_patch(template, mutation.patch)
    return Injected(index, workload, mutation, item)


def _invalid(index: int, item: int | None, workload: str, problem: str) -> Injected:
    where = Injected(index, workload, Mutation(INVALID), item).where
    warning = f"outrider: not injected, left as written ({where}): {problem}"
    return Injected(index, workload, Mutation(INVALID, (), (warning,)), item)


def _round_trip(chunk: str) -> Any:
    """A ruamel.yaml round-trip reader and writer for one document, indented as it is.

    Kubernetes objects hold no YAML-only types, and kubectl reads a timestamp, `yes`
    or `0777` as whatever it was written as: the round trip keeps every scalar as
    written, so none of them changes meaning on the way through.
    """
    try:
        from ruamel.yaml import YAML
        from ruamel.yaml.representer import RoundTripRepresenter
    except ImportError:
        raise ManifestError(
            "outrider inject needs ruamel.yaml: pip install 'outrider[injector]'"
        ) from None

    class Representer(RoundTripRepresenter):
        def ignore_aliases(self, data: Any) -> bool:
            # What the mutation shares (the agent's probes) is written out twice, never as
            # `&id001` / `*id001`: surprising to read and to diff.
            return True

    yaml_rt = YAML(typ="rt")
    yaml_rt.Representer = Representer
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096  # no new line breaks in long values (the agent's config)
    yaml_rt.brace_single_entry_mapping_in_flow_sequence = True  # `[{port: 80}]` stays so
    mapping, offset = _indentation(chunk)
    yaml_rt.indent(mapping=mapping, sequence=offset + 2, offset=offset)
    return yaml_rt


_KEY = re.compile(r"^( *)(- +)?[^\s#-][^:#]*:(\s|$)")


def _indentation(chunk: str) -> tuple[int, int]:
    """(mapping indent, where a block sequence's `-` sits under its key) as the document
    writes them; kubectl's (2, 0) when it does not tell."""
    mapping, offset, parent = 0, None, None
    for line in chunk.splitlines():
        match = _KEY.match(line)
        if match is None:
            continue
        indent = len(match[1])
        if parent is not None and mapping == 0 and indent > parent and not match[2]:
            mapping = indent - parent
        if match[2] and offset is None and parent is not None:
            offset = max(indent - parent, 0)
        parent = indent + len(match[2] or "")
    return mapping or 2, offset or 0


def _parts(chunk: str) -> tuple[str, str, str]:
    """The document's text as (head, content, tail). The comments, directives and `---`
    line before its content, and the comments at the left margin after it, are kept as
    they are: the round trip would keep a trailing comment on the last key, and the
    agent's keys, added after it, would then come after the comment that ended it."""
    lines = chunk.splitlines(keepends=True)
    start = 0
    for i, line in enumerate(lines):
        if line.startswith("---") and line[3:].strip() == "":
            start = i + 1
            break
        if not (line.startswith("%") or line.lstrip().startswith("#") or not line.strip()):
            break
    end = len(lines)
    while end > start and (lines[end - 1].startswith("#") or not lines[end - 1].strip()):
        end -= 1
    return "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])


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


def _separated(chunks: Sequence[str]) -> Iterator[str]:
    """Join documents so each still starts on its own line after a `---`."""
    for i, chunk in enumerate(chunks):
        if i and not chunk.startswith("---"):
            yield "---\n"
        yield chunk if chunk.endswith("\n") or not chunk else chunk + "\n"
