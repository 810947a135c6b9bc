"""EndpointSlices -> endpoints, and one Service's slices kept through a watch.

The objects are the recorded ones in tests/fixtures/endpointslices (see its
README): a list, then the watch events of a rolling update.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from agent.core.discovery import (
    DnsSource,
    Expired,
    KubernetesSource,
    SliceCache,
    StaticSource,
    WatchError,
    slice_endpoints,
)
from agent.core.endpoint import Endpoint
from tests.k8s import to_model

FIXTURES = Path(__file__).parents[2] / "fixtures" / "endpointslices"
PORT = 15443

# The pods of the recorded Service shop/backend, by letter (fixtures README).
PODS = {
    "A": "10.244.1.17",
    "B": "10.244.2.9",
    "C": "10.244.2.11",
    "D": "10.244.3.5",
    "E": "10.244.1.23",
    "F": "10.244.3.8",
    "G": "10.244.2.14",
    "V": "192.168.50.10",  # a VM, in a slice written by hand
}


def load(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def events(name: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (FIXTURES / name).read_text().splitlines()]


def pods(letters: str) -> frozenset[Endpoint]:
    return frozenset(Endpoint(PODS[letter], PORT) for letter in letters)


def test_every_recorded_object_is_one_the_api_serves() -> None:
    for name in ("list.json", "relist.json", "terminating.json", "dual_stack.json"):
        listed = load(name)
        assert type(to_model(listed)).__name__ == "V1EndpointSliceList", name
        for item in listed["items"]:
            # List items come without kind and apiVersion, as the API sends them.
            assert "kind" not in item
            assert item["metadata"]["labels"]["kubernetes.io/service-name"] == "backend"
            assert item["metadata"]["namespace"] == "shop"
    for name in ("watch.jsonl", "watch_expired.jsonl"):
        for event in events(name):
            assert set(event) == {"type", "object"}
            model = to_model(event["object"])
            expected = "V1Status" if event["type"] == "ERROR" else "V1EndpointSlice"
            assert type(model).__name__ == expected, event["type"]


# --- slice_endpoints --------------------------------------------------------------


def test_ready_endpoints_of_every_slice_merge_and_the_fqdn_slice_is_skipped() -> None:
    # backend-7xk2p holds A, B ready and C starting; backend-m4v8q holds D;
    # backend-legacy is an FQDN slice.
    assert slice_endpoints(load("list.json")["items"], PORT) == pods("ABD")


def test_an_fqdn_slice_gives_nothing_even_when_its_names_look_like_addresses() -> None:
    (legacy,) = [s for s in load("list.json")["items"] if s["addressType"] == "FQDN"]
    assert slice_endpoints([legacy], PORT) == frozenset()
    legacy = copy.deepcopy(legacy)
    legacy["endpoints"][0]["addresses"] = ["10.0.0.1"]  # a valid DNS name too
    assert slice_endpoints([legacy], PORT) == frozenset()


def test_with_no_ready_endpoint_the_serving_terminating_ones_are_used() -> None:
    # Scaled to zero during the grace period: E still serves, F does not.
    assert slice_endpoints(load("terminating.json")["items"], PORT) == pods("E")


def test_terminating_endpoints_are_not_used_while_another_is_ready() -> None:
    draining_a = events("watch.jsonl")[4]["object"]  # A terminating, B C E ready
    conditions = draining_a["endpoints"][0]["conditions"]
    assert conditions == {"ready": False, "serving": True, "terminating": True}
    assert slice_endpoints([draining_a], PORT) == pods("BCE")


def test_dual_stack_gives_both_families_and_ipv6_hosts_have_no_brackets() -> None:
    endpoints = slice_endpoints(load("dual_stack.json")["items"], PORT)
    assert endpoints == {Endpoint("10.244.2.9", PORT), Endpoint("fd00:10:244:2::9", PORT)}
    assert sorted(map(str, endpoints)) == ["10.244.2.9:15443", "[fd00:10:244:2::9]:15443"]


def one_endpoint_slice(**endpoint: Any) -> dict[str, Any]:
    return {"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": [endpoint]}


@pytest.mark.parametrize(
    ("conditions", "used"),
    [
        (None, True),  # no conditions key at all
        ({}, True),  # what the API serves when a hand-written slice omits them
        ({"ready": None}, True),
        ({"ready": True}, True),
        ({"ready": False}, False),
        ({"ready": False, "serving": True}, False),  # serving but not terminating
        ({"ready": False, "terminating": True}, False),  # serving absent: defers to ready
        ({"ready": False, "serving": True, "terminating": True}, True),
        ({"ready": False, "serving": False, "terminating": True}, False),
    ],
)
def test_conditions(conditions: dict[str, Any] | None, used: bool) -> None:
    endpoint: dict[str, Any] = {"addresses": ["10.0.0.1"]}
    if conditions is not None:
        endpoint["conditions"] = conditions
    expected = {Endpoint("10.0.0.1", PORT)} if used else set()
    assert slice_endpoints([one_endpoint_slice(**endpoint)], PORT) == expected


def test_only_the_first_address_of_an_endpoint_is_used() -> None:
    item = one_endpoint_slice(addresses=["10.0.0.1", "10.0.0.2"], conditions={"ready": True})
    assert slice_endpoints([item], PORT) == {Endpoint("10.0.0.1", PORT)}


def test_an_address_in_two_slices_counts_once_and_ready_wins() -> None:
    first, _, _ = load("list.json")["items"]
    second = copy.deepcopy(first)
    second["metadata"]["name"] = "backend-copy"
    second["endpoints"][2]["conditions"]["ready"] = True  # C ready here, starting in the first
    assert slice_endpoints([first, second], PORT) == pods("ABC")
    assert slice_endpoints([first, first], PORT) == pods("AB")


def test_ipv6_addresses_are_made_canonical_and_wrong_families_are_skipped() -> None:
    v6: dict[str, Any] = {"metadata": {"name": "v6"}, "addressType": "IPv6"}
    v6["endpoints"] = [
        {"addresses": ["FD00:10:244:2:0:0:0:9"]},
        {"addresses": ["10.0.0.1"]},  # not IPv6: the slice's family is the truth
        {"addresses": ["not-an-address"]},
        {"addresses": []},
    ]
    assert slice_endpoints([v6], PORT) == {Endpoint("fd00:10:244:2::9", PORT)}


def test_a_slice_without_endpoints_gives_nothing() -> None:
    # An empty slice comes back from the API as "endpoints": null.
    empty = {"metadata": {"name": "s"}, "addressType": "IPv4", "endpoints": None}
    assert slice_endpoints([empty], PORT) == frozenset()


# --- SliceCache --------------------------------------------------------------------

# After each event of watch.jsonl: what apply returns, the resourceVersion, the endpoints.
ROLLING_UPDATE = [
    ("MODIFIED", True, "48230", "ABCD"),  # C passes its readiness probe
    ("ADDED", True, "48236", "ABCDV"),  # a hand-written slice for a VM joins
    ("MODIFIED", True, "48241", "ABCDV"),  # new pod E, starting
    ("BOOKMARK", False, "48250", "ABCDV"),
    ("MODIFIED", True, "48262", "BCDEV"),  # E ready, A terminating
    ("MODIFIED", True, "48275", "BCDEV"),  # A gone
    ("MODIFIED", True, "48290", "BCDEV"),  # new pod F, starting
    ("MODIFIED", True, "48301", "BCDEFV"),  # F ready
    ("MODIFIED", True, "48302", "BCEFV"),  # D terminating
    ("DELETED", True, "48317", "BCEFV"),  # its now empty slice deleted
    ("DELETED", True, "48340", "BCEF"),  # the VM slice deleted
    ("BOOKMARK", False, "48388", "BCEF"),
]


def listed_cache() -> SliceCache:
    listed = load("list.json")
    cache = SliceCache()
    cache.replace(listed["items"], listed["metadata"]["resourceVersion"])
    return cache


def test_the_cache_follows_the_recorded_rolling_update_event_by_event() -> None:
    cache = listed_cache()
    assert (cache.resource_version, cache.endpoints(PORT)) == ("48213", pods("ABD"))
    recorded = events("watch.jsonl")
    assert [event["type"] for event in recorded] == [step[0] for step in ROLLING_UPDATE]
    for event, (kind, changed, version, letters) in zip(recorded, ROLLING_UPDATE, strict=True):
        assert cache.apply(event) is changed, (kind, version)
        assert cache.resource_version == version
        assert cache.endpoints(PORT) == pods(letters), (kind, version)


def test_a_bookmark_moves_the_resource_version_and_nothing_else() -> None:
    cache = listed_cache()
    bookmark = events("watch.jsonl")[3]
    assert bookmark["object"]["endpoints"] is None
    assert cache.apply(bookmark) is False
    assert (cache.resource_version, len(cache), cache.endpoints(PORT)) == ("48250", 3, pods("ABD"))


def test_deleted_removes_the_slice() -> None:
    cache = listed_cache()
    deleted = copy.deepcopy(events("watch.jsonl")[9])  # backend-m4v8q, with D in it
    deleted["object"]["endpoints"][0]["conditions"] = {"ready": True}
    assert cache.apply(deleted) is True
    assert (len(cache), cache.endpoints(PORT)) == (2, pods("AB"))


def test_a_410_error_event_raises_expired() -> None:
    cache = listed_cache()
    (gone,) = events("watch_expired.jsonl")
    with pytest.raises(Expired, match="too old resource version"):
        cache.apply(gone)
    assert (cache.resource_version, cache.endpoints(PORT)) == ("48213", pods("ABD"))


@pytest.mark.parametrize(
    "event",
    [
        {"type": "ERROR", "object": {"kind": "Status", "code": 500, "reason": "InternalError"}},
        {"type": "SOMETHING", "object": {"metadata": {"resourceVersion": "1"}}},
        {"type": "MODIFIED", "object": {"metadata": {"name": "x"}}},  # no resourceVersion
        {"type": "ADDED", "object": {"metadata": {"resourceVersion": "1"}}},  # no name
    ],
)
def test_other_errors_and_garbled_events_raise_a_watch_error_not_expired(
    event: dict[str, Any],
) -> None:
    with pytest.raises(WatchError) as raised:
        listed_cache().apply(event)
    assert not isinstance(raised.value, Expired)


def test_replace_starts_over() -> None:
    cache = listed_cache()
    for event in events("watch.jsonl"):
        cache.apply(event)
    relisted = load("relist.json")
    cache.replace(relisted["items"], relisted["metadata"]["resourceVersion"])
    assert (cache.resource_version, len(cache), cache.endpoints(PORT)) == ("49130", 2, pods("CEFG"))


# --- sources -----------------------------------------------------------------------


def test_sources_refuse_what_cannot_work() -> None:
    with pytest.raises(ValueError, match="at least one"):
        StaticSource(())
    with pytest.raises(ValueError, match="weight"):
        StaticSource(((Endpoint("10.0.0.1", 80), 0),))
    with pytest.raises(ValueError, match="port"):
        DnsSource("backend", 0)
    with pytest.raises(ValueError, match="refresh"):
        DnsSource("backend", 80, refresh=0)
    with pytest.raises(ValueError, match="namespace"):
        KubernetesSource("backend", "", 15443)
    source = KubernetesSource("backend", "shop", 15443)
    assert source.label_selector == "kubernetes.io/service-name=backend"
