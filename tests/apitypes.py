"""The fake API server's vocabulary: served resources, and the Status errors it answers.

See tests/apiserver.py for what the fake covers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Json = dict[str, Any]


# --- errors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Cause:
    """One reason an object is invalid, as kube-apiserver's Status `details.causes[]`."""

    field: str
    message: str
    reason: str = "FieldValueInvalid"


_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """A request kube-apiserver would refuse; `status` is the Status object it answers with."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: Json | None = None,
        causes: list[Cause] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "Unknown")
        self.causes = causes or []
        self.details = dict(details or {})
        if self.causes:
            self.details["causes"] = [
                {"reason": c.reason, "message": c.message, "field": c.field} for c in self.causes
            ]

    @property
    def fields(self) -> list[str]:
        """The field paths of the causes: what a test asserts on."""
        return [c.field for c in self.causes]

    @property
    def status(self) -> Json:
        status: Json = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details:
            status["details"] = self.details
        return status

    def __str__(self) -> str:
        return f"{self.code} {self.reason}: {self.message}"


# --- resources ------------------------------------------------------------------------


@dataclass(frozen=True)
class Resource:
    """One served group/version/resource: what a URL path names."""

    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    status: bool  # has the status subresource
    singular: str = ""
    short_names: tuple[str, ...] = ()
    definition: str | None = None  # built-ins: the schema's name in kubernetes-validate's $defs
    schema: Json | None = field(default=None, compare=False, hash=False)  # CRs: openAPIV3Schema
    selectable: tuple[str, ...] = ()  # field selectors beyond metadata.name/namespace
    generation: bool = True  # keeps metadata.generation (bumped on spec changes)

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def group_resource(self) -> tuple[str, str]:
        """Objects are stored once per group and resource, whichever version wrote them."""
        return self.group, self.plural

    @property
    def qualified(self) -> str:
        """`pods`, `widgets.example.com`: how NotFound and Conflict messages name it."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def kind_label(self) -> str:
        """`Service`, `Widget.example.com`: how Invalid messages name it."""
        return f"{self.kind}.{self.group}" if self.group else self.kind

    @property
    def custom(self) -> bool:
        return self.definition is None


_CORE = "io.k8s.api.core.v1."
_POD_FIELDS = (
    "spec.nodeName",
    "spec.restartPolicy",
    "spec.schedulerName",
    "spec.serviceAccountName",
    "spec.hostNetwork",
    "status.phase",
    "status.podIP",
    "status.nominatedNodeName",
)
BUILTINS = (
    Resource("", "v1", "pods", "Pod", True, True, "pod", ("po",), _CORE + "Pod", None, _POD_FIELDS),
    Resource("", "v1", "services", "Service", True, True, "service", ("svc",), _CORE + "Service"),
    Resource(
        "",
        "v1",
        "namespaces",
        "Namespace",
        False,
        True,
        "namespace",
        ("ns",),
        _CORE + "Namespace",
        None,
        ("status.phase",),
    ),
    Resource(
        "",
        "v1",
        "configmaps",
        "ConfigMap",
        True,
        False,
        "configmap",
        ("cm",),
        _CORE + "ConfigMap",
        generation=False,
    ),
    Resource(
        "",
        "v1",
        "serviceaccounts",
        "ServiceAccount",
        True,
        False,
        "serviceaccount",
        ("sa",),
        _CORE + "ServiceAccount",
        generation=False,
    ),
    Resource(
        "discovery.k8s.io",
        "v1",
        "endpointslices",
        "EndpointSlice",
        True,
        False,
        "endpointslice",
        (),
        "io.k8s.api.discovery.v1.EndpointSlice",
        generation=False,
    ),
    # Stored and validated only: no controller makes their pods (tests write Pods and
    # EndpointSlices as the controllers would), but `kubectl apply -f` of an app works.
    Resource(
        "apps",
        "v1",
        "deployments",
        "Deployment",
        True,
        True,
        "deployment",
        ("deploy",),
        "io.k8s.api.apps.v1.Deployment",
    ),
    # Stored and validated only: no API server calls it (`outrider check` reads it).
    Resource(
        "admissionregistration.k8s.io",
        "v1",
        "mutatingwebhookconfigurations",
        "MutatingWebhookConfiguration",
        False,
        False,
        "mutatingwebhookconfiguration",
        (),
        "io.k8s.api.admissionregistration.v1.MutatingWebhookConfiguration",
    ),
    Resource(
        "apiextensions.k8s.io",
        "v1",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        False,
        True,
        "customresourcedefinition",
        ("crd", "crds"),
        "io.k8s.apiextensions-apiserver.pkg.apis.apiextensions.v1.CustomResourceDefinition",
    ),
)


def resources_of_crd(crd: Json) -> list[Resource]:
    """The resources an (already validated) CRD serves, one per served version."""
    spec = crd["spec"]
    names = spec["names"]
    served = []
    for version in spec["versions"]:
        if not version.get("served", True):
            continue
        subresources = version.get("subresources") or {}
        fields = tuple(f["jsonPath"].lstrip(".") for f in version.get("selectableFields") or [])
        served.append(
            Resource(
                group=spec["group"],
                version=version["name"],
                plural=names["plural"],
                kind=names["kind"],
                namespaced=spec["scope"] == "Namespaced",
                status="status" in subresources,
                singular=names.get("singular") or names["kind"].lower(),
                short_names=tuple(names.get("shortNames") or ()),
                schema=(version.get("schema") or {}).get("openAPIV3Schema") or {},
                selectable=fields,
            )
        )
    return served


# --- paths ----------------------------------------------------------------------------


Path_ = tuple[str | int, ...]


def dotted(path: Path_) -> str:
    """("spec", "ports", 0, "port") -> "spec.ports[0].port", as kube-apiserver writes paths."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def quote(value: Any) -> str:
    """A value as Go's field errors print it."""
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(value)
