"""Pod annotations -> the agent's options, each value checked against a strict grammar.

Annotation values come from whoever may create a pod, so they are data: each
is parsed into typed values (quantities, log levels) and only those typed
values reach the pod. A value that does not parse is dropped whole: that
setting keeps its default and a warning names the annotation and the problem,
never the value (it may hold newlines or terminal escapes). The pod is never
refused for an annotation.

What is left to pod authors is what is safe to leave to them: the agent's
resources, its log level, and whether the pod's containers get the agent's
SPIFFE Workload API socket (the pod's own SVID). Listeners, upstreams and
policy come from the control plane (agent.yaml's `control:`), so no
annotation can weaken policy.

    outrider.io/agent-cpu: "200m"              the agent's CPU request, capped at the limit
    outrider.io/agent-memory: "128Mi"          the agent's memory request, capped at the limit
    outrider.io/log-level: "debug"             debug, info, warning or error
    outrider.io/workload-api: "enabled"        or "disabled"; default: injector.yaml workload_api
    outrider.io/upstreams: "backend:8080"      read by the control plane, not here (no warning)
    outrider.io/access-log: "denied"           off, denied or all: JSON lines on stdout
    outrider.io/tracing-endpoint: "otel-collector.obs:4318"   OTLP/HTTP receiver for spans
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from identity.injected import (
    ACCESS_LOG_ANNOTATION,
    TRACING_ENDPOINT_ANNOTATION,
    WORKLOAD_API_ANNOTATION,
)
from injector.core.settings import (
    ADMIN_PORT,
    LOG_LEVELS,
    STATUS_PORT,
    Quantity,
    Resources,
    Settings,
)

__all__ = ["ADMIN_PORT", "STATUS_PORT", "AgentOptions", "read_options"]

PREFIX = "outrider.io/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
UPSTREAMS = PREFIX + "upstreams"  # the control plane's to read: docs/injector.md
AGENT_CPU = PREFIX + "agent-cpu"
AGENT_MEMORY = PREFIX + "agent-memory"
LOG_LEVEL = PREFIX + "log-level"
WORKLOAD_API = WORKLOAD_API_ANNOTATION
ACCESS_LOG = ACCESS_LOG_ANNOTATION
TRACING_ENDPOINT = TRACING_ENDPOINT_ANNOTATION
ACCESS_LOG_MODES = ("off", "denied", "all")
#: host:port: a DNS name or an IPv4 address, or [IPv6]; nothing else reaches the config.
_HOST_PORT = re.compile(
    r"(?:[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|\[[0-9A-Fa-f:.]{2,45}\]):(\d{1,5})",
    re.ASCII,
)
#: The values of a switch annotation, and what each means.
SWITCH = {"enabled": True, "disabled": False}

#: Annotations that used to configure the agent, and what took their place: a pod
#: author who still writes one is told, rather than left to believe it works.
GONE = {
    PREFIX + "inbound-ports": (
        "no longer read, ignored; declare the app's ports as containerPorts: the control "
        "plane gives the agent an inbound listener for each TCP one"
    ),
    PREFIX + "policy": (
        "no longer read, ignored; write an AuthorizationPolicy (security.outrider.io/v1alpha1) "
        "in the pod's namespace: policy applies by namespace and selector, not by annotation"
    ),
}

#: Annotations a pod author may try, as Istio's (`traffic.sidecar.istio.io/...`), to go
#: around capture: only the cluster operator decides it (injector.yaml `capture:` and the
#: namespace label outrider.io/capture=disabled), so that strict mTLS means what it says.
_CAPTURE_IS_NOT_YOURS = (
    "ignored: capture is the cluster's to set (injector.yaml capture:, or the namespace "
    "label outrider.io/capture=disabled), never a pod's"
)
REFUSED = {
    PREFIX + key: _CAPTURE_IS_NOT_YOURS
    for key in (
        "capture",
        "exclude-inbound-ports",
        "exclude-outbound-ports",
        "exclude-outbound-cidrs",
    )
}

#: Outrider's annotations that are not options for the agent: no warning for these.
_NOT_OURS = (INJECT, STATUS, UPSTREAMS)
_SHOWN_KEY = re.compile(r"[A-Za-z0-9./_-]{1,100}")


#: What the agent's main process and each worker take, with room over what the bench
#: measures idle (54 and 48 MiB RSS: docs/agent.md, "workers").
MAIN_BYTES = 64 * 1024 * 1024
WORKER_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class AgentOptions:
    resources: Resources
    log_level: str
    workload_api: bool = False  # the Workload API socket in the pod (core/workload.py)
    access_log: str = "off"  # access_log.mode
    tracing_endpoint: str = ""  # tracing.otlp_endpoint; "": no spans

    @property
    def workers(self) -> int:
        """The agent's `workers:`: one per whole CPU of its container's limit (1500m: 1; a
        second worker would share the first's CPU time and add its memory), as many as
        its memory limit holds beside the main process (WORKER_BYTES each): 4 CPUs in
        the default 256Mi are 3 workers, not 4 the kernel would kill the agent for."""
        by_cpu = int(self.resources.limits.cpu.value)
        by_memory = int((self.resources.limits.memory.value - MAIN_BYTES) // WORKER_BYTES)
        return max(1, min(by_cpu, by_memory))

    @property
    def observe(self) -> dict[str, Any]:
        """The agent config's sections these options ask for: access_log and tracing, and
        `workers` when its CPU limit is 2 or more (one process below: as ever)."""
        sections: dict[str, Any] = {}
        if self.workers > 1:
            sections["workers"] = self.workers
        if self.access_log != "off":
            sections["access_log"] = {"mode": self.access_log}
        if self.tracing_endpoint:
            sections["tracing"] = {"otlp_endpoint": self.tracing_endpoint}
        return sections


def read_options(
    annotations: Mapping[str, Any], settings: Settings
) -> tuple[AgentOptions, list[str]]:
    """The agent's options and a warning for each annotation that was not usable."""
    agent = settings.agent
    options = AgentOptions(agent.resources, agent.log_level, settings.workload_api.enabled)
    warnings: list[str] = []
    limits = agent.resources.limits
    parsers: dict[str, tuple[Callable[[str], Any], str, str]] = {
        LOG_LEVEL: (parse_log_level, "log_level", agent.log_level),
        AGENT_CPU: (Quantity.parse, "cpu", agent.resources.requests.cpu.text),
        AGENT_MEMORY: (Quantity.parse, "memory", agent.resources.requests.memory.text),
        WORKLOAD_API: (parse_switch, "workload_api", switch_text(options.workload_api)),
        ACCESS_LOG: (parse_access_log, "access_log", "off"),
        TRACING_ENDPOINT: (parse_host_port, "tracing_endpoint", "no spans"),
    }
    for key, raw in annotations.items():
        if key in GONE or key in REFUSED:
            warnings.append(f"{key}: {GONE.get(key) or REFUSED[key]}")
            continue
        if key not in parsers:
            if isinstance(key, str) and key.startswith(PREFIX) and key not in _NOT_OURS:
                warnings.append(f"{_shown(key)}: unknown annotation, ignored")
            continue
        parse, attribute, default = parsers[key]
        try:
            if not isinstance(raw, str):
                raise ValueError("must be a string")
            value = parse(raw)
        except ValueError as exc:
            warnings.append(f"{key}: {exc}; using the default ({default})")
            continue
        if isinstance(value, Quantity) and value.value > getattr(limits, attribute).value:
            value = getattr(limits, attribute)
            warnings.append(f"{key}: above the agent's limit; capped at {value}")
        options = _with(options, attribute, value)
    return options, warnings


def _with(options: AgentOptions, attribute: str, value: Any) -> AgentOptions:
    if attribute in ("cpu", "memory"):
        requests = replace(options.resources.requests, **{attribute: value})
        return replace(options, resources=replace(options.resources, requests=requests))
    return replace(options, **{attribute: value})


def parse_log_level(text: str) -> str:
    if text not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text


def parse_access_log(text: str) -> str:
    if text not in ACCESS_LOG_MODES:
        raise ValueError(f"must be one of {', '.join(ACCESS_LOG_MODES)}")
    return text


def parse_host_port(text: str) -> str:
    match = _HOST_PORT.fullmatch(text)
    if match is None or not 0 < int(match[1]) < 65536:
        raise ValueError("must be host:port (a DNS name, an IPv4 address or [IPv6])")
    return text


def parse_switch(text: str) -> bool:
    if text not in SWITCH:
        raise ValueError('must be "enabled" or "disabled"')
    return SWITCH[text]


def switch_text(value: bool) -> str:
    return "enabled" if value else "disabled"


def _shown(key: str) -> str:
    """A key as it may appear in a warning: printable name characters only."""
    return key if _SHOWN_KEY.fullmatch(key) else PREFIX + "<unprintable key>"
