"""`outrider inject`: the webhook's mutation applied to the pod templates of manifest files.

A multi-document YAML stream goes in and comes out in the same order. Pods,
Deployments, StatefulSets, DaemonSets, ReplicaSets, Jobs and CronJobs get the
agent in their pod template, also as the items of a `kind: List` (what
`kubectl get -o yaml` prints), of a typed list (PodList) and of a List in a List,
as `kubectl apply -f` flattens them. A JSON manifest comes out as JSON (kubectl
reads a stream that starts with `{` as JSON), in its key order and indentation.
A directory is read as `kubectl apply -f DIR` would, but recursively: every .yaml,
.yml and .json file under it, in path order, one stream after the other.

Every document left alone (not a workload, opted out, already injected, ...)
is copied through as the very text it was; one that holds no workload is not
even built (its `kind` is read from the parser's events), so a large ConfigMap
costs little. An injected document is read and written with ruamel.yaml's round
trip, so it keeps its comments, key order, quoting and indentation, and only the
agent's additions are new text. It has no YAML anchors: an alias of the input
becomes a copy (as kubectl reads it, and so that the agent's annotation lands
only where it is added), and an object the mutation shares (the agent's probes)
is written out twice. Running it on its own output changes nothing.

A workload that cannot be injected (no pod template, a field of the wrong shape
named by its path, a bad namespace) is left as written and reported with where
it is (`document 2, items[3]`); the rest of the stream, and of its List, is still
injected. Only a stream that is not YAML is an error.
"""

from __future__ import annotations

import copy
import io
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

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
    `item` its place in a List (`items[3]`, `items[0].items[2]`; None outside one)."""

    index: int
    workload: str  # "Deployment shop/web"
    mutation: Mutation
    item: str | None = None

    @property
    def where(self) -> str:
        """`document 2` or `document 2, items[3]`: where to look in the input."""
        item = "" if self.item is None else f", {self.item}"
        return f"document {self.index}{item}"


def inject_stream(text: str, settings: Settings, namespace: str) -> tuple[str, list[Injected]]:
    """The stream with the agent added; `namespace` is for documents that name none.
    A stream written with CRLF line ends comes out with them throughout."""
    text = text.removeprefix("\ufeff")
    crlf = "\r\n" in text and text.count("\r\n") == text.count("\n")
    output, results = _inject_text(
        text.replace("\r\n", "\n") if crlf else text, settings, namespace
    )
    return (output.replace("\n", "\r\n") if crlf else output), results


def _inject_text(text: str, settings: Settings, namespace: str) -> tuple[str, list[Injected]]:
    whole = _json_document(text)
    if whole is not None:
        return _inject_json(text, whole, settings, namespace)
    out: list[str] = []
    results: list[Injected] = []
    for index, (chunk, candidate) in enumerate(_documents(text), 1):
        if not candidate:  # no workload in it: the text as it was, without the round trip
            out.append(chunk)
            continue
        head, body, tail = _parts(chunk)
        yaml_rt = _round_trip(body)
        try:
            document = yaml_rt.load(body)
        except Exception as exc:  # ruamel's errors share no base class with a message
            # Not ruamel's advice to suppress its duplicate-key check: kubectl refuses them too.
            said = str(exc).split("\n\nTo suppress this check")[0].strip()
            raise ManifestError(f"document {index}: not YAML: {said}") from None
        _unshared(document)
        injected = [
            _inject(entry, index, item, settings, namespace) for item, entry in _workloads(document)
        ]
        if any(result.mutation.patch for result in injected):
            dumped = io.StringIO()
            yaml_rt.dump(document, dumped)
            out.append(head + dumped.getvalue() + tail)
        else:
            out.append(chunk)
        results.extend(injected)
    return "".join(_separated(out)), results


def _json_document(text: str) -> Any:
    """The stream's one JSON object, or None when it is YAML. kubectl reads a stream that
    starts with `{` as JSON; so must what comes out of it be."""
    if not text.lstrip().startswith("{"):
        return None
    try:
        document = json.loads(text)
    except ValueError:
        return None
    return document if isinstance(document, dict) else None


def _inject_json(
    text: str, document: dict[str, Any], settings: Settings, namespace: str
) -> tuple[str, list[Injected]]:
    """A JSON manifest injected and written as JSON, in its key order and indentation."""
    injected = [
        _inject(entry, 1, item, settings, namespace) for item, entry in _workloads(document)
    ]
    if not any(result.mutation.patch for result in injected):
        return text, injected
    lines = [line for line in text.strip().splitlines()[1:] if line.strip()]
    indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())] if lines else None
    return json.dumps(document, indent=indent or None, ensure_ascii=False) + "\n", injected


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


def inject_sources(
    sources: Sequence[str], stdin: TextIO, settings: Settings, namespace: str
) -> tuple[str, list[tuple[str, Injected]]]:
    """`outrider inject -f`: `-` (stdin, read alone) or files and directories, injected as
    one stream, each workload with the file it came from ("" for stdin)."""
    if "-" in sources and len(sources) > 1:
        raise ManifestError("-f -: stdin is read alone, not with files")
    if list(sources) == ["-"]:
        output, injected = inject_stream(stdin.read(), settings, namespace)
        return output, [("", result) for result in injected]
    output, found = inject_files([Path(source) for source in sources], settings, namespace)
    return output, [(str(path), result) for path, result in found]


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


def _workloads(document: Any, where: str | None = None) -> Iterator[tuple[str | None, Any]]:
    """The workloads of a document with where they are: itself, or the items of a List,
    as `kubectl apply -f` flattens them (`kind: List` from `kubectl get -o yaml`, typed
    lists such as PodList, a List in a List)."""
    if _template_path(document) is not None:
        yield where, document
    elif _is_list(document):
        for i, item in enumerate(document["items"]):
            yield from _workloads(item, f"{where}.items[{i}]" if where else f"items[{i}]")


def _is_list(document: Any) -> bool:
    return (
        isinstance(document, dict)
        and isinstance(document.get("kind"), str)
        and document["kind"].endswith("List")
        and isinstance(document.get("items"), list)
    )


def _template_path(document: Any) -> tuple[str, ...] | None:
    if not isinstance(document, dict):
        return None
    api_version, kind = document.get("apiVersion"), document.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return None
    return TEMPLATES.get((api_version, kind))


def _inject(
    document: dict[str, Any], index: int, item: str | None, settings: Settings, default: str
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
    problem = _misshapen(template, ".".join(path))
    if problem is not None:
        return _invalid(index, item, workload, problem)
    try:
        mutation = mutate(template, str(namespace), settings)
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        return _invalid(index, item, workload, str(exc))
    apply_patch(template, mutation.patch)
    return Injected(index, workload, mutation, item)


#: What the mutation reads and adds to, by shape: a mapping, or a list of mappings. The
#: API server checks this before the webhook sees a pod; a file is checked here.
_SHAPES: tuple[tuple[str, str, type], ...] = (
    ("metadata", "", dict),
    ("metadata", "annotations", dict),
    ("metadata", "labels", dict),
    ("spec", "containers", list),
    ("spec", "initContainers", list),
    ("spec", "volumes", list),
)


def _misshapen(template: dict[str, Any], path: str) -> str | None:
    """The first field of the pod template the agent cannot be added to, named by its
    path (`spec.template.spec.containers is not a list`); None when all is well."""
    prefix = f"{path}." if path else ""
    if not isinstance(template.get("spec"), dict):
        return f"{prefix}spec is not a mapping"
    for section, key, shape in _SHAPES:
        value = template.get(section)
        name = f"{prefix}{section}"
        if key:
            value = value.get(key) if isinstance(value, dict) else None
            name = f"{name}.{key}"
        if value is None:
            continue
        if not isinstance(value, shape):
            return f"{name} is not a {'mapping' if shape is dict else 'list'}"
        if isinstance(value, dict) and key in ("annotations", "labels"):  # kubectl refuses
            # `inject: false` unquoted too: it is a boolean, not the opt-out
            for entry, text in value.items():
                if text is not None and not isinstance(text, str):  # null reads as ""
                    return f"{name}[{entry}] is not a string: quote it"
        if isinstance(value, list):
            for i, entry in enumerate(value):
                if not isinstance(entry, dict):
                    return f"{name}[{i}] is not a mapping"
    return None


def _invalid(index: int, item: str | None, workload: str, problem: str) -> Injected:
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


#: A block scalar that keeps its trailing blank lines (`|+`, `>+`, `|2+`, `|+2`).
_KEEP = re.compile(r"[|>](?:[1-9]?\+|\+[1-9])[ \t]*(?:#.*)?$", re.MULTILINE)
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
    if _KEEP.search("".join(lines[start:end])):  # `|+`: the blank lines after it are its own
        while end < len(lines) and not lines[end].strip():
            end += 1
    return "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])


def _documents(text: str) -> Iterator[tuple[str, bool]]:
    """The stream's documents as text, each from its start (`---`, directives) to the next,
    and whether it may hold a workload: its top-level `kind` names one, or a List. Read
    from the parser's events (libyaml's when installed), so a document that holds none (a
    large ConfigMap) is never built, let alone round-tripped."""
    try:
        found = _starts(text, getattr(yaml, "CSafeLoader", _Loader))
        if any(not text.startswith(("---", "%"), start) for start, _ in found[1:]):
            found = _starts(text, _Loader)  # libyaml counts otherwise: read it again
    except yaml.YAMLError as exc:
        raise ManifestError(f"not YAML: {exc}") from None
    if not found:
        yield text, False
        return
    starts = [start for start, _ in found]
    starts[0] = 0  # comments before the first document stay with it
    for (_, candidate), start, end in zip(found, starts, [*starts[1:], len(text)], strict=True):
        yield text[start:end], candidate


def _starts(text: str, loader: Any) -> list[tuple[int, bool]]:
    """Each document's start and whether it may hold a workload, from the parse events."""
    found: list[tuple[int, bool]] = []
    stack: list[list[Any]] = []  # per open collection: [is a mapping, next is a key, key]
    top: dict[str, Any] = {}
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.DocumentStartEvent):
            stack, top = [], {}
            found.append((event.start_mark.index if event.start_mark else 0, False))
        elif isinstance(event, yaml.DocumentEndEvent):
            kind, api_version = top.get("kind"), top.get("apiVersion")
            candidate = "<<" in top or (
                isinstance(kind, str)
                and ((api_version, kind) in TEMPLATES or kind.endswith("List"))
            )
            found[-1] = (found[-1][0], candidate)
        elif isinstance(event, (yaml.CollectionEndEvent,)):
            stack.pop()
        elif isinstance(event, yaml.NodeEvent):
            if stack and stack[-1][0]:
                mapping = stack[-1]
                scalar = event.value if isinstance(event, yaml.ScalarEvent) else None
                if mapping[1]:
                    mapping[2] = scalar if len(stack) == 1 else None
                elif mapping[2] is not None:
                    top[mapping[2]] = scalar
                mapping[1] = not mapping[1]
            if isinstance(event, yaml.MappingStartEvent):
                stack.append([True, True, None])
            elif isinstance(event, yaml.SequenceStartEvent):
                stack.append([False, False, None])
    return found


def _separated(chunks: Sequence[str]) -> Iterator[str]:
    """Join documents so each still starts on its own line after a `---`."""
    for i, chunk in enumerate(chunks):
        if i and not chunk.startswith("---"):
            yield "---\n"
        yield chunk if chunk.endswith("\n") or not chunk else chunk + "\n"
