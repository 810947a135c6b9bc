"""A batch of spans reaches the OTLP receiver whole, in one POST, though the agent encodes
it ENCODE_CHUNK spans at a time (agent/adapters/otlp.py): one message per batch held
~1.9 MiB on the exporter's thread, the largest part of a traced agent's peak. And what
the exporter does when the receiver is slow, away, refuses or closes its connections,
against a real receiver on loopback."""

from __future__ import annotations

import collections
import contextlib
import gzip
import logging
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent.adapters import otlp
from agent.adapters.otlp import ENCODE_CHUNK, Record, SpanExporter
from agent.adapters.tracing import Observer
from agent.core.accesslog import AccessLogConfig
from agent.core.tracecontext import TracingConfig

PEER = "spiffe://example.org/ns/demo/sa/client"
TRACE, SPAN, PARENT = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", "a3ce929d0e0e4736"


class Posted:
    """What an OTLP/HTTP receiver was sent, and how it answers: `statuses` in turn (then
    200); with `close` it closes each connection once it answered, without a word (as
    a receiver's idle timeout does to a kept connection)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []
        self.statuses: list[int] = []
        self.close = False
        self.lock = threading.Lock()

    def requests(self) -> list[trace_service_pb2.ExportTraceServiceRequest]:
        return [trace_service_pb2.ExportTraceServiceRequest.FromString(b) for b in self.bodies]

    def spans(self) -> list[tuple[str, str]]:
        found = []
        for export in self.requests():
            for resource_spans in export.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        path = next(
                            a.value.string_value for a in span.attributes if a.key == "url.path"
                        )
                        found.append((span.name, path))
        return found


def _handler(posted: Posted) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            with posted.lock:
                status = posted.statuses.pop(0) if posted.statuses else 200
                if status == 200:
                    posted.bodies.append(body)
                posted.headers.append(dict(self.headers))
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(status)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.close_connection = posted.close
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    return Handler


@pytest.fixture
def receiver() -> Iterator[tuple[int, Posted]]:
    posted = Posted()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(posted))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], posted
    finally:
        server.shutdown()
        server.server_close()


def traced(port: int, count: int) -> Observer:
    """An observer exporting to `port`, with `count` finished requests' spans queued."""
    observer = Observer(
        AccessLogConfig(),
        TracingConfig(otlp_endpoint=f"127.0.0.1:{port}"),
        PEER,
        write=lambda text: None,
    )
    watch = observer.watch("http", "inbound", PEER)
    for number in range(count):
        entry = watch.request("GET", f"/api/items/{number}", [])
        watch.finish(entry, 200)
    return observer


def record(number: int = 0, parent: str | None = PARENT) -> Record:
    attributes = (("url.path", f"/api/items/{number}"), ("http.response.status_code", 200))
    return Record("inbound GET", otlp.SERVER, TRACE, SPAN, parent, 1, 10, 25, attributes)


class Tally(collections.Counter[str]):
    """What the exporter counted (outrider_spans_total): result -> spans."""

    def __call__(self, result: str, spans: int) -> None:
        self[result] += spans


def exporter(
    port: int, environ: dict[str, str] | None = None, tally: Tally | None = None, **options: float
) -> SpanExporter:
    settings = otlp.settings(f"127.0.0.1:{port}", environ or {})
    return SpanExporter(
        otlp.Client(settings, "outrider/test"),
        "svc",
        "1.0",
        target=settings.url,
        counted=Tally() if tally is None else tally,
        **options,  # type: ignore[arg-type]
    )


def test_a_batch_goes_in_one_post_with_every_span_encoded_a_chunk_at_a_time(
    receiver: tuple[int, Posted],
) -> None:
    port, posted = receiver
    count = 3 * ENCODE_CHUNK + 5
    observer = traced(port, count)
    assert observer.spans is not None
    assert observer.spans.flush(10)
    observer.close()
    assert len(posted.bodies) == 1  # one POST for the batch
    assert posted.spans() == [("inbound GET", f"/api/items/{n}") for n in range(count)]
    export = trace_service_pb2.ExportTraceServiceRequest.FromString(posted.bodies[0])
    # Each chunk was its own message: no message of the whole batch was built.
    sizes = [len(r.scope_spans[0].spans) for r in export.resource_spans]
    assert sizes == [ENCODE_CHUNK, ENCODE_CHUNK, ENCODE_CHUNK, 5]
    services = {
        a.value.string_value
        for r in export.resource_spans
        for a in r.resource.attributes
        if a.key == "service.name"
    }
    assert services == {PEER}
    assert posted.headers[0]["Content-Type"] == "application/x-protobuf"


def test_a_span_arrives_as_the_otlp_schema_reads_it() -> None:
    resource, scope = otlp.resource("svc", "1.0"), otlp.scope("1.0")
    body = otlp.encode([record(), record(1, parent=None)], resource, scope)
    (resource_spans,) = trace_service_pb2.ExportTraceServiceRequest.FromString(body).resource_spans
    described = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert len(described.pop("service.instance.id")) == 36  # a UUID: this process's
    assert described == {
        "service.name": "svc",
        "telemetry.sdk.name": "outrider",
        "telemetry.sdk.language": "python",
        "telemetry.sdk.version": "1.0",
    }
    (scope_spans,) = resource_spans.scope_spans
    assert (scope_spans.scope.name, scope_spans.scope.version) == ("outrider.agent", "1.0")
    child, root = scope_spans.spans
    assert child.trace_id.hex() == TRACE and child.span_id.hex() == SPAN
    assert child.parent_span_id.hex() == PARENT and root.parent_span_id == b""
    assert child.kind == trace_pb2.Span.SPAN_KIND_SERVER
    assert otlp.CLIENT == trace_pb2.Span.SPAN_KIND_CLIENT
    assert (child.start_time_unix_nano, child.end_time_unix_nano) == (10, 25)
    assert {a.key: a.value for a in child.attributes}["http.response.status_code"].int_value == 200
    sampled, remote = 0x01, trace_pb2.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
    known = trace_pb2.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
    assert child.flags == sampled | known | remote  # its parent came in the request
    assert root.flags == sampled | known


def test_spans_go_on_their_own_once_a_batch_is_full(receiver: tuple[int, Posted]) -> None:
    port, posted = receiver
    spans = exporter(port, batch=4, every=60)
    for number in range(4):
        spans.add(record(number))
    deadline = time.monotonic() + 10
    while not posted.bodies and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(posted.spans()) == 4
    spans.close(1)


def test_a_busy_receiver_gets_the_batch_again_and_an_unwilling_one_loses_it(
    receiver: tuple[int, Posted], caplog: pytest.LogCaptureFixture
) -> None:
    port, posted = receiver
    tally = Tally()
    spans = exporter(port, tally=tally, first_wait=0.01)
    posted.statuses = [503, 429]
    spans.add(record(1))
    assert spans.flush(10)
    assert posted.spans() == [("inbound GET", "/api/items/1")] and len(posted.headers) == 3
    posted.statuses = [400]  # not a "try again": dropped at once
    with caplog.at_level(logging.WARNING, "outrider.agent.tracing"):
        spans.add(record(2))
        assert spans.flush(10)
        assert len(posted.headers) == 4 and spans.dropped == 1
        spans.add(record(3))
        assert spans.flush(10)
    assert posted.spans()[-1] == ("inbound GET", "/api/items/3")
    assert tally == {"sent": 2, "dropped": 1}
    said = [r.getMessage() for r in caplog.records]
    assert said == [
        f"spans to http://127.0.0.1:{port}/v1/traces are dropped: HTTP 400",
        f"spans reach http://127.0.0.1:{port}/v1/traces again (1 dropped meanwhile)",
    ]
    spans.close(1)


def test_a_receiver_that_is_away_costs_one_line_and_a_full_queue_drops(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with socket_nobody_listens_on() as port:
        tally = Tally()
        spans = exporter(port, tally=tally, max_queue=3, batch=100, every=60, timeout=0.2)
        with caplog.at_level(logging.WARNING, "outrider.agent.tracing"):
            for number in range(5):
                spans.add(record(number))
            assert spans.dropped == 2  # past the queue's 3: dropped, never held
            assert spans.flush(10)
        assert spans.dropped == 5 and spans.sent == 0 and tally == {"dropped": 5}
        url = f"http://127.0.0.1:{port}/v1/traces"
        said = [r.getMessage() for r in caplog.records]
        assert said[0] == (
            f"spans are dropped: 3 wait for {url} already (1 dropped since this was last said)"
        )
        assert said[1].startswith(f"spans to {url} are dropped: [Errno 111]")
        assert len(said) == 2
        spans.close(1)


class socket_nobody_listens_on:
    """A loopback port that refuses connections (bound, never listening)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        return int(self.sock.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


def test_a_receiver_that_closes_its_connections_gets_every_batch_without_a_wait(
    receiver: tuple[int, Posted],
) -> None:
    port, posted = receiver
    spans = exporter(port, first_wait=30)  # a retry's wait would fail the flush below
    for number in range(3):
        spans.add(record(number))
        assert spans.flush(5)
        posted.close = True  # the connection the exporter keeps is gone when it sends again
    assert [path for _, path in posted.spans()] == [f"/api/items/{n}" for n in range(3)]
    spans.close(1)


def test_headers_and_gzip_come_from_the_otlp_exporters_environment(
    receiver: tuple[int, Posted],
) -> None:
    port, posted = receiver
    environ = {
        "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=generic",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Bearer%20t0ken, x-tenant=a",
        "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
    }
    spans = exporter(port, environ)
    spans.add(record())
    assert spans.flush(10)
    (headers,) = posted.headers
    assert headers["authorization"] == "Bearer t0ken" and headers["x-tenant"] == "a"
    assert headers["Content-Encoding"] == "gzip" and len(posted.spans()) == 1
    spans.close(1)


@pytest.mark.parametrize(
    ("environ", "says"),
    [
        ({"OTEL_EXPORTER_OTLP_TRACES_HEADERS": "no-equals"}, "OTEL_EXPORTER_OTLP_TRACES_HEADERS"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "a=b%0D%0Ainjected: 1"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "bad name=x"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ({"OTEL_EXPORTER_OTLP_COMPRESSION": "zstd"}, "OTEL_EXPORTER_OTLP_COMPRESSION"),
        # What the exporter's HTTP decides, whatever the case: the body would be misread.
        ({"OTEL_EXPORTER_OTLP_HEADERS": "Content-Length=0"}, "exporter's own header"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "transfer-encoding=chunked"}, "exporter's own header"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "host=elsewhere"}, "exporter's own header"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "content-type=text/plain"}, "exporter's own header"),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a,X-Tenant=b"}, "X-Tenant is given twice"),
    ],
)
def test_an_exporter_variable_that_cannot_be_used_is_named(
    environ: dict[str, str], says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        otlp.settings("collector:4318", environ)


def test_an_endpoint_is_a_host_and_port_or_a_url() -> None:
    assert otlp.settings("collector.obs:4318", {}).url == "http://collector.obs:4318/v1/traces"
    assert otlp.settings("https://c.example/otlp/v1/traces", {}).url.endswith("/otlp/v1/traces")
    for wrong in ("grpc://collector:4317", "127.0.0.1:99999", "a..b:4318", "http://[::1/v1"):
        with pytest.raises(ValueError, match="otlp_endpoint"):
            otlp.settings(wrong, {})


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    """A receiver's self-signed certificate for 127.0.0.1, and its key."""
    cert, key = tmp_path / "receiver.pem", tmp_path / "receiver.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=otlp",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_an_https_receiver_is_verified_against_the_configured_ca(
    certificate: tuple[Path, Path],
) -> None:
    cert, key = certificate
    posted = Posted()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(posted))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{server.server_address[1]}/v1/traces"
    try:
        for environ, arrives in (
            ({}, False),
            ({"OTEL_EXPORTER_OTLP_CERTIFICATE": str(cert)}, True),
        ):
            settings = otlp.settings(url, environ)
            client = otlp.Client(settings, "outrider/test")
            # An unverified receiver is refused once, not tried again (it never will be).
            spans = SpanExporter(client, "s", "1", timeout=60, first_wait=30)
            spans.add(record())
            assert spans.flush(10)
            assert (spans.sent, spans.dropped) == ((1, 0) if arrives else (0, 1))
            spans.close(1)
    finally:
        server.shutdown()
        server.server_close()


class raw_receiver:
    """A loopback receiver that gives each connection it accepts to `answer` (raw bytes,
    whatever a broken or hostile receiver would send), on a thread of its own; bounded by
    the exporter's timeouts and by closing."""

    def __init__(self, answer: Callable[[socket.socket], None], read: bool = True) -> None:
        self.answer, self.read = answer, read
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(0.2)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while not self.done.is_set():
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            with conn, contextlib.suppress(OSError):
                conn.settimeout(5)
                if self.read:
                    _read_request(conn)
                self.answer(conn)

    def __enter__(self) -> int:
        self.thread.start()
        return int(self.server.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join(5)
        self.server.close()


def _read_request(conn: socket.socket) -> None:
    """The whole request, so that closing the connection sends a FIN, not a reset."""
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(1 << 16) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: *(\d+)", head)[1])  # type: ignore[index]
    while len(body) < length:
        body += conn.recv(1 << 16) or b"x" * length


def _endless_body(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"10000\r\n" + b"x" * 0x10000 + b"\r\n"
    for _ in range(4096):  # 256 MiB at most, unless the exporter stops reading first
        conn.sendall(chunk)


def _trickled_status(conn: socket.socket) -> None:
    for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n":
        conn.sendall(bytes([byte]))
        time.sleep(0.2)  # 7 s for the whole answer, each byte well within a read's timeout


def _absurd_length(conn: socket.socket) -> None:
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000000\r\n\r\nxx")


@pytest.mark.parametrize(
    ("answer", "sent"),
    [
        (_endless_body, 1),  # a 200: its body is not the exporter's business past 64 KiB
        (_absurd_length, 1),  # read in bounded pieces, not allocated at once
        (_trickled_status, 0),  # the POST's one deadline, not a read's timeout
    ],
)
def test_a_receiver_cannot_hold_the_exporter_or_its_memory(
    answer: Callable[[socket.socket], None], sent: int
) -> None:
    with raw_receiver(answer) as port:
        spans = exporter(port, timeout=1.0, first_wait=30)
        spans.add(record())
        started = time.monotonic()
        assert spans.flush(10)
        assert time.monotonic() - started < 3
        assert (spans.sent, spans.dropped) == (sent, 1 - sent)
        assert spans.thread is not None and spans.thread.is_alive()
        spans.close(1)


def test_the_exporter_outlives_whatever_a_send_raises(receiver: tuple[int, Posted]) -> None:
    port, posted = receiver
    client = otlp.Client(otlp.settings(f"127.0.0.1:{port}", {}), "outrider/test")
    failures = [UnicodeError("label empty or too long"), MemoryError()]

    def post(body: bytes, timeout: float) -> int:
        if failures:
            raise failures.pop(0)
        return client(body, timeout)

    spans = SpanExporter(post, "s", "1")
    for number in range(3):
        spans.add(record(number))
        assert spans.flush(10)
    assert (spans.sent, spans.dropped) == (1, 2) and len(posted.spans()) == 1
    spans.close(1)


def test_a_kept_tls_connection_the_receiver_dropped_is_replaced_at_once(
    certificate: tuple[Path, Path],
) -> None:
    """A receiver's idle timeout closes the TCP connection under TLS, without close_notify
    (SSLEOFError on the next POST): a new connection at once, not a retry's wait."""
    cert, key = certificate
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)

    def answer_then_drop(conn: socket.socket) -> None:
        tls = context.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        tls.do_handshake()
        tls.recv(1 << 20)
        tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        time.sleep(0.2)  # idle: then gone, the TLS session never ended
        conn.shutdown(socket.SHUT_RDWR)

    with raw_receiver(answer_then_drop, read=False) as port:
        url = f"https://127.0.0.1:{port}/v1/traces"
        settings = otlp.settings(url, {"OTEL_EXPORTER_OTLP_CERTIFICATE": str(cert)})
        client = otlp.Client(settings, "outrider/test")
        spans = SpanExporter(client, "s", "1", first_wait=30)
        for number in range(2):
            spans.add(record(number))
            assert spans.flush(3)
            time.sleep(0.4)  # the receiver has dropped the kept connection by now
        assert (spans.sent, spans.dropped) == (2, 0)
        spans.close(1)


def test_a_host_whose_first_address_swallows_syns_costs_one_deadline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hole = socket.create_server(("127.0.0.1", 0), backlog=0)  # never accepts: SYNs dropped
    fillers = [socket.socket() for _ in range(3)]
    for filler in fillers:
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(hole.getsockname())
    resolve = socket.getaddrinfo

    def two_addresses(host: str, *rest: object) -> list[Any]:
        if host != "receiver.test":
            return resolve(host, *rest)  # type: ignore[arg-type]
        stream = (socket.AF_INET, socket.SOCK_STREAM, 6, "")
        return [(*stream, hole.getsockname()), (*stream, ("127.0.0.1", port))]

    with raw_receiver(_trickled_status) as port:
        monkeypatch.setattr(socket, "getaddrinfo", two_addresses)
        settings = otlp.settings("receiver.test:4318", {})
        client = otlp.Client(settings, "outrider/test")
        spans = SpanExporter(client, "s", "1", timeout=1.0, first_wait=30)
        spans.add(record())
        started = time.monotonic()
        assert spans.flush(10)
        assert time.monotonic() - started < 2.5  # one POST's time, not one per address
        assert (spans.sent, spans.dropped) == (0, 1)
        spans.close(1)
    for sock in (*fillers, hole):
        sock.close()


def test_a_flapping_receiver_is_said_once_a_minute(
    receiver: tuple[int, Posted], caplog: pytest.LogCaptureFixture
) -> None:
    port, posted = receiver
    spans = exporter(port, first_wait=0.01)
    with caplog.at_level(logging.WARNING, "outrider.agent.tracing"):
        for number in range(10):
            posted.statuses = [400] if number % 2 == 0 else []
            spans.add(record(number))
            assert spans.flush(10)
    assert (spans.sent, spans.dropped) == (5, 5)
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and said[1].endswith("again (1 dropped meanwhile)")
    spans.close(1)


def test_a_watchdog_that_fires_late_leaves_the_next_post_alone(
    receiver: tuple[int, Posted],
) -> None:
    port, posted = receiver
    client = otlp.Client(otlp.settings(f"127.0.0.1:{port}", {}), "outrider/test")
    body = otlp.encode([record()], otlp.resource("s", "1"), otlp.scope("1"))
    assert client(body, 5) == 200
    kept = client.connection
    assert kept is not None
    late = otlp._Watchdog(kept, 60)
    with late:
        pass  # the POST ended
    late._fire()  # as a timer preempted past its own cancel would
    assert client(body, 5) == 200 and client.connection is kept  # not shut, not replaced
    assert len(posted.spans()) == 2
    client.close()
