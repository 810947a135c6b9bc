"""Reloading the agent's config in place: listeners come and go, a bad file changes nothing."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
import yaml

from agent import config as agent_config
from agent.app import Agent
from tests.mesh import (
    agent_yaml,
    echo_server,
    inbound,
    local_sign,
    running_agent,
    sample,
)
from tests.support import CaSetup


async def connect(address: str) -> None:
    host, port = address.rsplit(":", 1)
    _, writer = await asyncio.open_connection(host, int(port))
    writer.close()


def reloads(agent: Agent, result: str) -> float:
    return sample(agent, "outrider_config_reloads_total", kind="agent", result=result)


async def test_a_new_listener_opens_and_a_removed_one_closes(
    setup: CaSetup, tmp_path: Path
) -> None:
    async with echo_server() as app_port:
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port))
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            first = agent.bound["inbound[0]"]
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                second = f"127.0.0.1:{probe.getsockname()[1]}"
            raw["inbound"] = [{"listen": second, "app": f"127.0.0.1:{app_port}"}]
            path = tmp_path / "agent.yaml"
            path.write_text(yaml.safe_dump(raw))
            await agent.reload(path)
            assert agent.bound["inbound[0]"] == second
            assert reloads(agent, "ok") == 1
            await connect(second)
            with pytest.raises(OSError):
                await connect(first)


async def test_an_address_in_use_keeps_the_running_config(setup: CaSetup, tmp_path: Path) -> None:
    async with echo_server() as app_port:
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port))
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            before, config = dict(agent.bound), agent.config
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                busy = f"127.0.0.1:{taken.getsockname()[1]}"
                raw["inbound"].append({"listen": busy, "app": f"127.0.0.1:{app_port}"})
                raw["limits"] = {"max_connections": 5}
                path = tmp_path / "agent.yaml"
                path.write_text(yaml.safe_dump(raw))
                await agent.reload(path)
            assert reloads(agent, "error") == 1
            assert (agent.bound, agent.config) == (before, config)
            assert agent.runtime.limits == config.limits
            assert agent_config.load(path) != config  # the file did change


async def test_a_file_that_does_not_validate_changes_nothing(
    setup: CaSetup, tmp_path: Path
) -> None:
    async with echo_server() as app_port:
        raw = agent_yaml(setup.root, "backend", inbound=inbound(app_port))
        async with running_agent(raw, local_sign(setup), setup.root) as agent:
            config = agent.config
            path = tmp_path / "agent.yaml"
            path.write_text(yaml.safe_dump({**raw, "inbound": [{"listen": "nowhere"}]}))
            await agent.reload(path)
            assert reloads(agent, "error") == 1
            assert agent.config is config
