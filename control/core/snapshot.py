"""What an agent takes in one snapshot, and a snapshot's encoding: the bounds every part
of a pod's configuration is kept within, each measured as it is sent (`encode`).

An agent refuses a snapshot past its bounds whole and keeps the one before, so a part
past its share would stop a pod, or the mesh, from taking any later change: its own
policies included. The shares: the mesh-wide entries every captured pod holds
(SHARED_*, upstreams.py leaves Services out past it), and of the pod's own part, its
policies (policies.py: one may take a quarter) and its annotation's listeners
(EXPLICIT_*: half, upstreams.py leaves the last ones out past it); each TrafficPolicy's
settings, which every caller's entry for its Service repeats (TRAFFIC_*).
"""

from __future__ import annotations

import json
from typing import Any


def encode(value: Any) -> bytes:
    """A config (or part of one) as sent: JSON, keys sorted, no spaces; the same content
    gives the same bytes on every replica; mesh.py sends what it gives, and every bound
    here is measured by it."""
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


#: What an agent takes in one snapshot (agent/config.py MAX_SNAPSHOT_BYTES and
#: MAX_SNAPSHOT_CONTAINERS; the control plane may not import the agent's config). Past
#: either it refuses the snapshot whole, and every captured pod gets the same mesh-wide
#: entries: one Service of 20,000 ports, or a mesh grown past ~15,000 Service ports,
#: would leave every captured pod of the mesh without a config.
AGENT_SNAPSHOT_BYTES = 4 * 1024 * 1024
AGENT_SNAPSHOT_CONTAINERS = 200_000
#: The share of those the mesh-wide entries and passthrough may take; the rest is the
#: pod's own (its annotation's listeners, its policies, its inbound ports).
SHARED_BYTES = 3 * 1024 * 1024
SHARED_CONTAINERS = 150_000
#: Of the pod's own part, what its annotation's listeners may take together.
EXPLICIT_BYTES = (AGENT_SNAPSHOT_BYTES - SHARED_BYTES) // 2
EXPLICIT_CONTAINERS = (AGENT_SNAPSHOT_CONTAINERS - SHARED_CONTAINERS) // 2
#: What one TrafficPolicy's settings may take as sent: a few hundred bytes is usual; a
#: Service's every caller repeats them, in each listener and mesh-wide entry for it.
TRAFFIC_BYTES = 8 * 1024
TRAFFIC_CONTAINERS = 256
