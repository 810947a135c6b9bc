"""A batch of spans reaches the OTLP receiver whole, in one POST, though the agent encodes
it ENCODE_CHUNK spans at a time (agent/adapters/tracing.py): the SDK's one message per
batch held ~1.9 MiB on the exporter's thread, the largest part of a traced agent's peak."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from agent.adapters.tracing import ENCODE_CHUNK, Observer
from agent.core.accesslog import AccessLogConfig
from agent.core.tracecontext import TracingConfig

PEER = "spiffe://example.org/ns/demo/sa/client"


class Posted:
    """What an OTLP/HTTP receiver was sent: one request body per POST."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.lock = threading.Lock()

    def spans(self) -> list[tuple[str, str]]:
        found = []
        for body in self.bodies:
            export = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
            for resource_spans in export.resource_spans:
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        path = next(
                            a.value.string_value for a in span.attributes if a.key == "url.path"
                        )
                        found.append((span.name, path))
        return found


@pytest.fixture
def receiver() -> Iterator[tuple[int, Posted]]:
    posted = Posted()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            with posted.lock:
                posted.bodies.append(body)
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
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


def test_a_batch_goes_in_one_post_with_every_span_encoded_a_chunk_at_a_time(
    receiver: tuple[int, Posted],
) -> None:
    port, posted = receiver
    count = 3 * ENCODE_CHUNK + 5
    observer = traced(port, count)
    assert observer.spans is not None
    assert observer.spans.force_flush(10_000)
    observer.close()
    assert len(posted.bodies) == 1  # one POST for the batch, as the SDK sends it
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
