"""What the injector puts into every pod, and the value checks it shares with injector.yaml.

`Settings` is the typed form of injector.yaml's pod-facing keys (injector/config.py
reads the file into it). Names and quantities are checked with Kubernetes' own
grammars, matched against the whole value: a trailing newline is not a name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from decimal import Decimal
from typing import Any

from identity import TrustDomain
from identity.capture import CaptureRules
from identity.injected import (
    ADMIN_PORT,
    AGENT_UID,
    INBOUND_CAPTURE_PORT,
    OUTBOUND_CAPTURE_PORT,
    STATUS_PORT,
)

__all__ = [
    "ADMIN_PORT",
    "LOG_LEVELS",
    "STATUS_PORT",
    "AgentSettings",
    "CaSettings",
    "CaptureSettings",
    "ControlSettings",
    "Quantity",
    "ResourceList",
    "Resources",
    "Settings",
    "WorkloadApiSettings",
    "described",
    "is_dns_label",
    "is_dns_subdomain",
]

LOG_LEVELS = ("debug", "info", "warning", "error")

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
#: A number, then a suffix: binary (Ki ...), decimal (m, k ...) or a decimal exponent
#: (1e9, 5E-3), as Kubernetes' resource.Quantity reads one.
_QUANTITY = re.compile(
    r"(\d+(?:\.\d+)?|\.\d+)(?:(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)|[eE]([+-]?\d{1,3}))?",
    re.ASCII,  # digits 0-9 only, as the API server reads them (not a fullwidth one)
)
_SUFFIX: dict[str | None, Decimal] = {
    None: Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    **{s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")},
    **{s + "i": Decimal(1024) ** (i + 1) for i, s in enumerate("KMGTPE")},
}
_MAX_QUANTITY_CHARS = 24  # "1000000000000Gi" is 15; longer is a typo or an attack


def is_dns_label(name: str) -> bool:
    """RFC 1123 label: namespaces, container and upstream names."""
    return _DNS_LABEL.fullmatch(name) is not None


def described(container: Mapping[str, Any]) -> str:
    """A container as a warning names it: never the author's text unless it is a name."""
    name = container.get("name")
    if isinstance(name, str) and is_dns_label(name):
        return f"container {name}"
    return "a container"  # the API server refuses it anyway


def is_dns_subdomain(name: str) -> bool:
    """RFC 1123 subdomain: ConfigMap names and service host names."""
    return len(name) <= 253 and all(is_dns_label(label) for label in name.split("."))


@dataclass(frozen=True)
class Quantity:
    """A Kubernetes resource quantity (`50m`, `64Mi`, `1`), positive, in its written form."""

    text: str
    value: Decimal = field(compare=False)

    @classmethod
    def parse(cls, text: str) -> Quantity:
        match = _QUANTITY.fullmatch(text) if len(text) <= _MAX_QUANTITY_CHARS else None
        if match is None:
            raise ValueError("not a quantity like 100m, 0.5, 64Mi, 1G or 1e9")
        scale = Decimal(10) ** int(match[3]) if match[3] else _SUFFIX[match[2]]
        value = Decimal(match[1]) * scale
        if value <= 0:
            raise ValueError("must be more than zero")
        return cls(text, value)

    def __str__(self) -> str:
        return self.text


@dataclass(frozen=True)
class ResourceList:
    cpu: Quantity
    memory: Quantity

    def as_dict(self) -> dict[str, str]:
        return {"cpu": self.cpu.text, "memory": self.memory.text}


@dataclass(frozen=True)
class Resources:
    requests: ResourceList = ResourceList(Quantity.parse("50m"), Quantity.parse("64Mi"))
    limits: ResourceList = ResourceList(Quantity.parse("1"), Quantity.parse("256Mi"))


@dataclass(frozen=True)
class AgentSettings:
    image: str = "ghcr.io/outrider/agent:0.1.0"
    uid: int = AGENT_UID
    log_level: str = "info"
    resources: Resources = Resources()
    token_expiration_seconds: int = 3600


@dataclass(frozen=True)
class CaSettings:
    address: str = "outrider-ca.outrider-system.svc:8443"
    bundle_configmap: str = "outrider-trust-bundle"


@dataclass(frozen=True)
class ControlSettings:
    """Where every agent subscribes to its config (the control plane's Service)."""

    address: str = "outrider-control.outrider-system.svc:15012"


@dataclass(frozen=True)
class CaptureSettings:
    """What the `outrider-capture` init container redirects, and where to.

    Only this file (the cluster operator's) decides it: no pod annotation can turn
    capture off or exclude a port, or an app team could go around strict mTLS. The
    rules themselves are the capture command's (identity/capture.py CaptureRules,
    which checks every value); `Settings.capture_rules` makes them. Here: what
    only the injector knows, that the capture ports are not the agent's others.
    """

    enabled: bool = True
    inbound_port: int = INBOUND_CAPTURE_PORT
    outbound_port: int = OUTBOUND_CAPTURE_PORT
    exclude_inbound_ports: tuple[int, ...] = ()  # beyond the status port, always excluded
    exclude_outbound_ports: tuple[int, ...] = ()
    exclude_outbound_cidrs: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        rules_for(self, CaptureRules.agent_uid)  # CaptureRulesError (a ValueError) if not


def rules_for(capture: CaptureSettings, agent_uid: int) -> CaptureRules:
    """The capture command's rules for these settings: the status port never captured
    inbound (the kubelet's probes, rewritten to it, reach it in plain)."""
    return CaptureRules(
        inbound_port=capture.inbound_port,
        outbound_port=capture.outbound_port,
        agent_uid=agent_uid,
        exclude_inbound_ports=(STATUS_PORT, *capture.exclude_inbound_ports),
        exclude_outbound_ports=capture.exclude_outbound_ports,
        exclude_outbound_cidrs=capture.exclude_outbound_cidrs,
    )


@dataclass(frozen=True)
class WorkloadApiSettings:
    """Whether pods get the agent's SPIFFE Workload API socket without asking.

    Off by default: the socket hands the pod's private key to any process of the
    pod that asks, so a pod has it only when its author (the annotation
    outrider.io/workload-api: "enabled") or the operator (this) wants it; with it
    on, a pod opts out with "disabled".
    """

    enabled: bool = False


#: The control plane's service account in the system namespace: its SVID is the one
#: identity the agents take config from.
CONTROL_ACCOUNT = "outrider-control"

_CLUSTER_LOCAL = TrustDomain("cluster.local")


@dataclass(frozen=True)
class Settings:
    trust_domain: TrustDomain = _CLUSTER_LOCAL
    system_namespace: str = "outrider-system"
    native_sidecar: bool = True
    agent: AgentSettings = AgentSettings()
    ca: CaSettings = CaSettings()
    control: ControlSettings = ControlSettings()
    capture: CaptureSettings = CaptureSettings()
    workload_api: WorkloadApiSettings = WorkloadApiSettings()

    @property
    def agent_ports(self) -> frozenset[int]:
        """The ports the agent serves in every pod (admin, status and, with capture on,
        the capture ports): no probe of the app's is performed on them."""
        ports = {ADMIN_PORT, STATUS_PORT}
        if self.capture.enabled:
            ports |= {self.capture.inbound_port, self.capture.outbound_port}
        return frozenset(ports)

    def capture_rules(self) -> CaptureRules:
        """What the pods' `outrider capture apply` is told (core/sidecar.py writes it)."""
        return rules_for(self.capture, self.agent.uid)

    def without_capture(self) -> Settings:
        """These settings for a namespace labelled outrider.io/capture=disabled."""
        return replace(self, capture=replace(self.capture, enabled=False))
