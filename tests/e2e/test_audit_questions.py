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

Then `outrider audit` runs against that Prometheus and the CA's audit log, as a process
the way a user runs it: its JSON must give the same answers, true to what the agents
and the CA counted and logged, and its HTML must render in headless Chromium
(tests/chromium.py) with its charts painted. `OUTRIDER_AUDIT_SCREENSHOT=docs/audit.png`
keeps the screenshot (`make audit-screenshot`): the README's picture is this mesh's report.
The Grafana dashboard's queries run against the same Prometheus. One mesh, one
Prometheus for the module: each takes seconds to start.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from identity.build import PYTHON, VERSION
from outrider.audit import report_html
from tests.chromium import dump_dom, painted, png_rows, screenshot
from tests.mesh import AuditedMesh, audited_mesh, workload
from tests.prometheus import Prometheus, exposition_problems
from tests.support import ca_metric, ca_metrics_page

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
    denied = {("guard", "no-admin", CLIENT): 1.0}
    mesh.prometheus.wait_for(  # the deny may be newer than the last scrape
        "sum by (policy, rule, peer_id) (outrider_authz_denials_total)",
        lambda result: by(result, "policy", "rule", "peer_id") == denied,
    )
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


# --- `outrider audit` against this Prometheus and the CA's audit log ------------------------


def settled(mesh: AuditedMesh) -> None:
    """Prometheus has scraped the traffic's end state and the client's rotations."""
    prometheus = mesh.prometheus
    for promql, least in (
        ('sum(outrider_connections_refused_total{reason="plaintext"})', 1),
        ("sum(outrider_authz_denials_total)", 1),
        ('sum(outrider_ca_csr_total{result="refused"})', 1),
        (f'count(count_over_time(outrider_svid_info{{spiffe_id="{CLIENT}"}}[10m]))', 3),
    ):
        prometheus.wait_for(promql, lambda r, n=least: bool(r) and float(r[0]["value"][1]) >= n)


def audit(mesh: AuditedMesh, out: Path, *flags: str) -> tuple[int, dict[str, Any], str]:
    """`outrider audit` as a user runs it: its exit code, its JSON, what it said."""
    settled(mesh)
    done = subprocess.run(
        [
            *(sys.executable, "-m", "outrider", "audit", "--prometheus", mesh.prometheus.url),
            *("--ca-audit-log", str(mesh.setup.audit_log), "--since", mesh.began.isoformat()),
            *("--out", str(out), *flags),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    report = json.loads((out / "audit.json").read_text()) if done.returncode < 2 else {}
    return done.returncode, report, done.stdout + done.stderr


@pytest.fixture(scope="module")
def report(
    mesh: AuditedMesh, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any], str]:
    """The strict namespace's audit (demo): its directory, its JSON and what it said."""
    out = tmp_path_factory.mktemp("audit")
    code, document, said = audit(mesh, out, "--namespace", "demo")
    assert code == 0, said
    return out, document, said


def issued_in(mesh: AuditedMesh, end: str) -> dict[str, set[str]]:
    """The CA audit log's issued serials up to `end` (RFC 3339), by SPIFFE ID."""
    until = datetime.fromisoformat(end.replace("Z", "+00:00"))
    issued: dict[str, set[str]] = {}
    for entry in mesh.setup.audit():
        if entry["result"] == "issued" and datetime.fromisoformat(str(entry["time"])) <= until:
            issued.setdefault(str(entry["spiffe_id"]), set()).add(str(entry["serial"]))
    return issued


def test_the_audit_proves_no_plaintext_was_accepted_and_lists_the_refusal(
    report: tuple[Path, dict[str, Any], str], mesh: AuditedMesh
) -> None:
    _, document, said = report
    assert "no plaintext accepted (proved zero)" in said
    plaintext = document["plaintext"]
    assert (plaintext["proved_zero"], plaintext["accepted"], document["exit_code"]) == (
        True,
        [],
        0,
    )
    refused = {(r["spiffe_id"], r["direction"], r["reason"], r["connections"])
               for r in plaintext["refused"]}  # fmt: skip
    assert (SERVER, "inbound", "plaintext", 1) in refused
    ports = [(a["spiffe_id"], x["port"], x["mtls_mode"]) for a in document["agents"]
             for x in a["listeners"] if x["direction"] == "inbound"]  # fmt: skip
    assert ports == [(SERVER, mesh.server_port, "strict")]


def test_the_audit_gives_the_tls_mix_the_agents_counted(
    report: tuple[Path, dict[str, Any], str], mesh: AuditedMesh
) -> None:
    tls = report[1]["tls"]
    handshakes = sum(
        agent.total("outrider_tls_handshakes_total", result="ok")
        for agent in (mesh.server, mesh.client)
    )
    assert tls["versions"] == {"TLSv1.3": handshakes} and handshakes >= 2  # each side's own
    assert sum(tls["ciphers"].values()) == handshakes
    assert all(
        re.fullmatch(r"TLS_(AES_\d+_GCM|CHACHA20_POLY1305)_SHA\d+", c) for c in tls["ciphers"]
    )
    assert tls["refused"] == {"no_client_cert": 1}


def test_the_audit_draws_the_edge_from_both_sides(
    report: tuple[Path, dict[str, Any], str], mesh: AuditedMesh
) -> None:
    (edge,) = report[1]["edges"]
    assert (edge["source"], edge["destination"]) == (CLIENT, SERVER)
    inbound = mesh.server.total(
        "outrider_connections_total", direction="inbound", mtls="true", peer_id=CLIENT
    )
    outbound = mesh.client.total(
        "outrider_peer_connections_total", direction="outbound", peer_id=SERVER
    )
    requests = mesh.server.total("outrider_requests_total", direction="inbound", peer_id=CLIENT)
    assert (edge["inbound"], edge["outbound"], edge["requests"], edge["denied"]) == (
        inbound,
        outbound,
        requests,
        1,
    )
    assert edge["inbound"] >= 1 and edge["outbound"] >= 1 and edge["requests"] >= 2


def test_the_audit_gives_each_identitys_certificates_with_the_cas_serials(
    report: tuple[Path, dict[str, Any], str], mesh: AuditedMesh
) -> None:
    document = report[1]
    issued = issued_in(mesh, document["range"]["end"])
    histories = {h["spiffe_id"]: h for h in document["certificates"]}
    assert set(histories) == {CLIENT, SERVER} == set(issued)
    for spiffe_id, history in histories.items():
        certificates = history["certificates"]
        assert {c["serial"] for c in certificates} == issued[spiffe_id]  # every one the CA logged
        assert history["rotations"] == len(certificates) - 1 and history["gaps"] == []
        served = [c for c in certificates if "metrics" in c["sources"]]
        assert served and all(c["sources"] == ["metrics", "ca_log"] for c in served)
        lifetime = 5.0 if spiffe_id == CLIENT else 3601.0  # the ttl, backdated 1 s
        assert {c["lifetime_seconds"] for c in served} == {lifetime}
        # oldest first, by time: a CA log's issued_at has microseconds, not_before none
        starts = [datetime.fromisoformat(c["not_before"] or c["issued_at"]) for c in certificates]
        assert starts == sorted(starts)
    assert histories[CLIENT]["rotations"] >= 2 and histories[SERVER]["rotations"] == 0
    (server,) = histories[SERVER]["certificates"]
    assert scraped_serial(mesh.server.metrics()) == server["serial"]


def scraped_serial(page: str) -> str:
    (serial,) = re.findall(r'^outrider_svid_info\{[^}]*serial="([0-9a-f]+)"', page, re.MULTILINE)
    return serial


def test_the_audit_lists_the_deny_and_the_cas_issuances_and_refusal(
    report: tuple[Path, dict[str, Any], str], mesh: AuditedMesh
) -> None:
    document = report[1]
    denies = [(d["policy"], d["rule"], d["caller"], d["destination"], d["count"])
              for d in document["denies"]]  # fmt: skip
    assert denies == [("guard", "no-admin", CLIENT, SERVER, 1)]
    ca = document["ca"]
    issued = issued_in(mesh, document["range"]["end"])
    assert ca["issued_by_identity"] == {who: len(serials) for who, serials in issued.items()}
    assert ca["by_reason"]["issued: token"] == 2  # each agent's first SVID
    assert ca["by_reason"]["refused: wrong_audience"] == 1 and ca["refused"] == 1
    assert ca["issued"] >= 4 and ca["unreadable_log_lines"] == 0
    (refusal,) = ca["refusals"]
    assert refusal["reason"].startswith("wrong_audience")
    assert (
        ca_metric(mesh.ca, "outrider_ca_csr_total", result="refused", reason="wrong_audience") == 1
    )


def test_a_namespace_without_outrider_series_is_a_usage_error(
    mesh: AuditedMesh, tmp_path: Path
) -> None:
    code, _, said = audit(mesh, tmp_path, "--namespace", "nope")
    assert code == 2
    assert "no outrider agent series" in said and "--namespace" in said
    assert not (tmp_path / "audit.json").exists()


def test_the_html_renders_in_chromium_with_its_charts_painted(
    report: tuple[Path, dict[str, Any], str], tmp_path: Path
) -> None:
    out, document, _ = report
    page = out / "audit.html"
    dom = dump_dom(page)
    for chart in ("chart-edges", "chart-tls-versions", "chart-ciphers", "chart-certificates"):
        assert f'id="{chart}"' in dom, chart
    certificates = sum(len(h["certificates"]) for h in document["certificates"])
    assert dom.count('class="edge"') == 1 and dom.count('class="certificate"') == certificates
    png = screenshot(page, tmp_path / "audit.png", height=2000)
    shot = png.read_bytes()
    assert png_rows(shot)[:2] == (1100, 2000)
    colors = (report_html.BAR, report_html.BAD, report_html.OK)
    rgbs = [(int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)) for c in colors]
    for color, count in zip(colors, painted(shot, *rgbs), strict=True):
        assert count > 500, f"{color}: {count} pixels; a chart did not render"
    if keep := os.environ.get("OUTRIDER_AUDIT_SCREENSHOT"):
        shutil.copyfile(png, keep)


def test_the_dashboards_queries_run_and_its_audit_panels_answer(mesh: AuditedMesh) -> None:
    """Every PromQL of deploy/grafana/outrider.json parses in a real Prometheus, with its
    variables as Grafana fills them for "All"; the audit panels answer from the series."""
    from tests.unit.test_dashboard import queries

    settled(mesh)
    filled = {"$namespace": ".*", "$pod": ".*", "$__range": "10m", "$__rate_interval": "1m"}
    answers: dict[str, list[dict[str, Any]]] = {}
    for title, expr in queries():
        for variable, value in filled.items():
            expr = expr.replace(variable, value)
        answers.setdefault(title, []).extend(mesh.prometheus.query(expr))
    edges = by(answers["Who talks to whom"], "peer_id", "spiffe_id", "mtls")
    assert set(edges) == {(CLIENT, SERVER, "true")}
    (deny,) = answers["Denies by policy, rule and caller"]
    assert (deny["metric"]["peer_id"], deny["metric"]["spiffe_id"]) == (CLIENT, SERVER)
    timeline = by(answers["Certificate timeline"], "spiffe_id", "serial")
    assert sorted(spiffe_id for spiffe_id, _ in timeline) == [CLIENT, SERVER]
    assert (SERVER, scraped_serial(mesh.server.metrics())) in timeline
