"""The cluster's objects, compiled once per change, answering for each pod.

`compile_mesh(objects, settings, previous, now=...)` is pure: it validates
every Outrider and Gateway API object, indexes what pods need, and returns a
`Mesh`. The shell compiles again after each batch of watch events (passing
the last Mesh as `previous` and the time), then asks `config_for` (or
`version_for`) for every subscribed pod, sends what changed, and writes each
`statuses` entry that differs from the object's status.

Each pod's config holds (CONTRACT.md, "Which listeners a pod gets"):
- `inbound`: services.py;
- `policy.policies`: the AuthorizationPolicies of the pod's namespace whose
  selector matches it, and those of the mesh namespace whose selector
  matches it (in any namespace), sorted by name; policies.py. A pod cannot
  opt out: no annotation is read for policy;
- `outbound`: one listener per entry of the `outrider.io/upstreams`
  annotation (upstreams.py), with the Service's endpoints and identities
  (services.py), split by a route (routes.py), tuned by a TrafficPolicy
  (traffic.py).

A captured pod (services.py) gets no inbound listeners; instead:
- `captured.inbound`: its default mTLS mode and the ports that differ, from
  the PeerAuthentications that apply to it (peerauth.py), and its L7 ports
  (HTTP/1.1, HTTP/2, gRPC: services.port_protocols);
- `captured.outbound`: the mesh's `outbound_traffic_policy`, and the
  ClusterIP:port of every Service port without injected endpoints (passed
  through as plain TCP);
- `outbound`: its annotation's listeners, plus one entry without `listen`
  for every other Service port of the mesh that has injected endpoints,
  addressed by its ClusterIP:ports (`destinations`). Those entries are built
  once per compile and shared by every captured pod's config (and encoded
  once per Mesh: `Mesh.encoded_for`).

An object that cannot be used is reported in its status. An
AuthorizationPolicy or TrafficPolicy edited into an invalid object keeps
its last valid version in force, and its status says so: a typo in a
security team's edit must not drop a DENY. That version is recorded in the
object's own status (`status.inForce`, inforce.py), not in `previous`, so
every replica, however recently started, compiles the same thing from the
API alone.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.core.policy import Pattern, Policy, Rule
from control.core.conditions import Meta, condition, meta, previous_conditions, summary, timestamp
from control.core.inforce import Verdict, judge, policy_status
from control.core.peerauth import (
    Mtls,
    PeerAuthentications,
    PeerAuthenticationState,
    compile_peer_authentication,
)
from control.core.policies import (
    POLICY_BYTES,
    POLICY_CONTAINERS,
    CompiledPolicy,
    Misfit,
    compile_policy,
    fit_to_ports,
    misfits,
)
from control.core.routes import CompiledRoute, RouteKind, attach_routes, compile_route
from control.core.services import (
    PodIndex,
    Service,
    Workload,
    port_protocols,
    read_service,
    read_workload,
    slice_service,
)
from control.core.snapshot import AGENT_SNAPSHOT_BYTES, AGENT_SNAPSHOT_CONTAINERS, encode
from control.core.traffic import CompiledTraffic, TrafficState, attach_traffic, compile_traffic
from control.core.upstreams import ANNOTATION, PortKey, Upstreams
from identity.appprotocol import Protocol
from identity.injected import (
    AGENT_PORTS,
    INBOUND_CAPTURE_PORT,
    OUTBOUND_CAPTURE_PORT,
    OUTBOUND_LISTENER_PORTS,
    STATUS_PORT,
)
from identity.jsonbounds import containers

__all__ = [
    "KINDS",
    "Mesh",
    "MeshSettings",
    "PodIdentity",
    "compile_mesh",
    "encode",
    "version_of",
]

#: The kinds the control plane reads, by the key `objects` holds them under.
KINDS = (
    "Pod",
    "Service",
    "EndpointSlice",
    "AuthorizationPolicy",
    "PeerAuthentication",
    "TrafficPolicy",
    "HTTPRoute",
    "GRPCRoute",
)

#: (namespace, name)
Key = tuple[str, str]
#: kind -> (namespace, name) -> the object as the API server returns it (a dict).
Objects = Mapping[str, Mapping[Key, Mapping[str, Any]]]
#: (kind, namespace, name)
StatusKey = tuple[str, str, str]


@dataclass(frozen=True)
class MeshSettings:
    trust_domain: str
    #: Policies in this namespace apply to every pod of the mesh.
    mesh_namespace: str = "outrider-system"
    default_action: str = "allow-authenticated"
    #: The agent's inbound mTLS listener for a pod's i-th container port is this + i.
    inbound_base: int = 15443
    #: Outbound listeners on 127.0.0.1, in the order the pod's annotation names them: 32,
    #: around the agent's capture ports and status port.
    outbound_ports: tuple[int, ...] = tuple(
        p
        for p in OUTBOUND_LISTENER_PORTS
        if p not in (INBOUND_CAPTURE_PORT, OUTBOUND_CAPTURE_PORT, STATUS_PORT)
    )
    #: What a captured pod's agent does with a connection to an address outside the mesh
    #: and the registry: pass it through (allow-any) or refuse it (registry-only).
    outbound_traffic_policy: str = "allow-any"


@dataclass(frozen=True)
class PodIdentity:
    """What the shell checks a subscriber against: the pod its SVID may speak for."""

    namespace: str
    name: str
    service_account: str


@dataclass(frozen=True)
class _Memory:
    """What one compile hands the next: validation already done. A cache only: what is
    in force comes from the objects (their status.inForce), never from here."""

    settings: MeshSettings | None = None
    #: (kind, namespace, name, uid, resourceVersion) -> what was read or compiled from it
    #: (without a resourceVersion: generation, spec and status.inForce as JSON instead).
    compiled: Mapping[tuple[str, ...], Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Mesh:
    pods: Mapping[Key, PodIdentity] = field(default_factory=dict)
    #: (kind, namespace, name) -> the object's whole `status` as the control plane
    #: writes it (status.conditions, and status.inForce for the version in force, for
    #: Outrider kinds; status.parents for routes), for every object of an Outrider kind
    #: it read and every route with a Service parent. Write those that differ from the
    #: object's own status, replacing it whole (not a merge patch: see
    #: inforce.policy_status): the next compile reads status.inForce back.
    statuses: Mapping[StatusKey, Mapping[str, Any]] = field(default_factory=dict)
    #: (namespace, pod) -> what in or about the pod was skipped, and why: a bad
    #: `outrider.io/upstreams` entry, a Service port that targets no container port.
    #: Pods have no status to write these to; the shell logs them and shows them.
    pod_warnings: Mapping[Key, tuple[str, ...]] = field(default_factory=dict)
    _configs: Mapping[Key, Mapping[str, Any]] = field(default_factory=dict, repr=False)
    _memory: _Memory = field(default_factory=_Memory, repr=False, compare=False)
    _versions: dict[int, str] = field(default_factory=dict, repr=False, compare=False)
    #: id(outbound entry) -> its encoding; the entries live as long as the Mesh's configs.
    _pieces: dict[int, bytes] = field(default_factory=dict, repr=False, compare=False)
    #: What about the whole mesh was skipped, and why (logged once by the shell, shown in
    #: /debug): the Services left out of captured pods' snapshots (upstreams.py).
    warnings: tuple[str, ...] = ()
    #: (namespace, Service) left out of every captured pod's snapshot to keep it within
    #: what an agent takes.
    left_out: tuple[Key, ...] = ()

    def config_for(self, namespace: str, pod: str) -> dict[str, Any] | None:
        """The snapshot's JSON object for this pod (agent.yaml's inbound, outbound and
        policy), or None if the pod is unknown. Shared with the Mesh: do not modify it."""
        config = self._configs.get((namespace, pod))
        return None if config is None else dict(config)

    def version_for(self, namespace: str, pod: str) -> str | None:
        """`version_of(config_for(namespace, pod))`, computed once per Mesh and config
        (the pods of a ReplicaSet share theirs)."""
        config = self._configs.get((namespace, pod))
        if config is None:
            return None
        if id(config) not in self._versions:
            self._versions[id(config)] = _digest(self._encode(config))
        return self._versions[id(config)]

    def encoded_for(self, namespace: str, pod: str) -> bytes | None:
        """`encode(config_for(namespace, pod))`: what the shell sends, byte for byte."""
        config = self._configs.get((namespace, pod))
        return None if config is None else self._encode(config)

    def _encode(self, config: Mapping[str, Any]) -> bytes:
        """`encode(config)`, with each outbound entry encoded once per Mesh: every captured
        pod's config holds the same mesh-wide entries (a thousand, for 500 Services), and
        encoding them again for every config would cost most of a compile."""
        pieces = self._pieces
        parts = []
        for key in sorted(config):
            value = config[key]
            if key == "outbound":
                try:  # a thousand lookups at C speed: no Python loop per entry
                    text = b"[" + b",".join(map(pieces.__getitem__, map(id, value))) + b"]"
                except KeyError:
                    for entry in value:
                        if id(entry) not in pieces:
                            pieces[id(entry)] = encode(entry)
                    text = b"[" + b",".join(map(pieces.__getitem__, map(id, value))) + b"]"
            else:
                text = encode(value)
            parts.append(encode(key) + b":" + text)
        return b"{" + b",".join(parts) + b"}"


def version_of(config: Mapping[str, Any]) -> str:
    """A config's version: the same content gives the same version on every replica."""
    return _digest(encode(config))


def _digest(encoded: bytes) -> str:
    return hashlib.sha256(encoded).hexdigest()[:16]


def compile_mesh(
    objects: Objects,
    settings: MeshSettings,
    previous: Mesh | None = None,
    *,
    now: datetime | None = None,
) -> Mesh:
    """Every object read, every injected pod's config built, every status written.

    `previous`: the Mesh compiled before, to skip validating unchanged objects
    (a cache: the result is the same without it). `now`: the time a
    condition that changes status records (lastTransitionTime).
    """
    return _Compiler(objects, settings, previous, timestamp(now)).mesh()


class _Compiler:
    """One compile: indexes first, then statuses, then each pod's config."""

    def __init__(
        self, objects: Objects, settings: MeshSettings, previous: Mesh | None, now: str
    ) -> None:
        self.objects = objects
        self.settings = settings
        self.now = now
        memory = previous._memory if previous is not None else _Memory()
        self.memory = memory if memory.settings == settings else _Memory()
        self.compiled: dict[tuple[str, ...], Any] = {}
        self.statuses: dict[StatusKey, Mapping[str, Any]] = {}
        self.warnings: dict[Key, list[str]] = defaultdict(list)
        self.workloads: dict[Key, Workload] = {}
        self.services: dict[Key, Service] = {}
        self.slices: dict[Key, list[Mapping[str, Any]]] = defaultdict(list)
        self.fitted: dict[tuple[Any, ...], tuple[Mapping[str, Any], tuple[Misfit, ...]]] = {}
        self.shapes: dict[
            tuple[Any, ...], tuple[Mapping[str, Any], list[str], list[Any], str | None]
        ] = {}
        #: id(a part as sent: a policy, an outbound entry, a list of them) -> (bytes,
        #: arrays and objects) encoded; each part lives as long as the compile
        self.measured: dict[int, tuple[int, int]] = {}
        #: policy -> the owners of the pods its agents would refuse a snapshot of
        self.overflowing: dict[Key, set[str]] = defaultdict(set)

    def mesh(self) -> Mesh:
        self.read_world()
        policies = self.policies()
        self.peer = self.peer_authentications()
        traffic = self.traffic()
        routes = self.routes()
        self.upstreams = Upstreams(
            self.settings,
            self.services,
            self.slices,
            self.workloads,
            traffic,
            routes,
            self.warnings,
        )
        configs: dict[Key, Mapping[str, Any]] = {}
        misfit_notes: dict[Key, set[_Note]] = defaultdict(set)
        for key, workload in self.workloads.items():
            configs[key] = self.config(workload, policies, misfit_notes)
        self.finish_policy_statuses(misfit_notes)
        return Mesh(
            {
                k: PodIdentity(w.namespace, w.name, w.service_account)
                for k, w in self.workloads.items()
            },
            self.statuses,
            {
                k: tuple(sorted(set(v), key=_warning_order))
                for k, v in sorted(self.warnings.items())
                if v
            },
            configs,
            _Memory(self.settings, self.compiled),
            _pieces=self.upstreams.encoded(),
            warnings=tuple(self.upstreams.warnings_mesh_wide()),
            left_out=tuple(self.upstreams.left_out()),
        )

    # -- the world ---------------------------------------------------------------------

    def read_world(self) -> None:
        for key, obj in self.objects.get("Pod", {}).items():
            workload = self.recall(
                "Pod", key, obj, lambda o=obj, k=key: read_workload(o, k) or False
            )
            if workload:
                self.workloads[workload.key] = workload
        self.index = PodIndex(self.workloads.values())
        for key, obj in self.objects.get("Service", {}).items():
            service = self.recall("Service", key, obj, lambda o=obj, k=key: read_service(o, k))
            self.services[(service.namespace, service.name)] = service
        for key, obj in self.objects.get("EndpointSlice", {}).items():
            name = slice_service(obj)
            if name is not None:
                namespace = (obj.get("metadata") or {}).get("namespace") or key[0]
                self.slices[(namespace, name)].append(obj)
        # What each of a pod's L7 ports speaks: its Service ports' appProtocol.
        self.l7_ports = port_protocols(self.services.values(), self.index, self.warnings)

    def recall(self, kind: str, key: Key, obj: Mapping[str, Any], make: Any) -> Any:
        """`make()`, or what it gave for this very object in the previous compile.

        An object is the same while its uid and resourceVersion are (the API
        server changes the version with every write, status writes too); without
        a version, the same generation, spec and recorded version in force. Pods
        and Services without one are read again.
        """
        m = obj.get("metadata") or {}
        uid, version = str(m.get("uid") or ""), str(m.get("resourceVersion") or "")
        if version:
            cache_key: tuple[str, ...] = (kind, *key, uid, version)
        elif kind in ("Pod", "Service"):
            return make()
        else:
            read = [obj.get("spec"), (obj.get("status") or {}).get("inForce")]
            text = json.dumps(read, sort_keys=True, default=str)
            cache_key = (kind, *key, uid, str(m.get("generation")), text)
        result = self.memory.compiled.get(cache_key)
        if result is None:
            result = make()
        self.compiled[cache_key] = result
        return result

    # -- AuthorizationPolicy -------------------------------------------------------------

    def policies(self) -> dict[Key, list[CompiledPolicy]]:
        """pod -> the policies in force that select it, sorted by name."""
        valid: list[CompiledPolicy] = []
        self.policy_objects: dict[Key, tuple[Meta, Mapping[str, Any], Verdict[CompiledPolicy]]] = {}
        mesh_namespace = self.settings.mesh_namespace
        for key, obj in self.objects.get("AuthorizationPolicy", {}).items():
            m = meta(obj, key)
            verdict: Verdict[CompiledPolicy] = self.recall(
                "AuthorizationPolicy",
                key,
                obj,
                lambda o=obj, m=m: judge(o, m, lambda o, m: compile_policy(o, m, mesh_namespace)),
            )
            self.policy_objects[(m.namespace, m.name)] = (m, obj, verdict)
            if verdict.in_force is not None:
                valid.append(verdict.in_force)
        selected: dict[Key, list[CompiledPolicy]] = defaultdict(list)
        for policy in sorted(valid, key=lambda p: str(p.document["name"])):
            scope = None if policy.mesh_wide else policy.namespace
            for workload in self.index.select(policy.selector, scope):
                selected[workload.key].append(policy)
        return selected

    def pod_policies(
        self,
        selected: Sequence[CompiledPolicy],
        inbound: Sequence[tuple[int, str]],
    ) -> tuple[list[Mapping[str, Any]], list[tuple[Key, Misfit]]]:
        """The policies as sent to the pod, and the rules fitted to its TCP ports (a rule's
        paths and methods are checked on every L7 port: HTTP/1.1, HTTP/2 and gRPC alike)."""
        tcp = frozenset(port for port, protocol in inbound if protocol == "tcp")
        l7 = frozenset(port for port, protocol in inbound if protocol != "tcp")
        documents = []
        fitted: list[tuple[Key, Misfit]] = []
        for policy in selected:
            if not (tcp and policy.http_rules):
                documents.append(policy.document)
                continue
            document, found = self.fit(policy, tcp, l7)
            documents.append(document)
            fitted += [((policy.namespace, policy.name), misfit) for misfit in found]
        return documents, fitted

    def fit(
        self, policy: CompiledPolicy, tcp: frozenset[int], l7: frozenset[int]
    ) -> tuple[Mapping[str, Any], tuple[Misfit, ...]]:
        """The policy as sent to a pod with these ports; pods of one Deployment share it."""
        key = (policy.namespace, policy.name, tcp, l7)
        if key not in self.fitted:
            found = misfits(policy.policy, tcp)
            document = fit_to_ports(policy, tcp, l7) if found else policy.document
            self.fitted[key] = (document, found)
        return self.fitted[key]

    def finish_policy_statuses(self, notes: Mapping[Key, set[_Note]]) -> None:
        for key, (m, obj, verdict) in self.policy_objects.items():
            previous = previous_conditions(obj)
            if verdict.errors:
                tail = (
                    f"; the previous version (generation {verdict.generation}) stays in force"
                    if verdict.in_force is not None
                    else "; it is not enforced"
                )
                ok, reason, message = False, "Invalid", summary(verdict.errors) + tail
            elif self.overflowing.get(key):
                owners = sorted(self.overflowing[key])
                more = f" and {len(owners) - 3} more" if len(owners) > 3 else ""
                shown = ", ".join(owners[:3]) + more
                ok, reason = False, "TooLargeTogether"
                message = (
                    f"not enforced on the pods of {shown}: with the other policies that select"
                    " them, their configuration would be more than an agent takes, so their"
                    " agents keep the one they had (their warnings in /debug/config say how"
                    " large). Write fewer, broader rules, or select fewer pods"
                )
            elif notes.get(key):
                assert verdict.in_force is not None
                action = verdict.in_force.policy.action
                ok, reason = True, "HTTPRulesOnTCPPorts"
                message = (
                    f"{_misfit_summary(notes[key])}. HTTP fields never match on TCP, so there"
                    f" {_ON_TCP[action]}."
                    " Set appProtocol (http, kubernetes.io/h2c or grpc) on the Service port"
                    " that targets it, or list the rule's HTTP ports in to.ports"
                )
            else:
                assert verdict.in_force is not None
                ok, reason = True, "Accepted"
                message = "enforced by the agents of the pods it selects" + _other_ports(
                    verdict.in_force.policy
                )
            accepted = condition("Accepted", ok, reason, message, m.generation, previous, self.now)
            self.statuses[("AuthorizationPolicy", m.namespace, m.name)] = policy_status(
                m, accepted, verdict
            )

    # -- PeerAuthentication ---------------------------------------------------------------

    def peer_authentications(self) -> PeerAuthentications:
        states = []
        mesh_namespace = self.settings.mesh_namespace
        for key, obj in sorted(self.objects.get("PeerAuthentication", {}).items()):
            m = meta(obj, key)
            verdict: Verdict[Any] = self.recall(
                "PeerAuthentication",
                key,
                obj,
                lambda o=obj, m=m: judge(
                    o, m, lambda o, m: compile_peer_authentication(o, m, mesh_namespace)
                ),
            )
            states.append(PeerAuthenticationState(m, obj, verdict))
        peer = PeerAuthentications(states, mesh_namespace, self.index)
        for (namespace, name), status in peer.statuses(self.now).items():
            self.statuses[("PeerAuthentication", namespace, name)] = status
        return peer

    # -- TrafficPolicy, HTTPRoute, GRPCRoute ---------------------------------------------

    def traffic(self) -> dict[PortKey, CompiledTraffic]:
        """(namespace, service, port) -> the TrafficPolicy that applies there."""
        states = []
        for key, obj in sorted(self.objects.get("TrafficPolicy", {}).items()):
            m = meta(obj, key)
            verdict: Verdict[CompiledTraffic] = self.recall(
                "TrafficPolicy", key, obj, lambda o=obj, m=m: judge(o, m, compile_traffic)
            )
            states.append(TrafficState(m, obj, verdict))
        winners, statuses = attach_traffic(states, self.services, self.now)
        for (namespace, name), status in statuses.items():
            self.statuses[("TrafficPolicy", namespace, name)] = status
        return winners

    def routes(self) -> dict[PortKey, CompiledRoute]:
        """(namespace, service, port) -> the route that splits its traffic."""
        compiled: list[tuple[Mapping[str, Any], CompiledRoute]] = []
        kinds: tuple[RouteKind, ...] = ("HTTPRoute", "GRPCRoute")
        for kind in kinds:
            for key, obj in sorted(self.objects.get(kind, {}).items()):
                m = meta(obj, key)
                route = self.recall(
                    kind, key, obj, lambda k=kind, o=obj, m=m: compile_route(k, o, m)
                )
                compiled.append((obj, route))
        winners, statuses = attach_routes(compiled, self.services, self.now)
        self.statuses.update(statuses)
        return winners

    # -- each pod -------------------------------------------------------------------------

    def config(
        self,
        workload: Workload,
        policies: Mapping[Key, list[CompiledPolicy]],
        notes: dict[Key, set[_Note]],
    ) -> Mapping[str, Any]:
        """The pod's config; the pods of one ReplicaSet share one (same namespace, labels,
        ports and annotation: the same policies, listeners and upstreams)."""
        shape = (
            workload.captured,
            workload.namespace,
            tuple(sorted(workload.labels.items())),
            workload.ports,
            tuple(sorted(workload.port_names.items())),
            workload.annotations.get(ANNOTATION, ""),
        )
        if shape not in self.shapes:
            self.shapes[shape] = self.build_config(workload, policies)
        config, warnings, fitted, too_large = self.shapes[shape]
        self.warnings[workload.key].extend(warnings)
        for policy, misfit in fitted:  # formatted once per policy, in its status
            notes[policy].add((misfit.rule, misfit.fields, misfit.tcp_ports, workload.owner))
        if too_large is not None:
            for selecting in policies.get(workload.key, ()):
                self.overflowing[(selecting.namespace, selecting.name)].add(workload.owner)
        return config

    def build_config(
        self, workload: Workload, policies: Mapping[Key, list[CompiledPolicy]]
    ) -> tuple[Mapping[str, Any], list[str], list[tuple[Key, Misfit]], str | None]:
        l7 = self.l7_ports.get(workload.key, {})
        base = self.settings.inbound_base
        mtls = self.peer.mtls_for(workload) if workload.captured else None
        if mtls is not None:  # the agent takes every port: listeners are not counted
            # The ports its snapshot names count too (an L7 port or a mode override need
            # not be a declared containerPort): the policies are fitted to each, as the
            # agent checks them (an HTTP rule on a TCP port).
            served = list(dict.fromkeys([*workload.ports, *sorted(l7), *mtls.ports]))
        else:
            served = [port for port in workload.ports if workload.listener(port, base) is not None]
        inbound: list[tuple[int, Protocol]] = [(port, l7.get(port, "tcp")) for port in served]
        if workload.captured:
            outbound, warnings = self.upstreams.captured(workload)
        else:
            outbound, warnings = self.upstreams.listeners(workload)
        if mtls is None and len(served) < len(workload.ports):
            left = workload.ports[len(served) :]
            warnings = [
                f"containerPort {', '.join(map(str, left[:5]))}"
                f"{f' and {len(left) - 5} more' if len(left) > 5 else ''}: no inbound listener;"
                f" the agent's listeners {base}-{AGENT_PORTS[-1]} fit {len(served)} ports",
                *warnings,
            ]
        documents, fitted = self.pod_policies(policies.get(workload.key, ()), inbound)
        config: dict[str, Any] = {
            "inbound": [
                {"listen": f"0.0.0.0:{base + i}", "app": f"127.0.0.1:{port}", "protocol": protocol}
                for i, (port, protocol) in enumerate(inbound)
            ],
            "outbound": outbound,
            "policy": {"default_action": self.settings.default_action, "policies": documents},
        }
        if mtls is not None:
            config["inbound"] = []  # the inbound capture port serves them all
            config["captured"] = self.captured(mtls, l7)
        too_large, blamed = self.too_large(config, documents)
        if too_large is not None:
            warnings = [too_large, *warnings]
        return config, warnings, fitted, too_large if blamed else None

    def too_large(
        self, config: Mapping[str, Any], documents: Sequence[Mapping[str, Any]]
    ) -> tuple[str | None, bool]:
        """Why the pod's agent would refuse `config` whole (past AGENT_SNAPSHOT_BYTES or
        _CONTAINERS), or None; and whether its policies are to blame (they take more than
        one policy may: each is bounded, POLICY_BYTES, but those of one pod add up). The
        whole config is measured, from parts measured once per compile (snapshot_size):
        the shares of snapshot.py bound the mesh-wide entries and the annotation's
        listeners, but not what Services make of the pod's own ports."""
        sizes = [self.measure(document) for document in documents]
        size, held = sum(s for s, _ in sizes), sum(c for _, c in sizes)
        whole, total = self.snapshot_size(config, documents)
        if whole <= AGENT_SNAPSHOT_BYTES and total <= AGENT_SNAPSHOT_CONTAINERS:
            return None, False
        said = (
            f"not configured: its configuration would take {whole} bytes and {total}"
            f" arrays and objects, and an agent takes at most {AGENT_SNAPSHOT_BYTES} and"
            f" {AGENT_SNAPSHOT_CONTAINERS}: it refuses the snapshot and keeps the one it has."
        )
        if size <= POLICY_BYTES and held <= POLICY_CONTAINERS:
            ports = len(config.get("captured", {}).get("inbound", {}).get("ports", {}))
            return (
                f"{said} Its policies take {size} bytes; the rest is its listeners and the"
                f" {ports} ports Services give it a protocol or mode on: select it with"
                " fewer Service ports",
                False,
            )
        largest = sorted(zip(sizes, documents, strict=True), key=lambda pair: -pair[0][0])[:3]
        named = ", ".join(f"{d['name']} ({s} bytes)" for (s, _), d in largest)
        return (
            f"{said} The {len(documents)} policies that select the pod take {size} bytes and"
            f" {held} arrays and objects; the largest: {named}",
            True,
        )

    def snapshot_size(
        self, config: Mapping[str, Any], documents: Sequence[Mapping[str, Any]]
    ) -> tuple[int, int]:
        """`len(encode(config))` and its arrays and objects, added up from parts measured
        once per compile: its policies, and its outbound entries, which every captured
        pod's config shares (encoding each pod's whole config took seconds a compile)."""
        outbound = config.get("outbound") or []
        policy = config["policy"]
        shell = encode({**config, "outbound": [], "policy": {**policy, "policies": []}})
        size, held = len(shell), containers(shell)
        for items in (outbound, documents):
            if id(items) not in self.measured:  # captured pods share one outbound list
                parts = [self.measure(item) for item in items]
                self.measured[id(items)] = (
                    sum(s for s, _ in parts) + max(len(parts) - 1, 0),  # the commas
                    sum(c for _, c in parts),
                )
            items_size, items_held = self.measured[id(items)]
            size, held = size + items_size, held + items_held
        return size, held

    def measure(self, document: Mapping[str, Any]) -> tuple[int, int]:
        """A part's (bytes, arrays and objects) as sent (a policy, an outbound entry);
        once per part."""
        if id(document) not in self.measured:
            encoded = encode(document)
            self.measured[id(document)] = (len(encoded), containers(encoded))
        return self.measured[id(document)]

    def captured(self, mtls: Mtls, l7: Mapping[int, Protocol]) -> dict[str, Any]:
        """The `captured` section: the pod's inbound modes and L7 ports, and what its
        agent does with a destination outside the mesh."""
        ports: dict[int, dict[str, str]] = {port: {"protocol": p} for port, p in l7.items()}
        for port, mode in mtls.ports.items():
            ports.setdefault(port, {})["mtls"] = mode
        return {
            "inbound": {
                "mtls": mtls.default,
                "ports": {str(port): ports[port] for port in sorted(ports)},
            },
            "outbound": {
                "policy": self.settings.outbound_traffic_policy,
                "passthrough": self.upstreams.mesh_wide.passthrough,
            },
        }


#: A rule with HTTP fields on TCP ports of a workload: (rule, fields, ports, owner).
_Note = tuple[str, tuple[str, ...], tuple[int, ...], str]


def _misfit_summary(notes: set[_Note], limit: int = 3) -> str:
    """The first few in order, and how many more: a policy may select thousands of pods,
    so only what is shown is formatted."""
    shown = [
        f"rule {rule!r} uses {', '.join(fields)} and applies to TCP port"
        f" {', '.join(map(str, ports))} of {owner}"
        for rule, fields, ports, owner in sorted(notes)[:limit]
    ]
    more = len(notes) - len(shown)
    return "; ".join(shown) + (f"; and {more} more" if more else "")


def _other_ports(policy: Policy) -> str:
    """What an ALLOW whose every rule names `to.ports` leaves to other policies: Istio's
    ALLOW denies the workload's other ports too, this one does not (docs/policy.md)."""
    if policy.action != "ALLOW" or not policy.rules:
        return ""
    listed = sorted({int(p.text) for r in policy.rules for p in _port_patterns(r)})
    if not listed or not all(_port_patterns(r) for r in policy.rules):
        return ""
    shown = ", ".join(map(str, listed[:10])) + (" ..." if len(listed) > 10 else "")
    return (
        f", on port {shown} only: the pods' other ports follow their other ALLOW policies,"
        " or default_action (Istio would deny them); to close them, add an ALLOW for them"
        " or set default_action: deny"
    )


def _port_patterns(rule: Rule) -> list[Pattern]:
    return [p for c in rule.conditions if c.field == "ports" and not c.negated for p in c.patterns]


_ON_TCP = {
    "ALLOW": "the rule allows nothing",
    "DENY": "the rule denies every connection its other fields match",
    "AUDIT": "the rule records nothing",
}


def _warning_order(warning: str) -> tuple[int, str]:
    """The annotation's entries in their order, then the rest: the same order every compile."""
    match = _ENTRY.match(warning)
    return (int(match[1]), "") if match else (1 << 30, warning)


_ENTRY = re.compile(re.escape(ANNOTATION) + r"\[([0-9]+)\]")
