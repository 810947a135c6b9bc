"""A real agent process takes its inbound, outbound and policy from a control plane.

The control plane is tests/control.py's: a real grpclib server of
control.proto over mTLS with an SVID of the test CA; the agent gets its own
SVID from a real `ca serve`. What a user relies on: no listener and no
readiness before the first snapshot; each snapshot runs as a reload would
(open connections keep going); a bad one is refused with its key path and
changes nothing; traffic flows while the control plane is away; and config
comes only from the control plane's own SPIFFE ID.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import pytest
import yaml

from tests import certs
from tests.control import ControlPlaneThread, bootstrap, control_plane, version_of
from tests.mesh import (
    AgentProcess,
    agent_process,
    echo_server,
    mtls_exchange,
    served_agent_yaml,
    workload,
)
from tests.support import CaProcess, CaSetup

FRONTEND = workload("frontend")
QUICK_BACKOFF = {"initial": "100ms", "max": "500ms"}
DENY_ALL = {"policies": [{"name": "deny-all", "action": "DENY", "rules": [{}]}]}


def snapshot(app_port: int, policy: dict[str, Any] | None = None) -> dict[str, Any]:
    """One inbound listener (the kernel picks its port) to the echo app at `app_port`."""
    config: dict[str, Any] = {
        "inbound": [{"listen": "127.0.0.1:0", "app": f"127.0.0.1:{app_port}"}]
    }
    if policy is not None:
        config["policy"] = policy
    return config


def frontend(setup: CaSetup) -> ssl.SSLContext:
    """A client of the mesh with an SVID of the trust domain: allowed unless a policy denies."""
    return certs.client_context(setup.bundle_pem, certs.valid_svid(setup, FRONTEND))


@contextmanager
def subscribed_agent(
    setup: CaSetup, ca: CaProcess, plane: ControlPlaneThread, name: str, **control: Any
) -> Iterator[AgentProcess]:
    """An agent whose bootstrap names `plane`; yielded once its admin server answers."""
    raw = served_agent_yaml(
        setup, ca, name, control=bootstrap(plane.address, pod=f"{name}-0", **control)
    )
    with agent_process(setup.root, name, raw, ready=False) as agent:
        yield agent


@asynccontextmanager
async def open_connection(
    address: str, context: ssl.SSLContext
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    host, port = address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), ssl=context, server_hostname="")
    try:
        yield reader, writer
    finally:
        writer.close()


async def echoed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def test_an_agent_listens_and_turns_ready_only_once_its_first_snapshot_runs(
    setup: CaSetup, ca: CaProcess
) -> None:
    async with echo_server() as app_port:
        with (
            control_plane(setup) as plane,
            subscribed_agent(setup, ca, plane, "first") as agent,
        ):
            [stream] = plane.wait_for_streams(1)
            assert (stream.pod, stream.running_version) == ("first-0", "")
            assert stream.spiffe_id == str(workload("first"))
            assert agent.logged("waiting for the first config from the control plane")
            assert agent.status("/ready") == 503
            # A stream is no connection until it proves itself: it brought a snapshot.
            assert agent.sample("outrider_control_plane_connected") == 0
            assert set(agent.bound) == {"admin"}

            version = plane.publish(snapshot(app_port))
            bound = agent.wait_ready()
            assert plane.answer(version).kind == "ack"
            assert agent.status("/ready") == 200
            assert agent.sample("outrider_control_plane_connected") == 1
            assert await mtls_exchange(bound["inbound[0]"], frontend(setup)) != b""
            dump = agent.config_dump()
            assert dump["control_plane"]["version"] == version
            assert agent.sample("outrider_control_plane_updates_total", result="applied") == 1


async def test_a_new_snapshot_on_the_same_stream_runs_at_once_and_open_connections_keep_going(
    setup: CaSetup, ca: CaProcess
) -> None:
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(setup, ca, plane, "live") as agent,
        ):
            address = agent.wait_ready()["inbound[0]"]
            async with open_connection(address, frontend(setup)) as (reader, writer):
                assert await echoed(reader, writer, b"before") == b"before"

                version = plane.publish(snapshot(app_port, DENY_ALL))
                assert plane.answer(version).kind == "ack"

                assert await mtls_exchange(address, frontend(setup)) == b""  # new: denied
                assert await echoed(reader, writer, b"after") == b"after"  # open: keeps going
            assert len(plane.wait_for_streams(1)) == 1  # one stream, one process
            assert agent.process.poll() is None
            assert agent.config_dump()["control_plane"]["version"] == version


@pytest.mark.parametrize(
    ("bad", "key_path"),
    [
        ({"inbound": [{"listen": "127.0.0.1:0", "app": "nowhere"}]}, "inbound[0].app"),
        (
            {"policy": {"policies": [{"name": "p", "action": "allow", "rules": [{}]}]}},
            "policies[0].action",
        ),
        ({"limits": {"max_connections": 1}}, "limits: not a snapshot key"),
        (b'{"inbound": [', "not UTF-8 JSON"),
    ],
    ids=["bad-address", "bad-policy", "bootstrap-key", "not-json"],
)
async def test_a_refused_snapshot_is_nacked_with_its_key_path_and_the_last_one_keeps_running(
    setup: CaSetup, ca: CaProcess, bad: dict[str, Any] | bytes, key_path: str
) -> None:
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port, DENY_ALL)) as plane,
            subscribed_agent(setup, ca, plane, "refuses") as agent,
        ):
            address = agent.wait_ready()["inbound[0]"]
            good = plane.answer(plane.publish(snapshot(app_port, DENY_ALL)))
            assert good.kind == "ack"

            if isinstance(bad, bytes):
                version = plane.publish({"garbled": True}, raw=bad)
            else:
                version = plane.publish(bad)
            answer = plane.answer(version)
            assert answer.kind == "nack"
            assert key_path in answer.error

            assert await mtls_exchange(address, frontend(setup)) == b""  # DENY still enforced
            assert agent.sample("outrider_control_plane_updates_total", result="rejected") == 1
            assert agent.config_dump()["control_plane"]["version"] != version


@pytest.mark.slow
async def test_while_the_control_plane_is_away_traffic_flows_and_on_return_the_agent_resyncs(
    setup: CaSetup, ca: CaProcess
) -> None:
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port)) as plane,
            subscribed_agent(
                setup, ca, plane, "outage", backoff={"initial": "100ms", "max": "500ms"}
            ) as agent,
        ):
            address = agent.wait_ready()["inbound[0]"]
            running = version_of(snapshot(app_port))
            assert plane.answer(running).kind == "ack"

            plane.stop()
            away_until = time.monotonic() + 5
            while time.monotonic() < away_until:  # bounded: 5 s of traffic, 20 exchanges
                assert await mtls_exchange(address, frontend(setup)) != b""
                await asyncio.sleep(0.25)
            assert agent.sample("outrider_control_plane_connected") == 0
            changed = plane.publish(snapshot(app_port, DENY_ALL))  # changed while away

            plane.start()
            streams = plane.wait_for_streams(2)
            assert streams[1].running_version == running  # what it kept serving
            assert plane.answer(changed).kind == "ack"
            assert agent.sample("outrider_control_plane_connected") == 1
            assert await mtls_exchange(address, frontend(setup)) == b""  # the resync runs
            warnings = [line for line in agent.log if "control plane" in line and "away" in line]
            assert len(warnings) == 1, warnings  # one warning per outage
            assert agent.logged(f"control plane {plane.address} back")


async def test_an_agent_takes_no_config_from_a_server_with_another_spiffe_id(
    setup: CaSetup, ca: CaProcess
) -> None:
    impostor = workload("impostor")  # a valid SVID of the trust domain: any pod has one
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port), spiffe_id=impostor) as plane,
            subscribed_agent(setup, ca, plane, "careful") as agent,
        ):
            assert agent.logged(f"is {impostor}, not the control plane")
            assert plane.streams() == []  # no Hello: it never asked
            assert agent.status("/ready") == 503
            assert agent.sample("outrider_control_plane_connected") == 0
            assert agent.sample("outrider_control_plane_updates_total", result="applied") == 0


async def test_after_an_svid_rotation_the_agent_subscribes_with_the_new_svid(
    setup: CaSetup, ca: CaProcess
) -> None:
    async with echo_server() as app_port:
        with control_plane(setup, snapshot(app_port)) as plane:
            raw = served_agent_yaml(
                setup, ca, "rotating", control=bootstrap(plane.address, pod="rotating-0")
            )
            raw["identity"]["ttl"] = "2s"  # renewed about every second
            with agent_process(setup.root, "rotating", raw, ready=False) as agent:
                address = agent.wait_ready()["inbound[0]"]
                streams = plane.wait_for_streams(3)
                assert len({stream.serial for stream in streams}) == 3
                version = streams[0].answers[0][1]
                assert [s.running_version for s in streams[1:]] == [version, version]
                assert await mtls_exchange(address, frontend(setup)) != b""
                assert agent.sample("outrider_control_plane_updates_total", result="applied") == 1
                # Each rotation's resubscribe is the agent's own doing, a resync that brings
                # nothing: the stream stays connected throughout (sampled across rotations).
                for _ in range(15):  # bounded: 1.5 s, about one rotation
                    assert agent.sample("outrider_control_plane_connected") == 1
                    await asyncio.sleep(0.1)


async def test_a_reload_of_the_bootstrap_file_keeps_the_snapshots_keys(
    setup: CaSetup, ca: CaProcess
) -> None:
    async with echo_server() as app_port:
        with (
            control_plane(setup, snapshot(app_port, DENY_ALL)) as plane,
            subscribed_agent(setup, ca, plane, "reloads") as agent,
        ):
            address = agent.wait_ready()["inbound[0]"]
            path = setup.root / "reloads.yaml"
            raw = yaml.safe_load(path.read_text())
            raw["limits"] = {"idle_timeout": "30m"}
            path.write_text(yaml.safe_dump(raw))
            agent.process.send_signal(signal.SIGHUP)

            deadline = time.monotonic() + 10
            while agent.sample("outrider_config_reloads_total", kind="agent", result="ok") < 1:
                assert time.monotonic() < deadline, "".join(agent.log)
                await asyncio.sleep(0.05)
            dump = agent.config_dump()
            assert dump["config"]["limits"]["idle_timeout"] == 1800
            assert dump["bound"]["inbound[0]"] == address
            assert await mtls_exchange(address, frontend(setup)) == b""  # the snapshot's DENY
