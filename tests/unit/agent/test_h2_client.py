"""The h2 client: requests and responses with flow control both ways, GOAWAY and refused
streams as retryable failures, and a pool that multiplexes up to the peer's stream limit and
retires connections of an earlier SVID (against an in-process h2c server on loopback)."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable

import h2.config
import h2.connection
import h2.events
import h2.settings
from h2.errors import ErrorCodes
from hpack import NeverIndexedHeaderTuple
from hpack.table import table_entry_size

from agent.adapters.h2client import (
    Data,
    End,
    H2ClientConnection,
    H2Pool,
    H2Stream,
    Reset,
    Response,
    Trailers,
    connect,
)
from agent.core.upstream import Endpoint
from tests.h2backend import Answer, GoAway, Request, grpc_error, h2_backend
from tests.h2backend import Reset as BackendReset
from tests.h2raw import Wire, turns
from tests.mesh import eventually


def _head(path: str = "/", grpc: bool = False) -> list[tuple[bytes, bytes]]:
    head = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"app")]
    head.append((b":path", path.encode()))
    if grpc:
        head += [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
    return head


async def _read(stream: H2Stream) -> tuple[list[object], bytes]:
    """Every event to the end, the body credited back as read."""
    events: list[object] = []
    body = b""
    async with asyncio.timeout(5):
        async for event in stream:
            if isinstance(event, Data):
                body += event.data
                stream.consumed(event.flow)
            else:
                events.append(event)
    return events, body


async def test_a_grpc_call_gets_its_head_body_and_trailers() -> None:
    async with h2_backend("a") as backend:
        connection = await connect("127.0.0.1", backend.port)
        stream = connection.open(_head("/demo.Greeter/SayHello", grpc=True))
        await stream.send(b"\0\0\0\0\x05hello", end=True)
        events, body = await _read(stream)
        connection.close()
    response = events[0]
    assert isinstance(response, Response) and response.status == 200
    assert (b"x-backend", b"a") in response.headers
    assert body == b"\0\0\0\0\x05hello"
    assert events[1:] == [Trailers([(b"grpc-status", b"0")]), End()]
    assert backend.requests[0].header(b":path") == b"/demo.Greeter/SayHello"


async def test_bodies_larger_than_every_window_go_both_ways() -> None:
    # 3 MiB each way: past the default 64 KiB windows and our 1 MiB connection window,
    # so both sides must wait for WINDOW_UPDATEs.
    async with h2_backend("a") as backend:
        connection = await connect("127.0.0.1", backend.port)
        stream = connection.open(_head(grpc=True))
        payload = bytes(range(256)) * (12 * 1024)
        await stream.send(payload, end=True)
        _, body = await _read(stream)
        connection.close()
    assert body == payload
    assert backend.requests[0].body == payload


async def test_an_unread_response_holds_no_more_than_the_stream_window() -> None:
    async def big(request: Request) -> Answer:
        return Answer([(b":status", b"200")], b"x" * (4 * 1024 * 1024))

    async with h2_backend("a", reply=big) as backend:
        connection = await connect("127.0.0.1", backend.port)
        stream = connection.open(_head(), end=True)
        assert isinstance(await stream.event(), Response)
        for _ in range(50):  # let the server send what the windows allow
            await asyncio.sleep(0.005)
        held = stream.unacked
        stream.release()  # reset: its unread data is credited back to the connection
        connection.close()
    assert 0 < held <= 256 * 1024


async def test_a_trailers_only_grpc_error_is_one_head_with_end() -> None:
    async def unavailable(request: Request) -> Answer:
        return grpc_error(14, "no backend")

    async with h2_backend("a", reply=unavailable) as backend:
        connection = await connect("127.0.0.1", backend.port)
        stream = connection.open(_head(grpc=True))
        await stream.send(b"\0\0\0\0\0", end=True)
        events, _ = await _read(stream)
        connection.close()
    response = events[0]
    assert isinstance(response, Response) and response.end
    assert (b"grpc-status", b"14") in response.headers
    assert events[1:] == [End()]


async def test_refused_stream_and_streams_above_goaway_fail_as_refused() -> None:
    async def refuse(request: Request) -> BackendReset | GoAway:
        if request.header(b":path") == b"/refuse":
            return BackendReset(ErrorCodes.REFUSED_STREAM)
        if request.header(b":path") == b"/goaway":
            return GoAway()
        return BackendReset(ErrorCodes.INTERNAL_ERROR)

    async with h2_backend("a", reply=refuse) as backend:
        connection = await connect("127.0.0.1", backend.port)
        outcomes = []
        for path in ("/refuse", "/reset", "/goaway"):
            stream = connection.open(_head(path), end=True)
            events, _ = await _read(stream)
            outcomes.append(events[-1])
        assert not connection.available()  # a GOAWAY: no new stream
        assert await eventually(lambda: connection.closed)
    assert outcomes == [
        Reset("refused-stream", ErrorCodes.REFUSED_STREAM),  # at capacity: not stale
        Reset("reset", ErrorCodes.INTERNAL_ERROR),
        Reset("refused-stream", ErrorCodes.REFUSED_STREAM, stale=True),  # its connection's end
    ]


async def test_a_graceful_goaway_lets_the_streams_below_it_finish() -> None:
    release = asyncio.Event()

    async def slow(request: Request) -> Answer | GoAway:
        if request.header(b":path") == b"/goaway":
            return GoAway()
        await release.wait()
        return Answer([(b":status", b"200")], b"done")

    async with h2_backend("a", reply=slow) as backend:
        connection = await connect("127.0.0.1", backend.port)
        first = connection.open(_head("/slow"), end=True)
        assert await eventually(lambda: len(backend.requests) == 1)
        second = connection.open(_head("/goaway"), end=True)  # GOAWAY, last-stream-id = 1
        events, _ = await _read(second)
        assert events == [Reset("refused-stream", ErrorCodes.REFUSED_STREAM, stale=True)]
        release.set()
        events, body = await _read(first)
        assert await eventually(lambda: connection.closed)
    assert body == b"done" and events[-1] == End()


async def test_an_error_goaway_ends_every_stream_refusing_those_above_its_last_id() -> None:
    gate = asyncio.Event()

    async def held(request: Request) -> Answer | GoAway:
        if request.header(b":path") == b"/goaway":
            return GoAway(ErrorCodes.INTERNAL_ERROR)
        await gate.wait()
        return Answer([(b":status", b"200")], b"late")

    async with h2_backend("a", reply=held) as backend:
        connection = await connect("127.0.0.1", backend.port)
        first = connection.open(_head("/slow"), end=True)
        assert await eventually(lambda: len(backend.requests) == 1)
        second = connection.open(_head("/goaway"), end=True)
        events = [(await _read(stream))[0][-1] for stream in (first, second)]
        gate.set()
    assert events == [
        Reset("reset", ErrorCodes.INTERNAL_ERROR),  # it was being processed: lost
        Reset("refused-stream", ErrorCodes.REFUSED_STREAM, stale=True),  # above the last id
    ]
    assert not connection.available()


async def test_a_lost_connection_resets_its_streams() -> None:
    async def never(request: Request) -> Answer:
        await asyncio.Event().wait()
        raise AssertionError

    async with h2_backend("a", reply=never) as backend:
        connection = await connect("127.0.0.1", backend.port)
        stream = connection.open(_head(), end=True)
        assert await eventually(lambda: len(backend.requests) == 1)
        backend.kill()
        event = await asyncio.wait_for(stream.event(), 2)
    assert isinstance(event, Reset) and event.failure == "reset"


async def test_a_stream_lost_with_its_connection_unheard_since_it_opened_is_stale() -> None:
    async def head_then_hang(request: Request) -> Answer:
        if request.header(b":path") == b"/talk":
            return Answer([(b":status", b"200")], b"")
        await asyncio.Event().wait()
        raise AssertionError

    async with h2_backend("a", reply=head_then_hang) as backend:
        connection = await connect("127.0.0.1", backend.port)
        quiet = connection.open(_head("/hang"), end=True)
        assert await eventually(lambda: len(backend.requests) == 1)
        talked = connection.open(_head("/talk"), end=True)
        events, _ = await _read(talked)  # the peer answered this one: it was alive then
        assert events[-1] == End()
        late = connection.open(_head("/hang"), end=True)  # opened after the last word
        assert await eventually(lambda: len(backend.requests) == 3)
        backend.kill()
        lost = [await asyncio.wait_for(s.event(), 2) for s in (quiet, late)]
    assert lost == [
        Reset("reset", ErrorCodes.CANCEL),
        Reset("reset", ErrorCodes.CANCEL, stale=True),
    ]


async def test_the_pool_multiplexes_up_to_the_peers_limit_then_dials_once_more() -> None:
    gate = asyncio.Event()

    async def held(request: Request) -> Answer:
        await gate.wait()
        return Answer([(b":status", b"200")], b"ok")

    async with h2_backend("a", reply=held, max_streams=3) as backend:
        pool = H2Pool(idle_timeout=60)
        endpoint = Endpoint("127.0.0.1", backend.port)
        dials = 0

        async def dial() -> H2ClientConnection:
            nonlocal dials
            dials += 1
            return await connect(
                "127.0.0.1", backend.port, factory=lambda: H2ClientConnection(endpoint, None)
            )

        async def request() -> bytes:
            connection, _ = await pool.connection(endpoint, None, dial)
            stream = connection.open(_head(), end=True)
            try:
                return (await _read(stream))[1]
            finally:
                stream.release()

        calls = [asyncio.create_task(request()) for _ in range(5)]
        assert await eventually(lambda: len(backend.requests) == 5)
        gate.set()
        bodies = await asyncio.gather(*calls)
        assert dials == 2 and backend.connections == 2  # 3 streams on one, 2 on the other
        assert sorted(r.connection for r in backend.requests) == [0, 0, 0, 1, 1]
        await request()  # reused
        assert dials == 2
        pool.close()
    assert bodies == [b"ok"] * 5


async def test_a_rotation_retires_pooled_connections_once_their_streams_end() -> None:
    gate = asyncio.Event()

    async def held(request: Request) -> Answer:
        await gate.wait()
        return Answer([(b":status", b"200")], b"ok")

    old, new = ssl.create_default_context(), ssl.create_default_context()  # stand-ins
    async with h2_backend("a", reply=held) as backend:
        pool = H2Pool(idle_timeout=60)
        endpoint = Endpoint("127.0.0.1", backend.port)

        def dial(context: ssl.SSLContext) -> Callable[[], Awaitable[H2ClientConnection]]:
            return lambda: connect(
                "127.0.0.1", backend.port, factory=lambda: H2ClientConnection(endpoint, context)
            )

        first, _ = await pool.connection(endpoint, old, dial(old))
        stream = first.open(_head(), end=True)
        assert await eventually(lambda: len(backend.requests) == 1)
        pool.retire(new)
        assert not first.available() and not first.closed  # its stream is still going
        second, dialled = await pool.connection(endpoint, new, dial(new))
        assert dialled and second is not first
        gate.set()
        _, body = await _read(stream)
        assert await eventually(lambda: first.closed)
        assert body == b"ok" and not second.closed
        pool.close()


async def test_idle_pooled_connections_are_closed_after_the_idle_timeout() -> None:
    async with h2_backend("a") as backend:
        pool = H2Pool(idle_timeout=0.05)
        endpoint = Endpoint("127.0.0.1", backend.port)
        connection, _ = await pool.connection(
            endpoint,
            None,
            lambda: connect(
                "127.0.0.1", backend.port, factory=lambda: H2ClientConnection(endpoint, None)
            ),
        )
        stream = connection.open(_head(), end=True)
        await _read(stream)
        assert await eventually(lambda: connection.closed)
        assert len(pool) == 0


async def test_a_failed_dial_fails_every_request_waiting_for_it() -> None:
    pool = H2Pool(idle_timeout=60)
    endpoint = Endpoint("127.0.0.1", 9)
    started = asyncio.Event()
    dials = 0

    async def dial() -> H2ClientConnection:
        nonlocal dials
        dials += 1
        started.set()
        await asyncio.sleep(0.01)
        raise ConnectionRefusedError("no")

    results = await asyncio.gather(
        *(pool.connection(endpoint, None, dial) for _ in range(3)), return_exceptions=True
    )
    assert dials == 1
    assert all(isinstance(r, ConnectionRefusedError) for r in results)


def _server() -> h2.connection.H2Connection:
    server = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=False, header_encoding=None)
    )
    server.initiate_connection()
    return server


async def test_a_calls_head_body_and_end_leave_in_one_write() -> None:
    # One write (one TLS record, one syscall) per call, not one per frame; calls made in
    # one turn of the loop share it; a body the windows cannot take now waits, unsent.
    wire, peer = Wire(), _server()
    connection = H2ClientConnection()
    connection.connection_made(wire)
    peer.receive_data(wire.taken())
    connection.data_received(peer.data_to_send())  # its SETTINGS
    await turns(2)
    peer.receive_data(wire.taken())
    for _ in range(3):
        stream = connection.open(_head(grpc=True))
        assert stream.send_now(b"\0\0\0\0\x05hello")
        stream.end([(b"grpc-trailer", b"1")])
    assert not connection.open(_head()).send_now(b"x" * 70_000)  # more than a frame and the window
    await turns(2)
    assert len(wire.writes) == 1
    events = peer.receive_data(wire.taken())
    assert sum(isinstance(e, h2.events.StreamEnded) for e in events) == 3
    assert not any(isinstance(e, h2.events.DataReceived) and e.stream_id == 7 for e in events)


async def test_credentials_stay_never_indexed_when_h2_does_not_check_the_heads() -> None:
    # checked_heads skips h2's outbound checks and normalization, not its HPACK rule: an
    # Authorization value never enters the compression context that requests share.
    wire = Wire()
    connection = H2ClientConnection(checked_heads=True)
    connection.connection_made(wire)
    connection.open([*_head(), (b"authorization", b"Bearer abc"), (b"cookie", b"id=1")])
    await turns(2)
    events = _server().receive_data(b"".join(wire.writes))
    request = next(e for e in events if isinstance(e, h2.events.RequestReceived))
    kinds = {field[0]: type(field) for field in request.headers or []}
    assert kinds[b"authorization"] is NeverIndexedHeaderTuple
    assert kinds[b"cookie"] is NeverIndexedHeaderTuple  # a short one: guessable
    assert kinds[b":path"] is not NeverIndexedHeaderTuple


async def test_a_peer_cannot_grow_the_table_requests_are_compressed_with() -> None:
    # A peer allowing a 2 GB HPACK table (SETTINGS_HEADER_TABLE_SIZE): h2 would keep every
    # header sent on the connection in it; the client keeps 4 KiB, as H2Server does.
    wire, peer = Wire(), _server()
    connection = H2ClientConnection()
    connection.connection_made(wire)
    peer.receive_data(wire.taken())
    peer.update_settings({h2.settings.SettingCodes.HEADER_TABLE_SIZE: 2**31})
    connection.data_received(peer.data_to_send())
    for n in range(90):
        connection.open([*_head(f"/{n:05}"), (b"x-id", b"%d" % n * 40)], end=True)
    await turns(3)
    peer.receive_data(wire.taken())  # the peer decodes them all: the table was signalled
    table = connection.h2.encoder.header_table
    held = sum(table_entry_size(name, value) for name, value in table.dynamic_entries)
    assert table.maxsize <= 4096 and held <= 4096, held


async def test_a_long_lived_connection_remembers_a_bounded_number_of_closed_streams() -> None:
    # h2 keeps 65,536 closed streams by default (about 11 MB a pooled connection that
    # carried that many); the client keeps `closed_streams`.
    async with h2_backend("a") as backend:
        connection = await connect(
            "127.0.0.1", backend.port, factory=lambda: H2ClientConnection(closed_streams=50)
        )
        for _ in range(4):
            streams = [connection.open(_head(), end=True) for _ in range(50)]
            answers = [await _read(stream) for stream in streams]
            assert all(isinstance(events[-1], End) for events, _ in answers)
        assert len(connection.h2._closed_streams) <= 50
        connection.close()


async def test_a_malformed_response_resets_its_stream_and_the_connection_goes_on() -> None:
    """RFC 9113 8.1.1: a malformed response (here an uppercase field name, and a body
    longer than its content-length) is a stream error: that stream is reset
    PROTOCOL_ERROR, and the connection's other streams go on."""
    backend_box: list[object] = []

    async def reply(request: Request) -> Answer:
        for server in backend_box[0].open:  # type: ignore[attr-defined]
            server.h2.config.validate_outbound_headers = False  # answers as a faulty app would
            server.h2.config.normalize_outbound_headers = False
        path = request.header(b":path")
        if path == b"/upper":
            return Answer([(b":status", b"200"), (b"X-Upper", b"1")], b"")
        if path == b"/long":
            return Answer([(b":status", b"200"), (b"content-length", b"2")], b"longer")
        return Answer([(b":status", b"200")], b"fine")

    async with h2_backend("a", reply) as backend:
        backend_box.append(backend)
        connection = await connect("127.0.0.1", backend.port)
        results = []
        for path in ("/upper", "/long", "/ok"):
            stream = connection.open(_head(path), end=True)
            results.append(await _read(stream))
        connection.close()
    (upper, _), (long, _), (ok, body) = results
    assert upper == [Reset("reset", ErrorCodes.PROTOCOL_ERROR)]
    assert long[-1] == Reset("reset", ErrorCodes.PROTOCOL_ERROR)
    assert isinstance(ok[0], Response) and body == b"fine" and ok[-1] == End()
    assert backend.connections == 1


async def test_a_connection_dialled_across_retire_all_carries_its_stream_only() -> None:
    # A reload changed the upstream's server IDs while this dial was in its handshake:
    # the connection was verified against the IDs of before, so no later stream may take it.
    async with h2_backend("a") as backend:
        pool = H2Pool(idle_timeout=60)
        endpoint = Endpoint("127.0.0.1", backend.port)
        handshaking, go_on = asyncio.Event(), asyncio.Event()

        async def dial() -> H2ClientConnection:
            handshaking.set()
            await go_on.wait()
            return await connect(
                "127.0.0.1", backend.port, factory=lambda: H2ClientConnection(endpoint, None)
            )

        async def request() -> tuple[H2ClientConnection, bool, list[object]]:
            connection, fresh = await pool.connection(endpoint, None, dial)
            stream = connection.open(_head(), end=True)  # before the next await, as callers do
            events, _ = await _read(stream)
            return connection, fresh, events

        dialled = asyncio.create_task(request())
        await handshaking.wait()
        pool.retire_all()
        go_on.set()
        connection, fresh, events = await dialled
        assert fresh and events[-1] == End()
        assert len(pool) == 0 and pool.take(endpoint, None) is None
        assert await eventually(lambda: connection.closed)
        pool.close()
