"""injector.yaml -> InjectorConfig, in one function that reports every error with its key path.

Every key has a default; `tls` is required by `outrider injector serve` only.

    listen: 0.0.0.0:9443
    tls: {cert_file: /etc/outrider/injector-tls/tls.crt,
          key_file: /etc/outrider/injector-tls/tls.key}    # reloaded when they change
    trust_domain: cluster.local
    system_namespace: outrider-system                      # never injected, nor kube-system
    native_sidecar: true            # false: a regular container, for clusters older than 1.29
    agent:
      image: ghcr.io/outrider/agent:0.1.0
      uid: 1337                                            # never 0
      log_level: info                                      # debug, info, warning, error
      resources: {requests: {cpu: 50m, memory: 64Mi}, limits: {cpu: "1", memory: 256Mi}}
      token_expiration_seconds: 3600                       # at least 600 (Kubernetes' minimum)
    ca:
      address: outrider-ca.outrider-system.svc:8443
      bundle_configmap: outrider-trust-bundle              # key bundle.pem, in each pod's namespace
    control:
      address: outrider-control.outrider-system.svc:15012  # every agent's config comes from here
    capture:                         # the outrider-capture init container (docs/injector.md)
      enabled: true                  # false: no capture; or label a namespace
                                     #   outrider.io/capture=disabled
      inbound_port: 15006            # the agent's ports for captured traffic
      outbound_port: 15007
      exclude_inbound_ports: []      # reach the app directly, in plain (15020 always does)
      exclude_outbound_ports: []     # the app's calls to these ports are not captured
      exclude_outbound_cidrs: []     # nor to these networks, e.g. [169.254.169.254/32]
    workload_api:                    # the agent's SPIFFE Workload API socket in the pod
      enabled: false                 # true: every pod, but those annotated
                                     #   outrider.io/workload-api: "disabled"
    limits:
      max_body_bytes: 3145728        # per AdmissionReview; at least 65536
      max_json_depth: 64             # at least 32
      max_connections: 1000          # TLS handshakes included; more are closed at once
      handshake_timeout: 10s
      idle_timeout: 60s              # a connection with no request answered this long
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from identity import InvalidSpiffeId, TrustDomain
from identity.capture import CaptureRules, CaptureRulesError
from identity.configfile import ConfigError, ConfigReader, Listen, read_yaml
from identity.serving import ConnectionLimits, read_limits
from injector.core.settings import (
    LOG_LEVELS,
    AgentSettings,
    CaptureSettings,
    CaSettings,
    ControlSettings,
    Quantity,
    ResourceList,
    Resources,
    Settings,
    WorkloadApiSettings,
    is_dns_label,
    is_dns_subdomain,
)

__all__ = ["ConfigError", "InjectorConfig", "Limits", "TlsFiles", "load", "parse"]

MIN_TOKEN_SECONDS = 600  # the API server refuses shorter projected tokens


@dataclass(frozen=True)
class TlsFiles:
    cert_file: Path
    key_file: Path


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 3 * 1024 * 1024  # the API server's own request limit is 3 MiB
    max_json_depth: int = 64
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)


@dataclass(frozen=True)
class InjectorConfig:
    settings: Settings = field(default_factory=Settings)
    listen: Listen = Listen("0.0.0.0", 9443)  # noqa: S104 - the API server calls in
    tls: TlsFiles | None = None
    limits: Limits = field(default_factory=Limits)


def load(path: Path, *, require_tls: bool = False) -> InjectorConfig:
    """Read and validate `path`; raise ConfigError listing every problem."""
    return parse(read_yaml(path), base=path.parent, source=str(path), require_tls=require_tls)


def parse(
    raw: object, *, base: Path, source: str = "config", require_tls: bool = False
) -> InjectorConfig:
    reader = _Reader(base)
    config = reader.config(raw, require_tls)
    reader.check(source)
    return config


_TOP = {
    "listen",
    "tls",
    "trust_domain",
    "system_namespace",
    "native_sidecar",
    "agent",
    "ca",
    "control",
    "capture",
    "workload_api",
    "limits",
}
_LIMITS = {"max_body_bytes", "max_json_depth"} | set(ConnectionLimits.__annotations__)
_AGENT = {"image", "uid", "log_level", "resources", "token_expiration_seconds"}
_CAPTURE = set(CaptureSettings.__annotations__)


class _Reader(ConfigReader):
    def config(self, raw: object, require_tls: bool) -> InjectorConfig:
        top = self.mapping(raw, "", _TOP)
        defaults = Settings()
        settings = Settings(
            trust_domain=self.trust_domain(top.get("trust_domain"), defaults.trust_domain),
            system_namespace=self.name(top, "system_namespace", defaults.system_namespace),
            native_sidecar=self.boolean(top, "native_sidecar", defaults.native_sidecar),
            agent=self.agent(self.section(top, "agent", _AGENT)),
            ca=self.ca(self.section(top, "ca", {"address", "bundle_configmap"})),
            control=self.control(self.section(top, "control", {"address"})),
            capture=self.capture(self.section(top, "capture", _CAPTURE)),
            workload_api=self.workload_api(self.section(top, "workload_api", {"enabled"})),
        )
        return InjectorConfig(
            settings,
            self.listen(top, "listen", "listen", InjectorConfig.listen),
            self.tls(self.section(top, "tls", {"cert_file", "key_file"}), require_tls),
            self.limits(self.section(top, "limits", _LIMITS)),
        )

    def trust_domain(self, value: object, default: TrustDomain) -> TrustDomain:
        if value is None:
            return default
        try:
            return TrustDomain.parse(str(value))
        except InvalidSpiffeId as exc:
            self.fail("trust_domain", str(exc))
            return default

    def name(self, raw: Mapping[str, Any], key: str, default: str) -> str:
        value = self.string(raw, key, key, default) or default
        if not is_dns_label(value):
            self.fail(key, "must be a DNS label (a-z, 0-9, '-', at most 63)")
        return value

    def boolean(
        self, raw: Mapping[str, Any], key: str, default: bool, path: str | None = None
    ) -> bool:
        value = raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(path or key, "must be true or false")
            return default
        return value

    def agent(self, raw: Mapping[str, Any]) -> AgentSettings:
        d = AgentSettings()
        image = self.string(raw, "image", "agent.image", d.image) or d.image
        if any(c.isspace() for c in image):
            self.fail("agent.image", "must not contain whitespace")
        log_level = self.string(raw, "log_level", "agent.log_level", d.log_level) or d.log_level
        if log_level not in LOG_LEVELS:
            self.fail("agent.log_level", f"must be one of {', '.join(LOG_LEVELS)}")
        return AgentSettings(
            image=image,
            uid=self.integer(raw, "uid", "agent.uid", d.uid),  # >= 1: never root
            log_level=log_level,
            resources=self.resources(self.section(raw, "agent.resources", {"requests", "limits"})),
            token_expiration_seconds=self.integer(
                raw,
                "token_expiration_seconds",
                "agent.token_expiration_seconds",
                d.token_expiration_seconds,
                minimum=MIN_TOKEN_SECONDS,
            ),
        )

    def resources(self, raw: Mapping[str, Any]) -> Resources:
        d = Resources()
        requests = self.resource_list(raw, "requests", d.requests)
        limits = self.resource_list(raw, "limits", d.limits)
        for kind in ("cpu", "memory"):
            if getattr(requests, kind).value > getattr(limits, kind).value:
                self.fail(f"agent.resources.requests.{kind}", "exceeds the limit")
        return Resources(requests, limits)

    def resource_list(
        self, raw: Mapping[str, Any], key: str, default: ResourceList
    ) -> ResourceList:
        path = f"agent.resources.{key}"
        section = self.section(raw, path, {"cpu", "memory"})
        return ResourceList(
            self.quantity(section, "cpu", f"{path}.cpu", default.cpu),
            self.quantity(section, "memory", f"{path}.memory", default.memory),
        )

    def quantity(self, raw: Mapping[str, Any], key: str, path: str, default: Quantity) -> Quantity:
        if key not in raw:
            return default
        try:
            return Quantity.parse(str(raw[key]))
        except ValueError as exc:
            self.fail(path, str(exc))
            return default

    def ca(self, raw: Mapping[str, Any]) -> CaSettings:
        d = CaSettings()
        address = self.address(raw, "ca.address", d.address)
        configmap = self.string(raw, "bundle_configmap", "ca.bundle_configmap", None)
        if configmap is not None and not is_dns_subdomain(configmap):
            self.fail("ca.bundle_configmap", "must be a ConfigMap name (a DNS subdomain)")
        return CaSettings(address, configmap or d.bundle_configmap)

    def control(self, raw: Mapping[str, Any]) -> ControlSettings:
        return ControlSettings(self.address(raw, "control.address", ControlSettings.address))

    def capture(self, raw: Mapping[str, Any]) -> CaptureSettings:
        """`capture:`, checked by the capture command's own rules (each problem under its
        key) and, for the two capture ports, against the agent's other ports."""
        d = CaptureSettings()
        enabled = self.boolean(raw, "enabled", d.enabled, "capture.enabled")
        failed = len(self.errors)
        given: dict[str, Any] = {
            key: raw.get(key, getattr(d, key)) for key in ("inbound_port", "outbound_port")
        }
        for key in ("exclude_inbound_ports", "exclude_outbound_ports", "exclude_outbound_cidrs"):
            given[key] = tuple(self.items(raw, key, f"capture.{key}"))
        try:
            rules = CaptureRules(**given)
        except CaptureRulesError as exc:
            for name, why in exc.problems:
                self.fail(f"capture.{name}", why)
            return replace(d, enabled=enabled)
        if len(self.errors) > failed:
            return replace(d, enabled=enabled)
        return CaptureSettings(
            enabled,
            rules.inbound_port,
            rules.outbound_port,
            rules.exclude_inbound_ports,
            rules.exclude_outbound_ports,
            rules.exclude_outbound_cidrs,
        )

    def workload_api(self, raw: Mapping[str, Any]) -> WorkloadApiSettings:
        d = WorkloadApiSettings()
        return WorkloadApiSettings(self.boolean(raw, "enabled", d.enabled, "workload_api.enabled"))

    def address(self, raw: Mapping[str, Any], path: str, default: str) -> str:
        """host:port to connect to, under the last part of `path`."""
        address = self.string(raw, "address", path, default) or default
        try:
            if Listen.parse(address).port == 0:
                self.fail(path, "port 0 is not a port to connect to")
        except ValueError as exc:
            self.fail(path, str(exc))
        return address

    def tls(self, raw: Mapping[str, Any], required: bool) -> TlsFiles | None:
        cert = self.file(raw, "cert_file", "tls.cert_file")
        key = self.file(raw, "key_file", "tls.key_file")
        if required:
            for path, value in (("tls.cert_file", cert), ("tls.key_file", key)):
                if value is None:
                    self.fail(path, "required: the webhook serves HTTPS only")
        return TlsFiles(cert, key) if cert is not None and key is not None else None

    def limits(self, raw: Mapping[str, Any]) -> Limits:
        d = Limits()
        # Below these minimums no real pod would get through.
        return Limits(
            self.integer(
                raw, "max_body_bytes", "limits.max_body_bytes", d.max_body_bytes, minimum=65536
            ),
            self.integer(
                raw, "max_json_depth", "limits.max_json_depth", d.max_json_depth, minimum=32
            ),
            read_limits(self, raw, "limits", d.connections),
        )
