"""What kube-apiserver adds to built-in objects, and the rules a CRD itself must follow.

A client reads these back, so the fake API server (tests/apiserver.py) writes them
too: the defaults a Service, Pod, Namespace or EndpointSlice gets (a port's
`targetPort` = its `port`, `protocol: TCP`, a pod's `serviceAccountName: default`
that the ServiceAccount admission plugin sets, a ClusterIP), the status an object
starts with, and what the CRD controller writes to a CRD's status once its names
are accepted. The rest of the defaults (a Pod's dozens of fields) are left out:
nothing here reads them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from tests.apischema import Cause, Json, Resource, _bad, dns_label, dns_subdomain

# --- defaults -------------------------------------------------------------------------


def apply_defaults(
    resource: Resource, obj: Json, old: Json | None, cluster_ip: Callable[[], str]
) -> None:
    """The built-in defaults, on create and on every update (`old` is the stored object)."""
    if resource.kind == "Service":
        _service(obj, old, cluster_ip)
    elif resource.kind == "Pod":
        _pod(obj)
    elif resource.kind == "Namespace":
        obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        labels = obj["metadata"].setdefault("labels", {})
        labels["kubernetes.io/metadata.name"] = obj["metadata"]["name"]
    elif resource.kind == "EndpointSlice":
        for port in obj.get("ports") or []:
            port.setdefault("protocol", "TCP")
    elif resource.kind == "CustomResourceDefinition":
        spec = obj.setdefault("spec", {})
        names = spec.get("names") or {}
        if names.get("kind"):
            names.setdefault("singular", names["kind"].lower())
            names.setdefault("listKind", names["kind"] + "List")
        spec.setdefault("conversion", {"strategy": "None"})


def _service(obj: Json, old: Json | None, cluster_ip: Callable[[], str]) -> None:
    spec = obj.setdefault("spec", {})
    spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    for port in spec.get("ports") or []:
        port.setdefault("protocol", "TCP")
        if "port" in port:
            port.setdefault("targetPort", port["port"])
    if spec["type"] == "ExternalName":
        return
    before = (old or {}).get("spec") or {}
    # An update that leaves the ClusterIP out keeps the allocated one, as the server does.
    if "clusterIP" not in spec:
        spec["clusterIP"] = before.get("clusterIP") or cluster_ip()
    spec.setdefault("clusterIPs", [spec["clusterIP"]])
    if spec["clusterIP"] != "None":
        spec.setdefault("ipFamilies", ["IPv4"])
        spec.setdefault("ipFamilyPolicy", "SingleStack")
    spec.setdefault("internalTrafficPolicy", "Cluster")


def _pod(obj: Json) -> None:
    spec = obj.setdefault("spec", {})
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    spec["serviceAccountName"] = spec["serviceAccount"] = account
    spec.setdefault("restartPolicy", "Always")
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("enableServiceLinks", True)
    for group in ("initContainers", "containers"):
        for container in spec.get(group) or []:
            image = container.get("image", "")
            latest = ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")
            container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            for port in container.get("ports") or []:
                port.setdefault("protocol", "TCP")


def initial_status(resource: Resource, obj: Json, now: str) -> Json | None:
    """What `status` a new object gets: the client's is dropped where a status subresource
    exists (a kubelet or controller writes it later, through `/status`)."""
    if resource.kind == "Pod":
        return {"phase": "Pending", "qosClass": "BestEffort"}
    if resource.kind == "Namespace":
        return {"phase": "Active"}
    if resource.kind == "Service":
        return {"loadBalancer": {}}
    if resource.kind == "CustomResourceDefinition":
        return crd_status(obj, now)
    return None


def crd_status(crd: Json, now: str) -> Json:
    """What the CRD controllers write once the names are accepted (here: at once)."""
    names = copy.deepcopy(crd["spec"]["names"])
    conditions = [
        {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastTransitionTime": now,
        }
        for kind, reason, message in (
            ("NamesAccepted", "NoConflicts", "no conflicts found"),
            ("Established", "InitialNamesAccepted", "the initial names have been accepted"),
        )
    ]
    stored = [v["name"] for v in crd["spec"]["versions"] if v.get("storage")]
    return {"acceptedNames": names, "conditions": conditions, "storedVersions": stored}


# --- the CRD's own rules --------------------------------------------------------------

_TYPES = ("array", "boolean", "integer", "number", "object", "string")


def crd_causes(crd: Json) -> list[Cause]:
    """What kube-apiserver checks in a CRD beyond its schema: names, versions, and that
    every version's schema is structural."""
    spec = crd.get("spec") or {}
    group, names = spec.get("group", ""), spec.get("names") or {}
    causes = []
    if not group:
        causes.append(Cause("spec.group", "Required value", "FieldValueRequired"))
    elif "." not in group:
        causes.append(_bad("spec.group", group, "should be a domain with at least one dot"))
    else:
        causes += dns_subdomain("spec.group", group)
    for key in ("plural", "kind"):
        if not names.get(key):
            causes.append(Cause(f"spec.names.{key}", "Required value", "FieldValueRequired"))
    if names.get("plural"):
        causes += dns_label("spec.names.plural", names["plural"])
        name = crd.get("metadata", {}).get("name")
        if name != f"{names['plural']}.{group}":
            causes.append(_bad("metadata.name", name, 'must be spec.names.plural+"."+spec.group'))
    if spec.get("scope") not in ("Cluster", "Namespaced"):
        causes.append(
            Cause(
                "spec.scope",
                f"Unsupported value: {json.dumps(spec.get('scope'))}: supported "
                'values: "Cluster", "Namespaced"',
                "FieldValueNotSupported",
            )
        )
    causes += _version_causes(spec.get("versions") or [])
    return causes


def _version_causes(versions: list[Json]) -> list[Cause]:
    causes = []
    if sum(1 for v in versions if v.get("storage")) != 1:
        causes.append(
            _bad(
                "spec.versions",
                [v.get("name") for v in versions],
                "must have exactly one version marked as storage version",
            )
        )
    seen: set[str] = set()
    for index, version in enumerate(versions):
        at = f"spec.versions[{index}]"
        name = version.get("name", "")
        if name in seen:
            causes.append(
                Cause(f"{at}.name", f"Duplicate value: {json.dumps(name)}", "FieldValueDuplicate")
            )
        seen.add(name)
        causes += dns_label(f"{at}.name", name)
        schema = (version.get("schema") or {}).get("openAPIV3Schema")
        where = f"{at}.schema.openAPIV3Schema"
        if schema is None:
            causes.append(
                Cause(where, "Required value: schemas are required", "FieldValueRequired")
            )
            continue
        if schema.get("type") != "object":
            causes.append(
                Cause(
                    f"{where}.type",
                    f"Unsupported value: {json.dumps(schema.get('type'))}: "
                    'supported values: "object"',
                    "FieldValueNotSupported",
                )
            )
        causes += structural_causes(schema, where)
    return causes


def structural_causes(schema: Json, where: str) -> list[Cause]:
    """Why a schema is not structural: every node typed (bar int-or-string and preserved
    unknown fields), arrays with items, properties or additionalProperties, not both."""
    causes = []
    kind = schema.get("type")
    loose = schema.get("x-kubernetes-int-or-string") or schema.get(
        "x-kubernetes-preserve-unknown-fields"
    )
    if kind is None and not loose:
        causes.append(
            Cause(
                f"{where}.type",
                "Required value: must not be empty for specified object fields",
                "FieldValueRequired",
            )
        )
    elif kind is not None and kind not in _TYPES:
        listed = ", ".join(json.dumps(t) for t in _TYPES)
        causes.append(
            Cause(
                f"{where}.type",
                f"Unsupported value: {json.dumps(kind)}: supported values: {listed}",
                "FieldValueNotSupported",
            )
        )
    if kind == "array" and not isinstance(schema.get("items"), dict):
        causes.append(
            Cause(f"{where}.items", "Required value: must be specified", "FieldValueRequired")
        )
    extra = schema.get("additionalProperties")
    if "properties" in schema and extra not in (None, False):
        causes.append(
            Cause(
                f"{where}.additionalProperties",
                "Forbidden: additionalProperties and properties are mutual exclusive",
                "FieldValueForbidden",
            )
        )
    for key, sub in (schema.get("properties") or {}).items():
        causes += structural_causes(sub, f"{where}.properties[{key}]")
    if isinstance(schema.get("items"), dict):
        causes += structural_causes(schema["items"], f"{where}.items")
    if isinstance(extra, dict):
        causes += structural_causes(extra, f"{where}.additionalProperties")
    return causes


def is_crd(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("kind") == "CustomResourceDefinition"
