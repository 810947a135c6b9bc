"""The status writer, against the fake API server over HTTPS: what it keeps about the
objects it wrote goes with them. Policies and routes come and go for as long as the
control plane runs (a namespace per CI run, say)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest

from control.informers import RESOURCES, KubernetesClusterApi
from control.metrics import ControlMetrics
from control.sync import StatusWriter
from tests.apiserver import fake_api_server
from tests.control_process import NAMESPACES, eventually
from tests.support import scraped

POLICIES = 20
WRITES = "outrider_control_status_writes_total"
ACCEPTED = {
    "type": "Accepted",
    "status": "True",
    "reason": "Accepted",
    "message": "",
    "observedGeneration": 1,
    "lastTransitionTime": "2026-01-01T00:00:00Z",
}
STATUS = {"observedGeneration": 1, "conditions": [ACCEPTED]}


async def test_what_was_written_for_deleted_objects_is_forgotten(tmp_path: Path) -> None:
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        for i in range(POLICIES):
            api.apply(
                "apiVersion: security.outrider.io/v1alpha1\nkind: AuthorizationPolicy\n"
                f"metadata: {{name: p{i}, namespace: shop}}\nspec: {{}}\n"
            )
        cluster = await asyncio.to_thread(KubernetesClusterApi, api.kubeconfig(tmp_path / "kc"))
        items, _ = await asyncio.to_thread(cluster.list, RESOURCES["AuthorizationPolicy"])
        objects: dict[str, Any] = {
            "AuthorizationPolicy": {("shop", o["metadata"]["name"]): o for o in items}
        }
        metrics = ControlMetrics()
        writer = StatusWriter(cluster, lambda: objects, metrics)
        running = asyncio.create_task(writer.run())
        try:
            writer.offer(
                {("AuthorizationPolicy", "shop", f"p{i}"): STATUS for i in range(POLICIES)}
            )

            async def written() -> bool:
                text = generate_latest(metrics.registry).decode()
                return scraped(text, WRITES, result="written") == POLICIES

            await eventually(written, timeout=10)
            assert writer.remembered == POLICIES
            objects["AuthorizationPolicy"] = {}  # every policy deleted
            writer.offer({})
            assert writer.remembered == 0
        finally:
            running.cancel()
