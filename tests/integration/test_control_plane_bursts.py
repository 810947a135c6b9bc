"""`outrider control serve` as a real process, when changes come in bursts.

A rollout changes endpoints many times a second, and each change is a push
that every agent answers. Those answers are frames the connection's budget
counts (identity.grpcserving): each push earns its answer, so an agent that
keeps up keeps its connection, while one that sends what nothing asked for
is still cut off.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from grpclib.exceptions import StreamTerminatedError

from tests.apiserver import FakeApiServer, fake_api_server
from tests.control_process import (
    NAMESPACES,
    ControlProcess,
    pod,
    subscribed,
)
from tests.support import scraped

PUSHES = 200
POLICY = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: callers, namespace: shop}}
spec:
  rules:
    - from: {{principals: ["spiffe://example.org/ns/shop/sa/caller-{i}"]}}
"""


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[FakeApiServer]:
    async with fake_api_server(tmp_path / "api") as server:
        server.apply(NAMESPACES)
        server.apply(pod("shop", "web", "web"))
        yield server


async def test_an_agent_that_acks_every_push_of_a_burst_keeps_its_connection(
    control: ControlProcess, api: FakeApiServer
) -> None:
    async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
        version, _ = await agent.next()
        await agent.ack(version)
        for i in range(PUSHES):
            api.apply(POLICY.format(i=i))
            version, _ = await agent.next()
            await agent.ack(version)
    _, metrics = await control.debug("/metrics")
    assert scraped(metrics, "outrider_control_pushes_total", result="acked") == PUSHES + 1


async def test_an_agent_that_sends_answers_nothing_asked_for_is_cut_off(
    control: ControlProcess,
) -> None:
    with pytest.raises(StreamTerminatedError):
        async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
            version, _ = await agent.next()
            async with asyncio.timeout(10):
                for _ in range(5000):
                    await agent.ack(version)
                await agent.next()
