"""The app's probes performed on loopback for the kubelet: the I/O of identity/probes.py.

Each check is bounded in time (the probe's timeoutSeconds, as the kubelet's own
wait for the rewritten probe) and in number: at most MAX_IN_FLIGHT checks run at
once, across the admin and status servers, and one beyond that fails at once
(503) instead of queuing. The status port is on the pod network and nobody
authenticates there, so a flood of /app-health requests must cost the agent a
few sockets, not one per request. A pod's probes are a few per container, each
at most once a second.

The answer says why a probe failed in a few words of ours (the status code, a
timeout, the connect error); never the app's bytes, which reach the kubelet's
events and `kubectl describe`.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from dataclasses import dataclass

from grpclib.client import Channel
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from identity.probes import (
    HOST,
    AppProbe,
    Grpc,
    HttpGet,
    TcpSocket,
    http_passed,
    request_head,
    status_code,
)
from identity.proto import health_grpc, health_pb2

__all__ = ["MAX_IN_FLIGHT", "Outcome", "Prober"]

MAX_IN_FLIGHT = 16
#: A status line longer than this is no HTTP server's (the stream's read limit).
MAX_STATUS_LINE = 8 * 1024
_SERVING = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # a few words of ours: shown to the kubelet, never the app's bytes


@dataclass
class _Shared:
    """One check of a probe, awaited by every request for it that came meanwhile."""

    task: asyncio.Task[Outcome]
    waiters: int = 0


class Prober:
    """Performs probes against 127.0.0.1, at most `max_in_flight` at a time.

    Requests for a probe that is being checked already wait for that check's outcome
    rather than start another: a flood of /app-health requests on the status port
    (anyone on the pod network may send them) cannot use up the bound and make the
    kubelet's own probe fail, so cannot get the app restarted or taken out of its
    Service. The bound then counts distinct probes, a few per container.
    """

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.max_in_flight = max_in_flight
        self._running: dict[AppProbe, _Shared] = {}
        self._tls: ssl.SSLContext | None = None

    @property
    def in_flight(self) -> int:
        return len(self._running)

    async def check(self, probe: AppProbe) -> Outcome:
        shared = self._running.get(probe)
        if shared is None:
            if self.in_flight >= self.max_in_flight:
                return Outcome(False, f"more than {self.max_in_flight} probes in flight")
            task = asyncio.get_running_loop().create_task(self._check(probe))
            shared = self._running[probe] = _Shared(task)
            task.add_done_callback(functools.partial(self._forget, probe, shared))
        shared.waiters += 1
        try:
            return await asyncio.shield(shared.task)
        finally:
            shared.waiters -= 1
            if not shared.waiters and not shared.task.done():  # nobody waits: stop it
                shared.task.cancel()
                self._forget(probe, shared)

    def _forget(self, probe: AppProbe, shared: _Shared, _: object = None) -> None:
        if self._running.get(probe) is shared:
            del self._running[probe]

    async def _check(self, probe: AppProbe) -> Outcome:
        seconds = probe.timeout.total_seconds()
        try:
            async with asyncio.timeout(seconds):
                return await self._perform(probe.action)
        except TimeoutError:
            return Outcome(False, f"timed out after {seconds:g}s")
        except ssl.SSLError as exc:
            return Outcome(False, f"TLS: {exc.reason or 'handshake failed'}")
        except OSError as exc:
            return Outcome(False, exc.strerror or type(exc).__name__)

    async def _perform(self, action: HttpGet | TcpSocket | Grpc) -> Outcome:
        if isinstance(action, HttpGet):
            return await self._http_get(action)
        if isinstance(action, TcpSocket):
            _, writer = await asyncio.open_connection(HOST, action.port)
            writer.transport.abort()
            return Outcome(True, "connected")
        return await _grpc(action)

    async def _http_get(self, probe: HttpGet) -> Outcome:
        context = self._tls_context() if probe.scheme == "HTTPS" else None
        reader, writer = await asyncio.open_connection(
            HOST, probe.port, ssl=context, limit=MAX_STATUS_LINE
        )
        try:
            writer.write(request_head(probe))
            line = await reader.readline()
        except ValueError:  # past the limit: no newline within MAX_STATUS_LINE bytes
            line = b""
        finally:
            writer.transport.abort()  # no close_notify to wait for: we have the answer
        status = status_code(line)
        if status is None:
            return Outcome(False, "the app's answer is not HTTP/1.x")
        return Outcome(http_passed(status), f"HTTP {status}")

    def _tls_context(self) -> ssl.SSLContext:
        """The kubelet's: TLS without verifying the app's certificate (it is the pod's own,
        on loopback, and often self-signed)."""
        if self._tls is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._tls = context
        return self._tls


async def _grpc(probe: Grpc) -> Outcome:
    channel = Channel(HOST, probe.port)
    try:
        stub = health_grpc.HealthStub(channel)
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=probe.service))
    except GRPCError as exc:
        return Outcome(False, f"gRPC status {exc.status.name}")
    except (ProtocolError, StreamTerminatedError):
        return Outcome(False, "not a gRPC server")
    finally:
        channel.close()
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return Outcome(reply.status == _SERVING, name)
