"""A resident agent never loads `cryptography` (issue 19: 8.6 MiB of an idle agent).

It reads, checks and makes X.509 through the OpenSSL its `ssl` module loaded
(identity/cert.py). Two real agents of a real `ca serve` show it over a whole
working life: the server agent runs two workers and its SVID lives 4 s, so it
rotates about every 2 s (a CSR from a new key, the CA's chain checked); the
pair serves traffic before and after; the bundle file drops a root (the roots
in use change); a SIGHUP reloads the config with a new upstream, served at
once. At every step no process of either agent, main or worker, has
cryptography's Rust extension mapped, and the server's main process had
imported no `cryptography` module when it exited.
"""

from __future__ import annotations

import asyncio
import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from tests.integration.test_bundle_sync import Roots
from tests.mesh import (
    MODULES_AT_EXIT,
    MODULES_FILE,
    AgentProcess,
    agent_process,
    agent_yaml,
    echo_server,
    eventually,
    inbound,
    loaded_modules,
    outbound,
    round_trip,
    workload,
)
from tests.support import ca_process, free_port

PAYLOAD = b"through the pair"
#: cryptography's compiled half (and its own OpenSSL): mapped once anything imports it.
RUST_EXTENSION = "_rust.abi3.so"


def processes(agent: AgentProcess) -> set[int]:
    """The agent's main process and its workers (its children)."""
    pid = agent.process.pid
    workers = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return {pid, *map(int, workers)}


def cryptography_mapped(*agents: AgentProcess) -> list[str]:
    """Lines of /proc/PID/maps, of every process of `agents`, that map cryptography."""
    return [
        f"{agent.name} {pid}: {line}"
        for agent in agents
        for pid in processes(agent)
        for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
        if RUST_EXTENSION in line and "cryptography" in line
    ]


def rotations(agent: AgentProcess) -> float:
    return agent.sample("outrider_svid_rotations_total", result="success")


async def test_an_agent_serves_rotates_follows_its_bundle_and_reloads_without_cryptography(
    tmp_path: Path,
) -> None:
    roots = Roots(tmp_path)  # a CA with two roots in its bundle and the agents' file
    setup = roots.setup
    dumped = tmp_path / "server.modules"

    def config(name: str, **sections: Any) -> dict[str, Any]:
        token = setup.issuer.token("demo", name)
        raw = agent_yaml(setup.root, name, ca_address=roots.ca_address, token=token, **sections)
        raw["ca"].update({"bundle_file": str(roots.agents_file), "bundle_refresh": "1s"})
        return raw

    with ExitStack() as stack:
        stack.enter_context(ca_process(setup.config))
        async with echo_server() as app_port:
            raw = config("server", inbound=inbound(app_port), workers=2)
            raw["identity"]["ttl"] = "4s"  # renewed about every 2 s
            server = stack.enter_context(
                agent_process(
                    setup.root,
                    "server",
                    raw,
                    launcher=MODULES_AT_EXIT,
                    env={MODULES_FILE: str(dumped)},
                )
            )
            upstream = outbound(server.bound["inbound[0]"], workload("server"))
            client = stack.enter_context(
                agent_process(setup.root, "client", config("client", outbound=upstream))
            )
            through = client.bound["outbound[backend]"]
            assert await round_trip(through, PAYLOAD) == PAYLOAD
            assert not cryptography_mapped(server, client)

            started = rotations(server)
            assert await eventually(lambda: rotations(server) >= started + 2, 20), "".join(
                server.log
            )
            assert await round_trip(through, PAYLOAD) == PAYLOAD
            assert not cryptography_mapped(server, client)

            roots.agents_file.write_bytes(roots.new_root)  # the operator drops the old root
            for agent in (server, client):
                assert await eventually(
                    lambda agent=agent: len(agent.certs()["bundle"]["roots"]) == 1, 15
                ), agent.name
            assert not cryptography_mapped(server, client)

            # The reload adds an upstream to the server: its own port, over mTLS both ways.
            loop = outbound(server.bound["inbound[0]"], workload("server"), name="self")
            loop[0]["listen"] = looped = f"127.0.0.1:{free_port()}"
            (setup.root / "server.yaml").write_text(yaml.safe_dump({**raw, "outbound": loop}))
            server.process.send_signal(signal.SIGHUP)
            assert await eventually(
                lambda: (
                    server.sample("outrider_config_reloads_total", kind="agent", result="ok") == 1
                ),
                10,
            ), "".join(server.log)
            assert await round_trip(through, PAYLOAD) == PAYLOAD
            assert await round_trip(looped, PAYLOAD) == PAYLOAD
            assert not cryptography_mapped(server, client)

            assert await asyncio.to_thread(server.stop) == 0, "".join(server.log)
    imported = {name for name in loaded_modules(dumped) if name.split(".")[0] == "cryptography"}
    assert "agent.adapters.rotator" in loaded_modules(dumped)  # the dump is the agent's
    assert not imported, sorted(imported)[:5]
