"""Pod annotations -> the agent's options, each value checked against a strict grammar.

Annotation values come from whoever may create a pod, so they are data: each
is parsed into typed values (ports, DNS names, SPIFFE IDs, quantities) and only
those typed values reach the pod. A value that does not parse is dropped
whole: that setting keeps its default and a warning names the annotation and
the problem, never the value (it may hold newlines or terminal escapes). The
pod is never refused for an annotation.

    outrider.io/inbound-ports: "8080,9090"
        inbound mTLS listeners 0.0.0.0:15443 -> 127.0.0.1:8080,
        0.0.0.0:15444 -> 127.0.0.1:9090 (in order, at most 16)
    outrider.io/upstreams: "backend=backend.shop.svc:15443@spiffe://cluster.local/ns/shop/sa/backend;
                            cache=c-0.cache:15443,c-1.cache:15443@spiffe://td/ns/shop/sa/cache"
        outbound listeners 127.0.0.1:15001, 15002, ... (in order, at most 32; 15020 is
        the status port's, so the 20th is 15021);
        entries split by ';', endpoints and SPIFFE IDs by ','
    outrider.io/policy: "shop-policy"          ConfigMap mounted at /etc/outrider/policy
    outrider.io/agent-cpu: "200m"              the agent's CPU request, capped at the limit
    outrider.io/agent-memory: "128Mi"          the agent's memory request, capped at the limit
    outrider.io/log-level: "debug"             debug, info, warning or error
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from identity import InvalidSpiffeId, SpiffeId
from injector.core.settings import (
    LOG_LEVELS,
    Quantity,
    Resources,
    Settings,
    is_dns_label,
    is_dns_subdomain,
)

__all__ = ["AgentOptions", "Upstream", "read_options"]

PREFIX = "outrider.io/"
INJECT = PREFIX + "inject"
STATUS = PREFIX + "status"
INBOUND_PORTS = PREFIX + "inbound-ports"
UPSTREAMS = PREFIX + "upstreams"
POLICY = PREFIX + "policy"
AGENT_CPU = PREFIX + "agent-cpu"
AGENT_MEMORY = PREFIX + "agent-memory"
LOG_LEVEL = PREFIX + "log-level"

ADMIN_PORT = 15000  # on the pod's loopback: every admin route
STATUS_PORT = 15020  # on the pod IP: probes and metrics only
INBOUND_BASE = 15443
RESERVED_PORTS = range(15000, 16000)  # the agent's; an app port here would collide
MAX_INBOUND, MAX_UPSTREAMS = 16, 32
#: The upstreams' listeners on 127.0.0.1, in order: from 15001 up, past the status port
#: (bound on 0.0.0.0, it takes 127.0.0.1:15020 too).
OUTBOUND_PORTS = tuple(p for p in range(15001, 15001 + MAX_UPSTREAMS + 1) if p != STATUS_PORT)

_PORT = re.compile(r"[0-9]{1,5}")
_SHOWN_KEY = re.compile(r"[A-Za-z0-9./_-]{1,100}")


@dataclass(frozen=True)
class Upstream:
    name: str
    endpoints: tuple[tuple[str, int], ...]
    server_ids: tuple[SpiffeId, ...]


@dataclass(frozen=True)
class AgentOptions:
    resources: Resources
    log_level: str
    inbound_ports: tuple[int, ...] = ()
    upstreams: tuple[Upstream, ...] = ()
    policy: str | None = None


def read_options(
    annotations: Mapping[str, Any], settings: Settings
) -> tuple[AgentOptions, list[str]]:
    """The agent's options and a warning for each annotation that was not usable."""
    agent = settings.agent
    options = AgentOptions(agent.resources, agent.log_level)
    warnings: list[str] = []
    limits = agent.resources.limits
    parsers: dict[str, tuple[Callable[[str], Any], str, str]] = {
        INBOUND_PORTS: (parse_ports, "inbound_ports", "no inbound listener"),
        UPSTREAMS: (parse_upstreams, "upstreams", "no upstreams"),
        POLICY: (parse_configmap, "policy", "no policy"),
        LOG_LEVEL: (parse_log_level, "log_level", agent.log_level),
        AGENT_CPU: (Quantity.parse, "cpu", agent.resources.requests.cpu.text),
        AGENT_MEMORY: (Quantity.parse, "memory", agent.resources.requests.memory.text),
    }
    for key, raw in annotations.items():
        if key not in parsers:
            if isinstance(key, str) and key.startswith(PREFIX) and key not in (INJECT, STATUS):
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


def parse_ports(text: str) -> tuple[int, ...]:
    """'8080,9090' -> (8080, 9090): the app's ports on 127.0.0.1, in listener order."""
    ports = tuple(_port(part.strip(), f"port {i}") for i, part in enumerate(text.split(","), 1))
    if len(ports) > MAX_INBOUND:
        raise ValueError(f"at most {MAX_INBOUND} ports")
    if len(set(ports)) != len(ports):
        raise ValueError("a port is listed twice")
    for i, port in enumerate(ports, 1):
        if port in RESERVED_PORTS:
            raise ValueError(f"port {i}: 15000-15999 are the agent's own ports")
    return ports


def parse_upstreams(text: str) -> tuple[Upstream, ...]:
    entries = [entry.strip() for entry in text.split(";")]
    if entries and not entries[-1]:
        entries.pop()  # a trailing ';'
    if not entries:
        raise ValueError("no upstream given")
    if len(entries) > MAX_UPSTREAMS:
        raise ValueError(f"at most {MAX_UPSTREAMS} upstreams")
    upstreams = tuple(_upstream(entry, f"entry {i}") for i, entry in enumerate(entries, 1))
    names = [u.name for u in upstreams]
    if len(set(names)) != len(names):
        raise ValueError("an upstream name is used twice")
    return upstreams


def _upstream(entry: str, where: str) -> Upstream:
    """'name=host:port[,host:port...]@spiffe://...[,spiffe://...]'"""
    name, equals, rest = entry.partition("=")
    endpoints, at, ids = rest.partition("@")
    if not equals or not at:
        raise ValueError(f"{where}: expected name=host:port@spiffe://...")
    if not is_dns_label(name):
        raise ValueError(f"{where}: the name must be a DNS label (a-z, 0-9, '-')")
    return Upstream(
        name,
        tuple(_endpoint(e, f"{where} endpoint {i}") for i, e in enumerate(endpoints.split(","), 1)),
        tuple(_server_id(s, f"{where} SPIFFE ID {i}") for i, s in enumerate(ids.split(","), 1)),
    )


def _endpoint(text: str, where: str) -> tuple[str, int]:
    host, colon, port = text.rpartition(":")
    if not colon or not is_dns_subdomain(host):
        raise ValueError(f"{where}: expected a DNS name and a port, host:port")
    return host, _port(port, where)


def _server_id(text: str, where: str) -> SpiffeId:
    try:
        spiffe_id = SpiffeId.parse(text)
    except InvalidSpiffeId:
        raise ValueError(f"{where}: not a SPIFFE ID") from None
    if not spiffe_id.path:
        raise ValueError(f"{where}: a workload ID needs a path")
    return spiffe_id


def _port(text: str, where: str) -> int:
    if _PORT.fullmatch(text) is None or not 1 <= int(text) <= 65535:
        raise ValueError(f"{where}: a port is a number from 1 to 65535")
    return int(text)


def parse_configmap(text: str) -> str:
    if not is_dns_subdomain(text):
        raise ValueError("not a ConfigMap name (a DNS subdomain)")
    return text


def parse_log_level(text: str) -> str:
    if text not in LOG_LEVELS:
        raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
    return text


def _shown(key: str) -> str:
    """A key as it may appear in a warning: printable name characters only."""
    return key if _SHOWN_KEY.fullmatch(key) else PREFIX + "<unprintable key>"
