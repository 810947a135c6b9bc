"""What an object cache makes of watch events (identity.kubewatch), and when the control
plane counts a status as changed."""

from __future__ import annotations

from typing import Any

import pytest

from control.sync import comparable
from identity.kubewatch import Expired, ObjectCache, WatchError


def obj(name: str, version: str, namespace: str = "shop", **rest: Any) -> dict[str, Any]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": version}, **rest}


def test_a_list_then_events_keep_the_current_objects_and_the_resource_version() -> None:
    cache = ObjectCache()
    cache.replace([obj("a", "1"), obj("b", "2")], "5")
    assert set(cache.objects) == {("shop", "a"), ("shop", "b")}
    assert cache.apply({"type": "ADDED", "object": obj("c", "6")})
    assert cache.apply({"type": "MODIFIED", "object": obj("a", "7", spec={"x": 1})})
    assert cache.objects[("shop", "a")]["spec"] == {"x": 1}
    assert cache.apply({"type": "DELETED", "object": obj("b", "8")})
    assert not cache.apply({"type": "BOOKMARK", "object": {"metadata": {"resourceVersion": "9"}}})
    assert set(cache.objects) == {("shop", "a"), ("shop", "c")}
    assert cache.resource_version == "9"


def test_deleting_what_is_not_held_changes_nothing() -> None:
    cache = ObjectCache()
    assert not cache.apply({"type": "DELETED", "object": obj("gone", "3")})


def test_a_410_error_event_means_list_again() -> None:
    cache = ObjectCache()
    gone = {"type": "ERROR", "object": {"code": 410, "reason": "Expired", "message": "too old"}}
    with pytest.raises(Expired, match="Expired: too old"):
        cache.apply(gone)


@pytest.mark.parametrize(
    "event",
    [
        {"type": "ERROR", "object": {"code": 500, "message": "boom"}},
        {"type": "SURPRISE", "object": obj("a", "1")},
        {"type": "ADDED", "object": {"metadata": {"name": "a"}}},
        {"type": "ADDED", "object": {"metadata": {"resourceVersion": "2"}}},
    ],
)
def test_an_event_it_cannot_use_fails_the_watch(event: dict[str, Any]) -> None:
    with pytest.raises(WatchError):
        ObjectCache().apply(event)


def test_a_status_that_differs_only_in_transition_times_is_the_same() -> None:
    ours = {
        "conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": "now"}],
        "parents": [{"conditions": [{"type": "Accepted", "lastTransitionTime": "then"}]}],
    }
    theirs = {
        "conditions": [{"type": "Accepted", "status": "True", "lastTransitionTime": "before"}],
        "parents": [{"conditions": [{"type": "Accepted", "lastTransitionTime": "later"}]}],
    }
    assert comparable(ours) == comparable(theirs)
    theirs["conditions"][0]["status"] = "False"
    assert comparable(ours) != comparable(theirs)
