"""A status the API server can never store (its object past the 1.5 MiB etcd keeps, which
kube-apiserver answers with a 500): refused once and not written again, and the writer
does not back off the other objects' statuses for it, against the fake API server."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest

from control.informers import RESOURCES, KubernetesClusterApi, Refused
from control.metrics import ControlMetrics
from control.sync import StatusWriter
from tests.apiserver import fake_api_server
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


async def test_a_status_too_large_to_store_is_refused_once_and_the_others_are_written(
    tmp_path: Path,
) -> None:
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        for name in ("huge", "small"):
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

        def writes(result: str) -> float:
            return scraped(generate_latest(metrics.registry).decode(), WRITES, result=result)

        try:
            writer.offer(
                {
                    ("AuthorizationPolicy", "shop", "huge"): HUGE,
                    ("AuthorizationPolicy", "shop", "small"): STATUS,
                }
            )

            async def small_written() -> bool:
                return writes("written") == 1

            await eventually(small_written, timeout=5)
            assert writes("refused") == 1 and writes("failed") == 0
            assert writer.failures == 0  # no backoff for the others
            writer.offer({("AuthorizationPolicy", "shop", "huge"): HUGE})  # asked again
            await asyncio.sleep(0.2)
            assert writes("refused") == 1  # not sent again
        finally:
            running.cancel()
    refused = [r for r in api.requests if r.verb in ("update", "patch") and "huge" in r.path]
    assert len(refused) == 1


async def test_the_api_server_refuses_an_object_past_what_etcd_keeps(tmp_path: Path) -> None:
    """The fake's sizes, as kube-apiserver's: 500 from etcd past 1.5 MiB, 413 for a request
    past 3 MiB; the control plane takes both for refusals (the same write would fail
    again), not for a passing fault."""
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        api.apply(
            "apiVersion: security.outrider.io/v1alpha1\nkind: AuthorizationPolicy\n"
            "metadata: {name: p, namespace: shop}\nspec: {}\n"
        )
        cluster = await asyncio.to_thread(KubernetesClusterApi, api.kubeconfig(tmp_path / "kc"))
        resource = RESOURCES["AuthorizationPolicy"]
        (policy,), _ = await asyncio.to_thread(cluster.list, resource)
        larger = {**HUGE, "inForce": {**HUGE["inForce"], "spec": {"x": ["x" * 100] * 32000}}}
        for status, answer in ((HUGE, "500"), (larger, "413")):
            with pytest.raises(Refused, match=answer):
                await asyncio.to_thread(
                    cluster.replace_status, resource, {**policy, "status": status}
                )
