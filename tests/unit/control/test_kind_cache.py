"""The control plane keeps objects as the API sends them, less their managedFields."""

from __future__ import annotations

from typing import Any

from control.informers import KindCache


def pod(name: str, version: str) -> dict[str, Any]:
    managed = [{"manager": "kubectl", "fieldsV1": {"f:spec": {}}}]
    metadata = {"name": name, "namespace": "shop", "resourceVersion": version}
    return {"metadata": {**metadata, "managedFields": managed}, "spec": {"x": 1}}


def test_listed_and_watched_objects_lose_only_their_managed_fields() -> None:
    cache = KindCache()
    cache.replace([pod("a", "1")], "1")
    assert cache.apply({"type": "ADDED", "object": pod("b", "2")})
    for obj in cache.objects.values():
        assert "managedFields" not in obj["metadata"]
        assert obj["spec"] == {"x": 1} and obj["metadata"]["namespace"] == "shop"
    assert cache.apply({"type": "DELETED", "object": pod("a", "3")})
    assert list(cache.objects) == [("shop", "b")]
