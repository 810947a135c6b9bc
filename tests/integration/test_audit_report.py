"""`outrider audit` against a real Prometheus: the JSON's answers, and the HTML in Chromium.

Prometheus (Debian's, tests/prometheus.py) scrapes four /metrics pages: a
frontend and a backend agent in namespace shop, a legacy agent in namespace
legacy, and the CA. The pages expose the contract's series (CONTRACT.md,
Metrics) from registries this test drives, standing in for the running mesh
until the agents export them all: a verified frontend → backend edge, a
caller denied by policy, a refused plaintext attempt, a rotation of the
backend's SVID, and on the legacy agent, whose only port is strict, two
plaintext connections counted as accepted. The CA's audit log is written by
ca/audit.py's own writer.

Then the CLI runs as a user runs it, and its JSON must say what happened;
headless Chromium must render its HTML with the charts painted.
`OUTRIDER_AUDIT_SCREENSHOT=docs/audit.png` keeps the screenshot (`make
audit-screenshot`), so the README's picture comes from this run.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from ca.audit import AuditLog
from outrider import cli
from outrider.audit import report_html
from tests.chromium import dump_dom, painted, png_rows, screenshot
from tests.prometheus import Prometheus, Target, start_prometheus

TD = "spiffe://example.org"
FRONTEND, BACKEND = f"{TD}/ns/shop/sa/frontend", f"{TD}/ns/shop/sa/backend"
INTRUDER, LEGACY = f"{TD}/ns/shop/sa/intruder", f"{TD}/ns/legacy/sa/billing"
TLS13, CIPHER = "TLSv1.3", "TLS_AES_256_GCM_SHA384"


class ContractPage:
    """One component's /metrics with the contract's series, served on a loopback port."""

    def __init__(self, component: str, spiffe_id: str | None, started: float) -> None:
        self.registry = r = CollectorRegistry()
        Gauge("outrider_build_info", "", ["component", "version", "python"], registry=r).labels(
            component, "0.0.0", "3.12"
        ).set(1)
        Gauge("process_start_time_seconds", "", registry=r).set(started)
        if spiffe_id:
            info = Gauge("outrider_agent_info", "", ["spiffe_id", "version"], registry=r)
            info.labels(spiffe_id, "0.0.0").set(1)
        self.svid = Gauge(
            "outrider_svid_info", "", ["spiffe_id", "serial", "not_before", "not_after"], registry=r
        )
        self.listener = Gauge(
            "outrider_listener_info", "", ["direction", "port", "protocol", "mtls_mode"], registry=r
        )
        self.connections = Counter(
            "outrider_connections", "", ["direction", "mtls", "peer_id"], registry=r
        )
        self.refused = Counter(
            "outrider_connections_refused", "", ["direction", "reason"], registry=r
        )
        self.handshakes = Counter(
            "outrider_tls_handshakes",
            "",
            ["direction", "result", "reason", "tls_version", "cipher"],
            registry=r,
        )
        self.denials = Counter(
            "outrider_authz_denials", "", ["policy", "rule", "peer_id"], registry=r
        )
        self.requests = Counter(
            "outrider_requests", "", ["direction", "peer_id", "code"], registry=r
        )
        self.csr = Counter("outrider_ca_csr", "", ["result", "reason"], registry=r)
        self.server, self.thread = start_http_server(0, "127.0.0.1", r)
        self.address = f"127.0.0.1:{self.server.server_port}"
        self.current: tuple[str, ...] | None = None

    def rotate(self, spiffe_id: str, serial: str, not_before: datetime, hours: float) -> None:
        """The current SVID only: the previous series removed, as the contract says."""
        if self.current is not None:
            self.svid.remove(*self.current)
        rfc = "%Y-%m-%dT%H:%M:%SZ"
        not_after = not_before + timedelta(hours=hours)
        self.current = (spiffe_id, serial, not_before.strftime(rfc), not_after.strftime(rfc))
        self.svid.labels(*self.current).set(1)

    def connect(self, direction: str, peer: str, count: int = 1, mtls: bool = True) -> None:
        self.connections.labels(direction, str(mtls).lower(), peer).inc(count)
        if mtls:
            self.handshakes.labels(direction, "ok", "", TLS13, CIPHER).inc(count)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@dataclass
class Mesh:
    prometheus: Prometheus
    ca_log: Path
    began: datetime


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("audit")
    began = datetime.now(UTC).replace(microsecond=0)
    frontend = ContractPage("agent", FRONTEND, began.timestamp())
    backend = ContractPage("agent", BACKEND, began.timestamp())
    legacy = ContractPage("agent", LEGACY, began.timestamp())
    ca = ContractPage("ca", None, began.timestamp())
    pages = (frontend, backend, legacy, ca)
    ca_log = tmp / "ca-audit.log"
    with ca_log.open("a") as stream:
        log = AuditLog(stream, lambda: datetime.now(UTC))
        for page in (frontend, backend, legacy):
            page.listener.labels("inbound", "8080", "http", "strict").set(1)
        frontend.rotate(FRONTEND, "c3", began - timedelta(minutes=1), 1)
        backend.rotate(BACKEND, "a1", began - timedelta(minutes=1), 1)
        legacy.rotate(LEGACY, "e5", began - timedelta(minutes=1), 1)
        for who, serial in ((FRONTEND, 0xC3), (BACKEND, 0xA1), (LEGACY, 0xE5)):
            ca.csr.labels("issued", "k8s-token").inc()
            log.record(result="issued", reason="k8s-token", caller="sa", spiffe_id=who,
                       serial=serial, not_after=began + timedelta(minutes=59))  # fmt: skip
        backend.connect("inbound", FRONTEND, 3)
        frontend.connect("outbound", BACKEND, 3)
        targets: dict[str, list[str | Target]] = {
            "agent": [
                Target(frontend.address, {"namespace": "shop"}),
                Target(backend.address, {"namespace": "shop"}),
                Target(legacy.address, {"namespace": "legacy"}),
            ],
            "ca": [Target(ca.address, {"namespace": "outrider-system"})],
        }
        prometheus = start_prometheus(targets, tmp / "prometheus")
        try:
            prometheus.wait_for_targets()
            # What happens while Prometheus watches: a rotation, more traffic, a refused
            # plaintext attempt, a denied caller, the CA refusing it, legacy's plaintext.
            backend.rotate(BACKEND, "b2", datetime.now(UTC).replace(microsecond=0), 1)
            ca.csr.labels("issued", "k8s-token").inc()
            log.record(result="issued", reason="k8s-token", caller="sa", spiffe_id=BACKEND,
                       serial=0xB2, not_after=began + timedelta(hours=1))  # fmt: skip
            backend.connect("inbound", FRONTEND, 2)
            frontend.connect("outbound", BACKEND, 2)
            backend.requests.labels("inbound", FRONTEND, "200").inc(40)
            backend.refused.labels("inbound", "plaintext").inc()
            backend.connect("inbound", INTRUDER)
            backend.requests.labels("inbound", INTRUDER, "403").inc()
            backend.denials.labels("backend-api", "admin", INTRUDER).inc()
            ca.csr.labels("refused", "not-authorized").inc()
            log.record(result="refused", reason="not authorized: no registration", caller="x",
                       pod="shop/intruder", spiffe_id=INTRUDER)  # fmt: skip
            legacy.connect("inbound", "", 2, mtls=False)
            prometheus.wait_for('outrider_svid_info{serial="b2"}', lambda r: len(r) == 1)
            prometheus.wait_for(
                "sum(outrider_connections_total) + sum(outrider_ca_csr_total)",
                lambda r: bool(r) and float(r[0]["value"][1]) == 3 + 3 + 2 + 2 + 1 + 2 + 5,
            )
            yield Mesh(prometheus, ca_log, began)
        finally:
            prometheus.stop()
            for page in pages:
                page.close()


def audit(
    mesh: Mesh, out: Path, *flags: str, capsys: pytest.CaptureFixture[str]
) -> tuple[int, dict[str, Any], str]:
    code = cli.main(
        [
            *("audit", "--prometheus", mesh.prometheus.url, "--ca-audit-log", str(mesh.ca_log)),
            *("--since", (mesh.began - timedelta(seconds=2)).isoformat(), "--out", str(out)),
            *flags,
        ]
    )
    said = capsys.readouterr()
    return code, json.loads((out / "audit.json").read_text()), said.out + said.err


def test_the_json_answers_the_auditors_questions_for_a_namespace(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, said = audit(mesh, tmp_path, "--namespace", "shop", capsys=capsys)
    assert code == 0, said
    assert "no plaintext accepted (proved zero)" in said
    plaintext = report["plaintext"]
    assert (plaintext["proved_zero"], plaintext["accepted"]) == (True, [])
    assert [(r["spiffe_id"], r["reason"], r["connections"]) for r in plaintext["refused"]] == [
        (BACKEND, "plaintext", 1)
    ]
    # Each side counts its own handshake: 5 + 5 frontend → backend, 1 intruder → backend.
    assert report["tls"]["versions"] == {TLS13: 11} and report["tls"]["ciphers"] == {CIPHER: 11}
    edges = {(e["source"], e["destination"]): e for e in report["edges"]}
    assert set(edges) == {(FRONTEND, BACKEND), (INTRUDER, BACKEND)}
    good, denied = edges[(FRONTEND, BACKEND)], edges[(INTRUDER, BACKEND)]
    assert (good["inbound"], good["outbound"], good["requests"], good["denied"]) == (5, 5, 40, 0)
    assert (denied["connections"], denied["requests"], denied["denied"]) == (1, 1, 1)
    histories = {h["spiffe_id"]: h for h in report["certificates"]}
    assert set(histories) == {FRONTEND, BACKEND}
    backend = histories[BACKEND]
    assert [c["serial"] for c in backend["certificates"]] == ["a1", "b2"]
    assert backend["rotations"] == 1 and backend["gaps"] == []
    assert all(c["sources"] == ["metrics", "ca_log"] for c in backend["certificates"])
    assert backend["certificates"][0]["lifetime_seconds"] == 3600
    denies = [(d["policy"], d["rule"], d["caller"], d["destination"]) for d in report["denies"]]
    assert denies == [("backend-api", "admin", INTRUDER, BACKEND)]
    assert report["denies"][0]["count"] == 1
    ca = report["ca"]
    assert (ca["issued"], ca["refused"]) == (4, 1)
    assert ca["issued_by_identity"] == {BACKEND: 2, FRONTEND: 1}  # legacy's is not in shop
    (refusal,) = ca["refusals"]
    assert (refusal["pod"], refusal["spiffe_id"]) == ("shop/intruder", INTRUDER)


def test_a_strict_port_that_accepted_plaintext_fails_the_audit(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, report, said = audit(mesh, tmp_path, capsys=capsys)
    assert code == 1, said
    assert "a strict port accepted plaintext" in said
    (violation,) = report["plaintext"]["accepted"]
    assert (violation["spiffe_id"], violation["connections"], violation["strict"]) == (
        LEGACY,
        2,
        True,
    )
    assert report["plaintext"]["strict_violations"] == 1 and report["exit_code"] == 1


def test_a_namespace_with_no_outrider_series_is_a_usage_error(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            *("audit", "--prometheus", mesh.prometheus.url, "--since", "5m"),
            *("--namespace", "nope", "--out", str(tmp_path)),
        ]
    )
    assert code == 2
    assert "no outrider agent series" in capsys.readouterr().err
    assert not (tmp_path / "audit.json").exists()


def test_the_html_renders_in_chromium_with_its_charts_painted(
    mesh: Mesh, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, said = audit(mesh, tmp_path, "--namespace", "shop", capsys=capsys)
    assert code == 0, said
    page = tmp_path / "audit.html"
    dom = dump_dom(page)
    for chart in ("chart-edges", "chart-tls-versions", "chart-ciphers", "chart-certificates"):
        assert f'id="{chart}"' in dom, chart
    assert dom.count('class="edge"') == 2 and dom.count('class="certificate"') == 3
    png = screenshot(page, tmp_path / "audit.png", height=2300)
    shot = png.read_bytes()
    assert png_rows(shot)[:2] == (1100, 2300)
    colors = (report_html.BAR, report_html.BAD, report_html.OK)
    rgbs = [(int(c[1:3], 16), int(c[3:5], 16), int(c[5:7], 16)) for c in colors]
    for color, count in zip(colors, painted(shot, *rgbs), strict=True):
        assert count > 500, f"{color}: {count} pixels; a chart did not render"
    if keep := os.environ.get("OUTRIDER_AUDIT_SCREENSHOT"):
        shutil.copyfile(png, keep)


def test_the_dashboards_queries_run_and_its_who_talks_to_whom_table_answers(mesh: Mesh) -> None:
    """Every PromQL of deploy/grafana/outrider.json parses in a real Prometheus, with its
    variables as Grafana fills them for "All"; the audit panels answer from the series."""
    from tests.unit.test_dashboard import queries

    filled = {"$namespace": ".*", "$pod": ".*", "$__range": "10m", "$__rate_interval": "1m"}
    answers: dict[str, list[dict[str, Any]]] = {}
    for title, expr in queries():
        for variable, value in filled.items():
            expr = expr.replace(variable, value)
        answers.setdefault(title, []).extend(mesh.prometheus.query(expr))
    labels = ("peer_id", "spiffe_id", "mtls")  # Prometheus drops a label whose value is ""
    edges = {
        tuple(row["metric"].get(n, "") for n in labels) for row in answers["Who talks to whom"]
    }
    assert edges == {
        (FRONTEND, BACKEND, "true"),
        (INTRUDER, BACKEND, "true"),
        ("", LEGACY, "false"),
    }
    (deny,) = answers["Denies by policy, rule and caller"]
    assert (deny["metric"]["peer_id"], deny["metric"]["spiffe_id"]) == (INTRUDER, BACKEND)
    serials = {row["metric"]["serial"] for row in answers["Certificate timeline"]}
    assert serials == {"b2", "c3", "e5"}  # the current SVIDs: a1 went stale on rotation
