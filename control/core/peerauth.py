"""PeerAuthentication objects -> how each captured pod's agent takes inbound connections.

A captured pod's agent receives every inbound TCP connection, to whatever
port of the pod it was sent. `STRICT` (the default) lets through only mTLS
from an SVID; `PERMISSIVE` also lets plaintext through to the app (for a
migration: callers without an agent yet), counted by the agent. A
PeerAuthentication says which, for the whole mesh, a namespace or some pods:

- in the mesh namespace, without a selector: every pod of the mesh;
- in any other namespace, without a selector: that namespace's pods;
- with a selector (`matchLabels`): the pods it matches, in its namespace (in
  every namespace for one in the mesh namespace, as for AuthorizationPolicy).

The most specific wins, per port: a pod's mode on port P is the workload
policy's `portLevelMtls[P]`, else its `mtls.mode`, else the namespace
policy's, then the mesh policy's, else STRICT. A policy that leaves `mtls`
out says nothing for its level (the next one decides). Two policies of one
level for the same pod: the oldest (creationTimestamp, then namespace and
name) applies, and the other's status says `Conflicted`.

An edit into an invalid object keeps the last valid version in force
(inforce.py): a typo in a security team's edit must neither open a namespace
to plaintext nor shut out the callers a migration still needs.

It has effect on captured pods only: a pod without capture takes calls on
its explicit mTLS listeners alone, which nothing makes permissive.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agent.core.captured import MTLS_MODES, MtlsMode
from control.core.conditions import Meta, condition, previous_conditions, summary
from control.core.inforce import Verdict, policy_status
from control.core.selectors import Selector
from control.core.services import PodIndex, Workload
from identity.injected import AGENT_PORTS

__all__ = [
    "DEFAULT_MODE",
    "CompiledPeerAuthentication",
    "Mtls",
    "PeerAuthenticationState",
    "PeerAuthentications",
    "compile_peer_authentication",
]

Mode = MtlsMode
Level = Literal["mesh", "namespace", "workload"]
Key = tuple[str, str]

#: What a pod gets that no PeerAuthentication selects.
DEFAULT_MODE: Mode = "strict"
_MODES: Mapping[str, Mode] = {mode.upper(): mode for mode in MTLS_MODES}
_SPEC_KEYS = ("selector", "mtls", "portLevelMtls")


@dataclass(frozen=True)
class CompiledPeerAuthentication:
    namespace: str
    name: str
    created: str
    level: Level
    #: None for the mesh and namespace levels.
    selector: Selector | None
    #: None: this policy leaves the mode to the level above.
    mode: Mode | None
    #: Original destination port -> its mode, over `mode`.
    ports: Mapping[int, Mode] = field(default_factory=dict)

    @property
    def rank(self) -> tuple[str, str, str]:
        """The older applies: creationTimestamp, then namespace and name."""
        return (self.created, self.namespace, self.name)

    def mode_on(self, port: int) -> Mode | None:
        return self.ports.get(port, self.mode)


@dataclass(frozen=True)
class Mtls:
    """A pod's inbound modes: the default, and the ports where it differs."""

    default: Mode = DEFAULT_MODE
    ports: Mapping[int, Mode] = field(default_factory=dict)


def compile_peer_authentication(
    obj: Mapping[str, Any], m: Meta, mesh_namespace: str
) -> CompiledPeerAuthentication | list[str]:
    """The compiled policy, or every problem as `field.path: problem`."""
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        return ["spec: is not a mapping; expected selector, mtls and portLevelMtls"]
    errors = [
        f"spec.{key}: unknown key; expected one of {', '.join(_SPEC_KEYS)}"
        for key in spec
        if key not in _SPEC_KEYS
    ]
    selector = _selector(spec.get("selector"), errors)
    mode = None
    if spec.get("mtls") is not None:
        mode = _mode(spec["mtls"], "spec.mtls", errors, required=False)
    ports: dict[int, Mode] = {}
    raw_ports = spec.get("portLevelMtls")
    if raw_ports is not None and not isinstance(raw_ports, Mapping):
        errors.append('spec.portLevelMtls: is not a mapping; expected {"8080": {mode: ...}}')
    for text, item in (raw_ports or {}).items() if isinstance(raw_ports, Mapping) else ():
        path = f"spec.portLevelMtls.{text}"
        port = _port(str(text), path, errors)
        port_mode = _mode(item, path, errors, required=True)
        if port is not None and port_mode is not None:
            ports[port] = port_mode
    if errors:
        return errors
    level: Level = (
        "workload"
        if selector is not None
        else "mesh"
        if m.namespace == mesh_namespace
        else "namespace"
    )
    return CompiledPeerAuthentication(
        m.namespace, m.name, m.created, level, selector, mode, dict(sorted(ports.items()))
    )


def _selector(raw: object, errors: list[str]) -> Selector | None:
    """matchLabels only, as Istio's. A selector by no label is refused, not read as the
    whole namespace: written so, it says the opposite of what it means (some pods),
    and it is what an unsupported field (matchExpressions) or a misspelt one leaves
    behind wherever a schema drops it."""
    if raw is None:
        return None
    before = len(errors)
    if not isinstance(raw, Mapping):
        errors.append("spec.selector: is not a mapping; expected matchLabels")
        return None
    errors.extend(
        f"spec.selector.{key}: unknown key; expected matchLabels"
        for key in raw
        if key != "matchLabels"
    )
    labels = raw.get("matchLabels") or {}
    if not isinstance(labels, Mapping):
        errors.append("spec.selector.matchLabels: is not a mapping; expected label: value pairs")
        return None
    bad = [key for key, value in labels.items() if not isinstance(value, str)]
    errors.extend(
        f"spec.selector.matchLabels.{key}: {labels[key]!r} is not a string; quote label values"
        for key in bad
    )
    if not labels and len(errors) == before:
        errors.append(
            "spec.selector: selects by no label; leave selector out for every pod of the namespace"
        )
    if bad or not labels:
        return None
    return Selector.of_labels({str(k): v for k, v in labels.items()})


def _mode(raw: object, path: str, errors: list[str], *, required: bool) -> Mode | None:
    if not isinstance(raw, Mapping):
        errors.append(f"{path}: is not a mapping; expected {{mode: STRICT or PERMISSIVE}}")
        return None
    errors.extend(f"{path}.{key}: unknown key; expected mode" for key in raw if key != "mode")
    mode = raw.get("mode")
    if mode is None and not required:
        return None
    if mode not in _MODES:
        errors.append(f"{path}.mode: {mode!r} is not one of {', '.join(_MODES)}")
        return None
    return _MODES[str(mode)]


def _port(text: str, path: str, errors: list[str]) -> int | None:
    """A port as written in decimal, once: "08080" or another script's digits would be a
    second key for port 8080, and which of two keys applied would depend on their order."""
    if not (text.isascii() and text.isdecimal() and text == str(int(text))):
        errors.append(f"{path}: {text!r} is not a port number (1-65535)")
        return None
    if not 0 < int(text) < 65536:
        errors.append(f"{path}: {text!r} is not a port number (1-65535)")
        return None
    port = int(text)
    if port in AGENT_PORTS:
        errors.append(
            f"{path}: {port} is in the agent's own range ({AGENT_PORTS.start}-"
            f"{AGENT_PORTS.stop - 1}), where no app port is captured"
        )
        return None
    return port


@dataclass(frozen=True)
class PeerAuthenticationState:
    """One object as this compile found it."""

    meta: Meta
    obj: Mapping[str, Any]
    verdict: Verdict[CompiledPeerAuthentication]

    @property
    def policy(self) -> CompiledPeerAuthentication | None:
        return self.verdict.in_force


class PeerAuthentications:
    """Every PeerAuthentication of a compile: which applies to each pod, and each status.

    The mesh and namespace levels are decided once; the workload level per pod
    that some selector matches (through the PodIndex, so a selector looks at
    few pods)."""

    def __init__(
        self,
        states: Sequence[PeerAuthenticationState],
        mesh_namespace: str,
        index: PodIndex,
    ) -> None:
        self.states = list(states)
        valid = sorted(
            (s.policy for s in self.states if s.policy is not None), key=lambda p: p.rank
        )
        self.mesh: CompiledPeerAuthentication | None = None
        self.namespaces: dict[str, CompiledPeerAuthentication] = {}
        #: policy (namespace, name) -> the older policy that applies instead, at its level.
        self.beaten: dict[Key, set[Key]] = defaultdict(set)
        self.won: set[Key] = set()
        self.selected: dict[Key, int] = defaultdict(int)  # workload policies: pods matched
        self.workloads: dict[Key, CompiledPeerAuthentication] = {}
        for policy in valid:  # oldest first: the first of a level is the one that applies
            if policy.level == "mesh":
                self._claim(policy, self.mesh)
                self.mesh = self.mesh or policy
            elif policy.level == "namespace":
                self._claim(policy, self.namespaces.get(policy.namespace))
                self.namespaces.setdefault(policy.namespace, policy)
            else:
                assert policy.selector is not None
                scope = None if policy.namespace == mesh_namespace else policy.namespace
                for workload in index.select(policy.selector, scope):
                    self.selected[(policy.namespace, policy.name)] += 1
                    self._claim(policy, self.workloads.get(workload.key))
                    self.workloads.setdefault(workload.key, policy)

    def _claim(
        self, policy: CompiledPeerAuthentication, holder: CompiledPeerAuthentication | None
    ) -> None:
        key = (policy.namespace, policy.name)
        if holder is None:
            self.won.add(key)
        else:
            self.beaten[key].add((holder.namespace, holder.name))

    def mtls_for(self, workload: Workload) -> Mtls:
        """The pod's default mode and the ports where another applies."""
        chain = [
            p
            for p in (
                self.workloads.get(workload.key),
                self.namespaces.get(workload.namespace),
                self.mesh,
            )
            if p is not None
        ]
        default = next((p.mode for p in chain if p.mode is not None), DEFAULT_MODE)
        ports: dict[int, Mode] = {}
        for port in sorted({port for p in chain for port in p.ports}):
            mode = next((m for p in chain if (m := p.mode_on(port)) is not None), DEFAULT_MODE)
            if mode != default:
                ports[port] = mode
        return Mtls(default, ports)

    def statuses(self, now: str) -> dict[Key, dict[str, Any]]:
        statuses = {}
        for state in self.states:
            m = state.meta
            ok, reason, message = self._accepted(state)
            previous = previous_conditions(state.obj)
            accepted = condition("Accepted", ok, reason, message, m.generation, previous, now)
            statuses[(m.namespace, m.name)] = policy_status(m, accepted, state.verdict)
        return statuses

    def _accepted(self, state: PeerAuthenticationState) -> tuple[bool, str, str]:
        verdict, policy = state.verdict, state.policy
        if verdict.errors:
            tail = (
                f"; the previous version (generation {verdict.generation}) stays in force"
                if policy is not None
                else "; it is not applied"
            )
            return False, "Invalid", summary(verdict.errors) + tail
        assert policy is not None
        key = (policy.namespace, policy.name)
        older = [
            f"PeerAuthentication {'/'.join(other)} is older and applies"
            for other in sorted(self.beaten.get(key, ()))
        ]
        where = {"mesh": "every pod of the mesh", "namespace": f"namespace {policy.namespace}"}
        if older and key not in self.won:
            scope = where.get(policy.level, "the pods it selects")
            return False, "Conflicted", f"{summary(older)} to {scope}; this one is not applied"
        if policy.level == "workload" and not self.selected.get(key):
            return True, "Accepted", "selects no pod now"
        message = "applied by the agents of the captured pods it selects"
        if older:
            message += f"; on some of them {summary(older)} instead"
        return True, "Accepted", message
