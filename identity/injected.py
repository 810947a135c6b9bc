"""What every injected pod has: the agent's containers, its own ports and its UID.

The injector writes them into each pod, the agent listens on the ports, the
capture rules keep them apart from the app's, and the control plane finds the
containers and hands out the listeners between the ports: four parts that may
not import each other, so each name and number lives here, once.

The SPIFFE Workload API socket is the same kind of meeting point: the injector
mounts its directory in the agent and the app containers and tells both where
it is, the agent serves on it, and SPIFFE clients find it by the variable.
"""

from __future__ import annotations

__all__ = [
    "ACCESS_LOG_ANNOTATION",
    "ADMIN_PORT",
    "AGENT_CONTAINER",
    "AGENT_PORTS",
    "AGENT_UID",
    "CAPTURE_CONTAINER",
    "INBOUND_CAPTURE_PORT",
    "OUTBOUND_CAPTURE_PORT",
    "OUTBOUND_LISTENER_PORTS",
    "SPIFFE_ENDPOINT_SOCKET",
    "SPIFFE_ENDPOINT_SOCKET_ENV",
    "STATUS_PORT",
    "TRACING_ENDPOINT_ANNOTATION",
    "WORKLOAD_API_ANNOTATION",
    "WORKLOAD_API_DIR",
    "WORKLOAD_API_SOCKET",
    "WORKLOAD_API_VOLUME",
]

#: The agent's container (a native sidecar: an init container with restartPolicy Always).
AGENT_CONTAINER = "outrider-agent"
#: The init container that writes the pod's capture rules: a pod with it has every inbound
#: and outbound TCP connection redirected to its agent.
CAPTURE_CONTAINER = "outrider-capture"

#: On the pod's loopback: every admin route.
ADMIN_PORT = 15000
#: On the pod IP: the kubelet's probes (the app's too, rewritten) and metrics only; never
#: captured inbound, so the probes reach it in plain.
STATUS_PORT = 15020
#: Where the capture rules redirect the pod's inbound TCP (the agent serves the pod's
#: every address there) and the app's outbound TCP (the agent serves 127.0.0.1 there).
INBOUND_CAPTURE_PORT = 15006
OUTBOUND_CAPTURE_PORT = 15007
#: The agent's explicit outbound listeners on 127.0.0.1 come from this range, around the
#: capture and status ports (control/core/mesh.py MeshSettings.outbound_ports).
OUTBOUND_LISTENER_PORTS = range(15001, 15036)
#: Every port the agent may use in a pod: never an app's inbound port.
AGENT_PORTS = range(15000, 16000)
#: The agent's UID: its connections are never captured (a loop otherwise), and 0 would
#: leave every root process of the pod uncaptured.
AGENT_UID = 1337

#: The pod annotation that asks for the Workload API ("enabled" or "disabled"; the
#: injector's `workload_api:` setting decides for a pod without it).
WORKLOAD_API_ANNOTATION = "outrider.io/workload-api"
#: The pod annotations that turn on the agent's access log (off, denied or all: agent
#: config `access_log: {mode: ...}`) and span export (host:port of an OTLP/HTTP receiver:
#: `tracing: {otlp_endpoint: ...}`), docs/observability.md.
ACCESS_LOG_ANNOTATION = "outrider.io/access-log"
TRACING_ENDPOINT_ANNOTATION = "outrider.io/tracing-endpoint"
#: The emptyDir volume that holds the agent's Workload API socket: one per pod, so
#: the socket reaches the pod's containers and nothing else.
WORKLOAD_API_VOLUME = "outrider-workload-api"
#: Where that volume is mounted, in the agent and in every app container.
WORKLOAD_API_DIR = "/var/run/outrider/workload"
#: The one Unix socket in it: the SPIFFE Workload API and Envoy SDS (agent config
#: `workload_api: {socket: ...}`).
WORKLOAD_API_SOCKET = WORKLOAD_API_DIR + "/socket"
#: The variable SPIFFE clients (go-spiffe, py-spiffe, spiffe-helper) read, and its value
#: in the app containers.
SPIFFE_ENDPOINT_SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
SPIFFE_ENDPOINT_SOCKET = "unix://" + WORKLOAD_API_SOCKET
