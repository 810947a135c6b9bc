"""Pods, Services and EndpointSlices -> each pod's inbound listeners and each upstream's endpoints.

Only injected pods count: those with the agent's container (`outrider-agent`,
as the injector names it) among their containers or init containers (the
native sidecar). A pod's inbound listeners are its TCP container ports, the
agent's own and 15000-15999 aside, in spec order: the i-th listens on
`inbound_base + i` and forwards to `127.0.0.1:<containerPort>`. A port's
protocol is its Services': a Service port's `appProtocol` read by
`identity.appprotocol.from_app_protocol` (`http`; `kubernetes.io/h2c`, `h2c`,
`http2`; `grpc`; anything else TCP), given to the container port its
targetPort (number or name) names in each pod it selects (`port_protocols`).

A captured pod (one with the capture init container, `outrider-capture`)
has every inbound connection redirected to its agent, whatever the port: it
gets no inbound listeners, and its L7 ports are listed in its snapshot's
`captured` section instead (mesh.py).

An upstream's endpoints are the addresses of its Service's EndpointSlices
whose targetRef is an injected pod, each at that pod's inbound listener for
the port the slice names; for a captured pod, at its IP and the app's own
port (the targetPort), where its agent's inbound capture takes the call.
The server identities a client checks come from those pods ("secure
naming"), so an address counts only where the slice and the pod agree, as
the EndpointSlice controller writes them: the targetRef
names a pod of the slice's own namespace, and the address is one of that
pod's IPs (status.podIPs). Whoever may write EndpointSlices by hand could
otherwise put a pod's identity on another address, or another namespace's
pod behind their Service. A hostNetwork pod is never an endpoint: its IP is
its node's, shared with every other such pod there. An address two pods of
different service accounts claim (one of them stale) is left out: which
identity serves it cannot be told.

Ready endpoints, or those serving while terminating when none is ready, as
kube-proxy reads slices (agent/core/discovery.py keeps the same rule for the
agent's own `kubernetes:` source).

Objects are the JSON the API server sends, so fields are checked with
`isinstance(x, dict)`: several times cheaper than the Mapping ABC, and these
run for every pod on every compile.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from agent.core.discovery import SERVICE_NAME_LABEL, endpoint_address, endpoint_state
from control.core.conditions import meta
from control.core.selectors import Selector
from identity.appprotocol import H2, L7, Protocol, from_app_protocol
from identity.capture import CaptureRulesError, flag_text, rules_from_flags
from identity.injected import AGENT_CONTAINER, AGENT_PORTS, CAPTURE_CONTAINER

__all__ = [
    "Backend",
    "Service",
    "ServicePort",
    "Workload",
    "host_port",
    "port_protocols",
    "read_service",
    "read_workload",
    "slice_backends",
]


@dataclass(frozen=True)
class Workload:
    """An injected pod, as far as its agent's configuration goes."""

    namespace: str
    name: str
    service_account: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    #: The app's TCP container ports, in inbound-listener order.
    ports: tuple[int, ...]
    #: containerPort name -> number, for named targetPorts.
    port_names: Mapping[str, int]
    #: What made the pod, for messages that should not change with every pod
    #: of a rollout: "ReplicaSet shop/web-5d9f7c", or "pod shop/web-0".
    owner: str = ""
    #: The pod's own IPs (status.podIPs), canonical; none for a hostNetwork pod,
    #: whose IP is its node's. An EndpointSlice address counts only if it is one.
    ips: frozenset[str] = frozenset()
    #: Its traffic is captured (the injector added CAPTURE_CONTAINER): its agent serves
    #: the app's own ports, and its Services' endpoints are its IP at the app's port.
    captured: bool = False
    #: The inbound ports its capture rules leave alone (the capture container's
    #: --exclude-inbound-ports): a call there reaches the app without the agent.
    uncaptured: frozenset[int] = frozenset()
    _index: Mapping[int, int] = field(default_factory=dict, repr=False, compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.namespace, self.name)

    def listener(self, port: int, inbound_base: int) -> int | None:
        """The agent's inbound listen port for the app's `port`; None if it serves none.
        Listeners stay in the agent's own range (15000-15999): past it, one could take
        a port the app listens on. A pod with more ports than fit gets the first ones."""
        index = self._index.get(port)
        if index is None or inbound_base + index not in AGENT_PORTS:
            return None
        return inbound_base + index

    def target(self, target: int | str) -> int | None:
        """A Service port's targetPort (a number, or a containerPort's name) in this pod."""
        return target if isinstance(target, int) else self.port_names.get(target)


def read_workload(obj: Mapping[str, Any], key: tuple[str, str]) -> Workload | None:
    """The pod, if it is injected and not finished; None otherwise."""
    spec = obj.get("spec") or {}
    if (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
        return None  # its agent is gone, and its IP may already be another pod's
    containers = _list(spec.get("containers"))
    init = _list(spec.get("initContainers"))
    if not any(isinstance(c, dict) and c.get("name") == AGENT_CONTAINER for c in containers + init):
        return None
    capture = next(
        (c for c in init if isinstance(c, dict) and c.get("name") == CAPTURE_CONTAINER), None
    )
    ports: list[int] = []
    names: dict[str, int] = {}
    for container in containers:
        if not isinstance(container, dict) or container.get("name") == AGENT_CONTAINER:
            continue
        for port in _list(container.get("ports")):
            number = port.get("containerPort") if isinstance(port, dict) else None
            if not _is_port(number) or port.get("protocol", "TCP") != "TCP":
                continue
            if number in AGENT_PORTS:
                continue
            if number not in ports:
                ports.append(number)
            if isinstance(port.get("name"), str):  # a port listed twice may be named once
                names.setdefault(port["name"], number)
    m = meta(obj, key)
    account = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
    return Workload(
        m.namespace,
        m.name,
        str(account),
        m.labels,
        m.annotations,
        tuple(ports),
        names,
        _owner(obj, m.namespace, m.name),
        frozenset() if spec.get("hostNetwork") is True else _pod_ips(obj.get("status")),
        capture is not None,
        _uncaptured(capture),
        {port: i for i, port in enumerate(ports)},
    )


def _uncaptured(capture: Mapping[str, Any] | None) -> frozenset[int]:
    """The inbound ports the capture container's `outrider capture apply` leaves alone, read
    as the command reads its flags (identity.capture). Flags it would refuse leave the pod
    uncaptured anyway: its init container fails, and the pod never runs."""
    if capture is None:
        return frozenset()
    args = [a for a in _list(capture.get("args")) if isinstance(a, str)]
    text = flag_text(args, "exclude_inbound_ports")
    if text is None:
        return frozenset()
    try:
        return frozenset(rules_from_flags(exclude_inbound_ports=text).exclude_inbound_ports)
    except CaptureRulesError:
        return frozenset()


def _pod_ips(status: object) -> frozenset[str]:
    """status.podIPs (and status.podIP), canonical, as endpoint_address writes them."""
    if not isinstance(status, dict):
        return frozenset()
    texts = [item.get("ip") for item in _list(status.get("podIPs")) if isinstance(item, dict)]
    texts.append(status.get("podIP"))
    ips = set()
    for text in texts:
        if isinstance(text, str):
            try:
                ips.add(str(ipaddress.ip_address(text)))
            except ValueError:
                continue
    return frozenset(ips)


def _owner(obj: Mapping[str, Any], namespace: str, name: str) -> str:
    refs = [
        r for r in _list((obj.get("metadata") or {}).get("ownerReferences")) if isinstance(r, dict)
    ]
    ref = next((r for r in refs if r.get("controller")), refs[0] if refs else None)
    if ref is None or not ref.get("kind") or not ref.get("name"):
        return f"pod {namespace}/{name}"
    return f"{ref['kind']} {namespace}/{ref['name']}"


@dataclass(frozen=True)
class ServicePort:
    name: str  # "" for a Service's only, unnamed port
    port: int
    target: int | str  # a number, or the name of a containerPort
    protocol: Protocol


@dataclass(frozen=True)
class Service:
    namespace: str
    name: str
    selector: Selector | None  # None: endpoints are managed by hand, no pods selected
    ports: tuple[ServicePort, ...]
    #: Its virtual IPs (spec.clusterIPs, else spec.clusterIP), canonical; none for a
    #: headless Service ("None") or an ExternalName one. A captured pod's connection to
    #: one of them at a port is a call to this Service.
    cluster_ips: tuple[str, ...] = ()

    def port(self, text: str) -> ServicePort | None:
        """The port named `text`, or numbered so."""
        for port in self.ports:
            if port.name == text or (text.isdecimal() and port.port == int(text)):
                return port
        return None


def read_service(obj: Mapping[str, Any], key: tuple[str, str]) -> Service:
    spec = obj.get("spec") or {}
    m = meta(obj, key)
    raw = spec.get("selector")
    selector = None
    if isinstance(raw, dict) and raw:
        selector = Selector.of_labels({str(k): str(v) for k, v in raw.items()})
    ports = []
    for item in _list(spec.get("ports")):
        if not isinstance(item, dict) or item.get("protocol", "TCP") != "TCP":
            continue
        number = item.get("port")
        if not _is_port(number):
            continue
        target = item.get("targetPort", number)
        if not (_is_port(target) or (isinstance(target, str) and target)):
            target = number
        app_protocol = item.get("appProtocol")
        protocol = from_app_protocol(app_protocol if isinstance(app_protocol, str) else None)
        ports.append(ServicePort(str(item.get("name") or ""), number, target, protocol))
    return Service(m.namespace, m.name, selector, tuple(ports), _cluster_ips(spec))


def port_protocols(
    services: Iterable[Service], index: PodIndex, warn: dict[tuple[str, str], list[str]]
) -> dict[tuple[str, str], dict[int, Protocol]]:
    """pod -> its L7 container ports (`identity.appprotocol.L7`) and what each speaks, from
    the Service ports that target them; every other port is TCP.

    Services are read in namespace/name order, so when two give one port different L7
    protocols the first one's holds, the same on every compile. `http2` and `grpc` are
    the same on the wire, so only HTTP/1.1 against h2c is a conflict: `warn[pod]` says
    which Service lost, since one of them describes the app wrongly.
    """
    found: dict[tuple[str, str], dict[int, Protocol]] = {}
    first: dict[tuple[tuple[str, str], int], str] = {}
    for service in sorted(services, key=lambda s: (s.namespace, s.name)):
        l7 = [p for p in service.ports if p.protocol in L7]
        if not l7 or service.selector is None:
            continue
        for workload in index.select(service.selector, service.namespace):
            ports = found.setdefault(workload.key, {})
            for port in l7:
                target = workload.target(port.target)
                if target is None:
                    continue
                where = f"Service {service.namespace}/{service.name} port {port.port}"
                held = ports.setdefault(target, port.protocol)
                first.setdefault((workload.key, target), f"{where} ({held})")
                if (held in H2) != (port.protocol in H2):
                    warn.setdefault(workload.key, []).append(
                        f"containerPort {target}: {where} says it speaks {port.protocol}, but"
                        f" {first[(workload.key, target)]} came first and holds; HTTP/1.1 and"
                        " h2c cannot share a port: fix the appProtocol of one of them"
                    )
    return found


def _cluster_ips(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """spec.clusterIPs (dual stack: one per family), else spec.clusterIP; "None" (headless)
    and "" (ExternalName, or not allocated yet) are no address."""
    texts = _list(spec.get("clusterIPs")) or [spec.get("clusterIP")]
    ips: list[str] = []
    for text in texts:
        if not isinstance(text, str) or text in ("", "None"):
            continue
        try:
            ip = str(ipaddress.ip_address(text))
        except ValueError:
            continue
        if ip not in ips:
            ips.append(ip)
    return tuple(ips)


def host_port(host: str, port: int) -> str:
    """`ip:port`, or `[v6]:port`: an address as agent.yaml writes it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True)
class Backend:
    """One endpoint of an upstream: where its agent listens, and whose it is."""

    #: host:port ([v6]:port) of the pod's agent inbound listener, or, for a captured
    #: pod, of the app itself: its agent's inbound capture takes the connection.
    address: str
    workload: Workload


def slice_backends(
    slices: Iterable[Mapping[str, Any]],
    port: ServicePort,
    workloads: Mapping[tuple[str, str], Workload],
    inbound_base: int,
    warn: dict[tuple[str, str], list[str]],
    service: tuple[str, str],
) -> tuple[Backend, ...]:
    """The injected pods behind a Service port, at their agents' inbound listeners.

    Ready ones, or, when none is ready, those serving while terminating. A pod
    whose target port is not one of its container ports has no agent listener
    for it: it is left out, and `warn[pod]` says why. An address counts only
    for a pod of the Service's namespace whose IP it is, and not at all if pods
    of two identities claim it (see the module's docstring). Slices are read
    in name order, so the answer does not depend on the order they were listed.
    """
    found: list[tuple[Backend, str]] = []
    for item in sorted(slices, key=_slice_name):
        address_type = item.get("addressType", "")
        names = {
            str(p.get("name") or ""): p.get("port")
            for p in _list(item.get("ports"))
            if isinstance(p, dict)
        }
        slice_port = names.get(port.name)
        for entry in _list(item.get("endpoints")):
            if not isinstance(entry, dict):
                continue
            workload = _target_pod(entry, service[0], workloads)
            host = endpoint_address(entry, address_type)
            state = endpoint_state(entry)
            if workload is None or host is None or state is None or host not in workload.ips:
                continue
            app_port = slice_port if _is_port(slice_port) else workload.target(port.target)
            if workload.captured:  # its agent takes the app's own port
                listen = app_port if app_port is not None and app_port not in AGENT_PORTS else None
                if listen is not None and listen in workload.uncaptured:
                    warn.setdefault(workload.key, []).append(_uncaptured_port(service, port))
                    continue
            else:
                listen = None if app_port is None else workload.listener(app_port, inbound_base)
            if listen is None:
                warn.setdefault(workload.key, []).append(_no_listener(service, port, workload))
                continue
            found.append((Backend(host_port(host, listen), workload), state))
    claims: dict[str, set[tuple[str, str]]] = {}
    for backend, _ in found:
        w = backend.workload
        claims.setdefault(backend.address, set()).add((w.namespace, w.service_account))
    ready: dict[str, Backend] = {}
    draining: dict[str, Backend] = {}
    for backend, serving in found:
        if len(claims[backend.address]) == 1:
            (ready if serving == "ready" else draining).setdefault(backend.address, backend)
    chosen = ready or draining
    return tuple(chosen[address] for address in sorted(chosen))


def _uncaptured_port(service: tuple[str, str], port: ServicePort) -> str:
    return (
        f"Service {'/'.join(service)} port {port.port} targets {port.target!r}, which the"
        " pod's capture rules leave alone (--exclude-inbound-ports): its agent never takes a"
        " call there, so it is no mTLS endpoint; callers reach it as plain TCP"
    )


def _no_listener(service: tuple[str, str], port: ServicePort, workload: Workload) -> str:
    where = f"Service {'/'.join(service)} port {port.port} targets {port.target!r}"
    if workload.captured:
        return (
            f"{where}, which is no port of this pod or one of the agent's own"
            f" ({AGENT_PORTS.start}-{AGENT_PORTS.stop - 1}); name a containerPort"
        )
    return (
        f"{where}, which is not a TCP containerPort of this pod, so its agent has no"
        " listener for it; declare the port in the pod spec"
    )


def _slice_name(item: Mapping[str, Any]) -> str:
    return str((item.get("metadata") or {}).get("name") or "")


def _target_pod(
    entry: Mapping[str, Any],
    namespace: str,
    workloads: Mapping[tuple[str, str], Workload],
) -> Workload | None:
    """The injected pod the endpoint names, if it is in the Service's own namespace."""
    ref = entry.get("targetRef")
    if not isinstance(ref, dict) or ref.get("kind") != "Pod":
        return None
    if ref.get("namespace", namespace) != namespace:
        return None
    return workloads.get((namespace, str(ref.get("name"))))


def slice_service(item: Mapping[str, Any]) -> str | None:
    """The Service an EndpointSlice belongs to (its `kubernetes.io/service-name` label)."""
    labels = (item.get("metadata") or {}).get("labels") or {}
    name = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
    return name if isinstance(name, str) and name else None


def _is_port(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _list(value: object) -> list[Any]:
    return value if isinstance(value, list) else []


class PodIndex:
    """Injected pods by namespace and by label, so a selector looks at few pods, not all.

    A selector with matchLabels starts from the pods carrying its rarest label
    and checks only those; one without (every pod, or expressions only) scans
    its scope. Built once per compile.
    """

    def __init__(self, workloads: Iterable[Workload]) -> None:
        self.every: list[Workload] = []
        self.by_namespace: dict[str, list[Workload]] = {}
        self._labels: dict[tuple[str | None, str, str], list[Workload]] = {}
        for workload in workloads:
            self.every.append(workload)
            self.by_namespace.setdefault(workload.namespace, []).append(workload)
            for label in workload.labels.items():
                self._labels.setdefault((workload.namespace, *label), []).append(workload)
                self._labels.setdefault((None, *label), []).append(workload)

    def select(self, selector: Selector, namespace: str | None) -> list[Workload]:
        """The pods `selector` matches in `namespace` (None: in every namespace)."""
        if selector.labels:
            candidates = min(
                (self._labels.get((namespace, *label), []) for label in selector.labels), key=len
            )
        else:
            candidates = self.every if namespace is None else self.by_namespace.get(namespace, [])
        return [w for w in candidates if selector.matches(w.labels)]
