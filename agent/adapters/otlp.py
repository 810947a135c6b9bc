"""Spans to an OTLP/HTTP receiver: protobuf bodies POSTed in batches by a thread of their own.

The agent builds its spans itself, from the access log's entries (agent/adapters/
tracing.py), so what it needs of OpenTelemetry is the protocol, not an SDK: the
messages are opentelemetry-proto's generated classes (the OTLP schema, encoded by
protobuf, which the agent's CA client loads anyway), and the rest is a queue, a
thread and a POST over the standard library's http.client. The OpenTelemetry SDK
and its OTLP/HTTP exporter did the same for ~8 MiB more per traced sidecar (the SDK
1.2 MiB, the exporter 1.4, the `requests` it sends with 5.0) and ~60 µs of CPU per
span, most of it building the SDK's span objects.

What it does is what the SDK's batch processor and exporter did, with their defaults:
- a bounded queue (MAX_QUEUE spans): a span that finds it full is dropped, never held;
- a batch (up to BATCH spans) goes when BATCH wait or EVERY seconds after the last,
  in one POST, its body encoded ENCODE_CHUNK spans at a time (protobuf merges the
  concatenated messages: one `ResourceSpans` per chunk, the same resource each time),
  so the thread holds ~0.4 MiB while encoding, not the 1.9 MiB of one message;
- a POST that fails for want of the receiver (no connection, 429, 502, 503, 504) is
  tried again after 1, 2, 4 ... s while its TIMEOUT lasts; then its spans are dropped;
- at exit the queue gets a bounded time (the caller's) to go out;
- the OTLP exporter's environment variables for traces: headers, a CA certificate,
  a client certificate and key, gzip (`settings`).

Failures are logged when they start and when spans go through again, with the count
dropped meanwhile: a receiver that is away costs a line, not a line per batch.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import http.client
import logging
import math
import re
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

from agent.core.accesslog import Entry
from agent.core.tracecontext import Propagated

if TYPE_CHECKING:  # imported where used: a module of the agent's loads without them
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope, KeyValue
    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

log = logging.getLogger("outrider.agent.tracing")

#: Spans that may wait; past them a span is dropped.
MAX_QUEUE = 2048
#: Spans in one POST at most, and how many waiting send one at once.
BATCH = 512
#: Seconds a span waits at most for its batch to fill.
EVERY = 5.0
#: Spans encoded into one protobuf message at a time (see the module's docstring).
ENCODE_CHUNK = 64
#: Seconds one batch may take, its tries and their waits included.
TIMEOUT = 5.0
#: Seconds between two lines that say spans are dropped (the queue full, the receiver
#: failing): a receiver that flaps or a service that outruns it says so once a minute.
SAY_EVERY = 60.0
#: Answers that mean "not now": the batch is tried again (OTLP/HTTP's retryable codes).
RETRYABLE = frozenset({429, 502, 503, 504})
#: SpanFlags: the W3C trace flags in bits 0-7, and whether the parent is remote.
HAS_IS_REMOTE, IS_REMOTE = 0x100, 0x200
#: Span.SpanKind's SPAN_KIND_SERVER and SPAN_KIND_CLIENT.
SERVER, CLIENT = 2, 3

Attribute = tuple[str, "str | int"]

#: A span's attributes (OpenTelemetry's semantic conventions where they have one) and the
#: access log entry's fields they come from; a field that is None is left out. The direction
#: is the span's kind.
SPAN_ATTRIBUTES = (
    ("http.request.method", "method"),
    ("url.path", "path"),
    ("http.response.status_code", "status"),
    ("rpc.grpc.status_code", "grpc_status"),
    ("outrider.peer_id", "peer_id"),
    ("outrider.decision", "decision"),
    ("outrider.upstream", "upstream"),
    ("outrider.endpoint", "endpoint"),
    ("outrider.tries", "tries"),
    ("outrider.request_id", "request_id"),
)


@dataclass(frozen=True, slots=True)
class Record:
    """One finished span, as the event loop hands it over: plain data, encoded later on the
    exporter's thread."""

    name: str
    kind: int  # CLIENT or SERVER
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None  # a remote parent's, from the request's traceparent
    trace_flags: int
    start_ns: int
    end_ns: int
    attributes: tuple[Attribute, ...]


@dataclass(frozen=True)
class Settings:
    """Where and how a batch is sent."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    context: ssl.SSLContext | None = None  # for an https URL
    gzip: bool = False


def span(entry: Entry, trace: Propagated, name: str, ended: float) -> Record:
    """A finished request's span: its access log entry, its trace context, its name (the
    request's method and direction, unless `name`), and `ended` (the agent's clock)."""
    start = int(entry.at * 1e9)
    attributes = []
    for key, attribute in SPAN_ATTRIBUTES:
        value = getattr(entry, attribute)
        if value is not None:
            attributes.append((key, value))
    parent = trace.parent
    return Record(
        name or f"{entry.direction} {entry.method or entry.kind}",
        SERVER if entry.direction == "inbound" else CLIENT,
        trace.span.trace_id,
        trace.span.span_id,
        parent.span_id if parent is not None else None,
        trace.span.flags,
        start,
        start + int(max(ended - entry.started, 0.0) * 1e9),
        tuple(attributes),
    )


def settings(endpoint: str, environ: Mapping[str, str]) -> Settings:
    """`tracing.otlp_endpoint` (host:port, or a URL used as it is) and the OTLP exporter's
    variables for traces (`OTEL_EXPORTER_OTLP_TRACES_*`, else `OTEL_EXPORTER_OTLP_*`):
    HEADERS, CERTIFICATE, CLIENT_CERTIFICATE with CLIENT_KEY, COMPRESSION (gzip or
    none). ValueError, naming the variable, for a value that cannot be used."""
    url = endpoint if "://" in endpoint else f"http://{endpoint}/v1/traces"
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 (parsed here: out of range or not a number is a ValueError)
        (parts.hostname or "").encode("idna")  # an empty or overlong label is refused
    except ValueError as error:  # UnicodeError is one
        raise ValueError(f"otlp_endpoint {endpoint!r}: {error}") from None
    scheme = parts.scheme
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"otlp_endpoint {endpoint!r}: an http(s) URL or host:port")

    def variable(name: str) -> tuple[str, str]:
        for key in (f"OTEL_EXPORTER_OTLP_TRACES_{name}", f"OTEL_EXPORTER_OTLP_{name}"):
            if environ.get(key, "").strip():
                return key, environ[key].strip()
        return "", ""

    key, compression = variable("COMPRESSION")
    if compression.lower() not in ("", "none", "gzip"):
        raise ValueError(f"{key}={compression!r}: gzip or none")
    key, raw = variable("HEADERS")
    headers = _headers(key, raw) if raw else {}
    context = None
    if scheme == "https":
        key, ca_file = variable("CERTIFICATE")
        try:
            context = ssl.create_default_context(cafile=ca_file or None)
        except OSError as error:
            raise ValueError(f"{key}={ca_file!r}: {error}") from error
        key, cert = variable("CLIENT_CERTIFICATE")
        _, client_key = variable("CLIENT_KEY")
        if bool(cert) != bool(client_key):
            raise ValueError("OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE and _CLIENT_KEY go together")
        try:
            if cert:
                context.load_cert_chain(cert, client_key)
        except OSError as error:
            raise ValueError(f"{key}={cert!r} and its key: {error}") from error
    return Settings(url, headers, context, compression.lower() == "gzip")


_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")


#: Headers the exporter's HTTP itself decides (framing, the connection, the body's type and
#: coding): set from the environment they would make the receiver misread every body.
_OWN = frozenset(
    {
        "connection", "content-encoding", "content-length", "content-type", "expect", "host",
        "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade",
    }
)  # fmt: skip


def _headers(key: str, raw: str) -> dict[str, str]:
    """`k1=v1,k2=v2`, values percent-decoded (the OTLP exporter's format); names are
    case-insensitive, so each is given once."""
    headers: dict[str, str] = {}
    for item in raw.split(","):
        name, equals, value = item.partition("=")
        name, value = name.strip(), urllib.parse.unquote(value.strip())
        if not (equals and _TOKEN.fullmatch(name) and _VALUE.fullmatch(value)):
            raise ValueError(f"{key}: {item.strip()!r} is not name=value (an HTTP header)")
        if name.lower() in _OWN:
            raise ValueError(f"{key}: {name} is the exporter's own header, not to be set")
        if name.lower() in (given.lower() for given in headers):
            raise ValueError(f"{key}: {name} is given twice")
        headers[name] = value
    return headers


def encode(records: Sequence[Record], resource: Resource, scope: InstrumentationScope) -> bytes:
    """One ExportTraceServiceRequest of `records` under `resource` and `scope`.

    Fields are set in place (`add()`, attribute by attribute): a message built from
    constructor arguments copies each nested message into its parent, 4x the CPU."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.CopyFrom(resource)
    scope_spans = resource_spans.scope_spans.add()
    scope_spans.scope.CopyFrom(scope)
    add = scope_spans.spans.add
    for record in records:
        span = add()
        span.trace_id = bytes.fromhex(record.trace_id)
        span.span_id = bytes.fromhex(record.span_id)
        flags = (record.trace_flags & 0xFF) | HAS_IS_REMOTE
        if record.parent_span_id:
            span.parent_span_id = bytes.fromhex(record.parent_span_id)
            flags |= IS_REMOTE
        span.name = record.name
        span.kind = record.kind  # type: ignore[assignment]
        span.start_time_unix_nano = record.start_ns
        span.end_time_unix_nano = record.end_ns
        span.flags = flags
        attribute = span.attributes.add
        for key, value in record.attributes:
            _set(attribute(), key, value)
    return request.SerializeToString()


def _set(attribute: KeyValue, key: str, value: str | int) -> None:
    attribute.key = key
    if isinstance(value, int):
        attribute.value.int_value = value
    else:
        attribute.value.string_value = value


def resource(service_name: str, version: str) -> Resource:
    """The spans' resource: the service, this process of it, and the agent that made them."""
    import uuid

    from opentelemetry.proto.resource.v1.resource_pb2 import Resource

    described = Resource()
    for key, value in (
        ("service.name", service_name),
        ("service.instance.id", str(uuid.uuid4())),  # this process: replicas share a name
        ("telemetry.sdk.name", "outrider"),
        ("telemetry.sdk.language", "python"),
        ("telemetry.sdk.version", version),
    ):
        _set(described.attributes.add(), key, value)
    return described


def scope(version: str) -> InstrumentationScope:
    from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope

    return InstrumentationScope(name="outrider.agent", version=version)


#: POST a body to the receiver within a time: its HTTP status, or an OSError when none
#: came in time (ssl.SSLCertVerificationError: the receiver is not who it should be).
Post = Callable[[bytes, float], int]
#: What a kept connection the receiver closed meanwhile fails with, at once.
_STALE = (
    ConnectionResetError,  # RemoteDisconnected too
    BrokenPipeError,
    ConnectionAbortedError,
    ssl.SSLEOFError,  # a TLS connection closed without close_notify
    ssl.SSLZeroReturnError,
)
#: The most of an answer's body read: an ExportTraceServiceResponse is a few bytes.
ANSWER_BYTES = 64 << 10


def _dial(
    address: tuple[str, int], timeout: object = None, source: object = None, *, deadline: float
) -> socket.socket:
    """socket.create_connection for http.client, each of the host's addresses tried within
    what is left of the POST's deadline (not each for a whole timeout: an address that
    swallows SYNs would hold the exporter once per address)."""
    failed: OSError = TimeoutError("no time left to connect")
    for family, kind, protocol, _, where in socket.getaddrinfo(*address, 0, socket.SOCK_STREAM):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        sock = socket.socket(family, kind, protocol)
        try:
            sock.settimeout(left)
            sock.connect(where)
            return sock
        except OSError as error:
            sock.close()
            failed = error
    raise failed


class _Watchdog:
    """Shuts a POST's connection down when its time is up, unless the POST ended first: a
    late timer never touches the next POST on a kept connection."""

    def __init__(self, connection: http.client.HTTPConnection, seconds: float) -> None:
        self.connection = connection
        self.lock = threading.Lock()
        self.ended = self.fired = False
        self.timer = threading.Timer(seconds, self._fire)
        self.timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self.timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.lock:
            self.ended = True
        self.timer.cancel()

    def _fire(self) -> None:
        with self.lock:
            if self.ended:
                return
            self.fired = True
            sock = self.connection.sock  # None while it connects: then _post finds `fired`
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)  # its reads and writes end at once


class Client:
    """One keep-alive connection to the receiver, opened again after any failure.

    A POST has one deadline, for its connection, its request and its answer: a watchdog
    shuts the socket down when it passes, so a receiver that trickles its answer a byte
    at a time holds the exporter no longer than one that never answers. Of the answer's
    body (an ExportTraceServiceResponse: a few bytes) at most ANSWER_BYTES are read."""

    def __init__(self, settings: Settings, user_agent: str) -> None:
        self.settings = settings
        parts = urllib.parse.urlsplit(settings.url)
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname or "", parts.port
        self.target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.headers = {"Content-Type": "application/x-protobuf"}
        if settings.gzip:
            self.headers["Content-Encoding"] = "gzip"
        if not any(name.lower() == "user-agent" for name in settings.headers):
            self.headers["User-Agent"] = user_agent
        self.headers.update(settings.headers)
        self.connection: http.client.HTTPConnection | None = None

    def __call__(self, body: bytes, timeout: float) -> int:
        if self.settings.gzip:
            body = gzip.compress(body)
        deadline = time.monotonic() + timeout
        if self.connection is not None:
            try:
                return self._post(body, deadline)
            except _STALE:  # the receiver closed the idle connection: again, on a new one
                self.close()
        return self._post(body, deadline)

    def _post(self, body: bytes, deadline: float) -> int:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no time left for the POST")
        connection = self.connection or self._connect(deadline)
        with _Watchdog(connection, left) as watchdog:
            try:
                if connection.sock is None:
                    connection.connect()
                if watchdog.fired:  # the connection took the POST's whole time
                    raise TimeoutError
                assert connection.sock is not None
                connection.sock.settimeout(left)  # a kept one's was its first POST's
                connection.request("POST", self.target, body, self.headers)
                answer = connection.getresponse()
                answer.read(ANSWER_BYTES)
                if answer.will_close or not answer.isclosed():  # closing, or more than expected
                    self.close()
                return answer.status
            except (OSError, http.client.HTTPException) as error:
                self.close()
                if watchdog.fired:
                    raise TimeoutError(f"no answer within {left:.1f} s") from error
                if isinstance(error, OSError):  # RemoteDisconnected is one (stale) too
                    raise
                raise ConnectionError(f"{type(error).__name__}: {error}") from error
            except BaseException:
                self.close()
                raise

    def _connect(self, deadline: float) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection
        if self.https:
            connection = http.client.HTTPSConnection(
                self.host, self.port, context=self.settings.context
            )
        else:
            connection = http.client.HTTPConnection(self.host, self.port)
        connection._create_connection = partial(_dial, deadline=deadline)  # type: ignore[attr-defined]
        self.connection = connection
        return connection

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


class SpanExporter:
    """The queue and the thread (see the module's docstring). `add` is the event loop's, and
    only appends; everything else happens on the thread, started with the first span."""

    def __init__(
        self,
        post: Post,
        service: str,
        version: str,
        *,
        target: str = "the OTLP receiver",
        max_queue: int = MAX_QUEUE,
        batch: int = BATCH,
        every: float = EVERY,
        timeout: float = TIMEOUT,
        first_wait: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        counted: Callable[[str, int], None] = lambda result, spans: None,
    ) -> None:
        """Spans of `service` (service.name), made by the agent of `version`.
        `first_wait`: seconds before a failed POST's second try, doubled for each next.
        `counted(result, n)`: n spans were "sent" or "dropped" (outrider_spans_total).

        The OTLP classes are loaded by the thread, with the first span: a traced agent
        that has sent none carries none of them."""
        self.post, self.service, self.version, self.target = post, service, version, target
        self.described: tuple[Resource, InstrumentationScope] | None = None
        self.max_queue, self.batch, self.every, self.timeout = max_queue, batch, every, timeout
        self.first_wait, self.clock, self.counted = first_wait, clock, counted
        self.queue: collections.deque[Record] = collections.deque()
        self.ready = threading.Condition(threading.Lock())
        self.thread: threading.Thread | None = None
        self.closing = False
        self.flushing = 0  # flush() calls waiting: send what waits at once
        self.sending = 0  # spans taken from the queue and not yet sent or dropped
        self.sent = self.dropped = 0
        self.failing = False  # the last batch could not be sent
        self.failure_said = -math.inf  # when a failure was last said
        self.said_failing = False  # this run of failures was said: its end will be too
        self.dropped_while_failing = 0  # since it was said
        self.overflowed = 0  # spans that found the queue full since that was last said
        self.overflow_said = -math.inf  # when it was

    def add(self, record: Record) -> None:
        with self.ready:
            if self.closing or len(self.queue) >= self.max_queue:
                self._lost(1)
                if not self.closing:
                    self._overflowed()
                return
            self.queue.append(record)
            if self.thread is None:
                self.thread = threading.Thread(target=self._run, name="otlp-spans", daemon=True)
                self.thread.start()
            elif len(self.queue) == self.batch:
                self.ready.notify_all()

    def _overflowed(self) -> None:
        """A span found the queue full (called with `ready` held): said at once, then at
        most every SAY_EVERY seconds while spans keep coming faster than they go."""
        self.overflowed += 1
        if self.said_failing:
            self.dropped_while_failing += 1
        now = self.clock()
        if now >= self.overflow_said + SAY_EVERY:
            log.warning(
                "spans are dropped: %d wait for %s already (%d dropped since this was last said)",
                self.max_queue,
                self.target,
                self.overflowed,
            )
            self.overflowed, self.overflow_said = 0, now

    def finished(self, entry: Entry, trace: Propagated, name: str, ended: float) -> None:
        """A request's span (`span`), queued."""
        self.add(span(entry, trace, name, ended))

    def flush(self, timeout: float) -> bool:
        """Send every queued span now; whether all went (sent or dropped) within `timeout`."""
        deadline = self.clock() + timeout
        with self.ready:
            self.flushing += 1
            self.ready.notify_all()
            try:
                while self.queue or self.sending:
                    left = deadline - self.clock()
                    if left <= 0 or self.thread is None or not self.thread.is_alive():
                        return False
                    self.ready.wait(left)
                return True
            finally:
                self.flushing -= 1

    def close(self, timeout: float) -> None:
        """Send what is queued within `timeout` s, then stop; spans added later are dropped."""
        with self.ready:
            self.closing = True
            self.ready.notify_all()
            thread = self.thread
        if thread is not None:
            thread.join(timeout)

    # -- the thread ------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self.ready:
                due = self.clock() + self.every
                while not self._go() and (left := due - self.clock()) > 0:
                    self.ready.wait(left)
                if not self.queue and self.closing:
                    return
                count = min(self.batch, len(self.queue))
                batch = [self.queue.popleft() for _ in range(count)]
                self.sending = count
            try:
                if batch:
                    self._send(batch)
            except Exception:  # a defect of ours: the thread goes on, the batch is counted
                log.exception("spans could not be sent, %d dropped", len(batch))
                with self.ready:
                    self._lost(len(batch))
            finally:
                with self.ready:
                    self.sending = 0
                    self.ready.notify_all()

    def _go(self) -> bool:
        return len(self.queue) >= self.batch or self.closing or bool(self.flushing and self.queue)

    def _send(self, batch: list[Record]) -> None:
        try:
            if self.described is None:
                self.described = resource(self.service, self.version), scope(self.version)
            body = b"".join(
                encode(batch[start : start + ENCODE_CHUNK], *self.described)
                for start in range(0, len(batch), ENCODE_CHUNK)
            )
        except Exception as error:  # a span that cannot be encoded: a defect of ours
            log.error("spans could not be encoded, %d dropped: %s", len(batch), error)
            with self.ready:
                self._lost(len(batch))
            return
        deadline, wait = self.clock() + self.timeout, self.first_wait
        while True:
            retry = True
            try:
                status = self.post(body, max(deadline - self.clock(), 0.1))
                reason, retry = f"HTTP {status}", status in RETRYABLE
            except ssl.SSLCertVerificationError as error:  # not the receiver: never will be
                status, reason, retry = 0, str(error), False
            except OSError as error:  # no answer in time, or the connection lost
                status, reason = 0, str(error) or type(error).__name__
            except Exception as error:  # anything else the receiver made happen: not again
                status, reason, retry = 0, f"{type(error).__name__}: {error}", False
            if 200 <= status < 300:
                self._sent(len(batch))
                return
            with self.ready:
                if not retry or self.closing or self.clock() + wait >= deadline:
                    self._drop(len(batch), reason)
                    return
                until = self.clock() + wait
                while not self.closing and (left := until - self.clock()) > 0:
                    self.ready.wait(left)  # close() cuts it short: one last try
            wait *= 2

    def _sent(self, count: int) -> None:
        with self.ready:
            self.sent += count
            self.counted("sent", count)
            if self.said_failing:
                log.warning(
                    "spans reach %s again (%d dropped meanwhile)",
                    self.target,
                    self.dropped_while_failing,
                )
            self.failing = self.said_failing = False

    def _drop(self, count: int, reason: str) -> None:
        """Count a batch of `count` spans that could not be sent (called with `ready` held);
        the first failure of a run of them is said with its `reason`, at most every
        SAY_EVERY seconds, and then its end."""
        self._lost(count)
        if self.failing:
            if self.said_failing:
                self.dropped_while_failing += count
            return
        self.failing = True
        now = self.clock()
        if now < self.failure_said + SAY_EVERY:
            return  # a receiver that flaps: its start and end were said a while ago
        self.failure_said, self.said_failing, self.dropped_while_failing = now, True, count
        log.warning("spans to %s are dropped: %s", self.target, reason)

    def _lost(self, count: int) -> None:
        """`count` spans dropped (called with `ready` held)."""
        self.dropped += count
        self.counted("dropped", count)
