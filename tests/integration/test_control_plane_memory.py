"""`outrider control serve` as a real process: what it holds does not grow with changes.

A change to a policy that selects every pod gives each pod a new version. The
control plane keeps the snapshots it encoded only for the mesh in force: the
versions an older mesh gave are never sent again.
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

from tests.apiserver import fake_api_server
from tests.control_process import NAMESPACES, control_plane, pod, ready, subscribed
from tests.floods import rss_kib

PODS, CHANGES = 40, 25
#: One policy of 20 principals is ~870 bytes of snapshot; 100 make each snapshot ~87 KB.
POLICY = """\
apiVersion: security.outrider.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: p{i}, namespace: shop}}
spec:
  rules:
    - from: {{principals: [{principals}]}}
"""
PRINCIPALS = ", ".join(f'"spiffe://example.org/ns/shop/sa/a{j:04d}"' for j in range(20))


async def test_snapshots_of_versions_no_longer_in_force_are_not_kept(tmp_path: Path) -> None:
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        for i in range(PODS):  # each its own port, so each its own version
            api.apply(pod("shop", f"w{i}", "web").replace("8080", str(8000 + i)))
        for i in range(100):
            api.apply(POLICY.format(i=i, principals=PRINCIPALS))
        async with control_plane(tmp_path, api) as control, AsyncExitStack() as stack:
            await ready(control)
            credential = control.ca.workload("shop", "web")
            agents = [
                await stack.enter_async_context(subscribed(control, credential, f"w{i}"))
                for i in range(PODS)
            ]
            for agent in agents:
                await agent.next()
            before = rss_kib(control.process.pid)
            for change in range(CHANGES):
                extra = f', "spiffe://example.org/ns/shop/sa/z{change}"'
                api.apply(POLICY.format(i=0, principals=PRINCIPALS + extra))
                for agent in agents:
                    await agent.next(timeout=10)
            grown = rss_kib(control.process.pid) - before
    snapshot_kib = len(agents[0].snapshots[-1].config_json) // 1024
    # Kept for every version, they would be PODS x CHANGES x ~85 KiB: ~83 MiB.
    assert grown < PODS * CHANGES * snapshot_kib // 3, f"RSS grew {grown} KiB"
