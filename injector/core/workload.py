"""The app containers' side of the Workload API: the socket's directory and where it is.

A pod that asks for the Workload API (the annotation outrider.io/workload-api,
or injector.yaml `workload_api:`) gets an emptyDir (core/sidecar.py `volumes`)
that the agent serves its socket in. Each app container (`spec.containers`, the
agent's own aside) gets it mounted read-only at WORKLOAD_API_DIR, so it can
connect to the socket but not put another in its place, and SPIFFE_ENDPOINT_SOCKET
set to it, the variable SPIFFE clients (go-spiffe, py-spiffe, spiffe-helper) read.

Init containers do not: with a native sidecar the agent starts before them, but
without one they run before it, and an init container of the app's that wants
the socket names the volume itself. What the pod's author already wrote is kept,
with a warning: a SPIFFE_ENDPOINT_SOCKET of their own (it may point at a SPIRE
agent), or a volume of their own at (or inside) the directory, which the
kubelet would refuse beside ours or which would hide the socket.

Both the first injection and a later one (a webhook reinvocation, after another
webhook added a container) serve the containers that have no mount of the
volume yet, so running it again changes nothing.
"""

from __future__ import annotations

import posixpath
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from identity.injected import (
    AGENT_CONTAINER,
    SPIFFE_ENDPOINT_SOCKET,
    SPIFFE_ENDPOINT_SOCKET_ENV,
    WORKLOAD_API_DIR,
    WORKLOAD_API_VOLUME,
)
from injector.core.settings import described

__all__ = ["Served", "serve"]


@dataclass(frozen=True)
class Served:
    """The patch that gives the app containers the socket, and warnings for the pod's creator."""

    patch: tuple[dict[str, Any], ...] = ()
    warnings: tuple[str, ...] = ()


def serve(spec: Mapping[str, Any]) -> Served:
    """The volume mount and SPIFFE_ENDPOINT_SOCKET for each app container that lacks them;
    paths are `spec`'s own, so the patch goes before any that moves its containers."""
    patch: list[dict[str, Any]] = []
    warnings: list[str] = []
    containers = spec.get("containers")
    for i, container in enumerate(containers if isinstance(containers, list) else []):
        if not isinstance(container, dict) or container.get("name") == AGENT_CONTAINER:
            continue
        where = f"/spec/containers/{i}"
        mounts = _listed(container, "volumeMounts")
        inside = [m for m in mounts if _within(m.get("mountPath"), WORKLOAD_API_DIR)]
        if any(m.get("name") == WORKLOAD_API_VOLUME for m in inside):
            continue  # served already
        if inside:
            warnings.append(
                f"{described(container)} has a volume of its own at {WORKLOAD_API_DIR}: "
                "it gets no Workload API socket"
            )
            continue
        mount = {"name": WORKLOAD_API_VOLUME, "mountPath": WORKLOAD_API_DIR, "readOnly": True}
        patch.append(_appended(container, where, "volumeMounts", mount))
        env = _listed(container, "env")
        own = [v for v in env if v.get("name") == SPIFFE_ENDPOINT_SOCKET_ENV]
        if not own:
            variable = {"name": SPIFFE_ENDPOINT_SOCKET_ENV, "value": SPIFFE_ENDPOINT_SOCKET}
            patch.append(_appended(container, where, "env", variable))
        elif any(v.get("value") != SPIFFE_ENDPOINT_SOCKET for v in own):
            warnings.append(
                f"{described(container)} sets {SPIFFE_ENDPOINT_SOCKET_ENV} itself: kept; "
                f"the agent's Workload API is {SPIFFE_ENDPOINT_SOCKET}"
            )
    return Served(tuple(patch), tuple(warnings))


def _listed(container: Mapping[str, Any], key: str) -> list[dict[str, Any]]:
    items = container.get(key)
    return [x for x in items if isinstance(x, dict)] if isinstance(items, list) else []


def _within(path: object, directory: str) -> bool:
    """`path` is `directory` or beneath it: a mount there takes the socket's place."""
    if not isinstance(path, str) or not path.startswith("/"):
        return False
    path = posixpath.normpath(path)
    return path == directory or path.startswith(directory + "/")


def _appended(
    container: Mapping[str, Any], where: str, key: str, item: dict[str, Any]
) -> dict[str, Any]:
    if container.get(key):
        return {"op": "add", "path": f"{where}/{key}/-", "value": item}
    return {"op": "add", "path": f"{where}/{key}", "value": [item]}
