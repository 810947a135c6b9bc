"""The agent hands freed memory back while connections churn, and leaves an idle heap alone."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from agent.adapters import memory


async def test_the_heap_is_trimmed_only_after_connections_came_and_went(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(memory, "TRIM_INTERVAL", 0.01)
    accepted, trims = [0], []
    task = asyncio.create_task(
        memory.return_freed_memory(lambda: accepted[0], lambda pad: trims.append(pad) or 1)
    )
    await asyncio.sleep(0.05)
    assert trims == []  # idle: nothing to give back
    accepted[0] += 3
    await asyncio.sleep(0.05)
    assert trims == [0]  # once for the churn, not on every tick after it
    task.cancel()


def test_glibc_malloc_trim_is_found_here() -> None:
    trim = memory._malloc_trim()
    assert trim is not None and trim(0) in (0, 1)


def test_the_agent_loads_what_its_configuration_uses_when_it_uses_it() -> None:
    """Everything `outrider agent run` imports before it reads its configuration leaves
    out what only some agents use (each module stays in memory for good): the Workload
    API, the control-plane client, gRPC health probes, PyJWT, the CA's gRPC client until
    the first CA call, the workers' main process and channel (`workers:` above 1), and
    Kubernetes never."""
    script = (
        "import sys, outrider.cli\n"
        "from agent import app, config\n"
        "from agent.core.policyfile import PolicyError\n"
        "print(' '.join(sys.modules))\n"
    )
    loaded = set(
        subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, check=True
        ).stdout.split()
    )
    assert "agent.app" in loaded
    later = {
        "agent.adapters.workload_api",
        "agent.adapters.control_plane",
        "agent.adapters.ca_client",
        "agent.supervisor",
        "agent.adapters.workers",
        "identity.proto.health_pb2",
        "grpclib.client",
        "google.protobuf",
        "jwt",
        "kubernetes",
    }
    assert loaded & later == set()
