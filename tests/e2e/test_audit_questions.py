"""An auditor's five questions, asked in PromQL of a real Prometheus scraping a running mesh.

The mesh (tests.mesh.audited_mesh): a real `ca serve`, a server agent (HTTP inbound, strict,
a DENY policy on /admin*) and a client agent whose SVID lives seconds, so it rotates
while Prometheus watches. Traffic: allowed requests, a denied one, a plaintext caller
on the strict port, a TLS caller without a certificate, and requests with odd paths
and secrets in them. Each question of issue 18 must be answerable from the series
alone, and the answers must be true:

(a) was any plaintext connection accepted? (no: mtls="false" stays 0 on the strict
    port, while the plaintext attempt shows as a refusal);
(b) the TLS version and cipher mix;
(c) who talked to whom (the agent's own identity joined to its peers by instance);
(d) every certificate's serial, validity and rotations (the serials the CA logged);
(e) every deny by policy, rule and caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from identity.build import PYTHON, VERSION
from tests.mesh import AuditedMesh, audited_mesh, workload
from tests.prometheus import Prometheus, exposition_problems
from tests.support import ca_metrics_page

SERVER, CLIENT = str(workload("server")), str(workload("client"))


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuditedMesh]:
    with audited_mesh(tmp_path_factory.mktemp("audited")) as running:
        yield running


def by(result: list[dict[str, Any]], *labels: str) -> dict[tuple[str, ...], float]:
    """A result vector as {label values: value}."""
    return {
        tuple(str(series["metric"].get(label, "")) for label in labels): float(series["value"][1])
        for series in result
    }


def test_a_no_plaintext_was_accepted_and_the_attempt_shows_as_a_refusal(
    mesh: AuditedMesh,
) -> None:
    prometheus = mesh.prometheus
    refused = 'sum(outrider_connections_refused_total{direction="inbound",reason="plaintext"})'
    assert prometheus.wait_for(refused, lambda r: bool(r) and float(r[0]["value"][1]) >= 1)
    # The auditor's question, as the audit asks it: plaintext accepted on a strict port.
    accepted_on_strict = (
        'sum by (instance) (outrider_connections_total{direction="inbound",mtls="false"})'
        ' and on (instance) outrider_listener_info{direction="inbound",mtls_mode="strict"}'
    )
    assert prometheus.query(accepted_on_strict) == []
    assert (
        prometheus.value(
            'sum(outrider_connections_total{direction="inbound",mtls="false"}) or vector(0)'
        )
        == 0
    )
    # ... while mTLS connections were counted, so the zero is not an empty mesh's.
    assert prometheus.value('sum(outrider_connections_total{direction="inbound",mtls="true"})') >= 1
    # The port is known to be strict: the listener says so.
    ports = prometheus.query('outrider_listener_info{namespace="demo",direction="inbound"}')
    assert by(ports, "instance", "port", "protocol", "mtls_mode") == {
        (mesh.server.bound["admin"], mesh.server_port, "http", "strict"): 1.0
    }


def test_b_tls_version_and_cipher_mix(mesh: AuditedMesh) -> None:
    mix = by(
        mesh.prometheus.query(
            'sum by (tls_version, cipher) (outrider_tls_handshakes_total{result="ok"})'
        ),
        "tls_version",
        "cipher",
    )
    assert mix and all(version == "TLSv1.3" for version, _ in mix)
    assert all(re.fullmatch(r"TLS_(AES_\d+_GCM|CHACHA20_POLY1305)_SHA\d+", c) for _, c in mix)
    refused = mesh.prometheus.query(
        'sum by (reason) (outrider_tls_handshakes_total{result="refused",direction="inbound"})'
    )
    assert "no_client_cert" in {series["metric"]["reason"] for series in refused}


def test_c_who_talked_to_whom(mesh: AuditedMesh) -> None:
    edges = mesh.prometheus.query(
        'sum by (spiffe_id, peer_id) (outrider_connections_total{mtls="true",direction="inbound"}'
        " * on (instance) group_left (spiffe_id) outrider_agent_info)"
    )
    assert set(by(edges, "spiffe_id", "peer_id")) == {(SERVER, CLIENT)}
    agents = mesh.prometheus.query("outrider_agent_info")
    assert set(by(agents, "spiffe_id", "version", "namespace")) == {
        (SERVER, VERSION, "demo"),
        (CLIENT, VERSION, "demo"),
    }


def test_d_certificates_their_serials_validity_and_rotations(mesh: AuditedMesh) -> None:
    prometheus = mesh.prometheus
    history = f'count_over_time(outrider_svid_info{{spiffe_id="{CLIENT}"}}[10m])'
    seen = prometheus.wait_for(history, lambda r: len(r) >= 2, timeout=30)
    # Now: one series per agent, the SVID in use; the ones before it are gone.
    current = prometheus.query("outrider_svid_info")
    assert sorted(s["metric"]["spiffe_id"] for s in current) == [CLIENT, SERVER]
    issued = {
        (entry["spiffe_id"], entry["serial"])
        for entry in mesh.setup.audit()
        if entry["result"] == "issued"
    }
    serials = {s["metric"]["serial"] for s in seen}
    assert {(CLIENT, serial) for serial in serials} <= issued  # the CA's audit log agrees
    for series in current + seen:
        labels = series["metric"]
        assert re.fullmatch(r"[0-9a-f]+", labels["serial"])
        not_before, not_after = (
            datetime.strptime(labels[key], "%Y-%m-%dT%H:%M:%S%z")
            for key in ("not_before", "not_after")
        )
        if labels["spiffe_id"] == CLIENT:  # ttl 4s, backdated 1s
            assert not_after - not_before == timedelta(seconds=5)
    rotations = prometheus.value(
        f'sum(outrider_svid_rotations_total{{result="success"}}'
        f' * on (instance) group_left outrider_agent_info{{spiffe_id="{CLIENT}"}})'
    )
    assert rotations >= 2


def test_e_every_deny_by_policy_rule_and_caller(mesh: AuditedMesh) -> None:
    denials = mesh.prometheus.query("sum by (policy, rule, peer_id) (outrider_authz_denials_total)")
    assert by(denials, "policy", "rule", "peer_id") == {("guard", "no-admin", CLIENT): 1.0}
    decisions = mesh.prometheus.value(
        'sum(outrider_authz_decisions_total{decision="deny",policy="guard",rule="no-admin"})'
    )
    assert decisions == 1


def _label_problem(name: str, value: str, peers: set[str]) -> str | None:
    """Why `value` of label `name` is not from a bounded set, or None."""
    if name in ("peer_id", "spiffe_id"):
        return None if value in peers | {""} else "not a verified peer's SPIFFE ID"
    patterns = {
        "code": r"\d{3}",
        "grpc_status": r"\d{1,2}",
        "le": r"[0-9.e+-]+|\+Inf",
        "port": r"\d{1,5}|\*",
        "serial": r"[0-9a-f]{1,40}",
        "not_before": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
        "not_after": r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ",
        "tls_version": r"TLSv1\.[23]|",
        "cipher": r"[A-Z0-9_-]*",
        "version": re.escape(VERSION) + "|" + re.escape(PYTHON),
        "python": re.escape(PYTHON),
    }
    pattern = patterns.get(name, r"[a-z0-9_-]{0,40}")  # a closed set's word, or a config name
    return None if re.fullmatch(pattern, value) else f"not /{pattern}/"


def test_label_values_stay_bounded_after_odd_paths_and_errors(mesh: AuditedMesh) -> None:
    """No path, query string, header value or error text ever becomes a label value."""
    peers = {SERVER, CLIENT}
    for agent in (mesh.server, mesh.client):
        for family in text_string_to_metric_families(agent.metrics()):
            for sample in family.samples:
                for name, value in sample.labels.items():
                    if family.name == "python_info":  # the interpreter's own constants
                        continue
                    problem = _label_problem(name, value, peers)
                    assert problem is None, f"{sample.name}{{{name}={value!r}}}: {problem}"
                    assert not any(odd in value for odd in mesh.odd_strings), (sample, value)


def test_every_component_reports_its_build(mesh: AuditedMesh) -> None:
    builds = mesh.prometheus.query("outrider_build_info")
    assert set(by(builds, "job", "component", "version", "python")) == {
        ("agent", "agent", VERSION, PYTHON),
        ("ca", "ca", VERSION, PYTHON),
    }
    assert len(builds) == 3  # two agents, one CA
    started = mesh.prometheus.query("process_start_time_seconds")
    assert len(started) == 3
    assert mesh.prometheus.query('{__name__=~".+_created"}') == []


def test_prometheus_saw_what_the_agents_serve(mesh: AuditedMesh) -> None:
    """The harness itself: every target up, labelled with its namespace."""
    prometheus: Prometheus = mesh.prometheus
    up = by(prometheus.query("up"), "job", "namespace")
    assert up == {("agent", "demo"): 1.0, ("ca", "outrider-system"): 1.0}


def test_promtool_passes_the_agents_and_the_ca_metrics(mesh: AuditedMesh) -> None:
    for component, page in (
        ("agent", mesh.server.metrics()),
        ("agent", mesh.client.metrics()),
        ("ca", ca_metrics_page(mesh.ca)),
    ):
        assert exposition_problems(page, component) == []
