"""The HTTP/1.1 hot path's CPU per request, without sockets, TLS or a load generator.

    python -m bench.l7_micro [--requests 10000] [--rounds 5] [--logged] [--policy]
                             [--profile outbound|inbound]

`l7_keepalive` (bench/dataplane.py) measures whole agents: most of their CPU is
TLS and the event loop's I/O, and the machine's noise is as large as a change
to the agents' own per-request work. This isolates that work: one keep-alive
GET (as wrk sends it) and its 200 (as nginx answers it) through

- outbound: an `OutboundHttp` (the app's connection) and a pooled
  `UpstreamConnection`, both on fake transports, on a real event loop (the
  exchange runs as the agent runs it: its tasks and futures included);
- inbound: an `HttpExchange` (a peer agent's connection to the app), its
  policy an allow-everything stub (the policy's cost is bench/ and
  agent/core/policy.py's own); with `--policy`, the benchmark's 10-rule policy
  (bench/peers.py) decides each request as the inbound listener has it decided
  (agent/adapters/authorize.py: a policy Request per request, the caller's
  SpiffeId the connection's own, the decision counted).

`--logged` adds the access log (`mode: all`) to both: its lines written, as the
agent writes them, to a descriptor (/dev/null here), the writer's CPU counted.
It prints process_time per request, the best of `rounds` (the least disturbed
by whatever else the machine runs); `--profile` prints a cProfile of one path.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import random
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime

import uvloop

from agent.adapters.authorize import Authorizer
from agent.adapters.http import HttpExchange, xfcc
from agent.adapters.metrics import AgentMetrics
from agent.adapters.outbound_http import OutboundHttp
from agent.adapters.pool import UpstreamConnection
from agent.adapters.runtime import Runtime
from agent.adapters.tls import Contexts
from agent.adapters.tracing import Observer
from agent.adapters.upstreams import LiveUpstream
from agent.config import Inbound, Limits
from agent.config_outbound import Outbound, Subset
from agent.core.accesslog import AccessLogConfig, Tls
from agent.core.authz import AllowList
from agent.core.discovery import StaticSource
from agent.core.policy import Decision, PolicySet
from agent.core.policyfile import parse_policy_list
from agent.core.tracecontext import TracingConfig
from agent.core.upstream import Endpoint
from identity import SpiffeId
from identity.configfile import Listen
from identity.lines import LineWriter, write_lines

#: What wrk sends, and what the nginx backend answers (bench/peers.py).
REQUEST = b"GET /api/items HTTP/1.1\r\nHost: 127.0.0.1:15001\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 14:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n"
    b"hello, mesh!\n"
)
ENDPOINT = Endpoint("127.0.0.1", 15443)
SERVER = SpiffeId.parse("spiffe://bench.example/ns/bench/sa/server")
CLIENT = SpiffeId.parse("spiffe://bench.example/ns/bench/sa/client")


class _Transport:
    """A fake transport that counts the messages it is written (keeping them all would cost
    more than the agent's work; tests/transports.py's keeps them)."""

    def __init__(self, count: bytes) -> None:
        self.count, self.counted = count, 0
        self.closed = False

    def write(self, data: bytes) -> None:
        self.counted += data.count(self.count)

    def close(self) -> None:
        self.closed = True

    abort = close

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        pass

    resume_reading = pause_reading

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default


def _observer(logged: bool) -> Observer | None:
    """The access log of an agent with `access_log: {mode: all}`, to /dev/null; None: off."""
    if not logged:
        return None
    null = os.open(os.devnull, os.O_WRONLY)
    writer = LineWriter(sink=lambda text: write_lines(null, text.encode("ascii", "replace")))
    observer = Observer(AccessLogConfig("all"), TracingConfig(), str(SERVER), write=writer)
    observer.writer = writer  # closed with it
    return observer


async def _upstream(
    observer: Observer | None = None,
) -> tuple[LiveUpstream, UpstreamConnection, _Transport]:
    """An `http` upstream with one endpoint (published once started) and one pooled
    connection to it."""
    contexts = Contexts()
    contexts.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # compared, never used
    runtime = Runtime(Limits(), contexts, AgentMetrics(), lambda: datetime.now(UTC), CLIENT)
    runtime.observer = observer
    config = Outbound(
        "server",
        None,
        frozenset({SERVER}),
        (Subset("default", 1, StaticSource(((ENDPOINT, 1),))),),
        protocol="http",
    )
    live = LiveUpstream(config, runtime, random.Random(1))
    live.start()  # its static source publishes the endpoint at the next loop iteration
    connection = UpstreamConnection(live.pool, ENDPOINT, contexts.client, lambda: None)
    if observer is not None:  # its peer and TLS, as the dial reads them: on each line
        connection.tls = Tls(str(SERVER), "TLSv1.3", "TLS_AES_256_GCM_SHA384")
    transport = _Transport(b"GET /api/items HTTP/1.1")
    connection.connection_made(transport)  # type: ignore[arg-type]
    live.pool.put(connection)
    return live, connection, transport


async def outbound(requests: int, logged: bool = False) -> float:
    """Seconds of process time per request through OutboundHttp, request to response."""
    observer = _observer(logged)
    live, connection, upstream = await _upstream(observer)
    for _ in range(100):  # bounded: a static source publishes at once
        if live.core.endpoints():
            break
        await asyncio.sleep(0)
    app = _Transport(b"HTTP/1.1 200 OK")
    exchange = OutboundHttp(live, lambda _: None, random.Random(1))
    exchange.connection_made(app)  # type: ignore[arg-type]
    pause = asyncio.sleep
    started = time.process_time()
    for _ in range(requests):
        exchange.data_received(REQUEST)
        await pause(0)  # the request's task runs up to its wait for the response
        connection.data_received(RESPONSE)
        while exchange.task is not None:
            await pause(0)
    if observer is not None:
        await pause(0)
        observer.close()  # its lines written: their CPU counted
    used = time.process_time() - started
    assert app.counted == requests, "every response reached the app"
    assert upstream.counted == requests, "every request went upstream"
    exchange.connection_lost(None)
    live.close()
    return used / requests


def _allow(method: str, path: str, host: str | None, headers: object) -> Decision:
    return Decision(True, "bench", "allow", "")


def _policy() -> Callable[[str, str, str | None, dict[str, tuple[str, ...]]], Decision]:
    """The benchmark pair's 10 rules (bench/peers.py), the last for this CLIENT, deciding as
    the inbound listener has each request decided (agent/adapters/authorize.py: its
    decisions counted; the benchmark's requests are all allowed, so no deny line)."""
    from bench.peers import POLICY_RULES, outrider_policy

    rules = [*POLICY_RULES[:-1], (str(CLIENT), "GET", "/api/")]
    runtime = Runtime(Limits(), Contexts(), AgentMetrics(), lambda: datetime.now(UTC), SERVER)
    runtime.policies = PolicySet(parse_policy_list(outrider_policy(rules)["policies"], "bench"))
    allow = AllowList(trust_domains=frozenset({CLIENT.trust_domain}))
    config = Inbound(Listen("127.0.0.1", 15443), Endpoint("127.0.0.1", 8080), allow, "http")
    peer = SpiffeId.parse(str(CLIENT))  # the connection's own, as its handshake makes it
    return Authorizer(runtime).caller(peer, config)


async def inbound(requests: int, logged: bool = False, policy: bool = False) -> float:
    """Seconds of process time per request through HttpExchange, request to response (a
    turn of the event loop after each, as a connection's next request comes)."""
    observer = _observer(logged)
    client, app = _Transport(b"HTTP/1.1 200 OK"), _Transport(b"GET /api/items HTTP/1.1")
    answered: list[int] = []
    exchange = HttpExchange(
        client,  # type: ignore[arg-type]
        app,  # type: ignore[arg-type]
        _policy() if policy else _allow,
        xfcc(str(SERVER), str(CLIENT)),
        answered.append,
        watch=None if observer is None else observer.watch("http", "inbound", str(CLIENT)),
    )
    pause = asyncio.sleep
    started = time.process_time()
    for _ in range(requests):
        exchange.from_client(REQUEST)
        exchange.from_app(RESPONSE)
        await pause(0)
    if observer is not None:
        observer.close()
    used = time.process_time() - started
    assert client.counted == requests == len(answered), "every response reached the client"
    assert app.counted == requests, "every request reached the app"
    return used / requests


def _run(path: str, requests: int, logged: bool = False, policy: bool = False) -> float:
    if path == "outbound":
        return uvloop.run(outbound(requests, logged))  # the agent runs on uvloop (outrider/cli.py)
    return uvloop.run(inbound(requests, logged, policy))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.l7_micro", description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--logged", action="store_true", help="access_log: {mode: all}")
    parser.add_argument("--policy", action="store_true", help="inbound: the 10-rule policy")
    parser.add_argument("--profile", choices=("outbound", "inbound"))
    args = parser.parse_args(argv)
    if args.profile:
        profile = cProfile.Profile()
        run: Callable[[], float] = lambda: _run(  # noqa: E731
            args.profile, args.requests, args.logged, args.policy
        )
        profile.runcall(run)
        pstats.Stats(profile).sort_stats("tottime").print_stats(30)
        return
    for path in ("outbound", "inbound"):
        # Warm up: imports, caches, children.
        _run(path, min(args.requests, 1000), args.logged, args.policy)
        best = min(_run(path, args.requests, args.logged, args.policy) for _ in range(args.rounds))
        policy = " policy" if args.policy and path == "inbound" else ""
        name = f"{path}{' logged' if args.logged else ''}{policy}"
        print(f"{name:16} {best * 1e6:6.1f} us/request (best of {args.rounds} x {args.requests})")


if __name__ == "__main__":
    main()
