"""The `outrider.io/upstreams` pod annotation: which Services a pod calls, in which order.

`outrider.io/upstreams: "backend:8080,payments.billing:http"` is a
comma-separated list of `service[.namespace]:port` (a Service port's number
or name; the namespace defaults to the pod's). The i-th entry is served on
the i-th outbound port, so fixing one entry never moves the others: a bad
entry is skipped in place and reported as a warning for the pod (a pod has
no status to write it to; the shell logs it and shows it in /debug).

The annotation says only where a pod's app connects; it grants nothing and
cannot touch policy.

`Upstreams` builds each listener: the Service port's protocol (its
appProtocol), its injected endpoints at their agents' inbound listeners and
the SPIFFE IDs of their service accounts (services.py), or the weighted
subsets of the route that applies to it (routes.py), and the keys of its
TrafficPolicy (traffic.py). A Service port without endpoints gets no
listener, until it has some.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from control.core.routes import CompiledRoute
from control.core.services import (
    Backend,
    Service,
    ServicePort,
    Workload,
    host_port,
    slice_backends,
)
from control.core.snapshot import (
    AGENT_SNAPSHOT_BYTES,
    AGENT_SNAPSHOT_CONTAINERS,
    EXPLICIT_BYTES,
    EXPLICIT_CONTAINERS,
    SHARED_BYTES,
    SHARED_CONTAINERS,
    encode,
)
from control.core.traffic import CompiledTraffic
from identity.jsonbounds import containers

__all__ = ["ANNOTATION", "MeshWide", "Upstreams", "Wanted", "parse_upstreams"]


class UpstreamSettings(Protocol):
    """What of MeshSettings building upstreams needs."""

    @property
    def trust_domain(self) -> str: ...
    @property
    def inbound_base(self) -> int: ...
    @property
    def outbound_ports(self) -> tuple[int, ...]: ...


ANNOTATION = "outrider.io/upstreams"
#: Entries read from the annotation; the rest are skipped with one warning. Far more
#: than there are outbound ports, and a bound on what one pod author makes every
#: compile do (an annotation may hold 256 KiB: tens of thousands of entries).
MAX_ENTRIES = 256
#: How much of a bad entry a warning quotes.
_SHOWN = 80
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?")


@dataclass(frozen=True)
class Wanted:
    """One entry of the annotation: the index picks the outbound port."""

    index: int
    service: str
    namespace: str
    port: str  # a number or a port name, as written


def parse_upstreams(text: str, namespace: str) -> tuple[tuple[Wanted, ...], tuple[str, ...]]:
    """The entries, and a warning for each one skipped. The pods of a Deployment share
    one annotation, parsed once; a long one is not kept (the cache holds 4096)."""
    if len(text) > _CACHED:
        return _parse.__wrapped__(text, namespace)
    return _parse(text, namespace)


_CACHED = 4096


@functools.lru_cache(maxsize=4096)
def _parse(text: str, namespace: str) -> tuple[tuple[Wanted, ...], tuple[str, ...]]:
    wanted: list[Wanted] = []
    warnings: list[str] = []
    if not text.strip():
        return (), ()
    entries = text.split(",", MAX_ENTRIES)
    if len(entries) > MAX_ENTRIES:
        more = entries.pop().count(",") + 1
        warnings.append(
            f"{ANNOTATION}[{MAX_ENTRIES}:]: {more} more entries; only the first {MAX_ENTRIES}"
            " are read; skipped"
        )
    for index, entry in enumerate(entries):
        entry = entry.strip()
        problem = _problem(entry)
        if problem:
            shown = repr(entry if len(entry) <= _SHOWN else entry[:_SHOWN] + "...")
            warnings.append(f"{ANNOTATION}[{index}] {shown}: {problem}; skipped")
            continue
        target, _, port = entry.rpartition(":")
        service, _, other = target.partition(".")
        wanted.append(Wanted(index, service, other or namespace, port))
    return tuple(wanted), tuple(warnings)


def _problem(entry: str) -> str | None:
    if not entry:
        return "empty entry; expected service[.namespace]:port"
    if "=" in entry or "@" in entry:
        return (
            "the old name=host:port@id form is gone; write service[.namespace]:port and the"
            " control plane finds the endpoints and their identities"
        )
    target, colon, port = entry.rpartition(":")
    if not colon or not target:
        return "no port; expected service[.namespace]:port"
    service, _, namespace = target.partition(".")
    if not _LABEL.fullmatch(service):
        return f"{service!r} is not a Service name"
    if namespace and not _LABEL.fullmatch(namespace):
        return f"{namespace!r} is not a namespace (service.namespace, no cluster domain)"
    if port.isdecimal():
        if not 0 < int(port) < 65536:
            return f"port {port} is out of range"
    elif not _PORT_NAME.fullmatch(port):
        return f"{port!r} is neither a port number nor a port name"
    return None


PortKey = tuple[str, str, int]  # (namespace, Service, port number)


@dataclass
class MeshWide:
    """What every captured pod's config shares: how a connection to a ClusterIP is served."""

    #: Each Service port with injected endpoints: an outbound entry without `listen`.
    entries: list[tuple[PortKey, dict[str, Any]]] = field(default_factory=list)
    #: The entries alone, in order: what a pod whose annotation names none of them gets.
    listed: list[dict[str, Any]] = field(default_factory=list)
    #: Service port -> its ClusterIP:port addresses (those in `entries`).
    destinations: dict[PortKey, list[str]] = field(default_factory=dict)
    #: ClusterIP:port of every Service port without injected endpoints, sorted: in the
    #: registry, outside the mesh, passed through as plain TCP.
    passthrough: list[str] = field(default_factory=list)
    #: Services left out so that a snapshot stays within what an agent takes
    #: (SHARED_BYTES, SHARED_CONTAINERS; _within_bounds says which); and why, for the log.
    left_out: list[tuple[str, str]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    #: id(entry) -> its encoding (measured here; Mesh sends these bytes).
    pieces: dict[int, bytes] = field(default_factory=dict)


class Upstreams:
    """A pod's outbound listeners: each entry of its annotation resolved to a Service port,
    with the endpoints and server identities behind it, a route's split, a TrafficPolicy's
    keys. Each Service port is built once per compile, for all the pods that call it."""

    def __init__(
        self,
        settings: UpstreamSettings,
        services: Mapping[tuple[str, str], Service],
        slices: Mapping[tuple[str, str], Sequence[Mapping[str, Any]]],
        workloads: Mapping[tuple[str, str], Workload],
        traffic: Mapping[PortKey, CompiledTraffic],
        routes: Mapping[PortKey, CompiledRoute],
        warnings: dict[tuple[str, str], list[str]],
    ) -> None:
        self.settings = settings
        self.services = services
        self.slices = slices
        self.workloads = workloads
        self.traffic = traffic
        self.routes = routes
        self.warnings = warnings  # about the pods behind a Service
        self.built: dict[PortKey, dict[str, Any] | None] = {}
        #: Each built entry's (bytes, arrays and objects) as sent, measured once.
        self.sizes: dict[PortKey, tuple[int, int]] = {}

    def listeners(self, workload: Workload) -> tuple[list[dict[str, Any]], list[str]]:
        """The listeners the pod's annotation asks for, and why any is missing."""
        explicit, warnings = self.explicit(workload)
        return [listener for _, listener in explicit], warnings

    def captured(self, workload: Workload) -> tuple[list[dict[str, Any]], list[str]]:
        """A captured pod's outbound: its annotation's listeners, each with the Service
        port's destinations, then one entry without `listen` for every other Service port
        of the mesh that has injected endpoints (shared by every captured pod)."""
        explicit, warnings = self.explicit(workload)
        if not explicit:  # most pods: the mesh's list itself, shared (and measured) once
            return self.mesh_wide.listed, warnings
        entries = []
        for key, listener in explicit:
            destinations = self.mesh_wide.destinations.get(key)
            entries.append({**listener, "destinations": destinations} if destinations else listener)
        wide = self.mesh_wide
        if any(key in wide.destinations for key, _ in explicit):
            taken = {key for key, _ in explicit}
            entries += [entry for key, entry in wide.entries if key not in taken]
        else:
            entries += wide.listed
        return entries, warnings

    def explicit(
        self, workload: Workload
    ) -> tuple[list[tuple[PortKey, dict[str, Any]]], list[str]]:
        """The annotation's listeners, by Service port, and why any is missing."""
        text = workload.annotations.get(ANNOTATION, "")
        wanted, skipped = parse_upstreams(text, workload.namespace)
        warnings = list(skipped)
        listeners: list[tuple[PortKey, dict[str, Any]]] = []
        seen: set[PortKey] = set()
        ports = self.settings.outbound_ports
        taken, held = 0, 0  # what the listeners take of the agent's snapshot, as sent
        for n, entry in enumerate(wanted):
            where = f"{ANNOTATION}[{entry.index}] '{entry.service}.{entry.namespace}:{entry.port}'"
            if entry.index >= len(ports):
                more = len(wanted) - n - 1
                tail = f" (and {more} more entries after it)" if more else ""
                warnings.append(f"{where}: only {len(ports)} upstreams fit; skipped{tail}")
                break
            service = self.services.get((entry.namespace, entry.service))
            port = service.port(entry.port) if service is not None else None
            if service is None or port is None:
                why = "no such Service" if service is None else "the Service has no such port"
                warnings.append(f"{where}: {why}; skipped")
                continue
            key = (service.namespace, service.name, port.port)
            if key in seen:
                warnings.append(f"{where}: listed twice; skipped")
                continue
            seen.add(key)
            body = self.body(service, port)
            if body is None:
                warnings.append(f"{where}: no ready injected endpoint; left out for now")
                continue
            named = {
                "name": f"{service.name}.{service.namespace}:{port.port}",
                "listen": f"127.0.0.1:{ports[entry.index]}",
            }
            size, count = self.size(key, body)
            size += len(encode(named))  # and a comma for the braces merged
            if taken + size > EXPLICIT_BYTES or held + count > EXPLICIT_CONTAINERS:
                warnings.append(
                    f"{where}: left out: with it the pod's listeners would take {taken + size}"
                    f" bytes and {held + count} arrays and objects of its agent's configuration,"
                    f" and they may take {EXPLICIT_BYTES} and {EXPLICIT_CONTAINERS}"
                )
                continue
            taken, held = taken + size, held + count
            listeners.append((key, {**named, **body}))
        return listeners, warnings

    def size(self, key: PortKey, body: Mapping[str, Any]) -> tuple[int, int]:
        """An entry's (bytes, arrays and objects) as sent, measured once per compile."""
        if key not in self.sizes:
            encoded = encode(body)
            self.sizes[key] = (len(encoded), containers(encoded))
        return self.sizes[key]

    def body(self, service: Service, port: ServicePort) -> dict[str, Any] | None:
        """`upstream(service, port)`, built once per compile."""
        key = (service.namespace, service.name, port.port)
        if key not in self.built:
            self.built[key] = self.upstream(service, port)
        return self.built[key]

    @functools.cached_property
    def mesh_wide(self) -> MeshWide:
        """Every Service port with a ClusterIP, in the mesh or passed through; built once
        per compile, and every captured pod's config holds the same dicts."""
        wide = MeshWide()
        # An address is one Service's (the API server allocates each ClusterIP once); one
        # seen twice (a stale object between a delete and a create) keeps its first owner,
        # as the agent refuses a destination in two entries.
        claimed: set[str] = set()
        parts: list[_ServicePart] = []
        for (namespace, name), service in sorted(self.services.items()):
            part = _ServicePart(namespace, name)
            for port in service.ports if service.cluster_ips else ():  # headless: no address
                addresses = [
                    a
                    for ip in service.cluster_ips
                    if (a := host_port(ip, port.port)) not in claimed
                ]
                claimed.update(addresses)
                body = self.body(service, port) if addresses else None
                if body is None:
                    part.passthrough += addresses
                    continue
                named = {"name": f"{name}.{namespace}:{port.port}", "destinations": addresses}
                part.add((namespace, name, port.port), {**named, **body})
            if part.entries or part.passthrough:
                parts.append(part)
        kept = _within_bounds(parts, wide)
        passthrough: list[str] = []
        for part in kept:
            for key, entry, encoded in part.entries:
                wide.destinations[key] = entry["destinations"]
                wide.entries.append((key, entry))
                wide.pieces[id(entry)] = encoded
            passthrough += part.passthrough
        wide.passthrough.extend(sorted(passthrough))
        wide.listed.extend(entry for _, entry in wide.entries)
        return wide

    def encoded(self) -> dict[int, bytes]:
        """The mesh-wide entries' encodings, if any captured pod needed them."""
        wide = self._built_wide()
        return dict(wide.pieces) if wide is not None else {}

    def warnings_mesh_wide(self) -> list[str]:
        wide = self._built_wide()
        return list(wide.warnings) if wide is not None else []

    def left_out(self) -> list[tuple[str, str]]:
        wide = self._built_wide()
        return list(wide.left_out) if wide is not None else []

    def _built_wide(self) -> MeshWide | None:
        """mesh_wide if a captured pod made it be built: none is built for none."""
        wide = self.__dict__.get("mesh_wide")
        return wide if isinstance(wide, MeshWide) else None

    def upstream(self, service: Service, port: ServicePort) -> dict[str, Any] | None:
        """An outbound listener but its name and listen; None without endpoints."""
        key = (service.namespace, service.name, port.port)
        body: dict[str, Any] = {"protocol": port.protocol}
        traffic, route = self.traffic.get(key), self.routes.get(key)
        keys = traffic.keys_for(port.protocol) if traffic is not None else None
        if keys is not None:
            body.update(keys)
        backends: Sequence[Backend]
        subsets, backends = self.subsets(route) if route is not None else ([], [])
        if subsets:
            body["subsets"] = subsets
        else:
            # No route, or none of its backends has an endpoint yet (a flip to a Service
            # not up yet): the Service's own. Never none while it has some: a Service
            # port without an entry is passed through, in plaintext, past the mesh.
            backends = self.backends(service, port)
            if not backends:
                return None
            body["endpoints"] = [b.address for b in backends]
        if route is not None and route.timeouts:  # more specific than the TrafficPolicy's
            body["timeouts"] = {**body.get("timeouts", {}), **route.timeouts}
        td = self.settings.trust_domain
        body["server_ids"] = sorted(
            {
                f"spiffe://{td}/ns/{b.workload.namespace}/sa/{b.workload.service_account}"
                for b in backends
            }
        )
        return body

    def backends(self, service: Service, port: ServicePort) -> tuple[Backend, ...]:
        return slice_backends(
            self.slices.get((service.namespace, service.name), ()),
            port,
            self.workloads,
            self.settings.inbound_base,
            self.warnings,
            (service.namespace, service.name),
        )

    def subsets(self, route: CompiledRoute) -> tuple[list[dict[str, Any]], list[Backend]]:
        """One subset per backendRef that resolves to endpoints and has weight."""
        subsets: list[dict[str, Any]] = []
        every: list[Backend] = []
        names: set[str] = set()
        for ref in route.backends:
            service = self.services.get((route.namespace, ref.service))
            port = service.port(str(ref.port)) if service is not None else None
            if ref.problem or ref.weight == 0 or service is None or port is None:
                continue
            backends = self.backends(service, port)
            if not backends:
                continue
            name, n = ref.service, 1
            while name in names:  # a Service listed twice; never another Service's name
                name, n = f"{ref.service}-{n}", n + 1
            names.add(name)
            subsets.append(
                {"name": name, "weight": ref.weight, "endpoints": [b.address for b in backends]}
            )
            every.extend(backends)
        return subsets, every


@dataclass
class _ServicePart:
    """One Service's share of every captured pod's snapshot, measured as it is sent."""

    namespace: str
    name: str
    entries: list[tuple[PortKey, dict[str, Any], bytes]] = field(default_factory=list)
    passthrough: list[str] = field(default_factory=list)
    entry_bytes: int = 0
    containers: int = 0

    def add(self, key: PortKey, entry: dict[str, Any]) -> None:
        encoded = encode(entry)
        self.entries.append((key, entry, encoded))
        self.entry_bytes += len(encoded) + 1  # and its comma
        # Every object and array, as the agent counts them before parsing (an IPv6
        # address's bracket counts too: the bound is kept, never passed).
        self.containers += encoded.count(b"{") + encoded.count(b"[")

    @property
    def size(self) -> int:
        return self.entry_bytes + sum(len(a) + 3 for a in self.passthrough)


def _within_bounds(parts: list[_ServicePart], wide: MeshWide) -> list[_ServicePart]:
    """The Services that fit in every captured pod's snapshot together: all of them, or,
    past SHARED_BYTES or SHARED_CONTAINERS, all but some, left out one by one: the
    largest Service of the namespace that takes the most, until the rest fit.

    A snapshot past what the agent takes is refused whole, by every captured pod at
    once: one Service of thousands of ports (any namespace may create it) would cut
    the whole mesh off its config. Left out, the Services cost only their own
    callers: a call to their ClusterIPs follows outbound_traffic_policy (registry-only
    refuses it; a STRICT captured backend refuses the plain TCP allow-any sends), and
    an `outrider.io/upstreams` listener still reaches them. By namespace first, since
    whoever may create one huge Service may as well create a thousand small ones: those
    must not push another team's largest Service out. The control plane says what was
    left out (its log, /debug, outrider_control_captured_services_left_out)."""
    size = sum(p.size for p in parts)
    containers = sum(p.containers for p in parts)
    if size <= SHARED_BYTES and containers <= SHARED_CONTAINERS:
        return parts
    # Each namespace's Services, the largest last (popped first).
    smallest_first = sorted(parts, key=lambda p: (p.size, p.containers, p.name))
    by_namespace: dict[str, list[_ServicePart]] = {}
    for part in smallest_first:
        by_namespace.setdefault(part.namespace, []).append(part)
    taken = {
        ns: [sum(p.size for p in ps), sum(p.containers for p in ps)]
        for ns, ps in by_namespace.items()
    }
    dropped: set[tuple[str, str]] = set()
    while size > SHARED_BYTES or containers > SHARED_CONTAINERS:
        namespace = min(taken, key=lambda ns: (-taken[ns][0], -taken[ns][1], ns))
        part = by_namespace[namespace].pop()
        if not by_namespace[namespace]:
            del taken[namespace]
        else:
            taken[namespace][0] -= part.size
            taken[namespace][1] -= part.containers
        dropped.add((part.namespace, part.name))
        size -= part.size
        containers -= part.containers
    wide.left_out.extend(sorted(dropped))
    shown = ", ".join(f"{ns}/{name}" for ns, name in wide.left_out[:5])
    more = len(wide.left_out) - 5
    wide.warnings.append(
        f"{len(wide.left_out)} Service(s) left out of every captured pod's snapshot (of the"
        f" namespaces that take the most, the largest first): {shown}"
        f"{f' and {more} more' if more > 0 else ''}. The Services of the mesh may take"
        f" {SHARED_BYTES} bytes and {SHARED_CONTAINERS} arrays and objects of a snapshot"
        f" (an agent refuses one past {AGENT_SNAPSHOT_BYTES} bytes or"
        f" {AGENT_SNAPSHOT_CONTAINERS} arrays and objects). A captured call to their"
        " ClusterIPs follows outbound_traffic_policy; an outrider.io/upstreams listener"
        " still reaches them"
    )
    return [p for p in parts if (p.namespace, p.name) not in dropped]
