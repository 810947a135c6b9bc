"""deploy/grafana/outrider.json queries only metrics and labels the code exports.

A dashboard whose query names a metric nobody exports shows "No data"
forever, and nobody notices until they need the panel. Each panel's PromQL
is checked against the registries the agent and the CA build (and the
injector's, once it exports one), with the label names each metric has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from agent.adapters.metrics import AgentMetrics
from ca.metrics import CaMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "outrider.json"

# Metrics in CONTRACT.md / DESIGN.md whose code lands on another branch, with the
# labels they are given there. Remove an entry when its metric is registered.
NOT_YET_EXPORTED: dict[str, set[str]] = {}
# Panels about agents follow the dashboard's namespace and pod variables; the CA
# and the injector have a namespace of their own.
UNSCOPED = ("outrider_ca_", "outrider_injector_", "outrider_agent_info")
# Set by Prometheus on every scraped series (kubernetes_sd relabelling), or by
# PromQL itself (`le` for histogram buckets).
TARGET_LABELS = {"namespace", "pod", "instance", "job", "container", "le"}
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",)}


def exported(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Every series name the registry can expose, with its label names."""
    names: dict[str, set[str]] = {}
    # The registry's own index of collectors: families of labelled metrics
    # have no samples until a child exists, so collect() alone misses them.
    collectors = set(registry._names_to_collectors.values())
    for collector in collectors:
        labels = set(getattr(collector, "_labelnames", ()))
        for family in collector.collect():
            for suffix in SUFFIXES[family.type]:
                names[family.name + suffix] = labels
    return names


# The injector's metrics as DESIGN.md gives them, until injector/webhook.py is there.
INJECTOR_FROM_DESIGN = {
    "outrider_injector_admissions_total": {"result", "reason"},
    "outrider_injector_admission_duration_seconds_bucket": set(),
}


def known_metrics() -> dict[str, set[str]]:
    known = {**exported(AgentMetrics().registry), **exported(CaMetrics().registry)}
    try:
        from injector.webhook import InjectorMetrics
    except ImportError:
        return {**known, **INJECTOR_FROM_DESIGN}
    return {**known, **exported(InjectorMetrics().registry)}


def panels() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = json.loads(DASHBOARD.read_text())["panels"]
    return [p for p in found if p["type"] != "row"]


def queries() -> Iterator[tuple[str, str]]:
    for panel in panels():
        for target in panel["targets"]:
            yield panel["title"], target["expr"]


def metrics_in(expr: str) -> set[str]:
    return set(re.findall(r"\boutrider_[a-z0-9_]+", expr))


def labels_in(expr: str) -> set[str]:
    """Label names in `by (...)`, `without (...)` and `{name="value"}` matchers."""
    names = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        names |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return names


def test_the_registries_list_labelled_metrics_before_any_sample() -> None:
    known = known_metrics()
    assert known["outrider_tls_handshakes_total"] == {
        "direction",
        "result",
        "reason",
        "tls_version",
        "cipher",
    }
    assert known["outrider_ca_sign_duration_seconds_bucket"] == set()
    assert "outrider_svid_expiry_timestamp_seconds" in known


def test_every_query_names_only_metrics_the_code_exports() -> None:
    known = {**NOT_YET_EXPORTED, **known_metrics()}
    for title, expr in queries():
        names = metrics_in(expr)
        assert names, f"{title}: {expr} queries no outrider_ metric"
        assert names <= set(known), f"{title}: {sorted(names - set(known))} are not exported"


def test_every_query_groups_and_filters_by_labels_its_metrics_have() -> None:
    known = {**NOT_YET_EXPORTED, **known_metrics()}
    for title, expr in queries():
        have = TARGET_LABELS.union(*(known[name] for name in metrics_in(expr)))
        assert labels_in(expr) <= have, f"{title}: {sorted(labels_in(expr) - have)}"


def test_labels_in_reads_groupings_and_matchers() -> None:
    expr = 'sum by (direction, reason) (rate(outrider_x_total{result="refused",b!~"c"}[5m]))'
    assert labels_in(expr) == {"direction", "reason", "result", "b"}


def test_the_not_yet_exported_list_holds_only_metrics_still_missing() -> None:
    assert not set(NOT_YET_EXPORTED) & set(known_metrics()), "remove it from NOT_YET_EXPORTED"


@pytest.mark.parametrize(
    ("title", "wanted"),
    [
        ("TLS version mix", 'outrider_tls_handshakes_total{result="ok",'),
        ("Handshake failures by reason", 'outrider_tls_handshakes_total{result="refused",'),
        ("Authorization denies", 'outrider_authz_decisions_total{decision="deny",'),
        ("SVIDs closest to expiry", "bottomk(10, outrider_svid_expiry_timestamp_seconds{"),
        ("Who talks to whom", 'unless outrider_connections_total{direction="inbound",'),
        (
            "Who talks to whom",
            "group_left (spiffe_id) max by (instance, spiffe_id) (outrider_agent",
        ),
        ("Denies by policy, rule and caller", "by (policy, rule, peer_id, spiffe_id)"),
        (
            "L7 requests by status",
            'sum by (code) (rate(outrider_requests_total{direction="inbound",',
        ),
        ("L7 requests by caller", "sum by (peer_id) (rate(outrider_requests_total{"),
        ("Certificate timeline", "max by (spiffe_id, serial) (outrider_svid_info{"),
        ("Certificates in use", "by (spiffe_id, serial, not_before, not_after)"),
        ("CA signing rate by result", "outrider_ca_csr_total"),
        ("CA signing latency", "outrider_ca_sign_duration_seconds_bucket"),
        ("CA authentication failures", "outrider_ca_authn_failures_total"),
    ],
)
def test_the_panels_an_operator_looks_for_are_there(title: str, wanted: str) -> None:
    (panel,) = [p for p in panels() if p["title"] == title]
    assert any(wanted in target["expr"] for target in panel["targets"])


def test_agent_panels_follow_the_namespace_and_pod_variables() -> None:
    for title, expr in queries():
        for name, matchers in re.findall(r"\b(outrider_[a-z0-9_]+)(\{[^}]*\})?", expr):
            if name.startswith(UNSCOPED):
                continue
            assert 'namespace=~"$namespace"' in matchers, f"{title}: {name} ignores $namespace"
            assert 'pod=~"$pod"' in matchers, f"{title}: {name} ignores $pod"


def test_the_namespace_and_pod_variables_query_an_exported_metric() -> None:
    variables = json.loads(DASHBOARD.read_text())["templating"]["list"]
    by_name = {variable["name"]: variable for variable in variables}
    assert set(by_name) == {"datasource", "namespace", "pod"}
    known = {**NOT_YET_EXPORTED, **known_metrics()}
    for name in ("namespace", "pod"):
        query = by_name[name]["query"]["query"]
        assert query.startswith("label_values(") and query.endswith(f", {name})"), query
        assert metrics_in(query) <= set(known), query
        assert by_name[name]["includeAll"] and by_name[name]["allValue"] == ".*"
    assert '{namespace=~"$namespace"}' in by_name["pod"]["query"]["query"]


def test_no_panel_says_it_waits_for_code_that_has_landed() -> None:
    for panel in panels():
        assert "empty until" not in panel.get("description", ""), panel["title"]


def test_panels_use_the_dashboards_datasource_and_do_not_overlap() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variable = dashboard["templating"]["list"][0]
    assert (variable["type"], variable["query"]) == ("datasource", "prometheus")
    everything = dashboard["panels"]
    assert len({p["id"] for p in everything}) == len(everything)
    cells: set[tuple[int, int]] = set()
    for panel in everything:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        mine = {
            (x, y)
            for x in range(box["x"], box["x"] + box["w"])
            for y in range(box["y"], box["y"] + box["h"])
        }
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
    for panel in panels():
        assert panel["datasource"]["uid"] == "${" + variable["name"] + "}", panel["title"]
