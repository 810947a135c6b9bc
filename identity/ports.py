"""The agent's own ports in every injected pod, and the UID it runs as.

The injector writes them into each pod, the agent listens on them, the capture
rules keep them apart from the app's and the control plane hands out the
listeners between them: four parts that may not import each other, so the
numbers live here, once.
"""

from __future__ import annotations

__all__ = [
    "ADMIN_PORT",
    "AGENT_PORTS",
    "AGENT_UID",
    "INBOUND_CAPTURE_PORT",
    "OUTBOUND_CAPTURE_PORT",
    "OUTBOUND_LISTENER_PORTS",
    "STATUS_PORT",
]

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
