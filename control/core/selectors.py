"""Label selectors as Kubernetes defines them: which pods a policy or a Service picks.

A `LabelSelector` (matchLabels and matchExpressions with In, NotIn, Exists,
DoesNotExist) is read once into a frozen `Selector`; matching a pod's labels
is then a few dict lookups. An empty selector matches every pod, as it does
for a NetworkPolicy's podSelector and Istio's AuthorizationPolicy; a
Service's plain `selector` map is the matchLabels-only case.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

__all__ = ["EVERY_POD", "Operator", "Requirement", "Selector", "parse_selector"]

Operator = Literal["In", "NotIn", "Exists", "DoesNotExist"]
_OPERATORS: tuple[Operator, ...] = get_args(Operator)


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: Operator
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "In":
            return value is not None and value in self.values
        if self.operator == "NotIn":
            return value is None or value not in self.values
        if self.operator == "Exists":
            return value is not None
        return value is None


@dataclass(frozen=True)
class Selector:
    """matchLabels AND every matchExpression; nothing at all matches every pod."""

    labels: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Requirement, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        for key, value in self.labels:
            if labels.get(key) != value:
                return False
        for requirement in self.expressions:  # noqa: SIM110 - per pod: no generator
            if not requirement.matches(labels):
                return False
        return True

    @classmethod
    def of_labels(cls, labels: Mapping[str, str]) -> Selector:
        """A Service's `spec.selector`: equality on every label given."""
        return cls(tuple(sorted(labels.items())))


EVERY_POD = Selector()


def parse_selector(raw: object, path: str) -> tuple[Selector | None, list[str]]:
    """A LabelSelector (absent or null: every pod) and every error as `path: problem`."""
    if raw is None:
        return EVERY_POD, []
    if not isinstance(raw, Mapping):
        return None, [f"{path}: is not a mapping; expected matchLabels and/or matchExpressions"]
    errors = [
        f"{path}.{key}: unknown key; expected matchLabels or matchExpressions"
        for key in raw
        if key not in ("matchLabels", "matchExpressions")
    ]
    labels = _labels(raw.get("matchLabels"), f"{path}.matchLabels", errors)
    expressions = []
    items = raw.get("matchExpressions") or []
    if not isinstance(items, list):
        errors.append(f"{path}.matchExpressions: is not a list")
        items = []
    for i, item in enumerate(items):
        requirement = _requirement(item, f"{path}.matchExpressions[{i}]", errors)
        if requirement is not None:
            expressions.append(requirement)
    if errors:
        return None, errors
    return Selector(tuple(sorted(labels.items())), tuple(expressions)), []


def _labels(raw: object, path: str, errors: list[str]) -> dict[str, str]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        errors.append(f"{path}: is not a mapping; expected label: value pairs")
        return {}
    labels = {}
    for key, value in raw.items():
        if not isinstance(value, str):
            errors.append(f"{path}.{key}: {value!r} is not a string; quote label values")
        else:
            labels[str(key)] = value
    return labels


def _requirement(raw: object, path: str, errors: list[str]) -> Requirement | None:
    if not isinstance(raw, Mapping):
        errors.append(f"{path}: is not a mapping; expected key, operator and values")
        return None
    item = cast(Mapping[str, Any], raw)
    before = len(errors)
    errors.extend(
        f"{path}.{key}: unknown key; expected key, operator or values"
        for key in item
        if key not in ("key", "operator", "values")
    )
    key, operator, values = item.get("key"), item.get("operator"), item.get("values") or []
    if not isinstance(key, str) or not key:
        errors.append(f"{path}.key: required: the label's name")
    if operator not in _OPERATORS:
        errors.append(f"{path}.operator: {operator!r} is not one of {', '.join(_OPERATORS)}")
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        errors.append(f"{path}.values: expected a list of strings")
        values = []
    if operator in ("In", "NotIn") and not values:
        errors.append(f"{path}.values: {operator} needs at least one value")
    if operator in ("Exists", "DoesNotExist") and values:
        errors.append(f"{path}.values: {operator} takes no values")
    if len(errors) > before:
        return None
    return Requirement(cast(str, key), cast(Operator, operator), frozenset(values))
