"""The agent names itself and the SVID it holds in its metrics: one series for the SVID in
use, replaced on each rotation, so Prometheus keeps the history; denies name the caller."""

from __future__ import annotations

from datetime import timedelta

from agent.adapters.metrics import AgentMetrics
from agent.core.svid import Svid, accept_svid
from ca.signers.local import LocalSigner
from identity.build import VERSION
from tests.unit.agent.pki import NOW, WEB, agent_key, bundle_der, sign_leaf


def renewed(signer: LocalSigner) -> Svid:
    key = agent_key()
    return accept_svid(
        sign_leaf(signer, key, lifetime=timedelta(hours=2)), bundle_der(signer), key, WEB, NOW
    )


def series(metrics: AgentMetrics, name: str) -> list[dict[str, str]]:
    return [
        sample.labels
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == name and sample.value == 1
    ]


def test_the_agent_names_itself() -> None:
    metrics = AgentMetrics(WEB)
    assert series(metrics, "outrider_agent_info") == [{"spiffe_id": str(WEB), "version": VERSION}]


def test_the_svid_in_use_is_one_series_replaced_on_rotation(
    svid: Svid, signer: LocalSigner
) -> None:
    metrics = AgentMetrics(WEB)
    assert series(metrics, "outrider_svid_info") == []
    metrics.svid_installed(svid)
    next_svid = renewed(signer)
    metrics.svid_installed(next_svid)
    assert series(metrics, "outrider_svid_info") == [
        {
            "spiffe_id": str(WEB),
            "serial": f"{next_svid.leaf.serial:x}",
            "not_before": next_svid.not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "not_after": next_svid.not_after.strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
    ]
    assert series(metrics, "outrider_svid_info")[0]["serial"] != svid.serial
    expiry = metrics.registry.get_sample_value("outrider_svid_expiry_timestamp_seconds")
    assert expiry == next_svid.not_after.timestamp()


def test_a_deny_names_the_verified_caller_or_none() -> None:
    metrics = AgentMetrics(WEB)
    metrics.denied("guard", "no-admin", WEB)
    metrics.denied("guard", "no-admin", None)
    read = metrics.registry.get_sample_value
    name = "outrider_authz_denials_total"
    assert read(name, {"policy": "guard", "rule": "no-admin", "peer_id": str(WEB)}) == 1
    assert read(name, {"policy": "guard", "rule": "no-admin", "peer_id": ""}) == 1
