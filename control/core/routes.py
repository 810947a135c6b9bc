"""HTTPRoute and GRPCRoute in mesh mode (GAMMA): a Service's traffic split by weight.

A route whose parentRef is a Service (group "", kind Service, in the route's
own namespace) changes what the clients of that Service port get: its
backendRefs become the outbound's weighted `subsets`, HTTPRoute's
`timeouts.request` its `timeouts.request` and `timeouts.backendRequest` its
`timeouts.per_try`. That is what the agent can do today. A route that asks
for more (matches other than every request, more than one rule, filters such
as RequestMirror, retry, session persistence, hostnames, a Service in
another namespace) is not used at all, rather than used in part, and its
status says which field: `Accepted=False`, reason `UnsupportedValue`,
`spec.rules[0].matches[0]: ...`.

A backendRef to a Service that does not exist (`BackendNotFound`), in
another namespace (`RefNotPermitted`: no ReferenceGrant support) or of
another kind (`InvalidKind`) sets `ResolvedRefs=False`; the route is used
with its other backends. When two routes claim one Service port, the older
applies (creationTimestamp, then namespace/name) and the other is not
Accepted. Status entries of other controllers in `status.parents` are kept,
and a route with no Service parent gets no status from here (unless it has an
entry of this controller's, which is then cleared).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal, TypeGuard

from control.core.conditions import Meta, condition, summary
from control.core.services import Service
from identity.configfile import parse_duration

__all__ = [
    "CONTROLLER",
    "BackendRef",
    "CompiledRoute",
    "ParentRef",
    "RouteKind",
    "attach_routes",
    "compile_route",
    "duration",
    "service_parent",
]

#: status.parents[].controllerName of the entries this control plane writes.
CONTROLLER = "outrider.io/control-plane"

RouteKind = Literal["HTTPRoute", "GRPCRoute"]
_SPEC_KEYS = ("parentRefs", "hostnames", "rules")
_RULE_KEYS: dict[str, tuple[str, ...]] = {
    "HTTPRoute": ("name", "matches", "filters", "backendRefs", "timeouts", "retry"),
    "GRPCRoute": ("name", "matches", "filters", "backendRefs"),
}
_BACKEND_KEYS = ("group", "kind", "name", "namespace", "port", "weight", "filters")
_GATEWAY_DURATION = re.compile(r"([0-9]{1,5}(h|ms|m|s)){1,4}")


@dataclass(frozen=True)
class ParentRef:
    """A parentRef to a Service: the ones this control plane answers for."""

    raw: Mapping[str, Any]  # as written, echoed in status.parents[].parentRef
    path: str
    service: str
    port: int | None  # None: every port of the Service


@dataclass(frozen=True)
class BackendRef:
    path: str
    service: str
    port: int
    weight: int
    #: (reason, message) when it cannot be resolved whatever exists: InvalidKind, RefNotPermitted.
    problem: tuple[str, str] | None = None


@dataclass(frozen=True)
class CompiledRoute:
    kind: RouteKind
    namespace: str
    name: str
    generation: int
    created: str
    parents: tuple[ParentRef, ...]
    backends: tuple[BackendRef, ...]
    #: agent.yaml outbound `timeouts` keys this route sets.
    timeouts: Mapping[str, str]
    #: `field.path: problem` for each thing asked that the agent cannot do yet.
    unsupported: tuple[str, ...]

    @property
    def rank(self) -> tuple[str, str, str]:
        """Older first: the route that applies when two claim one Service port."""
        return (self.created, self.namespace, self.name)

    @property
    def title(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"


def compile_route(kind: RouteKind, obj: Mapping[str, Any], m: Meta) -> CompiledRoute:
    spec = obj.get("spec") or {}
    problems: list[str] = []
    if not isinstance(spec, Mapping):
        spec, problems = {}, ["spec: is not a mapping"]
    problems += [
        f"spec.{key}: unknown field; expected {', '.join(_SPEC_KEYS)}"
        for key in spec
        if key not in _SPEC_KEYS
    ]
    if spec.get("hostnames"):
        problems.append(
            "spec.hostnames: not supported yet for a Service parent; leave it out"
            " (the Service's clients reach it by the Service's name)"
        )
    parents = _parents(spec.get("parentRefs"), m.namespace, problems)
    rules = spec.get("rules") or []
    if not isinstance(rules, list):
        rules, problems = [], [*problems, "spec.rules: is not a list"]
    if not rules:
        problems.append("spec.rules: a route with no rule has no backend; add one rule")
    if len(rules) > 1:
        problems.append(
            "spec.rules[1]: more than one rule is not supported yet; use one rule with"
            " weighted backendRefs"
        )
    backends: tuple[BackendRef, ...] = ()
    timeouts: dict[str, str] = {}
    if rules and isinstance(rules[0], Mapping):
        backends = _rule(kind, rules[0], m.namespace, problems, timeouts)
    elif rules:
        problems.append("spec.rules[0]: is not a mapping")
    return CompiledRoute(
        kind,
        m.namespace,
        m.name,
        m.generation,
        m.created,
        parents,
        backends,
        timeouts,
        tuple(problems),
    )


def service_parent(ref: object) -> bool:
    """Whether a parentRef names a Service (GAMMA): kind Service in the core group. The
    group defaults to Gateway API's own, so `{kind: Service}` alone names no Service."""
    return (
        isinstance(ref, Mapping)
        and ref.get("kind") == "Service"
        and ref.get("group", "gateway.networking.k8s.io") in ("", "core")
    )


def _parents(raw: object, namespace: str, problems: list[str]) -> tuple[ParentRef, ...]:
    parents = []
    for i, ref in enumerate(raw if isinstance(raw, list) else []):
        path = f"spec.parentRefs[{i}]"
        if not service_parent(ref):
            continue  # a Gateway's, or another kind: not this controller's to answer
        name, port = ref.get("name"), ref.get("port")
        if not isinstance(name, str) or not name:
            problems.append(f"{path}.name: required: the Service's name")
            continue
        if ref.get("namespace", namespace) != namespace:
            problems.append(
                f"{path}.namespace: a route for a Service in another namespace (a consumer"
                " route) is not supported yet; put the route in the Service's namespace"
            )
        if ref.get("sectionName") is not None:
            problems.append(f"{path}.sectionName: not supported for a Service; use port")
        if port is not None and not _is_port(port):
            problems.append(f"{path}.port: {port!r} is not a port number")
            port = None
        parents.append(ParentRef(dict(ref), path, name, port))
    return tuple(parents)


def _rule(
    kind: RouteKind,
    rule: Mapping[str, Any],
    namespace: str,
    problems: list[str],
    timeouts: dict[str, str],
) -> tuple[BackendRef, ...]:
    path = "spec.rules[0]"
    problems += [
        f"{path}.{key}: not supported yet"
        for key in rule
        if key not in _RULE_KEYS[kind] or key == "retry"
    ]
    matches = rule.get("matches") or []
    if isinstance(matches, list) and matches and not any(_every(kind, m) for m in matches):
        asked = ", ".join(sorted(matches[0])) if isinstance(matches[0], Mapping) else "?"
        problems.append(
            f"{path}.matches[0]: matching on {asked} is not supported yet; only a rule for"
            " every request (leave matches out)"
        )
    for i, item in enumerate(rule.get("filters") or []):
        what = item.get("type") if isinstance(item, Mapping) else None
        problems.append(f"{path}.filters[{i}]: {what or 'a filter'} is not supported yet")
    raw = rule.get("timeouts")
    if isinstance(raw, Mapping):
        _timeouts(raw, f"{path}.timeouts", problems, timeouts)
    items = rule.get("backendRefs") or []
    if not isinstance(items, list) or not items:
        problems.append(f"{path}.backendRefs: required: at least one Service to send to")
        return ()
    backends = []
    for i, item in enumerate(items):
        backend = _backend(item, f"{path}.backendRefs[{i}]", namespace, problems)
        if backend is not None:
            backends.append(backend)
    return tuple(backends)


def _every(kind: RouteKind, match: object) -> bool:
    """Whether a match matches every request: `{}`, or HTTP's default PathPrefix `/`."""
    if not isinstance(match, Mapping):
        return False
    if kind == "HTTPRoute" and set(match) == {"path"}:
        path = match["path"]
        return (
            isinstance(path, Mapping)
            and path.get("type", "PathPrefix") == "PathPrefix"
            and path.get("value", "/") == "/"
        )
    return not match


def _timeouts(
    raw: Mapping[str, Any], path: str, problems: list[str], timeouts: dict[str, str]
) -> None:
    values: dict[str, int] = {}
    for key, agent_key in (("request", "request"), ("backendRequest", "per_try")):
        if key not in raw:
            continue
        ms = duration(raw[key])
        if ms is None:
            problems.append(
                f"{path}.{key}: {raw[key]!r} is not a Gateway API duration such as 10s or 1m30s"
            )
            continue
        values[key] = ms
        timeouts[agent_key] = f"{ms // 1000}s" if ms % 1000 == 0 else f"{ms}ms"
    for key in raw:
        if key not in ("request", "backendRequest"):
            problems.append(f"{path}.{key}: unknown field; expected request or backendRequest")
    request, backend = values.get("request", 0), values.get("backendRequest", 0)
    if request and backend > request:
        problems.append(f"{path}.backendRequest: must not exceed request")


def duration(value: object) -> int | None:
    """A Gateway API duration (GEP-2257: `1h`, `1m30s`, `500ms`) in milliseconds.

    GEP-2257 allows a subset of Go's durations (whole numbers, at most four parts,
    h/m/s/ms): that shape is checked here, the value read by the one parser."""
    if not isinstance(value, str) or not _GATEWAY_DURATION.fullmatch(value):
        return None
    return parse_duration(value) // timedelta(milliseconds=1)


def _backend(item: object, path: str, namespace: str, problems: list[str]) -> BackendRef | None:
    if not isinstance(item, Mapping):
        problems.append(f"{path}: is not a mapping")
        return None
    for key in item:
        if key not in _BACKEND_KEYS:
            problems.append(f"{path}.{key}: unknown field")
    if item.get("filters"):
        problems.append(f"{path}.filters: not supported yet")
    name, port, weight = item.get("name"), item.get("port"), item.get("weight", 1)
    if not isinstance(name, str) or not name:
        problems.append(f"{path}.name: required: the backend Service's name")
        return None
    if not _is_port(port):
        problems.append(f"{path}.port: required: the backend Service's port number")
        return None
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= 1_000_000:
        problems.append(f"{path}.weight: {weight!r} is not a weight from 0 to 1000000")
        return None
    problem = None
    if item.get("group", "") not in ("", "core") or item.get("kind", "Service") != "Service":
        problem = ("InvalidKind", f"{path}: only Service backends are supported")
    elif item.get("namespace", namespace) != namespace:
        problem = (
            "RefNotPermitted",
            f"{path}.namespace: a backend in another namespace needs a ReferenceGrant,"
            " which is not supported yet",
        )
    return BackendRef(path, name, port, weight, problem)


def _is_port(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


PortKey = tuple[str, str, int]  # (namespace, Service, port number)


def attach_routes(
    routes: Sequence[tuple[Mapping[str, Any], CompiledRoute]],
    services: Mapping[tuple[str, str], Service],
    now: str,
) -> tuple[dict[PortKey, CompiledRoute], dict[tuple[str, str, str], dict[str, Any]]]:
    """Which route splits each Service port, and each route's whole status."""
    claims: dict[PortKey, list[CompiledRoute]] = defaultdict(list)
    for _, route in routes:
        if route.unsupported:
            continue
        for parent in route.parents:
            for port in _parent_ports(route, parent.service, parent.port, services):
                claims[port].append(route)
    winners = {port: min(found, key=lambda r: r.rank) for port, found in claims.items()}
    statuses: dict[tuple[str, str, str], dict[str, Any]] = {
        (route.kind, route.namespace, route.name): _status(obj, route, winners, services, now)
        for obj, route in routes
        if route.parents or _ours(obj)  # a Gateway's route: its controller's to write
    }
    return winners, statuses


def _ours(obj: Mapping[str, Any]) -> bool:
    """Whether the route's status holds an entry this control plane wrote."""
    parents = (obj.get("status") or {}).get("parents")
    return isinstance(parents, list) and any(
        isinstance(p, dict) and p.get("controllerName") == CONTROLLER for p in parents
    )


def _parent_ports(
    route: CompiledRoute, name: str, port: int | None, services: Mapping[tuple[str, str], Service]
) -> list[PortKey]:
    service = services.get((route.namespace, name))
    if service is None:
        return []
    return [(route.namespace, name, p.port) for p in service.ports if port in (None, p.port)]


def _status(
    obj: Mapping[str, Any],
    route: CompiledRoute,
    winners: Mapping[PortKey, CompiledRoute],
    services: Mapping[tuple[str, str], Service],
    now: str,
) -> dict[str, Any]:
    """status.parents: other controllers' entries as they are, then one per Service parent."""
    old = (obj.get("status") or {}).get("parents")
    old = old if isinstance(old, list) else []
    parents = [p for p in old if isinstance(p, dict) and p.get("controllerName") != CONTROLLER]
    refs = _resolved_refs(route, services)
    for parent in route.parents:
        before = next(
            (
                p.get("conditions") or []
                for p in old
                if isinstance(p, dict)
                and p.get("controllerName") == CONTROLLER
                and p.get("parentRef") == parent.raw
            ),
            [],
        )
        accepted = _accepted(route, parent.service, parent.port, winners, services)
        conditions = [
            condition("Accepted", *accepted, route.generation, before, now),
            condition("ResolvedRefs", *refs, route.generation, before, now),
        ]
        parents.append(
            {"parentRef": parent.raw, "controllerName": CONTROLLER, "conditions": conditions}
        )
    return {"parents": parents}


def _accepted(
    route: CompiledRoute,
    name: str,
    port: int | None,
    winners: Mapping[PortKey, CompiledRoute],
    services: Mapping[tuple[str, str], Service],
) -> tuple[bool, str, str]:
    if route.unsupported:
        return False, "UnsupportedValue", summary(route.unsupported) + "; the route is not used"
    if (route.namespace, name) not in services:
        return False, "NoMatchingParent", f"Service {route.namespace}/{name} not found"
    ports = _parent_ports(route, name, port, services)
    if not ports:
        return False, "NoMatchingParent", f"Service {name} has no port {port}"
    lost = [p for p in ports if winners.get(p) is not route]
    if len(lost) == len(ports):
        other = winners[lost[0]]
        return (
            False,
            "UnsupportedValue",
            (
                f"{other.title} is older and routes Service {name} port {lost[0][2]}; more"
                " than one route for a Service port is not supported yet"
            ),
        )
    if lost:
        shown = ", ".join(str(p[2]) for p in lost)
        return (
            True,
            "Accepted",
            (f"used for Service {name}, except port {shown} (an older route applies there)"),
        )
    return True, "Accepted", f"used by the clients of Service {name}"


def _resolved_refs(
    route: CompiledRoute, services: Mapping[tuple[str, str], Service]
) -> tuple[bool, str, str]:
    problems: list[tuple[str, str]] = []
    usable = 0  # backends that resolve and have weight
    for backend in route.backends:
        service = services.get((route.namespace, backend.service))
        if backend.problem is not None:
            problems.append(backend.problem)
        elif service is None:
            where = f"{route.namespace}/{backend.service}"
            problems.append(("BackendNotFound", f"{backend.path}: Service {where} not found"))
        elif service.port(str(backend.port)) is None:
            problems.append(
                (
                    "BackendNotFound",
                    f"{backend.path}.port: Service {backend.service} has no port {backend.port}",
                )
            )
        elif backend.weight > 0:
            usable += 1
    if not problems and not usable:  # upstreams.py: never no entry, which passes calls by
        return True, "ResolvedRefs", f"every backendRef has weight 0: {_OWN}"
    if not problems:
        return True, "ResolvedRefs", "every backendRef is a Service of this namespace"
    messages = summary(message for _, message in problems)
    if not usable:
        return False, problems[0][0], f"{messages}; no other backend has weight: {_OWN}"
    return False, problems[0][0], messages + "; the other backends are used"


#: What a route none of whose backends can take a call does (upstreams.py `upstream`).
_OWN = (
    "until one resolves with weight, calls go to the parent Service's own endpoints"
    " (Gateway API would answer them 500)"
)
