"""The h2 server connection over a loopback socket: streams, flow control both ways, and
the limits that end a connection, each counted."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
import pytest
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple
from hpack.table import table_entry_size
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
)

from agent.adapters.h2server import H2Server, H2Stream, Handler, StreamReset
from agent.core.h2limits import FrameBudget, H2Limits, Limit, Window
from tests.h2raw import H2Client, RawFrames, Wire, request_headers, turns


async def echo(stream: H2Stream) -> None:
    """Answers with the request's body (and its path when it has none)."""
    body = b""
    while chunk := await stream.read():
        body += chunk
    await stream.respond([(b":status", b"200")])
    await stream.send(body or (stream.header(b":path") or b""))
    await stream.end([(b"x-trailer", b"yes")])


class Served:
    def __init__(self) -> None:
        self.hits: list[Limit] = []
        self.servers: list[H2Server] = []
        self.port = 0


@pytest.fixture
async def served(request: pytest.FixtureRequest) -> AsyncIterator[Served]:
    handler = getattr(request, "param", echo)
    state = Served()

    def make() -> H2Server:
        server = H2Server(
            handler,
            state.hits.append,
            idle_timeout=30,
            limits=H2Limits(max_resets=20, max_pings=20, max_settings=20),
        )
        state.servers.append(server)
        return server

    loop = asyncio.get_running_loop()
    server = await loop.create_server(make, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    yield state
    for s in state.servers:
        s.abort()
    server.close()


def dial(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


async def test_requests_on_one_connection_are_answered_with_trailers(served: Served) -> None:
    def run() -> list[tuple[int, bytes, bytes | None]]:
        client = H2Client(dial(served.port))
        ids = [client.send(request_headers(f"/{i}")) for i in range(5)]
        ids.append(client.send(request_headers("/post", "POST"), b"x" * 200_000))
        out = [client.wait(i) for i in ids]
        client.close()
        return [(r.status, r.body[:10], r.header(b"x-trailer")) for r in out]

    answers = await asyncio.to_thread(run)
    assert answers[:5] == [(200, f"/{i}".encode(), b"yes") for i in range(5)]
    assert answers[5] == (200, b"x" * 10, b"yes")
    assert served.hits == []


async def big(stream: H2Stream) -> None:
    await stream.respond([(b":status", b"200")])
    for _ in range(100):  # 10 MB, far beyond any window the client opens
        await stream.send(b"y" * 100_000)
    await stream.end()


@pytest.mark.parametrize("served", [big], indirect=True)
async def test_a_client_that_opens_no_window_gets_no_more_than_it_advertised(
    served: Served,
) -> None:
    def run() -> int:
        client = H2Client(dial(served.port), window=0)
        sid = client.send(request_headers("/"))
        client.drain(0.5)
        got = len(client.responses[sid].body)
        client.close()
        return got

    assert await asyncio.to_thread(run) == 0
    server = served.servers[0]
    assert server.transport is None or server.transport.get_write_buffer_size() < 64 * 1024


async def test_rapid_reset_ends_the_connection_with_enhance_your_calm(served: Served) -> None:
    def run() -> bool:
        raw = RawFrames(dial(served.port))
        frames: list[Frame] = []
        for i in range(100):
            sid = 2 * i + 1
            frames.append(HeadersFrame(sid, raw.block(request_headers("/")), flags={"END_HEADERS"}))
            rst = RstStreamFrame(sid)
            rst.error_code = ErrorCodes.CANCEL
            frames.append(rst)
        raw.send(frames)
        return raw.closed_within(3)

    assert await asyncio.to_thread(run)
    assert "rapid_reset" in served.hits


async def test_an_endless_header_block_ends_the_connection(served: Served) -> None:
    def run() -> bool:
        raw = RawFrames(dial(served.port))
        raw.send([HeadersFrame(1, raw.block(request_headers("/")))])
        raw.send(ContinuationFrame(1, raw.block([(b"x-a", b"b" * 100)])) for _ in range(40))
        return raw.closed_within(3)

    assert await asyncio.to_thread(run)
    assert served.hits == ["continuation"]


async def test_a_ping_flood_ends_the_connection(served: Served) -> None:
    def run() -> bool:
        raw = RawFrames(dial(served.port))
        raw.send(PingFrame(0, opaque_data=b"12345678") for _ in range(50))
        return raw.closed_within(3)

    assert await asyncio.to_thread(run)
    assert served.hits == ["ping_flood"]


def test_window_counts_only_events_within_it() -> None:
    window = Window(2, 10.0)
    assert not window.hit(0.0) and not window.hit(1.0)
    assert window.hit(2.0)
    assert not window.hit(12.5)  # 0.0, 1.0 and 2.0 have left it


async def held(stream: H2Stream) -> None:
    """Answers once the test lets it (the drain test's request in flight)."""
    STARTED.set()
    await RELEASE.wait()
    await stream.respond([(b":status", b"200")], end=True)


STARTED, RELEASE = asyncio.Event(), asyncio.Event()


@pytest.mark.parametrize("served", [held], indirect=True)
async def test_a_drain_finishes_the_streams_open_and_takes_no_new_one(served: Served) -> None:
    STARTED.clear()
    RELEASE.clear()
    client = await asyncio.to_thread(H2Client, dial(served.port))
    first = await asyncio.to_thread(client.send, request_headers("/"))
    await asyncio.wait_for(STARTED.wait(), 5)
    server = served.servers[0]
    server.finish()  # GOAWAY: the stream open goes on
    assert not server.closed
    RELEASE.set()
    answer = await asyncio.to_thread(client.wait, first)
    assert answer.status == 200
    await asyncio.to_thread(client.drain, 2)
    assert client.goaway is not None and client.closed
    assert server.closed
    client.close()


async def early(stream: H2Stream) -> None:
    """Answers at once, reading none of the body (a refusal does so)."""
    await stream.respond([(b":status", b"403")], end=True)


@pytest.mark.parametrize("served", [early], indirect=True)
async def test_an_answer_before_the_body_tells_the_client_to_stop_sending(served: Served) -> None:
    def run() -> tuple[int, int | None, int]:
        client = H2Client(dial(served.port))
        sid = client.send(request_headers("/", "POST"), end=False)
        answer = client.wait(sid)
        client.drain(0.2)  # the RST_STREAM after the response
        again = client.get("/")  # the connection goes on
        client.close()
        return answer.status, client.responses[sid].reset, again.status

    assert await asyncio.to_thread(run) == (403, ErrorCodes.NO_ERROR, 403)


async def test_an_idle_connection_gets_a_goaway_and_is_closed() -> None:
    loop = asyncio.get_running_loop()
    listening = await loop.create_server(
        lambda: H2Server(echo, lambda _: None, idle_timeout=0.1), "127.0.0.1", 0
    )
    port = listening.sockets[0].getsockname()[1]

    def run() -> bool:
        client = H2Client(dial(port))
        client.drain(2)
        client.close()
        return client.goaway is not None and client.closed

    try:
        assert await asyncio.to_thread(run)
    finally:
        listening.close()


def test_frame_budgets_grow_with_what_the_connection_does() -> None:
    limits = H2Limits(
        max_empty_frames=2,
        max_priority_per_stream=3,
        max_inert_per_stream=3,
        max_window_updates_per_data=2,
    )
    budget = FrameBudget(limits)
    # Empty DATA frames: only in a row; one that carries data (or END_STREAM) starts again.
    assert [budget.received_data(False) for _ in range(2)] == [None, None]
    assert budget.received_data(True) is None
    assert [budget.received_data(False) for _ in range(3)] == [None, None, "empty_frames"]
    # PRIORITY: 3 per stream opened, plus one stream's worth.
    assert [budget.received_priority() for _ in range(4)] == [None, None, None, "priority_flood"]
    budget.streams += 1
    assert [budget.received_priority() for _ in range(2)] == [None, None]
    assert budget.received_priority() == "priority_flood"
    # Frames that do nothing: as PRIORITY, counted with the empty ones.
    assert all(budget.received_inert() is None for _ in range(2 * 3))
    assert budget.received_inert() == "empty_frames"
    # WINDOW_UPDATE: 5, plus 2 per stream (1 opened), plus 2 per 2 DATA frames sent.
    assert all(budget.received_window_update() is None for _ in range(7))
    assert budget.received_window_update() == "window_update_flood"
    budget.data_sent += 1
    assert all(budget.received_window_update() is None for _ in range(3))
    assert budget.received_window_update() == "window_update_flood"


def test_resets_the_peer_provokes_are_counted_in_a_window() -> None:
    budget = FrameBudget(H2Limits(max_provoked_resets=2, window=10.0))
    assert budget.provoked_reset(0.0) is None and budget.provoked_reset(1.0) is None
    assert budget.provoked_reset(2.0) == "reset_flood"
    assert budget.provoked_reset(12.5) is None


@contextlib.asynccontextmanager
async def listening(limits: H2Limits, handler: Handler = big) -> AsyncIterator[Served]:
    """H2Servers answering with `handler` under `limits` on a loopback port."""
    state = Served()

    def make() -> H2Server:
        server = H2Server(handler, state.hits.append, idle_timeout=30, limits=limits)
        state.servers.append(server)
        return server

    server = await asyncio.get_running_loop().create_server(make, "127.0.0.1", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        for s in state.servers:
            s.abort()
        server.close()


def reading_nothing(port: int, stop: threading.Event) -> None:
    """A client that asks for `big` with its windows wide open, then reads nothing (a
    small receive buffer, so the server's writes back up soon) until `stop`."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
    sock.connect(("127.0.0.1", port))
    client = H2Client(sock, window=2**31 - 1)
    client.conn.increment_flow_control_window(2**31 - 1 - 65_535)
    client.send(request_headers("/"))
    stop.wait(5)
    sock.close()


async def until(condition: Callable[[], bool], seconds: float = 3) -> bool:
    """Polls: a transport's buffer and a connection's end have no event to await."""
    deadline = asyncio.get_running_loop().time() + seconds
    while not condition() and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.02)
    return condition()


async def test_a_peer_that_reads_nothing_is_dropped_after_the_send_timeout() -> None:
    """It asked for 10 MB and takes none of it: the server's writes stay unread, so after
    `send_timeout` the connection is aborted, counted `slow_read`."""
    async with listening(H2Limits(send_timeout=0.3, write_high=16 * 1024)) as served:
        stop = threading.Event()
        client = asyncio.create_task(asyncio.to_thread(reading_nothing, served.port, stop))
        try:
            assert await until(lambda: bool(served.servers) and served.servers[0].closed)
            assert served.hits == ["slow_read"]
        finally:
            stop.set()
            await client


async def test_a_closing_connection_is_not_held_by_a_peer_that_reads_nothing() -> None:
    """A connection closed (at a limit, idle, drained) while its peer takes none of the
    server's writes is aborted at once: a close would wait for the peer to read for ever."""
    async with listening(H2Limits(send_timeout=60, write_high=16 * 1024)) as served:
        stop = threading.Event()
        client = asyncio.create_task(asyncio.to_thread(reading_nothing, served.port, stop))
        try:
            assert await until(lambda: bool(served.servers) and served.servers[0].paused)
            server = served.servers[0]
            server.close()
            assert await until(lambda: server.transport is None)  # connection_lost came
            assert served.hits == []
        finally:
            stop.set()
            await client


async def named(stream: H2Stream) -> None:
    """Answers with a header of its own per request (as a date, an id or a length is)."""
    await stream.respond([(b":status", b"200"), (b"x-path", (stream.header(b":path") or b"") * 20)])
    await stream.end()


@pytest.mark.parametrize("served", [named], indirect=True)
async def test_a_peer_cannot_grow_the_table_the_server_compresses_its_headers_with(
    served: Served,
) -> None:
    """A client allowing a 2 GB HPACK table (SETTINGS_HEADER_TABLE_SIZE): h2 would let the
    server's encoder keep every header it ever sent on the connection; it keeps 4 KiB."""

    def run() -> set[int]:
        client = H2Client(dial(served.port))
        client.conn.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**31})
        statuses = set()
        for start in range(0, 300, 50):
            ids = [client.send(request_headers(f"/{start + i:05}")) for i in range(50)]
            statuses |= {client.wait(i).status for i in ids}
        client.close()
        return statuses

    assert await asyncio.to_thread(run) == {200}
    table = served.servers[0].conn.encoder.header_table
    held = sum(table_entry_size(name, value) for name, value in table.dynamic_entries)
    assert table.maxsize <= 4096 and held <= 4096, held


async def test_a_long_lived_connection_remembers_a_bounded_number_of_closed_streams() -> None:
    """h2 keeps 65,536 closed streams by default (about 11 MB a connection that served
    that many); the server keeps `max_closed_streams`, and a late RST_STREAM for a stream
    it still remembers is no error."""
    async with listening(H2Limits(max_closed_streams=50), echo) as served:

        def run() -> tuple[set[int], int | None]:
            client = H2Client(dial(served.port))
            statuses: set[int] = set()
            for _ in range(6):
                ids = [client.send(request_headers("/")) for _ in range(50)]
                statuses |= {client.wait(i).status for i in ids}
            # A late RST_STREAM for the last (closed on both sides, so sent raw).
            client.sock.sendall(RstStreamFrame(ids[-1], error_code=ErrorCodes.CANCEL).serialize())
            again = client.get("/again")
            client.close()
            return statuses | {again.status}, client.goaway and client.goaway.error_code

        assert await asyncio.to_thread(run) == ({200}, None)
        assert len(served.servers[0].conn._closed_streams) <= 50


async def test_a_stream_whose_window_stays_shut_is_reset_after_the_stall_timeout() -> None:
    """A client that opens no window for its stream and keeps its connection alive (it
    pings, and opens the connection's window a byte at a time, which wakes the stream
    each time): the stream is reset `stall_timeout` after its window shut, counted
    `slow_read`, and the connection goes on."""
    async with listening(H2Limits(stall_timeout=0.3), echo) as served:

        def run() -> tuple[int | None, int]:
            client = H2Client(dial(served.port), window=0)
            sid = client.send(request_headers("/"))
            deadline, pinged = time.monotonic() + 3, 0.0
            while client.responses[sid].reset is None and time.monotonic() < deadline:
                if time.monotonic() - pinged > 0.1:  # a keepalive, not a flood
                    client.conn.ping(b"12345678")
                    client.conn.increment_flow_control_window(1)  # wakes every stream
                    client._flush()
                    pinged = time.monotonic()
                client.pump(0.05)
            stalled = client.responses[sid].reset
            client.conn.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 65_535})
            status = client.get("/", seconds=3).status  # stream-level: the connection lives
            client.close()
            return stalled, status

        assert await asyncio.to_thread(run) == (ErrorCodes.CANCEL, 200)
        assert served.hits == ["slow_read"]


async def grpc_echo(stream: H2Stream) -> None:
    """A gRPC server's answer: the request's message back (or 1 MB), then grpc-status 0."""
    body = b""
    while chunk := await stream.read():
        body += chunk
    await stream.respond([(b":status", b"200"), (b"content-type", b"application/grpc")])
    if stream.header(b":path") == b"/demo.Echo/Big":  # one message of 1 MB
        body = b"\x00" + (1_000_000).to_bytes(4, "big") + bytes(1_000_000)
    await stream.send(body)
    await stream.end([(b"grpc-status", b"0")])


@pytest.mark.parametrize("served", [grpc_echo], indirect=True)
async def test_a_grpc_clients_ordinary_traffic_reaches_no_limit(served: Served) -> None:
    """grpcio (its window updates, BDP pings, resets of finished calls) on one channel:
    300 unary calls and large messages both ways break none of the budgets."""
    import grpc

    def run() -> tuple[int, int]:
        with grpc.insecure_channel(f"127.0.0.1:{served.port}") as channel:
            echo_call = channel.unary_unary("/demo.Echo/Say")
            big_call = channel.unary_unary("/demo.Echo/Big")
            small = sum(len(echo_call(b"hello", timeout=5)) for _ in range(300))
            large = sum(len(big_call(b"x" * 100_000, timeout=10)) for _ in range(5))
        return small, large

    assert await asyncio.to_thread(run) == (1500, 5 * 1_000_000)
    assert served.hits == []


@pytest.mark.parametrize("served", [early], indirect=True)
async def test_data_in_flight_after_the_servers_own_reset_is_no_reset_flood(
    served: Served,
) -> None:
    """100 uploads answered (403) and reset (NO_ERROR) before their bodies: the DATA the
    client had in flight meanwhile gets an RST_STREAM each from h2, which the client did
    not provoke. Only frames on streams the client itself reset count."""

    def run() -> bool:
        client = H2Client(dial(served.port))
        ids = [client.send(request_headers("/", "POST"), end=False) for _ in range(100)]
        assert {client.wait(i).status for i in ids} == {403}
        client.drain(0.2)  # and the RST_STREAMs after them
        # What the client had sent meanwhile, within its windows (raw: its h2 knows better).
        late = (DataFrame(i, bytes(2048)) for i in ids for _ in range(4))
        client.sock.sendall(b"".join(frame.serialize() for frame in late))
        client.drain(0.3)
        client.close()
        return client.goaway is None

    assert await asyncio.to_thread(run)
    assert served.hits == []


async def test_a_response_leaves_in_one_write_with_credentials_never_indexed() -> None:
    # Head, body and trailers in one write (one TLS record, one syscall), not one each;
    # and a server that leaves heads unchecked by h2 (checked_heads) still keeps
    # credentials out of the HPACK table its responses share.
    async def answer(stream: H2Stream) -> None:
        await stream.respond([(b":status", b"200"), (b"authorization", b"Basic eA==")])
        await stream.send(b"hello")
        await stream.end([(b"grpc-status", b"0")])

    wire = Wire()
    server = H2Server(answer, lambda _: None, idle_timeout=30, checked_heads=True)
    server.connection_made(wire)
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    client.receive_data(wire.taken())
    client.send_headers(1, request_headers("/"), end_stream=True)
    server.data_received(client.data_to_send())
    await turns(4)
    assert len(wire.writes) == 1
    events = client.receive_data(wire.taken())
    head = next(e for e in events if isinstance(e, h2.events.ResponseReceived))
    kinds = {field[0]: type(field) for field in head.headers or []}
    assert kinds[b"authorization"] is NeverIndexedHeaderTuple
    assert any(isinstance(e, h2.events.StreamEnded) for e in events)
    server.abort()


async def test_read_now_takes_what_came_without_waiting_and_credits_as_read_does() -> None:
    """Through a real server: the client's window reopens by what the handler took, one
    chunk behind (as `read` credits), and never for what it has not taken yet."""
    streams: list[H2Stream] = []
    release = asyncio.Event()

    async def hold(stream: H2Stream) -> None:
        streams.append(stream)
        await release.wait()

    wire = Wire()
    server = H2Server(hold, lambda _: None, idle_timeout=30, limits=H2Limits(stream_window=8))
    server.connection_made(wire)
    client = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    client.initiate_connection()
    client.receive_data(wire.taken())  # the server's SETTINGS: an 8-byte stream window
    client.send_headers(1, request_headers("/", "POST"))
    server.data_received(client.data_to_send())
    await turns(2)
    (stream,) = streams
    assert stream.read_now() is None  # nothing yet: a caller would wait

    def window() -> int:
        client.receive_data(wire.taken())
        return client.local_flow_control_window(1)

    client.send_data(1, b"abcd")
    client.send_data(1, b"efgh")
    server.data_received(client.data_to_send())
    await turns(2)
    assert window() == 0
    assert stream.read_now() == b"abcd"
    await turns(2)
    assert window() == 0  # taken, not yet credited
    assert stream.read_now() == b"efgh"
    await turns(2)
    assert window() == 4  # the chunk before, credited
    client.end_stream(1)
    server.data_received(client.data_to_send())
    await turns(2)
    assert stream.read_now() == b""
    await turns(2)
    assert window() == 8
    stream._gone(ErrorCodes.CANCEL)
    with pytest.raises(StreamReset):
        stream.read_now()
    release.set()
    server.abort()


MALFORMED: dict[str, tuple[list[tuple[bytes, bytes]], bytes]] = {
    "host_differs_from_authority": ([*request_headers("/"), (b"host", b"other")], b""),
    "uppercase_name": ([*request_headers("/"), (b"X-Upper", b"1")], b""),
    "te_not_trailers": ([*request_headers("/"), (b"te", b"gzip")], b""),
    "content_length_disagrees": (
        [*request_headers("/", "POST"), (b"content-length", b"10")],
        b"abc",
    ),
    # h2 holds the DATA to the length only when a DATA frame ends the stream; an HTTP/1.1
    # app would read the next request as the rest of the body.
    "content_length_without_a_body": (
        [*request_headers("/", "POST"), (b"content-length", b"10")],
        b"",
    ),
    "content_length_disagrees_at_trailers": (
        [*request_headers("/", "POST"), (b"content-length", b"10")],
        b"abc",
    ),
    "duplicate_pseudo_header": ([*request_headers("/"), (b":path", b"/again")], b""),
    "late_pseudo_header": (
        [*request_headers("/")[:3], (b"x-early", b"1"), request_headers("/")[3]],
        b"",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
async def test_a_malformed_request_resets_its_stream_and_the_connection_goes_on(
    served: Served, case: str
) -> None:
    """RFC 9113 8.1.1: a malformed request is a stream error (RST_STREAM PROTOCOL_ERROR),
    not a connection error: the client's other streams are answered."""
    headers, body = MALFORMED[case]

    def run() -> tuple[int | None, int, bool]:
        client = H2Client(dial(served.port))
        client.conn.config.validate_outbound_headers = False  # sent as a faulty client would
        client.conn.config.normalize_outbound_headers = False
        before = client.send(request_headers("/before"), end=False)
        trailers = [(b"x-sum", b"1")] if case.endswith("_at_trailers") else None
        bad = client.send(headers, body, trailers=trailers)
        after = client.wait(client.send(request_headers("/after")))
        client.send_body(before, b"/before", end=True)
        first = client.wait(before)
        reset = client.wait(bad).reset
        ok = after.ended and after.body == b"/after" and first.ended and first.reset is None
        goaway = client.goaway is not None or client.closed
        client.close()
        return reset, int(ok), goaway

    assert await asyncio.to_thread(run) == (ErrorCodes.PROTOCOL_ERROR, 1, False)
    assert served.hits == ["protocol_error"]


async def test_a_flood_of_malformed_requests_still_ends_the_connection() -> None:
    """Each malformed request's reset is one the peer provoked: past the reset budget, the
    connection ends (GOAWAY ENHANCE_YOUR_CALM), as for any other reset flood."""
    async with listening(H2Limits(max_provoked_resets=20), echo) as served:

        def run() -> bool:
            client = H2Client(dial(served.port))
            client.conn.config.validate_outbound_headers = False
            client.conn.config.normalize_outbound_headers = False
            with contextlib.suppress(OSError):  # the server may have closed already
                for _ in range(25):
                    client.send([*request_headers("/"), (b"te", b"gzip")])
            client.drain(3)
            closed = client.closed
            client.close()
            return closed

        assert await asyncio.to_thread(run)
        assert served.hits[-1] == "reset_flood"
