"""What a compile costs grows with the objects, not with pods times policies: each policy's
rules are looked at once per policy, however many pods it selects."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from control.core.mesh import MeshSettings, compile_mesh
from control.core.policies import CompiledPolicy
from tests.cluster import pod, world

SETTINGS = MeshSettings("example.org")


@pytest.fixture
def rule_inspections(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """How often a policy's rules were looked at for HTTP fields (agent.core.policy is
    compiled, so the count is taken where the control plane asks: `http_rules`)."""
    calls = [0]
    cached = CompiledPolicy.__dict__["http_rules"]  # a functools.cached_property
    original: Callable[[CompiledPolicy], bool] = cached.func

    def counted(policy: CompiledPolicy) -> bool:
        calls[0] += 1
        return original(policy)

    monkeypatch.setattr(cached, "func", counted)
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
    # Once per policy, however many of the 300 pods it selects.
    assert rule_inspections[0] == 20
