"""Label selectors mean what they mean in Kubernetes; a bad one names its field."""

from __future__ import annotations

from typing import Any

import pytest

from control.core.selectors import EVERY_POD, Selector, parse_selector

WEB = {"app": "web", "tier": "front"}
DB = {"app": "db"}
BARE: dict[str, str] = {}


def _selector(raw: Any) -> Selector:
    selector, errors = parse_selector(raw, "spec.selector")
    assert not errors and selector is not None
    return selector


@pytest.mark.parametrize(
    ("raw", "matches", "misses"),
    [
        (None, [WEB, DB, BARE], []),
        ({}, [WEB, DB, BARE], []),
        ({"matchLabels": {"app": "web"}}, [WEB], [DB, BARE]),
        ({"matchLabels": {"app": "web", "tier": "back"}}, [], [WEB, DB]),
        (
            {"matchExpressions": [{"key": "app", "operator": "In", "values": ["web", "db"]}]},
            [WEB, DB],
            [BARE],
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]},
            [WEB, BARE],
            [DB],
        ),
        ({"matchExpressions": [{"key": "tier", "operator": "Exists"}]}, [WEB], [DB, BARE]),
        ({"matchExpressions": [{"key": "tier", "operator": "DoesNotExist"}]}, [DB, BARE], [WEB]),
        (
            {
                "matchLabels": {"app": "web"},
                "matchExpressions": [{"key": "tier", "operator": "In", "values": ["back"]}],
            },
            [],
            [WEB],
        ),
    ],
)
def test_a_selector_matches_as_kubernetes_defines(
    raw: Any, matches: list[dict[str, str]], misses: list[dict[str, str]]
) -> None:
    selector = _selector(raw)
    assert all(selector.matches(labels) for labels in matches)
    assert not any(selector.matches(labels) for labels in misses)


def test_no_selector_is_every_pod() -> None:
    assert _selector(None) == _selector({}) == EVERY_POD


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ("app=web", "spec.selector: is not a mapping"),
        ({"matchLabel": {"app": "web"}}, "spec.selector.matchLabel: unknown key"),
        ({"matchLabels": {"version": 2}}, "spec.selector.matchLabels.version: 2 is not a string"),
        (
            {"matchExpressions": [{"key": "app", "operator": "in", "values": ["web"]}]},
            "spec.selector.matchExpressions[0].operator: 'in' is not one of In, NotIn, Exists,"
            " DoesNotExist",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "In"}]},
            "spec.selector.matchExpressions[0].values: In needs at least one value",
        ),
        (
            {"matchExpressions": [{"key": "app", "operator": "Exists", "values": ["x"]}]},
            "spec.selector.matchExpressions[0].values: Exists takes no values",
        ),
        (
            {"matchExpressions": [{"operator": "Exists"}]},
            "spec.selector.matchExpressions[0].key: required",
        ),
    ],
)
def test_a_bad_selector_names_its_field(raw: Any, error: str) -> None:
    selector, errors = parse_selector(raw, "spec.selector")
    assert selector is None
    assert any(e.startswith(error) for e in errors), errors
