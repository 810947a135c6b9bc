"""How captured traffic is served: the decisions of the capture listeners, without I/O.

The pod's nft rules (identity/capture.py) redirect inbound TCP to the
inbound capture port and the app's outbound TCP to the outbound capture port;
the agent reads where each connection was going (SO_ORIGINAL_DST) and asks
here what to do with it:

- inbound, original port P: strict (mTLS only) or permissive (mTLS, or
  plaintext let through and counted), tcp or http: `Captured.inbound(P)`;
  whether the first byte opens a TLS handshake: `looks_like_tls`;
- outbound, original destination D: `OutboundRoutes.route(D)`, in the order
  the control plane's contract gives: an upstream's Service address, a
  mesh endpoint's own address (mTLS pinned to it), a registry passthrough,
  then the mesh-wide policy for everything else.

A port of the agent's own capture listeners as the destination is a loop
(a connection redirected to the agent that would be sent to the agent
again) and is refused on both sides.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from agent.core.endpoint import Endpoint
from agent.core.policy import DEFAULT_POLICY, Decision
from identity.appprotocol import Protocol

MtlsMode = Literal["strict", "permissive"]
MTLS_MODES: tuple[MtlsMode, ...] = get_args(MtlsMode)
OutboundPolicy = Literal["allow-any", "registry-only"]
OUTBOUND_POLICIES: tuple[OutboundPolicy, ...] = get_args(OutboundPolicy)

#: The record type of a TLS handshake (RFC 8446 5.1): every ClientHello starts with it, and
#: neither HTTP/1 (a method's letter) nor h2c (`P` of its preface) nor most TCP protocols do.
TLS_HANDSHAKE = 0x16


def looks_like_tls(first: bytes) -> bool:
    """Whether a connection's first byte opens a TLS handshake (a ClientHello)."""
    return first[:1] == bytes([TLS_HANDSHAKE])


@dataclass(frozen=True)
class CapturedPort:
    """How inbound traffic to one original port is served."""

    mtls: MtlsMode = "strict"
    protocol: Protocol = "tcp"


@dataclass(frozen=True)
class PortOverride:
    """A port's settings that differ from the default (`captured.inbound.ports`)."""

    mtls: MtlsMode | None = None
    protocol: Protocol = "tcp"


@dataclass(frozen=True)
class Captured:
    """`captured:` of a snapshot (or a file): the defaults when absent."""

    mtls: MtlsMode = "strict"
    ports: tuple[tuple[int, PortOverride], ...] = ()  # sorted by port
    policy: OutboundPolicy = "allow-any"
    passthrough: frozenset[Endpoint] = frozenset()

    def inbound(self, port: int) -> CapturedPort:
        """How a connection to original port `port` is served (a pod lists a few ports:
        its HTTP ones and those whose mode differs; a scan is quicker than a dict's build)."""
        for listed, override in self.ports:
            if listed == port:
                return CapturedPort(override.mtls or self.mtls, override.protocol)
        return CapturedPort(self.mtls)


def admit_plaintext(decision: Decision) -> Decision:
    """The policy's decision on a permissive port's plaintext client (source None).

    A port made permissive is its owner's word that unauthenticated callers may
    come in while they migrate (Istio's PERMISSIVE): so where only
    default_action allow-authenticated would refuse them (no ALLOW policy applies
    to the port), they pass. A DENY, an ALLOW policy for the port that does not
    match them (one naming principals never does), and default_action deny still
    refuse them.
    """
    if decision.allowed or (decision.policy, decision.rule) != (
        DEFAULT_POLICY,
        "allow-authenticated",
    ):
        return decision
    return Decision(
        True,
        DEFAULT_POLICY,
        "permissive",
        "no ALLOW policy applies to the port, which is permissive: plaintext passes",
        decision.records,
    )


# -- outbound: where a connection to D goes ------------------------------------------------


@dataclass(frozen=True)
class ToUpstream:
    """D is a Service address of upstream `name`: served as its explicit listener would."""

    name: str


@dataclass(frozen=True)
class ToEndpoint:
    """D is an endpoint of upstream `name` (a pod of the mesh): mTLS to D itself."""

    name: str
    endpoint: Endpoint


@dataclass(frozen=True)
class Passthrough:
    """Plain TCP to D: a registry Service outside the mesh, or any address under allow-any."""

    reason: Literal["registry", "allow_any"]


@dataclass(frozen=True)
class Refused:
    reason: Literal["registry_only", "capture_loop"]


Route = ToUpstream | ToEndpoint | Passthrough | Refused


@dataclass(frozen=True)
class UpstreamAddresses:
    """What the routes need of one `outbound` entry."""

    name: str
    destinations: tuple[Endpoint, ...]
    endpoints: tuple[Endpoint, ...]  # its static endpoints (the mesh's pods)


def as_reported(endpoint: Endpoint) -> Endpoint:
    """`endpoint` as the kernel reports an original destination (agent/adapters/capture.py):
    an IP in its canonical text (fd00::2, not FD00:0::0002), an IPv4-mapped one as IPv4.

    An endpoint written another way would match no captured connection: under
    registry-only the mesh pod would be refused, under allow-any reached in plain.
    A name (no IP) is left as it is: no connection is ever reported by name.
    """
    try:
        ip = ipaddress.ip_address(endpoint.host)
    except ValueError:
        return endpoint
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return Endpoint(str(ip), endpoint.port)


class OutboundRoutes:
    """The outbound decision table, built once per config; `route` is a dict lookup."""

    def __init__(
        self,
        upstreams: Iterable[UpstreamAddresses],
        captured: Captured,
        capture_ports: frozenset[int],
    ) -> None:
        upstreams = list(upstreams)
        self.policy = captured.policy
        self.capture_ports = capture_ports
        routes: dict[Endpoint, Route] = dict.fromkeys(captured.passthrough, Passthrough("registry"))
        pinned: dict[Endpoint, Route] = {}
        for upstream in upstreams:
            for endpoint in upstream.endpoints:
                pinned.setdefault(as_reported(endpoint), ToEndpoint(upstream.name, endpoint))
        routes.update(pinned)  # an endpoint of the mesh is never passed through in plain
        for upstream in upstreams:
            routes.update(dict.fromkeys(upstream.destinations, ToUpstream(upstream.name)))
        self._routes = routes

    def route(self, destination: Endpoint) -> Route:
        if destination.port in self.capture_ports:
            return Refused("capture_loop")
        found = self._routes.get(destination)
        if found is not None:
            return found
        if self.policy == "registry-only":
            return Refused("registry_only")
        return Passthrough("allow_any")
