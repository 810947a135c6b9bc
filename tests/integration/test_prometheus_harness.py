"""tests/prometheus.py scrapes what it is given, with the labels it is given, and
answers PromQL over the HTTP API: what the audit acceptance tests build on."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, start_http_server

from tests.prometheus import Target, promtool_check_metrics, start_prometheus


@pytest.fixture
def exporter() -> Iterator[tuple[str, Counter]]:
    """A /metrics server with one counter, on a loopback port of its own."""
    registry = CollectorRegistry()
    counter = Counter("demo_requests", "Requests seen.", ["code"], registry=registry)
    server, thread = start_http_server(0, "127.0.0.1", registry)
    try:
        yield f"127.0.0.1:{server.server_port}", counter
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_scrapes_targets_with_their_static_labels_and_answers_promql(
    exporter: tuple[str, Counter], tmp_path: Path
) -> None:
    address, counter = exporter
    counter.labels("200").inc(3)
    targets = {"demo": [Target(address, {"namespace": "shop"})]}
    with start_prometheus(targets, tmp_path) as prometheus:
        prometheus.wait_for_targets()
        result = prometheus.wait_for("demo_requests_total", lambda r: len(r) == 1)
        assert result[0]["metric"] == {
            "__name__": "demo_requests_total",
            "code": "200",
            "instance": address,
            "job": "demo",
            "namespace": "shop",
        }
        counter.labels("200").inc(2)
        prometheus.wait_for(
            'sum(demo_requests_total{namespace="shop"})',
            lambda r: r and float(r[0]["value"][1]) == 5,
        )
        assert prometheus.value('sum(demo_requests_total{namespace="elsewhere"})') == 0
        with pytest.raises(AssertionError, match="parse error"):
            prometheus.query("sum(")
    assert prometheus.process.poll() is not None


def test_promtool_passes_a_clean_page_and_names_a_bad_one() -> None:
    assert promtool_check_metrics("# HELP a_total A.\n# TYPE a_total counter\na_total 1\n") == ""
    complaint = promtool_check_metrics("# HELP a A.\n# TYPE a counter\na 1\n")
    assert "_total" in complaint
