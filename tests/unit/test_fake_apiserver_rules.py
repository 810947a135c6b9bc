"""The fake API server's pure rules: selectors, kubectl apply's patch, pruning, merging.

Each is a table of what kube-apiserver (or kubectl) does with the same input.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.apischema import default, prune, strategic_merge
from tests.apistore import Selector, parse_label_selector, three_way_patch
from tests.apitypes import BUILTINS, ApiError

PODS = next(r for r in BUILTINS if r.plural == "pods")
LABELS = {"app": "web", "tier": "front", "replicas": "3"}


@pytest.mark.parametrize(
    ("selector", "matches"),
    [
        ("", True),
        ("app=web", True),
        ("app==web", True),
        ("app!=web", False),
        ("app!=db", True),
        ("missing!=x", True),
        ("app in (db, web)", True),
        ("app notin (db,web)", False),
        ("app,tier=front", True),
        ("tier in (back),app", False),
        ("missing", False),
        ("!missing", True),
        ("!app", False),
        ("replicas>2", True),
        ("replicas<2", False),
        ("example.com/role in (a), app=web", False),
    ],
)
def test_label_selectors_match_as_kube_apiserver_does(selector: str, matches: bool) -> None:
    requirements = parse_label_selector(selector)
    assert all(r.matches(LABELS) for r in requirements) is matches


@pytest.mark.parametrize("selector", ["app=(web", "=web", "app in (web", "bad key!=x", "a=b c"])
def test_a_malformed_label_selector_is_a_400(selector: str) -> None:
    with pytest.raises(ApiError) as refused:
        parse_label_selector(selector)
    assert refused.value.code == 400


def test_field_selectors_know_only_their_resource_fields() -> None:
    running = {"metadata": {"name": "a", "namespace": "shop"}, "status": {"phase": "Running"}}
    assert Selector.parse(PODS, None, "", "status.phase=Running").matches(running)
    assert not Selector.parse(PODS, None, "", "metadata.name!=a").matches(running)
    assert not Selector.parse(PODS, "other", "", "").matches(running)
    with pytest.raises(ApiError, match=r'"spec\.image" is not a known field selector'):
        Selector.parse(PODS, None, "", "spec.image=x")


def test_kubectl_apply_patches_what_changed_and_removes_what_the_manifest_dropped() -> None:
    last = {"spec": {"size": 1, "color": "red", "tags": {"a": "1", "b": "2"}}}
    manifest = {"spec": {"size": 2, "tags": {"a": "1"}}}
    live = {"spec": {"size": 1, "color": "red", "tags": {"a": "1", "b": "2"}, "server": "x"}}
    assert three_way_patch(last, manifest, live) == {
        "spec": {"size": 2, "color": None, "tags": {"b": None}}
    }  # the server's own field ("server") stays: the manifest never had it


def test_strategic_merge_merges_lists_by_their_merge_key() -> None:
    live = {
        "spec": {"containers": [{"name": "app", "image": "a:1"}, {"name": "side", "image": "s:1"}]}
    }
    patch: dict[str, Any] = {
        "spec": {
            "containers": [
                {"name": "side", "image": "s:2"},
                {"name": "app", "$patch": "delete"},
                {"name": "new", "image": "n:1"},
            ],
            "$setElementOrder/containers": [{"name": "side"}, {"name": "new"}],
        }
    }
    merged = strategic_merge(PODS, live, patch)
    assert merged["spec"]["containers"] == [
        {"name": "side", "image": "s:2"},
        {"name": "new", "image": "n:1"},
    ]


def test_a_structural_schema_prunes_unknown_fields_and_fills_defaults() -> None:
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {
                    "mode": {"type": "string", "default": "enforce"},
                    "note": {"type": "string", "nullable": True},
                    "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
                    "map": {"type": "object", "additionalProperties": {"type": "integer"}},
                    "gone": {"type": "string"},
                },
            }
        },
    }
    obj = {
        "apiVersion": "example.com/v1",
        "kind": "Widget",
        "metadata": {"name": "w"},
        "spec": {"note": None, "gone": None, "free": {"x": [1]}, "map": {"a": 1}, "typo": 1},
        "extra": True,
    }
    unknown: list[str] = []
    prune(schema, obj, (), unknown, top=True)
    default(schema, obj)
    assert unknown == ["spec.typo", "extra"]
    assert obj["spec"] == {"note": None, "free": {"x": [1]}, "map": {"a": 1}, "mode": "enforce"}


def test_preserving_unknown_fields_keeps_them_whole_at_that_node_only() -> None:
    """As kube-apiserver's pruning: the flag keeps its node's unknown keys (nested values
    and nulls included) and is not inherited: a declared property below it, and an
    array's items, are pruned by their own schemas."""
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "properties": {
                    "rules": {
                        "type": "array",
                        "items": {"type": "object", "properties": {"to": {"type": "string"}}},
                    },
                    "kept": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                        "properties": {"a": {"type": "string"}},
                    },
                    "pruned": {"type": "object", "properties": {"a": {"type": "string"}}},
                },
            }
        },
    }
    obj = {
        "spec": {
            "rules": [{"to": "x", "form": "y"}],
            "kept": {"a": "1", "b": {"c": [None]}, "n": None},
            "pruned": {"a": "1", "typo": 1, "gone": None},
            "actoin": {"deep": {"x": 1}},
            "nothing": None,
        },
    }
    unknown: list[str] = []
    prune(schema, obj, (), unknown, top=True)
    assert sorted(unknown) == ["spec.pruned.gone", "spec.pruned.typo", "spec.rules[0].form"]
    assert obj["spec"] == {
        "rules": [{"to": "x"}],
        "kept": {"a": "1", "b": {"c": [None]}, "n": None},
        "pruned": {"a": "1"},
        "actoin": {"deep": {"x": 1}},
        "nothing": None,
    }
