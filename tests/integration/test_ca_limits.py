"""What an unauthenticated caller can make `ca serve` hold is bounded, and Sign goes on.

Real processes on loopback with small limits in ca.yaml, so each test takes a
second or two; the defaults are in ca/config.py and docs/operations.md.
"""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hyperframe.frame import PingFrame, SettingsFrame

from identity.proto import ca_pb2
from tests import floods
from tests.support import (
    WORKLOAD,
    CaProcess,
    CaSetup,
    ca_metric,
    ca_process,
    grpcio_channel,
    grpcio_sign,
    make_ca_setup,
    make_csr,
)

CLOSED = "outrider_ca_connections_closed_total"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
TIGHT = {"max_connections": 50, "handshake_timeout": "500ms", "idle_timeout": "500ms"}


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CaSetup, CaProcess]]:
    """A CA with small limits, started with a soft limit of 256 open files."""
    setup = make_ca_setup(tmp_path_factory.mktemp("ca"), limits=TIGHT)
    with ca_process(setup.config, fd_limit=256) as process:
        yield setup, process


async def sign(setup: CaSetup, ca: CaProcess, csr: bytes | None = None) -> ca_pb2.SignResponse:
    async with grpcio_channel(setup.bundle_pem, ca.grpc_port) as channel:
        request = ca_pb2.SignRequest(csr=csr if csr is not None else make_csr())
        token = setup.issuer.token("shop", "web")
        metadata = [("authorization", f"Bearer {token}")]
        response: ca_pb2.SignResponse = await grpcio_sign(channel)(
            request, metadata=metadata, timeout=5
        )
        return response


async def test_a_message_that_says_it_is_256_mb_is_refused_before_its_body_is_read(
    tight: tuple[CaSetup, CaProcess],
) -> None:
    setup, ca = tight
    peak = floods.peak_rss_kib(ca.process.pid)
    answer = floods.oversized_call(
        ca.grpc_port, floods.client_context("h2"), 256 * 2**20, send_at_most=8 * 2**20
    )
    assert answer.status == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert answer.message == "message of 268435456 bytes exceeds the server's limit of 16384 bytes"
    assert answer.sent <= 65_535, "the CA granted window for a body it will not take"
    assert floods.peak_rss_kib(ca.process.pid) - peak < 4096
    assert (await sign(setup, ca)).spiffe_id == WORKLOAD


async def test_a_grpc_client_is_told_the_limit(tight: tuple[CaSetup, CaProcess]) -> None:
    setup, ca = tight
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await sign(setup, ca, csr=bytes(2**20))
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "limit of 16384 bytes" in str(refused.value.details())


def test_calls_over_the_stream_limit_are_refused(tight: tuple[CaSetup, CaProcess]) -> None:
    _, ca = tight
    answer = floods.unfinished_calls(ca.grpc_port, floods.client_context("h2"), 6)
    assert answer.refused == [9, 11]  # the fifth and sixth: four streams per connection


def test_a_header_list_over_16_kib_ends_the_connection(tight: tuple[CaSetup, CaProcess]) -> None:
    _, ca = tight
    context = floods.client_context("h2")
    # Watched for less than the idle timeout, which would end the connection too.
    small = floods.unfinished_calls(ca.grpc_port, context, 1, header_bytes=8000, within=0.3)
    assert not small.closed
    large = floods.unfinished_calls(ca.grpc_port, context, 1, header_bytes=20000, within=0.3)
    assert large.closed


def test_a_header_block_that_never_ends_is_cut_at_16_kib(
    tight: tuple[CaSetup, CaProcess],
) -> None:
    context = floods.client_context("h2")
    assert floods.endless_header_block(tight[1].grpc_port, context, 2, within=0.3)


def test_connections_that_send_nothing_are_closed_and_counted(
    tight: tuple[CaSetup, CaProcess],
) -> None:
    _, ca = tight
    idle = ca_metric(ca, CLOSED, listener="grpc", reason="idle_timeout")
    slow = ca_metric(ca, CLOSED, listener="grpc", reason="handshake_timeout")
    tls = floods.client_context("h2")
    with (
        floods.idle_connections(ca.grpc_port, 5, tls=tls) as handshaken,
        floods.idle_connections(ca.grpc_port, 5) as plain,
    ):
        assert handshaken.closed_by_peer(within=5) == 5
        assert plain.closed_by_peer(within=5) == 5
    assert ca_metric(ca, CLOSED, listener="grpc", reason="idle_timeout") >= idle + 5
    assert ca_metric(ca, CLOSED, listener="grpc", reason="handshake_timeout") >= slow + 5


def test_the_http_port_closes_idle_connections_too(tight: tuple[CaSetup, CaProcess]) -> None:
    _, ca = tight
    with floods.idle_connections(ca.http_port, 5) as plain:
        assert plain.closed_by_peer(within=5) == 5


def test_the_open_file_limit_is_raised_to_the_hard_limit(
    tight: tuple[CaSetup, CaProcess],
) -> None:
    _, ca = tight
    limits = Path(f"/proc/{ca.process.pid}/limits").read_text()
    soft, hard = next(line for line in limits.splitlines() if "open files" in line).split()[3:5]
    assert soft == hard
    assert any(f"open-file limit: {hard}" in line for line in ca.stderr)


def test_running_out_of_open_files_is_said_once_and_passes(tmp_path: Path) -> None:
    """At the open-file limit every accept fails, and is tried again every 0.1 s: a line
    each time was 36,000 lines an hour. Once the connections go, callers get in again."""
    setup = make_ca_setup(tmp_path)
    with ca_process(setup.config, prefix=["prlimit", "--nofile=64:64", "--"]) as ca:
        with floods.idle_connections(ca.http_port, 80):
            time.sleep(1.5)
            said = [line for line in ca.stderr if "accept failed" in line]
        assert len(said) == 1 and "Too many open files" in said[0], said
        deadline = time.monotonic() + 5
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{ca.http_port}/healthz", timeout=1):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the CA took no caller after the flood"
                time.sleep(0.1)


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[CaSetup, CaProcess]]:
    """A CA whose cap is small and whose idle timeout is long: only the cap closes."""
    limits = {"max_connections": 50, "idle_timeout": "30s"}
    setup = make_ca_setup(tmp_path_factory.mktemp("ca"), limits=limits)
    with ca_process(setup.config) as process:
        yield setup, process


async def test_over_the_cap_connections_are_closed_at_once_and_sign_goes_on(
    capped: tuple[CaSetup, CaProcess],
) -> None:
    setup, ca = capped
    before = ca_metric(ca, CLOSED, listener="grpc", reason="max_connections")
    with floods.idle_connections(ca.grpc_port, 60, tls=floods.client_context("h2")) as flood:
        held = len(flood.sockets)
        closed = flood.closed_by_peer(within=0.5)
        assert held + flood.failed == 60 and closed + flood.failed == 10
        assert ca_metric(ca, CLOSED, listener="grpc", reason="max_connections") == before + 10
        assert (await sign(setup, ca)).spiffe_id == WORKLOAD
        assert flood.closed_by_peer(within=0.5) == closed + 1  # the quietest made room


async def test_callers_that_never_take_their_answers_make_room_at_the_cap(
    capped: tuple[CaSetup, CaProcess],
) -> None:
    """A caller that asks and keeps its flow-control window shut is owed an answer that
    can never go out: that must not keep its place. A thousand of them, reconnecting
    every idle timeout, locked every caller out of the CA for good."""
    setup, ca = capped
    with floods.answers_never_taken(ca.grpc_port, 50, floods.client_context("h2")) as flood:
        assert len(flood.sockets) == 50  # the cap, all held
        assert (await sign(setup, ca)).spiffe_id == WORKLOAD
        assert flood.closed_by_peer(within=0.5) == 1  # one made room


def test_a_keep_alive_client_between_requests_outlasts_a_flood_of_new_connections(
    capped: tuple[CaSetup, CaProcess],
) -> None:
    """Connections that never had an answer make room first: a client's keep-alive
    connection, quiet between two scrapes, was cut by a flood of new ones and every
    other request of it failed."""
    _, ca = capped
    request = b"GET /healthz HTTP/1.1\r\nHost: ca\r\n\r\n"
    with socket.create_connection(("127.0.0.1", ca.http_port), timeout=5) as client:
        client.sendall(request)
        assert client.recv(4096).endswith(b"ok\n")
        with floods.idle_connections(ca.http_port, 120) as flood:  # past the cap, all quiet
            assert flood.closed_by_peer(within=0.5) >= 70
            for _ in range(3):
                client.sendall(request)
                assert client.recv(4096).endswith(b"ok\n")


async def test_callers_asking_twice_a_second_make_room_at_the_cap(
    capped: tuple[CaSetup, CaProcess],
) -> None:
    """Progress is no claim on a place while no answer is owed: with a second of quiet
    needed, 50 callers asking GetBundle every half second (no credentials needed) held
    every place, and every Sign failed to connect."""
    setup, ca = capped
    context = floods.client_context("h2")
    with floods.asking_connections(ca.grpc_port, 50, every=0.5, tls=context):
        for _ in range(3):
            assert (await sign(setup, ca)).spiffe_id == WORKLOAD


def h2_trickle(pings: int) -> bytes:
    """What a slowloris sends a byte at a time: the HTTP/2 preface, SETTINGS, PINGs."""
    ping = PingFrame(0, b"trickle!").serialize()
    return H2_PREFACE + SettingsFrame(0).serialize() + ping * pings


async def test_a_byte_at_a_time_holds_no_connection_and_sign_goes_on(
    tight: tuple[CaSetup, CaProcess],
) -> None:
    """A slowloris at the cap: a byte every 0.3 s (under the idle timeout) is not
    activity; the connections close and callers get in."""
    setup, ca = tight
    context = floods.client_context("h2")
    with floods.trickling_connections(
        ca.grpc_port, 50, h2_trickle(20), every=0.3, tls=context
    ) as f:
        assert f.closed_by_peer(within=3) == 50
        assert (await sign(setup, ca)).spiffe_id == WORKLOAD


async def test_trickling_connections_make_room_at_the_cap(
    capped: tuple[CaSetup, CaProcess],
) -> None:
    """With a long idle timeout the cap is what protects callers: a trickling
    connection has made no progress, so it makes room as an idle one does."""
    setup, ca = capped
    context = floods.client_context("h2")
    with floods.trickling_connections(ca.grpc_port, 50, h2_trickle(20), every=0.3, tls=context):
        assert (await sign(setup, ca)).spiffe_id == WORKLOAD


def test_calls_reset_as_soon_as_sent_leave_nothing_owed(tight: tuple[CaSetup, CaProcess]) -> None:
    """A rapid reset: grpclib never releases a call whose handler is cancelled before
    it starts. The connection must still count as idle and be closed."""
    _, ca = tight
    assert floods.reset_calls(ca.grpc_port, floods.client_context("h2"), 4, within=3)


@pytest.mark.parametrize(
    "frame",
    [SettingsFrame(0, settings={4: 65_535}).serialize(), PingFrame(0, b"flooding").serialize()],
    ids=["settings", "ping"],
)
def test_a_flood_of_control_frames_is_cut_at_once(
    capped: tuple[CaSetup, CaProcess], frame: bytes
) -> None:
    """SETTINGS and PING frames start no call but cost the CA work: four connections
    flooding SETTINGS starved every Sign past its deadline. The idle timeout here is
    30 s; the connection must be cut long before, whatever the caller reads."""
    _, ca = capped
    closed, sent = floods.unread_acknowledgements(
        ca.grpc_port, floods.client_context("h2"), frame, send_at_most=64 * 2**20, timeout=5
    )
    assert closed and sent < 8 * 2**20, f"{sent} bytes of control frames taken"


def test_a_flood_of_empty_data_frames_is_cut_at_once(capped: tuple[CaSetup, CaProcess]) -> None:
    """Empty DATA frames spend no flow-control window: they took ~5 s of the CA's CPU
    before anything else stopped them."""
    context = floods.client_context("h2")
    assert floods.empty_data_frames(capped[1].grpc_port, context, timeout=1.0)
