"""The control plane's HTTP side: what it serves each agent, health, readiness, metrics.

    GET /debug/agents              every subscribed agent: pod, SPIFFE ID, versions, ACK state
    GET /debug/config?pod=NS/NAME  the configuration the pod gets now, its version, and
                                   what about the pod was skipped, and why
    GET /healthz                   200 while the process serves
    GET /ready                     200 once every kind the API serves has been listed
    GET /metrics                   Prometheus

It listens on loopback by default: /debug/config shows every pod's policy. The
optional status port (`make_app(..., debug=False)`) serves the last three only, for
the kubelet and Prometheus on the pod network.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from control import REPLICA_HEADER
from control.metrics import ControlMetrics
from control.server import ControlPlaneService
from control.sync import MeshState
from identity.webserving import reports_progress

#: This replica, as /debug/agents names it: its pod's name (the hostname) and process.
REPLICA = f"{socket.gethostname()}/{os.getpid()}"


def make_app(
    service: ControlPlaneService,
    state: MeshState,
    ready: Callable[[], bool],
    metrics: ControlMetrics,
    *,
    debug: bool = True,
) -> web.Application:
    async def agents(request: web.Request) -> web.Response:
        views = sorted((agent.view() for agent in service.agents), key=lambda v: v["pod"])
        # Each replica lists only its own agents: the CLI counts the replicas it heard.
        return web.json_response(views, headers={REPLICA_HEADER: REPLICA})

    async def config(request: web.Request) -> web.Response:
        namespace, slash, name = request.query.get("pod", "").partition("/")
        if not slash or not namespace or not name:
            raise web.HTTPBadRequest(text="ask for ?pod=NAMESPACE/NAME\n")
        mesh = state.mesh
        if mesh is None:
            raise web.HTTPServiceUnavailable(text="the cluster has not been read yet\n")
        found = mesh.config_for(namespace, name) if (namespace, name) in mesh.pods else None
        if found is None:
            raise web.HTTPNotFound(text=f"no pod {namespace}/{name} in the mesh\n")
        body = {
            "pod": f"{namespace}/{name}",
            "version": mesh.version_for(namespace, name),
            "config": found,
            # What in or about the pod was skipped, and why (a bad upstreams entry...).
            # For a captured pod, also what was left out of every captured pod's snapshot.
            "warnings": [
                *mesh.pod_warnings.get((namespace, name), ()),
                *(mesh.warnings if "captured" in found else ()),
            ],
        }
        return web.json_response(body)

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readiness(request: web.Request) -> web.Response:
        if not ready():
            raise web.HTTPServiceUnavailable(text="not every kind has been listed yet\n")
        return web.Response(text="ready\n")

    async def get_metrics(request: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    app = web.Application(middlewares=[reports_progress])  # for the acceptor's idle timeout
    if debug:
        app.router.add_get("/debug/agents", agents)
        app.router.add_get("/debug/config", config)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/ready", readiness)
    app.router.add_get("/metrics", get_metrics)
    return app
