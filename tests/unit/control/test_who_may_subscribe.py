"""Who may subscribe for which pod, and what proxy-status makes of an agent's answers."""

from __future__ import annotations

from typing import Any

import pytest

from control.core.mesh import Mesh, PodIdentity
from control.server import refusal, workload
from identity import SpiffeId
from outrider.debugapi import ack_state

MESH = Mesh(pods={("shop", "web-0"): PodIdentity("shop", "web-0", "web")})


def test_an_svid_of_a_workload_names_its_namespace_and_service_account() -> None:
    spiffe_id = SpiffeId.parse("spiffe://example.org/ns/shop/sa/web")
    assert workload(spiffe_id) == ("shop", "web")


@pytest.mark.parametrize(
    "spiffe_id",
    [
        "spiffe://example.org/ns/shop",
        "spiffe://example.org/ns/shop/sa/web/extra",
        "spiffe://example.org/sa/web/ns/shop",
        "spiffe://example.org/workload/web",
    ],
)
def test_an_svid_that_names_no_kubernetes_workload_is_refused(spiffe_id: str) -> None:
    with pytest.raises(ValueError, match="is not spiffe://<trust domain>/ns/<namespace>/sa/"):
        workload(SpiffeId.parse(spiffe_id))


@pytest.mark.parametrize(
    ("namespace", "account", "pod", "why"),
    [
        ("shop", "web", "web-0", None),
        ("shop", "web", "web-1", "no pod shop/web-1 in the mesh"),
        ("billing", "web", "web-0", "no pod billing/web-0 in the mesh"),
        ("shop", "admin", "web-0", "pod shop/web-0 runs as service account web, not admin"),
    ],
)
def test_a_pod_may_be_spoken_for_only_from_its_namespace_as_its_service_account(
    namespace: str, account: str, pod: str, why: str | None
) -> None:
    found = refusal(MESH, namespace, account, pod)
    if why is None:
        assert found is None
    else:
        assert found is not None and found.startswith(why)


def agent(**fields: Any) -> dict[str, Any]:
    return {"sent": "v2", "acked": None, "nack": None, "latest": "v2", **fields}


@pytest.mark.parametrize(
    ("shown", "state"),
    [
        (agent(acked="v2"), "SYNCED"),
        (agent(acked="v1"), "STALE"),  # v2 is on its way
        (agent(acked="v2", latest="v3"), "STALE"),  # v3 not sent yet
        (agent(acked="v1", nack={"version": "v2", "error": "bad"}), "NACK (bad)"),
        (agent(acked="v2", nack={"version": "v1", "error": "old"}), "SYNCED"),
        (agent(), "STALE"),
    ],
)
def test_proxy_status_names_each_agents_state(shown: dict[str, Any], state: str) -> None:
    assert ack_state(shown) == state
