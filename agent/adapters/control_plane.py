"""The agent's side of the control-plane protocol: subscribe, apply, answer, stay subscribed.

One gRPC stream (identity/proto/control.proto, `ControlPlane.Subscribe`) over
mTLS with the SVID in use: the agent sends Hello (its pod, its build, the
version it runs), then answers every Snapshot with Ack once it runs it, or
Nack with the reason (key paths) once it has refused it. Applying is the
agent's (`SnapshotTarget.take_snapshot`: the reload path), not this module's.

Whom it takes config from: the control plane's chain must lead to the
agent's trust roots (OpenSSL, in the handshake) and its SPIFFE ID must be
`control.spiffe_id` (checked before a byte of config is read). Any workload
of the trust domain holds an SVID the roots vouch for; only the ID tells the
control plane apart.

While the control plane is away the agent keeps running the last config it
applied, says so once (a warning when the outage starts, an info when it
ends) and in `outrider_control_plane_connected`, and tries again after a
jittered backoff (`identity.backoff`). When the SVID or its roots change the
stream is closed and opened again at once with the new ones, so the control
plane never serves a stream whose certificate has expired.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Callable, Coroutine
from datetime import datetime
from importlib import metadata
from typing import Any, Protocol

from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import Peer

from agent.adapters.metrics import AgentMetrics
from agent.adapters.rotator import IdentityManager
from agent.adapters.tls import control_plane_context, peer_id
from agent.config import ControlEndpoint
from agent.core.svid import Svid
from identity import SvidError
from identity.proto import control_pb2
from identity.proto.control_grpc import ControlPlaneStub

log = logging.getLogger("outrider.agent.control")


#: Seconds between HTTP/2 pings on the stream, and for the answer to each.
KEEPALIVE = 10.0


class NotTheControlPlane(Exception):
    """The server's certificate is not the control plane's SVID."""


_AWAY = (
    GRPCError,
    OSError,
    TimeoutError,
    StreamTerminatedError,
    ProtocolError,
    NotTheControlPlane,
)
SubscribeStream = Stream[control_pb2.AgentMessage, control_pb2.Snapshot]


def agent_version() -> str:
    """This build, for `outrider proxy-status`."""
    try:
        return metadata.version("outrider")
    except metadata.PackageNotFoundError:
        return "unknown"


class SnapshotTarget(Protocol):
    """The agent, as the stream sees it."""

    @property
    def running_version(self) -> str:
        """The version of the snapshot running now; "" before the first."""

    async def take_snapshot(self, version: str, config_json: bytes) -> str | None:
        """Apply it as a reload: None once it runs, else why not (it changed nothing)."""


class Rotated(Exception):
    """The SVID or its roots changed: subscribe again with the new ones."""


class ControlPlaneSubscription:
    def __init__(
        self,
        endpoint: Callable[[], ControlEndpoint],
        pod: str,
        target: SnapshotTarget,
        identity: IdentityManager,
        metrics: AgentMetrics,
        *,
        now: Callable[[], datetime],
        rng: random.Random,
    ) -> None:
        self.endpoint = endpoint  # as of now: a reload may have moved it
        self.pod = pod
        self.target = target
        self.identity = identity
        self.metrics = metrics
        self.now = now
        self.rng = rng
        self.connected = False
        self._rotated = asyncio.Event()
        identity.changed.append(self._rotated.set)
        self._away: str | None = "not connected yet"  # why, while there is no stream
        self._warned = False  # the outage in `_away` has been logged

    async def run(self) -> None:
        """Stay subscribed until cancelled."""
        failures = 0
        while True:
            await self.identity.has_svid.wait()
            svid = self.identity.svid
            assert svid is not None
            self._rotated.clear()
            endpoint = self.endpoint()
            try:
                await self._subscribe(endpoint, svid)
                problem = "the control plane ended the stream"
            except Rotated:
                log.info("SVID or trust bundle changed: subscribing again with the new one")
                self._down("resubscribing with the new SVID")
                continue
            except _AWAY as exc:
                problem = _describe(exc)
            except Exception as exc:  # a bug must not end the subscription for good:
                # the agent would run its last config forever, saying it is connected
                log.exception("the control-plane stream failed; subscribing again")
                problem = f"the agent's error: {exc!r}"[:300]
            failures = 1 if self.connected else failures + 1
            self._down(problem)
            delay = endpoint.backoff.delay(failures, self.rng).total_seconds()
            if not self._warned:
                self._warned = True
                log.warning(
                    "control plane %s:%d away (%s); serving the config of version %s, "
                    "trying again with backoff",
                    endpoint.host,
                    endpoint.port,
                    problem,
                    self.target.running_version or "(none yet)",
                )
            else:
                log.debug("control plane still away (%s); next try in %.1fs", problem, delay)
            await asyncio.sleep(delay)

    def _down(self, problem: str) -> None:
        self.connected = False
        self.metrics.control_plane_connected.set(0)
        self._away = problem

    def _up(self, endpoint: ControlEndpoint) -> None:
        self.connected = True
        self.metrics.control_plane_connected.set(1)
        if self._warned:
            log.info("control plane %s:%d back", endpoint.host, endpoint.port)
        self._away, self._warned = None, False

    async def _subscribe(self, endpoint: ControlEndpoint, svid: Svid) -> None:
        """One stream, until it ends (None), fails (the errors of `_AWAY`) or the SVID
        changes (Rotated)."""
        channel = Channel(
            endpoint.host,
            endpoint.port,
            ssl=control_plane_context(svid),
            config=Configuration(
                ssl_target_name_override=endpoint.server_name,
                # A control plane whose node vanished sends no FIN: ping it, or the
                # agent would believe itself connected (and in sync) forever.
                _keepalive_time=KEEPALIVE,
                _keepalive_timeout=KEEPALIVE,
                _keepalive_permit_without_calls=True,
                _http2_max_pings_without_data=0,
                _http2_min_sent_ping_interval_without_data=KEEPALIVE,
            ),
        )
        try:
            async with ControlPlaneStub(channel).Subscribe.open() as stream:
                await stream.send_request()  # connects: the handshake verified the chain
                self._check_identity(stream.peer, endpoint)
                await stream.send_message(self._hello())
                self._up(endpoint)
                await self._until_rotated(self._follow(stream))
        finally:
            channel.close()

    def _check_identity(self, peer: Peer | None, endpoint: ControlEndpoint) -> None:
        tls = ssl_object(peer)
        if tls is None:
            raise NotTheControlPlane("the connection to the control plane is not TLS")
        trust_domain = self.identity.config.identity.spiffe_id.trust_domain
        try:
            found = peer_id(tls, "server", self.now(), trust_domain)
        except SvidError as exc:
            raise NotTheControlPlane(f"the server's certificate is not an SVID: {exc}") from None
        if found != endpoint.spiffe_id:
            raise NotTheControlPlane(
                f"the server at {endpoint.host}:{endpoint.port} is {found}, not the control "
                f"plane {endpoint.spiffe_id} (control.spiffe_id): taking no config from it",
            )

    def _hello(self) -> control_pb2.AgentMessage:
        hello = control_pb2.Hello(
            pod_name=self.pod,
            agent_version=agent_version(),
            running_version=self.target.running_version,
        )
        return control_pb2.AgentMessage(hello=hello)

    async def _follow(self, stream: SubscribeStream) -> None:
        while (snapshot := await stream.recv_message()) is not None:
            # Shielded: a rotation that ends the stream must not cut a reload in half.
            applying = self.target.take_snapshot(snapshot.version, snapshot.config_json)
            error = await asyncio.shield(applying)
            if error is None:
                answer = control_pb2.AgentMessage(ack=control_pb2.Ack(version=snapshot.version))
            else:
                nack = control_pb2.Nack(version=snapshot.version, error=error)
                answer = control_pb2.AgentMessage(nack=nack)
            await stream.send_message(answer)

    async def _until_rotated(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work`; raise Rotated if the SVID changes first (work is cancelled)."""
        task = asyncio.create_task(work)
        rotated = asyncio.create_task(self._rotated.wait())
        try:
            await asyncio.wait({task, rotated}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            rotated.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if task.cancelled():
            raise Rotated
        task.result()


def ssl_object(peer: Peer | None) -> ssl.SSLObject | None:
    """The TLS connection under grpclib's Peer, which offers the certificate only in
    getpeercert()'s dict form; the SVID checks (`peer_id`) read the DER."""
    transport = getattr(peer, "_transport", None)
    if transport is None:
        return None
    tls = transport.get_extra_info("ssl_object")
    return tls if isinstance(tls, ssl.SSLObject) else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, GRPCError):
        return f"{exc.status.name}: {exc.message}"
    if isinstance(exc, NotTheControlPlane):
        return str(exc)
    return repr(exc)
