"""Where an upstream's endpoints come from, and how Kubernetes describes them.

Three sources:

- `StaticSource`: a fixed list of endpoints with weights, from the config.
- `DnsSource`: the addresses a name resolves to, looked up again every
  `refresh` seconds; every address gets weight 1.
- `KubernetesSource`: the pods behind a Service, read from its
  EndpointSlices (discovery.k8s.io/v1). Each address is dialled on `port`,
  the peer agent's inbound port, not on the port the slice lists. Watching
  them needs RBAC `get`, `list` and `watch` on `endpointslices` in the
  Service's namespace, and an API-server token: the pod's ServiceAccount
  token mounted in-cluster, not the `outrider-ca` audience token the agent
  shows the CA.

This module is the sans-IO part: `slice_endpoints` reads slices as the API
serves them (JSON dicts, camelCase) and `SliceCache` keeps one Service's
slices from a list and the watch events that follow it. The adapter
(agent/adapters/discovery.py) does the I/O.

Slices are read as kube-proxy reads them (pkg/proxy/endpointslicecache.go
and topology.go):

- only `IPv4` and `IPv6` slices; `FQDN` slices are skipped;
- the first address of each endpoint; the others are "fungible" per the API;
- `conditions.ready` absent or null means ready; `serving` absent defers to
  `ready`; `terminating` absent means not terminating;
- KEP-1672: when no endpoint of the Service is ready, the endpoints that are
  still serving while terminating are used instead, so a rollout or a scale
  to zero drains instead of dropping connections;
- several slices of one Service merge, and an address listed twice counts once.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from agent.core.endpoint import Endpoint
from identity.kubewatch import Expired, ObjectCache, WatchError

__all__ = [
    "SERVICE_NAME_LABEL",
    "DnsSource",
    "Expired",
    "KubernetesSource",
    "SliceCache",
    "Source",
    "StaticSource",
    "WatchError",
    "slice_endpoints",
]

#: The label the EndpointSlice controller puts on every slice of a Service.
SERVICE_NAME_LABEL = "kubernetes.io/service-name"

_FAMILIES = {"IPv4": 4, "IPv6": 6}


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port {port} is not in 1..65535")


@dataclass(frozen=True)
class StaticSource:
    """Fixed endpoints, each with its weight."""

    endpoints: tuple[tuple[Endpoint, int], ...]

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise ValueError("a static source needs at least one endpoint")
        for endpoint, weight in self.endpoints:
            _check_port(endpoint.port)
            if weight < 1:
                raise ValueError(f"weight of {endpoint} must be at least 1, not {weight}")


@dataclass(frozen=True)
class DnsSource:
    """Every address `host` resolves to, dialled on `port`, re-resolved each `refresh` seconds."""

    host: str
    port: int
    refresh: float = 5.0

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("a DNS source needs a host name")
        _check_port(self.port)
        if not self.refresh > 0:
            raise ValueError(f"DNS refresh must be positive, not {self.refresh}")


@dataclass(frozen=True)
class KubernetesSource:
    """The ready pods of Service `namespace/service`, each dialled on `port`."""

    service: str
    namespace: str
    port: int  # the port dialled on each address (the peer agent's inbound port, 15443)

    def __post_init__(self) -> None:
        if not self.service or not self.namespace:
            raise ValueError("a Kubernetes source needs a service and a namespace")
        _check_port(self.port)

    @property
    def label_selector(self) -> str:
        """Selects the Service's EndpointSlices."""
        return f"{SERVICE_NAME_LABEL}={self.service}"


Source = StaticSource | DnsSource | KubernetesSource


def slice_endpoints(slices: Iterable[Mapping[str, Any]], port: int) -> frozenset[Endpoint]:
    """The endpoints to send traffic to, from all the EndpointSlices of one Service.

    Ready endpoints; or, when none is ready, those serving while terminating
    (KEP-1672). Hosts are plain addresses, IPv6 without brackets.
    """
    ready: set[Endpoint] = set()
    draining: set[Endpoint] = set()
    for item in slices:
        for entry in item.get("endpoints") or ():
            host = endpoint_address(entry, item.get("addressType", ""))
            state = endpoint_state(entry)
            if host is not None and state is not None:
                (ready if state == "ready" else draining).add(Endpoint(host, port))
    return frozenset(ready or draining)


def endpoint_state(entry: Mapping[str, Any]) -> Literal["ready", "draining"] | None:
    """`ready`; `draining` if serving while terminating (used when none is ready); else None."""
    conditions = entry.get("conditions") or {}
    is_ready = conditions.get("ready") is not False
    serving = conditions.get("serving")
    is_serving = is_ready if serving is None else serving is True
    if is_ready:
        return "ready"
    if is_serving and conditions.get("terminating") is True:
        return "draining"
    return None


def endpoint_address(entry: Mapping[str, Any], address_type: str) -> str | None:
    """The endpoint's first address, canonical; None if missing, not of the slice's
    family, or the slice is not IPv4/IPv6 (FQDN: kube-proxy ignores these too)."""
    family = _FAMILIES.get(address_type)
    addresses = entry.get("addresses") or ()
    if family is None or not addresses or not isinstance(addresses[0], str):
        return None
    return _canonical(addresses[0], family)


@functools.lru_cache(maxsize=65536)  # a cluster's pod IPs, read again on every change
def _canonical(text: str, family: int) -> str | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(address) if address.version == family else None


class SliceCache(ObjectCache):
    """The slices of one Service, kept from a list and then the watch events after it."""

    def endpoints(self, port: int) -> frozenset[Endpoint]:
        return slice_endpoints(self.objects.values(), port)
