"""The app's probes performed for the kubelet: the I/O of identity/probes.py.

Where: at 127.0.0.1; on a captured pod, at the pod IP the kubelet called the status
port at, from the hand-off source, as the agent hands the app its callers
(docs/capture.md): the kubelet's own probe would reach an app that listens on its pod
IP only, and the capture rules let the hand-off source through.

Each check is bounded in time (the probe's timeoutSeconds, as the kubelet's own
wait for the rewritten probe) and in number: a probe asked while it runs at the
same address is not run again (the callers share the run's outcome), and at most
MAX_IN_FLIGHT distinct probes run at once at each address, across the admin and
status servers (never fewer than every probe); one beyond
that fails at once (503) instead of queuing. The status port is on the pod
network and nobody authenticates there, so a flood of /app-health requests must
cost the agent and the app a few sockets, not one per request, and must not
take the kubelet's place. A pod's probes are a few per container, each at most
once a second.

The answer says why a probe failed in a few words of ours (the status code, a
timeout, the connect error); never the app's bytes, which reach the kubelet's
events and `kubectl describe`.

Never the agent's own servers: they serve /app-health too, so a probe of one
(port 15000 or 15020, by mistake or on purpose) would ask the agent to perform
itself again, each turn holding a place in flight until the bound is full.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from identity.probes import (
    HOST,
    MAX_REDIRECTS,
    AppProbe,
    Grpc,
    HttpGet,
    TcpSocket,
    http_passed,
    informational,
    redirected,
    request_head,
    status_code,
)

if TYPE_CHECKING:
    from grpclib.client import Channel

__all__ = ["LOOPBACK", "MAX_IN_FLIGHT", "AppAddress", "Outcome", "Prober"]

MAX_IN_FLIGHT = 16
#: A status line longer than this is no HTTP server's (the stream's read limit).
MAX_STATUS_LINE = 8 * 1024
#: Informational answers skipped before the final one (Go's client: 5, then an error),
#: and the header lines of each read past.
MAX_INFORMATIONAL, MAX_HEADER_LINES = 5, 100


@dataclass
class _Run:
    """A probe being performed, and how many callers wait for its outcome."""

    task: asyncio.Task[Outcome]
    waiting: int = 0


@dataclass(frozen=True)
class AppAddress:
    """Where a probe reaches the app, and from where (None: the kernel's choice)."""

    host: str = HOST
    source: str | None = None

    @property
    def local_addr(self) -> tuple[str, int] | None:
        return None if self.source is None else (self.source, 0)


LOOPBACK = AppAddress()


@dataclass(frozen=True)
class Outcome:
    passed: bool
    reason: str  # a few words of ours: shown to the kubelet, never the app's bytes


class Prober:
    """Performs probes at an AppAddress: each probe at most once at a time, and at most
    `max_in_flight` probes at a time.

    Whoever asks for a probe while it runs gets the outcome of that run: a flood of
    one /app-health path costs the app one request, and the kubelet's request among
    the flood is answered, not refused for want of a place (a liveness probe refused
    three times restarts the pod). The bound then only counts distinct probes.
    """

    def __init__(self, max_in_flight: int | Callable[[], int] = MAX_IN_FLIGHT) -> None:
        #: The bound, or what says it as of now (a reload may change the probes).
        self.bound = max_in_flight
        #: The ports of the agent's admin and status servers, once they listen.
        self.own_ports: frozenset[int] = frozenset()
        self._running: dict[tuple[AppProbe, AppAddress], _Run] = {}
        self._tls: ssl.SSLContext | None = None

    @property
    def max_in_flight(self) -> int:
        return self.bound() if callable(self.bound) else self.bound

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def in_flight_at(self, address: AppAddress) -> int:
        """Runs at `address`: each address has places of its own, so callers at one (a
        port-forward on loopback, a neighbour at another address of the pod) never take
        those of the kubelet's, at the pod IP."""
        return sum(1 for _, at in self._running if at == address)

    async def check(self, probe: AppProbe, address: AppAddress = LOOPBACK) -> Outcome:
        if probe.action.port in self.own_ports:
            return Outcome(False, f"port {probe.action.port} is the agent's own")
        key = (probe, address)
        run = self._running.get(key)
        if run is None or run.task.cancelling():  # a run its last caller left is no outcome
            bound = self.max_in_flight
            if self.in_flight_at(address) >= bound:
                return Outcome(False, f"more than {bound} probes in flight")
            run = _Run(asyncio.get_running_loop().create_task(self._timed(probe, address)))
            self._running[key] = run
            run.task.add_done_callback(lambda _: self._done(key, run))
        run.waiting += 1
        try:
            return await asyncio.shield(run.task)  # one caller gone stops nobody else's
        finally:
            run.waiting -= 1
            if run.waiting == 0:
                run.task.cancel()  # nobody waits: the probe stops, its place is free

    def _done(self, key: tuple[AppProbe, AppAddress], run: _Run) -> None:
        if self._running.get(key) is run:
            del self._running[key]

    async def _timed(self, probe: AppProbe, address: AppAddress) -> Outcome:
        seconds = probe.timeout.total_seconds()
        try:
            async with asyncio.timeout(seconds):
                return await self._perform(probe.action, address)
        except TimeoutError:
            return Outcome(False, f"timed out after {seconds:g}s")
        except ssl.SSLError as exc:
            return Outcome(False, f"TLS: {exc.reason or 'handshake failed'}")
        except OSError as exc:
            return Outcome(False, exc.strerror or type(exc).__name__)

    async def _perform(self, action: HttpGet | TcpSocket | Grpc, address: AppAddress) -> Outcome:
        if isinstance(action, HttpGet):
            return await self._http_get(action, address)
        if isinstance(action, TcpSocket):
            _, writer = await asyncio.open_connection(
                address.host, action.port, local_addr=address.local_addr
            )
            writer.transport.abort()
            return Outcome(True, "connected")
        return await _grpc(action, address)

    async def _http_get(self, probe: HttpGet, address: AppAddress) -> Outcome:
        """GET, following redirects to the same host as the kubelet follows them to the
        host it asked: the final answer decides."""
        for _ in range(MAX_REDIRECTS + 1):
            if probe.port in self.own_ports:
                return Outcome(False, f"port {probe.port} is the agent's own")
            status, location = await self._exchange(probe, address)
            if status is None:
                return Outcome(False, "the app's answer is not HTTP/1.x")
            if informational(status):
                return Outcome(False, f"more than {MAX_INFORMATIONAL} informational answers")
            target = redirected(probe, location, address.host) if location is not None else None
            if not 300 <= status < 400 or target is None:
                return Outcome(http_passed(status), f"HTTP {status}")
            probe = target
        return Outcome(False, f"stopped after {MAX_REDIRECTS} redirects")

    async def _exchange(self, probe: HttpGet, address: AppAddress) -> tuple[int | None, str | None]:
        """The app's final status, and its Location if it is a redirect."""
        context = self._tls_context() if probe.scheme == "HTTPS" else None
        reader, writer = await asyncio.open_connection(
            address.host,
            probe.port,
            ssl=context,
            limit=MAX_STATUS_LINE,
            local_addr=address.local_addr,
        )
        try:
            writer.write(request_head(probe, address.host))
            status = await _final_status(reader)
            location = None
            if status is not None and 300 <= status < 400:
                location = await _location(reader)
            return status, location
        except ValueError:  # past the limit: no newline within MAX_STATUS_LINE bytes
            return None, None
        finally:
            writer.transport.abort()  # no close_notify to wait for: we have the answer

    def _tls_context(self) -> ssl.SSLContext:
        """The kubelet's: TLS without verifying the app's certificate (it is the pod's own,
        on loopback, and often self-signed)."""
        if self._tls is None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            self._tls = context
        return self._tls


async def _final_status(reader: asyncio.StreamReader) -> int | None:
    """The status of the app's final answer, past its informational ones (1xx but 101),
    as Go's client skips them; the last 1xx if there are more than MAX_INFORMATIONAL,
    None if the answer is not HTTP/1.x."""
    for _ in range(MAX_INFORMATIONAL + 1):
        status = status_code(await reader.readline())
        if status is None or not informational(status):
            return status
        for _ in range(MAX_HEADER_LINES):  # the 1xx answer's headers, to its blank line
            if (await reader.readline()).strip() == b"":
                break
        else:
            return None
    return status


async def _location(reader: asyncio.StreamReader) -> str | None:
    """The Location header of the answer whose status line was just read."""
    for _ in range(MAX_HEADER_LINES):
        line = await reader.readline()
        if line.strip() == b"":
            return None
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"location":
            return value.strip().decode("latin-1")
    return None


@functools.cache
def _channel() -> Callable[[AppAddress, int], Channel]:
    """grpclib's Channel, dialling from the address's source: it takes none of its own,
    so its one dial (`_create_connection`, grpclib 0.4) is ours. Made at the first gRPC
    probe, as grpclib loads then."""
    from grpclib.client import Channel
    from grpclib.protocol import H2Protocol

    class FromSource(Channel):
        def __init__(self, address: AppAddress, port: int) -> None:
            super().__init__(address.host, port)
            self._local_addr = address.local_addr

        async def _create_connection(self) -> H2Protocol:
            _, protocol = await self._loop.create_connection(
                self._protocol_factory, self._host, self._port, local_addr=self._local_addr
            )
            return protocol

    return FromSource


async def _grpc(probe: Grpc, address: AppAddress) -> Outcome:
    # gRPC's client and the health protos load with the first gRPC probe: most
    # pods probe over HTTP or TCP, and an agent's memory is per pod.
    from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

    from identity.proto import health_grpc, health_pb2

    channel = _channel()(address, probe.port)
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
    return Outcome(reply.status == health_pb2.HealthCheckResponse.SERVING, name)
