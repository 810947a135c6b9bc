"""A real Prometheus server for tests, and `promtool check metrics`.

The audit questions of issue 18 are asked the way an auditor asks them: in PromQL,
of a real Prometheus (Debian's `prometheus` package, installed through
`tests.interop.ensure_command` when missing: a clean CI machine has none, and a
skipped test proves nothing) that scrapes real components over loopback.

    targets = {
        "agent": [Target("127.0.0.1:9901", {"namespace": "shop"}), "127.0.0.1:9902"],
        "ca": ["127.0.0.1:8443"],
    }
    with start_prometheus(targets, tmp_path) as prometheus:
        prometheus.wait_for_targets()                      # every target scraped once, up
        prometheus.query('sum(outrider_connections_total{mtls="false"})')  # the API's result
        prometheus.wait_for("outrider_svid_info", lambda result: len(result) == 2)
        prometheus.value("sum(outrider_authz_denials_total)")          # one number, 0 if none

`targets` maps a job name to its scrape targets: "host:port" or a `Target` with static
labels, as Kubernetes service discovery's relabelling would attach them (`namespace`,
`pod`); every series scraped from it then carries them, beside `job` and
`instance` (= the address). Scrapes run every `scrape_interval` (1 s by default), so
a test polls with `wait_for` and a deadline, never sleeps. The first scrape comes ~5 s
after start (Prometheus hands discovered targets to its scrapers at most every 5 s), so
share one server per module and start it as soon as the targets' addresses are known.
The server listens on a free loopback port (`url`), keeps its TSDB under `tmp`, and is
stopped (SIGTERM) when the `with` block ends or on `stop()`.
`promtool_check_metrics(text)` lints one /metrics page the way `promtool check metrics`
does and returns its complaints; `exposition_problems(text, component)` adds the
contract's checks (build info, process series, no `*_created`, latency buckets from 100 µs).
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.interop import ensure_command
from tests.support import free_port

#: The API's result vector: [{"metric": {label: value}, "value": [unix_time, "value"]}, ...]
Result = list[dict[str, Any]]


@dataclass(frozen=True)
class Target:
    """One scrape target: `address` is host:port, `labels` go on every series scraped from it.

    `scheme` "https" with `ca_file` scrapes a server whose certificate that CA signed (the
    injector serves /metrics on its webhook's TLS port)."""

    address: str
    labels: Mapping[str, str] = field(default_factory=dict)
    metrics_path: str = "/metrics"
    scheme: str = "http"
    ca_file: Path | None = None


def _scrape_configs(targets: Mapping[str, Sequence[str | Target]]) -> list[dict[str, Any]]:
    """One scrape config per job and way of scraping; each target's series carry
    `job` = its job's name (set as a static label: a config's name must be unique)."""
    configs: list[dict[str, Any]] = []
    for job, members in targets.items():
        ways: dict[tuple[str, str, Path | None], list[dict[str, Any]]] = {}
        for member in members:
            target = member if isinstance(member, Target) else Target(member)
            group = {"targets": [target.address], "labels": {**target.labels, "job": job}}
            ways.setdefault((target.metrics_path, target.scheme, target.ca_file), []).append(group)
        for (path, scheme, ca_file), groups in ways.items():
            config: dict[str, Any] = {
                "job_name": f"{job}-{len(configs)}",
                "metrics_path": path,
                "scheme": scheme,
                "static_configs": groups,
            }
            if ca_file is not None:
                config["tls_config"] = {"ca_file": str(ca_file)}
            configs.append(config)
    return configs


class Prometheus:
    """A running Prometheus server; see the module docstring."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def __enter__(self) -> Prometheus:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def _get(self, path: str, **params: str) -> Any:
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as error:  # a bad query: Prometheus says why
            body = json.loads(error.read() or b"{}")
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params}: {body}")
        return body["data"]

    def query(self, promql: str, at: float | datetime | None = None) -> Result:
        """An instant query's result (a vector: one dict per series; a scalar comes back
        as one series with no labels)."""
        params = {"query": promql}
        if at is not None:
            params["time"] = str(at.timestamp() if isinstance(at, datetime) else at)
        data = self._get("/api/v1/query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def value(self, promql: str, at: float | datetime | None = None) -> float:
        """The one number `promql` evaluates to (0 when the vector is empty)."""
        result = self.query(promql, at)
        if len(result) > 1:
            raise AssertionError(f"{promql!r} gave {len(result)} series, not one: {result}")
        return float(result[0]["value"][1]) if result else 0.0

    def wait_for(
        self, promql: str, predicate: Callable[[Result], bool], timeout: float = 20.0
    ) -> Result:
        """The first result of `promql` that `predicate` accepts, polled until `timeout`."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if predicate(result):
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"{promql!r} still {result} after {timeout}s")
            time.sleep(0.1)

    def targets(self) -> list[dict[str, Any]]:
        """The active targets as /api/v1/targets reports them (health, lastError, labels)."""
        return list(self._get("/api/v1/targets", state="active")["activeTargets"])

    def wait_for_targets(self, timeout: float = 20.0) -> None:
        """Every target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout
        while True:
            active = self.targets()
            if active and all(t["health"] == "up" for t in active):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"targets not all up after {timeout}s: {active}")
            time.sleep(0.1)


def start_prometheus(
    targets: Mapping[str, Sequence[str | Target]],
    tmp: Path,
    scrape_interval: str = "1s",
    timeout: float = 30.0,
) -> Prometheus:
    """Prometheus scraping `targets` (job -> addresses or `Target`s), ready to query."""
    binary = ensure_command("prometheus", "prometheus")
    tmp.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {
            "scrape_interval": scrape_interval,
            "scrape_timeout": scrape_interval,
            "evaluation_interval": scrape_interval,
        },
        "scrape_configs": _scrape_configs(targets),
    }
    config_file = tmp / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    port = free_port()
    log = tmp / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                # A series gone from a scrape is stale at once (staleness markers); the
                # lookback only bounds how far back an instant query looks for a sample.
                "--query.lookback-delta=30s",
                "--log.level=warn",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise AssertionError(f"prometheus exited {process.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{prometheus.url}/-/ready", timeout=2) as ready:
                if ready.status == 200:
                    return prometheus
        except (urllib.error.URLError, ConnectionError):
            pass
        if time.monotonic() > deadline:
            prometheus.stop()
            raise AssertionError(f"prometheus not ready in {timeout}s:\n{log.read_text()}")
        time.sleep(0.05)


def promtool_check_metrics(text: str) -> str:
    """`promtool check metrics` on one /metrics page: "" when it passes, else its complaints
    (parse errors and lint problems both make it exit non-zero)."""
    promtool = ensure_command("promtool", "prometheus")
    done = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    if done.returncode == 0:
        return ""
    return f"exit {done.returncode}: {done.stdout}{done.stderr}".strip()


#: Histograms of something other than how long an operation took (an SVID's lifetime).
NOT_LATENCIES = frozenset({"outrider_ca_issued_ttl_seconds"})


def exposition_problems(text: str, component: str) -> list[str]:
    """What is wrong with one component's /metrics page against the contract: promtool's
    complaints; no `outrider_build_info{component}` = 1 or no process_/python_ series;
    a `*_created` series; a latency histogram whose first bucket is above 100 µs."""
    problems = [p for p in [promtool_check_metrics(text)] if p]
    families = {family.name: family for family in text_string_to_metric_families(text)}
    build = families.get("outrider_build_info")
    if build is None or [s.labels.get("component") for s in build.samples] != [component]:
        problems.append(f"outrider_build_info of {component}: {build and build.samples}")
    for needed in ("process_start_time_seconds", "process_resident_memory_bytes", "python_info"):
        if needed not in families:
            problems.append(f"no {needed}")
    for family in families.values():
        names = {sample.name for sample in family.samples}
        problems += [f"{name} is exposed" for name in sorted(names) if name.endswith("_created")]
        if family.type == "histogram" and family.name not in NOT_LATENCIES:
            bounds = [float(s.labels["le"]) for s in family.samples if s.name.endswith("_bucket")]
            if bounds and min(bounds) > 0.0001:
                problems.append(f"{family.name}: first bucket {min(bounds)} s, above 100 µs")
    return problems
