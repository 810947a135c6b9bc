"""The access log's writer and the OTLP span exporter, behind one object the data plane calls.

`Observer` is built only when `access_log.mode` is not off or a tracing
endpoint is configured; otherwise the runtime holds None and every hook is a
single `if` on it. With an observer, each request is propagated (W3C trace
context, agent/core/tracecontext.py) and, once finished, gets ONE call,
`finish`, where its metrics are counted: the access log line (if the mode
and sampling want it, agent/core/accesslog.py) and the span (if sampled and
an endpoint is set).

Lines go to stdout in batches: held by the event loop for at most
FLUSH_SECONDS or FLUSH_BYTES, whichever comes first (as Envoy's file access
log holds its lines for a flush interval), then handed over at once to a
thread of their own (`LineWriter`). A hand-over per turn of the loop (each
waking the thread, which then contends for the GIL with the loop) cost
more than building the lines. The thread exists because a log reader that stops
reading (a stalled container runtime, a full disk behind it) fills a pipe,
and a write from the event loop would then stop every connection of the
agent. At most MAX_PENDING bytes wait, each batch written (and encoded) on
its own; lines beyond are dropped and counted
(outrider_access_log_dropped_lines_total), never held. Spans
go to an OTLP/HTTP receiver (protobuf, POST /v1/traces) through
agent/adapters/otlp.py: its own thread, a bounded queue (spans are dropped, not
held, when the receiver is away), and at exit at most SPAN_FLUSH_SECONDS for what
is queued. The event loop hands each span over as plain data (`otlp.Record`); the
exporter's thread encodes it. otlp.py (and the OTLP classes) are imported only
when an endpoint is configured.
"""

from __future__ import annotations

import asyncio
import os
import random
import ssl
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

from agent.adapters.metrics import clock
from agent.adapters.relay import Relay
from agent.core import accesslog, tracecontext
from agent.core.accesslog import AccessLogConfig, Entry, Kind, Tls
from agent.core.policy import Decision
from agent.core.tracecontext import Propagated, TracingConfig
from identity import SpiffeId
from identity.lines import LineWriter

if TYPE_CHECKING:
    from agent.adapters.otlp import SpanExporter


#: Lines wait in the event loop at most this long, or until FLUSH_BYTES of them wait.
FLUSH_SECONDS = 0.05
FLUSH_BYTES = 64 << 10
#: How long the agent's exit waits for the spans still queued to reach the receiver.
SPAN_FLUSH_SECONDS = 1.0


class Observer:
    """Access logging and tracing for one agent (see the module's docstring)."""

    def __init__(
        self,
        access: AccessLogConfig,
        tracing: TracingConfig,
        local_id: str,
        *,
        write: Callable[[str], None] | None = None,
        dropped: Callable[[int], None] = lambda lines: None,
        spans_counted: Callable[[str, int], None] = lambda result, spans: None,
        rng: random.Random | None = None,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`write` takes each batch of lines (default: a LineWriter to stdout, which
        reports each line it drops to `dropped`)."""
        self.access = access
        self.tracing = tracing
        self.local_id = local_id
        self.writer: LineWriter | None = None
        if write is None:
            write = self.writer = LineWriter(dropped=dropped)
        self.write = write
        self.rng = rng or random.Random()  # noqa: S311 (trace ids and sampling, not secrets)
        self.wall = wall
        self.logging = access.on
        # Lines for what no policy denied (`mode: all`): an outbound request or connection,
        # an allowed one. Else an L4 connection's line could never be written (nor has it
        # a span), and an outbound connection's peer is named only on spans.
        self.every = access.mode == "all"
        self.names_peers = self.every or bool(tracing.otlp_endpoint)
        self.lines: list[str] = []
        self.waiting = 0  # the bytes of `lines`
        self.timer: asyncio.TimerHandle | None = None
        self.spans: SpanExporter | None = None
        if tracing.otlp_endpoint:
            self.spans = self._exporter(spans_counted)

    # -- per request -----------------------------------------------------------------------

    def propagate(
        self, traceparent: str | None, tracestate: str | None, request_id: str | None
    ) -> Propagated:
        return tracecontext.propagate(
            traceparent, tracestate, request_id, self.rng, self.tracing.sample
        )

    def watch(
        self,
        kind: Kind,
        direction: str,
        peer_id: str | None,
        ssl_object: ssl.SSLObject | ssl.SSLSocket | None = None,
        upstream: str | None = None,
    ) -> Watch:
        """What one connection's requests (or the connection itself) are logged with."""
        version, cipher = (None, None) if ssl_object is None else _agreed(ssl_object)
        return Watch(self, kind, direction, peer_id, version, cipher, upstream)

    def tls(self, peer: SpiffeId, ssl_object: ssl.SSLObject | ssl.SSLSocket) -> Tls | None:
        """An outbound connection's verified `peer` and its TLS, as its lines give them:
        made once, when it is dialled (agent/adapters/upstreams.py), for every request
        it carries (`Entry.over`); None when no line or span of it would name them."""
        if not self.names_peers:
            return None
        return Tls(str(peer), *_agreed(ssl_object))

    def connection(
        self,
        relay: Relay,
        direction: str,
        peer_id: str | None = None,
        ssl_object: ssl.SSLObject | ssl.SSLSocket | None = None,
        upstream: str | None = None,
    ) -> ConnectionLine | None:
        """An allowed (or outbound) L4 connection's line, begun now, written when `relay`
        closes; None when it could never be written (`mode: denied`, or tracing alone: a
        TCP connection has no span): then nothing is begun, counted or held for it, and
        its bytes go straight across (`Relay.link`), as with both off."""
        if not self.every:
            return None
        return ConnectionLine(self.watch("tcp", direction, peer_id, ssl_object, upstream), relay)

    def refused(
        self, direction: str, reason: str, endpoint: object = None, upstream: str | None = None
    ) -> None:
        """The line of a connection the agent refused before it relayed a byte (a captured
        one `registry_only`, a `capture_loop`, with `no_original_destination`; any past
        `max_connections`): L4, `decision` deny, `error` the reason as
        connections_refused_total labels it, `endpoint` where it was going (an address the
        kernel gave, `ip:port`: bounded) or the `upstream` an outbound listener is for (its
        config's name), no peer and no TLS (none was had). Written in
        `mode: denied` and `all`, every one, as every denial is: a caller can cause them as
        fast as it connects, and what bounds them is what bounds every line (a line per
        connection the agent accepted, MAX_PENDING waiting, the rest dropped and counted).
        Nothing is built with the access log off."""
        if not self.logging:
            return
        entry = Entry("tcp", direction, self.wall(), clock(), None, self.local_id)
        entry.decision, entry.error = "deny", reason
        if endpoint is not None:
            entry.endpoint = str(endpoint)
        entry.upstream = upstream
        self.finish(entry)

    def begin(self, kind: Kind, direction: str, peer_id: str | None) -> Entry:
        return Entry(kind, direction, self.wall(), clock(), peer_id, self.local_id)

    def finish(self, entry: Entry, name: str = "") -> None:
        """The request (or connection) is over: its line and its span, as configured."""
        ended = clock()
        trace = entry.trace
        if trace is not None:
            entry.trace_id = trace.span.trace_id
            entry.request_id = trace.request_id
            if self.spans is not None and trace.span.sampled:
                self.spans.finished(entry, trace, name, ended)
        if self.logging and accesslog.logged(self.access, entry.denied, self.rng.random()):
            text = accesslog.line(entry, ended)
            self.lines.append(text)
            self.waiting += len(text) + 1
            if self.waiting >= FLUSH_BYTES:
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                self.flush()
            elif self.timer is None:
                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:  # no loop (a unit test): at once
                    self.flush()
                else:
                    self.timer = loop.call_later(FLUSH_SECONDS, self._due)

    def _due(self) -> None:
        self.timer = None
        self.flush()

    def flush(self) -> None:
        """Hand the waiting lines to `write`. Safe from another thread (the agent's exit
        closes the observer in one): the list is swapped, never cleared after a join,
        and the loop's timer is left to the loop (it then finds nothing waiting)."""
        if self.lines:
            lines, self.lines = self.lines, []
            self.waiting = 0
            self.write("\n".join(lines) + "\n")

    def close(self) -> None:
        """Write what is pending (bounded); send the spans still queued (SPAN_FLUSH_SECONDS)."""
        self.flush()
        if self.writer is not None:
            self.writer.close()
        if self.spans is not None:
            # A receiver that never answers would hold each batch up to otlp.TIMEOUT: the
            # agent's exit is not held up for it, the spans get SPAN_FLUSH_SECONDS.
            spans, self.spans = self.spans, None
            spans.close(SPAN_FLUSH_SECONDS)

    # -- spans -------------------------------------------------------------------------------

    def _exporter(self, counted: Callable[[str, int], None]) -> SpanExporter:
        from agent.adapters import otlp
        from identity.build import VERSION

        settings = otlp.settings(self.tracing.otlp_endpoint, os.environ)
        service = self.tracing.service_name or self.local_id or "outrider-agent"
        return otlp.SpanExporter(
            otlp.Client(settings, f"outrider/{VERSION}"),
            service,
            VERSION,
            target=settings.url,
            counted=counted,
        )


def _agreed(ssl_object: ssl.SSLObject | ssl.SSLSocket) -> tuple[str | None, str | None]:
    """The TLS version and cipher suite a connection's handshake agreed, as lines name them
    (`TLSv1.3`, `TLS_AES_256_GCM_SHA384`): one reading for inbound and outbound lines."""
    described = ssl_object.cipher()
    return ssl_object.version(), described[0] if described else None


class Watch:
    """One connection's side of the observer: the fields its requests share, bound once."""

    __slots__ = ("cipher", "direction", "kind", "observer", "peer_id", "tls_version", "upstream")

    def __init__(
        self,
        observer: Observer,
        kind: Kind,
        direction: str,
        peer_id: str | None,
        tls_version: str | None,
        cipher: str | None,
        upstream: str | None,
    ) -> None:
        self.observer = observer
        self.kind, self.direction, self.peer_id = kind, direction, peer_id
        self.tls_version, self.cipher, self.upstream = tls_version, cipher, upstream

    def begin(self, kind: Kind | None = None) -> Entry:
        entry = self.observer.begin(kind or self.kind, self.direction, self.peer_id)
        entry.tls_version, entry.cipher, entry.upstream = (
            self.tls_version,
            self.cipher,
            self.upstream,
        )
        return entry

    def request(
        self,
        method: str,
        target: str,
        fields: Sequence[tuple[bytes, bytes]],
        kind: Kind | None = None,
    ) -> Entry:
        """A request's entry, its trace propagated from the received header `fields`;
        `target` is logged as the config says (agent/core/accesslog.py)."""
        entry = self.begin(kind)
        entry.method = method[: accesslog.MAX_METHOD]
        entry.path = accesslog.logged_path(target, self.observer.access.query)
        entry.trace = self.observer.propagate(*tracecontext.received(fields))
        return entry

    def decided(self, entry: Entry, decision: Decision) -> None:
        entry.decision = "allow" if decision.allowed else "deny"
        entry.policy, entry.rule = decision.policy, decision.rule

    def finish(
        self,
        entry: Entry,
        status: int | None,
        error: str | None = None,
        grpc_status: int | None = None,
    ) -> None:
        entry.status, entry.grpc_status = status, grpc_status
        if error is not None:
            entry.error = error
        self.observer.finish(entry)


class ConnectionLine:
    """One L4 connection's line, inbound or outbound, captured or not, in one way: begun
    with the connection, its bytes counted each way once it is linked, written once when
    its relay closes, linked or not (one refused or never connected gets its line too,
    with the `error` set before the close). A relay closed already (the client left before
    its line was begun) has its line written at once: every connection gets its one."""

    __slots__ = ("entry", "watch")

    def __init__(self, watch: Watch, relay: Relay) -> None:
        self.watch = watch
        self.entry = watch.begin()
        ended = partial(watch.finish, self.entry, None)
        if relay.closed:
            ended()
        else:
            relay.ended = ended

    def link(self, relay: Relay) -> None:
        """Link `relay` through sinks that count the client's (inbound: the peer's;
        outbound: the app's) bytes in `bytes_in` and the other side's in `bytes_out`;
        unless its client left while its other side was dialled (`Relay.dialled`: that
        side is closed, the line was written at the relay's close)."""
        if not relay.dialled():
            return
        down, up = relay.down.transport, relay.up.transport
        assert down is not None and up is not None
        entry, to_upstream, to_client = self.entry, up.write, down.write

        def from_client(data: bytes) -> None:
            entry.bytes_in += len(data)
            to_upstream(data)

        def from_upstream(data: bytes) -> None:
            entry.bytes_out += len(data)
            to_client(data)

        relay.link(from_client, from_upstream)
