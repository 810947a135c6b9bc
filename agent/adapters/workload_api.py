"""The SPIFFE Workload API and Envoy SDS, on one Unix socket in the pod (`workload_api:`).

The SVID handed out is the pod's identity with a key of its own: after every
rotation of the agent's SVID, `HandedOut` asks the CA for a second one (a
fresh P-256 key, the agent's new SVID as the credential, the answer checked
as the agent's own is) and pushes it, with the roots in use, to every open
stream; a trust-bundle change pushes the same SVID with the new roots. The
agent's own key never leaves its memory by this way: a caller that holds the
handed-out key can be the pod to its peers (it is the pod's app), but cannot
be the agent, decrypt its connections, or renew the agent's SVID.

Both services run on grpclib behind the `BoundedServer` the CA and control
plane use (identity/grpcserving.py), with its connection and message bounds.
Which calls go with which rules is agent/core/workload.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import AsyncGenerator, Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from agent.adapters.metrics import AgentMetrics
from agent.adapters.rotator import IdentityManager, RenewalFailed
from agent.config import WorkloadApiConfig
from agent.core import workload
from agent.core.svid import Svid
from identity import SpiffeId, TrustBundle
from identity.backoff import Backoff
from identity.grpcserving import BoundedServer, GrpcLimits
from identity.printable import printable
from identity.proto import envoy_discovery_pb2, workload_pb2
from identity.proto.envoy_sds_grpc import SecretDiscoveryServiceBase
from identity.proto.workload_grpc import SpiffeWorkloadAPIBase
from identity.serving import ConnectionLimits, progress_of
from identity.throttle import LogThrottle, held_back

if TYPE_CHECKING:
    from grpclib.server import Stream

    SvidStream = Stream[workload_pb2.X509SVIDRequest, workload_pb2.X509SVIDResponse]
    BundlesStream = Stream[workload_pb2.X509BundlesRequest, workload_pb2.X509BundlesResponse]
    SecretsStream = Stream[
        envoy_discovery_pb2.DiscoveryRequest, envoy_discovery_pb2.DiscoveryResponse
    ]
    AnyStream = Stream[Any, Any]

log = logging.getLogger("outrider.agent.workload_api")

#: Envoy's DiscoveryRequest carries its node, with every extension it was built with: ~20 KB.
#: Clients are told 100 streams a connection (RFC 9113's recommended least), so that a
#: process with more sources than 16 sees RESOURCE_EXHAUSTED instead of a call grpcio
#: or py-spiffe queues unseen.
LIMITS = GrpcLimits(max_message_bytes=262_144, max_concurrent_streams=16, advertised_streams=100)
#: The pod's own processes: a few clients, each with a stream or two for hours.
CONNECTIONS = ConnectionLimits(max_connections=64, idle_timeout=timedelta(seconds=60))
#: How often an open stream tells the acceptor it is not idle (a third of its timeout).
KEEPALIVE = CONNECTIONS.idle_timeout.total_seconds() / 3
#: Long-lived calls: window updates and acks come back for every push.
CONTROL_FRAMES_PER_SECOND = 10.0
#: How long a push may wait for the caller to take it (its stream's flow-control window
#: full: it reads nothing). Then its connection is closed, so that a process that opens
#: streams and never reads cannot hold slots forever: an open stream is owed answers, so
#: the acceptor never displaces it. Closed rather than the stream ended with a status: the
#: status would queue behind the very bytes the caller does not read, and never arrive;
#: a closed connection is what a gRPC client sees as UNAVAILABLE and reconnects after.
PUSH_TIMEOUT = 30.0
#: Characters of a caller's own text (an SDS node ID, a NACK's message) said in the log.
MAX_SAID = 200
#: Connections with calls one UID may hold: half the slots, so that a process of one UID
#: (stuck or hostile) leaves the other half to the pod's other users (Envoy, usually a
#: UID of its own). Containers that share one UID share the whole.
MAX_CONNECTIONS_PER_UID = CONNECTIONS.max_connections // 2


@dataclass(frozen=True)
class Handout:
    """What goes out now, and its version, from 1: the roots in use (the agent's bundle),
    and the SVID handed out (its bundle those roots), None before the first is minted."""

    version: int
    spiffe_id: SpiffeId
    bundle: TrustBundle
    svid: Svid | None


class HandedOut:
    """The SVID the APIs hand out: minted after each rotation, re-bundled on each root change.

    `current(after)` waits for a version newer than `after` (0: the first), so every
    stream pushes each change exactly once, however late it looks. The roots go out
    from the agent's bundle alone, before the first SVID is minted too.
    """

    def __init__(self, identity: IdentityManager, backoff: Backoff) -> None:
        self._identity = identity
        self._backoff = backoff
        self._handout: Handout | None = None
        self._changed = asyncio.Event()
        self._minted_under: str | None = None  # the agent's serial the handout was minted under
        self._wake = asyncio.Event()
        self._failure: str | None = None  # why the last mint failed (None: it did not)
        self._expiry: asyncio.TimerHandle | None = None  # at the SVID's not_after: see _expired

    @property
    def svid(self) -> Svid | None:
        """The SVID handed out now (None before the first is minted)."""
        return self._handout.svid if self._handout else None

    @property
    def failure(self) -> str | None:
        """Why the last mint failed; None when it did not."""
        return self._failure

    def on_identity_changed(self) -> None:
        """IdentityManager.changed: a rotation (mint anew) or new roots (re-bundle).

        New roots go out at once, even while a mint waits on the CA: a root removed
        must stop being trusted by the pod's apps when the agent stops trusting it.
        """
        agent = self._identity.svid
        if agent is None:
            return
        if agent.serial != self._minted_under:
            self._wake.set()  # `run` mints, off this callback
        handout = self._handout
        if handout is None:
            self._publish(agent.spiffe_id, agent.bundle, None)
        elif handout.bundle != agent.bundle:
            svid = handout.svid and dataclasses.replace(handout.svid, bundle=agent.bundle)
            self._publish(agent.spiffe_id, agent.bundle, svid)

    def unusable_refusal(self, handout: Handout) -> str | None:
        """Why `handout`'s SVID cannot go out now (expired, or its roots gone); None if it may."""
        if handout.svid is None:
            return self.not_yet()
        return workload.unusable_refusal(handout.svid, self._identity.now())

    def not_yet(self) -> str:
        return f"no SVID to hand out yet: {self._failure or 'the first is being minted'}"

    async def current(self, after: int = 0, *, svid: bool = True) -> Handout:
        """The handout newer than `after` (with an SVID, unless `svid` is False), once there is.

        Before the first SVID: GRPCError UNAVAILABLE once a mint has failed (a caller is
        told at once, as the spec asks of a first answer, and retries), a wait while
        the first mint is on its way.
        """
        while (
            (handout := self._handout) is None
            or handout.version <= after
            or (svid and handout.svid is None)
        ):
            if svid and (handout is None or handout.svid is None) and self._failure is not None:
                raise GRPCError(Status.UNAVAILABLE, self.not_yet())
            changed = self._changed
            await changed.wait()
        return handout

    async def run(self) -> None:
        """Mint after each rotation; while the CA fails, back off and keep the last one."""
        self.on_identity_changed()  # the agent has its first SVID by now: its roots, a mint
        failures = 0
        while True:
            await self._wake.wait()
            self._wake.clear()
            agent = self._identity.svid
            if agent is None or agent.serial == self._minted_under:
                continue
            try:
                minted = await self._identity.renew()
            except Exception as exc:  # RenewalFailed, or a bug: the loop must outlive either
                if not isinstance(exc, RenewalFailed):
                    log.exception("minting the SVID to hand out: unexpected error")
                failures += 1
                self._failure = str(exc)
                if (handout := self._handout) is not None and handout.svid is None:
                    # A new version, the same roots: streams waiting on the first SVID are
                    # told (UNAVAILABLE), not left waiting; the roots go out once only.
                    self._publish(handout.spiffe_id, handout.bundle, None)
                delay = self._backoff.delay(failures, self._identity.rng).total_seconds()
                log.warning("cannot mint the SVID to hand out (%s); retrying in %.1fs", exc, delay)
                self._wake.set()
                await asyncio.sleep(delay)
                continue
            failures = 0
            self._failure = None
            self._minted_under = agent.serial
            roots = (self._identity.svid or agent).bundle  # as of now: it may have changed since
            # Verified against the roots the agent uses, not the CA's alone.
            self._publish(minted.spiffe_id, roots, dataclasses.replace(minted, bundle=roots))
            log.info("handing out SVID serial %s (the agent's is %s)", minted.serial, agent.serial)

    def close(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _publish(self, spiffe_id: SpiffeId, bundle: TrustBundle, svid: Svid | None) -> None:
        version = self._handout.version + 1 if self._handout else 1
        self._handout = Handout(version, spiffe_id, bundle, svid)
        self._wake_waiters()
        self._watch_expiry()

    def _watch_expiry(self) -> None:
        """Have `_expired` run when the SVID handed out expires (none minted by then)."""
        self.close()
        svid = self._handout.svid if self._handout else None
        if svid is None:
            return
        left = (svid.not_after - self._identity.now()).total_seconds()
        if left > 0:  # expired already: each caller is refused as it comes
            self._expiry = asyncio.get_running_loop().call_later(left, self._expired)

    def _expired(self) -> None:
        """The SVID handed out expired with no new one minted: the same, as a new version,
        so that every open stream checks it again and ends UNAVAILABLE now, as a new call
        would, rather than at the next change (hours away while the CA is down)."""
        self._expiry = None
        handout = self._handout
        if handout is None or handout.svid is None:
            return
        # One reading decides: the loop's clock may run a hair ahead of the wall clock, and
        # a second reading past the NotAfter would leave no timer and no stream told.
        left = (handout.svid.not_after - self._identity.now()).total_seconds()
        if left > 0:
            self._expiry = asyncio.get_running_loop().call_later(left, self._expired)
            return
        self._publish(handout.spiffe_id, handout.bundle, handout.svid)

    def _wake_waiters(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()


#: struct ucred: pid_t, then uid_t and gid_t, unsigned (a UID may be above 2**31).
_UCRED = "iII"


def peer_credentials(stream: AnyStream) -> workload.PeerCredentials | None:
    """SO_PEERCRED of the caller's connection; None when the kernel has none to give."""
    transport = stream.peer._transport  # grpclib keeps the transport there alone
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family != socket.AF_UNIX:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize(_UCRED))
    except OSError:
        return None
    pid, uid, gid = struct.unpack(_UCRED, raw)
    return workload.PeerCredentials(pid, uid, gid)


class _Slots:
    """Connections with calls, by the caller's UID (both APIs share one count)."""

    def __init__(self) -> None:
        self._by_uid: dict[int, set[Any]] = {}

    def admit(self, uid: int, transport: Any) -> bool:
        """Whether a call on `transport` by `uid` may go on (its connection counted)."""
        held = {t for t in self._by_uid.get(uid, ()) if not t.is_closing()}
        admitted = transport in held or len(held) < MAX_CONNECTIONS_PER_UID
        if admitted:
            held.add(transport)
        if held:
            self._by_uid[uid] = held
        else:
            self._by_uid.pop(uid, None)
        return admitted


class _Caller:
    """What every call does first: attest the caller (the header, then SO_PEERCRED).

    Each refusal is counted; the log says it at most once a while per kind
    (identity/throttle.py): a process of the pod can call as fast as it likes.
    """

    def __init__(
        self, api: str, metrics: AgentMetrics, uids: frozenset[int], slots: _Slots
    ) -> None:
        self.api = api
        self.metrics = metrics
        self.uids = uids
        self.slots = slots
        self._lines = LogThrottle()

    def attest(self, stream: AnyStream, *, header: bool) -> workload.PeerCredentials:
        if header:
            refusal = workload.header_refusal(stream.metadata or {})  # type: ignore[arg-type]
            if refusal is not None:
                self.refuse("missing_header", refusal)
                raise GRPCError(Status.INVALID_ARGUMENT, refusal)
        credentials = peer_credentials(stream)
        refusal = workload.caller_refusal(credentials, self.uids)
        if refusal is not None:
            self.refuse("no_credentials" if credentials is None else "uid", refusal)
            raise GRPCError(Status.PERMISSION_DENIED, refusal)
        assert credentials is not None
        if not self.slots.admit(credentials.uid, stream.peer._transport):
            refusal = (
                f"uid {credentials.uid} holds {MAX_CONNECTIONS_PER_UID} connections with calls"
                " already: close one, or make calls on those"
            )
            self.refuse("uid_connections", refusal)
            raise GRPCError(Status.RESOURCE_EXHAUSTED, refusal)
        return credentials

    async def push(self, stream: AnyStream, message: Any) -> None:
        """Send `message`; a caller that does not take it within PUSH_TIMEOUT loses its
        connection (see PUSH_TIMEOUT)."""
        try:
            async with asyncio.timeout(PUSH_TIMEOUT):
                await stream.send_message(message)
        except TimeoutError:
            refusal = f"a push not taken in {PUSH_TIMEOUT:g}s: closing the caller's connection"
            self.refuse("push_timeout", refusal)
            stream.peer._transport.abort()
            raise GRPCError(Status.UNAVAILABLE, refusal) from None

    def refuse(self, reason: str, refusal: str) -> None:
        self.metrics.workload_api_refusals.labels(self.api, reason).inc()
        self.say(logging.WARNING, reason, "refused a %s call: %s", self.api, refusal)

    def say(self, level: int, kind: Hashable, message: str, *args: object) -> None:
        """A line of `kind` at most once a while: what a caller sends (an SDS client's
        NACK, the names it asks for; `kind` names the caller, uid and pid, so one process
        sending steadily never hides another's, Envoy's) is said, never as often as it is
        sent."""
        held = self._lines.admit(kind, time.monotonic())
        if held is not None:
            log.log(level, message + "%s", *args, held_back(held))

    def unavailable(self, refusal: str) -> GRPCError:
        """The call's end while there is no valid SVID to hand out (retriable: UNAVAILABLE)."""
        self.refuse("no_valid_svid", refusal)
        return GRPCError(Status.UNAVAILABLE, refusal)

    def handed_out(self, keys: int) -> None:
        self.metrics.workload_keys_handed_out.labels(self.api).inc(keys)


async def _changes(
    stream: AnyStream, handed_out: HandedOut, *, svid: bool = True
) -> AsyncGenerator[Handout, None]:
    """Each new handout (with an SVID, unless `svid` is False), as it comes; the connection
    kept alive meanwhile."""
    after = 0
    progress = progress_of(stream.peer._transport)
    if progress is not None:
        progress.received()  # owed answers for as long as the stream lasts
    try:
        while True:
            try:
                async with asyncio.timeout(KEEPALIVE):
                    handout = await handed_out.current(after, svid=svid)
            except TimeoutError:
                if progress is not None:
                    progress.answered()
                    progress.received()
                continue
            after = handout.version
            yield handout
    finally:
        if progress is not None:
            progress.answered()


class _Service:
    """What both services answer from: the SVID handed out, and the caller's checks."""

    def __init__(self, handed_out: HandedOut, caller: _Caller) -> None:
        self._handed_out = handed_out
        self._caller = caller


class WorkloadApi(_Service, SpiffeWorkloadAPIBase):
    """The SPIFFE Workload API's X.509 calls; the JWT calls are not served (UNIMPLEMENTED)."""

    async def FetchX509SVID(self, stream: SvidStream) -> None:
        await self._push_changes(stream, self._svid_response, svid=True)

    async def FetchX509Bundles(self, stream: BundlesStream) -> None:
        # The agent's roots alone: they go out before the first SVID is minted too.
        await self._push_changes(
            stream, lambda handout: workload.x509_bundles_response(handout.bundle), svid=False
        )

    async def _push_changes(
        self, stream: AnyStream, response: Callable[[Handout], Any], *, svid: bool
    ) -> None:
        """Attest, take the request, then push `response` of each change that differs from
        the last sent (a version that only had the SVID checked again does not).

        `svid`: the call hands out the SVID's key, so it waits for the first SVID, and
        its caller is logged and counted.
        """
        credentials = self._caller.attest(stream, header=True)
        await stream.recv_message()
        if svid:
            log.info("FetchX509SVID from pid %d uid %d", credentials.pid, credentials.uid)
        sent = None
        async with contextlib.aclosing(_changes(stream, self._handed_out, svid=svid)) as changes:
            async for handout in changes:
                answer = response(handout)
                if answer == sent:
                    continue
                await self._caller.push(stream, answer)
                sent = answer
                if svid:
                    self._caller.handed_out(1)

    def _svid_response(self, handout: Handout) -> workload_pb2.X509SVIDResponse:
        """The SVID handed out; UNAVAILABLE when it cannot go out (expired, its roots gone)."""
        if (refusal := self._handed_out.unusable_refusal(handout)) is not None:
            raise self._caller.unavailable(refusal)
        assert handout.svid is not None
        return workload.x509_svid_response(handout.svid)


class SecretDiscovery(_Service, SecretDiscoveryServiceBase):
    """Envoy's SDS, state of the world: a response per change, and per new set of names.

    Envoy acknowledges each response with a request naming its nonce; only a
    request for other names (or the first) is answered. A NACK is logged.
    """

    async def FetchSecrets(self, stream: SecretsStream) -> None:
        self._caller.attest(stream, header=False)
        request = await stream.recv_message()
        if request is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "FetchSecrets takes a DiscoveryRequest")
        handout = await self._handed_out.current(svid=False)
        response = self._response(request.resource_names, handout)
        if response is None:  # it asks for the SVID: wait for the first (or UNAVAILABLE)
            handout = await self._handed_out.current()
            response = self._response(request.resource_names, handout)
        assert response is not None
        await stream.send_message(response)

    async def StreamSecrets(self, stream: SecretsStream) -> None:
        credentials = self._caller.attest(stream, header=False)
        names: list[str] | None = None
        asked = asyncio.Event()

        async def read() -> None:
            nonlocal names
            async for request in stream:
                client = printable(request.node.id, MAX_SAID)
                if request.error_detail.message:
                    self._caller.say(
                        logging.WARNING,
                        ("nack", credentials.uid, credentials.pid),
                        "SDS client %r refused version %s: %s",
                        client,
                        printable(request.version_info, MAX_SAID),
                        printable(request.error_detail.message, MAX_SAID),
                    )
                if names is None or list(request.resource_names) != names:
                    names = list(request.resource_names)
                    self._caller.say(
                        logging.INFO,
                        ("asks", credentials.uid, credentials.pid),
                        "SDS: %r (pid %d uid %d) asks for %s",
                        client,
                        credentials.pid,
                        credentials.uid,
                        printable(", ".join(names), MAX_SAID) or "every secret",
                    )
                    asked.set()

        reader = asyncio.create_task(read())
        try:
            await self._serve(stream, reader, asked, lambda: names)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _serve(
        self,
        stream: SecretsStream,
        reader: asyncio.Task[None],
        asked: asyncio.Event,
        names: Callable[[], list[str] | None],
    ) -> None:
        changes = _changes(stream, self._handed_out, svid=False)
        handout: Handout | None = None
        sent: tuple[TrustBundle, Svid | None, list[str]] | None = None
        next_change = asyncio.ensure_future(anext(changes))
        try:
            while not reader.done():
                waiting = asyncio.ensure_future(asked.wait())
                await asyncio.wait(
                    {reader, next_change, waiting}, return_when=asyncio.FIRST_COMPLETED
                )
                waiting.cancel()
                asked.clear()
                if next_change.done():
                    handout = next_change.result()
                    next_change = asyncio.ensure_future(anext(changes))
                wanted = names()
                if handout is None or wanted is None:
                    continue
                if sent == (handout.bundle, handout.svid, wanted) and not (
                    workload.needs_svid(wanted, handout.spiffe_id)
                    and self._handed_out.unusable_refusal(handout)
                ):
                    continue  # nothing new for these names (an SVID that expired is news)
                response = self._response(wanted, handout)
                if response is None:
                    continue  # the SVID asked for is not minted yet: the next change
                await self._caller.push(stream, response)
                sent = (handout.bundle, handout.svid, wanted)
            reader.result()  # the client's error, if any, ends the call
        finally:
            next_change.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await next_change
            await changes.aclose()

    def _response(
        self, names: Sequence[str], handout: Handout
    ) -> envoy_discovery_pb2.DiscoveryResponse | None:
        """The answer for `names`; None while the SVID they ask for is not minted yet
        (UNAVAILABLE once a mint has failed)."""
        if unserved := workload.unserved(names, handout.spiffe_id):
            said = workload.unserved_refusal(unserved, handout.spiffe_id)
            self._caller.refuse("unknown_secret", said)
            raise GRPCError(Status.INVALID_ARGUMENT, said)
        if workload.needs_svid(names, handout.spiffe_id):
            if handout.svid is None and self._handed_out.failure is None:
                return None
            if refusal := self._handed_out.unusable_refusal(handout):
                raise self._caller.unavailable(refusal)
        found = workload.secrets(names, handout.spiffe_id, handout.bundle, handout.svid)
        self._caller.handed_out(workload.keys_in(found))
        serial = handout.svid.serial if handout.svid else "none"
        version = f"{handout.version}-{serial}"
        return workload.discovery_response(found, version, nonce=os.urandom(8).hex())


class WorkloadApiServer:
    """Both services on `path`; `start` binds (replacing a stale socket), `close` unlinks."""

    def __init__(
        self,
        config: WorkloadApiConfig,
        identity: IdentityManager,
        metrics: AgentMetrics,
        backoff: Backoff,
    ) -> None:
        self.path = config.socket
        self.metrics = metrics
        self.handed_out = HandedOut(identity, backoff)
        identity.changed.append(self.handed_out.on_identity_changed)
        slots = _Slots()
        workload_api = WorkloadApi(
            self.handed_out, _Caller("workload", metrics, config.uids, slots)
        )
        sds = SecretDiscovery(self.handed_out, _Caller("sds", metrics, config.uids, slots))
        self._server = BoundedServer(
            [workload_api, sds],
            LIMITS,
            control_frames_per_second=CONTROL_FRAMES_PER_SECOND,
            too_many=lambda: self._closed("streams"),
        )
        self._minting: asyncio.Task[None] | None = None
        #: The socket file this server bound (device, inode, change time: a file put at
        #: the path since may reuse the inode): the one it unlinks at close, not whatever
        #: another agent or a user put there.
        self._bound: tuple[int, int, int] | None = None
        self._serving = False

    async def start(self) -> None:
        sock = _bind_unix(self.path)
        self._bound = _file_id(self.path)
        try:
            await self._server.serve(sock, None, CONNECTIONS, self._closed)  # type: ignore[arg-type]
        except BaseException:
            sock.close()
            raise
        self._serving = True
        self._minting = asyncio.create_task(self.handed_out.run(), name="workload-svid")
        log.info("serving the SPIFFE Workload API and Envoy SDS on unix:%s", self.path)

    def _closed(self, reason: str) -> None:
        self.metrics.workload_api_refusals.labels("connection", reason).inc()

    async def close(self) -> None:
        if self._minting is not None:
            self._minting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._minting
        self.handed_out.close()
        if not self._serving:
            return  # never served (refused at start, or stopped before): nothing to close
        self._server.close()
        await self._server.wait_closed()
        if self._bound is not None and _file_id(self.path) == self._bound:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def _file_id(path: Path) -> tuple[int, int, int] | None:
    try:
        found = path.lstat()
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino, found.st_ctime_ns


def _bind_unix(path: Path) -> socket.socket:
    """A listening socket at `path`, connectable by every UID in the pod (its apps run as
    their own); a socket left by an agent that died is replaced, any other file is not,
    nor a socket some process still listens on (another agent's: taking it would cut
    that agent's callers off)."""
    path.parent.mkdir(parents=True, exist_ok=True)  # an emptyDir has it; a file config may not
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket: not replacing it")
        if _listened_on(path):
            raise OSError(f"{path} is in use: another process listens on it; not replacing it")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o666)  # noqa: S103 (the volume, mounted in this pod alone, is the gate)
        sock.listen(64)
    except OSError:
        sock.close()
        raise
    return sock


def _listened_on(path: Path) -> bool:
    """Some process accepts connections on the socket at `path` (a full backlog counts)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        return probe.connect_ex(str(path)) in (0, errno.EAGAIN)
    finally:
        probe.close()
