"""The known HTTP/2 attacks against a real agent process's `protocol: http2` port.

Each attack is sent as written by a raw client (tests/h2raw.py: frames built
with hyperframe, HPACK with hpack), from a peer with a valid SVID, the worst
case: authentication is no defence here. While it runs, a well-behaved client
on another connection keeps asking; afterwards the agent is up, its resident
memory under 100 MB, and the limit counted in outrider_http2_limits_total.

The 2019 set (CVE-2019-9511..9518) and its successors: frames that cost work
but carry nothing (empty DATA, empty CONTINUATION, WINDOW_UPDATE, PRIORITY),
the RST_STREAMs a client makes the agent send while it does not read, empty
header names and values, and clients that never read or never open their
windows while the app streams to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from h2.errors import ErrorCodes
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    ExtensionFrame,
    Frame,
    HeadersFrame,
    PingFrame,
    PriorityFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)

from agent.adapters.h2server import H2Stream
from tests.floods import rss_kib
from tests.h2raw import (
    H2Client,
    RawFrames,
    h2_connect,
    request_headers,
    threaded_h2_app,
    tls_socket,
)
from tests.mesh import AgentProcess, agent_process, inbound, served_agent_yaml
from tests.support import CaProcess, CaSetup

RSS_LIMIT_KIB = 100 * 1024
BIG = 8 * 1024 * 1024  # what /big answers: far beyond any window a client opens


@dataclass
class App:
    port: int
    at_work: int = 0  # streams in its handler now
    most_at_work: int = 0
    sent: int = 0  # body bytes of /big the agent took from it
    loop: asyncio.AbstractEventLoop | None = None
    release: asyncio.Event | None = None
    rss: dict[str, int] = field(default_factory=dict)  # the agent's RSS after each attack

    def let_go(self) -> None:
        """Answer the /slow streams held, from the test's thread."""
        if self.loop is not None and self.release is not None:
            self.loop.call_soon_threadsafe(self.release.set)


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    state = App(0)

    async def answer(stream: H2Stream) -> None:
        state.at_work += 1
        state.most_at_work = max(state.most_at_work, state.at_work)
        try:
            path = stream.header(b":path")
            while await stream.read():
                pass
            if path == b"/slow":  # holds the stream until the test lets it go
                if state.release is None:
                    state.loop, state.release = asyncio.get_running_loop(), asyncio.Event()
                await state.release.wait()
            await stream.respond([(b":status", b"200")])
            if path == b"/big":
                for _ in range(BIG // 65536):
                    await stream.send(bytes(65536))
                    state.sent += 65536
            else:
                await stream.send(b"ok")
            await stream.end()
        finally:
            state.at_work -= 1

    with threaded_h2_app(answer) as port:
        state.port = port
        yield state


@pytest.fixture(scope="module")
def agent(setup: CaSetup, ca: CaProcess, app: App) -> Iterator[AgentProcess]:
    raw = served_agent_yaml(setup, ca, "backend", inbound=inbound(app.port, protocol="http2"))
    with agent_process(setup.root, "h2-attacked", raw) as process:
        yield process
    print("agent RSS (KiB) after each attack:", app.rss)


@contextmanager
def bystander(setup: CaSetup, agent: AgentProcess) -> Iterator[list[int]]:
    """A well-behaved client asking on its own connection while the block runs: the
    statuses it got (a connection it lost, or a request unanswered in 5 s, fails it)."""
    statuses: list[int] = []
    failures: list[BaseException] = []
    stop = threading.Event()
    client = h2_connect(setup, agent)

    def ask() -> None:
        try:
            while not stop.is_set():
                statuses.append(client.get("/", seconds=5).status)
        except BaseException as exc:  # reported below, in the test's thread
            failures.append(exc)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    try:
        yield statuses
    finally:
        stop.set()
        thread.join(10)
        client.close()
    assert not failures, failures
    assert statuses and set(statuses) == {200}


def limit_count(agent: AgentProcess, limit: str) -> float:
    return agent.total("outrider_http2_limits_total", direction="inbound", limit=limit)


def still_serving(agent: AgentProcess, app: App, attack: str) -> None:
    assert agent.process.poll() is None
    rss = rss_kib(agent.process.pid)
    app.rss[attack] = rss
    assert rss < RSS_LIMIT_KIB, f"{attack}: RSS {rss} KiB"


def attacker(setup: CaSetup, agent: AgentProcess) -> RawFrames:
    return RawFrames(tls_socket(setup, agent))


def test_rapid_reset(setup: CaSetup, agent: AgentProcess, app: App) -> None:
    before = limit_count(agent, "rapid_reset")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        frames: list[Frame] = []
        for i in range(2000):  # CVE-2023-44487: open, cancel, repeat
            stream_id = 2 * i + 1
            frames.append(
                HeadersFrame(
                    stream_id, raw.block(request_headers("/")), flags={"END_HEADERS", "END_STREAM"}
                )
            )
            frames.append(RstStreamFrame(stream_id, error_code=ErrorCodes.CANCEL))
        with contextlib.suppress(OSError):  # closed mid-flood
            for start in range(0, len(frames), 200):
                raw.send(frames[start : start + 200])
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "rapid_reset") == before + 1
    still_serving(agent, app, "rapid_reset")


def test_continuation_flood(setup: CaSetup, agent: AgentProcess, app: App) -> None:
    before = limit_count(agent, "continuation")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        raw.send([HeadersFrame(1, raw.block(request_headers("/")))])  # no END_HEADERS
        filler = raw.block([(b"x-filler", b"a" * 8000)], huffman=False)
        with contextlib.suppress(OSError):  # CVE-2024-27919: a header block that never ends
            raw.send(ContinuationFrame(1, filler) for _ in range(200))
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "continuation") == before + 1
    still_serving(agent, app, "continuation")


def test_hpack_bomb(setup: CaSetup, agent: AgentProcess, app: App) -> None:
    """4 KB in the dynamic table, then referenced 4,000 times: a few KB on the wire, 16 MB
    decoded. The decoded list is bounded (64 KiB), not the encoded size."""
    before = limit_count(agent, "header_list")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        block = raw.block([*request_headers("/"), *[(b"x-bomb", b"b" * 4000)] * 4000])
        assert len(block) < 16_384  # one frame
        raw.send([HeadersFrame(1, block, flags={"END_HEADERS", "END_STREAM"})])
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "header_list") == before + 1
    still_serving(agent, app, "hpack_bomb")


def test_max_concurrent_streams(setup: CaSetup, agent: AgentProcess, app: App) -> None:
    """100 streams held at the app, then 200 more, past the 100 the agent advertised: the
    connection ends (GOAWAY), counted, and the app never had more than 100 of them at work."""
    before = limit_count(agent, "concurrent_streams")
    app.most_at_work = 0
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        flags = {"END_HEADERS", "END_STREAM"}
        slow = [
            HeadersFrame(2 * i + 1, raw.block(request_headers("/slow")), flags=flags)
            for i in range(300)
        ]
        raw.send(slow[:100])
        deadline = time.monotonic() + 5
        while app.at_work < 100 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert app.at_work >= 100
        with contextlib.suppress(OSError):
            raw.send(slow[100:])
        assert raw.closed_within(3)
        raw.close()
        app.let_go()
    assert app.most_at_work <= 101  # with the bystander's
    assert limit_count(agent, "concurrent_streams") == before + 1
    still_serving(agent, app, "concurrent_streams")


def test_a_client_that_never_opens_its_window(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    """20 streams of 8 MB answers to a client that advertised no window: the agent takes from
    the app only what it may send on, so nothing piles up in it."""
    with bystander(setup, agent):
        stalled = H2Client(tls_socket(setup, agent), window=0)
        app.sent = 0
        ids = [stalled.send(request_headers("/big")) for _ in range(20)]
        stalled.drain(2)
        assert all(stalled.responses[i].body == b"" for i in ids)
        still_serving(agent, app, "zero_window")
        stalled.close()
    # What the agent read from the app: its h2c windows to the app (256 KiB a stream,
    # 1 MiB the connection), not the 160 MB asked for.
    assert app.sent <= 2 * 1024 * 1024


def test_a_client_that_overruns_the_window_it_was_given(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    before = limit_count(agent, "flow_control")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        raw.send([HeadersFrame(1, raw.block(request_headers("/", "POST")), flags={"END_HEADERS"})])
        raw.send(DataFrame(1, bytes(16_384)) for _ in range(70))  # 1.1 MB > 64 KiB window
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "flow_control") == before + 1
    still_serving(agent, app, "flow_control")


@pytest.mark.parametrize("frame", ["settings", "ping"])
def test_settings_and_ping_floods(
    setup: CaSetup, agent: AgentProcess, app: App, frame: str
) -> None:
    limit = f"{frame}_flood"
    before = limit_count(agent, limit)
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        flood = (
            SettingsFrame(0, settings={0x3: 100})
            if frame == "settings"
            else PingFrame(0, b"12345678")
        )
        with contextlib.suppress(OSError):  # closed mid-flood
            for _ in range(10):
                raw.send([flood] * 500)
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, limit) == before + 1
    still_serving(agent, app, limit)


def flood(raw: RawFrames, frames: list[Frame], batch: int = 500) -> None:
    """Send `frames` in batches, reading nothing; the agent may close mid-flood."""
    with contextlib.suppress(OSError):
        for start in range(0, len(frames), batch):
            raw.send(frames[start : start + batch])


def settled(app: App, seconds: float = 5) -> bool:
    """The app's handlers have all ended (the agent let go of every stream it opened)."""
    deadline = time.monotonic() + seconds
    while app.at_work and time.monotonic() < deadline:
        time.sleep(0.02)
    return app.at_work == 0


@pytest.mark.parametrize("padding", [False, True], ids=["empty", "padding_only"])
def test_empty_data_frames_flood(
    setup: CaSetup, agent: AgentProcess, app: App, padding: bool
) -> None:
    """CVE-2019-9518: endless DATA frames with nothing in them (or padding only) on a
    request that never ends. h2 takes each without a word; the agent counts them."""
    before = limit_count(agent, "empty_frames")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        post = request_headers("/", "POST")
        raw.send([HeadersFrame(1, raw.block(post), flags={"END_HEADERS"})])
        empty = DataFrame(1, b"", flags={"PADDED"}, pad_length=16) if padding else DataFrame(1, b"")
        flood(raw, [empty] * 10_000)
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "empty_frames") == before + 1
    still_serving(agent, app, "empty_frames_padding" if padding else "empty_frames")


def test_empty_continuation_frames_flood(setup: CaSetup, agent: AgentProcess, app: App) -> None:
    """CVE-2019-9518's header half: a HEADERS frame, then empty CONTINUATIONs for ever.
    h2 holds up to 64 of them itself; the agent's bound (16) ends it first."""
    before = limit_count(agent, "continuation")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        raw.send([HeadersFrame(1, raw.block(request_headers("/")))])  # no END_HEADERS
        flood(raw, [ContinuationFrame(1, b"")] * 10_000)
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "continuation") == before + 1
    still_serving(agent, app, "empty_continuation")


INERT: dict[str, Frame] = {
    "rst_stream_for_no_stream": RstStreamFrame(1, error_code=8),
    "unknown_type": ExtensionFrame(0x20, 0),
    "settings_ack": SettingsFrame(0, flags={"ACK"}),
    "ping_ack": PingFrame(0, b"12345678", flags={"ACK"}),
}


@pytest.mark.parametrize("kind", list(INERT))
def test_frames_that_do_nothing_flood(
    setup: CaSetup, agent: AgentProcess, app: App, kind: str
) -> None:
    """Frames h2 takes without a word or an event: an RST_STREAM for a stream no longer
    open, an unknown frame type, ACKs of PINGs and SETTINGS never sent. Each costs a
    parse and carries nothing: 100 per stream the client opened, plus 100."""
    before = limit_count(agent, "empty_frames")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        get = raw.block(request_headers("/"))
        raw.send([HeadersFrame(1, get, flags={"END_HEADERS"}), RstStreamFrame(1, error_code=8)])
        flood(raw, [INERT[kind]] * 10_000)
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "empty_frames") == before + 1
    still_serving(agent, app, kind)


def test_window_update_flood(setup: CaSetup, agent: AgentProcess, app: App) -> None:
    """WINDOW_UPDATEs that open the connection's window a byte at a time, with nothing
    asked: each wakes the connection's senders, and nothing pays for it."""
    before = limit_count(agent, "window_update_flood")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        flood(raw, [WindowUpdateFrame(0, window_increment=1)] * 10_000)
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "window_update_flood") == before + 1
    still_serving(agent, app, "window_update_flood")


def test_priority_flood(setup: CaSetup, agent: AgentProcess, app: App) -> None:
    """CVE-2019-9513's frames: PRIORITY on streams never opened, reshuffling a tree the
    agent does not keep (h2 4 keeps none either), 100 per stream opened at most."""
    before = limit_count(agent, "priority_flood")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        frames: list[Frame] = [
            PriorityFrame(2 * i + 3, depends_on=2 * i + 1, stream_weight=i % 256)
            for i in range(10_000)
        ]
        flood(raw, frames)
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "priority_flood") == before + 1
    still_serving(agent, app, "priority_flood")


def test_reset_flood_by_a_client_that_does_not_read(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    """CVE-2019-9514: a stream the client reset, then DATA on it for ever, reading
    nothing: h2 answers each frame with a RST_STREAM of its own, which would queue in
    the agent for a client that takes none. Past 200 such resets, GOAWAY."""
    before = limit_count(agent, "reset_flood")
    with bystander(setup, agent):
        raw = attacker(setup, agent)
        post = raw.block(request_headers("/", "POST"))
        raw.send([HeadersFrame(1, post, flags={"END_HEADERS"}), RstStreamFrame(1, error_code=8)])
        flood(raw, [DataFrame(1, b"x")] * 20_000)
        assert raw.closed_within(3)
        raw.close()
    assert limit_count(agent, "reset_flood") == before + 1
    still_serving(agent, app, "reset_flood")


def test_empty_header_names_and_values(setup: CaSetup, agent: AgentProcess, app: App) -> None:
    """CVE-2019-9516: header fields of zero length. An empty name makes its request
    malformed (RFC 9113 8.1.1: its stream is reset PROTOCOL_ERROR, the connection goes
    on); empty values are allowed, cost 32 bytes each in the decoded list like any field,
    past 100 fields a request is refused 431, and requests full of them on one
    connection leave nothing behind."""
    before = {limit: limit_count(agent, limit) for limit in ("protocol_error", "header_list")}
    with bystander(setup, agent):
        client = h2_connect(setup, agent)
        client.conn.config.validate_outbound_headers = False  # sent as an attacker would
        client.conn.config.normalize_outbound_headers = False
        empty_name = client.wait(client.send([*request_headers("/"), (b"", b"")]))
        assert empty_name.reset == ErrorCodes.PROTOCOL_ERROR and not client.closed
        empties = {f"x-empty-{i}": "" for i in range(99)}
        for start in range(0, 200, 50):
            ids = [client.send(request_headers("/", **empties)) for _ in range(50)]
            assert {client.wait(i).status for i in ids} == {200}, start
        assert client.get("/", **{f"x-empty-{i}": "" for i in range(150)}).status == 431
        client.close()
    assert limit_count(agent, "protocol_error") == before["protocol_error"] + 1
    assert limit_count(agent, "header_list") == before["header_list"] + 1
    still_serving(agent, app, "empty_headers")


def test_a_client_that_never_reads_what_the_app_streams(
    setup: CaSetup, agent: AgentProcess, app: App
) -> None:
    """CVE-2019-9517 (internal data buffering): 20 streams of 8 MB answers to a client
    that opens its windows wide and then reads nothing. The agent stops taking from the
    app as its socket fills (it reads from the app only as it sends on), so the app is
    held at what the windows and kernel buffers take, not the 160 MB asked for; once
    the client goes, every stream at the app ends."""
    with bystander(setup, agent):
        client = H2Client(tls_socket(setup, agent), window=2**31 - 1)
        client.conn.increment_flow_control_window(2**31 - 1 - 65_535)
        client._flush()
        app.sent = 0
        for _ in range(20):
            client.send(request_headers("/big"))
        deadline, last = time.monotonic() + 5, -1
        while app.sent != last and time.monotonic() < deadline:  # until it stops moving
            last = app.sent
            time.sleep(0.5)
        held = app.sent
        still_serving(agent, app, "never_reads")
        client.close()
    # The app's h2c windows to the agent (1 MiB), the agent's buffer (256 KiB) and
    # loopback's socket buffers: far from 160 MB.
    assert held <= 24 * 1024 * 1024, held
    assert settled(app)


def test_slow_readers_holding_many_streams(setup: CaSetup, agent: AgentProcess, app: App) -> None:
    """Five clients with 100 streams of 8 MB answers each, none opening a window (a
    slow-read / data-dribble client at its limit): each stream costs the agent its
    state and what the app's window to it holds, so 500 of them stay well under the
    bound; when they go, so does every stream at the app."""
    with bystander(setup, agent):
        stalled = [H2Client(tls_socket(setup, agent), window=0) for _ in range(5)]
        app.sent = 0
        for client in stalled:
            for _ in range(100):
                client.send(request_headers("/big"))
        deadline = time.monotonic() + 5
        while app.at_work < 500 and time.monotonic() < deadline:
            for client in stalled:
                client.pump(0.01)
        assert app.at_work >= 500
        for client in stalled:
            client.drain(0.2)
        assert all(r.body == b"" for client in stalled for r in client.responses.values())
        still_serving(agent, app, "slow_readers")
        for client in stalled:
            client.close()
    # The app's windows to the agent: 1 MiB an h2c connection to the app, and a client's
    # 100 streams take one or two of them (the pool dials another while one is full).
    assert app.sent <= 5 * 2 * 1024 * 1024, app.sent
    assert settled(app)
