"""The Subscribe RPC: authenticate the agent's SVID, authorize the pod it names, stream it
its configuration, and record what it makes of each version.

Per stream: the SVID (verified by TLS against the bundle) gives the namespace
and service account, and nothing else does. The first message must be Hello;
the pod it names must exist in that namespace and run as that service
account (`refusal`), else the stream ends PERMISSION_DENIED saying why. A
pod the watch has not brought yet is waited for, `POD_WAIT`. Then a Snapshot
at once (unless the agent already runs that version), and another each time
a new mesh gives the pod a new version. Acks and Nacks are recorded on the
`Agent`, which /debug/agents and `outrider proxy-status` show.

A subscription is a call the control plane owes answers to for as long as it
lasts: the connection's acceptor is told so (it is never displaced to make
room for another, and its idle timeout does not apply while the pod is
there), and HTTP/2 keepalive pings find agents that vanished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from control.core.mesh import Mesh
from control.metrics import ControlMetrics
from control.sync import MeshState
from control.tls import peer_spiffe_id
from identity import SpiffeId, SvidError, TrustDomain
from identity.printable import printable
from identity.proto import control_pb2
from identity.proto.control_grpc import ControlPlaneBase
from identity.serving import Progress, progress_of

if TYPE_CHECKING:
    from grpclib.server import Stream

    SubscribeStream = Stream[control_pb2.AgentMessage, control_pb2.Snapshot]

log = logging.getLogger("outrider.control.server")

#: How long a Hello may name a pod the watch has not brought yet.
POD_WAIT = 5.0
#: How long a new stream has to send its Hello.
HELLO_TIMEOUT = 10.0
#: A Nack's error text is kept to this many characters, Hello.agent_version to this many.
MAX_ERROR, MAX_BUILD = 2000, 64
MAX_POD_NAME = 253
#: A version is control.core.mesh.version_of's: 16 hex digits. An Ack, a Nack or a Hello
#: naming anything else names no version this control plane sends.
_VERSION = re.compile(r"[0-9a-f]{16}")
#: A refusal repeated is logged again after this many seconds; this many are remembered.
DENIAL_LOG_INTERVAL, DENIALS_REMEMBERED = 60.0, 10_000
#: The versions a stream remembers having sent, for Acks that arrive after a newer push.
SENT_REMEMBERED = 8
#: A pod's name: a DNS subdomain (RFC 1123), as the API server requires.
_POD_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Nack:
    version: str
    error: str


@dataclass(eq=False)  # each stream's own record, in a set by identity
class Agent:
    """One subscribed agent, as /debug/agents shows it."""

    namespace: str
    pod_name: str
    account: str
    spiffe_id: SpiffeId
    agent_version: str
    connected_since: datetime
    #: When the SVID the stream was authenticated with expires: the stream ends then.
    expires: datetime | None = field(default=None, repr=False)
    sent: str | None = None
    acked: str | None = None
    nack: Nack | None = None
    latest: str | None = None
    sent_at: float | None = field(default=None, repr=False)  # perf_counter; None once answered
    #: The versions sent on this stream, newest last (the running version of the Hello
    #: first): an Ack or Nack of any other is no answer to anything sent.
    sent_before: list[str] = field(default_factory=list, repr=False)
    #: Set when there is something to do: a new mesh, or the agent's side ended.
    wake: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    @property
    def pod(self) -> str:
        return f"{self.namespace}/{self.pod_name}"

    def view(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "spiffe_id": str(self.spiffe_id),
            "agent_version": self.agent_version,
            "sent": self.sent,
            "acked": self.acked,
            "nack": None if self.nack is None else vars(self.nack),
            "latest": self.latest,
            "connected_since": self.connected_since.isoformat(),
        }


def workload(spiffe_id: SpiffeId) -> tuple[str, str]:
    """(namespace, service account) of a Kubernetes workload's SVID; ValueError if not one."""
    segments = spiffe_id.segments
    if len(segments) != 4 or segments[0] != "ns" or segments[2] != "sa":
        raise ValueError(f"{spiffe_id} is not spiffe://<trust domain>/ns/<namespace>/sa/<account>")
    return segments[1], segments[3]


def refusal(mesh: Mesh, namespace: str, account: str, pod: str) -> str | None:
    """Why an agent of `namespace`/`account` may not speak for `pod`, or None if it may."""
    identity = mesh.pods.get((namespace, pod))
    if identity is None:
        return f"no pod {namespace}/{pod} in the mesh (the SVID's namespace is {namespace})"
    if identity.service_account != account:
        return (
            f"pod {namespace}/{pod} runs as service account {identity.service_account},"
            f" not {account}"
        )
    return None


class ControlPlaneService(ControlPlaneBase):
    def __init__(
        self,
        state: MeshState,
        trust_domain: TrustDomain,
        metrics: ControlMetrics,
        *,
        keepalive: float = 20.0,
        pod_wait: float = POD_WAIT,
        clock: Clock = utcnow,
    ) -> None:
        self.agents: set[Agent] = set()
        self._state = state
        self._trust_domain = trust_domain
        self._metrics = metrics
        self._keepalive = keepalive
        self._pod_wait = pod_wait
        self._clock = clock
        # Snapshots encoded for the current mesh, by version: the pods of a Deployment share
        # one configuration, so a change to it is encoded once, not once per pod. Only the
        # current mesh's: a version it no longer gives any pod is never sent again.
        self._encoded: dict[str, bytes] = {}
        self._encoded_for: Mesh | None = None
        self._denials_logged: dict[str, float] = {}  # why -> when (monotonic) last logged
        metrics.agents.set_function(lambda: len(self.agents))

    def mesh_changed(self) -> None:
        """A new mesh is in place: every subscription checks its pod's version."""
        for agent in self.agents:
            agent.wake.set()

    async def Subscribe(self, stream: SubscribeStream) -> None:
        spiffe_id, expires = self._authenticate(stream)
        try:
            namespace, account = workload(spiffe_id)
        except ValueError as exc:
            raise self._denied(str(exc)) from None
        hello = await self._hello(stream)
        await self._authorize(spiffe_id, namespace, account, hello.pod_name)
        build = printable(hello.agent_version, MAX_BUILD)
        agent = Agent(namespace, hello.pod_name, account, spiffe_id, build, self._clock(), expires)
        if _VERSION.fullmatch(hello.running_version):  # else it runs nothing we sent
            agent.sent = agent.acked = hello.running_version
            agent.sent_before.append(hello.running_version)
        log.info("%s subscribed as %s (agent %r)", agent.pod, spiffe_id, build)
        progress = progress_of(stream.peer._transport)
        self.agents.add(agent)
        if progress is not None:
            progress.received()  # owed answers for as long as the subscription lasts
        try:
            await self._serve(stream, agent, progress)
        finally:
            if progress is not None:
                progress.answered()
            self.agents.discard(agent)
            if agent.sent_at is not None:
                self._metrics.pushes.labels("abandoned").inc()
            log.info("%s unsubscribed", agent.pod)

    def _authenticate(self, stream: SubscribeStream) -> tuple[SpiffeId, datetime]:
        """The caller's SPIFFE ID, and when the SVID that proves it expires."""
        ssl_object = stream.peer._transport.get_extra_info("ssl_object")
        der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
        try:
            return peer_spiffe_id(der, self._trust_domain, self._clock())
        except SvidError as exc:
            raise GRPCError(Status.UNAUTHENTICATED, f"not an agent's SVID: {exc}") from None

    def _denied(self, why: str) -> GRPCError:
        """Every refusal is counted; each distinct one logged once per `DENIAL_LOG_INTERVAL`:
        a caller may ask again as fast as its connection goes."""
        self._metrics.denied.inc()
        now = time.monotonic()
        last = self._denials_logged.get(why)
        if last is None or now - last >= DENIAL_LOG_INTERVAL:
            if len(self._denials_logged) >= DENIALS_REMEMBERED:
                self._denials_logged.clear()
            self._denials_logged[why] = now
            log.warning("subscription refused: %s", why)
        return GRPCError(Status.PERMISSION_DENIED, why)

    async def _hello(self, stream: SubscribeStream) -> control_pb2.Hello:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT):
                first = await stream.recv_message()
        except TimeoutError:
            raise GRPCError(Status.DEADLINE_EXCEEDED, "no Hello came") from None
        if first is None or first.WhichOneof("kind") != "hello":
            raise GRPCError(Status.INVALID_ARGUMENT, "the first message must be Hello")
        hello = first.hello
        if len(hello.pod_name) > MAX_POD_NAME or not _POD_NAME.fullmatch(hello.pod_name):
            # Checked before it reaches a log line or /debug/agents: it is the caller's text.
            shown = repr(hello.pod_name[:64])
            raise GRPCError(Status.INVALID_ARGUMENT, f"Hello.pod_name {shown} is not a pod name")
        return hello

    async def _authorize(self, spiffe_id: SpiffeId, namespace: str, account: str, pod: str) -> None:
        """Return once the pod is known to run as the SVID's account; raise if it is not."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._pod_wait
        why = "the control plane has not read the cluster yet"
        while True:
            mesh = self._state.mesh
            if mesh is not None:
                found = refusal(mesh, namespace, account, pod)
                if found is None:
                    return
                why = found
                if (namespace, pod) in mesh.pods:
                    break  # the pod is there, as another account: waiting changes nothing
            try:
                async with asyncio.timeout_at(deadline):
                    await self._state.next_mesh().wait()
            except TimeoutError:
                break
        if self._state.mesh is None:
            raise GRPCError(Status.UNAVAILABLE, why)
        raise self._denied(f"{spiffe_id} may not subscribe for pod {namespace}/{pod}: {why}")

    async def _serve(
        self, stream: SubscribeStream, agent: Agent, progress: Progress | None
    ) -> None:
        reader = asyncio.create_task(self._read(stream, agent))
        reader.add_done_callback(lambda _: agent.wake.set())
        try:
            while True:
                agent.wake.clear()  # before reading the mesh: a newer one sets it again
                mesh = self._state.mesh
                assert mesh is not None  # _authorize waited for one
                await self._push(stream, agent, mesh)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._until_next_check(agent)):
                        await agent.wake.wait()
                self._check_expiry(agent)
                if reader.done():
                    reader.result()  # the agent's error, if any, ends the call
                    return  # the agent closed its side
                if progress is not None:  # still subscribed: not idle, whatever the timer says
                    progress.answered()
                    progress.received()
        finally:
            reader.cancel()

    def _until_next_check(self, agent: Agent) -> float:
        if agent.expires is None:
            return self._keepalive
        left = (agent.expires - self._clock()).total_seconds()
        return max(0.0, min(self._keepalive, left))

    def _check_expiry(self, agent: Agent) -> None:
        """An SVID proves who the agent is until it expires, and no longer: a renewed agent
        reconnects with its new one; one that cannot renew gets nothing more."""
        if agent.expires is not None and self._clock() >= agent.expires:
            log.info("%s: its SVID expired at %s", agent.pod, agent.expires.isoformat())
            raise GRPCError(
                Status.UNAUTHENTICATED,
                f"the SVID of this stream expired at {agent.expires.isoformat()};"
                " reconnect with a renewed one",
            )

    async def _push(self, stream: SubscribeStream, agent: Agent, mesh: Mesh) -> None:
        why = refusal(mesh, agent.namespace, agent.account, agent.pod_name)
        version = None if why is not None else mesh.version_for(agent.namespace, agent.pod_name)
        if version is None:
            raise self._denied(f"{agent.pod} is gone: {why or 'no configuration for it'}")
        agent.latest = version
        if version == agent.sent:
            return
        if agent.sent_at is not None:
            self._metrics.pushes.labels("superseded").inc()
        snapshot = control_pb2.Snapshot(version=version, config_json=self._encode(mesh, agent))
        await stream.send_message(snapshot)
        agent.sent, agent.sent_at = version, time.perf_counter()
        agent.sent_before = [*agent.sent_before[1 - SENT_REMEMBERED :], version]
        log.debug("sent %s version %s", agent.pod, version)

    def _encode(self, mesh: Mesh, agent: Agent) -> bytes:
        version = mesh.version_for(agent.namespace, agent.pod_name)
        assert version is not None  # _push checked
        if mesh is not self._encoded_for:
            self._encoded, self._encoded_for = {}, mesh
        if version not in self._encoded:
            encoded = mesh.encoded_for(agent.namespace, agent.pod_name)
            assert encoded is not None  # it has a version
            self._encoded[version] = encoded
        return self._encoded[version]

    async def _read(self, stream: SubscribeStream, agent: Agent) -> None:
        """Record the agent's answers. Their text is the caller's: a version is recorded
        only if this stream sent it, and a Nack's error only printable and cut, before
        either reaches /debug/agents, a log line, or an operator's terminal."""
        while (message := await stream.recv_message()) is not None:
            kind = message.WhichOneof("kind")
            if kind not in ("ack", "nack"):
                raise GRPCError(Status.INVALID_ARGUMENT, "Hello comes once, first")
            answer = message.ack if kind == "ack" else message.nack
            if answer.version not in agent.sent_before:
                log.debug("%s answered a version it was not sent; ignored", agent.pod)
                continue
            if kind == "ack":
                self._answered(agent, message.ack.version, "acked")
                agent.acked = message.ack.version
                if agent.nack is not None and agent.acked == agent.sent:
                    agent.nack = None
            else:
                self._answered(agent, message.nack.version, "nacked")
                nack = Nack(message.nack.version, printable(message.nack.error, MAX_ERROR))
                if nack != agent.nack:  # logged once: an agent may repeat itself at will
                    log.warning("%s refused version %s: %s", agent.pod, nack.version, nack.error)
                agent.nack = nack

    def _answered(self, agent: Agent, version: str, result: str) -> None:
        if version == agent.sent and agent.sent_at is not None:
            self._metrics.push_ack.observe(time.perf_counter() - agent.sent_at)
            self._metrics.pushes.labels(result).inc()
            agent.sent_at = None
