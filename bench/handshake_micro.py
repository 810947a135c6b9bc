"""CPU per mTLS handshake, per side, with the agent's own contexts (agent/adapters/tls.py).

    python -m bench.handshake_micro [--handshakes 300] [--rounds 3] [--part memory,loopback]
                                    [--pyopenssl]
    python -m bench.handshake_micro --part path|path-full|path-resumed

`new_conn` and `new_conn_resumed` (bench/dataplane.py) measure whole agents on 2 shared
CPUs, where conn/s is set by the CPU one connection costs each agent. This splits it:

- memory: the handshake alone, OpenSSL through stdlib ssl, both sides in memory
  (MemoryBIO pairs), each side's CPU (thread time) counted apart: full, and resumed as
  the agent resumes (the client offers the session it saved, the server takes its own
  ticket and issues a new one). The client's session read (`SSLObject.session`, which
  CPython copies through DER) is counted apart: the agent reads it after every full
  handshake and after a resumed one only once the saved session is half its lifetime old
  (agent/core/resumption.py).
- loopback: the same handshakes over a real loopback TCP connection, through the agent's
  own code: the inbound side's `InboundMtls._authenticate` (uvloop's TLS transport, the
  peer check, the allow-list, the metrics) and the outbound side's `LiveUpstream.dial`
  (the session offered and saved, the peer check, the metrics). Process time per
  connection, both sides (one process); and `bare`, the same over uvloop's TLS transport
  alone: the agent's own Python is what `agent` costs above `bare`, uvloop's transport
  and the kernel's loopback what `bare` costs above `memory`.
- path: a new connection's whole way through both agents in one process (the app's
  connection accepted, an endpoint chosen and dialled, the server agent's accept, checks
  and app dial, one request relayed, every connection closed), process time per
  connection. Under callgrind it counts instructions per connection, which a busy
  machine does not move: `--dump-before=time_process_time` makes the measured
  connections a part of their own (`callgrind.out.N.2`; divide by `--handshakes`).
  On OpenSSL 3.0 (valgrind: no AVX-512) a full one is ~18.3 M instructions in user
  space, 91.6% of them in SSL_do_handshake; a resumed one ~11.0 M.
- pyopenssl (with `--pyopenssl`, when pyOpenSSL is installed): the memory handshakes
  through pyOpenSSL, i.e. the OpenSSL that cryptography bundles, with the same
  certificates, keys, roots, ciphers and checks; and the loopback ones over uvloop's plain
  TCP with TLS run by a least-of TLS-over-transport protocol of its own
  (bench/handshake_pyopenssl.py), to set beside `bare`.

Where OpenSSL 3.0's time goes (callgrind, `--part memory`, per handshake, both sides):
a full one is ~17 M instructions in SSL_do_handshake: ~39% decoding the peer's two
certificates (d2i_X509, nearly all of it OSSL_DECODER_CTX_new_for_pkey building a
decoder for each public key), ~30% the six ECDSA P-256 verifies (chain and
CertificateVerify, each side), ~13% X25519 key generation and derivation; SSL_new, the
X509_STORE lookups and ticket encryption are under 1% each. A resumed one is ~8 M, plus
~1.6 M for each copy CPython makes of a session (`_ssl_session_dup`: i2d and d2i, the
peer's certificate decoded again), once on every offer (the `session` setter) and once
per read. P-256 as the key share costs ~12% more than X25519 (the default).

That is OpenSSL's own decoding. The agent gives EC keys OpenSSL's built-in method
(identity.openssl_engine), which decodes a certificate without building a decoder; so
does this bench, and `memory` is measured again without it (a second process with
OUTRIDER_OPENSSL_EC_ENGINE=off), marked "(no engine)".

Each figure is the best of `rounds` (the least disturbed by whatever else the machine
runs), in microseconds per handshake.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

import uvloop

from agent.adapters import listeners
from agent.adapters.metrics import AgentMetrics, clock
from agent.adapters.relay import Relay
from agent.adapters.runtime import Runtime
from agent.adapters.tls import Contexts, dialling, kept
from agent.adapters.upstreams import LiveUpstream
from agent.config import Inbound, Limits
from agent.config_outbound import Outbound, Subset
from agent.core.authz import AllowList
from agent.core.discovery import StaticSource
from agent.core.resumption import Resumption
from agent.core.svid import Svid
from agent.core.upstream import Endpoint
from identity import SpiffeId, openssl_engine
from identity.configfile import Listen
from tests.unit.agent.pki import TD, make_signer, svid_now

SERVER = SpiffeId.for_workload(TD, "bench", "server")
CLIENT = SpiffeId.for_workload(TD, "bench", "client")
OFF = Resumption(resumption=False)
ON = Resumption(resumption=True, ticket_lifetime=timedelta(minutes=5))


@dataclass
class Sides:
    """CPU per handshake, microseconds: each side's, and the client's session reads."""

    client: float
    server: float
    session_read: float = 0.0

    def __str__(self) -> str:
        read = f"  session read {self.session_read:6.0f}" if self.session_read else ""
        return f"client {self.client:6.0f}  server {self.server:6.0f}{read}"


def svids(directory: Path) -> tuple[Svid, Svid]:
    """A server's and a client's SVID from a real CA (the CA's own code), as the agents
    would hold them: P-256 keys, leaf and intermediate."""
    signer = make_signer(directory)
    return svid_now(signer, SERVER), svid_now(signer, CLIENT)


# -- memory ----------------------------------------------------------------------------


def _pump(
    client: ssl.SSLObject,
    server: ssl.SSLObject,
    c_out: ssl.MemoryBIO,
    s_out: ssl.MemoryBIO,
    c_in: ssl.MemoryBIO,
    s_in: ssl.MemoryBIO,
    spent: list[int],
) -> None:
    """Both handshakes to the end, then a byte from the server (a TLS 1.3 ticket comes
    before it); each side's thread time added to `spent` [client, server]."""
    done = [False, False]
    tick = time.thread_time_ns
    for _ in range(10):
        for i, side, out, into in ((0, client, c_out, s_in), (1, server, s_out, c_in)):
            if not done[i]:
                started = tick()
                try:
                    side.do_handshake()
                    done[i] = True
                    if i == 1:
                        side.write(b"x")  # the server speaks first: its ticket goes with it
                except ssl.SSLWantReadError:
                    pass
                spent[i] += tick() - started
            into.write(out.read())
        if done[0] and done[1]:
            break
    else:
        raise AssertionError("handshake did not finish")
    started = tick()
    assert client.read(1) == b"x"
    spent[0] += tick() - started


def memory(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, handshakes: int) -> Sides:
    """Per side, per handshake; resumed if `client_ctx` resumes (a `ResumingContext`)."""
    resuming = client_ctx.options & ssl.OP_NO_TICKET == 0
    session: ssl.SSLSession | None = None
    spent, reads = [0, 0], 0
    tick = time.thread_time_ns
    for n in range(handshakes + 1):
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        started = tick()
        c = client_ctx.wrap_bio(c_in, c_out, session=session)
        client_wrap = tick() - started
        started = tick()
        s = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        server_wrap = tick() - started
        these = [client_wrap, server_wrap]
        _pump(c, s, c_out, s_out, c_in, s_in, these)
        if resuming and session is None:
            session = c.session  # the first, full, handshake's: every other one resumes
            continue
        if resuming:
            assert c.session_reused, "the saved session was taken"
            started = tick()
            assert c.session is not None
            reads += tick() - started
        spent[0] += these[0]
        spent[1] += these[1]
        assert n == 0 or s.getpeercert(binary_form=True)  # the client's certificate is there
    count = handshakes
    return Sides(spent[0] / count / 1e3, spent[1] / count / 1e3, reads / count / 1e3)


# -- loopback --------------------------------------------------------------------------


class _FirstByte(asyncio.Protocol):
    """The client's side: done at the server's first byte (its TLS 1.3 ticket is read
    with it, as a relayed connection reads it with the app's first answer)."""

    def __init__(self) -> None:
        self.got = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.got.done():
            self.got.set_result(data)


async def loopback(
    server_svid: Svid, client_svid: Svid, resumption: Resumption, count: int, bare: bool = False
) -> float:
    """Process time per connection, client and server side together (µs).

    `bare`: uvloop's TLS transport alone on both sides, with only the session offered
    and saved (`dialling`, `kept`): no peer check, allow-list, timeout, relay or metrics.
    What the agent's way costs above it is the agent's own Python."""
    now = lambda: datetime.now(UTC)  # noqa: E731
    server_rt = Runtime(Limits(), Contexts.of(server_svid, resumption), AgentMetrics(), now, SERVER)
    client_rt = Runtime(Limits(), Contexts.of(client_svid, resumption), AgentMetrics(), now, CLIENT)
    listening = socket.create_server(("127.0.0.1", 0), backlog=1024)
    listening.setblocking(False)
    port = listening.getsockname()[1]
    config = Inbound(
        Listen("127.0.0.1", port), Endpoint("127.0.0.1", 9), AllowList(frozenset({CLIENT}))
    )
    # An explicit inbound listener's handshake path (`_authenticate`), without the app.
    inbound = listeners.InboundListener(config, server_rt, listeners.Connections(server_rt.metrics))
    endpoint = Endpoint("127.0.0.1", port)
    upstream = Outbound(
        "server", None, frozenset({SERVER}), (Subset("default", 1, StaticSource(((endpoint, 1),))),)
    )
    live = LiveUpstream(upstream, client_rt, random.Random(1))
    loop = asyncio.get_running_loop()
    verified = 0

    async def serve() -> Relay:
        nonlocal verified
        sock, _ = await loop.sock_accept(listening)
        relay = Relay(3600, lambda _: None)
        deadline = loop.time() + 10
        got = await inbound._authenticate(relay, sock, clock(), "tcp", port, deadline)
        assert got is not None and got[0] == CLIENT
        verified += 1
        transport = relay.down.transport
        assert transport is not None
        if verified > 1:  # the first is full: the others resume when `resumption` is on
            resumed = transport.get_extra_info("ssl_object").session_reused
            assert resumed == resumption.resumption, "resumed as configured"
        transport.write(b"x")  # as the app's first answer would be
        return relay

    async def serve_bare() -> asyncio.Transport:
        nonlocal verified
        sock, _ = await loop.sock_accept(listening)
        context = server_rt.contexts.server_for("tcp")
        transport, _ = await loop.connect_accepted_socket(_FirstByte, sock, ssl=context)
        verified += 1
        transport.write(b"x")
        return transport

    async def dial_bare() -> tuple[asyncio.Transport, _FirstByte, None]:
        context = client_rt.contexts.client_for("tcp")
        assert context is not None
        with dialling(context, endpoint, {SERVER}):
            transport, client = await loop.create_connection(
                _FirstByte, "127.0.0.1", port, ssl=context, server_hostname=""
            )
        kept(transport.get_extra_info("ssl_object"), SERVER)
        return transport, client, None

    async def one() -> None:
        serving = loop.create_task(serve_bare() if bare else serve())
        transport, client, _ = await (dial_bare() if bare else live.dial(endpoint, _FirstByte))
        relay = await serving
        await client.got
        transport.abort()
        relay.abort()
        for _ in range(3):  # the connection freed: its session saved (`_ResumableObject`)
            await asyncio.sleep(0)

    await one()  # the first is full: the others resume when `resumption` is on
    await asyncio.sleep(0)
    started = time.process_time()
    for _ in range(count):
        await one()
    took = time.process_time() - started
    listening.close()
    assert verified == count + 1
    return took / count * 1e6


# -- path ------------------------------------------------------------------------------


class _Backend(asyncio.Protocol):
    """The app behind the server agent: answers the first bytes and closes, as nginx
    answers a `Connection: close` request."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\nx")
        self.transport.close()


class _App(asyncio.Protocol):
    """The app calling its client agent: one request, done when the answer's connection
    closes."""

    def __init__(self) -> None:
        self.done = asyncio.get_running_loop().create_future()
        self.got = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(b"GET / HTTP/1.1\r\nconnection: close\r\n\r\n")

    def data_received(self, data: bytes) -> None:
        self.got += data

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.got)


async def path(server_svid: Svid, client_svid: Svid, resumption: Resumption, count: int) -> float:
    """Process time per connection (µs) of the whole way a new connection takes through
    both agents, in one process: the app's connection accepted by an outbound listener,
    an endpoint chosen and dialled (`OutboundPath`, `LiveUpstream.dial`), accepted and
    checked by an inbound listener (`InboundMtls._admit` .. `_to_app`), the app dialled,
    one request relayed each way, every connection closed. The app and its caller are
    small asyncio protocols in the same loop (their cost is the same in any build).

    Run under callgrind (`valgrind --tool=callgrind python -m bench.handshake_micro
    --part path --handshakes N --rounds 1`), two counts' difference gives instructions
    per connection, which a busy machine does not move."""
    loop = asyncio.get_running_loop()
    now = lambda: datetime.now(UTC)  # noqa: E731
    server_rt = Runtime(Limits(), Contexts.of(server_svid, resumption), AgentMetrics(), now, SERVER)
    client_rt = Runtime(Limits(), Contexts.of(client_svid, resumption), AgentMetrics(), now, CLIENT)
    backend = await loop.create_server(_Backend, "127.0.0.1", 0)
    app = Endpoint("127.0.0.1", backend.sockets[0].getsockname()[1])
    inbound = listeners.InboundListener(
        Inbound(Listen("127.0.0.1", 0), app, AllowList(frozenset({CLIENT}))),
        server_rt,
        listeners.Connections(server_rt.metrics),
    )
    inbound.bind(Listen("127.0.0.1", 0))
    await inbound.start()
    server = Endpoint("127.0.0.1", int(inbound.address.rsplit(":", 1)[1]))
    upstream = Outbound(
        "server",
        Listen("127.0.0.1", 0),
        frozenset({SERVER}),
        (Subset("default", 1, StaticSource(((server, 1),))),),
    )
    outbound = listeners.OutboundListener(
        upstream, client_rt, listeners.Connections(client_rt.metrics)
    )
    outbound.bind(Listen("127.0.0.1", 0))
    await outbound.start()
    port = int(outbound.address.rsplit(":", 1)[1])
    for _ in range(500):  # until the static source has published
        if outbound.live.core.endpoints():
            break
        await asyncio.sleep(0.01)

    async def one() -> None:
        _, caller = await loop.create_connection(_App, "127.0.0.1", port)
        got = await caller.done
        assert got.endswith(b"x"), got
        for _ in range(3):  # the agents' closes run out
            await asyncio.sleep(0)

    for _ in range(2):  # the first is full: the others resume when `resumption` is on
        await one()
    started = time.process_time()
    for _ in range(count):
        await one()
    took = time.process_time() - started
    outbound.close()
    inbound.close()
    backend.close()
    return took / count * 1e6


# -- pyOpenSSL -------------------------------------------------------------------------


def stdlib_record(server_svid: Svid, client_svid: Svid, count: int) -> float:
    """Microseconds of CPU per 100-byte record, encrypted and decrypted, in memory after a
    handshake, through the stdlib SSLObject (as uvloop's TLS transport uses it)."""
    server_ctx, client_ctx = (
        Contexts.of(server_svid, OFF).server,
        Contexts.of(client_svid, OFF).client,
    )
    assert server_ctx is not None and client_ctx is not None
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = client_ctx.wrap_bio(c_in, c_out)
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    _pump(client, server, c_out, s_out, c_in, s_in, [0, 0])
    message = b"x" * 100
    started = time.thread_time_ns()
    for _ in range(count):
        client.write(message)
        s_in.write(c_out.read())
        server.read(65536)
    return (time.thread_time_ns() - started) / count / 1e3


def pyopenssl(
    server_svid: Svid, client_svid: Svid, handshakes: int, resumed: bool, groups: bytes | None
) -> Sides | None:
    """The memory handshakes through pyOpenSSL (cryptography's OpenSSL), same certificates,
    ciphers and verification; None if pyOpenSSL is not installed."""
    try:
        from bench import handshake_pyopenssl
    except ImportError:
        return None
    return Sides(*handshake_pyopenssl.memory(server_svid, client_svid, handshakes, resumed, groups))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.handshake_micro", description=__doc__)
    parser.add_argument("--handshakes", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--part", default="memory,loopback")
    parser.add_argument("--pyopenssl", action="store_true")
    args = parser.parse_args(argv)
    parts = set(args.part.split(","))
    print(ssl.OPENSSL_VERSION)
    print(openssl_engine.install())  # as every agent process does at start
    engine = "" if openssl_engine.installed() else " (no engine)"
    with tempfile.TemporaryDirectory() as tmp:
        server_svid, client_svid = svids(Path(tmp))
    full = Contexts.of(server_svid, OFF), Contexts.of(client_svid, OFF)
    resuming = Contexts.of(server_svid, ON), Contexts.of(client_svid, ON)

    def best(run: Callable[[], Any]) -> Any:
        results = [run() for _ in range(args.rounds)]
        if isinstance(results[0], Sides):
            return min(results, key=lambda s: s.client + s.server)
        return min(results)

    n = args.handshakes
    if "memory" in parts:
        for name, (server, client) in (("full", full), ("resumed", resuming)):
            assert client.client is not None and server.server is not None
            sides = best(lambda c=client.client, s=server.server: memory(c, s, n))
            print(f"memory   {name:8} {sides} us/handshake (best of {args.rounds}){engine}")
        if openssl_engine.installed():  # the same with OpenSSL's own EC key decoding
            again = [sys.executable, "-m", "bench.handshake_micro", "--part", "memory"]
            again += ["--handshakes", str(n), "--rounds", str(args.rounds)]
            off = {**os.environ, openssl_engine.SWITCH: "off"}
            done = subprocess.run(again, env=off, capture_output=True, text=True, check=True)
            print(
                *(line for line in done.stdout.splitlines() if line.startswith("memory")), sep="\n"
            )
    if "loopback" in parts:
        for name, resumption in (("full", OFF), ("resumed", ON)):
            for way, bare in (("agent", False), ("bare", True)):
                took = best(
                    lambda r=resumption, b=bare: uvloop.run(
                        loopback(server_svid, client_svid, r, n, b)
                    )
                )
                print(
                    f"loopback {name:8} {way:5} both sides {took:6.0f} us/connection"
                    f" (best of {args.rounds})"
                )
    for name, resumption in (("full", OFF), ("resumed", ON)):
        if "path" in parts or f"path-{name}" in parts:
            took = best(lambda r=resumption: uvloop.run(path(server_svid, client_svid, r, n)))
            print(
                f"path     {name:8} both agents {took:6.0f} us/connection (best of {args.rounds})"
            )
    if args.pyopenssl:
        for groups in (b"X25519", None):  # the agent's, and OpenSSL 4's default (hybrid PQ)
            said = (groups or b"default").decode()
            for name, resumed in (("full", False), ("resumed", True)):
                got = best(lambda r=resumed, g=groups: pyopenssl(server_svid, client_svid, n, r, g))
                if got is None:
                    print("pyopenssl: not installed (pip install --no-deps pyOpenSSL)")
                    return
                print(f"pyopenssl {name:7} {said:7} {got} us/handshake (best of {args.rounds})")
        from bench import handshake_pyopenssl

        runs = [
            handshake_pyopenssl.records(server_svid, client_svid, 20000) for _ in range(args.rounds)
        ]
        stdlib = min(stdlib_record(server_svid, client_svid, 20000) for _ in range(args.rounds))
        print(
            f"record   100 B, stdlib {stdlib:5.2f}  pyOpenSSL {min(r[0] for r in runs):5.2f}"
            f"  its cffi binding {min(r[1] for r in runs):5.2f} us (best of {args.rounds})"
        )
        for name, resumed in (("full", False), ("resumed", True)):
            took = best(
                lambda r=resumed: uvloop.run(
                    handshake_pyopenssl.loopback(server_svid, client_svid, r, n, b"X25519")
                )
            )
            print(
                f"pyopenssl loopback {name:8} both sides {took:6.0f} us/connection"
                f" (best of {args.rounds})"
            )


if __name__ == "__main__":
    main()
