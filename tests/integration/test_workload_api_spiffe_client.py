"""py-spiffe, a real SPIFFE client, against the agent's Workload API socket."""

from __future__ import annotations

import asyncio
import time

from tests.mesh import workload
from tests.support import CaSetup
from tests.workload_api import keys_handed_out, next_line, rotate, spiffe_client, workload_agent

ROTATIONS = 3


async def test_x509_source_gets_an_svid_that_verifies_and_each_rotation_on_one_connection(
    setup: CaSetup,
) -> None:
    async with workload_agent(setup) as (agent, path), spiffe_client(path, ROTATIONS) as client:
        first = await next_line(client)
        assert first == {**first, "spiffe_id": str(workload("web")), "verified": True}
        serials, latencies = [first["serial"]], []
        for _ in range(ROTATIONS):
            rotated_at = time.time()
            rotate(agent)
            update = await next_line(client)
            latencies.append(update["at"] - rotated_at)
            assert update["verified"] is True
            serials.append(update["serial"])
        assert await asyncio.wait_for(client.wait(), 10) == 0
        assert len(set(serials)) == ROTATIONS + 1  # a new SVID each time, on the one stream
        assert keys_handed_out(agent, "workload") == ROTATIONS + 1  # one connection: no retry
        print("py-spiffe: rotation to delivery", ", ".join(f"{s * 1000:.1f} ms" for s in latencies))
