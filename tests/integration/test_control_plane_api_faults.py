"""`outrider control serve` as a real process, when the API server misbehaves.

What the agents rely on: a fault of the API server never takes a policy away
from them. Only the API server saying that a policy is gone (a DELETED
event, or a list without it) does.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.apiserver import fake_api_server
from tests.control_process import (
    DEFAULT_DENY,
    NAMESPACES,
    PERMISSIVE,
    control_plane,
    pod,
    ready,
    subscribed,
)


async def test_a_transient_404_for_policies_does_not_take_them_from_the_agents(
    tmp_path: Path,
) -> None:
    """kube-apiserver answers 404 for a custom resource that exists for a moment after it
    or etcd restarts, and between HA replicas that have not all seen its CRD
    (kubernetes/kubernetes#71218, #115241, #99199). A CRD really deleted deletes its
    objects first, and the watch brings those deletions: a 404 alone proves nothing."""
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        api.apply(pod("shop", "web", "web"))
        api.apply(DEFAULT_DENY)
        async with control_plane(tmp_path, api) as control:
            await ready(control)
            async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
                _, config = await agent.next()
                assert [p["name"] for p in config["policy"]["policies"]] == ["shop/default-deny"]
                api.fail_next(3, 404, kinds=["AuthorizationPolicy"])
                api.drop_watches()  # every kind watches again; policies are answered 404
                try:
                    async with asyncio.timeout(3):
                        while True:
                            _, config = await agent.next(timeout=3)
                            names = [p["name"] for p in config["policy"]["policies"]]
                            assert names == ["shop/default-deny"], "the deny policy was dropped"
                except TimeoutError:
                    pass  # nothing new was sent: the agent keeps its policy
                assert (await control.debug("/ready"))[0] == 200


async def test_policies_answered_404_at_start_hold_readiness_until_they_are_listed(
    tmp_path: Path,
) -> None:
    """AuthorizationPolicy is Outrider's own CRD, installed before the control plane: a
    404 for it is a fault, never "no policies". Ready without them, the control plane
    would send agents configurations without their namespace's default deny."""
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        api.apply(pod("shop", "web", "web"))
        api.apply(DEFAULT_DENY)
        api.fail_next(1, 404, kinds=["AuthorizationPolicy"])
        async with control_plane(tmp_path, api) as control:
            async with subscribed(control, control.ca.workload("shop", "web"), "web") as agent:
                _, config = await agent.next(timeout=10)
            assert [p["name"] for p in config["policy"]["policies"]] == ["shop/default-deny"]
            warned = [line for line in control.log if "AuthorizationPolicy" in line]
            assert "deploy/base/crds" in warned[0]


async def test_peer_authentications_answered_404_at_start_hold_readiness_until_listed(
    tmp_path: Path,
) -> None:
    """PeerAuthentication is Outrider's own CRD too, installed with AuthorizationPolicy's.
    Ready without them (a 404 after the API server restarts), a control plane would turn
    every PERMISSIVE pod STRICT for as long as it takes to ask again, and shut out the
    callers a migration still needs."""
    async with fake_api_server(tmp_path / "api") as api:
        api.apply(NAMESPACES)
        api.apply(pod("shop", "api", "api", captured=True))
        api.apply(PERMISSIVE)
        api.fail_next(1, 404, kinds=["PeerAuthentication"])
        async with control_plane(tmp_path, api) as control:
            async with subscribed(control, control.ca.workload("shop", "api"), "api") as agent:
                _, config = await agent.next(timeout=10)
            assert config["captured"]["inbound"]["mtls"] == "permissive"
            warned = [line for line in control.log if "PeerAuthentication" in line]
            assert "deploy/base/crds" in warned[0]
