"""What a compile costs grows with the objects, not with pods times policies: each policy's
rules are looked at once per policy, however many pods it selects."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from agent.core import policy as agent_policy
from control.core.mesh import MeshSettings, compile_mesh
from tests.cluster import pod, world

SETTINGS = MeshSettings("example.org")


@pytest.fixture
def rule_inspections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How often a rule's HTTP fields were asked for."""
    calls = [0]
    original = agent_policy.Rule.http_fields

    def counted(rule: agent_policy.Rule) -> tuple[str, ...]:
        calls[0] += 1
        return original.fget(rule)  # type: ignore[attr-defined, no-any-return]

    monkeypatch.setattr(agent_policy.Rule, "http_fields", property(counted))
    yield calls


def test_a_policy_selecting_many_pods_is_inspected_once(rule_inspections: list[int]) -> None:
    pods = "".join(pod(f"app{i}-0", labels={"app": f"app{i}", "tier": "web"}) for i in range(300))
    policies = "".join(
        f"""\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: p{i}, namespace: shop}}
spec:
  selector: {{matchLabels: {{tier: web}}}}
  action: DENY
  rules: [{{from: {{namespaces: [ns{i}]}}}}]
---
"""
        for i in range(20)
    )
    objects = world(pods, policies)
    mesh = compile_mesh(objects, SETTINGS)
    assert all(
        len(mesh.config_for("shop", f"app{i}-0")["policy"]["policies"]) == 20  # type: ignore[index]
        for i in range(300)
    )
    # Parsing a policy asks once per rule; then at most once more per policy.
    assert rule_inspections[0] <= 20 * 2
