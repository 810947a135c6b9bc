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

Never the agent's own servers: they serve /app-health too, so a probe of one
(port 15000 or 15020, by mistake or on purpose) would ask the agent to perform
itself again, each turn holding a place in flight until the bound is full.
"""

from __future__ import annotations

import asyncio
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


class Prober:
    """Performs probes against 127.0.0.1, at most `max_in_flight` at a time."""

    def __init__(self, max_in_flight: int = MAX_IN_FLIGHT) -> None:
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        #: The ports of the agent's admin and status servers, once they listen.
        self.own_ports: frozenset[int] = frozenset()
        self._tls: ssl.SSLContext | None = None

    async def check(self, probe: AppProbe) -> Outcome:
        if probe.action.port in self.own_ports:
            return Outcome(False, f"port {probe.action.port} is the agent's own")
        if self.in_flight >= self.max_in_flight:
            return Outcome(False, f"more than {self.max_in_flight} probes in flight")
        self.in_flight += 1
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
        finally:
            self.in_flight -= 1

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
