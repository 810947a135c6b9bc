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
applied, says so once (a warning when the outage starts, an info when a
stream works again: it brought a snapshot, or stayed open control.timeout,
at least RESYNC_PROOF)
and in `outrider_control_plane_connected`, and tries again after a jittered
backoff (`control.backoff`), which grows while every stream is ended at once
(PERMISSION_DENIED). Connecting is bounded (control.timeout), and so is the
wait for the first snapshot of a stream that asked for one: a control plane
that takes the stream and says nothing is left for another try, with a
warning, rather than waited on forever. When the SVID or its roots change the
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
from typing import Any, Protocol

from grpclib.client import Channel, Stream
from grpclib.config import Configuration
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.protocol import H2Protocol, Peer

from agent.adapters.metrics import AgentMetrics
from agent.adapters.rotator import IdentityManager
from agent.adapters.tls import control_plane_context, peer_id
from agent.config import ControlEndpoint
from agent.core.svid import Svid
from identity import SvidError
from identity.build import VERSION
from identity.proto import control_pb2
from identity.proto.control_grpc import ControlPlaneStub
from identity.tlsfiles import TLS_SHUTDOWN_TIMEOUT

log = logging.getLogger("outrider.agent.control")


#: Seconds between HTTP/2 pings on the stream, and for the answer to each.
KEEPALIVE = 10.0
#: A resync that brings nothing proves itself by lasting `control.timeout`, and never
#: less than this: the control plane holds a stream up to 5 s before it may refuse it
#: (control/server.py POD_WAIT, a pod its watch has not brought yet). With a shorter
#: timeout, such streams read as connected 45% of the time while every one was refused.
RESYNC_PROOF = 6.0
# `control.timeout` (10 s) bounds three waits:
# - the TCP connect and the TLS handshake: a control plane behind a black hole, or a
#   server that accepts and says nothing, would otherwise hold the agent for minutes
#   (the kernel's SYN retries, asyncio's 60 s handshake timeout);
# - the first snapshot on a stream whose Hello named no running version: the control
#   plane answers such a Hello at once (or ends the stream), so a silent one is
#   broken, and another try (another replica, behind its Service) may do;
# - a stream that brought a snapshot, or stayed open this long, was a connection: it
#   resets the backoff and ends the outage in the log. One the control plane ends at
#   once (PERMISSION_DENIED) is a failure, backed off and not logged as a return.


class NotTheControlPlane(Exception):
    """The server's certificate is not the control plane's SVID."""


class Silent(Exception):
    """The control plane took the stream and sent nothing it should have."""


_AWAY = (
    GRPCError,
    OSError,
    TimeoutError,
    StreamTerminatedError,
    ProtocolError,
    NotTheControlPlane,
    Silent,
)
SubscribeStream = Stream[control_pb2.AgentMessage, control_pb2.Snapshot]


def agent_version() -> str:
    """This build, for `outrider proxy-status`."""
    return VERSION


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
        self._why_again = "SVID or trust bundle changed"
        identity.changed.append(lambda: self.resubscribe("SVID or trust bundle changed"))
        self._away: str | None = "not connected yet"  # why, while there is no stream
        self._warned = False  # the outage in `_away` has been logged
        self._proven = False  # this stream brought a snapshot or lasted control.timeout

    async def run(self) -> None:
        """Stay subscribed until cancelled."""
        failures = 0
        while True:
            await self.identity.has_svid.wait()
            svid = self.identity.svid
            assert svid is not None
            self._rotated.clear()
            self._proven = False
            endpoint = self.endpoint()
            try:
                await self._subscribe(endpoint, svid)
                problem = "the control plane ended the stream"
            except Rotated:  # the agent's own doing: still connected, unless the next fails
                log.info("%s: subscribing again", self._why_again)
                continue
            except _AWAY as exc:
                problem = _describe(exc)
            except Exception as exc:  # a bug must not end the subscription for good:
                # the agent would run its last config forever, saying it is connected
                log.exception("the control-plane stream failed; subscribing again")
                problem = f"the agent's error: {exc!r}"[:300]
            failures = 1 if self._proven else failures + 1
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

    def resubscribe(self, why: str) -> None:
        """End the stream now and open another: the SVID, its roots or the control plane
        (`control:` in a reloaded bootstrap) changed, and the stream must not outlive them."""
        self._why_again = why
        self._rotated.set()

    def _down(self, problem: str) -> None:
        self.connected = False
        self.metrics.control_plane_connected.set(0)
        self._away = problem

    def _up(self) -> None:
        self.connected = True
        self.metrics.control_plane_connected.set(1)
        self._away = None

    def _prove(self, endpoint: ControlEndpoint) -> None:
        """The stream works: the agent is connected, and the outage (if one was logged) is
        over. Not before: a control plane that takes the stream and then refuses it (an
        unknown pod, an API server it cannot reach) must not read as connected."""
        if self._proven:
            return
        self._proven = True
        self._up()
        if self._warned:
            log.info("control plane %s:%d back", endpoint.host, endpoint.port)
        self._warned = False

    async def _subscribe(self, endpoint: ControlEndpoint, svid: Svid) -> None:
        """One stream, until it ends (None), fails (the errors of `_AWAY`) or the SVID
        changes (Rotated)."""
        channel = _Channel(
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
                try:
                    async with asyncio.timeout(endpoint.timeout.total_seconds()):
                        await stream.send_request()  # connects: the handshake verified the chain
                except TimeoutError:
                    raise Silent(
                        f"no connection within {endpoint.timeout.total_seconds():g}s"
                        " (TCP connect or TLS handshake; control.timeout)"
                    ) from None
                self._check_identity(stream.peer, endpoint)
                hello = self._hello()
                await stream.send_message(hello)
                resync = bool(hello.hello.running_version)
                await self._until_rotated(self._follow(stream, endpoint, resync))
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

    async def _follow(
        self, stream: SubscribeStream, endpoint: ControlEndpoint, resync: bool
    ) -> None:
        """Apply and answer each snapshot. A resync (the Hello named a version) may bring
        none, so lasting `control.timeout` (at least RESYNC_PROOF) proves the stream;
        otherwise the first must come within `control.timeout`."""
        loop = asyncio.get_running_loop()
        stable = max(endpoint.timeout.total_seconds(), RESYNC_PROOF)
        proof = loop.call_later(stable, self._prove, endpoint) if resync else None
        try:
            await self._answer(stream, endpoint, first=not resync)
        finally:
            if proof is not None:
                proof.cancel()

    async def _answer(
        self, stream: SubscribeStream, endpoint: ControlEndpoint, first: bool
    ) -> None:
        if first:
            try:
                async with asyncio.timeout(endpoint.timeout.total_seconds()):
                    snapshot = await stream.recv_message()
            except TimeoutError:
                raise Silent(
                    f"connected, but no config came within"
                    f" {endpoint.timeout.total_seconds():g}s (control.timeout)"
                ) from None
        else:
            snapshot = await stream.recv_message()
        while snapshot is not None:
            self._prove(endpoint)
            # Shielded: a rotation that ends the stream must not cut a reload in half.
            applying = self.target.take_snapshot(snapshot.version, snapshot.config_json)
            error = await asyncio.shield(applying)
            if error is None:
                answer = control_pb2.AgentMessage(ack=control_pb2.Ack(version=snapshot.version))
            else:
                nack = control_pb2.Nack(version=snapshot.version, error=error)
                answer = control_pb2.AgentMessage(nack=nack)
            await stream.send_message(answer)
            snapshot = await stream.recv_message()

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


class _Channel(Channel):
    """grpclib's Channel, its TLS closes bounded by TLS_SHUTDOWN_TIMEOUT: a ping that goes
    unanswered closes the connection (grpclib), and the loop's default (30 s) would make a
    control plane whose node vanished be noticed after 50 s instead of 20. Its one dial
    (`_create_connection`, grpclib 0.4) is ours."""

    async def _create_connection(self) -> H2Protocol:
        _, protocol = await self._loop.create_connection(
            self._protocol_factory,
            self._host,
            self._port,
            ssl=self._ssl,
            server_hostname=self._config.ssl_target_name_override,
            ssl_shutdown_timeout=TLS_SHUTDOWN_TIMEOUT,
        )
        return protocol


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
    if isinstance(exc, NotTheControlPlane | Silent):
        return str(exc)
    return repr(exc)
