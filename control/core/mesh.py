"""The cluster's objects, compiled once per change, answering for each pod.

`compile_mesh(objects, settings)` is pure: it validates every Outrider and
Gateway API object, indexes what pods need, and returns a `Mesh`. The shell
compiles again after each batch of watch events, then asks `config_for` for
every subscribed pod and sends what changed.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: The kinds the control plane reads, by the key `objects` holds them under.
KINDS = (
    "Pod",
    "Service",
    "EndpointSlice",
    "AuthorizationPolicy",
    "TrafficPolicy",
    "HTTPRoute",
    "GRPCRoute",
)

#: (namespace, name)
Key = tuple[str, str]
#: kind -> (namespace, name) -> the object as the API server returns it (a dict).
Objects = Mapping[str, Mapping[Key, Mapping[str, Any]]]


@dataclass(frozen=True)
class MeshSettings:
    trust_domain: str
    #: Policies in this namespace apply to every pod of the mesh.
    mesh_namespace: str = "outrider-system"
    default_action: str = "allow-authenticated"
    #: The agent's inbound mTLS listener for a pod's i-th container port is this + i.
    inbound_base: int = 15443
    #: Outbound listeners on 127.0.0.1, in the order the pod's annotation names them.
    outbound_ports: tuple[int, ...] = tuple(p for p in range(15001, 15034) if p != 15020)


@dataclass(frozen=True)
class PodIdentity:
    """What the shell checks a subscriber against: the pod its SVID may speak for."""

    namespace: str
    name: str
    service_account: str


@dataclass(frozen=True)
class Mesh:
    pods: Mapping[Key, PodIdentity] = field(default_factory=dict)
    #: (kind, namespace, name) -> the object's whole `status` as the control plane
    #: writes it (status.conditions for Outrider kinds, status.parents for routes),
    #: for every object of an Outrider or Gateway API kind it read.
    statuses: Mapping[tuple[str, str, str], Mapping[str, Any]] = field(default_factory=dict)
    #: (namespace, pod) -> what in or about the pod was skipped, and why.
    pod_warnings: Mapping[Key, tuple[str, ...]] = field(default_factory=dict)

    def config_for(self, namespace: str, pod: str) -> dict[str, Any] | None:
        """The snapshot's JSON object for this pod (agent.yaml's inbound, outbound and
        policy), or None if the pod is unknown."""
        raise NotImplementedError

    def version_for(self, namespace: str, pod: str) -> str | None:
        """`version_of(config_for(namespace, pod))`, computed once per Mesh."""
        config = self.config_for(namespace, pod)
        return None if config is None else version_of(config)


def compile_mesh(
    objects: Objects,
    settings: MeshSettings,
    previous: Mesh | None = None,
    *,
    now: datetime | None = None,
) -> Mesh:
    raise NotImplementedError


def version_of(config: Mapping[str, Any]) -> str:
    """A snapshot's version: the same configuration has the same one on every replica."""
    text = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
