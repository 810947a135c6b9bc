"""A small control plane for tests: a real grpclib server of control.proto over mTLS.

It serves every subscriber the one config it holds (no API server, no mesh
compiling: `control/` is the real thing) and records what agents say: their
Hello, the SVID they connected with, and each Ack or Nack. It runs on an
event loop of its own in a thread, so tests that block on agent processes
(urllib, stderr) can drive it; every method is safe to call from the test's
thread. `stop()` and `start()` take it away and bring it back on the same
port, as a restarting control plane would be.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cryptography import x509
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from agent.adapters.control_plane import ssl_object
from control.core.mesh import version_of
from identity import SpiffeId
from identity.proto import control_pb2
from identity.proto.control_grpc import ControlPlaneBase
from tests import certs
from tests.support import TRUST_DOMAIN, CaSetup, free_port

T = TypeVar("T")

#: Who the agents expect (agent/config.py's default for control.spiffe_id).
CONTROL_ID = SpiffeId.for_workload(TRUST_DOMAIN, "outrider-system", "outrider-control")


@dataclass
class Subscriber:
    """One stream: what the agent said, and with which SVID."""

    pod: str
    agent_version: str
    running_version: str
    spiffe_id: str
    serial: int
    opened: float = field(default_factory=time.monotonic)  # when its Hello came
    answers: list[tuple[str, str, str]] = field(default_factory=list)  # (ack|nack, version, error)
    outbox: asyncio.Queue[control_pb2.Snapshot] = field(default_factory=asyncio.Queue)


class ControlPlane(ControlPlaneBase):
    def __init__(self) -> None:
        self.config: dict[str, Any] | None = None
        self.raw: bytes | None = None  # sent as is when set: a snapshot that is not JSON
        self.version: str | None = None  # sent instead of the content's when set
        self.deny: str | None = None  # when set: every stream ends PERMISSION_DENIED, this why
        self.deny_after = 0.0  # seconds each refused stream is held first (the real one's wait)
        self.subscribers: list[Subscriber] = []  # connected now
        self.history: list[Subscriber] = []  # every stream ever opened, in order
        self.transports: set[asyncio.BaseTransport] = set()  # what `cut` closes

    def snapshot(self) -> control_pb2.Snapshot | None:
        if self.config is None:
            return None
        data = self.raw if self.raw is not None else json.dumps(self.config).encode()
        version = self.version if self.version is not None else version_of(self.config)
        return control_pb2.Snapshot(version=version, config_json=data)

    async def Subscribe(
        self, stream: Stream[control_pb2.AgentMessage, control_pb2.Snapshot]
    ) -> None:
        first = await stream.recv_message()
        if first is None or not first.HasField("hello"):
            return  # not an agent of the protocol (or one that hung up first)
        hello = first.hello
        tls = ssl_object(stream.peer)
        assert tls is not None
        self.transports.add(stream.peer._transport)  # type: ignore[union-attr]
        cert = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True))
        uri = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        subscriber = Subscriber(
            hello.pod_name,
            hello.agent_version,
            hello.running_version,
            str(uri.value.get_values_for_type(x509.UniformResourceIdentifier)[0]),
            cert.serial_number,
        )
        self.subscribers.append(subscriber)
        self.history.append(subscriber)
        if self.deny is not None:
            await asyncio.sleep(self.deny_after)
            self.subscribers.remove(subscriber)
            raise GRPCError(Status.PERMISSION_DENIED, self.deny)
        snapshot = self.snapshot()
        if snapshot is not None and snapshot.version != hello.running_version:
            subscriber.outbox.put_nowait(snapshot)
        sender = asyncio.create_task(self._send(stream, subscriber))
        try:
            while (message := await stream.recv_message()) is not None:
                if message.HasField("ack"):
                    subscriber.answers.append(("ack", message.ack.version, ""))
                elif message.HasField("nack"):
                    nack = message.nack
                    subscriber.answers.append(("nack", nack.version, nack.error))
        finally:
            sender.cancel()
            self.subscribers.remove(subscriber)

    async def _send(
        self,
        stream: Stream[control_pb2.AgentMessage, control_pb2.Snapshot],
        subscriber: Subscriber,
    ) -> None:
        while True:
            await stream.send_message(await subscriber.outbox.get())

    def cut(self) -> None:
        """Close every connection, as the end of the process would."""
        for transport in self.transports:
            transport.abort()
        self.transports.clear()

    def publish(
        self, config: dict[str, Any], raw: bytes | None = None, version: str | None = None
    ) -> str:
        self.config, self.raw, self.version = config, raw, version
        snapshot = self.snapshot()
        assert snapshot is not None
        for subscriber in self.subscribers:
            subscriber.outbox.put_nowait(snapshot)
        return snapshot.version


@dataclass
class Answer:
    kind: str  # ack or nack
    error: str


class ControlPlaneThread:
    """The control plane on its own loop; every method may be called from any thread."""

    def __init__(self, context: ssl.SSLContext, port: int) -> None:
        self.context = context
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.plane = ControlPlane()
        self._server: Server | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

    def _call(self, work: Callable[[], T]) -> T:
        """`work()` on the control plane's loop, with its result here."""
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(work())
            except BaseException as exc:  # handed to the caller
                done.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return done.result(10)

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(10)

    def start(self) -> None:
        async def start() -> Server:
            server = Server([self.plane])
            await server.start("127.0.0.1", self.port, ssl=self.context)
            return server

        self._server = self._run(start())

    def stop(self) -> None:
        """Away: the port closed, every stream cut."""
        server, self._server = self._server, None
        if server is not None:

            async def stop() -> None:
                server.close()  # grpclib cancels the handlers but keeps their connections
                self.plane.cut()
                await server.wait_closed()

            self._run(stop())

    def publish(
        self, config: dict[str, Any], raw: bytes | None = None, version: str | None = None
    ) -> str:
        """Serve `config` (as JSON, or `raw` bytes) under its version (or `version`, the
        control plane's say: a broken one) to every agent."""
        return self._call(lambda: self.plane.publish(config, raw, version))

    def deny(self, why: str | None, after: float = 0.0) -> None:
        """End every stream from now on PERMISSION_DENIED (`why`), as a control plane that
        does not know the pod would, `after` seconds (it first waits for the pod to show up);
        None: serve again."""

        def set_deny() -> None:
            self.plane.deny, self.plane.deny_after = why, after

        self._call(set_deny)

    def connected(self) -> list[Subscriber]:
        """The streams open now."""
        return self._call(lambda: list(self.plane.subscribers))

    def streams(self) -> list[Subscriber]:
        """Every stream that said Hello so far, open or not, in order."""
        return self._call(lambda: list(self.plane.history))

    def answer(self, version: str, timeout: float = 10.0) -> Answer:
        """The first Ack or Nack of `version` on any stream, waited for."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for subscriber in self.streams():
                for kind, answered, error in list(subscriber.answers):
                    if answered == version:
                        return Answer(kind, error)
            time.sleep(0.02)
        raise AssertionError(f"no agent answered version {version} within {timeout}s")

    def wait_for_streams(self, count: int, timeout: float = 10.0) -> list[Subscriber]:
        """Every stream opened so far, once there are `count`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.streams()
            if len(history) >= count:
                return history
            time.sleep(0.02)
        raise AssertionError(f"fewer than {count} streams within {timeout}s")

    def close(self) -> None:
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()


def control_context(setup: CaSetup, spiffe_id: SpiffeId = CONTROL_ID) -> ssl.SSLContext:
    """The control plane's TLS: an SVID of our CA naming `spiffe_id`, client SVIDs required."""
    context = certs.server_context(setup.bundle_pem, certs.valid_svid(setup, spiffe_id))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    return context


@contextmanager
def control_plane(
    setup: CaSetup,
    config: dict[str, Any] | None = None,
    *,
    spiffe_id: SpiffeId = CONTROL_ID,
    started: bool = True,
) -> Iterator[ControlPlaneThread]:
    """A control plane serving `config` on a fixed loopback port (`.address`)."""
    plane = ControlPlaneThread(control_context(setup, spiffe_id), free_port())
    if config is not None:
        plane.publish(config)
    if started:
        plane.start()
    try:
        yield plane
    finally:
        plane.close()


def bootstrap(address: str, pod: str = "web-0", **control: Any) -> dict[str, Any]:
    """agent.yaml's control section for the control plane at `address`."""
    return {"address": address, "server_name": "localhost", "pod": pod, **control}
