"""A policy edited into an invalid one stays in force at its last valid version on every
control-plane replica, however recently started: the version is read from the object's
own status (status.inForce), never from what one process happened to see."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from control.core.mesh import Mesh, MeshSettings, compile_mesh
from tests.apiserver import FakeApiServer
from tests.cluster import SHOP, Objects, agent_accepts, world, write_statuses

SETTINGS = MeshSettings("example.org")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T1 = datetime(2024, 5, 1, 12, 5, tzinfo=UTC)
T2 = datetime(2024, 5, 1, 12, 9, tzinfo=UTC)

DENY_ADMIN = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: backend}}
  action: DENY
  rules: [{to: {paths: ["/admin*"]}}]
---
"""
#: Passes the CRD's schema, but the agent refuses it: the pattern can never match.
DENY_ADMIN_TYPO = DENY_ADMIN.replace('"/admin*"', '"/a/../admin"')

BALANCED = """\
apiVersion: networking.outrider.io/v1alpha1
kind: TrafficPolicy
metadata: {name: backend, namespace: shop}
spec:
  targetRefs: [{group: "", kind: Service, name: backend}]
  balancer: least_request
---
"""
#: Passes the CRD's schema, but the agent refuses it: least_request hashes on nothing.
BALANCED_TYPO = BALANCED.replace("least_request", "least_request\n  hashOn: {header: x-user}")
AP = ("AuthorizationPolicy", "shop", "no-admin")
TP = ("TrafficPolicy", "shop", "backend")


def _edit(objects: Objects, text: str) -> Objects:
    """`kubectl apply` of a new spec for an object that is there: the API server moves
    its generation and keeps its status (the status subresource's)."""
    for kind, found in world(text).items():
        for key, new in found.items():
            old = objects[kind][key]
            new["metadata"]["generation"] = old["metadata"]["generation"] + 1
            if "status" in old:
                new["status"] = old["status"]
            objects[kind][key] = new
    return objects


def _edited_after_a_good_version(good: str, bad: str) -> tuple[Objects, Mesh]:
    """The objects after a valid version was compiled and its status written, then an
    edit into an invalid one; and the Mesh of the replica that saw the good version."""
    objects = world(SHOP, good)
    seen = compile_mesh(objects, SETTINGS, now=T0)
    write_statuses(objects, seen.statuses)
    return _edit(objects, bad), seen


def _deny_rules(mesh: Mesh, pod: str = "backend-v1-0") -> list[Any]:
    config = mesh.config_for("shop", pod)
    assert config is not None
    agent_accepts(config)
    return [p["rules"] for p in config["policy"]["policies"] if p["name"] == "shop/no-admin"]


def _condition(mesh: Mesh, key: tuple[str, str, str]) -> dict[str, Any]:
    (condition,) = mesh.statuses[key]["conditions"]
    return dict(condition)


def test_two_replicas_compile_the_same_configs_and_statuses() -> None:
    objects, seen = _edited_after_a_good_version(DENY_ADMIN, DENY_ADMIN_TYPO)
    # One replica saw the good version (its previous Mesh); the other started since.
    old = compile_mesh(objects, SETTINGS, seen, now=T1)
    new = compile_mesh(objects, SETTINGS, now=T1)
    assert old == new  # every pod's config, every status
    assert _deny_rules(new) == [[{"to": {"paths": ["/admin*"]}}]]
    # Neither rewrites what the other wrote: no status back and forth.
    write_statuses(objects, new.statuses)
    assert compile_mesh(objects, SETTINGS, old, now=T2).statuses == new.statuses
    assert compile_mesh(objects, SETTINGS, now=T2).statuses == new.statuses


def test_after_every_replica_restarts_the_previous_version_stays_in_force() -> None:
    objects, _ = _edited_after_a_good_version(DENY_ADMIN, DENY_ADMIN_TYPO)
    restarted = compile_mesh(objects, SETTINGS, now=T1)
    assert _deny_rules(restarted) == [[{"to": {"paths": ["/admin*"]}}]]
    condition = _condition(restarted, AP)
    assert (condition["status"], condition["reason"], condition["observedGeneration"]) == (
        "False",
        "Invalid",
        2,
    )
    assert condition["message"] == (
        "spec.rules[0].to.paths[0]: '/a/../admin' never matches, because requests are matched"
        " after normalization; expected the normalized form '/admin'; the previous version"
        " (generation 1) stays in force"
    )
    status = restarted.statuses[AP]
    assert status["observedGeneration"] == 2
    assert status["inForce"] == {
        "generation": 1,
        "spec": {
            "selector": {"matchLabels": {"app": "backend"}},
            "action": "DENY",
            "rules": [{"to": {"paths": ["/admin*"]}}],
        },
    }
    # Still invalid after any number of restarts: the record is carried over as it was.
    write_statuses(objects, restarted.statuses)
    assert _deny_rules(compile_mesh(objects, SETTINGS, now=T2)) == _deny_rules(restarted)


def test_without_a_recorded_version_an_invalid_policy_is_not_enforced() -> None:
    # Invalid from its first version: nothing was ever in force.
    mesh = compile_mesh(world(SHOP, DENY_ADMIN_TYPO), SETTINGS, now=T0)
    assert _deny_rules(mesh) == []
    assert "inForce" not in mesh.statuses[AP]
    assert _condition(mesh, AP)["message"].endswith("; it is not enforced")


def test_a_recorded_version_that_no_longer_compiles_is_dropped() -> None:
    # The status says a version is in force that this control plane refuses (an older
    # one accepted it, or someone wrote the status by hand): nothing is sent for it.
    objects = world(SHOP, DENY_ADMIN_TYPO)
    policy = objects["AuthorizationPolicy"][("shop", "no-admin")]
    policy["metadata"]["generation"] = 2
    policy["status"] = {"inForce": {"generation": 1, "spec": {"action": "DENY"}}}
    mesh = compile_mesh(objects, SETTINGS, now=T0)
    assert _deny_rules(mesh) == []
    assert "inForce" not in mesh.statuses[AP]
    assert _condition(mesh, AP)["message"].endswith("; it is not enforced")


def test_a_fixed_policy_replaces_the_recorded_version() -> None:
    objects, _ = _edited_after_a_good_version(DENY_ADMIN, DENY_ADMIN_TYPO)
    write_statuses(objects, compile_mesh(objects, SETTINGS, now=T1).statuses)
    fixed = compile_mesh(_edit(objects, DENY_ADMIN.replace("/admin*", "/admin/*")), SETTINGS)
    assert _deny_rules(fixed) == [[{"to": {"paths": ["/admin/*"]}}]]
    assert fixed.statuses[AP]["inForce"]["generation"] == 3
    assert _condition(fixed, AP)["status"] == "True"


def test_a_traffic_policy_keeps_its_previous_version_on_every_replica() -> None:
    objects, seen = _edited_after_a_good_version(BALANCED, BALANCED_TYPO)
    old = compile_mesh(objects, SETTINGS, seen, now=T1)
    new = compile_mesh(objects, SETTINGS, now=T1)
    assert old == new
    config = new.config_for("shop", "frontend-0")
    assert config is not None
    agent_accepts(config)
    (outbound,) = config["outbound"]
    assert outbound["balancer"] == "least_request"
    condition = _condition(new, TP)
    assert (condition["status"], condition["reason"]) == ("False", "Invalid")
    assert condition["message"].startswith("spec.hashOn: only ring_hash and maglev hash")
    assert condition["message"].endswith("; the previous version (generation 1) stays in force")
    assert new.statuses[TP]["inForce"]["spec"]["balancer"] == "least_request"


@pytest.mark.parametrize(
    ("good", "bad", "key"),
    [(DENY_ADMIN, DENY_ADMIN_TYPO, AP), (BALANCED, BALANCED_TYPO, TP)],
    ids=["AuthorizationPolicy", "TrafficPolicy"],
)
def test_the_api_server_keeps_the_recorded_version_as_written(
    tmp_path: Path, good: str, bad: str, key: tuple[str, str, str]
) -> None:
    # The shell writes Mesh.statuses through the status subresource; the CRD's schema
    # must keep all of it (nothing pruned), or the shell would rewrite it forever and
    # the next replica would find nothing in force.
    server = FakeApiServer(tmp_path)
    server.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n")
    kind, namespace, name = key
    (api_version,) = {doc["apiVersion"] for doc in yaml.safe_load_all(good) if doc}

    def compiled() -> Mesh:
        """What a replica started now compiles."""
        objects = world(SHOP)
        objects[kind][(namespace, name)] = server.get(api_version, kind, namespace, name)
        return compile_mesh(objects, SETTINGS, now=T0)

    def written(mesh: Mesh) -> dict[str, Any]:
        server.set_status(api_version, kind, namespace, name, dict(mesh.statuses[key]))
        status: dict[str, Any] = server.get(api_version, kind, namespace, name)["status"]
        return status

    server.apply(good)
    accepted = compiled()
    assert written(accepted) == accepted.statuses[key]
    server.apply(bad)
    invalid = compiled()
    assert _condition(invalid, key)["reason"] == "Invalid"
    for pod in ("frontend-0", "backend-v1-0", "backend-v2-0"):
        assert invalid.config_for("shop", pod) == accepted.config_for("shop", pod)
    assert written(invalid) == invalid.statuses[key]
    assert invalid.statuses[key]["inForce"] == accepted.statuses[key]["inForce"]
    assert compiled().statuses == invalid.statuses  # nothing more to write
