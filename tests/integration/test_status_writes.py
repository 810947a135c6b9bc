"""The status writer, against the fake API server over HTTPS: what it keeps about the
objects it wrote goes with them (policies and routes come and go for as long as the
control plane runs: a namespace per CI run, say), and a status the API server can never
store (its object past the 1.5 MiB etcd keeps) is refused once, not retried, and does
not hold up the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from control.informers import RESOURCES, KubernetesClusterApi, Refused
from control.metrics import ControlMetrics
from control.sync import StatusWriter
from tests.apiserver import FakeApiServer, fake_api_server
from tests.control_process import NAMESPACES, eventually
from tests.support import scraped

WRITES = "outrider_control_status_writes_total"
ACCEPTED = {
    "type": "Accepted",
    "status": "True",
    "reason": "Accepted",
    "message": "enforced",
    "observedGeneration": 1,
    "lastTransitionTime": "2026-01-01T00:00:00Z",
}
STATUS = {"observedGeneration": 1, "conditions": [ACCEPTED]}
#: A version in force whose copy takes the object past 1.5 MiB (the request stays under
#: the 3 MiB kube-apiserver reads, so etcd is what refuses it).
HUGE = {
    **STATUS,
    "inForce": {
        "generation": 1,
        "spec": {"rules": [{"from": {"principals": ["x" * 100] * 16000}}]},
    },
}


@dataclass
class Writing:
    api: FakeApiServer
    cluster: KubernetesClusterApi
    objects: dict[str, Any]
    metrics: ControlMetrics
    writer: StatusWriter

    def writes(self, result: str) -> float:
        return scraped(generate_latest(self.metrics.registry).decode(), WRITES, result=result)


@asynccontextmanager
async def writing(tmp_path: Path, names: list[str]) -> AsyncIterator[Writing]:
    """AuthorizationPolicies `names` in namespace shop, read back, and a running writer."""
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        for name in names:
            api.apply(
                "apiVersion: security.outrider.io/v1alpha1\nkind: AuthorizationPolicy\n"
                f"metadata: {{name: {name}, namespace: shop}}\nspec: {{}}\n"
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
            yield Writing(api, cluster, objects, metrics, writer)
        finally:
            running.cancel()


async def test_what_was_written_for_deleted_objects_is_forgotten(tmp_path: Path) -> None:
    names = [f"p{i}" for i in range(20)]
    async with writing(tmp_path, names) as w:
        w.writer.offer({("AuthorizationPolicy", "shop", name): STATUS for name in names})

        async def written() -> bool:
            return w.writes("written") == len(names)

        await eventually(written, timeout=10)
        assert w.writer.remembered == len(names)
        w.objects["AuthorizationPolicy"] = {}  # every policy deleted
        w.writer.offer({})
        assert w.writer.remembered == 0


async def test_a_status_too_large_to_store_is_refused_once_and_the_others_are_written(
    tmp_path: Path,
) -> None:
    async with writing(tmp_path, ["huge", "small"]) as w:
        huge, small = (
            ("AuthorizationPolicy", "shop", "huge"),
            ("AuthorizationPolicy", "shop", "small"),
        )
        w.writer.offer({huge: HUGE, small: STATUS})

        async def small_written() -> bool:
            return w.writes("written") == 1

        await eventually(small_written, timeout=5)
        assert w.writes("refused") == 1 and w.writes("failed") == 0
        assert w.writer.failures == 0  # no backoff for the others
        w.writer.offer({huge: HUGE})  # asked again
        await asyncio.sleep(0.2)
        assert w.writes("refused") == 1  # not sent again
        sent = [r for r in w.api.requests if r.verb in ("update", "patch") and "huge" in r.path]
    assert len(sent) == 1


async def test_the_api_server_refuses_an_object_past_what_etcd_keeps(tmp_path: Path) -> None:
    """The fake's sizes, as kube-apiserver's: 500 from etcd past 1.5 MiB, 413 for a request
    past 3 MiB; the control plane takes both for refusals (the same write would fail
    again), not for a passing fault."""
    async with writing(tmp_path, ["p"]) as w:
        resource = RESOURCES["AuthorizationPolicy"]
        policy = w.objects["AuthorizationPolicy"][("shop", "p")]
        larger = {**HUGE, "inForce": {**HUGE["inForce"], "spec": {"x": ["x" * 100] * 32000}}}
        for status, answer in ((HUGE, "500"), (larger, "413")):
            with pytest.raises(Refused, match=answer):
                await asyncio.to_thread(
                    w.cluster.replace_status, resource, {**policy, "status": status}
                )
