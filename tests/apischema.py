"""What the fake API server (tests/apiserver.py) accepts, and how it refuses the rest.

kube-apiserver turns a request body into a stored object in four steps, and a
client can tell each one apart by the error it gets back:

1. **decode**: a value of the wrong JSON type in a built-in kind is a 400
   BadRequest ("cannot unmarshal string into Go struct field ..."); an unknown
   field is dropped with a `Warning` header, or is a 400 BadRequest
   ("strict decoding error: unknown field ...") under `fieldValidation=Strict`,
   which is what `kubectl apply` sends. Custom objects are pruned to their
   CRD's structural schema the same way, nulls of non-nullable fields dropped.
2. **default**: the schema's `default`s for custom objects (here); the handful
   of built-in defaults a client reads back (tests/apikinds.py).
3. **validate**: 422 Invalid with one cause per field path. Custom objects are
   checked against their CRD's `openAPIV3Schema` with `jsonschema` (here);
   built-in kinds against the API's own schemas as bundled by
   `kubernetes-validate` (Kubernetes `KUBERNETES_VERSION`: required fields here,
   types in step 1) plus the Go validation rules clients run into
   (tests/apikinds.py: names, labels, port ranges, containers, ...).
4. store (tests/apistore.py).

Not emulated: CEL (`x-kubernetes-validations`), `x-kubernetes-list-type` set
and map uniqueness, `format` checks, ratcheting, and the long tail of Go
validation of built-in kinds beyond tests/apikinds.py's `_CHECKS`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]
import kubernetes_validate  # type: ignore[import-untyped]

from tests.apitypes import ApiError, Cause, Json, Path_, Resource, dotted, quote

#: The bundled schemas of the oldest Kubernetes the project supports (pyproject's floor).
KUBERNETES_VERSION = "1.31"
_SCHEMAS = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"


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
    where the schema does not say `nullable`.

    `x-kubernetes-preserve-unknown-fields: true` keeps the unknown keys of its own node,
    whole, and nothing more: a declared property below it is pruned by its own schema
    (the flag is not inherited), and so are an array's items, as kube-apiserver's
    pruning algorithm does (apiextensions-apiserver, schema/pruning). A null unknown key
    is an unknown key like any other: listed, and dropped where it is not kept."""
    if isinstance(value, dict):
        properties = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        keep = schema.get("x-kubernetes-preserve-unknown-fields") is True
        for key in list(value):
            if top and key in ("apiVersion", "kind", "metadata"):
                continue
            sub = properties.get(key, extra if isinstance(extra, dict) else None)
            if sub is None and not keep and extra is not True:
                unknown.append(dotted((*path, key)))
                del value[key]
            elif value[key] is None and sub is not None and not sub.get("nullable"):
                del value[key]  # a default, if any, is applied to the absent field
            elif sub is not None:
                prune(sub, value[key], (*path, key), unknown)
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
    shown = quote(value)
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


# --- strategic merge patch -------------------------------------------------------------


def strategic_merge(resource: Resource, target: Json, patch: Json) -> Json:
    """A strategic merge patch of a built-in object: a JSON merge patch, except that lists
    the schema marks `x-kubernetes-patch-strategy: merge` are merged item by item (by
    `x-kubernetes-patch-merge-key`), and `$patch: delete` / `$patch: replace` are obeyed.
    Other directives (`$setElementOrder`, `$retainKeys`, ...) are dropped."""
    merged: Json = _strategic(_definition(resource.definition or ""), target, patch)
    return merged


def _strategic(schema: Json, target: Any, patch: Json) -> Any:
    schema, _ = _resolve(schema)
    if patch.get("$patch") == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    properties, extra = schema.get("properties") or {}, schema.get("additionalProperties")
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        sub = properties.get(key, extra if isinstance(extra, dict) else {})
        merging = "merge" in str(sub.get("x-kubernetes-patch-strategy", "")).split(",")
        if value is None or (isinstance(value, dict) and value.get("$patch") == "delete"):
            result.pop(key, None)
        elif merging and isinstance(value, list) and isinstance(result.get(key), list):
            items = sub.get("items") or {}
            key_name = sub.get("x-kubernetes-patch-merge-key")
            result[key] = _merge_list(items, result[key], value, key_name)
        elif isinstance(value, dict):
            result[key] = _strategic(sub, result.get(key), value)
        else:
            result[key] = copy.deepcopy(value)
    return result


def _merge_list(items: Json, current: list[Any], patch: list[Any], key: str | None) -> list[Any]:
    merged = copy.deepcopy(current)
    for item in patch:
        if key is None or not isinstance(item, dict):
            if item not in merged:
                merged.append(copy.deepcopy(item))
            continue
        at = next((i for i, m in enumerate(merged) if m.get(key) == item.get(key)), None)
        if item.get("$patch") == "delete":
            merged = [m for m in merged if m.get(key) != item.get(key)]
        elif at is None:
            merged.append({k: copy.deepcopy(v) for k, v in item.items() if not k.startswith("$")})
        else:
            merged[at] = _strategic(items, merged[at], item)
    return merged


# --- step 3: the schema's part of validation ------------------------------------------


def schema_causes(resource: Resource, obj: Json) -> list[Cause]:
    """What the schema alone refuses: a custom object against its CRD's openAPIV3Schema,
    a built-in one's required fields (the Go rules are tests/apikinds.py's)."""
    if resource.custom:
        return _custom_causes(resource, obj)
    return _required_causes(_definition(resource.definition or ""), obj, ())


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
