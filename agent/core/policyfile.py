"""Policy files -> policies: YAML read in one pass, every error with its line and column.

Each error reads `FILE:LINE:COLUMN: key.path: problem; what is expected`, so
`outrider policy lint` and a refused reload point at the very character. The
values themselves are checked by the constructors in agent.core.policy; this
module only walks the YAML and says where a bad value sits.

Policies also arrive as data, already parsed: agent.yaml's `policy.policies`
and the control plane's snapshots. `parse_policy_list` reads those through
the same walk, so a policy means and is refused the same however it came;
data has no line or column, so those errors read `SOURCE: key.path: problem`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast, get_args

import yaml

from agent.core.headers import plain
from agent.core.policy import (
    DESTINATION_FIELDS,
    HEADER_NAME,
    SOURCE_FIELDS,
    Action,
    Condition,
    Field,
    Pattern,
    Policy,
    Rule,
    check_name,
    check_policy_name,
    check_value,
    duplicates,
)

__all__ = ["PolicyError", "load_policy_files", "parse_policies", "parse_policy_list"]


class PolicyError(Exception):
    """Policy files that cannot be used; each error is `FILE:LINE:COLUMN: key: problem`."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


def load_policy_files(paths: Sequence[Path]) -> tuple[Policy, ...]:
    """Every policy of every file, in order; PolicyError lists all problems at once."""
    policies: list[Policy] = []
    errors: list[str] = []
    for path in paths:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            errors.append(f"{path}:1:1: cannot read the file: {why}; expected a UTF-8 YAML file")
            continue
        try:
            policies.extend(parse_policies(text, str(path)))
        except PolicyError as exc:
            errors.extend(exc.errors)
    errors.extend(duplicates(policies))
    if errors:
        raise PolicyError(errors)
    return tuple(policies)


def parse_policies(text: str, source: str) -> tuple[Policy, ...]:
    """One file: YAML documents, each `{policies: [...]}`; PolicyError with every error."""
    reader = _Reader(source)
    try:
        documents = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError as exc:
        raise PolicyError([reader.yaml_error(exc)]) from None
    documents = [doc for doc in documents if not _is_null(doc)]
    if not documents:
        reader.fail(None, "(file)", "is empty; expected a mapping with a `policies:` list")
    policies: list[Policy] = []
    for document in documents:
        top = reader.mapping(document, "", {"policies"}, required={"policies"})
        if top is None or "policies" not in top:
            continue
        for index, node in enumerate(reader.sequence(top["policies"], "policies", None)):
            policy = _policy(reader, node, f"policies[{index}]")
            if policy is not None:
                policies.append(policy)
    reader.errors.extend(duplicates(policies))
    if reader.errors:
        raise PolicyError(reader.errors)
    return tuple(policies)


def parse_policy_list(items: object, source: str) -> tuple[Policy, ...]:
    """Policies given as data: a list of policy mappings, each as a file's `policies[i]`.

    Errors name the key path from `policies[i]` (`SOURCE: policies[0].rules: ...`,
    no line or column); PolicyError lists them all. `source` also becomes each
    policy's `source`, with its path: `SOURCE: policies[0]`.
    """
    reader = _Reader(source)
    node = _as_node(items)
    policies: list[Policy] = []
    for index, item in enumerate(reader.sequence(node, "policies", None)):
        policy = _policy(reader, item, f"policies[{index}]")
        if policy is not None:
            policies.append(policy)
    reader.errors.extend(duplicates(policies))
    if reader.errors:
        raise PolicyError(reader.errors)
    return tuple(policies)


class _Value(yaml.ScalarNode):
    """A scalar given as data: its value is already what the YAML would construct."""

    def __init__(self, value: object) -> None:
        super().__init__(_TAGS.get(type(value), "tag:yaml.org,2002:str"), str(value))
        self.data = value


_TAGS = {type(None): "tag:yaml.org,2002:null", bool: "tag:yaml.org,2002:bool"}
_TAGS |= {int: "tag:yaml.org,2002:int", float: "tag:yaml.org,2002:float"}


def _as_node(data: object) -> yaml.Node:
    """Data as the nodes the reader walks (no marks: errors name only the key path)."""
    if isinstance(data, Mapping):
        pairs = [(_as_node(key), _as_node(value)) for key, value in data.items()]
        return yaml.MappingNode("tag:yaml.org,2002:map", pairs)
    if isinstance(data, list | tuple):
        return yaml.SequenceNode("tag:yaml.org,2002:seq", [_as_node(item) for item in data])
    return _Value(data)


def _policy(reader: _Reader, node: yaml.Node, path: str) -> Policy | None:
    keys = {"name", "action", "mode", "rules"}
    raw = reader.mapping(node, path, keys, required={"name", "action", "rules"})
    if raw is None:
        return None
    errors = len(reader.errors)
    name = reader.value(raw.get("name"), f"{path}.name", check_policy_name)
    action = reader.value(raw.get("action"), f"{path}.action", _action)
    mode = reader.value(raw.get("mode"), f"{path}.mode", _mode) if "mode" in raw else "enforce"
    rules: list[Rule] = []
    if "rules" in raw:
        if_empty = None if action == "ALLOW" else _ONE_RULE
        for index, rule_node in enumerate(reader.sequence(raw["rules"], f"{path}.rules", if_empty)):
            rule = _rule(reader, rule_node, f"{path}.rules[{index}]", index)
            if rule is not None:
                rules.append(rule)
    if len(reader.errors) > errors or name is None or action is None:
        return None
    where = reader.where(raw["name"])
    if raw["name"].start_mark is None:  # data: no line and column, so say which item
        where = f"{where}: {path}"
    return reader.build(node, path, Policy, name, action, tuple(rules), mode == "dry-run", where)


_ONE_RULE = (
    "at least one rule ({} is a rule that matches every request; only an ALLOW policy may"
    " have none, and then it allows nothing)"
)
_ONE_VALUE = "at least one value (or leave the key out to match any)"


def _action(value: object) -> Action:
    if value in get_args(Action):
        return cast(Action, value)
    hint = f" (upper-case: {value.upper()})" if isinstance(value, str) else ""
    raise ValueError(f"{value!r} is not an action; expected ALLOW, DENY or AUDIT{hint}")


def _mode(value: object) -> str:
    if value not in ("enforce", "dry-run"):
        raise ValueError(f"{value!r} is not a mode; expected dry-run or enforce (the default)")
    return str(value)


def _rule(reader: _Reader, node: yaml.Node, path: str, index: int) -> Rule | None:
    raw = reader.mapping(node, path, {"name", "from", "to", "when"})
    if raw is None:
        return None
    name = reader.value(raw["name"], f"{path}.name", check_name) if "name" in raw else None
    conditions: list[Condition] = []
    conditions += reader.fields(raw.get("from"), f"{path}.from", SOURCE_FIELDS, "any source")
    conditions += reader.fields(raw.get("to"), f"{path}.to", DESTINATION_FIELDS, "any request")
    if "when" in raw:
        for i, item in enumerate(reader.sequence(raw["when"], f"{path}.when")):
            conditions += reader.header_conditions(item, f"{path}.when[{i}]")
    return Rule(name or f"rules[{index}]", tuple(conditions))


def _unknown(key: object, known: set[str]) -> str:
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key{hint}; expected one of {', '.join(sorted(known))}"


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


T = TypeVar("T")


class _Reader:
    """Walks composed YAML nodes so that every error can name its line and column."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors: list[str] = []
        self._scalars = yaml.constructor.SafeConstructor()

    def where(self, node: yaml.Node | None) -> str:
        if node is None:
            return f"{self.source}:1:1"
        mark = node.start_mark
        if mark is None:  # represented from data (parse_policy_list), not read from text
            return self.source
        return f"{self.source}:{mark.line + 1}:{mark.column + 1}"

    def fail(self, node: yaml.Node | None, path: str, problem: str) -> None:
        self.errors.append(f"{self.where(node)}: {path or '(top)'}: {problem}")

    def yaml_error(self, exc: yaml.YAMLError) -> str:
        mark = getattr(exc, "problem_mark", None)
        at = f"{self.source}:{mark.line + 1}:{mark.column + 1}" if mark else f"{self.source}:1:1"
        problem = getattr(exc, "problem", None) or str(exc)
        hint = "; expected valid YAML"
        lines = (mark.buffer or "").split("\n") if mark else []
        if mark and mark.line < len(lines) and "*" in lines[mark.line]:
            hint += " (quote values that start with '*', such as '*.example.com')"
        return f"{at}: (yaml): {problem}{hint}"

    def build(self, node: yaml.Node, path: str, make: Callable[..., T], *args: Any) -> T | None:
        """`make(*args)`, or None with its ValueError reported at `node`."""
        try:
            return make(*args)
        except ValueError as exc:
            self.fail(node, path, str(exc))
            return None

    def mapping(
        self, node: yaml.Node, path: str, known: set[str], required: Iterable[str] = ()
    ) -> dict[str, yaml.Node] | None:
        if not isinstance(node, yaml.MappingNode):
            self.fail(
                node, path, f"is not a mapping; expected keys among {', '.join(sorted(known))}"
            )
            return None
        found: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            at = f"{path}.{key}" if path else str(key)
            if key not in known:
                self.fail(key_node, at, _unknown(key, known))
            elif key in found:
                self.fail(key_node, at, "duplicate key; expected each key once")
            else:
                found[key] = value_node
        for key in sorted(set(required) - set(found)):
            self.fail(node, path, f"missing key {key!r}")
        return found

    def sequence(
        self, node: yaml.Node, path: str, if_empty: str | None = "at least one item"
    ) -> list[yaml.Node]:
        """The items of a list; `if_empty` says what is expected of an empty one (None: fine)."""
        if not isinstance(node, yaml.SequenceNode):
            self.fail(node, path, "is not a list; expected a YAML list ([a, b] or '- a' lines)")
            return []
        if not node.value and if_empty:
            self.fail(node, path, f"is empty; expected {if_empty}")
        return list(node.value)

    def scalar(self, node: yaml.Node) -> object:
        if isinstance(node, _Value):
            return node.data
        if not isinstance(node, yaml.ScalarNode):
            return node  # not a scalar: every value check rejects it by type
        return self._scalars.construct_object(node)

    def value(self, node: yaml.Node | None, path: str, check: Callable[[object], T]) -> T | None:
        if node is None:
            return None
        scalar = self.scalar(node)
        if isinstance(scalar, yaml.Node):
            self.fail(node, path, "is not a single value; expected a string")
            return None
        return self.build(node, path, check, scalar)

    def condition(
        self, node: yaml.Node, path: str, field: Field, negated: bool, header: str = ""
    ) -> Condition | None:
        """The condition a list of values makes; None (reported) if any value is wrong."""
        items = self.sequence(node, path, _ONE_VALUE)
        texts = [
            self.value(item, f"{path}[{i}]", lambda value: check_value(field, value))
            for i, item in enumerate(items)
        ]
        if not items or None in texts:
            return None
        patterns = tuple(Pattern(text) for text in texts if text is not None)
        return self.build(node, path, Condition, field, patterns, negated, header)

    def fields(
        self, node: yaml.Node | None, path: str, names: tuple[Field, ...], anything: str
    ) -> list[Condition]:
        if node is None:
            return []
        raw = self.mapping(node, path, {key for name in names for key in (name, f"not_{name}")})
        if raw is None:
            return []
        if not node.value:  # not when every key was unknown: that is already said
            self.fail(
                node, path, f"is empty; expected a field (or leave it out to match {anything})"
            )
        conditions = []
        for key, value_node in raw.items():
            name = next(name for name in names if key in (name, f"not_{name}"))
            negated = key.startswith("not_")
            conditions.append(self.condition(value_node, f"{path}.{key}", name, negated))
        return [condition for condition in conditions if condition is not None]

    def header_conditions(self, node: yaml.Node, path: str) -> list[Condition]:
        raw = self.mapping(node, path, {"header", "values", "not_values"}, required={"header"})
        if raw is None or "header" not in raw:
            return []
        header = self.value(raw["header"], f"{path}.header", _header_name)
        if not {"values", "not_values"} & set(raw):
            self.fail(node, path, "has no values or not_values; expected at least one of them")
        conditions = [
            self.condition(raw[key], f"{path}.{key}", "headers", key == "not_values", header)
            for key in ("values", "not_values")
            if key in raw and header
        ]
        return [condition for condition in conditions if condition is not None]


def _header_name(value: object) -> str:
    if not isinstance(value, str) or not HEADER_NAME.fullmatch(value.lower()):
        raise ValueError(f"{value!r} is not a header name; expected a name such as x-user-role")
    name = value.lower()
    if not plain(name.encode()):  # agent/core/headers.py: refused or dropped before the policy
        hyphens = "".join(c if plain(c.encode()) else "-" for c in name)
        odd = next(c for c in name if not plain(c.encode()))
        raise ValueError(
            f"header {name!r} never reaches a rule (it has {odd!r}); expected {hyphens!r}"
        )
    if name in _NOTHEADER_NAMES:
        raise ValueError(f"header {name!r} cannot be matched; expected {_NOTHEADER_NAMES[name]}")
    return name


# Headers a `when` could only match wrongly: the adapter strips the identity
# header before the policy runs, and the raw Host is not what to.hosts matches.
_NOTHEADER_NAMES = {
    "host": "to.hosts, which matches the normalized host",
    "x-forwarded-client-cert": "from.principals: the agent strips this header from requests",
}
