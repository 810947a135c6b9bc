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


def with_status(obj: dict[str, Any], version: str, status: dict[str, Any]) -> dict[str, Any]:
    return {**obj, "metadata": {**obj["metadata"], "resourceVersion": version}, "status": status}


def test_a_status_written_by_the_control_plane_is_kept_but_changes_no_mesh() -> None:
    """Its own status write comes back through the watch: no compile, no sweep of agents."""
    cache = KindCache(own_status=True)
    cache.replace([pod("a", "1")], "1")
    written = with_status(pod("a", "1"), "2", {"conditions": [{"type": "Accepted"}]})
    assert not cache.apply({"type": "MODIFIED", "object": written})
    assert cache.objects[("shop", "a")]["status"] == written["status"]  # what statuses compare
    edited = {**with_status(pod("a", "1"), "3", written["status"]), "spec": {"x": 2}}
    assert cache.apply({"type": "MODIFIED", "object": edited})  # the spec is the user's


def test_a_status_change_of_a_pod_is_a_change() -> None:
    """The kubelet writes a pod's IP and readiness in its status: the mesh follows them."""
    cache = KindCache()
    cache.replace([pod("a", "1")], "1")
    assert cache.apply(
        {"type": "MODIFIED", "object": with_status(pod("a", "1"), "2", {"podIP": "10.0.0.7"})}
    )
