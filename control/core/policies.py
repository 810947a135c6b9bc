"""AuthorizationPolicy objects -> the agent's policies, checked by the agent's own parser.

An object becomes one policy named `<namespace>/<name>` with the spec's
action, mode and rules (rules are written exactly as in a policy file, so
they pass through unchanged). `spec: {}` is an ALLOW without rules: it
allows nothing on the pods it selects (Istio's default-deny). The policy is
validated with `agent.core.policyfile.parse_policy_list`, the function the
agent reads it with, so the agent can never refuse what was accepted here;
its errors come back as field paths (`spec.rules[0].to.paths[0]: ...`).

HTTP rules on TCP ports. A rule's HTTP fields (methods, paths, hosts,
headers) are checked on every L7 port (`identity.appprotocol.L7`): HTTP/1.1,
HTTP/2 and gRPC alike, where a gRPC call's path is `/package.Service/Method`.
The agent refuses a policy whose rule uses an HTTP field and applies to a
TCP port: there the field can never be checked, so in an ALLOW the rule
never allows and in a DENY it denies every connection its other fields
match. A policy selecting pods by label cannot know every pod's ports, so
the control plane does not drop such a policy (dropping a DENY, or the only
ALLOW, would open the pod). `fit_to_ports` rewrites it, per pod, into the
policy the agent's engine would enforce anyway, fail-closed, that the agent
accepts:

- the rule keeps its name and applies to the pod's L7 ports only;
- ALLOW: on the TCP ports the policy still applies and matches nothing,
  through a rule `{to: {ports: [P], not_ports: [P]}}` (named `tcp-ports`);
- DENY: a rule without the HTTP fields denies on the TCP ports (named
  `<rule>-tcp`, or `rules-<i>-tcp` for an unnamed rule);
- AUDIT: the rule records on L7 ports only (it never matched on TCP).

That is what Istio does with such rules. The policy's status stays
Accepted=True, with reason `HTTPRulesOnTCPPorts` and a message naming the
workloads (a pod's ReplicaSet, or the pod) and ports, and the fix:
`appProtocol` (`http`, `kubernetes.io/h2c` or `grpc`) on the Service port,
or the rule's L7 ports in `to.ports`.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.core.policy import Policy
from agent.core.policyfile import PolicyError, parse_policy_list
from control.core.conditions import Meta
from control.core.selectors import Selector, parse_selector
from control.core.snapshot import (
    AGENT_SNAPSHOT_BYTES,
    AGENT_SNAPSHOT_CONTAINERS,
    SHARED_BYTES,
    SHARED_CONTAINERS,
    encode,
)
from identity.jsonbounds import containers

__all__ = ["CompiledPolicy", "compile_policy", "fit_to_ports"]

#: The most of an agent's snapshot one policy may take, as sent: a quarter of the part a
#: pod's own configuration has (its policies, listeners and ports; the mesh's Services may
#: take the rest). An agent refuses a snapshot past its bounds whole, and keeps the one
#: before: one policy of 200,000 empty rules accepted here had every agent it selected
#: refuse every later change. It also keeps the policy's status, which records the
#: version in force (a copy of the spec), well within the 1.5 MiB etcd keeps of an object.
POLICY_BYTES = (AGENT_SNAPSHOT_BYTES - SHARED_BYTES) // 4
POLICY_CONTAINERS = (AGENT_SNAPSHOT_CONTAINERS - SHARED_CONTAINERS) // 4

_SPEC_KEYS = ("action", "mode", "rules", "selector")
_SOURCE = "AuthorizationPolicy"
_HTTP_KEYS = frozenset(
    {"methods", "not_methods", "paths", "not_paths", "hosts", "not_hosts"}
)  # of `to`; and `when`


@dataclass(frozen=True)
class CompiledPolicy:
    """A valid AuthorizationPolicy: whom it selects, and the agent's policy."""

    namespace: str
    name: str
    uid: str
    generation: int
    selector: Selector
    mesh_wide: bool
    document: Mapping[str, Any]  # the agent's policy, as agent.yaml's policy.policies[i]
    policy: Policy

    @functools.cached_property
    def http_rules(self) -> bool:
        """Asked for every pod the policy selects: worked out once."""
        return any(rule.http_fields for rule in self.policy.rules)


def compile_policy(
    obj: Mapping[str, Any], m: Meta, mesh_namespace: str
) -> CompiledPolicy | list[str]:
    """The compiled policy, or every problem as `field.path: problem`."""
    spec = obj.get("spec")
    if spec is None:
        spec = {}
    if not isinstance(spec, Mapping):
        return ["spec: is not a mapping; expected selector, action, mode and rules"]
    errors = [
        f"spec.{key}: unknown key; expected one of {', '.join(_SPEC_KEYS)}"
        for key in spec
        if key not in _SPEC_KEYS
    ]
    selector, problems = parse_selector(spec.get("selector"), "spec.selector")
    errors += problems
    document: dict[str, Any] = {
        "name": f"{m.namespace}/{m.name}",
        "action": spec.get("action", "ALLOW"),
        "rules": spec.get("rules", []),
    }
    if "mode" in spec:
        document["mode"] = spec["mode"]
    too_large = _too_large(document)
    if too_large is not None:  # before the rules are read: they could take seconds
        return [*errors, too_large]
    try:
        (policy,) = parse_policy_list([document], _SOURCE)
    except PolicyError as exc:
        errors += [_field_path(error) for error in exc.errors]
        policy = None
    if errors or policy is None or selector is None:
        return errors
    if document.get("mode") != "dry-run":
        document.pop("mode", None)  # enforce is the default: one spelling, one version
    return CompiledPolicy(
        m.namespace,
        m.name,
        m.uid,
        m.generation,
        selector,
        m.namespace == mesh_namespace,
        json.loads(json.dumps(document)),  # its own copy, JSON as sent (deepcopy is slower)
        policy,
    )


def _field_path(error: str) -> str:
    """`AuthorizationPolicy: policies[0].rules[0]: x` -> `spec.rules[0]: x`."""
    text = error.removeprefix(f"{_SOURCE}: ")
    if text.startswith("policies[0].name:"):
        return "metadata.name:" + text.removeprefix("policies[0].name:")
    if text.startswith("policies[0]."):
        return "spec." + text.removeprefix("policies[0].")
    return "spec" + text.removeprefix("policies[0]")


@dataclass(frozen=True)
class Misfit:
    """A rule with HTTP fields that applies to TCP ports of a pod."""

    rule: str
    fields: tuple[str, ...]
    tcp_ports: tuple[int, ...]


def misfits(policy: Policy, tcp_ports: frozenset[int]) -> tuple[Misfit, ...]:
    """The rules the agent would refuse on a pod with these TCP ports."""
    found = []
    for rule in policy.rules:
        if rule.http_fields:
            ports = tuple(sorted(p for p in tcp_ports if rule.applies_to_port(p)))
            if ports:
                found.append(Misfit(rule.name, tuple(sorted(rule.http_fields)), ports))
    return tuple(found)


def _too_large(document: Mapping[str, Any]) -> str | None:
    """Why the policy is too large to send (POLICY_BYTES, POLICY_CONTAINERS), or None."""
    try:
        encoded = encode(document)
    except (TypeError, ValueError):  # not JSON: the rules' own checks say what is wrong
        return None
    held = containers(encoded)  # as the agent counts them: brackets in strings are not
    if len(encoded) > POLICY_BYTES:
        over = f"{len(encoded)} bytes", POLICY_BYTES
    elif held > POLICY_CONTAINERS:
        over = f"{held} arrays and objects", POLICY_CONTAINERS
    else:
        return None
    return (
        f"spec.rules: the policy takes {over[0]} of an agent's configuration; one may take"
        f" {over[1]}: write fewer, broader rules (a namespace rather than each of its"
        " principals, a CIDR rather than each address)"
    )


def fit_to_ports(
    compiled: CompiledPolicy, tcp_ports: frozenset[int], l7_ports: frozenset[int]
) -> Mapping[str, Any]:
    """The policy as the agent would enforce it on a pod with these ports, fail-closed,
    in a form the agent accepts (see the module's docstring)."""
    policy, document = compiled.policy, compiled.document
    rules: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    allow_tcp: set[int] = set()
    taken = {rule.name for rule in policy.rules}
    for index, (rule, raw) in enumerate(zip(policy.rules, document["rules"], strict=True)):
        on_tcp = sorted(p for p in tcp_ports if rule.applies_to_port(p)) if rule.http_fields else []
        if not on_tcp:
            rules.append(raw)
            continue
        on_http = sorted(p for p in l7_ports if rule.applies_to_port(p))
        tcp_rule = _without_http(raw, on_tcp)
        if policy.action == "DENY" and on_http:
            tcp_rule["name"] = _unique(f"{raw.get('name') or f'rules-{index}'}-tcp", taken)
            extra.append(tcp_rule)
        elif policy.action == "ALLOW" and on_http:
            allow_tcp.update(on_tcp)
        if on_http:
            rules.append(_with_ports(raw, on_http))
        elif policy.action == "DENY":
            rules.append(tcp_rule)  # in place: an unnamed rule keeps its default name
        else:  # never matches here, and (ALLOW) keeps the policy applying to these ports
            rules.append(_keep_name(raw, {"to": {"ports": on_tcp, "not_ports": on_tcp}}))
    if allow_tcp:
        ports = sorted(allow_tcp)
        extra.append(
            {"name": _unique("tcp-ports", taken), "to": {"ports": ports, "not_ports": ports}}
        )
    return {**document, "rules": rules + extra}


def _with_ports(raw: Mapping[str, Any], ports: list[int]) -> dict[str, Any]:
    rule = dict(raw)
    rule["to"] = {**(raw.get("to") or {}), "ports": ports}
    return rule


def _without_http(raw: Mapping[str, Any], ports: list[int]) -> dict[str, Any]:
    rule = {key: value for key, value in raw.items() if key not in ("to", "when")}
    to = {k: v for k, v in (raw.get("to") or {}).items() if k not in _HTTP_KEYS}
    rule["to"] = {**to, "ports": ports}
    return rule


def _keep_name(raw: Mapping[str, Any], rule: dict[str, Any]) -> dict[str, Any]:
    if "name" in raw:
        rule["name"] = raw["name"]
    return rule


def _unique(name: str, taken: set[str]) -> str:
    name = name[:60]
    candidate, n = name, 2
    while candidate in taken:
        candidate, n = f"{name}-{n}", n + 1
    taken.add(candidate)
    return candidate
