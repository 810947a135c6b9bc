"""The app's probes, rewritten to ask the agent, which performs them on loopback.

With capture on, the kubelet's probe from the node to the pod IP is captured like
any other inbound connection, and strict mTLS refuses it: the kubelet holds no SVID.
So each httpGet, tcpSocket and grpc probe of an app container becomes
`httpGet {path: /app-health/<container>/<livez|readyz|startupz>, port: 15020}` (the
agent's status port, never captured), its timing fields kept, and the original goes
to the agent's bootstrap (`probes:`), which performs it against 127.0.0.1 (Istio
rewrites probes the same way, to its /app-health/...). What is left alone:

- exec probes: they run inside the container, never over the network;
- a probe with `host:` set: it asks another host, not this pod (a warning says so);
- a probe whose named port is not one of the container's ports (a warning);
- a probe that is already the agent's (idempotent: injecting twice is injecting once),
  or of the status port at all: it is never captured, so the kubelet reaches it as it is;
- a probe of the agent's other ports (admin, capture; a warning): the agent never
  performs those (its admin server serves /app-health too: it would ask itself);
- a probe that would take the agent's config variable past what Linux execs (128 KiB
  with every other probe; a warning): a header may be 4 KiB, and a probe may have many;
- anything malformed: the API server validates the pod after every mutating webhook
  and refuses it, so nothing of it reaches the agent's config, and no warning
  repeats text the pod's author wrote (it may hold terminal escapes).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from identity.probes import APP_HEALTH, DEFAULT_TIMEOUT, header_error, request_path_error
from injector.core.settings import STATUS_PORT, Settings, is_dns_label
from injector.core.sidecar import MAX_ENV_BYTES, encode

__all__ = ["KINDS", "Rewrite", "rewrite"]

#: The pod spec's probe fields and the last part of the path the kubelet now asks.
KINDS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
HANDLERS = ("httpGet", "tcpSocket", "grpc", "exec")


@dataclass(frozen=True)
class Rewrite:
    """JSON patch operations (each an `add`, which replaces the probe), the originals by
    the path the kubelet now asks (the bootstrap's `probes:`), and warnings."""

    patch: tuple[dict[str, Any], ...] = ()
    originals: Mapping[str, dict[str, Any]] | None = None
    warnings: tuple[str, ...] = ()


def rewrite(
    spec: Mapping[str, Any],
    agent_ports: Collection[int] = Settings().agent_ports,
    budget: int = MAX_ENV_BYTES,
) -> Rewrite:
    """The probes of `spec`'s app containers (and native sidecars) sent through the agent,
    but those of `agent_ports` (Settings.agent_ports), and those past `budget`, the bytes
    their originals may take in the agent's config (sidecar.probes_budget)."""
    patch: list[dict[str, Any]] = []
    originals: dict[str, dict[str, Any]] = {}
    warnings: list[str] = []
    for key in ("containers", "initContainers"):
        containers = spec.get(key)
        for i, container in enumerate(containers if isinstance(containers, list) else []):
            if not isinstance(container, dict) or not isinstance(container.get("name"), str):
                continue
            name = container["name"]
            if not is_dns_label(name):
                continue  # the API server refuses the pod; nothing to quote
            for field, kind in KINDS.items():
                probe = container.get(field)
                if not isinstance(probe, dict):
                    continue
                original = _original(probe, container, agent_ports)
                if isinstance(original, str):
                    warnings.append(f"container {name}: {field} {original}")
                    continue
                if original is None:
                    continue
                path = f"{APP_HEALTH}{name}/{kind}"
                size = len(encode({path: original}))  # its braces: the comma between entries
                if size > budget:
                    warnings.append(
                        f"container {name}: {field} does not fit in the agent's config (at "
                        f"most {MAX_ENV_BYTES // 1024} KiB with every probe), so it is left "
                        "as it is"
                    )
                    continue
                budget -= size
                originals[path] = original
                patch.append(_replace(f"/spec/{key}/{i}/{field}", _through_agent(probe, path)))
    return Rewrite(tuple(patch), originals or None, tuple(warnings))


def _through_agent(probe: Mapping[str, Any], path: str) -> dict[str, Any]:
    timing = {k: v for k, v in probe.items() if k not in HANDLERS}
    return {"httpGet": {"path": path, "port": STATUS_PORT, "scheme": "HTTP"}, **timing}


def _original(
    probe: Mapping[str, Any], container: Mapping[str, Any], agent_ports: Collection[int]
) -> dict[str, Any] | str | None:
    """The probe as the agent's bootstrap holds it; a warning (str) or None to leave it."""
    handlers = [h for h in HANDLERS if h in probe]
    if len(handlers) != 1 or handlers[0] == "exec" or not isinstance(probe[handlers[0]], dict):
        return None
    handler: str = handlers[0]
    action: dict[str, Any] = probe[handler]
    timeout = probe.get("timeoutSeconds") or DEFAULT_TIMEOUT.seconds  # 0: the API's default
    if not _positive(timeout):
        return None
    if action.get("host"):
        return (
            "asks another host (host: is set), so it is left as it is: strict mTLS "
            "refuses it if that host is this pod"
        )
    if handler == "grpc" and not isinstance(action.get("port"), int):
        return None  # a number only: the API has no named gRPC ports
    port = _port(action.get("port"), container)
    if isinstance(port, str) or port is None:
        return port
    if port == STATUS_PORT:
        return None  # never captured: the kubelet's probe reaches the agent as it is
    if port in agent_ports:
        return f"asks port {port}, the agent's own, so it is left as it is"
    if handler == "tcpSocket":
        return {"tcpSocket": {"port": port}, "timeoutSeconds": timeout}
    if handler == "grpc":
        service = action.get("service") or ""
        if not isinstance(service, str) or header_error("service", service):
            return None  # what the agent would refuse (its checks, identity/probes.py)
        return {"grpc": {"port": port, "service": service}, "timeoutSeconds": timeout}
    return _http_get(action, port, timeout)


def _http_get(action: Mapping[str, Any], port: int, timeout: int) -> dict[str, Any] | str | None:
    path = action.get("path") or "/"
    scheme = action.get("scheme") or "HTTP"
    headers = action.get("httpHeaders") or []
    if not isinstance(path, str):
        return None
    if request_path_error(path := _as_sent(path)):
        return "has a path longer than the agent sends (2048 bytes), so it is left as it is"
    if scheme not in ("HTTP", "HTTPS") or not isinstance(headers, list):
        return None
    for header in headers:
        if not isinstance(header, dict) or not _header_ok(header):
            return (
                "has a header the agent cannot send (a name that is not a token, or a "
                "control character in the value), so it is left as it is"
            )
    http: dict[str, Any] = {"path": path, "port": port, "scheme": scheme}
    if headers:
        http["httpHeaders"] = [{"name": h["name"], "value": h["value"]} for h in headers]
    return {"httpGet": http, "timeoutSeconds": timeout}


def _as_sent(path: str) -> str:
    """The path as the kubelet's request carries it (the API server takes any text): the
    fragment dropped, and each byte that is not printable ASCII (a space, a control
    character, UTF-8) percent-encoded, as Go's net/url escapes a path."""
    kept = path.partition("#")[0] or "/"
    return "".join(
        c if "!" <= c <= "~" else "".join(f"%{b:02X}" for b in c.encode("utf-8", "surrogatepass"))
        for c in kept
    )


def _header_ok(header: Mapping[str, Any]) -> bool:
    """A header the agent would send: an HTTP token for the name, no control characters
    in the value (a CR or LF would start a header of the value's making)."""
    name, value = header.get("name"), header.get("value", "")
    return isinstance(name, str) and isinstance(value, str) and not header_error(name, value)


def _port(port: object, container: Mapping[str, Any]) -> int | str | None:
    """A port number, or a named one looked up in the container's ports."""
    if isinstance(port, int) and not isinstance(port, bool):
        return port if 1 <= port <= 65535 else None
    if not isinstance(port, str) or not is_dns_label(port):
        return None  # a port name is an IANA service name: a DNS label, at most 15
    ports = container.get("ports")
    for item in ports if isinstance(ports, list) else []:
        if isinstance(item, dict) and item.get("name") == port:
            number = item.get("containerPort")
            return _port(number, container) if isinstance(number, int) else None
    return f"names port {port}, which the container does not declare, so it is left as it is"


def _positive(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _replace(path: str, value: Any) -> dict[str, Any]:
    return {"op": "add", "path": path, "value": value}  # add on a member replaces it
