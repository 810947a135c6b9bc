"""TrafficPolicy objects -> the outbound keys they set, checked by the agent's own reader.

A TrafficPolicy's spec is agent.yaml's outbound keys in camelCase
(`hashOn` = `hash_on`, `consecutive5xx` = `consecutive_5xx`), attached to
Services by `targetRefs` (policy attachment, as in Gateway API: kind
Service, optionally one port by `sectionName`). The keys are checked by
building a throwaway outbound with `agent.config_outbound.OutboundReader`,
so the agent accepts whatever was accepted here; its errors come back as
field paths (`spec.health.outlier.consecutive5xx: ...`).

Some keys depend on the port's protocol: `hashOn` a header or a cookie needs
one whose requests the agent reads headers of (the L7 ones), and an `http`
active check speaks HTTP/1.1, which an `http2` or `grpc` upstream refuses.
The agent's reader is asked once per protocol (`taking`), so the two never
disagree. A policy the reader refuses on every protocol is refused; one it
takes on some is applied on the ports of those. On a port of another
protocol, a hashOn the reader does not take there is left out (connections
are then spread as by `random`); any other key it refuses there leaves the
policy out of that port whole. The status says which ports, and why. An
agent is never sent a key its reader refuses: it would refuse the whole
snapshot, and every captured pod's snapshot holds every Service's entry.

When two TrafficPolicies target one Service port, the older one applies
(creationTimestamp, then namespace/name, as Gateway API breaks ties), and
the other's status says `Conflicted`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.config_outbound import OutboundReader
from control.core.conditions import Meta, condition, previous_conditions, summary
from control.core.inforce import Verdict, policy_status
from control.core.services import Service
from control.core.snapshot import TRAFFIC_BYTES, TRAFFIC_CONTAINERS, encode
from identity.appprotocol import PROTOCOLS, Protocol
from identity.jsonbounds import containers

__all__ = [
    "CompiledTraffic",
    "Target",
    "TrafficState",
    "attach_traffic",
    "compile_traffic",
    "taking",
    "to_camel",
    "to_snake",
]

_KEYS = ("balancer", "hashOn", "health", "timeouts", "retries", "circuitBreaker", "pool")
_TARGET_KEYS = ("group", "kind", "name", "sectionName")
_CAMEL = re.compile(r"[A-Z]")


@dataclass(frozen=True)
class Target:
    service: str
    section: str | None  # a port's name; None: every port


@dataclass(frozen=True)
class CompiledTraffic:
    namespace: str
    name: str
    uid: str
    generation: int
    created: str
    targets: tuple[Target, ...]
    #: agent.yaml outbound keys (snake_case), merged into each target's outbound.
    keys: Mapping[str, Any]
    #: What the agent's reader takes of `keys` on each port protocol (`taking`): the
    #: keys, the keys but hash_on, or why it takes none (a string).
    taken: Mapping[Protocol, Mapping[str, Any] | str] = field(default_factory=dict)

    def keys_for(self, protocol: Protocol) -> Mapping[str, Any] | None:
        """The keys for a port of `protocol`; None: the policy is left out there."""
        taken = self.taken.get(protocol, self.keys)
        return None if isinstance(taken, str) else taken

    def left_out_on(self, protocol: Protocol) -> str:
        """What of the policy a port of `protocol` goes without, and why ("": nothing)."""
        taken = self.taken.get(protocol, self.keys)
        if isinstance(taken, str):
            return f"the policy is not applied there ({taken})"
        if taken == self.keys:
            return ""
        hashing = [p for p in PROTOCOLS if self.keys_for(p) == self.keys]
        said = ", ".join(hashing[:-1]) + " or " + hashing[-1] if len(hashing) > 1 else hashing[0]
        return (
            f"hashOn a header or cookie is left out there (set appProtocol: {said} to hash on it)"
        )

    @property
    def rank(self) -> tuple[str, str, str]:
        return (self.created, self.namespace, self.name)


def compile_traffic(obj: Mapping[str, Any], m: Meta) -> CompiledTraffic | list[str]:
    """The compiled policy, or every problem as `field.path: problem`."""
    spec = obj.get("spec")
    if not isinstance(spec, Mapping):
        return ["spec: required: targetRefs and the outbound settings to apply"]
    errors = [
        f"spec.{key}: unknown key; expected targetRefs or one of {', '.join(_KEYS)}"
        for key in spec
        if key != "targetRefs" and key not in _KEYS
    ]
    targets = _targets(spec.get("targetRefs"), errors)
    keys: dict[str, Any] = {}
    for key in _KEYS:
        if key in spec:
            keys[to_snake(key)] = _snake_keys(spec[key], f"spec.{key}", errors)
    hash_on = spec.get("hashOn")
    if isinstance(hash_on, Mapping) and set(hash_on) == {"source"}:
        keys["hash_on"] = "source"  # the agent's spelling of {source: {}}
        source = hash_on["source"]
        if isinstance(source, Mapping):
            errors.extend(
                f"spec.hashOn.source.{key}: unknown key; expected {{source: {{}}}}"
                for key in source
            )
        else:
            errors.append("spec.hashOn.source: is not a mapping; expected {source: {}}")
    retries = keys.get("retries")
    if isinstance(retries, dict) and isinstance(retries.get("retry_on"), list):
        # int-or-string in the CRD: "503" is the status code 503, as the agent reads 503.
        retries["retry_on"] = [
            int(v) if isinstance(v, str) and v.isdecimal() else v for v in retries["retry_on"]
        ]
    errors += _check(keys) or _too_large(keys)
    taken = taking(keys) if not errors else []
    if errors or isinstance(taken, list):
        return errors + list(taken)
    meta = (m.namespace, m.name, m.uid, m.generation, m.created)
    return CompiledTraffic(*meta, targets, keys, taken)


def _targets(raw: object, errors: list[str]) -> tuple[Target, ...]:
    if not isinstance(raw, list) or not raw:
        errors.append("spec.targetRefs: required: at least one {group: '', kind: Service, name}")
        return ()
    targets = []
    for i, ref in enumerate(raw):
        path = f"spec.targetRefs[{i}]"
        if not isinstance(ref, Mapping):
            errors.append(f"{path}: is not a mapping; expected group, kind and name")
            continue
        errors.extend(
            f"{path}.{key}: unknown key; expected one of {', '.join(_TARGET_KEYS)}"
            for key in ref
            if key not in _TARGET_KEYS
        )
        if ref.get("group", "") not in ("", "core") or ref.get("kind") != "Service":
            errors.append(
                f"{path}: kind {ref.get('kind')!r} (group {ref.get('group', '')!r}) is not"
                " supported; expected group '' and kind Service"
            )
        name, section = ref.get("name"), ref.get("sectionName")
        if not isinstance(name, str) or not name:
            errors.append(f"{path}.name: required: the Service's name")
        elif section is not None and not (isinstance(section, str) and section):
            errors.append(f"{path}.sectionName: expected the name of a port of the Service")
        else:
            targets.append(Target(name, section))
    return tuple(targets)


def _snake_keys(value: Any, path: str, errors: list[str]) -> Any:
    """The value with every mapping key in snake_case; a snake_case key is an error."""
    if isinstance(value, list):
        return [_snake_keys(item, f"{path}[{i}]", errors) for i, item in enumerate(value)]
    if not isinstance(value, Mapping):
        return value
    converted = {}
    for key, item in value.items():
        if "_" in str(key):
            errors.append(f"{path}.{key}: unknown key; expected camelCase: {to_camel(str(key))}")
            continue
        converted[to_snake(str(key))] = _snake_keys(item, f"{path}.{key}", errors)
    return converted


def to_snake(key: str) -> str:
    """`consecutive5xx` -> `consecutive_5xx`, `hashOn` -> `hash_on`."""
    if key == "consecutive5xx":
        return "consecutive_5xx"
    return _CAMEL.sub(lambda match: "_" + match[0].lower(), key)


def to_camel(key: str) -> str:
    head, *rest = key.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


_PROBE = {
    "name": "probe",
    "listen": "127.0.0.1:1",
    "server_ids": ["spiffe://probe.invalid/probe"],
    "endpoints": ["127.0.0.1:1"],
}


#: The shortest active-check interval a TrafficPolicy may set (a Kubernetes probe's
#: shortest period). The Service's owner writes it; every client pod's agent runs the
#: checks, one per endpoint: at 1ms over a thousand endpoints, a million a second.
MIN_CHECK_INTERVAL = 1.0


def _check(keys: Mapping[str, Any]) -> list[str]:
    """What a Service's owner may not impose on the agents of other teams' pods."""
    reader = OutboundReader(Path("."))
    outbound = reader.outbound({**_PROBE, **keys, "protocol": "http"}, "outbound[0]")
    active = outbound.health.active if outbound is not None else None
    if active is not None and active.interval < MIN_CHECK_INTERVAL:
        return [
            f"spec.health.active.interval: must be at least {MIN_CHECK_INTERVAL:g}s: the"
            " checks run in the agent of every pod that calls the Service, one per endpoint"
        ]
    return []


def _too_large(keys: Mapping[str, Any]) -> list[str]:
    """Past TRAFFIC_BYTES or TRAFFIC_CONTAINERS as sent: every entry of every caller for
    the policy's Services would repeat it (eight such Services named in one pod's
    annotation took that pod's snapshot past what its agent takes)."""
    encoded = encode(keys)
    held = containers(encoded)
    if len(encoded) <= TRAFFIC_BYTES and held <= TRAFFIC_CONTAINERS:
        return []
    return [
        f"spec: its settings take {len(encoded)} bytes and {held} arrays and objects as"
        f" sent; a TrafficPolicy may take {TRAFFIC_BYTES} and {TRAFFIC_CONTAINERS}, as every"
        " caller of its Services repeats them"
    ]


def taking(keys: Mapping[str, Any]) -> dict[Protocol, Mapping[str, Any] | str] | list[str]:
    """What the agent's reader takes of `keys` on an outbound of each protocol: all of
    them; all but hash_on (a header or cookie, where it reads no headers to hash); or
    none, with its first error as a `spec.camelCase` path. When it takes them all on no
    protocol, the keys are invalid: the errors on `http`, which takes the most."""
    refused = {protocol: _refused(keys, protocol) for protocol in PROTOCOLS}
    if all(refused.values()):
        return refused["http"]
    without_hash = {key: value for key, value in keys.items() if key != "hash_on"}
    taken: dict[Protocol, Mapping[str, Any] | str] = {}
    for protocol, errors in refused.items():
        if not errors:
            taken[protocol] = keys
        elif "hash_on" in keys and not _refused(without_hash, protocol):
            taken[protocol] = without_hash
        else:
            taken[protocol] = errors[0]
    return taken


def _refused(keys: Mapping[str, Any], protocol: Protocol) -> list[str]:
    reader = OutboundReader(Path("."))
    reader.outbound({**_PROBE, **keys, "protocol": protocol}, "outbound[0]")
    return [_field_path(error) for error in reader.errors]


def _field_path(error: str) -> str:
    path, _, problem = error.partition(": ")
    parts = path.removeprefix("outbound[0].").split(".")
    camel = []
    for part in parts:
        name, bracket, index = part.partition("[")
        camel.append(to_camel(name) + bracket + index)
    return f"spec.{'.'.join(camel)}: {problem}"


PortKey = tuple[str, str, int]  # (namespace, Service, port number)
_SPOKEN: dict[Protocol, str] = {"tcp": "TCP", "http": "HTTP", "http2": "HTTP/2", "grpc": "gRPC"}


@dataclass(frozen=True)
class TrafficState:
    """One TrafficPolicy object as this compile found it."""

    meta: Meta
    obj: Mapping[str, Any]
    #: In force: this version, or the one its status records (inforce.py), or none.
    verdict: Verdict[CompiledTraffic]

    @property
    def policy(self) -> CompiledTraffic | None:
        return self.verdict.in_force


def attach_traffic(
    states: Sequence[TrafficState],
    services: Mapping[tuple[str, str], Service],
    now: str,
) -> tuple[dict[PortKey, CompiledTraffic], dict[tuple[str, str], dict[str, Any]]]:
    """Which TrafficPolicy applies to each Service port, and each one's status."""
    claims: dict[PortKey, list[CompiledTraffic]] = defaultdict(list)
    for state in states:
        if state.policy is not None:
            for port in _ports(state.policy, services, []):
                if _taken_on(state.policy, port, services):  # else it claims nothing there
                    claims[port].append(state.policy)
    winners = {port: min(found, key=lambda t: t.rank) for port, found in claims.items()}
    statuses = {}
    for state in states:
        m, previous = state.meta, previous_conditions(state.obj)
        ok, reason, message = _accepted(state, winners, services)
        accepted = condition("Accepted", ok, reason, message, m.generation, previous, now)
        statuses[(m.namespace, m.name)] = policy_status(m, accepted, state.verdict)
    return winners, statuses


def _ports(
    policy: CompiledTraffic, services: Mapping[tuple[str, str], Service], missing: list[str]
) -> list[PortKey]:
    ports = []
    for target in policy.targets:
        service = services.get((policy.namespace, target.service))
        if service is None:
            missing.append(f"Service {policy.namespace}/{target.service} not found")
            continue
        chosen = [p for p in service.ports if target.section in (None, p.name)]
        if not chosen:
            missing.append(f"Service {service.name} has no port named {target.section!r}")
        ports += [(service.namespace, service.name, p.port) for p in chosen]
    return ports


def _accepted(
    state: TrafficState,
    winners: Mapping[PortKey, CompiledTraffic],
    services: Mapping[tuple[str, str], Service],
) -> tuple[bool, str, str]:
    verdict = state.verdict
    if verdict.errors:
        tail = (
            f"; the previous version (generation {verdict.generation}) stays in force"
            if verdict.in_force is not None
            else "; it is not applied"
        )
        return False, "Invalid", summary(verdict.errors) + tail
    policy = state.policy
    assert policy is not None
    notes: list[str] = []
    ports = _ports(policy, services, notes)
    taken = [port for port in ports if _taken_on(policy, port, services)]
    won = [port for port in taken if winners.get(port) is policy]
    for namespace, service, number in ports:
        port = services[(namespace, service)].port(str(number))
        left_out = policy.left_out_on(port.protocol) if port is not None else ""
        other = winners.get((namespace, service, number))
        if port is not None and left_out:
            notes.append(f"Service {service} port {number} is {_SPOKEN[port.protocol]}: {left_out}")
        elif other is not None and other is not policy:
            notes.append(
                f"Service {service} port {number}: TrafficPolicy {other.name} is older and applies"
            )
    if not ports:
        return False, "TargetNotFound", summary(notes)
    if not taken:  # valid, and in force as written, but taken on none of its ports
        return False, "UnsupportedProtocol", summary(notes)
    if not won:
        return False, "Conflicted", summary(notes)
    return True, "Accepted", summary(notes) if notes else "applied to the clients of its targets"


def _taken_on(
    policy: CompiledTraffic, key: PortKey, services: Mapping[tuple[str, str], Service]
) -> bool:
    """Whether the agent takes any of the policy's keys on that Service port's protocol."""
    port = services[key[:2]].port(str(key[2]))
    return port is not None and policy.keys_for(port.protocol) is not None
