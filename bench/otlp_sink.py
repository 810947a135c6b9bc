"""An OTLP/HTTP trace receiver for the bench: takes every export, counts its spans.

    python -m bench.otlp_sink PORT      POST /v1/traces; GET /count -> {"spans": N}

The observed L7 pair (bench/peers.py) exports its spans here, so the cost measured
is that of spans really sent and accepted, not of spans dropped for want of a receiver.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

_count = 0
_lock = threading.Lock()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        global _count
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        export = trace_service_pb2.ExportTraceServiceRequest.FromString(body)
        spans = sum(len(s.spans) for r in export.resource_spans for s in r.scope_spans)
        with _lock:
            _count += spans
        self._answer(b"", "application/x-protobuf")  # an empty ExportTraceServiceResponse

    def do_GET(self) -> None:
        with _lock:
            self._answer(json.dumps({"spans": _count}).encode(), "application/json")

    def _answer(self, body: bytes, kind: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def main() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), _Handler)
    server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
