"""control.yaml -> ControlConfig, in one function that reports every error with its key path.

trust_domain: example.org                     # required: agents' SVIDs must be of it
listen: 0.0.0.0:15012                         # gRPC, TLS 1.3, a client SVID required
debug: 127.0.0.1:15014                        # HTTP: /debug/*, /healthz, /ready, /metrics
status: 0.0.0.0:15015                         # optional: /healthz, /ready, /metrics only
tls:                                          # required: the control plane's own SVID,
  cert_file: /var/run/outrider/svid.pem       # re-read when the files change
  key_file: /var/run/outrider/svid.key
  bundle_file: /var/run/outrider/bundle.pem   # agents' SVIDs must chain to it
kubeconfig: /path/kubeconfig                  # optional (or --kubeconfig); else in-cluster
mesh_namespace: outrider-system               # its policies apply to every pod
default_action: allow-authenticated           # or deny
outbound_traffic_policy: allow-any            # or registry-only: captured calls outside the mesh
limits:                                       # what a caller can hold
  max_connections: 20000                      # TLS handshakes included; one per agent
  handshake_timeout: 10s
  idle_timeout: 60s                           # a connection that subscribes to nothing
  max_message_bytes: 65536                    # one message from an agent (a Nack's text)
  max_concurrent_streams: 4                   # per connection; an agent needs one
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.core.captured import OUTBOUND_POLICIES
from identity import InvalidSpiffeId, TrustDomain
from identity.configfile import ConfigError, ConfigReader, Listen, read_yaml
from identity.grpcserving import GrpcLimits
from identity.serving import ConnectionLimits, read_limits

__all__ = ["ConfigError", "ControlConfig", "ControlLimits", "TlsFiles", "load", "parse"]

DEFAULT_ACTIONS = ("allow-authenticated", "deny")
#: What a captured pod's agent does with a connection to an address that is neither a
#: Service of the cluster nor a pod of the mesh: pass it through, or refuse it (the
#: agent's own list: it is the agent that reads the value).
OUTBOUND_TRAFFIC_POLICIES = OUTBOUND_POLICIES
MIN_MESSAGE_BYTES = 4096  # a Nack's error text is cut to fit; below this nothing useful would


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path
    key_file: Path
    bundle_file: Path


@dataclass(frozen=True)
class ControlLimits:
    # Every agent of the cluster holds one connection.
    connections: ConnectionLimits = field(
        default_factory=lambda: ConnectionLimits(max_connections=20_000)
    )
    grpc: GrpcLimits = field(
        default_factory=lambda: GrpcLimits(max_message_bytes=65_536, max_concurrent_streams=4)
    )


@dataclass(frozen=True)
class ControlConfig:
    trust_domain: TrustDomain
    tls: TlsFiles
    listen: Listen = Listen("0.0.0.0", 15012)  # noqa: S104 - every agent of the cluster calls in
    debug: Listen = Listen("127.0.0.1", 15014)
    kubeconfig: Path | None = None
    mesh_namespace: str = "outrider-system"
    default_action: str = "allow-authenticated"
    outbound_traffic_policy: str = "allow-any"
    limits: ControlLimits = field(default_factory=ControlLimits)
    #: Probes and metrics only, for the kubelet and Prometheus on the pod network; the
    #: debug port shows every pod's policies, so it stays on loopback.
    status: Listen | None = None


_TOP = {
    "status",
    "trust_domain",
    "listen",
    "debug",
    "tls",
    "kubeconfig",
    "mesh_namespace",
    "default_action",
    "outbound_traffic_policy",
    "limits",
}
_TLS = {"cert_file", "key_file", "bundle_file"}
_LIMITS = set(ConnectionLimits.__annotations__) | set(GrpcLimits.__annotations__)
_PLACEHOLDER = TlsFiles(Path(), Path(), Path())


def load(path: Path, *, kubeconfig: Path | None = None) -> ControlConfig:
    """Read and validate `path`; raise ConfigError listing every problem.

    `kubeconfig` (the command's flag) wins over the file's key.
    """
    config = parse(read_yaml(path), base=path.parent, source=str(path))
    if kubeconfig is not None:
        config = ControlConfig(**{**config.__dict__, "kubeconfig": kubeconfig})
    return config


def parse(raw: object, *, base: Path, source: str = "config") -> ControlConfig:
    reader = _Reader(base)
    config = reader.config(raw)
    if reader.errors or config is None:
        raise ConfigError(source, reader.errors)
    return config


class _Reader(ConfigReader):
    def config(self, raw: object) -> ControlConfig | None:
        top = self.mapping(raw, "", _TOP)
        trust_domain = self.trust_domain(top.get("trust_domain"))
        tls = self.tls(self.section(top, "tls", _TLS))
        d = ControlConfig(TrustDomain("example.org"), _PLACEHOLDER)
        listen = self.listen(top, "listen", "listen", d.listen)
        debug = self.listen(top, "debug", "debug", d.debug)
        status = None
        if top.get("status") is not None:
            status = self.listen(top, "status", "status", Listen("0.0.0.0", 15015))  # noqa: S104
            if status.clashes(debug) or status.clashes(listen):
                self.fail("status", f"{status} is also the address of debug or listen")
        kubeconfig = self.file(top, "kubeconfig", "kubeconfig")
        mesh_namespace = self.string(top, "mesh_namespace", "mesh_namespace", d.mesh_namespace)
        action = self.string(top, "default_action", "default_action", d.default_action)
        if action not in DEFAULT_ACTIONS:
            self.fail("default_action", f"must be one of {', '.join(DEFAULT_ACTIONS)}")
        outbound = self.string(
            top, "outbound_traffic_policy", "outbound_traffic_policy", d.outbound_traffic_policy
        )
        if outbound not in OUTBOUND_TRAFFIC_POLICIES:
            ours = str(outbound).lower().replace("_", "-")
            hint = (
                f" (Istio's {outbound} is {ours} here)" if ours in OUTBOUND_TRAFFIC_POLICIES else ""
            )
            self.fail(
                "outbound_traffic_policy",
                f"must be one of {', '.join(OUTBOUND_TRAFFIC_POLICIES)}{hint}",
            )
        limits = self.limits(self.section(top, "limits", _LIMITS))
        if trust_domain is None or tls is None:
            return None
        return ControlConfig(
            trust_domain,
            tls,
            listen,
            debug,
            kubeconfig,
            mesh_namespace or d.mesh_namespace,
            action or d.default_action,
            outbound or d.outbound_traffic_policy,
            limits,
            status,
        )

    def trust_domain(self, value: object) -> TrustDomain | None:
        if value is None:
            self.fail("trust_domain", "required: agents' SVIDs must be of this trust domain")
            return None
        try:
            return TrustDomain.parse(str(value))
        except InvalidSpiffeId as exc:
            self.fail("trust_domain", str(exc))
            return None

    def tls(self, raw: Mapping[str, Any]) -> TlsFiles | None:
        cert, key, bundle = (
            self.file(raw, name, f"tls.{name}") for name in ("cert_file", "key_file", "bundle_file")
        )
        for name, value in (("cert_file", cert), ("key_file", key), ("bundle_file", bundle)):
            if value is None and f"tls.{name}: must be a non-empty string" not in self.errors:
                self.fail(f"tls.{name}", "required: agents reach the control plane over mTLS only")
        if cert is None or key is None or bundle is None:
            return None
        return TlsFiles(cert, key, bundle)

    def limits(self, raw: Mapping[str, Any]) -> ControlLimits:
        d = ControlLimits()
        grpc = GrpcLimits(
            self.integer(
                raw,
                "max_message_bytes",
                "limits.max_message_bytes",
                d.grpc.max_message_bytes,
                minimum=MIN_MESSAGE_BYTES,
            ),
            self.integer(
                raw,
                "max_concurrent_streams",
                "limits.max_concurrent_streams",
                d.grpc.max_concurrent_streams,
            ),
        )
        return ControlLimits(read_limits(self, raw, "limits", d.connections), grpc)
