"""A stand-in for control.core.mesh.compile_mesh until the real one is merged.

Pods (with their service accounts), each namespace's AuthorizationPolicies
as the pod's inline policies, and an Accepted status per policy (Invalid for
a path with a '*' before its end). TO BE DELETED once control/core
compiles for real; `PATCH` is the `python -c` program that starts
`outrider` with it in place.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from control.core.mesh import Key, Mesh, MeshSettings, Objects, PodIdentity

PATCH = """\
import runpy, sys
import control.core.mesh, tests.control_double
control.core.mesh.compile_mesh = tests.control_double.compile_mesh
sys.argv = ["outrider", *sys.argv[1:]]
runpy.run_module("outrider", run_name="__main__", alter_sys=True)
"""


@dataclass(frozen=True)
class DoubleMesh(Mesh):
    policies: Mapping[str, list[dict[str, Any]]] = field(default_factory=dict)
    default_action: str = "allow-authenticated"

    def config_for(self, namespace: str, pod: str) -> dict[str, Any] | None:
        if (namespace, pod) not in self.pods:
            return None
        return {
            "inbound": [],
            "outbound": [],
            "policy": {
                "default_action": self.default_action,
                "policies": self.policies.get(namespace, []),
            },
        }


def compile_mesh(
    objects: Objects,
    settings: MeshSettings,
    previous: Mesh | None = None,
    *,
    now: datetime | None = None,
) -> Mesh:
    pods: dict[Key, PodIdentity] = {}
    for (namespace, name), pod in objects["Pod"].items():
        account = (pod.get("spec") or {}).get("serviceAccountName") or "default"
        pods[(namespace, name)] = PodIdentity(namespace, name, account)
    policies: dict[str, list[dict[str, Any]]] = {}
    statuses: dict[tuple[str, str, str], Mapping[str, Any]] = {}
    for (namespace, name), obj in sorted(objects["AuthorizationPolicy"].items()):
        spec = obj.get("spec") or {}
        action = spec.get("action", "ALLOW")
        paths = [
            (i, j, path)
            for i, rule in enumerate(spec.get("rules") or [])
            for j, path in enumerate((rule.get("to") or {}).get("paths") or [])
            if "*" in path[:-1]
        ]
        ok = not paths
        why = "" if ok else f"spec.rules[{paths[0][0]}].to.paths[{paths[0][1]}]: '*' inside"
        condition = {
            "type": "Accepted",
            "status": "True" if ok else "False",
            "reason": "Accepted" if ok else "Invalid",
            "message": why,
            "lastTransitionTime": (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "observedGeneration": obj["metadata"].get("generation", 1),
        }
        statuses[("AuthorizationPolicy", namespace, name)] = {
            "observedGeneration": obj["metadata"].get("generation", 1),
            "conditions": [condition],
        }
        if ok:
            policy = {
                "name": f"{namespace}/{name}",
                "action": action,
                "rules": spec.get("rules") or [],
            }
            policies.setdefault(namespace, []).append(policy)
    return DoubleMesh(pods, statuses, policies=policies, default_action=settings.default_action)
