"""The fake API server's storage: objects, resourceVersions, history, and watchers.

One global resourceVersion counter (as etcd's revision), a bounded history of
events (etcd's compaction window) that a watch from an older version replays,
and watchers that get every event of their resource, push-style. Every
operation takes one lock, so the test's thread and the server's event loop may
both call in; watchers are woken on their own loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
import secrets
import string
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jsonpatch

from tests import apikinds, apischema
from tests.apitypes import BUILTINS, ApiError, Json, Resource, resources_of_crd

LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"
NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
#: The largest object etcd stores (its default --max-request-bytes, 1.5 MiB).
ETCD_MAX_OBJECT_BYTES = 1536 * 1024


@dataclass(frozen=True)
class Event:
    """One committed change; `old` is the object before it (for selector transitions)."""

    revision: int
    type: str  # ADDED | MODIFIED | DELETED
    group_resource: tuple[str, str]
    obj: Json
    old: Json | None


# --- selectors ------------------------------------------------------------------------

_SET_TERM = re.compile(r"^\s*([^\s!=<>(),]+)\s+(in|notin)\s*\(([^)]*)\)\s*$")
_EQ_TERM = re.compile(r"^\s*([^\s!=<>(),]+)\s*(==|=|!=|<|>)\s*([^\s,]*)\s*$")
_EXISTS_TERM = re.compile(r"^\s*(!?)\s*([^\s!=<>(),]+)\s*$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # = != in notin exists !exists < >
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "exists":
            return present
        if self.op == "!exists":
            return not present
        if self.op in ("=", "in"):
            return present and value in self.values
        if self.op in ("!=", "notin"):
            return not present or value not in self.values
        try:
            number, bound = int(value or ""), int(self.values[0])
        except ValueError:
            return False
        return number > bound if self.op == ">" else number < bound


def _split_terms(text: str) -> list[str]:
    """Commas separate terms, except inside an `in (...)` set."""
    terms, depth, start = [], 0, 0
    for index, char in enumerate(text):
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == "," and depth == 0:
            terms.append(text[start:index])
            start = index + 1
    terms.append(text[start:])
    return [t for t in terms if t.strip()]


def parse_label_selector(text: str) -> list[Requirement]:
    """`a=b,c!=d,e in (f,g),h,!i,j>3` as kube-apiserver parses it; bad input is a 400."""
    requirements = []
    for term in _split_terms(text):
        if match := _SET_TERM.match(term):
            values = tuple(v.strip() for v in match[3].split(",") if v.strip())
            requirement = Requirement(match[1], match[2], values)
        elif match := _EQ_TERM.match(term):
            op = "=" if match[2] == "==" else match[2]
            requirement = Requirement(match[1], op, (match[3],))
        elif match := _EXISTS_TERM.match(term):
            requirement = Requirement(match[2], "!exists" if match[1] else "exists")
        else:
            raise ApiError(
                400, f"unable to parse requirement: found '{term.strip()}', expected: identifier"
            )
        causes = apikinds.qualified_name("key", requirement.key)
        for value in requirement.values if requirement.op not in "<>" else ():
            causes += apikinds.label_selector_value("values", value)
        if causes:
            raise ApiError(400, f"unable to parse requirement: {causes[0].message}")
        requirements.append(requirement)
    return requirements


@dataclass(frozen=True)
class Selector:
    """A list or watch's namespace, labelSelector and fieldSelector."""

    namespace: str | None = None  # None: every namespace
    labels: tuple[Requirement, ...] = ()
    fields: tuple[tuple[str, str, str], ...] = ()  # (path, = or !=, value)

    @classmethod
    def parse(cls, resource: Resource, namespace: str | None, labels: str, fields: str) -> Selector:
        allowed = ("metadata.name", "metadata.namespace", *resource.selectable)
        parsed = []
        for term in _split_terms(fields):
            match = re.match(r"^\s*([^=!\s]+)\s*(==|=|!=)\s*(.*?)\s*$", term)
            if match is None:
                raise ApiError(400, f"invalid selector: '{fields}'; can't understand '{term}'")
            if match[1] not in allowed:
                listed = ", ".join(f'"{a}"' for a in allowed)
                raise ApiError(400, f'"{match[1]}" is not a known field selector: only {listed}')
            parsed.append((match[1], "!=" if match[2] == "!=" else "=", match[3]))
        return cls(namespace, tuple(parse_label_selector(labels)), tuple(parsed))

    def matches(self, obj: Json) -> bool:
        meta = obj.get("metadata") or {}
        if self.namespace is not None and meta.get("namespace", "") != self.namespace:
            return False
        labels = meta.get("labels") or {}
        if not all(r.matches(labels) for r in self.labels):
            return False
        return all((_field(obj, path) == value) == (op == "=") for path, op, value in self.fields)


def _field(obj: Json, path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    return json.dumps(value) if isinstance(value, bool) else str(value)


# --- patches --------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (strategic merge patches are applied this way too)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def three_way_patch(original: Json, modified: Json, current: Json) -> Json:
    """kubectl apply's patch: set what the manifest changes in the live object, remove what
    the previous manifest (last-applied-configuration) had and this one drops."""
    patch: Json = {}
    for key, value in modified.items():
        live = current.get(key)
        if isinstance(value, dict) and isinstance(live, dict):
            before = original.get(key)
            sub = three_way_patch(before if isinstance(before, dict) else {}, value, live)
            if sub:
                patch[key] = sub
        elif live != value:
            patch[key] = value
    for key in original:
        if key not in modified and key in current:
            patch[key] = None
    return patch


_JSON_PATCH = "application/json-patch+json"
_MERGE_PATCH = "application/merge-patch+json"
_STRATEGIC = "application/strategic-merge-patch+json"


def apply_patch(resource: Resource, content_type: str, target: Json, body: bytes) -> Json:
    """`target` patched as kube-apiserver patches: JSON patch, JSON merge patch, and for
    built-in kinds strategic merge patch (lists merged by their schema's merge key)."""
    accepted = [_JSON_PATCH, _MERGE_PATCH] + ([] if resource.custom else [_STRATEGIC])
    if content_type not in accepted:
        raise ApiError(
            415,
            "the body of the request was in an unknown format - accepted media types include: "
            + ", ".join(accepted)
            + " (server-side apply, application/apply-patch+yaml, is not emulated)",
        )
    try:
        patch = json.loads(body)
    except ValueError as error:
        raise ApiError(400, f"error decoding patch: {error}") from None
    if content_type == _JSON_PATCH:
        try:
            patched: Json = jsonpatch.apply_patch(target, patch)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
            raise ApiError(
                422, f"the server rejected our request due to an error in our request: {error}"
            ) from None
        return patched
    if not isinstance(patch, dict):
        raise ApiError(400, "error decoding patch: a merge patch must be a JSON object")
    if content_type == _STRATEGIC:
        return apischema.strategic_merge(resource, target, patch)
    result: Json = merge_patch(target, patch)
    return result


# --- watchers -------------------------------------------------------------------------

#: Put on a watcher's queue to end its watch (cleanly, or by cutting the connection).
END, CUT = "END", "CUT"


class Watcher:
    """One open watch: events of its resource arrive on `queue`, on the server's loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, group_resource: tuple[str, str]) -> None:
        self.loop = loop
        self.group_resource = group_resource
        self.queue: asyncio.Queue[Event | str] = asyncio.Queue()

    def push(self, item: Event | str) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


# --- the store ------------------------------------------------------------------------


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass
class Store:
    """Every object the fake API server holds; thread-safe."""

    history_limit: int = 10_000
    namespace_lifecycle: bool = True
    clock: Callable[[], datetime] = _now
    resources: dict[tuple[str, str, str], Resource] = field(default_factory=dict)
    _objects: dict[tuple[str, str], dict[tuple[str, str], Json]] = field(default_factory=dict)
    _revision: int = 0
    _floor: int = 0  # the newest revision no longer in history
    _history: deque[Event] = field(default_factory=deque)
    _watchers: set[Watcher] = field(default_factory=set)
    _lock: threading.RLock = field(default_factory=threading.RLock)
    _next_ip: int = 10

    def __post_init__(self) -> None:
        for resource in BUILTINS:
            self.resources[(resource.group, resource.version, resource.plural)] = resource
        for name in NAMESPACES:
            namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
            self.create(self.resource_of("v1", "Namespace"), "", namespace)

    # -- lookups --

    @property
    def revision(self) -> int:
        return self._revision

    def resource_of(self, api_version: str, kind: str) -> Resource:
        group, _, version = api_version.rpartition("/")
        for resource in self.resources.values():
            if (resource.group, resource.version, resource.kind) == (group, version, kind):
                return resource
        raise ApiError(
            404,
            f'no matches for kind "{kind}" in version "{api_version}"; ensure '
            "CRDs are installed first",
        )

    def resource(self, group: str, version: str, plural: str) -> Resource | None:
        return self.resources.get((group, version, plural))

    def _served(self, resource: Resource, obj: Json) -> Json:
        out = copy.deepcopy(obj)
        out["apiVersion"] = resource.api_version  # conversion strategy None: same fields
        return out

    def _bucket(self, resource: Resource) -> dict[tuple[str, str], Json]:
        return self._objects.setdefault(resource.group_resource, {})

    def _stored(self, resource: Resource, namespace: str, name: str) -> Json:
        stored = self._bucket(resource).get((namespace, name))
        if stored is None:
            raise not_found(resource, name)
        return stored

    # -- reads --

    def get(self, resource: Resource, namespace: str, name: str) -> Json:
        with self._lock:
            return self._served(resource, self._stored(resource, namespace, name))

    def list_objects(self, resource: Resource, selector: Selector) -> tuple[list[Json], int]:
        with self._lock:
            items = [
                self._served(resource, obj)
                for _, obj in sorted(self._bucket(resource).items())
                if selector.matches(obj)
            ]
            return items, self._revision

    # -- writes --

    def create(
        self,
        resource: Resource,
        namespace: str,
        body: Any,
        *,
        strict: bool = False,
        dry_run: bool = False,
    ) -> tuple[Json, list[str]]:
        decoded = apischema.decode(resource, body, strict=strict)
        obj = decoded.obj
        meta = obj.setdefault("metadata", {})
        with self._lock:
            if resource.namespaced:
                if meta.get("namespace", namespace) != namespace:
                    raise ApiError(
                        400,
                        "the namespace of the provided object does not match the "
                        "namespace sent on the request",
                    )
                meta["namespace"] = namespace
                self._check_namespace(namespace)
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                alphabet = string.ascii_lowercase + string.digits
                meta["name"] = meta["generateName"] + "".join(
                    secrets.choice(alphabet) for _ in range(5)
                )
            now = _timestamp(self.clock())
            for server_set in (
                "resourceVersion",
                "uid",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
                "managedFields",
            ):
                meta.pop(server_set, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = now
            if resource.generation:
                meta["generation"] = 1
            if resource.status:
                obj.pop("status", None)
            apikinds.apply_defaults(resource, obj, None, self._cluster_ip)
            apikinds.validate(resource, obj)
            if resource.status and (status := apikinds.initial_status(resource, obj, now)):
                obj["status"] = status
            key = (meta.get("namespace", ""), meta["name"])
            if key in self._bucket(resource):
                raise ApiError(
                    409,
                    f'{resource.qualified} "{meta["name"]}" already exists',
                    reason="AlreadyExists",
                    details=_details(resource, meta["name"]),
                )
            if not dry_run:
                self._commit(resource, "ADDED", obj, None)
            return self._served(resource, obj), _warnings(decoded.unknown)

    def update(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        body: Any,
        *,
        status: bool = False,
        strict: bool = False,
        dry_run: bool = False,
    ) -> tuple[Json, list[str]]:
        decoded = apischema.decode(resource, body, strict=strict)
        new = decoded.obj
        meta = new.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise ApiError(
                400,
                f"the name of the object ({meta['name']}) does not match the name "
                f"on the URL ({name})",
            )
        with self._lock:
            old = self._stored(resource, namespace, name)
            self._check_precondition(resource, old, meta.get("resourceVersion"), None)
            if status:
                merged = copy.deepcopy(old)
                merged["status"] = new.get("status")
                if merged["status"] is None:
                    del merged["status"]
            else:
                merged = self._main_update(resource, old, new)
                apikinds.apply_defaults(resource, merged, old, self._cluster_ip)
            apikinds.validate(resource, merged)
            if _same(old, merged):  # a no-op write is no change: no new resourceVersion
                return self._served(resource, old), _warnings(decoded.unknown)
            if not dry_run:
                self._commit(resource, "MODIFIED", merged, old)
            return self._served(resource, merged), _warnings(decoded.unknown)

    def _main_update(self, resource: Resource, old: Json, new: Json) -> Json:
        """A write of the main resource: identity fields stay the server's; with a status
        subresource, the status stays too; a changed spec bumps the generation."""
        merged = copy.deepcopy(new)
        meta, before = merged["metadata"], old["metadata"]
        for key in (
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
            "namespace",
            "name",
            "resourceVersion",
        ):
            meta.pop(key, None)
            if key in before:
                meta[key] = before[key]
        if resource.status:
            merged.pop("status", None)
            if "status" in old:
                merged["status"] = copy.deepcopy(old["status"])
        if resource.generation and _spec_of(merged) != _spec_of(old):
            meta["generation"] = before.get("generation", 0) + 1
        return merged

    def patch(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        content_type: str,
        body: bytes,
        *,
        status: bool = False,
        strict: bool = False,
        dry_run: bool = False,
    ) -> tuple[Json, list[str]]:
        with self._lock:
            current = self._served(resource, self._stored(resource, namespace, name))
            revision = current["metadata"]["resourceVersion"]
            patched = apply_patch(resource, content_type, current, body)
            given = (patched.get("metadata") or {}).get("resourceVersion")
            if given != revision:  # the patch itself names a resourceVersion: a precondition
                self._check_precondition(resource, current, given, None)
                patched["metadata"]["resourceVersion"] = revision
            return self.update(
                resource, namespace, name, patched, status=status, strict=strict, dry_run=dry_run
            )

    def delete(
        self,
        resource: Resource,
        namespace: str,
        name: str,
        preconditions: Json | None = None,
        *,
        dry_run: bool = False,
    ) -> Json:
        with self._lock:
            old = self._stored(resource, namespace, name)
            pre = preconditions or {}
            self._check_precondition(resource, old, pre.get("resourceVersion"), pre.get("uid"))
            served = self._served(resource, old)
            if dry_run:
                return served
            if resource.kind == "Namespace":  # the namespace controller's work, at once
                self._delete_where(lambda r, obj: r.namespaced and _ns(obj) == name)
            if resource.kind == "CustomResourceDefinition":
                self._unregister(old)
            self._commit(resource, "DELETED", copy.deepcopy(old), old)
            return served

    def _delete_where(self, doomed: Callable[[Resource, Json], bool]) -> None:
        for resource in self._one_per_group_resource():
            for obj in list(self._bucket(resource).values()):
                if doomed(resource, obj):
                    self._commit(resource, "DELETED", copy.deepcopy(obj), obj)

    def _one_per_group_resource(self) -> list[Resource]:
        return list({r.group_resource: r for r in self.resources.values()}.values())

    def _check_precondition(
        self, resource: Resource, old: Json, revision: str | None, uid: str | None
    ) -> None:
        meta = old["metadata"]
        if revision and revision != meta["resourceVersion"]:
            raise ApiError(
                409,
                f"Operation cannot be fulfilled on {resource.qualified} "
                f'"{meta["name"]}": the object has been modified; please apply your '
                "changes to the latest version and try again",
                details=_details(resource, meta["name"]),
            )
        if uid and uid != meta["uid"]:
            raise ApiError(
                409,
                f"Precondition failed: UID in precondition: {uid}, UID in object "
                f"meta: {meta['uid']}",
                details=_details(resource, meta["name"]),
            )

    def _check_namespace(self, namespace: str) -> None:
        if not self.namespace_lifecycle:
            return
        if ("", namespace) not in self._objects.get(("", "namespaces"), {}):
            raise ApiError(
                404,
                f'namespaces "{namespace}" not found',
                details={"name": namespace, "kind": "namespaces"},
            )

    def _cluster_ip(self) -> str:
        self._next_ip += 1
        return f"10.96.{self._next_ip // 250}.{self._next_ip % 250 + 1}"

    # -- CRDs --

    def _register(self, crd: Json) -> None:
        for resource in list(self.resources.values()):
            if resource.custom and resource.group_resource == _crd_group_resource(crd):
                del self.resources[(resource.group, resource.version, resource.plural)]
        for resource in resources_of_crd(crd):
            self.resources[(resource.group, resource.version, resource.plural)] = resource

    def _unregister(self, crd: Json) -> None:
        group_resource = _crd_group_resource(crd)
        for resource in self._one_per_group_resource():
            if resource.group_resource == group_resource:
                self._delete_where(lambda r, _obj: r.group_resource == group_resource)
        for key, resource in list(self.resources.items()):
            if resource.custom and resource.group_resource == group_resource:
                del self.resources[key]

    # -- kubectl apply --

    def apply(self, manifest: Json) -> Json:
        """`kubectl apply` of one object: create it, or patch the live one three-way with
        the last-applied-configuration annotation kubectl keeps."""
        if not isinstance(manifest, dict) or "apiVersion" not in manifest or "kind" not in manifest:
            raise ApiError(400, "error validating data: apiVersion and kind must be set")
        resource = self.resource_of(manifest["apiVersion"], manifest["kind"])
        meta = manifest.setdefault("metadata", {})
        annotations = meta.setdefault("annotations", {})
        annotations.pop(LAST_APPLIED, None)
        annotations[LAST_APPLIED] = (
            json.dumps(manifest, sort_keys=True, separators=(",", ":")) + "\n"
        )
        namespace = meta.get("namespace", "default") if resource.namespaced else ""
        name = meta.get("name", "")
        with self._lock:
            if (namespace, name) not in self._bucket(resource):
                return self.create(resource, namespace, manifest, strict=True)[0]
            live = self._served(resource, self._stored(resource, namespace, name))
            last = json.loads((live["metadata"].get("annotations") or {}).get(LAST_APPLIED, "{}"))
            patch = three_way_patch(last, manifest, live)
            merged = merge_patch(live, patch)
            merged["metadata"].pop("resourceVersion", None)
            return self.update(resource, namespace, name, merged, strict=True)[0]

    # -- history and watch --

    def _commit(self, resource: Resource, kind: str, obj: Json, old: Json | None) -> None:
        if kind != "DELETED" and len(json.dumps(obj)) > ETCD_MAX_OBJECT_BYTES:
            # What kube-apiserver answers when etcd refuses the write (its --max-request-bytes).
            raise ApiError(500, "etcdserver: request is too large")
        self._revision += 1
        obj["metadata"]["resourceVersion"] = str(self._revision)
        meta = obj["metadata"]
        key = (meta.get("namespace", ""), meta["name"])
        if kind == "DELETED":
            self._bucket(resource).pop(key, None)
        else:
            self._bucket(resource)[key] = obj
        event = Event(
            self._revision,
            kind,
            resource.group_resource,
            copy.deepcopy(obj),
            copy.deepcopy(old) if old is not None else None,
        )
        self._history.append(event)
        while len(self._history) > self.history_limit:
            self._floor = self._history.popleft().revision
        for watcher in self._watchers:
            if watcher.group_resource == resource.group_resource:
                watcher.push(event)
        if resource.kind == "CustomResourceDefinition" and kind != "DELETED":
            self._register(obj)

    def watch(
        self,
        resource: Resource,
        selector: Selector,
        since: str | None,
        loop: asyncio.AbstractEventLoop,
    ) -> tuple[list[Event], Watcher, int]:
        """Registers a watcher; returns the events to send first and the revision they end
        at. `since` empty or "0": the current objects as ADDED. Raises 410 when too old."""
        with self._lock:
            watcher = Watcher(loop, resource.group_resource)
            if not since or since == "0":
                events = [
                    Event(
                        self._revision, "ADDED", resource.group_resource, copy.deepcopy(obj), None
                    )
                    for _, obj in sorted(self._bucket(resource).items())
                    if selector.matches(obj)
                ]
            else:
                try:
                    revision = int(since)
                except ValueError:
                    raise ApiError(400, f'invalid resource version "{since}"') from None
                if revision < self._floor:
                    raise ApiError(
                        410,
                        f"too old resource version: {revision} ({self._floor})",
                        reason="Expired",
                    )
                events = [
                    e
                    for e in self._history
                    if e.revision > revision and e.group_resource == resource.group_resource
                ]
            self._watchers.add(watcher)
            return events, watcher, self._revision

    def unwatch(self, watcher: Watcher) -> None:
        with self._lock:
            self._watchers.discard(watcher)

    def watch_count(self) -> int:
        with self._lock:
            return len(self._watchers)

    def end_watches(self, how: str) -> int:
        with self._lock:
            for watcher in self._watchers:
                watcher.push(how)
            return len(self._watchers)

    def compact(self) -> None:
        """Forgets the history: a watch from any version before now gets 410 Gone."""
        with self._lock:
            self._history.clear()
            self._floor = self._revision


def project(event: Event, selector: Selector) -> str | None:
    """How a watch with `selector` sees `event`: an object that starts or stops matching
    arrives as ADDED or DELETED, as from kube-apiserver's watch cache."""
    now = selector.matches(event.obj)
    before = event.old is not None and selector.matches(event.old)
    if event.type == "MODIFIED":
        if now and before:
            return "MODIFIED"
        return "ADDED" if now else ("DELETED" if before else None)
    return event.type if now else None


def not_found(resource: Resource, name: str) -> ApiError:
    return ApiError(
        404, f'{resource.qualified} "{name}" not found', details=_details(resource, name)
    )


def _details(resource: Resource, name: str) -> Json:
    details = {"name": name, "kind": resource.plural}
    if resource.group:
        details["group"] = resource.group
    return details


def _timestamp(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _spec_of(obj: Json) -> Json:
    return {k: v for k, v in obj.items() if k not in ("metadata", "status")}


def _same(a: Json, b: Json) -> bool:
    def strip(obj: Json) -> Json:
        out = copy.deepcopy(obj)
        out["metadata"].pop("resourceVersion", None)
        out.pop("apiVersion", None)
        return out

    return strip(a) == strip(b)


def _ns(obj: Json) -> str:
    return str((obj.get("metadata") or {}).get("namespace", ""))


def _crd_group_resource(crd: Json) -> tuple[str, str]:
    return crd["spec"]["group"], crd["spec"]["names"]["plural"]


def _warnings(unknown: Iterable[str]) -> list[str]:
    return [f'unknown field "{path}"' for path in unknown]
