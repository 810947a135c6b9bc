"""TrafficPolicy objects -> the outbound keys they set, checked by the agent's own reader.

A TrafficPolicy's spec is agent.yaml's outbound keys in camelCase
(`hashOn` = `hash_on`, `consecutive5xx` = `consecutive_5xx`), attached to
Services by `targetRefs` (policy attachment, as in Gateway API: kind
Service, optionally one port by `sectionName`). The keys are checked by
building a throwaway outbound with `agent.config_outbound.OutboundReader`,
so the agent accepts whatever was accepted here; its errors come back as
field paths (`spec.health.outlier.consecutive5xx: ...`).

One key depends on the port: `hashOn` a header or a cookie needs a protocol
whose requests the agent reads headers of to hash (the agent's reader says
which: `protocols_taking`; the L7 ones). On another port of the target (TCP)
it is left out (connections are then spread as by `random`) and the policy's
status says so.

When two TrafficPolicies target one Service port, the older one applies
(creationTimestamp, then namespace/name, as Gateway API breaks ties), and
the other's status says `Conflicted`.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config_outbound import OutboundReader
from control.core.conditions import Meta, condition, previous_conditions, summary
from control.core.inforce import Verdict, policy_status
from control.core.services import Service
from identity.appprotocol import PROTOCOLS, Protocol

__all__ = [
    "CompiledTraffic",
    "Target",
    "TrafficState",
    "attach_traffic",
    "compile_traffic",
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
    #: The ports' protocols the agent takes every key on (`protocols_taking`).
    taken_on: frozenset[Protocol] = frozenset(PROTOCOLS)

    @property
    def http_only(self) -> bool:
        """Whether a key here is taken on some protocols only (a header or cookie to hash on)."""
        return self.taken_on != frozenset(PROTOCOLS)

    def keys_for(self, protocol: Protocol) -> Mapping[str, Any]:
        if protocol in self.taken_on:
            return self.keys
        return {key: value for key, value in self.keys.items() if key != "hash_on"}

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
    errors += _check(keys)
    if errors:
        return errors
    return CompiledTraffic(
        m.namespace, m.name, m.uid, m.generation, m.created, targets, keys, protocols_taking(keys)
    )


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
    "protocol": "http",
    "server_ids": ["spiffe://probe.invalid/probe"],
    "endpoints": ["127.0.0.1:1"],
}


#: The shortest active-check interval a TrafficPolicy may set (a Kubernetes probe's
#: shortest period). The Service's owner writes it; every client pod's agent runs the
#: checks, one per endpoint: at 1ms over a thousand endpoints, a million a second.
MIN_CHECK_INTERVAL = 1.0


def _check(keys: Mapping[str, Any]) -> list[str]:
    """The agent reader's errors for these keys, as `spec.camelCase` paths, and what a
    Service's owner may not impose on the agents of other teams' pods."""
    reader = OutboundReader(Path("."))
    outbound = reader.outbound({**_PROBE, **keys}, "outbound[0]")
    errors = [_field_path(error) for error in reader.errors]
    active = outbound.health.active if outbound is not None else None
    if active is not None and active.interval < MIN_CHECK_INTERVAL:
        errors.append(
            f"spec.health.active.interval: must be at least {MIN_CHECK_INTERVAL:g}s: the"
            " checks run in the agent of every pod that calls the Service, one per endpoint"
        )
    return errors


def protocols_taking(keys: Mapping[str, Any]) -> frozenset[Protocol]:
    """The protocols whose outbounds the agent's reader takes these keys on: all of them,
    but for a hashOn header or cookie, which it takes only where it reads requests' headers
    to hash. Asked of the reader itself, so the two never disagree."""
    hash_on = keys.get("hash_on")
    if not (isinstance(hash_on, Mapping) and {"header", "cookie"} & set(hash_on)):
        return frozenset(PROTOCOLS)
    taking = set()
    for protocol in PROTOCOLS:
        reader = OutboundReader(Path("."))
        reader.outbound({**_PROBE, **keys, "protocol": protocol}, "outbound[0]")
        if not reader.errors:
            taking.add(protocol)
    return frozenset(taking)


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
    won = [port for port in ports if winners.get(port) is policy]
    for namespace, service, number in ports:
        other = winners[(namespace, service, number)]
        if other is not policy:
            notes.append(
                f"Service {service} port {number}: TrafficPolicy {other.name} is older and applies"
            )
    for namespace, service, number in won if policy.http_only else ():
        port = services[(namespace, service)].port(str(number))
        if port is not None and port.protocol not in policy.taken_on:
            taking = [p for p in PROTOCOLS if p in policy.taken_on]
            said = ", ".join(taking[:-1]) + " or " + taking[-1] if len(taking) > 1 else taking[0]
            notes.append(
                f"Service {service} port {number} is {_SPOKEN[port.protocol]}: hashOn a header"
                f" or cookie is left out there (set appProtocol: {said} to hash on it)"
            )
    if not ports:
        return False, "TargetNotFound", summary(notes)
    if not won:
        return False, "Conflicted", summary(notes)
    return True, "Accepted", summary(notes) if notes else "applied to the clients of its targets"
