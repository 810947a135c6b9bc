"""An in-process agent serving `workload_api:`, and clients of its socket.

    async with workload_agent(setup) as (agent, socket_path):
        async with svid_stream(socket_path) as stream:   # FetchX509SVID, as the spec says
            first = await stream.recv_message()

Rotations are forced (`rotate(agent)`: the renewal loop renews now), never
waited for. py-spiffe runs in a process of its own (`spiffe_client`): its
generated workload.proto and ours declare the same top-level messages, which
one protobuf descriptor pool cannot hold twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.settings
from cryptography import x509
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from h2.exceptions import ProtocolError

from agent.adapters.rotator import SignFn
from agent.app import Agent
from agent.core.workload import SECURITY_HEADER
from identity.proto import envoy_discovery_pb2, workload_pb2
from identity.proto.envoy_sds_grpc import SecretDiscoveryServiceStub
from identity.proto.workload_grpc import SpiffeWorkloadAPIStub
from tests.mesh import agent_yaml, local_sign, running_agent, sample
from tests.support import CaSetup

HEADER = {SECURITY_HEADER: "true"}
SPIFFE_CLIENT = Path(__file__).with_name("spiffe_client.py")


@asynccontextmanager
async def workload_agent(
    setup: CaSetup,
    name: str = "web",
    *,
    uids: list[int] | None = None,
    sign: SignFn | None = None,
    ca_backoff: dict[str, str] | None = None,
) -> AsyncIterator[tuple[Agent, Path]]:
    """An agent with `workload_api:` on a socket in a short temporary directory (a Unix
    socket's path has at most 107 bytes: pytest's tmp_path can be longer); its SVIDs
    from `sign` (default: `local_sign`)."""
    directory = Path(tempfile.mkdtemp(prefix="wl-"))
    socket_path = directory / "socket"
    section: dict[str, Any] = {"socket": str(socket_path)}
    if uids is not None:
        section["uids"] = uids
    raw = agent_yaml(setup.root, name, workload_api=section)
    if ca_backoff is not None:
        raw["ca"]["backoff"] = ca_backoff
    try:
        async with running_agent(raw, sign or local_sign(setup), setup.root) as agent:
            yield agent, socket_path
    finally:
        shutil.rmtree(directory, ignore_errors=True)


class CaDownAfter:
    """A CA that signs the first `signs` requests (as `local_sign`) and refuses every one
    after (UNAVAILABLE); `calls` counts them all."""

    def __init__(self, setup: CaSetup, signs: int, ttl: timedelta = timedelta(hours=1)) -> None:
        self._signed = local_sign(setup, ttl)
        self._signs = signs
        self.calls = 0

    async def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls > self._signs:
            raise GRPCError(Status.UNAVAILABLE, "the CA is down")
        return await self._signed(*args)


def rotate(agent: Agent) -> str:
    """Force a renewal of the agent's SVID; the serial it had."""
    assert agent.identity.svid is not None
    serial = agent.identity.svid.serial
    agent.identity.renew_now()
    return serial


def keys_handed_out(agent: Agent, api: str) -> float:
    return sample(agent, "outrider_workload_keys_handed_out_total", api=api)


@asynccontextmanager
async def channel(socket_path: Path) -> AsyncIterator[Channel]:
    chan = Channel(path=str(socket_path))
    try:
        yield chan
    finally:
        chan.close()


async def cancel(stream: Any) -> None:
    """End a stream the server has not ended; one it refused is over already."""
    with contextlib.suppress(ProtocolError, StreamTerminatedError):
        await stream.cancel()


@asynccontextmanager
async def svid_stream(
    socket_path: Path, metadata: dict[str, str] | None = None
) -> AsyncIterator[Any]:
    """FetchX509SVID, its request sent: `await stream.recv_message()` for each push."""
    async with channel(socket_path) as chan:
        stub = SpiffeWorkloadAPIStub(chan)
        async with stub.FetchX509SVID.open(metadata=HEADER if metadata is None else metadata) as s:
            await s.send_message(workload_pb2.X509SVIDRequest(), end=True)
            try:
                yield s
            finally:
                await cancel(s)  # a stream of pushes never ends by itself


@asynccontextmanager
async def secrets_stream(socket_path: Path) -> AsyncIterator[Any]:
    """StreamSecrets, open: send DiscoveryRequests, receive DiscoveryResponses."""
    async with (
        channel(socket_path) as chan,
        SecretDiscoveryServiceStub(chan).StreamSecrets.open() as s,
    ):
        try:
            yield s
        finally:
            await cancel(s)


def discovery_request(*names: str, version: str = "", nonce: str = "") -> Any:
    return envoy_discovery_pb2.DiscoveryRequest(
        resource_names=list(names), version_info=version, response_nonce=nonce
    )


def certificates(concatenated: bytes) -> list[x509.Certificate]:
    """The certificates of the Workload API's concatenated DER, one SEQUENCE after another."""
    found, at = [], 0
    while at < len(concatenated):
        first = concatenated[at + 1]
        size, header = (first, 2) if first < 0x80 else (0, 2 + (first & 0x7F))
        for byte in concatenated[at + 2 : at + header] if first >= 0x80 else b"":
            size = size * 256 + byte
        found.append(x509.load_der_x509_certificate(concatenated[at : at + header + size]))
        at += header + size
    return found


def leaf_serial(chain_der: bytes) -> str:
    """The serial (hex, as Svid.serial) of the first certificate of concatenated DER."""
    return f"{certificates(chain_der)[0].serial_number:x}"


@asynccontextmanager
async def spiffe_client(
    socket_path: Path, updates: int, timeout: float = 20
) -> AsyncIterator[asyncio.subprocess.Process]:
    """py-spiffe's X509Source on the socket, in a process of its own (tests/spiffe_client.py):
    a JSON line on stdout for its first SVID and each of `updates` updates."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SPIFFE_CLIENT),
        str(socket_path),
        str(updates),
        str(timeout),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
        await process.wait()


async def next_line(process: asyncio.subprocess.Process, timeout: float = 20) -> dict[str, Any]:
    """The client's next JSON line; AssertionError with its stderr if it has none."""
    assert process.stdout is not None and process.stderr is not None
    line = await asyncio.wait_for(process.stdout.readline(), timeout)
    if not line:
        error = await process.stderr.read()
        raise AssertionError(f"the client ended: {error.decode(errors='replace')}")
    return json.loads(line)  # type: ignore[no-any-return]


@asynccontextmanager
async def unread_svid_stream(socket_path: Path) -> AsyncIterator[asyncio.StreamReader]:
    """FetchX509SVID from a caller that gives the server no window to push in (initial window
    0, never updated): every push is stuck. Yields the connection's reader (EOF: closed)."""
    reader, writer = await asyncio.open_unix_connection(str(socket_path))
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    connection.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    headers = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/SpiffeWorkloadAPI/FetchX509SVID"),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        (SECURITY_HEADER, "true"),
    ]
    connection.send_headers(1, headers)
    connection.send_data(1, b"\0\0\0\0\0", end_stream=True)  # an empty X509SVIDRequest
    writer.write(connection.data_to_send())
    try:
        yield reader
    finally:
        writer.close()
