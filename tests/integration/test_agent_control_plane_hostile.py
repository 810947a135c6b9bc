"""A real agent process against hostile or broken snapshots from its control plane.

The control plane is trusted to say what a pod serves and which policies
apply, and nothing more: a snapshot never makes the agent read its own
files, never opens a plain-in port to the pod network, and no snapshot,
however broken, ends the agent's subscription (it would then serve a stale
config forever while saying it is connected). Each case is Nacked with a
bounded reason, and the next good snapshot still runs.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpclib.config import Configuration
from grpclib.exceptions import StreamTerminatedError

from agent import config as agent_config
from agent.adapters import control_plane as control_plane_client
from agent.app import Agent
from identity.proto.control_grpc import ControlPlaneStub
from identity.tlsfiles import TLS_SHUTDOWN_TIMEOUT
from tests.control import ControlPlaneThread, bootstrap, control_plane, version_of
from tests.integration.test_agent_control_plane import (
    DENY_ALL,
    frontend,
    snapshot,
    subscribed_agent,
)
from tests.mesh import (
    AgentProcess,
    agent_process,
    agent_yaml,
    echo_server,
    local_sign,
    mtls_exchange,
    served_agent_yaml,
    workload,
)
from tests.support import CaProcess, CaSetup, loopback_tls, waited_for_a_cpu

QUICK = {"initial": "100ms", "max": "500ms"}


def answered_then_recovers(plane: ControlPlaneThread, app_port: int) -> None:
    """The subscription is alive: a good snapshot after the bad one still runs."""
    assert plane.answer(plane.publish(snapshot(app_port))).kind == "ack"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"inbound": ' + b"1" * 5000 + b"}", "not UTF-8 JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"policy": {"policies": ' + b"[" * 5000 + b"]" * 5000 + b"}}", "nested"),
    ],
    ids=["huge-integer", "deep-json", "deep-policy"],
)
async def test_a_snapshot_the_json_parser_chokes_on_is_nacked_and_the_stream_goes_on(
    setup: CaSetup, ca: CaProcess, raw: bytes, reason: str
) -> None:
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port, DENY_ALL)) as plane,
            subscribed_agent(setup, ca, plane, "chokes") as agent,
        ):
            address = agent.wait_ready()["inbound[0]"]
            answer = plane.answer(plane.publish({"bad": 1}, raw=raw))
            assert answer.kind == "nack"
            assert reason in answer.error
            assert len(answer.error) < 4096
            assert await mtls_exchange(address, frontend(setup)) == b""  # DENY still runs
            answered_then_recovers(plane, app_port)
            assert agent.sample("outrider_control_plane_connected") == 1


async def test_a_snapshot_cannot_make_the_agent_read_its_own_files(
    setup: CaSetup, ca: CaProcess
) -> None:
    token = setup.root / "reads.token"  # the agent's CA credential
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "reads") as agent,
        ):
            agent.wait_ready()
            secret = token.read_text().strip()
            bad = {**snapshot(app_port), "policy": {"files": [str(token)]}}
            answer = plane.answer(plane.publish(bad))
            assert answer.kind == "nack"
            assert "policy.files: not a snapshot key" in answer.error
            assert secret not in answer.error
            assert secret[:20] not in "".join(agent.log)
            answered_then_recovers(plane, app_port)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3"])
async def test_a_snapshot_cannot_open_an_outbound_listener_off_loopback(
    setup: CaSetup, ca: CaProcess, host: str
) -> None:
    """Outbound listeners take plain text and send it out with the pod's SVID: off loopback,
    anyone on the pod network would call the mesh as this pod."""
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "exposes") as agent,
        ):
            agent.wait_ready()
            listen = f"[{host}]:0" if ":" in host else f"{host}:0"
            bad: dict[str, Any] = {
                **snapshot(app_port),
                "outbound": [
                    {
                        "name": "backend.shop:8080",
                        "listen": listen,
                        "endpoints": ["127.0.0.1:1"],
                        "server_ids": ["spiffe://example.org/ns/shop/sa/backend"],
                    }
                ],
            }
            answer = plane.answer(plane.publish(bad))
            assert answer.kind == "nack"
            assert "outbound[0].listen" in answer.error
            assert "loopback" in answer.error
            assert "outbound[backend.shop:8080]" not in agent.config_dump()["bound"]


async def test_a_nack_of_a_snapshot_with_thousands_of_errors_stays_small(
    setup: CaSetup, ca: CaProcess
) -> None:
    """The control plane takes a Nack of at most 64 KiB: a longer one would end the stream,
    and the agent would reconnect, be sent the same snapshot and Nack it again, forever."""
    rules = [{"to": {"paths": [f"/a/*/b{i}"]}} for i in range(5000)]
    bad = {"policy": {"policies": [{"name": "many", "action": "ALLOW", "rules": rules}]}}
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "verbose") as agent,
        ):
            agent.wait_ready()
            answer = plane.answer(plane.publish({**snapshot(app_port), **bad}))
            assert answer.kind == "nack"
            assert "policies[0].rules[0].to.paths[0]" in answer.error
            assert "and 4" in answer.error and "more" in answer.error
            assert len(answer.error.encode()) < 16_384
            assert len(plane.streams()) == 1


@pytest.mark.parametrize(
    "version",
    ["", "x" * 10_000, "abc\n2026-01-01 INFO forged line"],
    ids=["empty", "huge", "newline"],
)
async def test_a_snapshot_with_a_version_that_is_not_one_is_nacked(
    setup: CaSetup, ca: CaProcess, version: str
) -> None:
    async with echo_server() as app_port:
        with (
            control_plane(setup) as plane,
            subscribed_agent(setup, ca, plane, "versions") as agent,
        ):
            plane.wait_for_streams(1)
            plane.publish(snapshot(app_port), version=version)
            answer = plane.answer(version)
            assert answer.kind == "nack"
            assert "version" in answer.error
            assert agent.status("/ready") == 503  # nothing ran
            assert not any(line.startswith("2026-01-01") for line in agent.log)  # no forged line
            assert all(len(line) < 2000 for line in agent.log)
            answered_then_recovers(plane, app_port)
            agent.wait_ready()


async def test_the_same_version_with_other_content_is_not_taken_for_what_runs(
    setup: CaSetup, ca: CaProcess
) -> None:
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "same") as agent,
        ):
            address = agent.wait_ready()["inbound[0]"]
            running = agent.config_dump()["control_plane"]["version"]
            plane.publish(snapshot(app_port, DENY_ALL), version=running)
            deadline = time.monotonic() + 5
            while len(plane.streams()[0].answers) < 2:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            assert plane.streams()[0].answers[1][0] == "ack"
            assert await mtls_exchange(address, frontend(setup)) == b""  # the content runs


@pytest.mark.slow
async def test_a_server_that_accepts_and_never_answers_tls_is_given_up_on_within_seconds(
    setup: CaSetup, ca: CaProcess
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # holds the connection, says nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    control = bootstrap(address, pod="mute-tls-0", timeout="1s")  # control.timeout
    raw = served_agent_yaml(setup, ca, "mute-tls", control=control)
    try:
        with agent_process(setup.root, "mute-tls", raw, ready=False) as agent:
            assert agent.logged("no connection within 1s", timeout=10)
            assert agent.status("/ready") == 503
    finally:
        server.close()


@pytest.mark.slow
async def test_a_control_plane_that_sends_no_first_config_is_left_for_another_try(
    setup: CaSetup, ca: CaProcess
) -> None:
    """Before its first config the agent says why it is not ready, and tries again (another
    replica behind the Service may answer) rather than wait on a mute stream forever."""
    async with echo_server() as app_port:
        with (
            control_plane(setup) as plane,  # serves nothing
            subscribed_agent(setup, ca, plane, "mute", backoff=QUICK, timeout="1s") as agent,
        ):
            assert agent.logged("connected, but no config came within 1s", timeout=10)
            plane.wait_for_streams(2, timeout=5)
            assert agent.status("/ready") == 503
            plane.publish(snapshot(app_port))
            agent.wait_ready(timeout=15)


async def test_a_control_plane_that_refuses_every_stream_is_backed_off_and_logged_once(
    setup: CaSetup, ca: CaProcess
) -> None:
    """PERMISSION_DENIED right after Hello is a failure, not a return: the backoff grows, and
    the log says the control plane is away once, not away and back every try."""
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "denied", backoff=QUICK) as agent,
        ):
            agent.wait_ready()
            plane.deny("no pod demo/denied-0 in the mesh")
            plane.stop()
            plane.start()  # the stream ends: every try from now on is refused
            refused = plane.wait_for_streams(7)[1:]
            gaps = [b.opened - a.opened for a, b in itertools.pairwise(refused)]
            # 100 ms doubling to 500 ms, jittered down to half: never a retry storm, and
            # from the fourth failure on at least half the cap (a reset counter fails this).
            assert min(gaps) >= 0.05 and min(gaps[3:]) >= 0.25, gaps
            assert not any(line.rstrip().endswith(" back") for line in agent.log), agent.log
            assert sum("away" in line for line in agent.log) == 1
            assert agent.status("/ready") == 200  # serving its last config


@pytest.mark.parametrize("timeout", [None, "1s"], ids=["default", "shorter-than-the-hold"])
async def test_an_agent_whose_streams_are_taken_and_then_refused_never_reads_as_connected(
    setup: CaSetup, ca: CaProcess, timeout: str | None
) -> None:
    """A control plane that holds a stream before refusing it (it waits for a pod it does
    not know, or for its API server) gives the agent no config: the gauge and /config_dump
    say not connected all along, or an alert on them would never fire. Whatever
    `control.timeout`: a resync that lasted 1 s proved itself, then was refused."""
    short = {"timeout": timeout} if timeout else {}
    name = f"held{len(short)}"
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, name, backoff=QUICK, **short) as agent,
        ):
            agent.wait_ready()
            plane.deny(f"no pod demo/{name}-0 in the mesh", after=1.5)
            plane.stop()
            plane.start()
            plane.wait_for_streams(2)  # a stream taken, held: the agent sent its Hello
            for _ in range(20):  # bounded: 2 s of a held stream and the next tries
                assert agent.sample("outrider_control_plane_connected") == 0
                assert agent.config_dump()["control_plane"]["connected"] is False
                await asyncio.sleep(0.1)
            plane.deny(None)
            plane.publish(snapshot(app_port, DENY_ALL))  # a stream that brings one is proven
            deadline = time.monotonic() + 10
            while agent.sample("outrider_control_plane_connected") != 1:
                assert time.monotonic() < deadline, "never connected again"
                await asyncio.sleep(0.1)


async def test_a_snapshot_being_applied_when_the_drain_begins_leaves_no_listener_open(
    setup: CaSetup,
) -> None:
    """Applying is shielded from the stream's cancellation (a rotation must not cut a reload
    in half), so a SIGTERM mid-apply must not leave the new listeners accepting."""
    nowhere = bootstrap("127.0.0.1:1", pod="drains-0")  # the stream is not the point here
    raw = agent_yaml(setup.root, "drains", control=nowhere)
    document = agent_config.Document(raw, setup.root, "drains.yaml")
    agent = Agent(document.parse(), sign=local_sign(setup), document=document)
    async with echo_server() as app_port:
        starting = asyncio.create_task(agent.start())
        await asyncio.wait_for(agent.identity.has_svid.wait(), 10)
        first = json.dumps(snapshot(app_port)).encode()
        assert await agent.take_snapshot("v1", first) is None
        await asyncio.wait_for(starting, 10)
        two = snapshot(app_port)
        two["inbound"].append({"listen": "127.0.0.1:0", "app": f"127.0.0.1:{app_port}"})
        applying = asyncio.create_task(agent.take_snapshot("v2", json.dumps(two).encode()))
        await asyncio.sleep(0)  # it binds, and awaits its listeners' start
        try:
            await agent.drain()
            await applying
            for name, address in agent.bound.items():
                if name.startswith("inbound"):
                    host, port = address.rsplit(":", 1)
                    with pytest.raises(ConnectionRefusedError):
                        await asyncio.open_connection(host, int(port))
        finally:
            await agent.stop()


async def test_a_snapshot_with_thousands_of_listeners_is_nacked_at_once(
    setup: CaSetup, ca: CaProcess
) -> None:
    """Each listener is a file descriptor, and the clash check is pairwise: 5,000 blocked
    the agent's event loop for over a second before binding 5,000 sockets."""
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "crowded") as agent,
        ):
            agent.wait_ready()
            many = [
                {"listen": f"127.0.0.1:{20000 + i}", "app": f"127.0.0.1:{app_port}"}
                for i in range(5000)
            ]
            sent = time.monotonic()
            answer = plane.answer(plane.publish({"inbound": many}))
            assert answer.kind == "nack"
            assert "5000 listeners; a snapshot opens at most 1000" in answer.error
            assert time.monotonic() - sent < 1.0
            assert len(agent.config_dump()["bound"]) == 2  # admin, inbound[0]


async def test_the_agent_keeps_answering_while_a_large_snapshot_is_checked(
    setup: CaSetup, ca: CaProcess
) -> None:
    """A snapshot near the 4 MiB bound takes seconds to check (30,000 rules); meanwhile the
    agent answers its probes and its callers as before."""
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "large") as agent,
        ):
            agent.wait_ready()
            version = plane.publish(large_snapshot(app_port))
            done = lambda: any(v == version for _, v, _ in plane.streams()[0].answers)  # noqa: E731
            assert await slowest_healthz(agent, done) < 0.5
            assert plane.answer(version).kind == "ack"


async def test_a_reload_of_the_bootstrap_merged_with_a_large_snapshot_keeps_the_agent_answering(
    setup: CaSetup, ca: CaProcess
) -> None:
    async with echo_server() as app_port:
        with (
            control_plane(setup, large_snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "reloads-large") as agent,
        ):
            agent.wait_ready(timeout=30)
            path = setup.root / "reloads-large.yaml"
            raw = yaml.safe_load(path.read_text())
            raw["limits"] = {"idle_timeout": "30m"}
            path.write_text(yaml.safe_dump(raw))
            agent.process.send_signal(signal.SIGHUP)
            reloaded = lambda: any("config reloaded" in line for line in agent.log)  # noqa: E731
            assert await slowest_healthz(agent, reloaded) < 0.5


def large_snapshot(app_port: int) -> dict[str, Any]:
    """An HTTP inbound and 30,000 rules: about 4 MB, near a snapshot's bound."""
    rules = [
        {
            "from": {"principals": [f"spiffe://example.org/ns/shop/sa/caller-{i}"]},
            "to": {"methods": ["GET"], "paths": [f"/api/v1/items-{i}/*"]},
        }
        for i in range(30_000)
    ]
    large = snapshot(app_port)
    large["inbound"][0]["protocol"] = "http"
    large["policy"] = {"policies": [{"name": "many", "action": "ALLOW", "rules": rules}]}
    return large


async def slowest_healthz(agent: AgentProcess, done: Callable[[], bool]) -> float:
    """The slowest /healthz answer until `done()`, and for 3 s more; 30 s at most.

    Less the time the agent's event loop waited for a CPU meanwhile: on a machine busy
    with other tests that is the scheduler's, while a check holding the loop or the
    GIL still counts."""
    pid = agent.process.pid
    slowest, after = 0.0, None
    deadline = time.monotonic() + 30
    while after is None or time.monotonic() < after:
        assert time.monotonic() < deadline, "".join(agent.log)
        asked, queued = time.monotonic(), waited_for_a_cpu(pid, pid)
        assert await asyncio.to_thread(agent.status, "/healthz") == 200
        slowest = max(slowest, time.monotonic() - asked - (waited_for_a_cpu(pid, pid) - queued))
        await asyncio.sleep(0.05)
        if after is None and done():
            after = time.monotonic() + 3
    return slowest


async def test_a_bootstrap_reload_that_names_another_control_plane_ends_the_old_stream(
    setup: CaSetup, ca: CaProcess
) -> None:
    """An operator who moves `control:` to a new control plane (the old identity distrusted)
    stops the agent taking config from the old one at the reload, not at its next outage."""
    successor = workload("outrider-control-2", "outrider-system")
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as old,
            control_plane(setup, snapshot(app_port, DENY_ALL), spiffe_id=successor) as new,
            subscribed_agent(setup, ca, old, "moves") as agent,
        ):
            address = agent.wait_ready()["inbound[0]"]
            path = setup.root / "moves.yaml"
            raw = yaml.safe_load(path.read_text())
            raw["control"] = {**raw["control"], "address": new.address}
            raw["control"]["spiffe_id"] = str(successor)
            path.write_text(yaml.safe_dump(raw))
            agent.process.send_signal(signal.SIGHUP)

            new.wait_for_streams(1, timeout=5)
            assert plane_answered(new, version_of(snapshot(app_port, DENY_ALL)))
            assert old.connected() == []
            assert await mtls_exchange(address, frontend(setup)) == b""  # the new one's DENY


def plane_answered(plane: ControlPlaneThread, version: str) -> bool:
    return plane.answer(version).kind == "ack"


@pytest.mark.parametrize(
    ("name", "where"),
    [("backend\n2026-01-01 ERROR forged", "name"), ("x" * 100_000, "name")],
    ids=["newline", "huge"],
)
@pytest.mark.parametrize("in_subset", [False, True], ids=["upstream", "subset"])
async def test_an_upstream_name_that_would_forge_or_flood_a_log_line_is_nacked(
    setup: CaSetup, ca: CaProcess, name: str, where: str, in_subset: bool
) -> None:
    upstream: dict[str, Any] = {
        "name": "backend.shop:8080",
        "listen": "127.0.0.1:0",
        "server_ids": ["spiffe://example.org/ns/shop/sa/backend"],
    }
    if in_subset:
        upstream["subsets"] = [{"name": name, "endpoints": ["127.0.0.1:1"]}]
        key = "outbound[0].subsets[0].name"
    else:
        upstream.update(name=name, endpoints=["127.0.0.1:1"])
        key = "outbound[0].name"
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "names") as agent,
        ):
            agent.wait_ready()
            answer = plane.answer(plane.publish({**snapshot(app_port), "outbound": [upstream]}))
            assert answer.kind == "nack"
            assert f"{key}: " in answer.error and "is not a name" in answer.error
            assert not any(line.startswith("2026-01-01") for line in agent.log)
            assert all(len(line) < 2000 for line in agent.log)


async def test_a_control_plane_whose_node_froze_is_noticed_within_two_pings(
    tmp_path: Path,
) -> None:
    """A frozen node answers neither pings nor the TLS close that follows them: the close
    waits TLS_SHUTDOWN_TIMEOUT, not the loop's 30 s (docs/agent.md: a vanished control plane
    is found within two pings). Pings every 0.2 s here, the agent's channel."""
    tls = loopback_tls(tmp_path, "control-plane")
    tls.server_context.set_alpn_protocols(["h2"])
    listener = socket.create_server(("127.0.0.1", 0))
    thawed = threading.Event()

    def frozen() -> None:
        connection, _ = listener.accept()
        with tls.server_context.wrap_socket(connection, server_side=True) as stream:
            stream.recv(65536)  # the client's preface, then never a byte: a frozen node
            thawed.wait(30)

    threading.Thread(target=frozen, daemon=True).start()
    client = ssl.create_default_context(cafile=str(tls.ca_file))
    client.set_alpn_protocols(["h2"])
    ping = {"_keepalive_time": 0.2, "_keepalive_timeout": 0.2}
    channel = control_plane_client._Channel(
        "127.0.0.1",
        listener.getsockname()[1],
        ssl=client,
        config=Configuration(
            ssl_target_name_override="127.0.0.1",
            _keepalive_permit_without_calls=True,
            _http2_max_pings_without_data=0,
            _http2_min_sent_ping_interval_without_data=0.2,
            **ping,  # type: ignore[arg-type]
        ),
    )
    started = time.monotonic()
    try:
        with pytest.raises(StreamTerminatedError):
            async with ControlPlaneStub(channel).Subscribe.open() as stream:
                await stream.send_request()
                await asyncio.wait_for(stream.recv_message(), 10)
        assert time.monotonic() - started < 0.4 + TLS_SHUTDOWN_TIMEOUT + 1
    finally:
        thawed.set()
        channel.close()
        listener.close()
