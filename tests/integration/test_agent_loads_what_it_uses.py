"""An agent loads a feature's modules only when its config uses the feature, and a
feature a reload turns on later works from its first connection.

Real agent processes, each run under tests.mesh.MODULES_AT_EXIT, which writes the
modules it had loaded as it exits: an L4 agent and an L7 client (the bench's pairs)
load none of the h2 stack and no capture listener; the same L4 agent, reloaded
with an `http2` port, an `http2` upstream and `capture:`, serves each at once, and so
does an agent whose control plane's next snapshot adds the h2 port and upstream.
With `workers: N` the main process, which serves no traffic, loads none of the h2
stack: its workers do. A control-plane agent, whose ports all arrive after start-up
where the h2 stack takes four times its start-up memory, loads it at start.
"""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.adapters import h2client
from tests.control import bootstrap, control_plane
from tests.floods import rss_kib
from tests.h2backend import exchange, h2_backend
from tests.mesh import (
    MODULES_AT_EXIT,
    MODULES_FILE,
    AgentProcess,
    agent_process,
    echo_server,
    eventually,
    inbound,
    loaded_modules,
    outbound,
    round_trip,
    served_agent_yaml,
    workload,
)
from tests.support import CaProcess, CaSetup, free_port

#: The agent's own h2 modules (the h2 library itself comes with the CA's gRPC client).
H2_STACK = {
    "agent.adapters.h2client",
    "agent.adapters.h2gate",
    "agent.adapters.h2server",
    "agent.adapters.inbound_h2",
    "agent.adapters.inbound_h2h1",
    "agent.adapters.outbound_h2",
}
CAPTURE = {"agent.adapters.capture_listeners", "agent.adapters.capture"}


def modules_of(
    tmp_path: Path, name: str, raw: dict[str, Any], check: Any = None
) -> tuple[set[str], list[str]]:
    """What agent `name` had loaded once ready (and `check(agent)` done), and its log."""
    dumped = tmp_path / f"{name}.modules"
    with agent_process(
        tmp_path, name, raw, launcher=MODULES_AT_EXIT, env={MODULES_FILE: str(dumped)}
    ) as agent:
        if check is not None:
            check(agent)
        assert agent.stop() == 0, "".join(agent.log)
    return loaded_modules(dumped), agent.log


def test_an_l4_agent_and_an_http_client_load_no_h2_stack_and_no_capture_listener(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    l4 = served_agent_yaml(
        setup,
        ca,
        "l4",
        inbound=inbound(free_port()),
        outbound=outbound(f"127.0.0.1:{free_port()}", workload("backend")),
    )
    client = outbound(f"127.0.0.1:{free_port()}", workload("backend"))
    client[0]["protocol"] = "http"
    l7_client = served_agent_yaml(setup, ca, "client", outbound=client)
    for name, raw in (("l4", l4), ("client", l7_client)):
        loaded, log = modules_of(tmp_path, name, raw)
        assert "agent.adapters.listeners" in loaded, "".join(log)  # the dump is the agent's
        assert not loaded & (H2_STACK | CAPTURE), name


def test_an_http_port_loads_the_inbound_h2_stack_at_start_an_h2_peer_may_pick_it(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    """ALPN lets a peer speak h2 to an `http` port: its first such connection waits on no
    import. What only an h2 upstream uses stays out."""
    raw = served_agent_yaml(setup, ca, "server", inbound=inbound(free_port(), protocol="http"))
    loaded, _ = modules_of(tmp_path, "server", raw)
    assert {"agent.adapters.inbound_h2h1", "agent.adapters.h2gate"} <= loaded
    assert "agent.adapters.outbound_h2" not in loaded


async def reload(agent: AgentProcess, path: Path, raw: dict[str, Any]) -> None:
    """Write `raw` as the agent's config and SIGHUP it; back once it has reloaded."""
    path.write_text(yaml.safe_dump(raw))
    agent.process.send_signal(signal.SIGHUP)
    assert await eventually(
        lambda: agent.sample("outrider_config_reloads_total", kind="agent", result="ok") == 1,
        10,
    ), "".join(agent.log)


H2_GET = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":path", b"/first"),
    (b":authority", b"backend"),
]


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_reload_turns_on_h2_and_capture_in_an_l4_agent_and_each_works_at_once(
    setup: CaSetup, ca: CaProcess, tmp_path: Path, workers: int
) -> None:
    """An L4 agent (as the first test's) reloaded: an `http2` inbound port to an h2c app,
    an `http2` upstream that is that port (the agent's own SPIFFE ID), and `capture:`.
    The first h2 request through both reaches the app; the outbound capture listener
    refuses a connection that was not redirected to it, as it documents. With `workers:
    2` each worker takes the new settings from the main process and imports as it does."""
    dumped = tmp_path / "l4.modules"
    async with echo_server() as echo_port, h2_backend("app") as app:
        tcp_in, tcp_out = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        tcp = inbound(echo_port)
        tcp[0]["listen"] = tcp_in
        loop = outbound(tcp_in, workload("l4"), name="self")  # to its own inbound: L4 both ways
        loop[0]["listen"] = tcp_out
        raw = served_agent_yaml(setup, ca, "l4", inbound=tcp, outbound=loop, workers=workers)
        with agent_process(
            tmp_path, "l4", raw, launcher=MODULES_AT_EXIT, env={MODULES_FILE: str(dumped)}
        ) as agent:
            assert await round_trip(tcp_out) == b"ping"
            h2_port, outbound_port = free_port(), free_port()
            inbound_h2 = inbound(app.port, protocol="http2")
            inbound_h2[0]["listen"] = f"127.0.0.1:{h2_port}"
            upstream = outbound(f"127.0.0.1:{h2_port}", workload("l4"))
            upstream[0].update(protocol="http2", listen=f"127.0.0.1:{outbound_port}")
            capture = {"inbound_port": free_port(), "outbound_port": free_port()}
            changed = {**raw, "inbound": tcp + inbound_h2, "outbound": loop + upstream}
            await reload(agent, tmp_path / "l4.yaml", {**changed, "capture": capture})

            connection = await h2client.connect("127.0.0.1", outbound_port)
            try:
                answered = await exchange(connection, H2_GET, body=b"")
            finally:
                connection.close()
            assert (answered.status, answered.body) == (200, b"app"), "".join(agent.log)
            assert [request.header(b":path") for request in app.requests] == [b"/first"]

            with socket.create_connection(("127.0.0.1", capture["outbound_port"]), 5) as sock:
                sock.settimeout(5)
                assert sock.recv(1) == b""  # closed: nothing told it where the app was going
            assert await eventually(
                lambda: (
                    agent.total("outrider_connections_refused_total", direction="outbound") == 1
                ),
                10,
            ), "".join(agent.log)
            assert await round_trip(tcp_out) == b"ping"  # what ran before runs on
            await asyncio.to_thread(agent.stop)
    if workers == 1:
        assert loaded_modules(dumped) >= H2_STACK | CAPTURE
    else:  # the main process serves nothing: its workers loaded the h2 stack, it did not
        assert not loaded_modules(dumped) & H2_STACK


async def test_a_snapshot_turns_on_h2_in_an_l4_agent_and_its_first_request_is_served(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    """An agent of a control plane (tests/control.py) runs an L4 snapshot, then one that
    adds an `http2` inbound port and an `http2` upstream to it (its own SPIFFE ID)."""
    dumped = tmp_path / "subscribed.modules"
    async with echo_server() as echo_port, h2_backend("app") as app:
        tcp = inbound(echo_port)
        with control_plane(setup, {"inbound": tcp}) as plane:
            control = bootstrap(plane.address, pod="subscribed-0")
            raw = served_agent_yaml(setup, ca, "subscribed", control=control)
            with agent_process(
                tmp_path,
                "subscribed",
                raw,
                launcher=MODULES_AT_EXIT,
                env={MODULES_FILE: str(dumped)},
            ) as agent:
                h2_port, outbound_port = free_port(), free_port()
                inbound_h2 = inbound(app.port, protocol="http2")
                inbound_h2[0]["listen"] = f"127.0.0.1:{h2_port}"
                upstream = outbound(f"127.0.0.1:{h2_port}", workload("subscribed"))
                upstream[0].update(protocol="http2", listen=f"127.0.0.1:{outbound_port}")
                version = plane.publish({"inbound": tcp + inbound_h2, "outbound": upstream})
                answer = await asyncio.to_thread(plane.answer, version)
                assert answer.kind == "ack", "".join(agent.log)

                connection = await h2client.connect("127.0.0.1", outbound_port)
                try:
                    answered = await exchange(connection, H2_GET, body=b"")
                finally:
                    connection.close()
                assert (answered.status, answered.body) == (200, b"app"), "".join(agent.log)
                await asyncio.to_thread(agent.stop)
    assert loaded_modules(dumped) >= H2_STACK


async def test_a_control_plane_agent_with_an_http_port_idles_as_one_configured_from_a_file(
    setup: CaSetup, ca: CaProcess, tmp_path: Path
) -> None:
    """Every injected sidecar takes its ports from the control plane, after start-up: the
    h2 stack an `http` port loads took 2.3 MiB more there than at start (imported amid
    start-up's leftovers, on the thread that checks the snapshot). Same ports, same
    memory, give or take 1 MiB, whichever way the config came."""
    async with echo_server() as echo_port:
        ports = inbound(echo_port, protocol="http")
        with control_plane(setup, {"inbound": ports}) as plane:
            control = bootstrap(plane.address, pod="subscribed-0")
            raw = served_agent_yaml(setup, ca, "subscribed", control=control)
            with agent_process(tmp_path, "subscribed", raw) as agent:
                subscribed = rss_kib(agent.process.pid)
                await asyncio.to_thread(agent.stop)
        raw = served_agent_yaml(setup, ca, "filed", inbound=ports)
        with agent_process(tmp_path, "filed", raw) as agent:
            filed = rss_kib(agent.process.pid)
            await asyncio.to_thread(agent.stop)
    assert subscribed - filed < 1024, (subscribed / 1024, filed / 1024)  # KiB: 1 MiB
