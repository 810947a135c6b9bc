"""`outrider audit`'s answers, from constructed series and CA audit log lines.

Each test builds the samples Prometheus would hold for a small mesh and
checks one of the auditor's questions: (a) plaintext accepted, (b) the TLS
mix, (c) who talked to whom, (d) certificate histories, (e) denies, and the
CA's issuances and refusals.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta

import pytest

from outrider.audit import report_html, report_json
from outrider.audit.build import build, increase
from outrider.audit.model import Audit, AuditInputError, Edge, Evidence, Series

START = datetime(2026, 12, 6, 14, 0, tzinfo=UTC)
END = START + timedelta(hours=1)
T0 = START.timestamp()
FRONTEND = "spiffe://example.org/ns/shop/sa/frontend"
BACKEND = "spiffe://example.org/ns/shop/sa/backend"
FRONT, BACK = "10.0.0.1:15020", "10.0.0.2:15020"


def series(name: str, instance: str, values: list[float], **labels: str) -> Series:
    """A series scraped every 10 minutes from the range's start."""
    namespace = labels.pop("namespace", "shop")
    samples = tuple((T0 + 600 * i, v) for i, v in enumerate(values))
    return Series(name, {"instance": instance, "namespace": namespace, **labels}, samples)


def agent(instance: str, spiffe_id: str, mode: str = "strict", ns: str = "shop") -> list[Series]:
    flat = [1.0] * 7
    return [
        series("outrider_build_info", instance, flat, namespace=ns, component="agent"),
        series("outrider_agent_info", instance, flat, namespace=ns, spiffe_id=spiffe_id),
        series(
            "outrider_listener_info",
            instance,
            flat,
            namespace=ns,
            direction="inbound",
            port="8080",
            protocol="http",
            mtls_mode=mode,
        ),
    ]


def mesh(*extra: Series, back_mode: str = "strict") -> list[Series]:
    """frontend → backend over mTLS, 5 connections seen from each side, a refused plaintext
    attempt on the backend, TLS 1.3."""
    return [
        *agent(FRONT, FRONTEND),
        *agent(BACK, BACKEND, back_mode),
        series(
            "outrider_connections_total",
            BACK,
            [10, 10, 12, 15, 15, 15, 15],
            direction="inbound",
            mtls="true",
            peer_id=FRONTEND,
        ),
        # The frontend's side, as an agent counts it: the app's connections routed to an
        # upstream (no peer yet: pooled, one may use many mTLS connections or none) and
        # the mTLS connections whose server it verified, by peer.
        series(
            "outrider_connections_total",
            FRONT,
            [20, 20, 25, 31, 31, 31, 31],
            direction="outbound",
            mtls="true",
            peer_id="",
        ),
        series(
            "outrider_peer_connections_total",
            FRONT,
            [10, 10, 12, 15, 15, 15, 15],
            direction="outbound",
            peer_id=BACKEND,
            tls_version="TLSv1.3",
        ),
        series(
            "outrider_connections_refused_total",
            BACK,
            [0, 0, 1, 1, 1, 1, 1],
            direction="inbound",
            reason="plaintext",
        ),
        series(
            "outrider_tls_handshakes_total",
            BACK,
            [10, 10, 12, 15, 15, 15, 15],
            direction="inbound",
            result="ok",
            reason="",
            tls_version="TLSv1.3",
            cipher="TLS_AES_256_GCM_SHA384",
        ),
        *extra,
    ]


def audit_of(
    found: list[Series], log: tuple[str, ...] = (), namespaces: tuple[str, ...] = ()
) -> Audit:
    return build(Evidence(START, END, namespaces, tuple(found), log, "test"))


@pytest.mark.parametrize(
    ("values", "from_zero", "grew"),
    [
        ([5, 5, 5], False, 0),  # nothing happened in the range: exactly zero
        ([5, 6, 9], False, 4),
        ([3, 4], True, 4),  # born in the range: its first value counts
        ([5, 7, 2, 3], False, 5),  # 2, a restart (2 since it), 1
        ([], False, 0),
    ],
)
def test_a_counter_grows_by_its_samples_deltas_and_a_restart_counts_from_zero(
    values: list[float], from_zero: bool, grew: float
) -> None:
    assert increase([(float(i), v) for i, v in enumerate(values)], from_zero) == grew


@pytest.mark.parametrize(("started", "counted"), [(T0 - 60, 0), (T0 + 1, 3)])
def test_a_counter_counts_from_zero_when_its_process_started_inside_the_range(
    started: float, counted: int
) -> None:
    found = [
        series("process_start_time_seconds", "ca:8080", [started], namespace="outrider-system"),
        series(
            "outrider_ca_csr_total", "ca:8080", [3, 3], namespace="outrider-system",
            result="issued", reason="k8s-token",
        ),
    ]  # fmt: skip
    assert audit_of(mesh(*found), namespaces=("shop",)).ca.issued == counted


def test_a_strict_mesh_proves_zero_plaintext_and_lists_the_refused_attempt() -> None:
    audit = audit_of(mesh())
    assert audit.plaintext.proved_zero
    assert audit.plaintext.accepted == ()
    (refused,) = audit.plaintext.refused
    assert (refused.spiffe_id, refused.reason, refused.connections) == (BACKEND, "plaintext", 1)
    assert audit.exit_code == 0


def test_plaintext_on_an_agent_whose_ports_are_all_strict_is_a_violation() -> None:
    leaked = series(
        "outrider_connections_total", BACK, [0, 0, 0, 1, 1, 1, 1], direction="inbound",
        mtls="false", peer_id="",
    )  # fmt: skip
    audit = audit_of(mesh(leaked))
    (row,) = audit.plaintext.strict_violations
    assert (row.spiffe_id, row.connections, row.ports) == (BACKEND, 1, ("8080",))
    assert not audit.plaintext.proved_zero
    assert audit.exit_code == 1


def test_plaintext_let_in_by_a_permissive_port_is_listed_but_not_a_violation() -> None:
    let_in = series(
        "outrider_connections_total", BACK, [0, 2, 4, 4, 4, 4, 4], direction="inbound",
        mtls="false", peer_id="",
    )  # fmt: skip
    audit = audit_of(mesh(let_in, back_mode="permissive"))
    (row,) = audit.plaintext.accepted
    assert (row.strict, row.connections, row.ports) == (False, 4, ("8080",))
    assert audit.exit_code == 0
    edge = next(e for e in audit.edges if e.source == "")
    assert (edge.destination, edge.inbound) == (BACKEND, 4)


def test_without_listener_info_zero_plaintext_is_not_claimed_as_proved() -> None:
    found = [s for s in mesh() if s.name != "outrider_listener_info"]
    audit = audit_of(found)
    assert not audit.plaintext.proved_zero and audit.plaintext.accepted == ()
    assert any("listener_info" in note for note in audit.notes)


def test_an_agent_that_does_not_say_who_it_is_is_named_in_a_note() -> None:
    found = [
        s for s in mesh() if not (s.name == "outrider_agent_info" and s.label("instance") == BACK)
    ]
    audit = audit_of(found)
    (edge,) = audit.edges  # seen from the frontend's side only
    assert (edge.destination, edge.inbound, edge.outbound) == (BACKEND, 0, 5)
    assert any(BACK in note and "agent_info" in note for note in audit.notes)


def test_the_tls_mix_counts_handshakes_in_the_range_only() -> None:
    audit = audit_of(mesh())
    assert audit.tls.versions == {"TLSv1.3": 5}
    assert audit.tls.ciphers == {"TLS_AES_256_GCM_SHA384": 5}


def test_an_edge_is_seen_from_both_sides_with_its_requests_and_denies() -> None:
    requests = series(
        "outrider_requests_total", BACK, [0, 0, 0, 0, 3, 7, 7], direction="inbound",
        peer_id=FRONTEND, code="200",
    )  # fmt: skip
    denied = series(
        "outrider_authz_denials_total", BACK, [0, 0, 0, 0, 0, 2, 2], policy="backend-api",
        rule="admin", peer_id=FRONTEND,
    )  # fmt: skip
    audit = audit_of(mesh(requests, denied))
    (edge,) = audit.edges
    assert (edge.source, edge.destination) == (FRONTEND, BACKEND)
    assert (edge.inbound, edge.outbound, edge.connections) == (5, 5, 5)
    assert (edge.requests, edge.denied) == (7, 2)


def test_every_deny_is_listed_by_policy_rule_and_caller() -> None:
    found = [
        series(
            "outrider_authz_denials_total", BACK, [0, 1, 1, 1, 1, 1, 1], policy="backend-api",
            rule="admin", peer_id=FRONTEND,
        ),
        series(
            "outrider_authz_denials_total", BACK, [0, 0, 0, 0, 0, 0, 3], policy="backend-api",
            rule="default", peer_id="",
        ),
    ]  # fmt: skip
    denies = audit_of(mesh(*found)).denies
    assert [(d.policy, d.rule, d.caller, d.destination, d.count) for d in denies] == [
        ("backend-api", "admin", FRONTEND, BACKEND, 1),
        ("backend-api", "default", "", BACKEND, 3),
    ]


def test_denies_without_callers_still_listed_from_the_decisions_counter() -> None:
    old = series(
        "outrider_authz_decisions_total", BACK, [4, 4, 6, 6, 6, 6, 6], policy="p", rule="r",
        decision="deny",
    )  # fmt: skip
    audit = audit_of(mesh(old))
    (deny,) = audit.denies
    assert (deny.caller, deny.count) == (None, 2)
    assert any("without callers" in note for note in audit.notes)


def svid(
    instance: str, spiffe_id: str, serial: str, begins: float, hours: float, seen: range
) -> Series:
    """outrider_svid_info for one certificate, sampled at the 10-minute steps in `seen`."""
    not_before = datetime.fromtimestamp(T0 + begins, UTC)
    samples = tuple((T0 + 600 * i, 1.0) for i in seen)
    labels = {
        "instance": instance,
        "namespace": "shop",
        "spiffe_id": spiffe_id,
        "serial": serial,
        "not_before": not_before.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "not_after": (not_before + timedelta(hours=hours)).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    return Series("outrider_svid_info", labels, samples)


def ca_line(result: str, spiffe_id: str, minutes: int, **fields: object) -> str:
    when = (START + timedelta(minutes=minutes)).isoformat()
    entry = {"time": when, "event": "svid_sign", "result": result, "spiffe_id": spiffe_id}
    return json.dumps(entry | fields)


def test_each_identity_has_its_certificates_rotations_and_gaps() -> None:
    certificates = [
        svid(BACK, BACKEND, "a1", -300, 0.5, range(0, 3)),  # until 14:25
        svid(BACK, BACKEND, "b2", 1800, 0.5, range(3, 6)),  # from 14:30: a 5-minute gap
        svid(FRONT, FRONTEND, "c3", -60, 2, range(0, 7)),
    ]
    log = (
        ca_line("issued", BACKEND, 30, serial="B2", not_after="2026-12-06T15:00:00+00:00"),
        ca_line("issued", BACKEND, 50, serial="d4", not_after="2026-12-06T16:00:00+00:00"),
    )
    history = {h.spiffe_id: h for h in audit_of(mesh(*certificates), log).certificates}
    backend = history[BACKEND]
    assert [c.serial for c in backend.certificates] == ["a1", "b2", "d4"]
    assert backend.rotations == 2
    a1, b2, d4 = backend.certificates
    assert a1.lifetime_seconds == 1800 and a1.sources == ("metrics",)
    assert b2.sources == ("metrics", "ca_log")  # one certificate, its serial's case aside
    assert d4.sources == ("ca_log",) and d4.not_before is None
    (gap,) = backend.gaps
    assert (gap.start, gap.end) == (START + timedelta(minutes=25), START + timedelta(minutes=30))
    assert history[FRONTEND].rotations == 0 and history[FRONTEND].gaps == ()


def test_a_certificate_still_served_after_its_not_after_is_a_gap() -> None:
    stale = svid(BACK, BACKEND, "a1", -3000, 1, range(0, 7))  # expired 14:10, served to 15:00
    (history,) = [h for h in audit_of(mesh(stale)).certificates if h.spiffe_id == BACKEND]
    (gap,) = history.gaps
    assert gap.why == "served an expired certificate"
    assert (gap.start, gap.end) == (START + timedelta(minutes=20), END)


def test_ca_issuances_and_refusals_from_its_counters_and_its_audit_log() -> None:
    csr = [
        series(
            "outrider_ca_csr_total", "ca:8080", [2, 5, 5, 5, 5, 5, 5], namespace="outrider-system",
            result="issued", reason="k8s-token",
        ),
        series(
            "outrider_ca_csr_total", "ca:8080", [0, 0, 0, 1, 1, 1, 1], namespace="outrider-system",
            result="refused", reason="not-authorized",
        ),
    ]  # fmt: skip
    log = (
        ca_line("refused", BACKEND, 31, reason="not authorized", caller="system:sa", pod="shop/x"),
        ca_line("issued", FRONTEND, 5, serial="ff"),
        "not json",
        ca_line("issued", FRONTEND, 120, serial="ee"),  # after the range
        ca_line("issued", "spiffe://example.org/ns/other/sa/x", 6, serial="dd"),
    )
    ca = audit_of(mesh(*csr), log, namespaces=("shop",)).ca
    assert (ca.issued, ca.refused) == (3, 1)
    assert ca.by_reason == {"issued: k8s-token": 3, "refused: not-authorized": 1}
    assert ca.issued_by_identity == {FRONTEND: 1}
    (refusal,) = ca.refusals
    assert (refusal.reason, refusal.pod, refusal.time) == (
        "not authorized",
        "shop/x",
        START + timedelta(minutes=31),
    )
    assert (ca.log_lines, ca.unreadable_log_lines) == (2, 1)


def test_the_namespaces_asked_for_bound_the_agents_read() -> None:
    other = agent("10.0.9.9:15020", "spiffe://example.org/ns/other/sa/x", ns="other")
    audit = audit_of(mesh(*other), namespaces=("shop",))
    assert {a.spiffe_id for a in audit.agents} == {FRONTEND, BACKEND}
    assert len(audit_of(mesh(*other)).agents) == 3


def test_no_outrider_series_is_an_error_that_says_what_to_check() -> None:
    with pytest.raises(AuditInputError, match=r"no outrider agent series .* scrapes the agents"):
        audit_of([], namespaces=("shop",))
    with pytest.raises(AuditInputError, match="range is empty"):
        Evidence(END, START, (), ())


def test_the_json_answers_each_question_by_name() -> None:
    document = json.loads(report_json.render(audit_of(mesh())))
    assert document["format"] == "outrider-audit/1"
    assert document["plaintext"]["proved_zero"] is True
    assert document["plaintext"]["refused"][0]["reason"] == "plaintext"
    assert document["tls"]["versions"] == {"TLSv1.3": 5}
    assert document["edges"][0] | {"connections": 5} == document["edges"][0]
    assert document["range"] == {"start": "2026-12-06T14:00:00Z", "end": "2026-12-06T15:00:00Z"}
    assert document["exit_code"] == 0


def test_the_html_holds_its_charts_and_escapes_what_the_series_say() -> None:
    hostile = series(
        "outrider_authz_denials_total", BACK, [0, 1, 1, 1, 1, 1, 1], policy="<script>x</script>",
        rule="r", peer_id=FRONTEND,
    )  # fmt: skip
    page = report_html.render(audit_of(mesh(hostile)))
    for chart in ("chart-edges", "chart-tls-versions", "chart-ciphers", "chart-denies"):
        assert f'<svg id="{chart}"' in page
    assert "<script" not in page and "&lt;script&gt;" in page
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


@pytest.mark.parametrize(
    ("seconds", "reads"),
    [(5.0, "5 s"), (900.0, "15 min"), (3601.0, "1.00 h"), (90 * 86400.0, "90.0 d")],
)
def test_a_certificates_lifetime_reads_in_a_unit_that_shows_it(seconds: float, reads: str) -> None:
    """A 5-second SVID (a test mesh, or a short ttl) is not "0.00 h"."""
    assert report_html.duration(seconds) == reads


def test_a_graph_of_two_identities_is_one_arrow_high() -> None:
    """Two nodes sit on one line: the picture is not an ellipse's height of white."""
    page = report_html.graph([Edge(FRONTEND, BACKEND, 1, 1, 2, 0)])
    height = float(re.search(r'<svg id="chart-edges" width="\d+" height="(\d+)"', page)[1])  # type: ignore[index]
    assert height <= 160
    ys = {float(y) for y in re.findall(r'<circle class="node" cx="[\d.]+" cy="([\d.]+)"', page)}
    assert len(ys) == 1 and all(22 < y < height - 38 for y in ys)  # the labels fit under
