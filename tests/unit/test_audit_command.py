"""`outrider audit` as a user runs it: its flags, saved scrapes, and errors that say what to do."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from outrider import cli
from outrider.audit.command import AuditError, parse_time
from tests.support import free_port

NOW = datetime(2026, 12, 6, 15, 0, tzinfo=UTC)
BACKEND = "spiffe://example.org/ns/shop/sa/backend"
SCRAPE = f"""\
# HELP outrider_agent_info The agent's identity.
# TYPE outrider_agent_info gauge
outrider_agent_info{{spiffe_id="{BACKEND}",version="0.1.0"}} 1.0
# TYPE process_start_time_seconds gauge
process_start_time_seconds 1.7650e+09
# TYPE outrider_listener_info gauge
outrider_listener_info{{direction="inbound",port="8080",protocol="http",mtls_mode="strict"}} 1.0
# TYPE outrider_svid_info gauge
outrider_svid_info{{spiffe_id="{BACKEND}",serial="a1",not_before="2026-12-06T14:00:00Z",\
not_after="2026-12-06T15:00:00Z"}} 1.0
# TYPE outrider_connections_total counter
outrider_connections_total{{direction="inbound",mtls="true",\
peer_id="spiffe://example.org/ns/shop/sa/frontend"}} 7.0
outrider_connections_total{{direction="inbound",mtls="false",peer_id=""}} {{plaintext}}
# TYPE outrider_tls_handshakes_total counter
outrider_tls_handshakes_total{{direction="inbound",result="ok",reason="",tls_version="TLSv1.3",\
cipher="TLS_AES_128_GCM_SHA256"}} 7.0
"""


def scrape(tmp_path: Path, plaintext: int = 0) -> Path:
    path = tmp_path / "backend.metrics"
    path.write_text(SCRAPE.replace("{plaintext}", str(plaintext)))
    os.utime(path, (NOW.timestamp(), NOW.timestamp()))
    return path


@pytest.mark.parametrize(
    ("text", "when"),
    [
        ("24h", NOW - timedelta(hours=24)),
        ("90m", NOW - timedelta(minutes=90)),
        ("2026-12-06T14:00:00Z", datetime(2026, 12, 6, 14, tzinfo=UTC)),
        ("2026-12-06T14:00:00", datetime(2026, 12, 6, 14, tzinfo=UTC)),
    ],
)
def test_a_time_is_a_duration_back_from_now_or_rfc3339(text: str, when: datetime) -> None:
    assert parse_time(text, NOW, "--since") == when


def test_a_time_that_is_neither_says_both_forms() -> None:
    with pytest.raises(AuditError, match=r"--since 'yesterday' is neither .* RFC 3339"):
        parse_time("yesterday", NOW, "--since")


def test_saved_scrapes_make_a_report_counting_totals_since_each_process_started(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert cli.main(["audit", "--metrics", str(scrape(tmp_path)), "--out", str(out)]) == 0
    report = json.loads((out / "audit.json").read_text())
    assert report["plaintext"]["proved_zero"] is True
    assert report["tls"]["versions"] == {"TLSv1.3": 7}
    assert report["edges"][0]["inbound"] == 7 and report["edges"][0]["destination"] == BACKEND
    assert report["certificates"][0]["certificates"][0]["lifetime_seconds"] == 3600
    assert report["agents"][0]["namespace"] == "shop"  # from the agent's own SPIFFE ID
    assert "(proved zero)" in capsys.readouterr().out
    assert (out / "audit.html").read_text().startswith("<!doctype html>")


def test_a_saved_scrape_of_a_strict_port_that_let_plaintext_in_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    assert cli.main(["audit", "--metrics", str(scrape(tmp_path, 3)), "--out", str(out)]) == 1
    assert "a strict port accepted plaintext" in capsys.readouterr().err
    assert json.loads((out / "audit.json").read_text())["plaintext"]["strict_violations"] == 1


def test_an_unreachable_prometheus_is_exit_2_saying_what_to_check(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["audit", "--prometheus", url, "--out", str(tmp_path)]) == 2
    said = capsys.readouterr().err
    assert f"cannot reach Prometheus at {url}" in said and "--metrics FILE" in said
    assert list(tmp_path.iterdir()) == []


@contextmanager
def answering(body: bytes) -> Iterator[str]:
    """An HTTP server that answers every GET with `body` (200); yields its base URL."""

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_a_url_that_is_not_prometheus_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with answering(b"<html>a login page</html>") as base:
        url = f"{base}/graph"
        assert cli.main(["audit", "--prometheus", url, "--out", str(tmp_path)]) == 2
    assert "other than the Prometheus API's JSON" in capsys.readouterr().err


def _vector(*items: object) -> dict[str, object]:
    return {"status": "success", "data": {"resultType": "vector", "result": list(items)}}


@pytest.mark.parametrize(
    "answer",
    [
        {"status": "success", "data": []},
        {"status": "success", "data": {"result": 5}},
        _vector({"value": [1, "1"]}),
        _vector([1, 2]),
        _vector({"metric": [1], "value": [1, "1"]}),
        _vector({"metric": {"spiffe_id": 5}, "value": [1, "1"]}),
        _vector({"metric": {}, "value": [1, "abc"]}),
        _vector({"metric": {}, "values": [[1, None]]}),
        _vector({"metric": {}, "values": 7}),
        _vector({"metric": {}, "value": [1]}),
    ],
)
def test_a_prometheus_answer_that_is_not_the_apis_is_exit_2_never_a_verdict(
    answer: object, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Exit 1 says a strict port accepted plaintext: a broken or hostile server must not
    say it (an uncaught exception exits 1 too)."""
    with answering(json.dumps(answer).encode()) as url:
        assert cli.main(["audit", "--prometheus", url, "--out", str(tmp_path)]) == 2
    said = capsys.readouterr().err
    assert "the API's vector or matrix" in said or "without a result list" in said
    assert list(tmp_path.iterdir()) == []


def test_samples_that_are_no_finite_number_in_range_are_left_out(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    agent = {"metric": {"spiffe_id": BACKEND, "instance": "a:1"}, "values": [[1.7e9, "1"]]}
    odd = {
        "metric": {"direction": "inbound", "mtls": "false", "peer_id": "", "instance": "a:1"},
        "values": [[1.7e9, "NaN"], ["1e400", "3"], [-5, "1"], [1.7e9 + 1, "+Inf"]],
    }
    with answering(json.dumps(_vector(agent, odd)).encode()) as url:
        assert cli.main(["audit", "--prometheus", url, "--out", str(tmp_path)]) == 0
    json.loads((tmp_path / "audit.json").read_text(), parse_constant=_no_constants)


def _no_constants(name: str) -> None:
    raise AssertionError(f"{name} in audit.json: not JSON")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("outrider_agent_info 1\n", 0),  # labels missing: read as empty, no crash
        ("outrider_svid_info 1\noutrider_listener_info 1\noutrider_connections_total 3\n", 0),
        (
            f'outrider_agent_info{{spiffe_id="{BACKEND}"}} NaN\nprocess_start_time_seconds 1e400\n',
            2,
        ),
    ],
)
def test_a_scrape_missing_labels_or_numbers_is_read_or_refused_never_a_crash(
    text: str, code: int, tmp_path: Path
) -> None:
    path = tmp_path / "odd.metrics"
    path.write_text(text)
    assert cli.main(["audit", "--metrics", str(path), "--out", str(tmp_path / "r")]) == code


HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "</title><svg onload=alert(1)>",
    "'><a href=javascript:alert(1)>x</a>",
]


def test_label_values_from_the_evidence_leave_the_page_inert(tmp_path: Path) -> None:
    """SPIFFE IDs, policy and rule names, serials, reasons as an attacker would pick them:
    the page has no script, no event handler attribute, no javascript: link."""
    lines = []
    for n, bad in enumerate(HOSTILE):
        quoted = bad.replace("\\", "\\\\").replace('"', '\\"')
        who = f"spiffe://example.org/ns/{quoted}/sa/x{n}"
        lines += [
            f'outrider_agent_info{{spiffe_id="{who}",version="{quoted}"}} 1',
            f'outrider_svid_info{{spiffe_id="{who}",serial="{quoted}",not_before="{quoted}",'
            f'not_after="2026-12-06T15:00:00Z"}} 1',
            f'outrider_authz_denials_total{{policy="{quoted}",rule="{quoted}",peer_id="{who}"}} 2',
            f'outrider_connections_total{{direction="inbound",mtls="true",peer_id="{who}"}} 1',
            f'outrider_connections_refused_total{{direction="inbound",reason="{quoted}"}} 1',
            f'outrider_tls_handshakes_total{{direction="inbound",result="ok",reason="",'
            f'tls_version="{quoted}",cipher="{quoted}"}} 1',
            f'outrider_listener_info{{direction="inbound",port="{quoted}",protocol="http",'
            f'mtls_mode="{quoted}"}} 1',
        ]
    path = tmp_path / "hostile.metrics"
    path.write_text("\n".join(lines) + "\n")
    out = tmp_path / "r"
    assert cli.main(["audit", "--metrics", str(path), "--out", str(out)]) in (0, 1)
    page = (out / "audit.html").read_text()
    found = _Tags()
    found.feed(page)
    assert "script" not in found.tags and not found.handlers and not found.javascript
    assert "&lt;script&gt;" in page  # the values are there, as text


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.handlers: list[str] = []
        self.javascript: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        self.javascript += [v for _, v in attrs if v and "javascript:" in v.lower()]


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (["--since", "1h", "--until", "2h"], "the range is empty"),
        (["--since", "last week"], "is neither a duration"),
        (["--prometheus", "prometheus:9090"], "is not an http:// or https:// URL"),
        (["--since", "99999999999h"], "give an RFC 3339 time instead"),
    ],
)
def test_bad_flags_are_exit_2_with_the_reason(
    flags: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    evidence = [] if "--prometheus" in flags else ["--prometheus", "http://127.0.0.1:1"]
    assert cli.main(["audit", *evidence, *flags, "--out", str(tmp_path)]) == 2
    assert said in capsys.readouterr().err


def test_an_unreadable_scrape_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.metrics"
    bad.write_text("outrider_connections_total{oops 1\n")
    assert cli.main(["audit", "--metrics", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert f"cannot read the scrape {bad}" in capsys.readouterr().err


def test_prometheus_or_saved_scrapes_are_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(["audit", "--out", "x"])
    assert exited.value.code == 2
    assert "--prometheus" in capsys.readouterr().err


def test_a_duration_back_beyond_the_calendar_is_a_usage_error_not_a_traceback() -> None:
    with pytest.raises(AuditError, match=r"--since '999999999d'"):
        parse_time("999999999d", NOW, "--since")
