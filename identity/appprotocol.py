"""What a port speaks: the one home of the protocol names that agent and control plane share.

A Service port's `appProtocol` picks it (`from_app_protocol`); the control
plane writes the name into each agent's listeners and captured ports, and the
agent serves the port by it. `tcp` is relayed as bytes; the L7 protocols are
parsed and every request authorized: `http` is HTTP/1.1 to the app, `http2`
and `grpc` are h2c to the app and h2 over mTLS between agents. `grpc` and
`http2` are the same on the wire: gRPC's rules (errors as gRPC statuses,
`grpc-timeout`, retries on UNAVAILABLE) follow each request's content-type,
so a gRPC call on an `http2` port gets them too.
"""

from __future__ import annotations

from typing import Final, Literal, get_args

__all__ = ["H2", "L7", "PROTOCOLS", "Protocol", "from_app_protocol"]

Protocol = Literal["tcp", "http", "http2", "grpc"]
PROTOCOLS: Final[tuple[Protocol, ...]] = get_args(Protocol)
#: Requests are parsed and authorized one by one (paths, methods, headers).
L7: Final = frozenset({"http", "http2", "grpc"})
#: The app speaks h2c; agents speak h2 (ALPN) to each other.
H2: Final = frozenset({"http2", "grpc"})

#: Service `appProtocol` values (Kubernetes' own `kubernetes.io/h2c`, the IANA names and
#: Istio's port-name prefixes) and the protocol each gets; any other value is TCP.
_APP_PROTOCOLS: Final[dict[str, Protocol]] = {
    "http": "http",
    "http2": "http2",
    "h2c": "http2",
    "kubernetes.io/h2c": "http2",
    "grpc": "grpc",
}


def from_app_protocol(value: str | None) -> Protocol:
    """The protocol a Service port with this `appProtocol` is served as (case-insensitive)."""
    return _APP_PROTOCOLS.get((value or "").strip().lower(), "tcp")
