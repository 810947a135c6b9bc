"""Each kind's own rules in the fake API server: Go validation, defaults, initial status.

`validate` is kube-apiserver's validation step: the metadata rules every object
follows (names, labels, annotations), the schema's (tests/apischema.py), and the
Go rules of each built-in kind that a client meets (a Service port within 1-65535,
a container with an image, an EndpointSlice address of its addressType, a CRD's
names, versions and structural schemas), each cause with its field path.

Defaults and status: a client reads these back, so the fake writes them too:
the defaults a Service, Pod, Namespace or EndpointSlice gets (a port's
`targetPort` = its `port`, `protocol: TCP`, a pod's `serviceAccountName: default`
that the ServiceAccount admission plugin sets, a ClusterIP), the status an object
starts with, and what the CRD controller writes to a CRD's status once its names
are accepted. The rest of the defaults (a Pod's dozens of fields) are left out:
nothing here reads them.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Callable
from typing import Any

from tests.apischema import schema_causes
from tests.apitypes import ApiError, Cause, Json, Resource, quote

# --- validation -----------------------------------------------------------------------


def validate(resource: Resource, obj: Json) -> None:
    """Raises ApiError 422 Invalid naming every bad field, as kube-apiserver does."""
    causes = _meta_causes(resource, obj.get("metadata") or {})
    causes += schema_causes(resource, obj)
    check = _CHECKS.get(resource.kind)
    if check is not None and not resource.custom:
        causes += check(obj)
    if causes:
        raise invalid(resource, obj, causes)


def invalid(resource: Resource, obj: Json, causes: list[Cause]) -> ApiError:
    name = (obj.get("metadata") or {}).get("name", "")
    lines = [f"{c.field}: {c.message}" for c in causes]
    listed = lines[0] if len(lines) == 1 else "[" + ", ".join(lines) + "]"
    details = {"name": name, "kind": resource.kind}
    if resource.group:
        details["group"] = resource.group
    return ApiError(
        422, f'{resource.kind_label} "{name}" is invalid: {listed}', details=details, causes=causes
    )


_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_IANA_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])*")

SUBDOMAIN_RULE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    f"used for validation is '{_SUBDOMAIN.pattern}')"
)
LABEL_RULE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    f"used for validation is '{_LABEL.pattern}')"
)
DNS1035_RULE = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    f"'abc-123', regex used for validation is '{_DNS1035.pattern}')"
)


def _bad(path: str, value: Any, why: str) -> Cause:
    return Cause(path, f"Invalid value: {quote(value)}: {why}")


def dns_subdomain(path: str, value: str) -> list[Cause]:
    if len(value) > 253:
        return [_bad(path, value, "must be no more than 253 characters")]
    return [] if _SUBDOMAIN.fullmatch(value) else [_bad(path, value, SUBDOMAIN_RULE)]


def dns_label(path: str, value: str, rule: re.Pattern[str] = _LABEL) -> list[Cause]:
    if len(value) > 63:
        return [_bad(path, value, "must be no more than 63 characters")]
    text = LABEL_RULE if rule is _LABEL else DNS1035_RULE
    return [] if rule.fullmatch(value) else [_bad(path, value, text)]


def qualified_name(path: str, key: str) -> list[Cause]:
    prefix, _, name = key.rpartition("/")
    if prefix and dns_subdomain(path, prefix):
        return [_bad(path, key, "prefix part " + SUBDOMAIN_RULE)]
    if not name or len(name) > 63 or not _QUALIFIED.fullmatch(name):
        return [
            _bad(
                path,
                key,
                "name part must consist of alphanumeric characters, '-', '_' or '.', and must "
                "start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or "
                f"'123-abc', regex used for validation is '{_QUALIFIED.pattern}')",
            )
        ]
    return []


def label_selector_value(path: str, value: str) -> list[Cause]:
    if len(value) <= 63 and _LABEL_VALUE.fullmatch(value):
        return []
    return [
        _bad(
            path,
            value,
            "a valid label must be an empty string or consist of alphanumeric characters, '-', "
            "'_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  "
            f"or 'my_value',  or '12345', regex used for validation is '{_LABEL_VALUE.pattern}')",
        )
    ]


def _meta_causes(resource: Resource, meta: Json) -> list[Cause]:
    name = meta.get("name")
    if not name:
        return [
            Cause(
                "metadata.name",
                "Required value: name or generateName is required",
                "FieldValueRequired",
            )
        ]
    if resource.kind == "Namespace":
        causes = dns_label("metadata.name", name)
    elif resource.kind == "Service":
        causes = dns_label("metadata.name", name, _DNS1035)
    else:
        causes = dns_subdomain("metadata.name", name)
    for key, value in (meta.get("labels") or {}).items():
        causes += qualified_name("metadata.labels", key)
        causes += label_selector_value("metadata.labels", value)
    for key in meta.get("annotations") or {}:
        causes += qualified_name("metadata.annotations", key)
    return causes


def port_number(path: str, value: Any) -> list[Cause]:
    if isinstance(value, int) and 1 <= value <= 65535:
        return []
    return [_bad(path, value, "must be between 1 and 65535, inclusive")]


def _port_name(path: str, value: str) -> list[Cause]:
    """An IANA service name: what a container port's name and a named targetPort must be."""
    if len(value) > 15:
        return [_bad(path, value, "must be no more than 15 characters")]
    if not _IANA_NAME.fullmatch(value):
        return [
            _bad(
                path,
                value,
                "must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)",
            )
        ]
    if "--" in value:
        return [_bad(path, value, "must not contain consecutive hyphens")]
    if not re.search("[a-z]", value):
        return [_bad(path, value, "must contain at least one letter (a-z)")]
    return []


def _protocol(path: str, value: Any) -> list[Cause]:
    if value in ("TCP", "UDP", "SCTP"):
        return []
    return [
        Cause(
            path,
            f'Unsupported value: {quote(value)}: supported values: "SCTP", "TCP", "UDP"',
            "FieldValueNotSupported",
        )
    ]


def _one_of(path: str, value: Any, allowed: tuple[str, ...]) -> list[Cause]:
    if value in allowed:
        return []
    listed = ", ".join(json.dumps(a) for a in sorted(allowed))
    return [
        Cause(
            path,
            f"Unsupported value: {quote(value)}: supported values: {listed}",
            "FieldValueNotSupported",
        )
    ]


def _duplicate(path: str, value: Any) -> Cause:
    return Cause(path, f"Duplicate value: {quote(value)}", "FieldValueDuplicate")


def _service(obj: Json) -> list[Cause]:
    spec = obj.get("spec") or {}
    kind = spec.get("type", "ClusterIP")
    causes = _one_of("spec.type", kind, ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName"))
    ports = spec.get("ports") or []
    if not ports and kind != "ExternalName" and spec.get("clusterIP") != "None":
        causes.append(Cause("spec.ports", "Required value", "FieldValueRequired"))
    names: set[str] = set()
    for index, port in enumerate(ports):
        at = f"spec.ports[{index}]"
        name = port.get("name")
        if name is None and len(ports) > 1:
            causes.append(Cause(f"{at}.name", "Required value", "FieldValueRequired"))
        elif name is not None:
            causes += dns_label(f"{at}.name", name)
            if name in names:
                causes.append(_duplicate(f"{at}.name", name))
            names.add(name)
        causes += port_number(f"{at}.port", port.get("port"))
        causes += _protocol(f"{at}.protocol", port.get("protocol", "TCP"))
        target = port.get("targetPort")
        if isinstance(target, int):
            causes += port_number(f"{at}.targetPort", target)
        elif isinstance(target, str):
            causes += _port_name(f"{at}.targetPort", target)
        if port.get("appProtocol") is not None:
            causes += qualified_name(f"{at}.appProtocol", port["appProtocol"])
    for key, value in (spec.get("selector") or {}).items():
        causes += qualified_name("spec.selector", key)
        causes += label_selector_value("spec.selector", value)
    return causes


def _pod(obj: Json) -> list[Cause]:
    spec = obj.get("spec") or {}
    causes = []
    if not spec.get("containers"):
        causes.append(Cause("spec.containers", "Required value", "FieldValueRequired"))
    names: set[str] = set()
    port_names: set[str] = set()
    for group in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(group) or []):
            at = f"spec.{group}[{index}]"
            name = container.get("name", "")
            causes += dns_label(f"{at}.name", name) if name else []
            if name in names:
                causes.append(_duplicate(f"{at}.name", name))
            names.add(name)
            if not container.get("image"):
                causes.append(Cause(f"{at}.image", "Required value", "FieldValueRequired"))
            for p, port in enumerate(container.get("ports") or []):
                pat = f"{at}.ports[{p}]"
                causes += port_number(f"{pat}.containerPort", port.get("containerPort"))
                causes += _protocol(f"{pat}.protocol", port.get("protocol", "TCP"))
                if port.get("name") is not None:
                    causes += _port_name(f"{pat}.name", port["name"])
                    if port["name"] in port_names:
                        causes.append(_duplicate(f"{pat}.name", port["name"]))
                    port_names.add(port["name"])
    if spec.get("serviceAccountName"):
        causes += dns_subdomain("spec.serviceAccountName", spec["serviceAccountName"])
    return causes


def _endpoint_slice(obj: Json) -> list[Cause]:
    kind = obj.get("addressType")
    causes = _one_of("addressType", kind, ("IPv4", "IPv6", "FQDN")) if kind else []
    for index, endpoint in enumerate(obj.get("endpoints") or []):
        addresses = endpoint.get("addresses") or []
        at = f"endpoints[{index}].addresses"
        if not 1 <= len(addresses) <= 100:
            causes.append(_bad(at, len(addresses), "must contain between 1 and 100 addresses"))
        for a, address in enumerate(addresses):
            causes += _address(f"{at}[{a}]", kind, address)
    for index, port in enumerate(obj.get("ports") or []):
        at = f"ports[{index}]"
        if port.get("port") is not None:
            causes += port_number(f"{at}.port", port["port"])
        causes += _protocol(f"{at}.protocol", port.get("protocol", "TCP"))
        if port.get("name"):
            causes += dns_label(f"{at}.name", port["name"])
    return causes


def _address(path: str, kind: str | None, address: str) -> list[Cause]:
    if kind == "FQDN":
        return dns_subdomain(path, address)
    family = {"IPv4": ipaddress.IPv4Address, "IPv6": ipaddress.IPv6Address}.get(kind or "")
    if family is None:
        return []
    try:
        family(address)
    except ValueError:
        return [_bad(path, address, f"must be a valid {kind} address")]
    return []


def _config_map(obj: Json) -> list[Cause]:
    causes = []
    for group in ("data", "binaryData"):
        for key in obj.get(group) or {}:
            if len(key) > 253 or not _CONFIG_KEY.fullmatch(key):
                causes.append(
                    _bad(
                        f"{group}[{key}]",
                        key,
                        "a valid config key must consist of alphanumeric characters, '-', '_' or "
                        "'.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for "
                        f"validation is '{_CONFIG_KEY.pattern}')",
                    )
                )
    return causes


_CHECKS: dict[str, Callable[[Json], list[Cause]]] = {
    "Service": _service,
    "Pod": _pod,
    "EndpointSlice": _endpoint_slice,
    "ConfigMap": _config_map,
    "CustomResourceDefinition": lambda crd: crd_causes(crd),
}


# --- defaults -------------------------------------------------------------------------


def apply_defaults(
    resource: Resource, obj: Json, old: Json | None, cluster_ip: Callable[[], str]
) -> None:
    """The built-in defaults, on create and on every update (`old` is the stored object)."""
    if resource.kind == "Service":
        _default_service(obj, old, cluster_ip)
    elif resource.kind == "Pod":
        _default_pod(obj)
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


def _default_service(obj: Json, old: Json | None, cluster_ip: Callable[[], str]) -> None:
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


def _default_pod(obj: Json) -> None:
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
