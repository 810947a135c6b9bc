"""An AuthorizationPolicy the agents cannot use: its status names the field, the previous
version stays in force, and a status is rewritten only when it changes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from control.core.mesh import Mesh, MeshSettings, compile_mesh
from tests.cluster import SHOP, agent_accepts, policy_object, world, write_statuses

SETTINGS = MeshSettings("example.org")
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
T1 = datetime(2024, 5, 1, 12, 5, tzinfo=UTC)


def _policy(spec: str, *, generation: int = 1, uid: str = "uid-1", name: str = "api") -> str:
    return policy_object("AuthorizationPolicy", name, spec, uid=uid, generation=generation)


BACKEND = "selector: {matchLabels: {app: backend}}"
GOOD = f"{{{BACKEND}, action: DENY, rules: [{{to: {{paths: ['/admin*']}}}}]}}"
BAD = f"{{{BACKEND}, action: DENY, rules: [{{to: {{paths: ['/a/../admin']}}}}]}}"


def _accepted(mesh: Mesh, name: str = "api") -> dict[str, Any]:
    (condition,) = mesh.statuses[("AuthorizationPolicy", "shop", name)]["conditions"]
    return dict(condition)


def _rules(mesh: Mesh) -> list[Any]:
    config = mesh.config_for("shop", "backend-v1-0")
    assert config is not None
    return [p["rules"] for p in config["policy"]["policies"]]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (BAD, "spec.rules[0].to.paths[0]: '/a/../admin' never matches, because requests are"),
        ("{action: allow}", "spec.action: 'allow' is not an action; expected ALLOW, DENY or AUDIT"),
        ("{action: DENY}", "spec.rules: is empty; expected at least one rule"),
        ("{rules: [{to: {ports: [0]}}]}", "spec.rules[0].to.ports[0]: port 0 is out of range"),
        ("{rules: [{from: {namespace: [x]}}]}", "spec.rules[0].from.namespace: unknown key"),
        ("{action: AUDIT, mode: dry-run, rules: [{}]}", "spec: an AUDIT policy never enforces"),
        (
            "{selectr: {}}",
            "spec.selectr: unknown key; expected one of action, mode, rules, selector",
        ),
        (
            "{selector: {matchExpressions: [{key: app, operator: in, values: [x]}]}}",
            "spec.selector.matchExpressions[0].operator: 'in' is not one of In, NotIn",
        ),
        ("[]", "spec: is not a mapping"),
    ],
)
def test_an_invalid_policy_says_which_field_and_is_not_sent(spec: str, message: str) -> None:
    mesh = compile_mesh(world(SHOP, _policy(spec)), SETTINGS, now=T0)
    accepted = _accepted(mesh)
    assert (accepted["status"], accepted["reason"]) == ("False", "Invalid")
    assert accepted["message"].startswith(message), accepted["message"]
    assert accepted["message"].endswith("; it is not enforced")
    assert accepted["observedGeneration"] == 1
    assert _rules(mesh) == []


def _edit(objects: dict[str, Any], spec: str, generation: int) -> dict[str, Any]:
    """The objects after `kubectl apply` of a new spec: the status stays (it is the
    status subresource's), the generation moves."""
    (edited,) = world(_policy(spec, generation=generation))["AuthorizationPolicy"].values()
    edited["status"] = objects["AuthorizationPolicy"][("shop", "api")]["status"]
    objects["AuthorizationPolicy"][("shop", "api")] = edited
    return objects


def test_a_policy_edited_into_an_invalid_one_keeps_its_previous_version() -> None:
    objects = world(SHOP, _policy(GOOD))
    good = compile_mesh(objects, SETTINGS, now=T0)
    assert _rules(good) == [[{"to": {"paths": ["/admin*"]}}]]
    write_statuses(objects, good.statuses)
    bad = compile_mesh(_edit(objects, BAD, 2), SETTINGS, good, now=T1)
    assert _rules(bad) == _rules(good)
    accepted = _accepted(bad)
    assert (accepted["status"], accepted["reason"], accepted["observedGeneration"]) == (
        "False",
        "Invalid",
        2,
    )
    assert accepted["message"].endswith("; the previous version (generation 1) stays in force")
    # Still bad in the next compile: the version in force stays recorded in the status.
    write_statuses(objects, bad.statuses)
    again = compile_mesh(objects, SETTINGS, bad, now=T1)
    assert _rules(again) == _rules(good)
    assert again.statuses == bad.statuses
    # Fixed: the new version replaces it.
    write_statuses(objects, again.statuses)
    fixed = f"{{{BACKEND}, action: DENY, rules: [{{to: {{paths: ['/admin/*']}}}}]}}"
    now_good = compile_mesh(_edit(objects, fixed, 3), SETTINGS, again, now=T1)
    assert _rules(now_good) == [[{"to": {"paths": ["/admin/*"]}}]]
    assert _accepted(now_good)["status"] == "True"
    assert now_good.statuses[("AuthorizationPolicy", "shop", "api")]["inForce"]["generation"] == 3


def test_a_new_object_under_the_same_name_does_not_inherit_the_old_one() -> None:
    good = compile_mesh(world(SHOP, _policy(GOOD)), SETTINGS)
    # Deleted and created again: a new uid, and a new object's status is empty.
    recreated = compile_mesh(world(SHOP, _policy(BAD, uid="uid-2")), SETTINGS, good)
    assert _rules(recreated) == []
    assert _accepted(recreated)["message"].endswith("; it is not enforced")
    deleted = compile_mesh(world(SHOP), SETTINGS, good)
    back_bad = compile_mesh(world(SHOP, _policy(BAD)), SETTINGS, deleted)
    assert _rules(back_bad) == []


def test_the_transition_time_moves_only_when_the_status_flips() -> None:
    objects = world(SHOP, _policy(GOOD))
    first = compile_mesh(objects, SETTINGS, now=T0)
    written = first.statuses[("AuthorizationPolicy", "shop", "api")]
    assert _accepted(first)["lastTransitionTime"] == "2024-05-01T12:00:00Z"
    objects["AuthorizationPolicy"][("shop", "api")]["status"] = written
    second = compile_mesh(objects, SETTINGS, first, now=T1)
    assert second.statuses[("AuthorizationPolicy", "shop", "api")] == written  # nothing to write
    bad = world(SHOP, _policy(BAD, generation=2))
    bad["AuthorizationPolicy"][("shop", "api")]["status"] = written
    flipped = compile_mesh(bad, SETTINGS, second, now=T1)
    assert _accepted(flipped)["lastTransitionTime"] == "2024-05-01T12:05:00Z"


def test_a_valid_policy_is_accepted() -> None:
    mesh = compile_mesh(world(SHOP, _policy(GOOD)), SETTINGS, now=T0)
    assert mesh.statuses[("AuthorizationPolicy", "shop", "api")] == {
        "observedGeneration": 1,
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "enforced by the agents of the pods it selects",
                "observedGeneration": 1,
                "lastTransitionTime": "2024-05-01T12:00:00Z",
            }
        ],
        # What is in force, for every replica to read back if the next edit is invalid.
        "inForce": {
            "generation": 1,
            "spec": {
                "selector": {"matchLabels": {"app": "backend"}},
                "action": "DENY",
                "rules": [{"to": {"paths": ["/admin*"]}}],
            },
        },
    }


@pytest.mark.parametrize(
    ("rules", "said"),
    [
        ("[{to: {ports: ['8080']}}, {to: {ports: ['8443']}}]", ", on port 8080, 8443 only: "),
        ("[{to: {ports: ['8080']}}, {to: {paths: ['/api/*']}}]", ""),  # one for every port
    ],
)
def test_an_allow_for_some_ports_says_the_others_stay_open_to_the_default(
    rules: str, said: str
) -> None:
    """Istio's ALLOW denies every port of the workload it does not match; this one governs
    the ports it names, and the status says so, as a policy copied from Istio would
    otherwise leave a metrics or admin port open to every authenticated caller."""
    spec = f"{{{BACKEND}, action: ALLOW, rules: {rules}}}"
    message = _accepted(compile_mesh(world(SHOP, _policy(spec)), SETTINGS))["message"]
    assert message.startswith("enforced by the agents of the pods it selects" + said)
    if said:
        assert message.endswith(
            "the pods' other ports follow their other ALLOW policies, or default_action"
            " (Istio would deny them); to close them, add an ALLOW for them or set"
            " default_action: deny"
        )


def _principals(count: int) -> list[dict[str, Any]]:
    return [
        {"from": {"principals": [f"spiffe://example.org/ns/shop/sa/c{i}" for i in range(count)]}}
    ]


@pytest.mark.parametrize(
    "rules",
    [
        [{}] * 200_001,  # more arrays and objects than an agent takes in a whole snapshot
        _principals(8000),  # ~320 KB: four of them would fill a pod's part of one
    ],
)
def test_a_policy_too_large_for_the_agents_is_refused_and_the_others_reach_them(
    rules: list[dict[str, Any]],
) -> None:
    """Accepted, it would have every agent it selects refuse every later snapshot."""
    objects = world(SHOP, _policy(GOOD, name="guard"), _policy("{rules: [{}]}", name="huge"))
    objects["AuthorizationPolicy"][("shop", "huge")]["spec"]["rules"] = rules
    mesh = compile_mesh(objects, SETTINGS, now=T0)
    accepted = _accepted(mesh, "huge")
    assert (accepted["status"], accepted["reason"]) == ("False", "Invalid")
    assert accepted["message"].startswith("spec.rules: the policy takes "), accepted["message"]
    assert "write fewer, broader rules" in accepted["message"]
    assert _rules(mesh) == [[{"to": {"paths": ["/admin*"]}}]]
    config = mesh.config_for("shop", "backend-v1-0")
    assert config is not None
    agent_accepts(config)


def test_a_policy_within_the_bound_is_enforced_and_the_agents_take_it() -> None:
    objects = world(SHOP, _policy("{rules: [{}]}", name="large"))
    objects["AuthorizationPolicy"][("shop", "large")]["spec"]["rules"] = _principals(5000)
    mesh = compile_mesh(objects, SETTINGS, now=T0)
    assert _accepted(mesh, "large")["status"] == "True"
    config = mesh.config_for("shop", "backend-v1-0")
    assert config is not None
    agent_accepts(config)
    assert len(_rules(mesh)[0][0]["from"]["principals"]) == 5000


def test_brackets_in_a_policys_strings_are_not_counted_as_arrays_or_objects() -> None:
    """Counted as the agent counts them (identity.jsonbounds): 3,000 rules on a header
    value with brackets are some 12,000 arrays and objects, not 21,000."""
    objects = world(SHOP, _policy("{rules: [{}]}", name="templated"))
    rule = {"when": [{"header": "x-scope", "values": ["{tenant}[0]{id}"]}]}
    objects["AuthorizationPolicy"][("shop", "templated")]["spec"]["rules"] = [rule] * 3000
    mesh = compile_mesh(objects, SETTINGS, now=T0)
    assert _accepted(mesh, "templated")["status"] == "True", _accepted(mesh, "templated")


def test_policies_that_together_are_too_large_for_a_pods_agent_say_so() -> None:
    """Each under the bound, 17 policies selecting one pod add up past what its agent
    takes: it would refuse the snapshot and keep the one it has, so none of them, nor a
    DENY added after them, is enforced there, and their statuses and the pod say so."""
    pads = [_policy("{rules: [{}]}", name=f"pad-{i}", uid=f"uid-pad-{i}") for i in range(17)]
    objects = world(SHOP, *pads, _policy(GOOD, name="no-admin", uid="uid-deny"))
    for i in range(17):
        objects["AuthorizationPolicy"][("shop", f"pad-{i}")]["spec"]["rules"] = [{}] * 12000
    mesh = compile_mesh(objects, SETTINGS, now=T0)
    for name in ("pad-0", "pad-16", "no-admin"):
        accepted = _accepted(mesh, name)
        assert (accepted["status"], accepted["reason"]) == ("False", "TooLargeTogether")
        assert accepted["message"].startswith("not enforced on the pods of "), accepted
    (warning, *_) = mesh.pod_warnings[("shop", "backend-v1-0")]
    assert warning.startswith("not configured: its configuration would take ")
    assert "arrays and objects, and an agent takes at most 4194304 and 200000" in warning
    config = mesh.config_for("shop", "backend-v1-0")
    assert config is not None
    with pytest.raises(Exception, match="more than 200000 arrays and objects"):
        agent_accepts(config)  # what its agent would say: the status is the truth
