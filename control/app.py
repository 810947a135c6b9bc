"""`outrider control serve`: watch the cluster, compile the mesh, stream it to agents.

Wiring only: informers (list-watch) -> MeshState (compile ~20 ms after a
burst) -> every subscription's stream, and the mesh's statuses -> the status
writer. The gRPC port is bounded as the CA's is (identity.grpcserving); the
debug and status ports are plain HTTP (debug on loopback by default), each behind
an acceptor of its own with HTTP_LIMITS (identity.serving): the status port is
open to every pod.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import ssl
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from aiohttp import web
from grpclib.config import Configuration

from control.config import ControlConfig
from control.core.mesh import Mesh, MeshSettings, compile_mesh
from control.debug import make_app
from control.informers import ClusterApi, Informers, open_cluster_api
from control.metrics import ControlMetrics
from control.server import ControlPlaneService
from control.sync import Compile, MeshState, StatusWriter
from control.tls import follow, server_context, stamp
from identity.configfile import Listen
from identity.grpcserving import WINDOW, BoundedServer
from identity.kubewatch import settle
from identity.serving import Acceptor, ConnectionLimits

log = logging.getLogger("outrider.control")

#: The debug and status ports' connections: probes, Prometheus and an operator's CLI
#: need a few; without a cap, silent connections to the status port (any pod reaches
#: it) took every descriptor, and the agents' gRPC port with them. Their idle timeout
#: is the gRPC port's (`limits.idle_timeout`).
HTTP_LIMITS = ConnectionLimits(max_connections=64)
#: Keepalive pings find agents whose host vanished without a FIN.
KEEPALIVE, KEEPALIVE_TIMEOUT = 60.0, 20.0
#: A subscription lasts for hours: its acks and window updates earn back the budget
#: of frames that start no call at this rate (identity.grpcserving).
CONTROL_FRAMES_PER_SECOND = 2.0
#: At exit, how long the threads of the API's calls get to end (interrupted watches
#: end at once; a list in flight may take up to its request timeout).
SETTLE_SECONDS = 3.0
#: The collector's oldest generation is collected on this schedule, not when its own
#: heuristic says. That generation holds every agent's stream, connection and last
#: snapshot; at 2,000 agents a full collection took 100-300 ms, and the heuristic ran one
#: every few seconds while changes were pushed, inside the pushes: a change's p99 went
#: from 0.5-0.6 s to 0.9-1.2 s. The younger generations are collected as before.
FULL_COLLECTION_EVERY = 60.0
#: Sooner once Python's allocated blocks have grown by this much since the last: the bound
#: the heuristic kept on garbage (a fleet reconnecting at once leaves its old connections'
#: cycles), kept on what is allocated rather than on the objects that outlive a push. Not
#: the resident set: memory freed stays with the allocators, so it hardly falls after one.
FULL_COLLECTION_GROWTH = 1.25
#: One entry per schedule running (tests run serve() twice in one process): the oldest
#: generation's threshold the first found, which the last to end puts back.
_schedules: list[int] = []


class StartupError(Exception):
    """The control plane cannot start with this config and these files."""


@dataclass(frozen=True)
class Bound:
    grpc: tuple[str, int]
    debug: tuple[str, int]
    status: tuple[str, int] | None = None


def grpc_configuration() -> Configuration:
    return Configuration(
        http2_connection_window_size=WINDOW,
        http2_stream_window_size=WINDOW,
        _keepalive_time=KEEPALIVE,
        _keepalive_timeout=KEEPALIVE_TIMEOUT,
    )


async def serve(
    config: ControlConfig,
    stop: asyncio.Event,
    *,
    compile: Compile = compile_mesh,
    api: ClusterApi | None = None,
    on_ready: asyncio.Future[Bound] | None = None,
) -> None:
    """Serve until `stop` is set; `on_ready` learns the bound addresses."""
    files = config.tls
    try:
        seen = stamp(files)  # before loading: a change from now on is seen
        tls = server_context(files)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(f"cannot load the SVID, key and bundle of tls: {exc}") from None
    if api is None:
        try:
            api = await open_cluster_api(config.kubeconfig)
        except Exception as exc:  # the client's own errors are of many kinds
            where = config.kubeconfig or "the in-cluster config"
            raise StartupError(f"cannot use {where} to reach the API server: {exc}") from None
    metrics = ControlMetrics()
    settings = MeshSettings(
        trust_domain=str(config.trust_domain),
        mesh_namespace=config.mesh_namespace,
        default_action=config.default_action,
        outbound_traffic_policy=config.outbound_traffic_policy,
    )
    changed: list[Callable[[], None]] = []
    informers = Informers(
        api,
        lambda: changed[0](),
        restarted=lambda kind: metrics.watch_restarts.labels(kind).inc(),
    )
    metrics.count_objects(lambda kind: len(informers.caches[kind].objects))
    writer = StatusWriter(api, lambda: informers.objects, metrics)

    warned: dict[tuple[str, str], tuple[str, ...]] = {}

    def compiled(mesh: Mesh) -> None:
        service.mesh_changed()
        writer.offer(mesh.statuses)
        _log_new_warnings(warned, {**mesh.pod_warnings, ("", ""): mesh.warnings})
        metrics.services_left_out.set(len(mesh.left_out))

    state = MeshState(
        lambda: informers.objects,
        informers.synced,
        compile,
        settings,
        metrics,
        on_compiled=compiled,
    )
    changed.append(state.changed)
    service = ControlPlaneService(state, config.trust_domain, metrics, keepalive=_refresh(config))
    grpc_server = BoundedServer(
        [service],
        config.limits.grpc,
        control_frames_per_second=CONTROL_FRAMES_PER_SECOND,
        config=grpc_configuration(),
    )

    def ready() -> bool:
        return state.mesh is not None

    grpc_sock, debug_sock = _bind(config.listen), _bind(config.debug)
    status_sock = _bind(config.status) if config.status else None
    # The debug port serves every route; the status port, probes and metrics only.
    sites = [(debug_sock, True)] + ([(status_sock, False)] if status_sock else [])
    http_limits = replace(HTTP_LIMITS, idle_timeout=config.limits.connections.idle_timeout)
    runners, http_acceptors = [], []
    for sock, debug in sites:
        runner = web.AppRunner(
            make_app(service, state, ready, metrics, debug=debug),
            access_log=None,
            shutdown_timeout=1.0,
            keepalive_timeout=http_limits.idle_timeout.total_seconds(),
        )
        await runner.setup()
        assert runner.server is not None
        runners.append(runner)
        http_acceptors.append(
            Acceptor(
                sock,
                runner.server,
                None,
                http_limits,
                metrics.connection_closed("debug" if debug else "status"),
            )
        )
    acceptor = await grpc_server.serve(
        grpc_sock, tls, config.limits.connections, metrics.connection_closed("grpc")
    )
    for http in http_acceptors:
        http.start()
    bound = Bound(
        grpc_sock.getsockname()[:2],
        debug_sock.getsockname()[:2],
        status_sock.getsockname()[:2] if status_sock else None,
    )
    log.info(
        "serving agents of %s on %s:%d (gRPC, mTLS), debug on http://%s:%d%s",
        config.trust_domain,
        *bound.grpc,
        *bound.debug,
        f", status on http://{bound.status[0]}:{bound.status[1]}" if bound.status else "",
    )
    if on_ready is not None:
        on_ready.set_result(bound)
    following = follow(files, acceptor.use_tls, seen, untrusted=acceptor.abort_clients)
    await _run(stop, informers.run(), writer.run(), following, collect_fully())
    log.info("shutting down")
    grpc_server.close()
    await grpc_server.wait_closed()
    for http in http_acceptors:
        http.close()
        await http.wait_closed()
    for runner in runners:
        await runner.cleanup()
    if not await settle(SETTLE_SECONDS):
        log.warning("a call to the API server is still in flight; exiting anyway")


async def collect_fully(
    every: float = FULL_COLLECTION_EVERY,
    *,
    look: float = 1.0,
    allocated: Callable[[], int] = sys.getallocatedblocks,
) -> None:
    """Collect the collector's oldest generation every `every` seconds, or once
    `allocated()` has grown by FULL_COLLECTION_GROWTH since the last, and only then; its
    heuristic comes back when the last schedule ends. (From Python 3.14 the collector is
    incremental, with no such pauses, and the threshold this sets is ignored.)"""
    young, middle, oldest = gc.get_threshold()
    _schedules.append(_schedules[0] if _schedules else oldest)
    gc.set_threshold(young, middle, 2**31 - 1)  # never reached: only the schedule's
    loop = asyncio.get_running_loop()
    try:
        last, since = allocated(), loop.time()
        while True:
            await asyncio.sleep(look)
            if loop.time() - since >= every or allocated() > last * FULL_COLLECTION_GROWTH:
                gc.collect()
                last, since = allocated(), loop.time()
    finally:
        heuristic = _schedules.pop()
        if not _schedules:
            young, middle, _ = gc.get_threshold()
            gc.set_threshold(young, middle, heuristic)


def _log_new_warnings(
    warned: dict[tuple[str, str], tuple[str, ...]],
    now: Mapping[tuple[str, str], tuple[str, ...]],
) -> None:
    """Pods have no status to write to: what was skipped about one is logged, once; and
    what was skipped about the whole mesh, under ("", "")."""
    for (namespace, pod), warnings in now.items():
        for warning in warnings:
            if warning not in warned.get((namespace, pod), ()):
                if namespace or pod:
                    log.warning("pod %s/%s: %s", namespace, pod, warning)
                else:
                    log.warning("mesh: %s", warning)
    warned.clear()
    warned.update(now)


def _refresh(config: ControlConfig) -> float:
    """How often a subscription tells its connection's acceptor it is not idle."""
    return config.limits.connections.idle_timeout.total_seconds() / 3


async def _run(stop: asyncio.Event, *loops: object) -> None:
    """Run the background loops until `stop`; a loop that ends or fails ends the process
    (so that it is restarted) rather than leave it serving a mesh that no longer follows
    the cluster."""
    background = [asyncio.ensure_future(loop) for loop in loops]  # type: ignore[call-overload]
    stopping = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait({stopping, *background}, return_when=asyncio.FIRST_COMPLETED)
        for task in done - {stopping}:
            task.result()
            raise RuntimeError(f"{task!r} ended")
    finally:
        for task in (stopping, *background):
            task.cancel()
        await asyncio.gather(stopping, *background, return_exceptions=True)


def _bind(listen: Listen) -> socket.socket:
    try:
        family = socket.getaddrinfo(listen.host, listen.port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((listen.host, listen.port), family=family, backlog=1024)
    except OSError as exc:
        raise StartupError(f"cannot listen on {listen}: {exc.strerror}") from None
