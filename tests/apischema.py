"""What the fake API server (tests/apiserver.py) accepts, and how it refuses the rest.

kube-apiserver turns a request body into a stored object in four steps, and a
client can tell each one apart by the error it gets back:

1. **decode**: a value of the wrong JSON type in a built-in kind is a 400
   BadRequest ("cannot unmarshal string into Go struct field ..."); an unknown
   field is dropped with a `Warning` header, or is a 400 BadRequest
   ("strict decoding error: unknown field ...") under `fieldValidation=Strict`,
   which is what `kubectl apply` sends. Custom objects are pruned to their
   CRD's structural schema the same way, nulls of non-nullable fields dropped.
2. **default**: the schema's `default`s for custom objects; the handful of
   built-in defaults a client reads back (a Service port's `targetPort` and
   `protocol`, a Pod's `serviceAccountName`, ...).
3. **validate**: 422 Invalid with one cause per field path. Custom objects are
   checked against their CRD's `openAPIV3Schema` with `jsonschema`; built-in
   kinds against the API's own schemas as bundled by `kubernetes-validate`
   (Kubernetes `KUBERNETES_VERSION`) plus the Go validation rules clients run
   into (names, labels, port ranges, required containers, ...).
4. store (tests/apistore.py).

Not emulated: CEL (`x-kubernetes-validations`), `x-kubernetes-list-type` set
and map uniqueness, `format` checks, ratcheting, and the long tail of Go
validation of built-in kinds beyond what is listed in `_CHECKS`.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]

Json = dict[str, Any]

#: The bundled schemas of the oldest Kubernetes the project supports (pyproject's floor).
KUBERNETES_VERSION = "1.31"
_SCHEMAS = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"


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


def _quote(value: Any) -> str:
    """A value as Go's field errors print it."""
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(value)


# --- step 1: decode -------------------------------------------------------------------


@dataclass
class Decoded:
    obj: Json
    unknown: list[str]  # field paths dropped as unknown


def decode(resource: Resource, body: Any, *, strict: bool) -> Decoded:
    """The object as the API server reads it: typed, pruned, defaulted (custom objects).

    Raises ApiError 400 for what the server cannot even decode."""
    if not isinstance(body, dict):
        raise _undecodable(resource, "body must be a JSON object")
    obj = copy.deepcopy(body)
    if obj.get("apiVersion") != resource.api_version or obj.get("kind") != resource.kind:
        got = f"{obj.get('apiVersion')}, Kind={obj.get('kind')}"
        raise ApiError(
            400,
            f"the API version in the data ({got}) does not match the expected API version "
            f"({resource.api_version}, Kind={resource.kind})",
        )
    unknown: list[str] = []
    if resource.definition is not None:
        _Typed(resource, unknown).walk(_definition(resource.definition), obj, ())
    else:
        if isinstance(obj.get("metadata"), dict):
            meta_schema = _definition(_OBJECT_META)
            _Typed(resource, unknown).walk(meta_schema, obj["metadata"], ("metadata",))
        prune(resource.schema or {}, obj, (), unknown, top=True)
        default(resource.schema or {}, obj)
    if unknown and strict:
        listed = ", ".join(f'unknown field "{u}"' for u in unknown)
        raise _undecodable(resource, f"strict decoding error: {listed}")
    return Decoded(obj, unknown)


def _undecodable(resource: Resource, why: str) -> ApiError:
    return ApiError(
        400,
        f'{resource.kind} in version "{resource.version}" cannot be handled as a '
        f"{resource.kind}: {why}",
    )


_OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


@cache
def _definitions() -> dict[str, Json]:
    file = _SCHEMAS / f"v{KUBERNETES_VERSION}.0-local" / "_definitions.json"
    defs: dict[str, Json] = json.loads(file.read_text())["$defs"]
    return defs


def _definition(name: str) -> Json:
    return _definitions()[name]


def _resolve(schema: Json) -> tuple[Json, str | None]:
    ref = schema.get("$ref")
    if ref is None:
        return schema, None
    name = ref.rsplit("/", 1)[-1]
    return _definition(name), name


_JSON_TYPES = {bool: "bool", str: "string", int: "number", float: "number", list: "array"}


def _json_type(value: Any) -> str:
    return "object" if isinstance(value, dict) else _JSON_TYPES.get(type(value), "null")


def _fits(types: set[str], value: Any) -> bool:
    checks: dict[str, Callable[[Any], bool]] = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "boolean": lambda v: isinstance(v, bool),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    }
    return any(checks[t](value) for t in types if t in checks)


def _types(schema: Json) -> set[str]:
    declared = schema.get("type")
    if declared is None:
        return set()
    names = {declared} if isinstance(declared, str) else set(declared)
    return names - {"null"}


@dataclass
class _Typed:
    """Walks a built-in object against the API's schema like Go's decoder: wrong JSON types
    refuse the object, unknown fields are dropped (and listed), nulls mean "unset"."""

    resource: Resource
    unknown: list[str]

    def walk(self, schema: Json, value: Any, path: Path_, struct: str | None = None) -> None:
        schema, name = _resolve(schema)
        if "oneOf" in schema:  # IntOrString, Quantity
            if not any(_fits(_types(alt), value) for alt in schema["oneOf"]):
                self._refuse(value, path, struct, "intstr.IntOrString")
            return
        types = _types(schema)
        if not types:
            return  # free-form JSON (apiextensions JSON, RawExtension)
        if not _fits(types, value):
            self._refuse(value, path, struct, _go_type(schema, name))
        if isinstance(value, dict):
            self._walk_object(schema, value, path, name or struct)
        elif isinstance(value, list) and "items" in schema:
            for index, item in enumerate(value):
                if item is not None:
                    self.walk(schema["items"], item, (*path, index), name or struct)

    def _walk_object(self, schema: Json, value: Json, path: Path_, struct: str | None) -> None:
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key in list(value):
            if value[key] is None:
                del value[key]  # Go decodes null as the zero value, which is omitted
            elif properties is not None and key in properties:
                self.walk(properties[key], value[key], (*path, key), struct)
            elif isinstance(extra, dict):
                self.walk(extra, value[key], (*path, key), struct)
            elif properties is not None:
                self.unknown.append(dotted((*path, key)))
                del value[key]

    def _refuse(self, value: Any, path: Path_, struct: str | None, go_type: str) -> None:
        owner = (struct or self.resource.kind).rsplit(".", 1)[-1]
        where = ".".join(str(p) for p in path if isinstance(p, str))
        raise _undecodable(
            self.resource,
            f"json: cannot unmarshal {_json_type(value)} into Go struct field "
            f"{owner}.{where} of type {go_type}",
        )


def _go_type(schema: Json, name: str | None) -> str:
    if name is not None:
        return ".".join(name.rsplit(".", 2)[-2:])
    types = _types(schema)
    if "integer" in types:
        return str(schema.get("format", "int"))
    if "array" in types:
        items, item_name = _resolve(schema.get("items") or {})
        return "[]" + _go_type(items, item_name)
    if "object" in types:
        return "map[string]string"
    return {"string": "string", "boolean": "bool", "number": "float64"}.get(min(types), "string")


# --- custom objects: structural schema -------------------------------------------------


def prune(schema: Json, value: Any, path: Path_, unknown: list[str], top: bool = False) -> None:
    """Drops what the structural schema does not declare (the server's pruning), and nulls
    where the schema does not say `nullable`."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields") is True
        for key in list(value):
            if top and key in ("apiVersion", "kind", "metadata"):
                continue
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if value[key] is None and not (sub or {}).get("nullable"):
                if sub is not None or not keep:
                    del value[key]
            elif sub is not None:
                prune(sub, value[key], (*path, key), unknown)
            elif not keep and extra is not True:
                unknown.append(dotted((*path, key)))
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            prune(schema["items"], item, (*path, index), unknown)


def default(schema: Json, value: Any) -> None:
    """Applies the schema's `default`s where a field is absent, top-down."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        for key, sub in properties.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is not None:
                default(sub, item)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            default(schema["items"], item)


def _json_schema(schema: Json) -> Json:
    """An OpenAPI v3 structural schema as a JSON Schema (draft 4) `jsonschema` checks."""
    out = {k: v for k, v in schema.items() if not k.startswith("x-") and k != "format"}
    for key in ("properties", "patternProperties"):
        if key in out:
            out[key] = {k: _json_schema(v) for k, v in out[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(out.get(key), dict):
            out[key] = _json_schema(out[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_json_schema(s) for s in out[key]]
    if schema.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    out.pop("default", None)
    out.pop("example", None)
    return out


def _custom_causes(resource: Resource, obj: Json) -> list[Cause]:
    schema = _json_schema(resource.schema or {})
    schema.get("properties", {}).pop("metadata", None)  # ObjectMeta is checked on its own
    validator = jsonschema.Draft4Validator(schema)
    causes: list[Cause] = []
    for error in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path))):
        causes.extend(_cause(error))
    return causes


def _cause(error: jsonschema.ValidationError) -> Iterator[Cause]:
    path = dotted(tuple(error.absolute_path))
    value, rule, bound = error.instance, error.validator, error.validator_value
    if rule == "required":
        for name in bound:
            if not isinstance(value, dict) or name not in value:
                yield Cause(
                    dotted((*error.absolute_path, name)), "Required value", "FieldValueRequired"
                )
        return
    shown = _quote(value)
    if rule == "type":
        expected = bound if isinstance(bound, str) else " or ".join(b for b in bound if b != "null")
        message = f"Invalid value: {shown}: {path} in body must be of type {expected}: {shown}"
        yield Cause(path, message, "FieldValueTypeInvalid")
    elif rule == "enum":
        supported = ", ".join(json.dumps(v) for v in bound)
        yield Cause(
            path,
            f"Unsupported value: {shown}: supported values: {supported}",
            "FieldValueNotSupported",
        )
    else:
        wording = {
            "pattern": f"should match '{bound}'",
            "maximum": f"should be less than or equal to {bound}",
            "minimum": f"should be greater than or equal to {bound}",
            "minLength": f"should be at least {bound} chars long",
            "maxLength": f"should be at most {bound} chars long",
            "minItems": f"should have at least {bound} items",
            "maxItems": f"should have at most {bound} items",
            "minProperties": f"should have at least {bound} properties",
            "maxProperties": f"should have at most {bound} properties",
            "uniqueItems": "shouldn't contain duplicates",
            "oneOf": "must validate one and only one schema (oneOf)",
            "anyOf": "must validate at least one schema (anyOf)",
            "not": "must not validate the schema (not)",
        }.get(str(rule), error.message)
        yield Cause(path, f"Invalid value: {shown}: {path} in body {wording}")


# --- step 3: validate -----------------------------------------------------------------


def validate(resource: Resource, obj: Json) -> None:
    """Raises ApiError 422 Invalid naming every bad field, as kube-apiserver does."""
    causes = _meta_causes(resource, obj.get("metadata") or {})
    if resource.custom:
        causes += _custom_causes(resource, obj)
    else:
        causes += _required_causes(_definition(resource.definition or ""), obj, ())
        check = _CHECKS.get(resource.kind)
        if check is not None:
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


#: Fields the schema lists as required that Go validation lets be empty.
_OPTIONAL_AFTER_ALL = {("io.k8s.api.discovery.v1.EndpointSlice", "endpoints")}


def _required_causes(schema: Json, value: Any, path: Path_, name: str | None = None) -> list[Cause]:
    schema, ref = _resolve(schema)
    name = ref or name
    causes = []
    if isinstance(value, dict):
        for key in schema.get("required") or ():
            if key not in value and (name, key) not in _OPTIONAL_AFTER_ALL:
                causes.append(Cause(dotted((*path, key)), "Required value", "FieldValueRequired"))
        for key, sub in (schema.get("properties") or {}).items():
            if key in value and key != "metadata":
                causes += _required_causes(sub, value[key], (*path, key))
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            causes += _required_causes(schema["items"], item, (*path, index))
    return causes


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
    return Cause(path, f"Invalid value: {_quote(value)}: {why}")


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
            f'Unsupported value: {_quote(value)}: supported values: "SCTP", "TCP", "UDP"',
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
            f"Unsupported value: {_quote(value)}: supported values: {listed}",
            "FieldValueNotSupported",
        )
    ]


def _duplicate(path: str, value: Any) -> Cause:
    return Cause(path, f"Duplicate value: {_quote(value)}", "FieldValueDuplicate")


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


def _crd(obj: Json) -> list[Cause]:
    from tests.apikinds import crd_causes  # beside the CRD's defaults; it imports this module

    return crd_causes(obj)


_CHECKS: dict[str, Callable[[Json], list[Cause]]] = {
    "Service": _service,
    "Pod": _pod,
    "EndpointSlice": _endpoint_slice,
    "ConfigMap": _config_map,
    "CustomResourceDefinition": _crd,
}
