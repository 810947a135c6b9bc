"""Simulated agents for the control-plane benchmark: one `Subscribe` stream each, in one process.

Each simulated agent is one gRPC stream, as a real agent's is: Hello(pod_name),
then an Ack for every Snapshot, after parsing its JSON as an agent would. Each
has its own mTLS connection by default, as real agents do (the control plane
allows 4 streams a connection); they all present one SVID, of ns/bench/sa/bench.
At most 64 connect and say Hello at a time, so 2,000 do not overflow the
control plane's listen backlog. What they do not do is apply the snapshot: the
time measured is the control plane's and the wire's, not an agent's reload.

It runs in its own process, driven by bench/control_plane.py over stdin and
stdout, one JSON object a line, so its CPU does not share an event loop or a
GIL with the driver's clock:

    -> (nothing)          <- {"ready": acked, "errors": [...]}   once every agent acked once
    -> {"mark": true}     <- {"marked": true}     remember each agent's acked version
    -> {"wait": seconds}  <- {"done": true, "last_ack": t, "versions": k}   every agent acked
                             a version other than its marked one; t is time.monotonic()
                             (system-wide, so the driver can subtract its own) right after
                             the last of those Acks was written; or {"done": false, "missing": k}
    -> EOF                   close every stream and connection, exit 0

    python -m bench.control_agents --address 127.0.0.1:15012 --agents 100 \\
        --cert svid.pem --key svid.key --bundle bundle.pem
"""

from __future__ import annotations

import argparse
import asyncio
import json
import ssl
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from identity.proto import control_pb2
from identity.proto.control_grpc import ControlPlaneStub

#: Subscribed agents a connection: one, as in a cluster (the control plane allows 4).
PER_CONNECTION = 1
#: Connections being set up (TLS handshake, Hello, first snapshot) at once.
CONNECTING = 64


@dataclass
class Agent:
    """One simulated agent: the pod it speaks for and the last version it acknowledged."""

    pod: str
    acked: str | None = None
    acked_at: float = 0.0
    marked: str | None = None
    error: str | None = None


@dataclass
class Fleet:
    agents: list[Agent]
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def acked_once(self) -> int:
        return sum(1 for a in self.agents if a.acked is not None)

    def ended(self) -> list[str]:
        return [f"{a.pod}: {a.error}" for a in self.agents if a.error is not None]

    def missing(self) -> list[Agent]:
        """Agents that have not acknowledged a version other than the one marked."""
        return [a for a in self.agents if a.acked is None or a.acked == a.marked]


async def subscribe(
    stub: ControlPlaneStub, agent: Agent, fleet: Fleet, connecting: asyncio.Semaphore
) -> None:
    hello = control_pb2.Hello(pod_name=agent.pod, agent_version="bench")
    try:
        async with stub.Subscribe.open() as stream:
            async with connecting:
                await stream.send_message(control_pb2.AgentMessage(hello=hello))
                snapshot = await stream.recv_message()
            while snapshot is not None:
                json.loads(snapshot.config_json)  # what an agent does first with it
                ack = control_pb2.Ack(version=snapshot.version)
                await stream.send_message(control_pb2.AgentMessage(ack=ack))
                agent.acked, agent.acked_at = snapshot.version, time.monotonic()
                fleet.changed.set()
                snapshot = await stream.recv_message()
            agent.error = "the control plane ended the stream"
    except (GRPCError, StreamTerminatedError, OSError) as exc:
        agent.error = f"{type(exc).__name__}: {exc}"
    except asyncio.CancelledError:
        raise
    fleet.changed.set()


async def until(fleet: Fleet, done: Any, seconds: float) -> bool:
    """Wait (bounded) until `done()` holds, woken by every Ack."""
    deadline = time.monotonic() + seconds
    while not done():
        fleet.changed.clear()
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        try:
            await asyncio.wait_for(fleet.changed.wait(), left)
        except TimeoutError:
            return bool(done())
    return True


def say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def serve(fleet: Fleet, reader: asyncio.StreamReader) -> None:
    while line := await reader.readline():
        command = json.loads(line)
        if command.get("mark"):
            for agent in fleet.agents:
                agent.marked = agent.acked
            say({"marked": True})
        elif "wait" in command:
            if await until(fleet, lambda: not fleet.missing() or fleet.ended(), command["wait"]):
                if fleet.ended():
                    say({"done": False, "errors": fleet.ended()[:5]})
                    continue
                last = max(a.acked_at for a in fleet.agents)
                versions = len({a.acked for a in fleet.agents})
                say({"done": True, "last_ack": last, "versions": versions})
            else:
                say({"done": False, "missing": len(fleet.missing())})


def tls_context(cert: Path, key: Path, bundle: Path) -> ssl.SSLContext:
    """Trust the bundle, present the SVID. The server's SPIFFE ID is not checked: the
    bench measures propagation, and every connection goes to a process it started."""
    context = ssl.create_default_context(cafile=str(bundle))
    context.check_hostname = False
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.set_alpn_protocols(["h2"])
    context.load_cert_chain(cert, key)
    return context


async def main_async(args: argparse.Namespace) -> None:
    host, port = args.address.rsplit(":", 1)
    context = tls_context(args.cert, args.key, args.bundle)
    fleet = Fleet([Agent(f"{args.prefix}{i}") for i in range(args.agents)])
    channels = [
        Channel(host, int(port), ssl=context) for _ in range(0, args.agents, args.per_connection)
    ]
    connecting = asyncio.Semaphore(CONNECTING)
    tasks = [
        asyncio.create_task(
            subscribe(
                ControlPlaneStub(channels[i // args.per_connection]), agent, fleet, connecting
            )
        )
        for i, agent in enumerate(fleet.agents)
    ]
    reader = await commands()
    try:
        await until(
            fleet,
            lambda: fleet.acked_once() + len(fleet.ended()) == len(fleet.agents),
            args.timeout,
        )
        say({"ready": fleet.acked_once(), "errors": fleet.ended()[:5]})
        await serve(fleet, reader)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            channel.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--address", required=True, help="the control plane, host:port")
    parser.add_argument("--agents", type=int, required=True)
    parser.add_argument("--prefix", default="pod-", help="pod names are this + 0, 1, ...")
    parser.add_argument("--per-connection", type=int, default=PER_CONNECTION)
    parser.add_argument("--cert", type=Path, required=True, help="the SVID's chain, PEM")
    parser.add_argument("--key", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--timeout", type=float, default=60.0, help="for every first ACK")
    args = parser.parse_args()
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
