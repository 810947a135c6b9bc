"""Real agents subscribe to the real control plane: `outrider agent run` with a bootstrap's
`control:` section, against `outrider control serve` reading a fake API server.

Both get their SVIDs from one test CA (the agent through `ca serve`), as in a
cluster. What an operator relies on: the agent runs what the control plane
compiled for its pod, acknowledges it, and `proxy-status` says SYNCED; a
policy applied in the API reaches the running agent within 2 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.apiserver import FakeApiServer, fake_api_server_thread
from tests.control import bootstrap
from tests.control_process import ControlProcess, control_plane, eventually, outrider, ready
from tests.mesh import agent_process, served_agent_yaml
from tests.support import CaProcess, CaSetup

#: An injected pod of workload web (namespace demo, tests.mesh's) with no container port:
#: no inbound listener to bind, so the test needs no fixed port.
WEB_POD = """\
apiVersion: v1
kind: Namespace
metadata: {name: demo}
---
apiVersion: v1
kind: Pod
metadata: {name: web-0, namespace: demo, labels: {app: web}}
spec:
  serviceAccountName: web
  containers:
    - {name: app, image: app:1}
    - {name: outrider-agent, image: agent:1}
"""
DENY_ADMIN = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: demo}
spec:
  action: DENY
  rules:
    - to: {paths: ["/admin"]}
"""


@pytest.fixture
def api(tmp_path: Path) -> Iterator[FakeApiServer]:
    # Its own loop: the agent process is waited for with blocking calls.
    with fake_api_server_thread(tmp_path / "api") as server:
        server.apply(WEB_POD)
        yield server


async def synced(control: ControlProcess, pod: str) -> dict[str, object]:
    """The agent of `pod` in /debug/agents, once it runs the latest version."""
    shown: dict[str, object] = {}

    async def in_sync() -> bool:
        nonlocal shown
        agents = (await control.debug("/debug/agents"))[1]
        mine = [a for a in agents if a["pod"] == pod]
        shown = mine[0] if mine else {}
        nack = shown.get("nack")
        assert not nack, f"the agent refused its configuration: {nack}"
        return bool(mine) and shown["acked"] == shown["latest"] is not None

    await eventually(in_sync, timeout=15)
    return shown


async def test_an_agent_runs_its_pods_configuration_and_follows_a_policy_change(
    tmp_path: Path, setup: CaSetup, ca: CaProcess, api: FakeApiServer
) -> None:
    async with control_plane(tmp_path, api, ca_dir=setup.ca_dir) as control:
        await ready(control)
        control_address = f"127.0.0.1:{control.grpc_port}"
        raw = served_agent_yaml(setup, ca, "web", control=bootstrap(control_address, pod="web-0"))
        with agent_process(setup.root, "web", raw, ready=False) as agent:
            first = await synced(control, "demo/web-0")
            assert first["spiffe_id"] == "spiffe://example.org/ns/demo/sa/web"
            assert agent.config_dump()["control_plane"]["version"] == first["latest"]
            assert agent.sample("outrider_control_plane_connected") == 1

            started = time.monotonic()
            api.apply(DENY_ADMIN)
            second = await synced(control, "demo/web-0")
            while second["latest"] == first["latest"]:
                await asyncio.sleep(0.05)
                second = await synced(control, "demo/web-0")
            elapsed = time.monotonic() - started
            print(f"\nAPI change -> the agent's ACK: {elapsed * 1000:.0f} ms")
            assert elapsed < 2.0
            running = agent.config_dump()
            assert running["control_plane"]["version"] == second["latest"]
            assert "demo/no-admin" in json.dumps(running["config"])

            table = await outrider("proxy-status", "--control", control.debug_url)
    assert table.returncode == 0, table.stderr
    (row,) = table.stdout.splitlines()[1:]
    assert row.startswith("demo/web-0  spiffe://example.org/ns/demo/sa/web  ")
    assert row.endswith("SYNCED")
