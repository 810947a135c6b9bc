"""The L4 path's CPU per connection outside TLS: accepting, and counting a verified peer.

    python -m bench.l4_micro [--connections 1000] [--rounds 5]

`l4_keepalive` and `handshakes` (bench/dataplane.py) measure whole agents, where
OpenSSL's handshake (~1 ms of CPU a side) and the machine's noise hide a few
microseconds of the agent's own per-connection work. This isolates two parts:

- accept: `connections` TCP connections queued on an inbound listener's socket
  (connected beforehand: the client's cost is not counted), then taken by the
  listener's own accept path (the `Acceptor` that `Listener.start` makes) and handed
  to an admit that closes each: process time per connection accepted (the Acceptor
  alone, not a Listener subclass: compiled by mypyc, Listener takes none from here);
- count: what one mTLS connection counts once its peer is verified, inbound
  (handshake, duration, peer, established, and its first request's status on an
  L7 port) and outbound (the same after a dial): process time per connection.

Each prints the best of `rounds` (the least disturbed by whatever else the
machine runs).
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import ssl
import time
from datetime import UTC, datetime
from typing import Any

import uvloop

from agent.adapters import listeners
from agent.adapters.metrics import AgentMetrics, clock
from agent.adapters.runtime import Runtime
from agent.adapters.tls import Contexts
from agent.config import Limits
from identity import SpiffeId
from identity.configfile import Listen

SERVER = SpiffeId.parse("spiffe://bench.example/ns/bench/sa/server")
CLIENT = SpiffeId.parse("spiffe://bench.example/ns/bench/sa/client")


def _runtime() -> Runtime:
    return Runtime(Limits(), Contexts(), AgentMetrics(), lambda: datetime.now(UTC), SERVER)


class _Closing:
    """What a listener admits to: every accepted connection closed at once."""

    def __init__(self, expected: int) -> None:
        self.expected, self.taken = expected, 0
        self.done = asyncio.Event()

    def admit(self, sock: socket.socket) -> None:
        sock.close()
        self.taken += 1
        if self.taken == self.expected:
            self.done.set()

    def failed(self, exc: OSError) -> None:
        raise exc


async def accept(connections: int) -> float:
    """Seconds of process time per connection accepted."""
    no_config: Any = None  # bind reads only the runtime
    listener = listeners.Listener(no_config, _runtime(), listeners.Connections(AgentMetrics()))
    listener.bind(Listen("127.0.0.1", 0))
    listening = listener._socket
    assert listening is not None
    host, port = listener.address.rsplit(":", 1)
    closing = _Closing(connections)
    clients = []
    acceptor = None
    try:
        for _ in range(connections):  # queued in the backlog (1024), none accepted yet
            client = socket.create_connection((host, int(port)))
            clients.append(client)
        started = time.process_time()
        acceptor = listeners.Acceptor(listening, closing.admit, closing.failed)
        await asyncio.wait_for(closing.done.wait(), 30)
        took = time.process_time() - started
    finally:
        if acceptor is not None:
            acceptor.cancel()
        listener.close()
        for client in clients:
            client.close()
    return took / connections


class _Verified:
    """What `Runtime.verified` reads of a handshake (a full one)."""

    session_reused = False

    def version(self) -> str:
        return "TLSv1.3"

    def cipher(self) -> tuple[str, str, int]:
        return ("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256)


def count(connections: int) -> float:
    """Seconds of process time per inbound plus outbound connection counted."""
    runtime = _runtime()
    tls = _typed(_Verified())
    established = getattr(runtime, "established", None)
    if established is None:  # before issue 18's fix: Connections counted, per connection
        counted = listeners.Connections(runtime.metrics)

        def inbound(peer: SpiffeId) -> None:
            counted.established("inbound", peer)  # type: ignore[attr-defined]
            answers: dict[int, Any] = {}  # each connection bound its own children
            child = answers.get(200)
            if child is None:
                child = answers[200] = runtime.metrics.requests.labels("inbound", str(peer), "200")
            child.inc()

        def outbound(peer: SpiffeId) -> None:
            counted.established("outbound", None)  # type: ignore[attr-defined]

    else:

        def inbound(peer: SpiffeId) -> None:
            established("inbound", peer)
            runtime.series("inbound", peer).answered(200)

        def outbound(peer: SpiffeId) -> None:
            established("outbound", peer)

    started = time.process_time()
    for _ in range(connections):
        runtime.verified("inbound", tls, CLIENT, clock())
        inbound(CLIENT)
        runtime.verified("outbound", tls, SERVER, clock())
        outbound(SERVER)
    return (time.process_time() - started) / connections


def _typed(fake: _Verified) -> ssl.SSLObject:
    return fake  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.l4_micro", description=__doc__)
    parser.add_argument("--connections", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    accepted = [
        uvloop.run(accept(min(args.connections, 1000))) for _ in range(args.rounds)
    ]  # at most the listener's backlog
    print(f"accept  {min(accepted) * 1e6:6.2f} us/connection (best of {args.rounds})")
    counted = [count(args.connections * 10) for _ in range(args.rounds)]
    print(f"count   {min(counted) * 1e6:6.2f} us/connection (best of {args.rounds})")


if __name__ == "__main__":
    main()
