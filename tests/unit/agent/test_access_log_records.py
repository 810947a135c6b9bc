"""Access log records: which requests get a line, the line's fields, and no secret in it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import pytest

from agent.adapters import tracing
from agent.adapters.relay import Relay
from agent.adapters.tracing import Observer
from agent.core.accesslog import (
    FIELDS,
    MAX_PATH,
    REDACTED,
    AccessLogConfig,
    Entry,
    Tls,
    line,
    logged,
    logged_path,
)
from agent.core.endpoint import Endpoint
from agent.core.tracecontext import TracingConfig
from identity.lines import MAX_PENDING, LineWriter, write_lines


@pytest.mark.parametrize(
    ("mode", "sample", "denied", "draw", "expected"),
    [
        ("off", 1.0, False, 0.0, False),
        ("off", 1.0, True, 0.0, False),
        ("denied", 1.0, False, 0.0, False),
        ("denied", 1.0, True, 0.99, True),
        ("all", 1.0, False, 0.99, True),
        ("all", 0.1, False, 0.05, True),
        ("all", 0.1, False, 0.5, False),
        ("all", 0.0, False, 0.0, False),
        ("all", 0.0, True, 0.99, True),  # a denial is never sampled away
        ("denied", 0.0, True, 0.99, True),
    ],
)
def test_which_requests_get_a_line(
    mode: str, sample: float, denied: bool, draw: float, expected: bool
) -> None:
    config = AccessLogConfig(mode, sample)  # type: ignore[arg-type]
    assert logged(config, denied, draw) is expected


@pytest.mark.parametrize(
    ("target", "query", "expected"),
    [
        ("/api/items?token=s3cret&page=2", False, "/api/items"),
        ("/api/items", True, "/api/items"),
        ("/api/items?page=2&sort=asc", True, "/api/items?page=2&sort=asc"),
        ("/a?token=s3cret&page=2", True, f"/a?token={REDACTED}&page=2"),
        (
            "/a?access_token=s&X-Amz-Signature=s&user.password=s",
            True,
            f"/a?access_token={REDACTED}&X-Amz-Signature={REDACTED}&user.password={REDACTED}",
        ),
        ("/a?api-key=s&flag&keyboard=us", True, f"/a?api-key={REDACTED}&flag&keyboard=us"),
        ("/" + "p" * (MAX_PATH + 10) + "?q=1", False, "/" + "p" * (MAX_PATH - 1)),
        # Separators and spellings an app server reads a secret's name through.
        ("/a?x=1;token=s&b=2", True, f"/a?x=1;token={REDACTED}&b=2"),
        ("/a?%74oken=s&api%5Fkey=s", True, f"/a?%74oken={REDACTED}&api%5Fkey={REDACTED}"),
        ("/a?token[]=s&pass+word=x", True, f"/a?token[]={REDACTED}&pass+word=x"),
        # Path parameters (a session ID in the path): values redacted, always by name.
        ("/a;jsessionid=s/b", False, f"/a;jsessionid={REDACTED}/b"),
        ("/a;JSESSIONID=s?x=1", False, f"/a;JSESSIONID={REDACTED}"),
        ("/a;v=2;sid=s", False, f"/a;v={REDACTED};sid={REDACTED}"),
        ("/a;v=2;sid=s;bare", True, f"/a;v=2;sid={REDACTED};bare"),
        ("/a;s3cret/b", False, f"/a;{REDACTED}/b"),
        # A fragment is never sent on, nor logged (OAuth puts tokens there).
        ("/cb#access_token=s", False, "/cb"),
        ("/cb?x=1#access_token=s", True, "/cb?x=1"),
        # Absolute-form (an app writing to a proxy): no scheme, userinfo or host.
        ("http://user:s@host:80/api?token=s", False, "/api"),
        ("http://user:s@host:80/api?token=s", True, f"/api?token={REDACTED}"),
        ("http://user:s@host?token=s", True, f"/?token={REDACTED}"),
        ("https://user:s@host", False, "/"),
        ("user:s@host:443", False, "host:443"),
        ("*", False, "*"),
    ],
)
def test_the_query_is_left_out_unless_asked_and_then_its_secrets_are_redacted(
    target: str, query: bool, expected: str
) -> None:
    assert logged_path(target, query) == expected


@pytest.mark.parametrize("query", [False, True])
def test_a_path_of_parameters_is_cut_at_max_path_once_redacted(query: bool) -> None:
    """Each `;` costs the caller a byte and the line `;REDACTED`: the cut is on what is logged."""
    shown = logged_path("/" + ";" * (MAX_PATH * 4) + "?q=1", query)
    assert len(shown.partition("?")[0]) <= MAX_PATH


def test_a_line_has_every_field_in_order_and_null_where_it_does_not_apply() -> None:
    entry = Entry("tcp", "inbound", at=1796569200.1234, started=10.0, peer_id="spiffe://a/b")
    record = json.loads(line(entry, ended=10.0025))
    assert tuple(record) == FIELDS
    assert record["time"] == "2026-12-06T15:00:00.123Z"
    assert record["duration_ms"] == 2.5
    assert record["method"] is None and record["status"] is None and record["tries"] is None
    assert record["bytes_in"] == 0


def test_an_outbound_line_names_the_peer_and_tls_of_its_connection_or_none() -> None:
    """The connection's facts, read once when it was dialled, go on each request's line;
    a request that reached no connection (or a plaintext one) has nulls."""
    tls = Tls("spiffe://example.org/ns/demo/sa/backend", "TLSv1.3", "TLS_AES_256_GCM_SHA384")
    entry = Entry("http", "outbound", at=1796569200.0, started=1.0)
    entry.over(tls)
    record = json.loads(line(entry, ended=1.0))
    assert (record["peer_id"], record["tls_version"], record["cipher"]) == (
        tls.peer_id,
        "TLSv1.3",
        "TLS_AES_256_GCM_SHA384",
    )
    entry.over(None)  # a retry on a connection it could not have
    record = json.loads(line(entry, ended=1.0))
    assert record["peer_id"] is record["tls_version"] is record["cipher"] is None


def test_the_documented_fields_and_example_lines_are_the_lines_fields_in_order() -> None:
    """docs/observability.md is what a log pipeline is built from: its table names every
    field in the order a line has them, and each example line has exactly those."""
    text = (Path(__file__).parents[3] / "docs" / "observability.md").read_text()
    table = text.partition("## The access log line")[2].partition("```json")[0]
    rows = [row for row in table.splitlines() if row.startswith("| `")]
    named = [name for row in rows for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])]
    assert tuple(named) == FIELDS
    examples = re.findall(r"```json\n(.*?)\n```", text, re.DOTALL)
    assert len(examples) >= 3
    for example in examples:
        assert tuple(json.loads(example)) == FIELDS


@pytest.mark.parametrize(
    "text",
    ["plain", 'quote " and \\ backslash', "tab\tnew\nline\x00\x1f\x7f", "é ü 中 😀", "</script>"],
)
def test_a_line_is_exactly_what_json_dumps_writes_for_its_fields(text: str) -> None:
    """The line is formatted, not encoded from a dict: it must still be the same JSON,
    byte for byte (ASCII only), whatever a caller put in the strings it chooses."""
    entry = Entry("http", "outbound", at=1796569200.5, started=1.0, peer_id=text, method=text)
    entry.path, entry.status, entry.grpc_status, entry.tries = text, 503, 14, 2
    entry.bytes_in, entry.bytes_out, entry.error, entry.request_id = 7, 1 << 40, text, text
    written = line(entry, ended=1.0123456)
    record = {name: getattr(entry, name, None) for name in FIELDS}
    record["time"], record["duration_ms"] = "2026-12-06T15:00:00.500Z", 12.346
    assert written == json.dumps(record, separators=(",", ":"), ensure_ascii=True)


def test_lines_wait_in_the_loop_and_go_out_together_within_the_flush_interval() -> None:
    """One hand-over to the writer for a burst of requests, not one per turn of the loop;
    none waits longer than FLUSH_SECONDS, and FLUSH_BYTES of lines go at once."""
    written: list[str] = []
    observer = Observer(AccessLogConfig("all"), TracingConfig(), "me", write=written.append)
    watch = observer.watch("http", "inbound", None)

    async def burst() -> None:
        for _ in range(20):
            watch.finish(watch.request("GET", "/p", []), 200)
            await asyncio.sleep(0)
        assert written == []  # held
        deadline = time.monotonic() + 5
        while not written:
            assert time.monotonic() < deadline
            await asyncio.sleep(tracing.FLUSH_SECONDS / 5)
        assert len(written) == 1 and written[0].count("\n") == 20
        big = "/" + "x" * 2000
        while len(written) == 1:  # FLUSH_BYTES waiting: written at once, no timer
            watch.finish(watch.request("GET", big, []), 200)
        assert tracing.FLUSH_BYTES <= len(written[1]) < tracing.FLUSH_BYTES + 4000
        observer.close()

    asyncio.run(burst())


def test_an_observer_writes_one_line_per_finished_request_and_no_header_value() -> None:
    written: list[str] = []
    observer = Observer(
        AccessLogConfig("all"),
        TracingConfig(),
        "spiffe://example.org/ns/a/sa/me",
        write=written.append,
        wall=lambda: 0.0,
    )
    watch = observer.watch("http", "outbound", None, upstream="backend")
    entry = watch.request(
        "GET",
        "/p?token=secret-in-query",
        [(b"authorization", b"Bearer secret-in-header"), (b"cookie", b"sid=secret-cookie")],
    )
    watch.finish(entry, 200)
    (text,) = written
    record = json.loads(text)
    assert record["path"] == "/p" and record["upstream"] == "backend"
    assert record["trace_id"] == entry.trace.span.trace_id  # type: ignore[union-attr]
    assert "secret" not in text


def test_the_otlp_classes_load_with_the_first_span_and_not_before() -> None:
    script = """
import sys
from pathlib import Path
from agent.app import observer
from agent.config import parse
raw = {"identity": {"spiffe_id": "spiffe://example.org/ns/a/sa/b"},
       "ca": {"address": "ca:1", "bundle_file": "b.pem"}}
from agent.adapters.metrics import AgentMetrics
metrics = AgentMetrics()
assert observer(parse(raw, base=Path("/")), metrics) is None
logged = observer(parse({**raw, "access_log": {"mode": "all"}}, base=Path("/")), metrics)
assert logged is not None and logged.spans is None
assert not [m for m in sys.modules if m.startswith("opentelemetry")], "imported"
# Traced, idle: nothing of OTLP but the exporter's own module until a span goes.
tracing = {"otlp_endpoint": "127.0.0.1:9"}
traced = observer(parse({**raw, "tracing": tracing}, base=Path("/")), metrics)
assert traced is not None and traced.spans is not None
assert not [m for m in sys.modules if m.startswith(("opentelemetry", "uuid"))], "imported"
"""
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)


def test_a_stalled_stdout_never_holds_the_caller_and_lines_beyond_the_bound_are_counted() -> None:
    """The writer's thread alone waits for a reader that stopped; the event loop hands a
    batch over and goes on, and a reader that never comes back costs `limit` bytes."""
    reading = threading.Event()
    written: list[str] = []

    def stalled(text: str) -> None:
        reading.wait(10)
        written.append(text)

    dropped: list[int] = []
    writer = LineWriter(stalled, dropped.append, limit=100)
    started = time.perf_counter()
    for n in range(10):
        writer(f'{{"n":{n:>3}}}\n' * 2)  # 2 lines, 20 bytes
    assert time.perf_counter() - started < 0.5  # never waited for the reader
    assert sum(dropped) == 10  # 5 batches (100 bytes) wait; the other 5 (10 lines) are dropped
    reading.set()
    writer.close()
    lines = "".join(written).splitlines()
    assert [json.loads(text)["n"] for text in lines[::2]] == [0, 1, 2, 3, 4]


def test_closing_waits_for_a_stalled_reader_a_bounded_time() -> None:
    never = threading.Event()
    writer = LineWriter(lambda text: never.wait(30) and None)
    writer("a line\n")
    started = time.perf_counter()
    writer.close(timeout=0.2)
    assert time.perf_counter() - started < 1.0
    never.set()


def test_a_broken_stdout_loses_its_lines_counted_and_the_writer_goes_on() -> None:
    dropped: list[int] = []
    calls: list[str] = []

    def broken(text: str) -> None:
        calls.append(text)
        if len(calls) == 1:
            raise BrokenPipeError

    writer = LineWriter(broken, dropped.append)
    writer("one\ntwo\n")
    deadline = time.monotonic() + 5
    while not dropped and time.monotonic() < deadline:
        time.sleep(0.005)
    writer("three\n")
    writer.close()
    assert dropped == [2] and calls[-1] == "three\n"


def test_writers_sharing_one_pipe_never_interleave_inside_a_line() -> None:
    """Agent workers share the pod's stdout pipe: each write is whole lines of at most
    PIPE_BUF bytes, which a pipe never mixes with another writer's."""
    read_fd, write_fd = os.pipe()
    received: list[bytes] = []
    reader = threading.Thread(
        target=lambda: received.extend(iter(lambda: os.read(read_fd, 1 << 16), b""))
    )
    reader.start()

    def burst(who: int) -> None:
        for batch in range(40):
            lines = (
                json.dumps({"who": who, "batch": batch, "n": n, "pad": "x" * (n * 53 % 700)})
                for n in range(30)
            )
            write_lines(write_fd, ("\n".join(lines) + "\n").encode())

    writers = [threading.Thread(target=burst, args=(who,)) for who in range(3)]
    for writer in writers:
        writer.start()
    for writer in writers:
        writer.join(30)
    os.close(write_fd)
    reader.join(30)
    os.close(read_fd)
    records = [json.loads(text) for text in b"".join(received).splitlines()]
    assert len(records) == 3 * 40 * 30


@pytest.mark.parametrize(
    ("mode", "otlp", "lined"),
    [("all", "", True), ("denied", "", False), ("off", "127.0.0.1:9", False)],
)
def test_a_connection_line_is_begun_only_where_one_can_be_written(
    mode: str, otlp: str, lined: bool
) -> None:
    """`mode: denied` writes no line for an outbound or allowed connection, and a TCP
    connection has no span: then nothing is begun, counted or held for it (its relay's
    bytes go straight across, as with both off), nor is a dialled connection's peer read."""
    written: list[str] = []
    observer = Observer(
        AccessLogConfig(mode),  # type: ignore[arg-type]
        TracingConfig(otlp),
        "me",
        write=written.append,
    )
    try:
        relay = Relay(60.0, lambda _: None)
        line = observer.connection(relay, "outbound", upstream="backend")
        assert (line is not None) is lined
        assert (relay.ended is not None) is lined
        relay.close()
        observer.flush()
        assert len(written) == lined
        assert (observer.names_peers) is (mode == "all" or bool(otlp))
    finally:
        observer.close()


@pytest.mark.parametrize(("mode", "lined"), [("off", False), ("denied", True), ("all", True)])
def test_a_refused_connection_is_a_denial_line_naming_why_and_where_it_was_going(
    mode: str, lined: bool
) -> None:
    """A connection the agent refused before relaying it (registry-only, a capture loop,
    max_connections): in mode denied and all, never off; L4, no peer, no TLS."""
    written: list[str] = []
    observer = Observer(
        AccessLogConfig(mode, sample=0.0),  # type: ignore[arg-type]
        TracingConfig("127.0.0.1:9" if mode == "off" else ""),
        "me",
        write=written.append,
    )
    try:
        observer.refused("outbound", "registry_only", Endpoint("2001:db8::7", 443))
        observer.refused("inbound", "max_connections")
        observer.flush()
        if not lined:
            assert written == []
            return
        first, second = (json.loads(text) for text in "".join(written).splitlines())
        assert (first["kind"], first["direction"], first["decision"], first["error"]) == (
            "tcp",
            "outbound",
            "deny",
            "registry_only",
        )
        assert (first["endpoint"], first["local_id"], first["tries"]) == (
            "[2001:db8::7]:443",
            "me",
            None,
        )
        assert first["peer_id"] is first["tls_version"] is first["cipher"] is None
        assert (second["direction"], second["error"], second["endpoint"]) == (
            "inbound",
            "max_connections",
            None,
        )
    finally:
        observer.close()


def test_a_backlog_for_a_slow_reader_is_written_without_a_copy_of_it_all() -> None:
    """MAX_PENDING bytes wait for a reader that was slow; writing them out takes a batch
    at a time (encoded as stdout's sink does), not the backlog joined: 4 MiB, not 12."""
    reading = threading.Event()
    written: list[int] = []

    def slow(text: str) -> None:
        reading.wait(10)
        written.append(len(text.encode("ascii", "replace")))

    batch = ('{"line": "' + "x" * 1000 + '"}\n') * 64  # a flush's worth
    writer = LineWriter(slow, limit=MAX_PENDING)
    tracemalloc.start()
    try:
        for _ in range(MAX_PENDING // len(batch)):
            writer(batch[:-1] + "\n")  # a string of its own, as each flush hands over
        held = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        reading.set()
        writer.close(timeout=10)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(written) == (MAX_PENDING // len(batch)) * len(batch)
    assert peak - held < 4 * len(batch)  # never the backlog a second time
