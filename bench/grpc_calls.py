"""gRPC beside Envoy: unary calls, and 50 concurrent streams on one connection (issue 17).

    h2load (gRPC framing) -> client-side proxy (h2c in; h2 over mTLS out, ALPN h2)
        -> server-side proxy (each call's method checked against a 10-rule policy;
           h2c out) -> nghttpd, answering each call with its own message, grpc-status 0

Pairs (bench/peers.py, layer `grpc`): `direct grpc` (h2load to nghttpd), `outrider grpc`
(two agents, `protocol: grpc`), `envoy grpc` (two Envoys: HTTP/2 connection managers, RBAC
on the path, HTTP/2 upstreams). bench/dataplane.py runs the two scenarios below with the
others, pairs alternating within each round, so the ratios of Envoy are from the same run:

    grpc_unary    one connection, one call at a time (closed loop): the floor
    grpc_streams  one connection, 50 calls in flight on it (50 concurrent streams)

The load generator is h2load (Debian's nghttp2-client, already the fixed-rate scenario's),
sending each call's request message from a file (`-d`). It is one C thread pinned to CPU 0,
as wrk is, so on a two-core machine it leaves the proxies their core. A grpcio client in
Python spends about as much CPU per call as the agent under test: it would measure itself.
h2load does not read gRPC trailers, so a call counts as answered only by the message it got
back: nghttpd echoes each request's message (`--echo-upload`, 12 bytes), and a refusal is a
trailers-only response with none. `errors` counts the calls answered without it.

The backend is nghttpd (Debian's nghttp2-server), as the HTTP scenarios' is nginx: a C
server answering a fixed message, so the proxies are what is measured.

(Not `bench/grpc.py`: a script run by its path from bench/, as bench/admission.py is, would
import it instead of grpcio.)
"""

from __future__ import annotations

import re
import statistics
import subprocess
import tempfile
from contextlib import ExitStack
from pathlib import Path

from bench.load import Load, _pinned
from bench.procs import started
from tests.support import free_port

#: demo.HelloRequest(name="bench") (tests/fixtures/grpc/demo.proto) as a gRPC message:
#: uncompressed (0), its length (4 bytes, big-endian), then field 1, a 5-byte string.
MESSAGE = b"\x00\x00\x00\x00\x07" + b"\x0a\x05bench"
PATH = "/demo.Greeter/SayHello"
STREAMS = 50


def backend(stack: ExitStack, workdir: Path) -> tuple[int, int]:
    """nghttpd on h2c, echoing each call's message with grpc-status 0; (port, pid)."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = ["nghttpd", "--no-tls", "--echo-upload", "--trailer", "grpc-status: 0"]
    command += ["-a", "127.0.0.1", "-d", str(workdir), str(port)]
    pid = stack.enter_context(started(command, port, "nghttpd gRPC backend", workdir / "log"))
    return port, pid


def parse_h2load(output: str, latencies_ms: list[float], seconds: float) -> Load:
    """h2load's summary, with the calls that got no message back counted as errors."""
    done = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded", output)
    data = re.search(r"^traffic: .*\((\d+)\) data$", output, re.M)
    if not (done and data):
        raise RuntimeError(f"unexpected h2load output:\n{output}")
    answered = min(int(data[1]) // len(MESSAGE), int(done[3]))
    if not latencies_ms or not answered:
        raise RuntimeError(f"h2load completed no call:\n{output}")
    cut = statistics.quantiles(sorted(latencies_ms), n=100, method="inclusive")
    detail = {"no_message": int(done[3]) - answered, "not_2xx": int(done[2]) - int(done[3])}
    detail = {kind: n for kind, n in detail.items() if n}
    return Load(answered, answered / seconds, cut[49], cut[98], sum(detail.values()), detail)


def load(port: int, seconds: float, streams: int) -> Load:
    """Closed loop on ONE connection with `streams` calls in flight, for `seconds`."""
    with tempfile.TemporaryDirectory(prefix="outrider-h2load-grpc-") as tmp:
        body, log = Path(tmp) / "call.bin", Path(tmp) / "calls.tsv"
        body.write_bytes(MESSAGE)
        duration = max(seconds, 1)
        command = ["h2load", "-c1", f"-m{streams}", f"-D{duration:.0f}", "--warm-up-time=1"]
        command += ["-d", str(body), "-H", "content-type: application/grpc", "-H", "te: trailers"]
        command += [f"--log-file={log}", "-T5", f"http://127.0.0.1:{port}{PATH}"]
        timeout = duration + 31
        run = subprocess.run(_pinned(command), capture_output=True, text=True, timeout=timeout)
        if run.returncode != 0:
            raise RuntimeError(f"h2load exited {run.returncode}:\n{run.stdout}{run.stderr}")
        rows = [line.split("\t") for line in log.read_text().splitlines() if line]
    latencies = [int(row[2]) / 1000 for row in rows if row[1] == "200"]
    return parse_h2load(run.stdout, latencies, duration)
